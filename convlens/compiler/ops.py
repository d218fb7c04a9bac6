"""The closed set of tensor ops, their inverses (one table) and their lifting to roles (one table).

An op works on *streams*: the values flowing through a tensor rule. A fuse starts with one stream
per source pattern, each a family of stems indexed by the captures still to be stacked; a split
ends with one stream per destination pattern. Every op is written once against the logical tensor
and lifted to every role of the stem's scheme through :data:`LIFT`, keyed by (op, relation of the
role to the axis the op acts on: plain, packed, blocked or broadcast).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from convlens.compiler import plan as P
from convlens.compiler.layout import RELATIONS, AxisSpec, Relation, RoleSpec, Scheme
from convlens.dsl import ast
from convlens.errors import ConversionError, RuleError, Span

# --- values flowing through a rule ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoleValue:
    """One role of one stem: its plan node in canonical layout (one AxisSpec per dim)."""

    node: P.Node
    layout: tuple[AxisSpec, ...]
    spec: RoleSpec
    view: int | None = None
    key: str = ""  # an input key it came from, for messages

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.layout)

    def find(self, axis: str) -> tuple[int, AxisSpec] | None:
        for i, a in enumerate(self.layout):
            if a.name == axis:
                return i, a
        return None

    def relation(self, axis: str) -> Relation:
        hit = self.find(axis)
        return "broadcast" if hit is None else hit[1].kind

    def with_node(self, node: P.Node, layout: tuple[AxisSpec, ...] | None = None) -> RoleValue:
        # not dataclasses.replace (slow on the 100k-expert hot path): the slots set directly
        return new_role_value(node, self.layout if layout is None else layout, self.spec,
                              self.view, self.key)


@dataclass(frozen=True, slots=True)
class StemValue:
    scheme: Scheme
    axes: tuple[str, ...]  # logical axes of the stem's weight
    shape: P.Shape  # logical shape
    roles: Mapping[str, RoleValue]
    keys: tuple[str, ...]  # input keys, for messages


# Fast constructors (as in plan.py): the same objects as the dataclass constructors with every
# field given, without the per-field object.__setattr__ of a frozen dataclass's __init__.
_ROLE_SET = tuple(getattr(RoleValue, n).__set__ for n in RoleValue.__slots__)
_STEM_SET = tuple(getattr(StemValue, n).__set__ for n in StemValue.__slots__)
assert RoleValue.__slots__ == ("node", "layout", "spec", "view", "key")
assert StemValue.__slots__ == ("scheme", "axes", "shape", "roles", "keys")


def new_role_value(node: P.Node, layout: tuple[AxisSpec, ...], spec: RoleSpec, view: int | None,
                   key: str) -> RoleValue:
    """``RoleValue(node, layout, spec, view, key)``."""
    rv = object.__new__(RoleValue)
    a, b, c, d, e = _ROLE_SET
    a(rv, node)
    b(rv, layout)
    c(rv, spec)
    d(rv, view)
    e(rv, key)
    return rv


def new_stem_value(scheme: Scheme, axes: tuple[str, ...], shape: P.Shape,
                   roles: Mapping[str, RoleValue], keys: tuple[str, ...]) -> StemValue:
    """``StemValue(scheme, axes, shape, roles, keys)``."""
    sv = object.__new__(StemValue)
    a, b, c, d, e = _STEM_SET
    a(sv, scheme)
    b(sv, axes)
    c(sv, shape)
    d(sv, roles)
    e(sv, keys)
    return sv


@dataclass
class Stream:
    label: str
    captures: tuple[str, ...]  # family captures, in index order
    members: dict[tuple[int, ...], StemValue]

    def single(self, ctx: OpContext, op: str) -> StemValue:
        if self.captures:
            raise ctx.fail(f"{op} needs one tensor per part, but {self.label!r} is still a family "
                           f"over {{{', '.join(self.captures)}}}; stack it first")
        return self.members[()]


class OpContext:
    """What an op needs while planning one group: config, the rule (for errors), node origin."""

    def __init__(self, origin: int, label: str, span: Span | None, config: Mapping[str, Any],
                 group: str, policies: frozenset[str] = frozenset()) -> None:
        self.origin = origin
        self.label = label
        self.span = span
        self.config = config
        self.group = group
        self.policies = policies

    def fail(self, message: str, *, role: str | None = None,
             key: str | None = None) -> ConversionError:
        return ConversionError(f"{message} (group {self.group})", span=self.span, rule=self.label,
                               role=role, key=key)

    def eval(self, expr: ast.Expr) -> int:
        return eval_expr(expr, self.config, self)


def eval_expr(expr: ast.Expr, config: Mapping[str, Any], ctx: OpContext | None = None) -> int:
    def fail(msg: str) -> ConversionError:
        if ctx is not None:
            return ctx.fail(msg)
        return ConversionError(msg, span=getattr(expr, "span", None))

    if isinstance(expr, ast.Int):
        return expr.value
    if isinstance(expr, ast.Ref):
        if expr.path[0] != "config" or len(expr.path) < 2:
            raise fail(f"{'.'.join(expr.path)!r}: sizes are expressions over config.<field>")
        value: Any = config
        for i, part in enumerate(expr.path[1:], start=1):
            if not isinstance(value, Mapping) or part not in value:
                where = ".".join(expr.path[:i])
                from convlens.errors import did_you_mean

                choices = list(value) if isinstance(value, Mapping) else []
                hint = did_you_mean(part, choices)
                raise fail(f"config has no field {'.'.join(expr.path)!r} ({where} has no {part!r}"
                           + (f"; {hint}" if hint else "") + ")")
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{'.'.join(expr.path)} is {value!r}, not an integer")
        return value
    if isinstance(expr, ast.Call):
        raise fail(f"{expr.func}(...) is not a size expression")
    a = eval_expr(expr.left, config, ctx)
    b = eval_expr(expr.right, config, ctx)
    if expr.op == "+":
        return a + b
    if expr.op == "-":
        return a - b
    if expr.op == "*":
        return a * b
    if b == 0:
        raise fail("division by zero in a size expression")
    return a // b


# --- node builders (shapes computed here, once) -------------------------------------------------


def n_stack(args: list[P.Node], dim: int, origin: int) -> P.Node:
    s = args[0].shape
    return P.new_stack(tuple(args), dim, s[:dim] + (len(args),) + s[dim:], args[0].dtype, origin)


def n_cat(args: list[P.Node], dim: int, origin: int) -> P.Node:
    if len(args) == 1:
        return args[0]
    s = args[0].shape
    total = sum(a.shape[dim] for a in args)
    return P.Cat(tuple(args), dim, s[:dim] + (total,) + s[dim + 1:], args[0].dtype, origin)


def n_slice(arg: P.Node, dim: int, start: int, stop: int, step: int, origin: int) -> P.Node:
    if start == 0 and stop == arg.shape[dim] and step == 1:
        return arg
    length = len(range(start, stop, step))
    s = arg.shape
    shape = s[:dim] + (length,) + s[dim + 1:]
    return P.Slice(arg, dim, start, stop, step, shape, arg.dtype, origin)


def n_select(arg: P.Node, dim: int, index: int, origin: int) -> P.Node:
    s = arg.shape
    return P.new_select(arg, dim, index, s[:dim] + s[dim + 1:], arg.dtype, origin)


def n_permute(arg: P.Node, dims: tuple[int, ...], origin: int) -> P.Node:
    if dims == tuple(range(len(dims))):
        return arg
    return P.Permute(arg, dims, tuple(arg.shape[d] for d in dims), arg.dtype, origin)


def n_reshape(arg: P.Node, shape: P.Shape, origin: int) -> P.Node:
    if shape == arg.shape:
        return arg
    assert math.prod(shape) == math.prod(arg.shape)
    return P.Reshape(arg, shape, arg.dtype, origin)


def n_same(args: list[P.Node], origin: int) -> P.Node:
    # Dedupe by identity: each input is one Load object, reused by renames, so equal inputs
    # are the same object (and a deep == on 384 experts' nodes is quadratic).
    seen: set[int] = set()
    unique: list[P.Node] = []
    for a in args:
        if id(a) not in seen:
            seen.add(id(a))
            unique.append(a)
    if len(unique) == 1:
        return unique[0]
    return P.Same(tuple(unique), unique[0].shape, unique[0].dtype, origin)


def n_take(arg: P.Node, dim: int, indices: tuple[int, ...], origin: int) -> P.Node:
    if indices == tuple(range(arg.shape[dim])):
        return arg
    s = arg.shape
    return P.Take(arg, dim, indices, s[:dim] + (len(indices),) + s[dim + 1:], arg.dtype, origin)


STORAGE_BITS = {"U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64}


def n_unpack(arg: P.Node, dim: int, ax: AxisSpec, origin: int) -> P.Node:
    bits = STORAGE_BITS[arg.dtype] // ax.factor
    s = arg.shape
    shape = s[:dim] + (s[dim] * ax.factor,) + s[dim + 1:]
    return P.Unpack(arg, dim, ax.factor, bits, ax.positions(bits), shape, "I32", origin)


def n_pack(arg: P.Node, dim: int, ax: AxisSpec, dtype: str, origin: int) -> P.Node:
    if isinstance(arg, P.Unpack) and arg.dim == dim and arg.factor == ax.factor:
        return arg.arg  # pack(unpack(x)) is x
    bits = STORAGE_BITS[dtype] // ax.factor
    s = arg.shape
    shape = s[:dim] + (s[dim] // ax.factor,) + s[dim + 1:]
    return P.Pack(arg, dim, ax.factor, bits, ax.positions(bits), shape, dtype, origin)


# --- the ops ----------------------------------------------------------------------------------


def _roles_alike(ctx: OpContext, values: list[StemValue], what: str) -> None:
    # The identity tests in front only skip comparisons of an object with itself, which are
    # equal (stems of one signature share their scheme and layouts).
    first = values[0]
    first_roles = set(first.roles)
    for v in values[1:]:
        if set(v.roles) != first_roles:
            raise ctx.fail(f"{what}: parts have different tensors: {sorted(first.roles)} "
                           f"({first.keys[0]}) vs {sorted(v.roles)} ({v.keys[0]})")
        if v.scheme is not first.scheme and v.scheme != first.scheme:
            raise ctx.fail(f"{what}: parts have different schemes: {first.scheme.name} "
                           f"({first.keys[0]}) vs {v.scheme.name} ({v.keys[0]})")
        if v.axes != first.axes:
            raise ctx.fail(f"{what}: parts have different axes {first.axes} vs {v.axes}")
        for role, rv in v.roles.items():
            other = first.roles[role]
            if rv.node.dtype != other.node.dtype:
                raise ctx.fail(f"{what}: {role} dtypes differ: {other.node.dtype} "
                               f"vs {rv.node.dtype}", role=role, key=v.keys[0])
            if rv.layout is not other.layout and rv.layout != other.layout:
                raise ctx.fail(f"{what}: {role} is stored differently in the parts: "
                               f"{_layout_text(other.layout)} vs {_layout_text(rv.layout)}",
                               role=role, key=rv.key)


def _layout_text(layout: tuple[AxisSpec, ...]) -> str:
    return "[" + ", ".join(a.describe() for a in layout) + "]"


def _lift(op: Op, parts: list[StemValue], role: str, axis: str, ctx: OpContext,
          **kw: Any) -> list[RoleValue]:
    values = [p.roles[role] for p in parts]
    relation = op.relation_of(values[0], axis)
    fn = LIFT.get((type(op), relation))
    if fn is None:  # pragma: no cover - the completeness test forbids this
        raise ctx.fail(f"no lifting of {op.name} for a {relation} role", role=role)
    return fn(op, values, axis, ctx, **kw)


def _rebuild(template: StemValue, axes: tuple[str, ...], shape: P.Shape,
             roles: dict[str, RoleValue], keys: tuple[str, ...]) -> StemValue:
    return new_stem_value(template.scheme, axes, shape, roles, keys)


def _reorder(rv: RoleValue, logical: tuple[str, ...]) -> tuple[AxisSpec, ...]:
    """A role's axes in a new logical order (roles with a fixed order keep theirs)."""
    if not rv.spec.follows_logical_order():
        return rv.layout
    return tuple(sorted(rv.layout, key=lambda a: logical.index(a.name)))


