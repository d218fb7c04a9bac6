"""Logical axes, role layouts and schemes.

A tensor rule is written against the *logical* tensor of a stem (its dequantized weight). Every
logical axis has a name: ``out`` and ``in`` for a linear weight, the capture name (``e``) for an
axis made by ``stack``, ``k1``, ``k2``... for the extra axes of a convolution kernel. Each role of a
stem's scheme carries some of those axes, in the logical order; a role that does not carry an
axis is *broadcast* along it (a bias along ``in``, a per-tensor scalar along everything).

The op table (:mod:`convlens.compiler.ops`) lifts each op to each role from the relation of the
role to the axis the op acts on. This module says which axes each role carries; quantized schemes
(packing, blocks) extend :class:`AxisKind`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from convlens.compiler.plan import FLOAT_DTYPES, Shape

# How a role relates to a logical axis. "broadcast" means the role has no physical axis for it.
Relation = Literal["plain", "broadcast"]
RELATIONS: tuple[Relation, ...] = ("plain", "broadcast")


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


@dataclass(frozen=True)
class RoleLayout:
    """Which logical axes a role carries. ``vector``: all but the contraction axes (a bias)."""

    name: str
    kind: Literal["full", "vector"]

    def axes_for(self, logical: tuple[str, ...]) -> tuple[str, ...]:
        if self.kind == "full":
            return logical
        return tuple(a for a in logical if not is_contraction_axis(a))

    def relation(self, axis: str, role_axes: tuple[str, ...]) -> Relation:
        return "plain" if axis in role_axes else "broadcast"


@dataclass(frozen=True)
class Scheme:
    """A storage format: its roles and their layouts. ``primary`` carries the logical tensor."""

    name: str
    primary: str
    roles: Mapping[str, RoleLayout]

    def logical_shape(self, primary_shape: Shape) -> Shape:
        return primary_shape


PLAIN = Scheme(
    name="plain",
    primary="weight",
    roles={"weight": RoleLayout("weight", "full"), "bias": RoleLayout("bias", "vector")},
)

SCHEMES: tuple[Scheme, ...] = (PLAIN,)


@dataclass(frozen=True)
class RoleMeta:
    shape: Shape
    dtype: str


def detect_scheme(roles: Mapping[str, RoleMeta], axes: tuple[str, ...]) -> Scheme | str:
    """The scheme whose roles fit the tensors of one stem, or a reason why none does."""
    names = set(roles)
    for scheme in SCHEMES:
        if scheme.primary not in names or not names <= set(scheme.roles):
            continue
        primary = roles[scheme.primary]
        if len(primary.shape) != len(axes):
            return (f"{scheme.primary} has {len(primary.shape)} dims but the endpoint declares "
                    f"axes ({', '.join(axes)})")
        logical = dict(zip(axes, scheme.logical_shape(primary.shape), strict=True))
        for role, meta in roles.items():
            want = tuple(logical[a] for a in scheme.roles[role].axes_for(axes))
            if meta.shape != want:
                return (f"{role} has shape {list(meta.shape)}, expected {list(want)} for "
                        f"{scheme.name}")
        return scheme
    known = sorted({r for s in SCHEMES for r in s.roles})
    quantized = sorted(names - set(known))
    if quantized:
        return (f"tensors with roles {quantized} fit no known scheme (known roles: "
                f"{', '.join(known)})")
    if "weight" not in names:
        return f"no weight among roles {sorted(names)}"
    return f"roles {sorted(names)} fit no known scheme"


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES
