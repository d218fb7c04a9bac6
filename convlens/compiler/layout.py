"""Logical axes, role layouts, schemes and scheme detection.

A tensor rule is written against the *logical* tensor of a stem (its dequantized weight). Every
logical axis has a name: ``out`` and ``in`` for a linear weight, the capture name (``e``) for an
axis made by ``stack``, ``k1``, ``k2``... for the extra axes of a convolution kernel.

A *scheme* (a storage format) is a set of roles. Each role stores some logical axes, each at a
granularity: **plain** (one element per logical element), **packed** (P logical elements per
storage element, with a codec and an element order) or **blocked** (one element per block of B
logical elements, the last block possibly partial). A role without an axis for a logical axis
is **broadcast** along it. The op table (:mod:`convlens.compiler.ops`) lifts every op to every
role from that relation.

A role instance knows its *canonical* layout (one :class:`AxisSpec` per physical dim) and,
where the stored shape differs (``[ob, 1, ib, 1]``, gpt-oss ``[.., in/32, 16]``, ``[1]``), the
*view* it was stored in, so that the output is stored the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from convlens.compiler.plan import FLOAT_DTYPES, Shape

AxisKind = Literal["plain", "packed", "blocked"]
Relation = Literal["plain", "packed", "blocked", "broadcast"]
RELATIONS: tuple[Relation, ...] = ("plain", "packed", "blocked", "broadcast")

# Where element j of a storage unit sits, per named order (AWQ's GEMM interleave: nibble k holds
# element [0, 2, 4, 6, 1, 3, 5, 7][k]).
ORDERS: dict[str, tuple[int, ...] | None] = {"lo": None, "hi": None,
                                             "awq": (0, 4, 1, 5, 2, 6, 3, 7)}
CODECS = frozenset({"e2m1", "u4", "s4", "u4o8", "u8", "s8", "u8o128", "u2", "u3"})


BNB_MARKERS = ("absmax", "quant_map", "quant_state", "nested_", "SCB", "weight_format")


def default_axes(rank: int) -> tuple[str, ...]:
    """Logical axis names of a weight of this rank when the endpoint does not declare them."""
    if rank == 0:
        return ()
    if rank == 1:
        return ("out",)
    if rank == 2:
        return ("out", "in")
    if rank == 3:
        return ("e", "out", "in")
    return ("out", "in", *(f"k{i}" for i in range(1, rank - 1)))


def is_contraction_axis(name: str) -> bool:
    """``in`` and the kernel axes that flatten into it: what a bias or per-row vector lacks."""
    return name == "in" or (name.startswith("k") and name[1:].isdigit())


def is_stack_axis(name: str) -> bool:
    return name != "out" and not is_contraction_axis(name)


@dataclass(frozen=True)
class AxisSpec:
    """One physical axis of a role."""

    name: str
    kind: AxisKind = "plain"
    factor: int = 1
    codec: str | None = None
    order: str = "lo"
    param: str | None = None  # the scheme param the factor comes from (group_size)

    def physical(self, logical: int) -> int:
        return logical if self.kind == "plain" else -(-logical // self.factor)

    def positions(self, bits: int) -> tuple[int, ...]:
        """Bit offset of element j inside a storage unit."""
        p = self.factor
        named = ORDERS.get(self.order)
        if self.order == "hi":
            slots: tuple[int, ...] = tuple(range(p - 1, -1, -1))
        elif named is not None:
            slots = named
        else:
            slots = tuple(range(p))
        return tuple(s * bits for s in slots)

    def describe(self) -> str:
        if self.kind == "plain":
            return self.name
        if self.kind == "blocked":
            return f"{self.name}/{self.factor} block"
        order = "" if self.order == "lo" else f" {self.order}"
        return f"{self.name}/{self.factor} packed {self.codec}{order}"


@dataclass(frozen=True)
class Dim:
    """A stored dim of a view: a literal size or ceil(size of an axis / divisor)."""

    axis: str | None
    divisor: int = 1
    literal: int | None = None


@dataclass(frozen=True)
class RoleSpec:
    """A role of a scheme.

    ``kind``: ``tensor`` (explicit axes), ``full`` (all logical axes, plain: an unquantized
    weight), ``vector`` (all but the contraction axes: a bias), ``shape`` (metadata holding the
    logical shape, recomputed rather than moved).
    """

    name: str
    dtype: str | None
    kind: Literal["tensor", "full", "vector", "shape"] = "tensor"
    axes: tuple[AxisSpec, ...] = ()
    views: tuple[tuple[Dim, ...], ...] = ()
    shared: bool = False  # broadcast along stacked axes: one value for all experts
    optional: bool = False
    activation: bool = False  # an activation scale (the `max` policy applies)
    reciprocal: bool = False  # stored as 1/scale (compressed-tensors global scales)
    index: bool = False  # values are positions along its axis (GPTQ g_idx)
    homes: tuple[str, ...] = ()  # a companion role: the stem names that may carry it

    def follows_logical_order(self) -> bool:
        names = [a.name for a in self.axes]
        canonical = [n for n in ("out", "in") if n in names]
        return names == canonical or self.kind != "tensor"

    def layout(self, logical: tuple[str, ...], stacked: bool) -> tuple[AxisSpec, ...]:
        """The canonical physical axes of this role for a stem with these logical axes."""
        if self.kind == "full":
            return tuple(AxisSpec(a) for a in logical)
        if self.kind == "vector":
            return tuple(AxisSpec(a) for a in logical if not is_contraction_axis(a))
        if self.kind == "shape":
            return ()
        by_name = {a.name: a for a in self.axes}
        stack = [AxisSpec(a) for a in logical if is_stack_axis(a) and stacked]
        if self.follows_logical_order():
            out = []
            for a in logical:
                if a in by_name:
                    out.append(by_name[a])
                elif is_stack_axis(a) and stacked:
                    out.append(AxisSpec(a))
            return tuple(out)
        return (*stack, *self.axes)


@dataclass(frozen=True)
class Scheme:
    """A storage format: its roles (the first carries the logical tensor), the config values
    that point at it, and its reference dequantizer (plain data, see runtime/dequant.py)."""

    name: str
    roles: Mapping[str, RoleSpec]
    detects: Mapping[str, frozenset[str]] = field(default_factory=dict)
    dequant: Any = None
    path: str = "<builtin>"
    params: Mapping[str, int] = field(default_factory=dict)
    companion: bool = False  # roles that sit next to any scheme's (kv cache scales)

    def bind(self, hints: frozenset[str]) -> Scheme:
        """This scheme with its params (block sizes) taken from ``key=value`` config hints."""
        if not self.params:
            return self
        values = dict(self.params)
        for hint in hints:
            key, _, value = hint.partition("=")
            if key in values and value.lstrip("-").isdigit():
                values[key] = int(value)
        if values == dict(self.params):
            return self
        # -1 (GPTQ "no groups"): one block for the whole axis
        sizes = {k: (v if v > 0 else 1 << 31) for k, v in values.items()}
        roles = {}
        for name, spec in self.roles.items():
            axes = tuple(replace(a, factor=sizes[a.param]) if a.param else a for a in spec.axes)
            roles[name] = replace(spec, axes=axes)
        return replace(self, roles=roles, params=values)

    @property
    def primary(self) -> str:
        return next(iter(self.roles))

    @property
    def quantized(self) -> bool:
        return self.name != "plain"

    def hint_score(self, hints: frozenset[str]) -> int:
        """How many of this scheme's detection entries (``key=value``) the config matches.
        Values compare without case: ModelOpt writes ``quant_algo`` both ways (``FP8_PB_WO`` in
        its docs, ``fp8_pb_wo`` in the 0.47 exports)."""
        low = {h.lower() for h in hints}
        return sum(1 for key, values in self.detects.items()
                   if any(f"{key}={v}".lower() in low for v in values))


PLAIN = Scheme(
    name="plain",
    roles={"weight": RoleSpec("weight", None, "full"),
           "bias": RoleSpec("bias", None, "vector", optional=True)},
)


@dataclass(frozen=True)
class RoleMeta:
    shape: Shape
    dtype: str


@dataclass(frozen=True)
class RoleFit:
    """How one role instance is stored: its canonical axes and the view index (or None)."""

    layout: tuple[AxisSpec, ...]
    view: int | None
    canonical: Shape


@dataclass(frozen=True)
class Detected:
    scheme: Scheme
    axes: tuple[str, ...]
    shape: Shape  # logical
    roles: Mapping[str, RoleFit]


def logical_sizes(axes: tuple[str, ...], shape: Shape) -> dict[str, int]:
    return dict(zip(axes, shape, strict=True))


def view_shape(view: tuple[Dim, ...], sizes: Mapping[str, int]) -> Shape:
    return tuple(d.literal if d.literal is not None or d.axis is None
                 else -(-sizes[d.axis] // d.divisor) for d in view)  # type: ignore[misc]


def canonical_from_view(view: tuple[Dim, ...], stored: Shape, lead: int, n_axes: int
                        ) -> Shape | None:
    """Undo a view: group each literal dim with the axis dim before it."""
    body = stored[lead:]
    if len(body) != len(view):
        return None
    groups: list[int] = []
    scalar = 1
    for d, size in zip(view, body, strict=True):
        if d.axis is None:
            if groups:
                groups[-1] *= size
            else:
                scalar *= size
        else:
            groups.append(size * (scalar if not groups else 1))
    if not any(d.axis for d in view):
        groups = [1] * n_axes  # a scalar-stored block scale: every canonical dim is one block
        if math.prod(body) != 1:
            return None
    if len(groups) != n_axes:
        return None
    return tuple(stored[:lead]) + tuple(groups)


def dtype_fits(want: str | None, got: str) -> bool:
    """``None``: any dtype; ``float``: the model's float dtype (F16, BF16, F32, F64)."""
    if want is None:
        return True
    if want == "float":
        return got in FLOAT_DTYPES
    return want == got