@dataclass(frozen=True)
class Op:
    """Base of the closed op set. ``on`` restricts a per-tensor op to some streams."""

    name: ClassVar[str]
    per_tensor: ClassVar[bool] = False
    on: tuple[int, ...] | None = field(default=None, kw_only=True)
    span: Span | None = field(default=None, compare=False, kw_only=True)

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """Stream families after this op, at compile time; raises ValueError with a reason."""
        return families

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        raise NotImplementedError

    def relation_of(self, rv: RoleValue, axis: str) -> Relation:
        return rv.relation(axis)

    def describe(self) -> str:
        return f"{self.name}({', '.join(self._args())})" + (
            f" on {list(self.on)}" if self.on is not None else "")

    def _args(self) -> list[str]:
        return []


def _fmt(e: ast.Expr) -> str:
    from convlens.dsl.formatter import format_expr

    return format_expr(e)


def _sizes(ctx: OpContext, sizes: tuple[ast.Expr, ...]) -> list[int]:
    values = [ctx.eval(s) for s in sizes]
    for expr, v in zip(sizes, values, strict=True):
        if v <= 0:
            raise ctx.fail(f"size {_fmt(expr)} is {v}; sizes must be positive")
    return values


def _check_dim(ctx: OpContext, op: Op, dim: int, rank: int, extra: int = 0) -> None:
    if not 0 <= dim < rank + extra:
        raise ctx.fail(f"{op.describe()}: dim {dim} is out of range for a {rank}-d tensor")


# --- lossy policies ------------------------------------------------------------------------
# Per-part scalars that a fused result can hold only once (weight_scale_2 of gate and up, an
# input_scale of every expert) must be equal; plans check that bit for bit. The user may instead
# pick policies: `max` reconciles activation scales to their maximum (as vLLM does), `rescale`
# takes the largest weight scale and moves the ratio into each part's block scales (NVFP4),
# `requantize` moves it into the FP8 weight itself. Both are exact when the scalars are equal and
# report their error when not.

POLICIES = ("max", "rescale", "requantize")


def formula_factors(formula: Any) -> dict[str, int]:
    """Roles that multiply (+1) or divide (-1) a pure product formula; {} otherwise."""
    found = _factors(formula)
    return found or {}


def _factors(formula: Any) -> dict[str, int] | None:
    if formula is None:
        return None
    kind = formula[0]
    if kind == "role":
        return {formula[1]: 1}
    if kind == "int":
        return {}
    if kind in ("*", "/"):
        left, right = _factors(formula[1]), _factors(formula[2])
        if left is None or right is None:
            return None
        sign = 1 if kind == "*" else -1
        return {**left, **{k: v * sign for k, v in right.items()}}
    return None  # sums and codec calls: no factor of the result is a lone role


def _broadcast_to(node: P.Node, rv: RoleValue, target: RoleValue, origin: int) -> P.Node:
    """A scalar-like role's node reshaped to broadcast over another role's layout."""
    names = rv.axes
    shape = tuple(target.node.shape[i] if a.name in names else 1
                  for i, a in enumerate(target.layout))
    return n_reshape(node, shape, origin)


def _reconcile(parts: list[StemValue], axis: str, ctx: OpContext, shared_only: bool = False
               ) -> list[StemValue]:
    """Apply the chosen lossy policies to roles that the parts must share along ``axis``."""
    if not ctx.policies or len(parts) < 2:
        return parts
    first = parts[0]
    factors = formula_factors(first.scheme.dequant)
    roles = [dict(p.roles) for p in parts]
    for name, rv in first.roles.items():
        if rv.find(axis) is not None or (shared_only and not rv.spec.shared):
            continue
        if rv.spec.kind != "tensor" or name == "bias":
            continue
        mode = "min" if rv.spec.reciprocal else "max"
        nodes = [p.roles[name].node for p in parts]
        if rv.spec.activation:
            if "max" in ctx.policies:
                common = P.Reduce(tuple(nodes), mode, name, nodes[0].shape, nodes[0].dtype,
                                  ctx.origin)
                for r in roles:
                    r[name] = r[name].with_node(common)
            continue
        sign = factors.get(name)
        if sign is None:
            continue
        target = _absorber(first, name, factors, ctx.policies)
        if target is None:
            continue
        common = P.Reduce(tuple(nodes), mode, name, nodes[0].shape, nodes[0].dtype, ctx.origin)
        for p, r in zip(parts, roles, strict=True):
            mine = p.roles[name]
            tv = p.roles[target]
            own = _broadcast_to(mine.node, mine, tv, ctx.origin)
            shared = _broadcast_to(common, mine, tv, ctx.origin)
            num, den = (own, shared) if sign > 0 else (shared, own)
            r[target] = tv.with_node(P.Rescale(tv.node, num, den, target, tv.node.shape,
                                               tv.node.dtype, ctx.origin))
            r[name] = mine.with_node(common)
    return [StemValue(p.scheme, p.axes, p.shape, r, p.keys) for p, r in zip(parts, roles,
                                                                             strict=True)]


def _absorber(value: StemValue, scalar: str, factors: dict[str, int], policies: frozenset[str]
              ) -> str | None:
    """The role that takes over a reconciled scalar's ratio: block scales for `rescale`, the
    FP8 weight itself for `requantize`."""
    if "rescale" in policies:
        for name, sign in factors.items():
            rv = value.roles.get(name)
            if (name != scalar and sign > 0 and rv is not None
                    and any(a.kind == "blocked" for a in rv.layout)
                    and rv.node.dtype in ("F8_E4M3", "BF16", "F16", "F32")):
                return name
    if "requantize" in policies:
        primary = value.roles.get(value.scheme.primary)
        if (primary is not None and primary.node.dtype == "F8_E4M3"
                and all(a.kind == "plain" for a in primary.layout)
                and factors.get(value.scheme.primary) == 1):
            return value.scheme.primary
    return None


@dataclass(frozen=True)
class Stack(Op):
    """Stack a family over an integer capture at ``dim``; expert ``e`` lands at index ``e``."""

    name: ClassVar[str] = "stack"
    capture: str
    dim: int

    def _args(self) -> list[str]:
        return [self.capture, str(self.dim)]

    def relation_of(self, rv: RoleValue, axis: str) -> Relation:
        # The new axis is plain for every role, except roles shared by all experts.
        return "broadcast" if rv.spec.shared else "plain"

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        for fam in families:
            if self.capture not in fam:
                raise ValueError(f"stack({self.capture}, ...): no part is a family over "
                                 f"{{{self.capture}}} at this point")
        return [tuple(c for c in fam if c != self.capture) for fam in families]

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        out = []
        for st in streams:
            ci = st.captures.index(self.capture)
            rest = st.captures[:ci] + st.captures[ci + 1:]
            groups: dict[tuple[int, ...], dict[int, StemValue]] = {}
            for idx, v in st.members.items():
                groups.setdefault(idx[:ci] + idx[ci + 1:], {})[idx[ci]] = v
            members: dict[tuple[int, ...], StemValue] = {}
            for rkey, by_index in groups.items():
                count = max(by_index) + 1
                missing = [i for i in range(count) if i not in by_index]
                if missing:
                    raise ctx.fail(
                        f"stack({self.capture}): {st.label!r} has {self.capture} = "
                        f"{_ranges(sorted(by_index))} but not {_ranges(missing)}; indices must be "
                        f"exactly 0..{count - 1}")
                parts = [by_index[i] for i in range(count)]
                members[rkey] = self._stack(parts, ctx)
            out.append(Stream(st.label, rest, members))
        # Parts stacked side by side (gate and up experts) must agree on the count.
        counts = {next(iter(s.members.values())).shape[self.dim] for s in out if s.members}
        if len(counts) > 1:
            detail = ", ".join(f"{s.label!r}: {next(iter(s.members.values())).shape[self.dim]}"
                               for s in out)
            raise ctx.fail(f"stack({self.capture}): parts have different counts ({detail})")
        return out

    def _stack(self, parts: list[StemValue], ctx: OpContext) -> StemValue:
        first = parts[0]
        _check_dim(ctx, self, self.dim, len(first.axes), extra=1)
        _roles_alike(ctx, parts, f"stack({self.capture})")
        for i, p in enumerate(parts):
            if p.shape != first.shape:
                raise ctx.fail(f"stack({self.capture}): {self.capture}={i} has shape "
                               f"{list(p.shape)} but {self.capture}=0 has {list(first.shape)}",
                               key=p.keys[0])
        parts = _reconcile(parts, self.capture, ctx, shared_only=True)
        axes = first.axes[: self.dim] + (self.capture,) + first.axes[self.dim:]
        shape = first.shape[: self.dim] + (len(parts),) + first.shape[self.dim:]
        roles = {role: _lift(self, parts, role, self.capture, ctx, logical=axes)[0]
                 for role in first.roles}
        return _rebuild(first, axes, shape, roles, tuple(k for p in parts for k in p.keys))