def fit_role(spec: RoleSpec, meta: RoleMeta, logical: tuple[str, ...], sizes: Mapping[str, int]
             ) -> RoleFit | str:
    """How ``meta`` stores ``spec`` for this logical tensor, or why it does not."""
    if not dtype_fits(spec.dtype, meta.dtype):
        return f"{spec.name} is {meta.dtype}, the scheme stores {spec.dtype}"
    if spec.kind == "shape":
        if meta.shape != (len(logical),):
            return f"{spec.name} has shape {list(meta.shape)}, expected [{len(logical)}]"
        return RoleFit((), None, meta.shape)
    tried = []
    # A role may lack the stacked axes: one value for every expert (ModelOpt's BMM experts keep
    # one weight_scale_2 for the whole stacked tensor). Unstacking then duplicates it.
    options = (False, True) if spec.shared else (True, False)
    for stacked in options:
        layout = spec.layout(logical, stacked)
        want = tuple(ax.physical(sizes[ax.name]) for ax in layout)
        tried.append(want)
        if meta.shape == want:
            return RoleFit(layout, None, want)
        own = {a.name for a in spec.axes}
        lead = 0
        while lead < len(layout) and layout[lead].name not in own:
            lead += 1
        for i, view in enumerate(spec.views):
            canon = canonical_from_view(view, meta.shape, lead, len(layout) - lead)
            if canon == want:
                return RoleFit(layout, i, want)
    expected = " or ".join(str(list(t)) for t in tried)
    return f"{spec.name} has shape {list(meta.shape)}, expected {expected}"