@dataclass(frozen=True)
class Unstack(Op):
    """Split ``dim`` into one tensor per index; the index becomes the capture's value."""

    name: ClassVar[str] = "unstack"
    capture: str
    dim: int

    def _args(self) -> list[str]:
        return [self.capture, str(self.dim)]

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        for fam in families:
            if self.capture in fam:
                raise ValueError(f"unstack({self.capture}, ...): {{{self.capture}}} is already "
                                 "a family capture")
        return [(*fam, self.capture) for fam in families]

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        out = []
        for st in streams:
            members: dict[tuple[int, ...], StemValue] = {}
            for idx, v in st.members.items():
                _check_dim(ctx, self, self.dim, len(v.axes))
                axis = v.axes[self.dim]
                count = v.shape[self.dim]
                axes = v.axes[: self.dim] + v.axes[self.dim + 1:]
                shape = v.shape[: self.dim] + v.shape[self.dim + 1:]
                per_role = {role: _lift(self, [v], role, axis, ctx, count=count)
                            for role in v.roles}
                names = tuple(per_role)
                # member i takes element i of every role's list (each has ``count``)
                columns = zip(*per_role.values(), strict=True) if names else [()] * count
                for i, column in enumerate(columns):
                    members[(*idx, i)] = new_stem_value(v.scheme, axes, shape,
                                                        dict(zip(names, column, strict=True)),
                                                        v.keys)
            out.append(Stream(st.label, (*st.captures, self.capture), members))
        return out


@dataclass(frozen=True)
class Concat(Op):
    """Concatenate all parts along ``dim``: equal parts, or parts of the given sizes."""

    name: ClassVar[str] = "concat"
    dim: int
    sizes: tuple[ast.Expr, ...] | None = None
    parts: int = 0  # filled by the compiler: how many streams arrive

    def _args(self) -> list[str]:
        args = [str(self.dim)]
        if self.sizes is not None:
            args.append("sizes=[" + ", ".join(_fmt(s) for s in self.sizes) + "]")
        return args

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        for fam in families:
            if fam:
                raise ValueError(f"concat: parts are still families over {{{', '.join(fam)}}}; "
                                 "stack them first")
        if self.sizes is not None and len(self.sizes) != len(families):
            raise ValueError(f"concat: {len(self.sizes)} sizes for {len(families)} parts")
        return [()]

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        parts = [s.single(ctx, "concat") for s in streams]
        first = parts[0]
        _check_dim(ctx, self, self.dim, len(first.axes))
        _roles_alike(ctx, parts, "concat")
        axis = first.axes[self.dim]
        for p in parts[1:]:
            other = [i for i in range(len(first.shape)) if i != self.dim]
            if [p.shape[i] for i in other] != [first.shape[i] for i in other]:
                raise ctx.fail(f"concat({self.dim}): parts differ outside dim {self.dim}: "
                               f"{list(first.shape)} vs {list(p.shape)}", key=p.keys[0])
        widths = [p.shape[self.dim] for p in parts]
        if self.sizes is None:
            if len(set(widths)) > 1:
                detail = ", ".join(f"{s.label}: {w}" for s, w in zip(streams, widths, strict=True))
                raise ctx.fail(
                    f"concat({self.dim}) of unequal parts ({detail}) without sizes: the inverse "
                    "could not tell where to split; give sizes=[...] from config")
        else:
            want = _sizes(ctx, self.sizes)
            if want != widths:
                raise ctx.fail(f"concat({self.dim}): parts have sizes {widths} along dim "
                               f"{self.dim}, the rule says {want}")
        shape = first.shape[: self.dim] + (sum(widths),) + first.shape[self.dim + 1:]
        parts = _reconcile(parts, axis, ctx)
        group = _group_size(first, axis)
        roles = {role: _lift(self, parts, role, axis, ctx, widths=widths, group=group)[0]
                 for role in first.roles}
        value = _rebuild(first, first.axes, shape, roles, tuple(k for p in parts for k in p.keys))
        return [Stream("+".join(s.label for s in streams), (), {(): value})]


@dataclass(frozen=True)
class Split(Op):
    """Split one tensor along ``dim`` into equal parts, or parts of the given sizes. Never
    uneven by accident: an equal split that does not divide is an error (not torch.chunk)."""

    name: ClassVar[str] = "split"
    dim: int
    sizes: tuple[ast.Expr, ...] | None = None
    parts: int = 0

    def _args(self) -> list[str]:
        args = [str(self.dim)]
        if self.sizes is not None:
            args.append("sizes=[" + ", ".join(_fmt(s) for s in self.sizes) + "]")
        else:
            args.append(f"parts={self.parts}")
        return args

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        if len(families) != 1:
            raise ValueError(f"split takes one tensor, but {len(families)} parts arrive")
        if families[0]:
            raise ValueError("split: the tensor is a family; unstack after splitting")
        return [()] * self.parts

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        v = streams[0].single(ctx, "split")
        _check_dim(ctx, self, self.dim, len(v.axes))
        total = v.shape[self.dim]
        if self.sizes is not None:
            widths = _sizes(ctx, self.sizes)
            if sum(widths) != total:
                raise ctx.fail(f"split({self.dim}): sizes {widths} add up to {sum(widths)} but "
                               f"dim {self.dim} has {total}", key=v.keys[0])
        else:
            if total % self.parts:
                raise ctx.fail(f"split({self.dim}) into {self.parts} equal parts: dim {self.dim} "
                               f"has {total}, not a multiple of {self.parts}", key=v.keys[0])
            widths = [total // self.parts] * self.parts
        axis = v.axes[self.dim]
        group = _group_size(v, axis)
        per_role = {role: _lift(self, [v], role, axis, ctx, widths=widths, group=group)
                    for role in v.roles}
        out = []
        for i, w in enumerate(widths):
            shape = v.shape[: self.dim] + (w,) + v.shape[self.dim + 1:]
            roles = {role: vals[i] for role, vals in per_role.items()}
            out.append(Stream(f"part {i}", (), {(): _rebuild(v, v.axes, shape, roles, v.keys)}))
        return out


@dataclass(frozen=True)
class Interleave(Op):
    """Merge k equal parts row by row along ``dim``: part0[0], part1[0], part0[1], ..."""

    name: ClassVar[str] = "interleave"
    dim: int
    parts: int = 0

    def _args(self) -> list[str]:
        return [str(self.dim)]

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        if any(families):
            raise ValueError("interleave: parts are still families; stack them first")
        return [()]

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        parts = [s.single(ctx, "interleave") for s in streams]
        first = parts[0]
        _check_dim(ctx, self, self.dim, len(first.axes))
        _roles_alike(ctx, parts, "interleave")
        for p in parts[1:]:
            if p.shape != first.shape:
                raise ctx.fail(f"interleave({self.dim}): parts must have equal shapes: "
                               f"{list(first.shape)} vs {list(p.shape)}", key=p.keys[0])
        axis = first.axes[self.dim]
        n = first.shape[self.dim]
        k = len(parts)
        shape = first.shape[: self.dim] + (n * k,) + first.shape[self.dim + 1:]
        perm = tuple((r % k) * n + r // k for r in range(n * k))
        parts = _reconcile(parts, axis, ctx)
        roles = {role: _lift(self, parts, role, axis, ctx, perm=perm)[0] for role in first.roles}
        value = _rebuild(first, first.axes, shape, roles, tuple(k for p in parts for k in p.keys))
        return [Stream("~".join(s.label for s in streams), (), {(): value})]


@dataclass(frozen=True)
class Deinterleave(Op):
    """Take every k-th row along ``dim`` into part j (rows j, j+k, j+2k, ...)."""

    name: ClassVar[str] = "deinterleave"
    dim: int
    parts: int = 0

    def _args(self) -> list[str]:
        return [str(self.dim), f"parts={self.parts}"]

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        if len(families) != 1 or families[0]:
            raise ValueError("deinterleave takes one tensor")
        return [()] * self.parts

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        v = streams[0].single(ctx, "deinterleave")
        _check_dim(ctx, self, self.dim, len(v.axes))
        total = v.shape[self.dim]
        k = self.parts
        if total % k:
            raise ctx.fail(f"deinterleave({self.dim}) into {k}: dim {self.dim} has "
                           f"{total}, not a multiple of {k}", key=v.keys[0])
        n = total // k
        axis = v.axes[self.dim]
        perm = tuple((r % n) * k + r // n for r in range(total))  # part-major rows
        per_role = {role: _lift(self, [v], role, axis, ctx, perm=perm) for role in v.roles}
        shape = v.shape[: self.dim] + (n,) + v.shape[self.dim + 1:]
        return [Stream(f"part {j}", (), {(): _rebuild(
            v, v.axes, shape, {r: vals[j] for r, vals in per_role.items()}, v.keys)})
            for j in range(k)]


class _PerTensor(Op):
    per_tensor: ClassVar[bool] = True

    def apply(self, streams: list[Stream], ctx: OpContext) -> list[Stream]:
        out = []
        for i, st in enumerate(streams):
            if self.on is not None and i not in self.on:
                out.append(st)
                continue
            members = {idx: self.one(v, ctx) for idx, v in st.members.items()}
            out.append(Stream(st.label, st.captures, members))
        return out

    def simulate(self, families: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        if self.on is not None:
            bad = [i for i in self.on if not 0 <= i < len(families)]
            if bad:
                raise ValueError(f"{self.name}: 'on' names part {bad[0]} but there are "
                                 f"{len(families)} parts here")
        return families

    def one(self, v: StemValue, ctx: OpContext) -> StemValue:
        raise NotImplementedError


@dataclass(frozen=True)
class Transpose(_PerTensor):
    """Swap two logical axes. Every role keeps its axes in the logical order, so packing and
    blocks stay with their axis (a packed ``[E, in/2, out]`` tensor is a legal byte transpose)."""

    name: ClassVar[str] = "transpose"
    dim0: int
    dim1: int

    def _args(self) -> list[str]:
        return [str(self.dim0), str(self.dim1)]

    def one(self, v: StemValue, ctx: OpContext) -> StemValue:
        _check_dim(ctx, self, self.dim0, len(v.axes))
        _check_dim(ctx, self, self.dim1, len(v.axes))
        order = list(range(len(v.axes)))
        order[self.dim0], order[self.dim1] = order[self.dim1], order[self.dim0]
        axes = tuple(v.axes[i] for i in order)
        shape = tuple(v.shape[i] for i in order)
        roles = {role: _lift(self, [v], role, v.axes[self.dim0], ctx, logical=axes)[0]
                 for role in v.roles}
        return _rebuild(v, axes, shape, roles, v.keys)


def rope_perm(n: int, heads: int, inverse: bool) -> tuple[int, ...]:
    """out[i] = in[perm[i]] for rope_permute on n rows (interleaved pairs -> rotate-half)."""
    per = n // heads
    half = per // 2
    perm = [0] * n
    for h in range(heads):
        for s in range(half):
            for t in range(2):
                interleaved = h * per + s * 2 + t
                rotate_half = h * per + t * half + s
                if inverse:
                    perm[interleaved] = rotate_half
                else:
                    perm[rotate_half] = interleaved
    return tuple(perm)


@dataclass(frozen=True)
class RopePermute(_PerTensor):
    """Per head, interleaved rotary pairs -> rotate-half order along ``dim`` (transformers'
    PermuteForRope): rows [x0, x1, x2, x3] of a head become [x0, x2, x1, x3]."""

    name: ClassVar[str] = "rope_permute"
    heads: ast.Expr
    dim: int = 0
    inverse: ClassVar[bool] = False

    def _args(self) -> list[str]:
        return [f"heads={_fmt(self.heads)}"] + ([f"dim={self.dim}"] if self.dim else [])

    def one(self, v: StemValue, ctx: OpContext) -> StemValue:
        _check_dim(ctx, self, self.dim, len(v.axes))
        heads = ctx.eval(self.heads)
        n = v.shape[self.dim]
        if heads <= 0 or n % (2 * heads):
            raise ctx.fail(f"{self.name}: dim {self.dim} has {n} rows, not a multiple of "
                           f"2 x {heads} heads", key=v.keys[0])
        axis = v.axes[self.dim]
        perm = rope_perm(n, heads, self.inverse)
        roles = {role: _lift(self, [v], role, axis, ctx, heads=heads, perm=perm)[0]
                 for role in v.roles}
        return _rebuild(v, v.axes, v.shape, roles, v.keys)


@dataclass(frozen=True)
class RopeUnpermute(RopePermute):
    """The inverse of rope_permute: rotate-half order -> interleaved pairs."""

    name: ClassVar[str] = "rope_unpermute"
    inverse: ClassVar[bool] = True


@dataclass(frozen=True)
class Flatten(_PerTensor):
    """Merge dims ``dim .. dim+len(sizes)-1`` (which must have these sizes) into one: a Conv3d
    kernel ``[out, C, kt, kh, kw]`` -> a Linear ``[out, C*kt*kh*kw]``. Dense roles only."""

    name: ClassVar[str] = "flatten"
    dim: int
    sizes: tuple[ast.Expr, ...]

    def _args(self) -> list[str]:
        return [str(self.dim), "sizes=[" + ", ".join(_fmt(s) for s in self.sizes) + "]"]

    def one(self, v: StemValue, ctx: OpContext) -> StemValue:
        sizes = _sizes(ctx, self.sizes)
        end = self.dim + len(sizes)
        if end > len(v.shape) or list(v.shape[self.dim:end]) != sizes:
            raise ctx.fail(f"flatten({self.dim}): dims {self.dim}..{end - 1} of "
                           f"{list(v.shape)} are not {sizes}", key=v.keys[0])
        merged = v.axes[self.dim:end]
        axes = v.axes[: self.dim] + (v.axes[self.dim],) + v.axes[end:]
        shape = v.shape[: self.dim] + (math.prod(sizes),) + v.shape[end:]
        roles = {role: _lift(self, [v], role, v.axes[self.dim], ctx, merged=merged,
                             logical_shape=shape, logical_axes=axes)[0] for role in v.roles}
        return _rebuild(v, axes, shape, roles, v.keys)


@dataclass(frozen=True)
class Unflatten(_PerTensor):
    """Split dim ``dim`` into dims of the given sizes (the inverse of flatten)."""

    name: ClassVar[str] = "unflatten"
    dim: int
    sizes: tuple[ast.Expr, ...]

    def _args(self) -> list[str]:
        return [str(self.dim), "sizes=[" + ", ".join(_fmt(s) for s in self.sizes) + "]"]

    def one(self, v: StemValue, ctx: OpContext) -> StemValue:
        _check_dim(ctx, self, self.dim, len(v.axes))
        sizes = _sizes(ctx, self.sizes)
        if v.shape[self.dim] != math.prod(sizes):
            raise ctx.fail(f"unflatten({self.dim}): dim {self.dim} has {v.shape[self.dim]}, "
                           f"not {' x '.join(map(str, sizes))}", key=v.keys[0])
        used = set(v.axes)
        fresh: list[str] = []
        i = 1
        while len(fresh) < len(sizes) - 1:
            if f"k{i}" not in used:
                fresh.append(f"k{i}")
            i += 1
        axes = v.axes[: self.dim] + (v.axes[self.dim], *fresh) + v.axes[self.dim + 1:]
        shape = v.shape[: self.dim] + tuple(sizes) + v.shape[self.dim + 1:]
        merged = axes[self.dim:self.dim + len(sizes)]
        roles = {role: _lift(self, [v], role, v.axes[self.dim], ctx, merged=merged,
                             logical_shape=shape, logical_axes=axes)[0] for role in v.roles}
        return _rebuild(v, axes, shape, roles, v.keys)


OPS: tuple[type[Op], ...] = (Stack, Unstack, Concat, Split, Interleave, Deinterleave, Transpose,
                             RopePermute, RopeUnpermute, Flatten, Unflatten)
OPS_BY_NAME: dict[str, type[Op]] = {cls.name: cls for cls in OPS}

# --- the inverse table: one entry per op --------------------------------------------------------

INVERSE: dict[type[Op], Callable[[Any], Op]] = {
    # families <-> stacked axis
    Stack: lambda op: Unstack(op.capture, op.dim, on=op.on, span=op.span),
    Unstack: lambda op: Stack(op.capture, op.dim, on=op.on, span=op.span),
    # parts <-> one tensor
    Concat: lambda op: Split(op.dim, op.sizes, op.parts, on=op.on, span=op.span),
    Split: lambda op: Concat(op.dim, op.sizes, op.parts, on=op.on, span=op.span),
    Interleave: lambda op: Deinterleave(op.dim, op.parts, on=op.on, span=op.span),
    Deinterleave: lambda op: Interleave(op.dim, op.parts, on=op.on, span=op.span),
    # permutations of one tensor
    Transpose: lambda op: Transpose(op.dim0, op.dim1, on=op.on, span=op.span),
    RopePermute: lambda op: RopeUnpermute(op.heads, op.dim, on=op.on, span=op.span),
    RopeUnpermute: lambda op: RopePermute(op.heads, op.dim, on=op.on, span=op.span),
    # reshapes
    Flatten: lambda op: Unflatten(op.dim, op.sizes, on=op.on, span=op.span),
    Unflatten: lambda op: Flatten(op.dim, op.sizes, on=op.on, span=op.span),
}


def invert(op: Op) -> Op:
    fn = INVERSE.get(type(op))
    if fn is None:  # pragma: no cover - the completeness test forbids this
        raise RuleError(f"op {op.name} has no inverse", span=op.span)
    return fn(op)


# --- the lifting table: (op, relation of the role to the op's axis) -> role values --------------

LiftFn = Callable[..., list[RoleValue]]


def _pos(rv: RoleValue, axis: str) -> tuple[int, AxisSpec]:
    hit = rv.find(axis)
    assert hit is not None
    return hit


def _unit(ax: AxisSpec) -> str:
    return "packs" if ax.kind == "packed" else "stores one value per block of"


def _aligned(ctx: OpContext, op: Op, rv: RoleValue, ax: AxisSpec, widths: list[int],
             what: str) -> None:
    """Every boundary between parts must fall on a whole packing unit or block; a last part
    may end inside one (a ceil-sized last block)."""
    at = 0
    for w in widths[:-1]:
        at += w
        if at % ax.factor:
            raise ctx.fail(
                f"{op.name}({what}) at {ax.name} = {at}: role {rv.spec.name} {_unit(ax)} "
                f"{ax.factor} {ax.name} values, and {at} is not a multiple of {ax.factor}",
                role=rv.spec.name, key=rv.key)


def _lift_stack(op: Stack, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                logical: tuple[str, ...]) -> list[RoleValue]:
    rv = parts[0]
    new = AxisSpec(axis)
    where = logical.index(axis)
    if rv.spec.follows_logical_order():
        pos = sum(1 for a in rv.layout if logical.index(a.name) < where)
    else:
        pos = sum(1 for a in rv.layout if a.name not in {x.name for x in rv.spec.axes}
                  and logical.index(a.name) < where)
    layout = rv.layout[:pos] + (new,) + rv.layout[pos:]
    return [rv.with_node(n_stack([p.node for p in parts], pos, ctx.origin), layout)]


def _lift_unstack(op: Unstack, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                  count: int) -> list[RoleValue]:
    rv = parts[0]
    pos, _ = _pos(rv, axis)
    layout = rv.layout[:pos] + rv.layout[pos + 1:]
    # n_select and with_node, with what they compute once for all ``count`` indices
    node, spec, view, key, origin = rv.node, rv.spec, rv.view, rv.key, ctx.origin
    s = node.shape
    shape, dtype = s[:pos] + s[pos + 1:], node.dtype
    new_select = P.new_select
    return [new_role_value(new_select(node, pos, i, shape, dtype, origin), layout, spec, view,
                           key) for i in range(count)]


def _duplicate(op: Op, parts: list[RoleValue], axis: str, ctx: OpContext, *,
               count: int | None = None, widths: list[int] | None = None,
               **_: Any) -> list[RoleValue]:
    n = count if count is not None else len(widths) if widths is not None else op_parts(op)
    return [parts[0]] * n


def op_parts(op: Op) -> int:
    return int(getattr(op, "parts", 1) or 1)


def _keep_one(op: Op, parts: list[RoleValue], axis: str, ctx: OpContext, **_: Any
              ) -> list[RoleValue]:
    # The role has no axis for the parts to differ along: they must be the same tensor, kept once.
    return [parts[0].with_node(n_same([p.node for p in parts], ctx.origin))]


def _refuse_index(op: Op, rv: RoleValue, axis: str, ctx: OpContext) -> None:
    if rv.spec.index:
        raise ctx.fail(f"{op.name} along {axis}: role {rv.spec.name} holds positions along {axis} "
                       "(an index such as GPTQ g_idx), which slicing or joining would invalidate",
                       role=rv.spec.name, key=rv.key)


def _group_size(value: StemValue, axis: str) -> int | None:
    """The block size along ``axis`` of the stem's blocked roles (GPTQ's group size), which an
    index role's values count in."""
    for rv in value.roles.values():
        hit = rv.find(axis)
        if hit is not None and hit[1].kind == "blocked":
            return hit[1].factor
    return None


def _index_parts(op: Op, rv: RoleValue, axis: str, ctx: OpContext, widths: list[int],
                 group: int | None) -> list[tuple[int, int, int]]:
    """(start, first group, end group) of each part of an index role's axis; refused unless
    every cut falls on a whole group, so that each part's groups are its own."""
    if group is None:
        _refuse_index(op, rv, axis, ctx)
        raise AssertionError  # pragma: no cover - _refuse_index raised
    out, start = [], 0
    for w in widths:
        if start % group:
            raise ctx.fail(f"{op.name} at {axis} = {start}: role {rv.spec.name} numbers groups "
                           f"of {group} {axis} values, and {start} is not a multiple of {group}",
                           role=rv.spec.name, key=rv.key)
        out.append((start, start // group, -(-(start + w) // group)))
        start += w
    return out


def _lift_concat(op: Concat, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                 widths: list[int], group: int | None = None) -> list[RoleValue]:
    pos, ax = _pos(parts[0], axis)
    if parts[0].spec.index:  # GPTQ g_idx: each part's group numbers move up by the groups before
        spans = _index_parts(op, parts[0], axis, ctx, widths, group)
        shifted: list[P.Node] = [
            P.Shift(p.node, first, 0, end - first, p.spec.name, p.node.shape, p.node.dtype,
                    ctx.origin) for p, (_, first, end) in zip(parts, spans, strict=True)]
        return [parts[0].with_node(n_cat(shifted, pos, ctx.origin))]
    if _one_block(ax, widths):
        # every part and the result fit in one block (FP8 2-D block scales of 64-row gate and
        # up): the fused block's one scale is the parts' scale, which must then be the same
        return _keep_one(op, parts, axis, ctx)
    if ax.kind != "plain":
        _aligned(ctx, op, parts[0], ax, widths, str(op.dim))
    return [parts[0].with_node(n_cat([p.node for p in parts], pos, ctx.origin))]


def _one_block(ax: AxisSpec, widths: list[int]) -> bool:
    return ax.kind == "blocked" and len(widths) > 1 and sum(widths) <= ax.factor


def _lift_split(op: Split, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                widths: list[int], group: int | None = None) -> list[RoleValue]:
    rv = parts[0]
    pos, ax = _pos(rv, axis)
    if rv.spec.index:  # GPTQ g_idx: each part keeps its slice, renumbered from its first group
        spans = _index_parts(op, rv, axis, ctx, widths, group)
        out_index = []
        for (start, first, end), w in zip(spans, widths, strict=True):
            piece = n_slice(rv.node, pos, start, start + w, 1, ctx.origin)
            out_index.append(rv.with_node(P.Shift(piece, -first, first, end, rv.spec.name,
                                                  piece.shape, piece.dtype, ctx.origin)))
        return out_index
    if _one_block(ax, widths):  # one block holds every part: each part keeps its scale
        return [rv] * len(widths)
    if ax.kind != "plain":
        _aligned(ctx, op, rv, ax, widths, str(op.dim))
    out, start = [], 0
    total = rv.node.shape[pos]
    for w in widths:
        lo = start // ax.factor if ax.kind != "plain" else start
        start += w
        hi = min(-(-start // ax.factor), total) if ax.kind != "plain" else start
        out.append(rv.with_node(n_slice(rv.node, pos, lo, hi, 1, ctx.origin)))
    return out


def _permute_rows(node: P.Node, pos: int, perm: tuple[int, ...], origin: int) -> P.Node:
    return n_take(node, pos, perm, origin)


def _lift_interleave(op: Interleave, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                     perm: tuple[int, ...]) -> list[RoleValue]:
    pos, _ = _pos(parts[0], axis)
    stacked = n_stack([p.node for p in parts], pos + 1, ctx.origin)
    s = parts[0].node.shape
    shape = s[:pos] + (s[pos] * len(parts),) + s[pos + 1:]
    return [parts[0].with_node(n_reshape(stacked, shape, ctx.origin))]


def _lift_deinterleave(op: Deinterleave, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                       perm: tuple[int, ...]) -> list[RoleValue]:
    rv = parts[0]
    pos, _ = _pos(rv, axis)
    n = rv.node.shape[pos]
    return [rv.with_node(n_slice(rv.node, pos, j, n, op.parts, ctx.origin))
            for j in range(op.parts)]


def _via_codes(plain: LiftFn) -> LiftFn:
    """Lift a row permutation on a packed axis: unpack to one code per element, permute,
    repack. Bit-exact: the codes are the stored bits."""

    def lift(op: Op, parts: list[RoleValue], axis: str, ctx: OpContext, **kw: Any
             ) -> list[RoleValue]:
        pos, ax = _pos(parts[0], axis)
        dtype = parts[0].node.dtype
        unpacked = [p.with_node(n_unpack(p.node, pos, ax, ctx.origin),
                                p.layout[:pos] + (AxisSpec(axis),) + p.layout[pos + 1:])
                    for p in parts]
        out = plain(op, unpacked, axis, ctx, **kw)
        return [o.with_node(n_pack(o.node, pos, ax, dtype, ctx.origin), parts[0].layout)
                for o in out]

    return lift


def block_permutation(perm: tuple[int, ...], block: int) -> tuple[int, ...] | None:
    """If ``perm`` (out row -> in row) moves whole blocks of ``block`` rows onto whole blocks,
    the block-level permutation; else None."""
    n = len(perm)
    if n % block:
        return None
    out = []
    for j in range(n // block):
        rows = perm[j * block:(j + 1) * block]
        k = rows[0] // block
        if {r // block for r in rows} != {k}:
            return None
        out.append(k)
    return tuple(out)


def _blocked_permutation(op: Op, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                         perm: tuple[int, ...], **_: Any) -> list[RoleValue]:
    """Row permutations on a blocked axis: only where whole blocks move to whole blocks (the
    scales then move with them); anything else would need requantizing."""
    rv = parts[0]
    pos, ax = _pos(rv, axis)
    blocks = block_permutation(perm, ax.factor)
    if blocks is None:
        raise ctx.fail(
            f"{op.describe()} moves rows across blocks of {ax.factor} along {axis}, and role "
            f"{rv.spec.name} stores one value per block: that would need requantizing",
            role=rv.spec.name, key=rv.key)
    joined = n_cat([p.node for p in parts], pos, ctx.origin)
    moved = n_take(joined, pos, blocks, ctx.origin)
    k = len(parts) if isinstance(op, Interleave) else 1
    n_out = op_parts(op) if isinstance(op, Deinterleave) else 1
    if k > 1 or n_out == 1:
        return [rv.with_node(moved)]
    size = moved.shape[pos] // n_out
    return [rv.with_node(n_slice(moved, pos, j * size, (j + 1) * size, 1, ctx.origin))
            for j in range(n_out)]


def _lift_reorder(op: Op, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                  logical: tuple[str, ...]) -> list[RoleValue]:
    rv = parts[0]
    layout = _reorder(rv, logical)
    dims = tuple(rv.layout.index(a) for a in layout)
    return [rv.with_node(n_permute(rv.node, dims, ctx.origin), layout)]


def _lift_rope(op: RopePermute, parts: list[RoleValue], axis: str, ctx: OpContext, *,
               heads: int, perm: tuple[int, ...]) -> list[RoleValue]:
    rv = parts[0]
    pos, _ = _pos(rv, axis)
    s = rv.node.shape
    half = s[pos] // heads // 2
    inner = (2, half) if op.inverse else (half, 2)
    view = n_reshape(rv.node, s[:pos] + (heads, *inner) + s[pos + 1:], ctx.origin)
    dims = list(range(len(view.shape)))
    dims[pos + 1], dims[pos + 2] = dims[pos + 2], dims[pos + 1]
    swapped = n_permute(view, tuple(dims), ctx.origin)
    return [rv.with_node(n_reshape(swapped, s, ctx.origin))]


def _unchanged(op: Op, parts: list[RoleValue], axis: str, ctx: OpContext, **_: Any
               ) -> list[RoleValue]:
    return [parts[0]]


def _lift_reshape(op: Flatten | Unflatten, parts: list[RoleValue], axis: str, ctx: OpContext, *,
                  merged: tuple[str, ...], logical_shape: P.Shape,
                  logical_axes: tuple[str, ...]) -> list[RoleValue]:
    rv = parts[0]
    carried = [a for a in merged if rv.find(a) is not None]
    if isinstance(op, Flatten) and len(carried) != len(merged):
        raise ctx.fail(f"{op.name}: role {rv.spec.name} carries only {carried} of {list(merged)}",
                       role=rv.spec.name, key=rv.key)
    new_axes = tuple(a for a in logical_axes
                     if rv.find(a) is not None or a in merged)
    lengths = dict(zip(logical_axes, logical_shape, strict=True))
    layout = tuple(AxisSpec(a) for a in new_axes)
    shape = tuple(lengths[a] for a in new_axes)
    return [rv.with_node(n_reshape(rv.node, shape, ctx.origin), layout)]


def _refuse_quantized_reshape(op: Op, parts: list[RoleValue], axis: str, ctx: OpContext,
                              **_: Any) -> list[RoleValue]:
    rv = parts[0]
    ax = _pos(rv, axis)[1]
    raise ctx.fail(f"{op.name} is for dense tensors; role {rv.spec.name} {_unit(ax)} "
                   f"{ax.factor} {axis} values", role=rv.spec.name, key=rv.key)


def _lift_reshape_broadcast(op: Flatten | Unflatten, parts: list[RoleValue], axis: str,
                            ctx: OpContext, *, merged: tuple[str, ...], **_: Any
                            ) -> list[RoleValue]:
    rv = parts[0]
    if any(rv.find(a) is not None for a in merged):
        raise ctx.fail(f"{op.name}: role {rv.spec.name} carries only some of the axes "
                       f"{list(merged)}", role=rv.spec.name, key=rv.key)
    return [rv]


LIFT: dict[tuple[type[Op], Relation], LiftFn] = {
    # stack: every role gains the axis (a scalar becomes an [E] vector); shared roles stay one
    (Stack, "plain"): _lift_stack,
    (Stack, "packed"): _lift_stack,
    (Stack, "blocked"): _lift_stack,
    (Stack, "broadcast"): _keep_one,
    (Unstack, "plain"): _lift_unstack,
    (Unstack, "packed"): _lift_unstack,
    (Unstack, "blocked"): _lift_unstack,
    (Unstack, "broadcast"): _duplicate,
    # concat/split: along the axis in whole packing units / blocks; else keep one / duplicate
    (Concat, "plain"): _lift_concat,
    (Concat, "packed"): _lift_concat,
    (Concat, "blocked"): _lift_concat,
    (Concat, "broadcast"): _keep_one,
    (Split, "plain"): _lift_split,
    (Split, "packed"): _lift_split,
    (Split, "blocked"): _lift_split,
    (Split, "broadcast"): _duplicate,
    # row permutations: packed axes go through codes; blocked axes move whole blocks or refuse
    (Interleave, "plain"): _lift_interleave,
    (Interleave, "packed"): _via_codes(_lift_interleave),
    (Interleave, "blocked"): _blocked_permutation,
    (Interleave, "broadcast"): _keep_one,
    (Deinterleave, "plain"): _lift_deinterleave,
    (Deinterleave, "packed"): _via_codes(_lift_deinterleave),
    (Deinterleave, "blocked"): _blocked_permutation,
    (Deinterleave, "broadcast"): _duplicate,
    (RopePermute, "plain"): _lift_rope,
    (RopePermute, "packed"): _via_codes(_lift_rope),
    (RopePermute, "blocked"): _blocked_permutation,
    (RopePermute, "broadcast"): _unchanged,
    (RopeUnpermute, "plain"): _lift_rope,
    (RopeUnpermute, "packed"): _via_codes(_lift_rope),
    (RopeUnpermute, "blocked"): _blocked_permutation,
    (RopeUnpermute, "broadcast"): _unchanged,
    # transpose: roles reorder their own axes; packing and blocks stay with their axis
    (Transpose, "plain"): _lift_reorder,
    (Transpose, "packed"): _lift_reorder,
    (Transpose, "blocked"): _lift_reorder,
    (Transpose, "broadcast"): _lift_reorder,
    # reshapes: dense roles only; a role without the merged axes is unchanged
    (Flatten, "plain"): _lift_reshape,
    (Flatten, "packed"): _refuse_quantized_reshape,
    (Flatten, "blocked"): _refuse_quantized_reshape,
    (Flatten, "broadcast"): _lift_reshape_broadcast,
    (Unflatten, "plain"): _lift_reshape,
    (Unflatten, "packed"): _refuse_quantized_reshape,
    (Unflatten, "blocked"): _refuse_quantized_reshape,
    (Unflatten, "broadcast"): _lift_reshape_broadcast,
}

assert set(RELATIONS) == {"plain", "packed", "blocked", "broadcast"}


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    start: int | None = None
    prev: int | None = None
    for v in [*values, None]:
        if start is not None and prev is not None and (v is None or v != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ", ".join(out)


__all__ = ["INVERSE", "LIFT", "OPS", "OPS_BY_NAME", "Op", "OpContext", "RoleValue", "StemValue",
           "Stream", "eval_expr", "invert"]