_DETECTED: dict[tuple[Any, ...], Detected | str] = {}
_HELD: dict[int, tuple[tuple[Scheme, ...], int]] = {}


def detect(schemes: tuple[Scheme, ...], roles: Mapping[str, RoleMeta],
           declared: tuple[str, ...] | None, hints: frozenset[str] = frozenset()
           ) -> Detected | str:
    """The scheme whose roles fit the tensors of one stem, or the reasons none does.

    Schemes named by ``hints`` (values from the checkpoint's quantization config) are tried
    first; the first scheme that fits every present role wins. Results are memoized: the 100k
    experts of a large MoE checkpoint share a handful of signatures."""
    held = _HELD.get(id(schemes))
    if held is None or held[0] is not schemes:  # keep the tuple alive so its id stays unique
        if len(_HELD) > 256:
            _HELD.clear()
            _DETECTED.clear()
        _HELD[id(schemes)] = (schemes, len(_HELD))
    key = (id(schemes), tuple(sorted(roles.items())), declared, hints)
    found = _DETECTED.get(key)
    if found is None:
        if len(_DETECTED) > 4096:
            _DETECTED.clear()
        found = _DETECTED[key] = _detect(schemes, roles, declared, hints)
    return found


def _detect(schemes: tuple[Scheme, ...], roles: Mapping[str, RoleMeta],
            declared: tuple[str, ...] | None, hints: frozenset[str]) -> Detected | str:
    names = set(roles)
    bnb = sorted(n for n in names if any(m in n for m in BNB_MARKERS))
    if bnb:
        return (f"bitsandbytes-quantized tensors ({', '.join(bnb)}) are not supported: their "
                "blocks run over the flattened tensor with a packed JSON state; dequantize, "
                "convert, and quantize again (bitsandbytes quantization needs no data)")
    near: list[str] = []  # schemes whose roles are all there, but shapes or dtypes differ
    missing: list[str] = []
    extra: list[tuple[int, int, int, str]] = []  # schemes that lack some present role
    ordered = sorted((s.bind(hints) for s in schemes), key=lambda s: -s.hint_score(hints))
    for scheme in ordered:
        if not names <= set(scheme.roles):
            unknown = sorted(names - set(scheme.roles))
            fitting = sum(1 for n in names & set(scheme.roles)
                          if dtype_fits(scheme.roles[n].dtype, roles[n].dtype))
            extra.append((len(unknown), -fitting, -scheme.hint_score(hints),
                          f"{scheme.name} has no role {', '.join(unknown)}"))
            continue
        required = {r for r, spec in scheme.roles.items() if not spec.optional}
        if not required <= names:
            missing.append(f"{scheme.name}: missing {sorted(required - names)}")
            continue
        fit = _fit(scheme, roles, declared)
        if isinstance(fit, str):
            near.append(f"{scheme.name}: {fit}")
            continue
        return fit
    reasons = near or missing
    if extra:  # the scheme closest by roles, and what it lacks
        reasons = [min(extra)[3], *reasons]
    known = sorted({r for s in schemes for r in s.roles})
    unknown = sorted(names - set(known))
    if unknown:
        return (f"tensors with roles {unknown} fit no known scheme (roles {sorted(names)}; "
                "known roles: " + ", ".join(known) + ")")
    if reasons:
        return "no scheme fits: " + "; ".join(reasons[:4])
    return f"roles {sorted(names)} fit no known scheme"


def _fit(scheme: Scheme, roles: Mapping[str, RoleMeta], declared: tuple[str, ...] | None
         ) -> Detected | str:
    primary = scheme.roles[scheme.primary]
    pmeta = roles[scheme.primary]
    options: list[tuple[tuple[str, ...], Shape]]
    if primary.kind == "full":
        rank = len(pmeta.shape)
        axes = declared if declared is not None else default_axes(rank)
        if len(axes) != rank:
            return (f"{scheme.primary} has {rank} dims but the endpoint declares axes "
                    f"({', '.join(axes)})")
        options = [(axes, pmeta.shape)]
    else:
        if not dtype_fits(primary.dtype, pmeta.dtype):
            return f"{primary.name} is {pmeta.dtype}, the scheme stores {primary.dtype}"
        options = list(_primary_options(primary, pmeta, declared))
        if not options:
            return (f"{primary.name} has shape {list(pmeta.shape)}, which no layout of the "
                    "scheme explains")
    reason = ""
    for axes, shape in options:
        sizes = logical_sizes(axes, shape)
        fits: dict[str, RoleFit] = {}
        for name, meta in roles.items():
            fit = fit_role(scheme.roles[name], meta, axes, sizes)
            if isinstance(fit, str):
                reason = fit
                break
            fits[name] = fit
        else:
            return Detected(scheme, axes, shape, fits)
    return reason


def _primary_options(spec: RoleSpec, meta: RoleMeta, declared: tuple[str, ...] | None
                     ) -> list[tuple[tuple[str, ...], Shape]]:
    """Logical axes and shapes that the primary role of a quantized scheme could stand for:
    stored views first, then the stored shape as canonical."""
    candidates: list[Shape] = []
    for view in spec.views:
        n_lead = len(meta.shape) - len(view)
        if n_lead >= 0:
            canon = canonical_from_view(view, meta.shape, n_lead, len(spec.axes))
            if canon is not None:
                candidates.append(canon)
    candidates.append(meta.shape)
    out = []
    for canon in candidates:
        n_stack = len(canon) - len(spec.axes)
        if n_stack < 0:
            continue
        if declared is not None:
            axes = declared
        elif n_stack:
            axes = (*("e" if i == 0 else f"e{i}" for i in range(n_stack)), "out", "in")
        else:
            axes = ("out", "in")
        layout = spec.layout(axes, True)
        if len(layout) != len(canon):
            continue
        sizes: dict[str, int] = {}
        for ax, d in zip(layout, canon, strict=True):
            sizes[ax.name] = d * ax.factor if ax.kind == "packed" else d
        if set(sizes) != set(axes):
            continue
        out.append((axes, tuple(sizes[a] for a in axes)))
    return out
