"""The AST of a conversion file: frozen dataclasses named after their grammar rule.

Children live in tuples; every node has a ``span`` that is ignored by ``==`` so that
``parse(format(ast)) == ast`` compares meaning, not positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal as TLiteral

from convlens.errors import Span

NO_SPAN = Span("<none>", 0, 0)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)


# --- patterns ---------------------------------------------------------------------------------

CaptureKind = TLiteral["one", "many", "int"]


@dataclass(frozen=True)
class Literal:
    """Literal text inside one segment."""

    text: str


@dataclass(frozen=True)
class Capture:
    """``{name}`` (text inside one segment), ``{name*}`` (one or more whole segments),
    ``{name:int}`` (digits), ``{name:int<BOUND}`` (an integer below BOUND) or an expression
    capture ``{2*name+1}`` (kind ``int``: the segment holds ``expr``'s value for the capture)."""

    name: str
    kind: CaptureKind
    column: int = field(default=0, compare=False)  # offset inside the pattern string
    expr: Expr | None = None  # {2*i+1}: linear in the capture, positive whole coefficient
    bound: Expr | None = None  # {e:int<config.n}: a number or config expression


Piece = Literal | Capture
Segment = tuple[Piece, ...]


@dataclass(frozen=True)
class Pattern:
    """A quoted pattern: segments separated by dots."""

    text: str
    segments: tuple[Segment, ...]
    span: Span = _span()

    def captures(self) -> dict[str, Capture]:
        return {p.name: p for seg in self.segments for p in seg if isinstance(p, Capture)}


# --- expressions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int:
    value: int
    span: Span = _span()


@dataclass(frozen=True)
class Ref:
    """A dotted name: ``config.num_key_value_heads`` or a capture name like ``e``."""

    path: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: TLiteral["+", "-", "*", "//", "/"]
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Tuple:
    items: tuple[Expr, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """``e2m1(weight)`` in a dequant formula: decode a role with a codec."""

    func: str
    arg: Expr
    span: Span = _span()


Expr = Int | Ref | BinOp | Call
Value = Int | Ref | BinOp | Call | Tuple


# --- rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    name: str | None
    value: Value
    span: Span = _span()


@dataclass(frozen=True)
class Op:
    """One op of a tensor rule: ``concat(1)``, ``split(0, sizes=[...])``, ``... on [0, 1]``."""

    name: str
    args: tuple[Arg, ...]
    on: tuple[int, ...] | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Guard:
    """``where c in ("a", "b*")`` (negate False) or ``unless c in (...)`` (negate True)."""

    capture: str
    negate: bool
    values: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Endpoint:
    """One side of a rule: patterns, how they name a stem's tensors, and its logical axes."""

    patterns: tuple[Pattern, ...]
    naming: str | None = None
    axes: tuple[str, ...] | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Rename:
    src: Endpoint
    dst: Endpoint
    guards: tuple[Guard, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Fuse:
    src: Endpoint
    dst: Endpoint
    ops: tuple[Op, ...]
    guards: tuple[Guard, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Split:
    src: Endpoint
    dst: Endpoint
    ops: tuple[Op, ...]
    guards: tuple[Guard, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Map:
    src: Endpoint
    dst: Endpoint
    ops: tuple[Op, ...]
    guards: tuple[Guard, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Drop:
    """``drop "lm_head" restore from "model.embed_tokens"``: forward removes a tensor that is a
    bit-exact copy of another; the inverse restores it by duplication."""

    target: Endpoint
    source: Endpoint
    guards: tuple[Guard, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Include:
    """``include qwen2_moe``: the rules of another shipped conversion, inlined here."""

    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Expect:
    """``expect "hub key" -> "memory key"``: a test that ``convlens check`` runs both ways.
    ``with config.n = 4, ...`` gives the config values that patterns read (``{e+config.n}``)."""

    src: str
    dst: str
    span: Span = _span()
    given: tuple[tuple[tuple[str, ...], int], ...] = ()  # ((("config", "n"), 4), ...)


TensorRule = Fuse | Split | Map
Statement = Rename | Fuse | Split | Map | Drop | Include | Expect


@dataclass(frozen=True)
class Target:
    kind: TLiteral["model_type", "architecture"]
    names: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Conversion:
    """A whole file."""

    name: str
    targets: tuple[Target, ...]
    statements: tuple[Statement, ...]
    path: str = field(default="<string>", compare=False)
    span: Span = _span()

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(n for t in self.targets if t.kind == "model_type" for n in t.names)

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(n for t in self.targets if t.kind == "architecture" for n in t.names)


# --- scheme files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisDecl:
    """One physical axis of a role: the logical axis it carries and how (plain, packed P per
    storage element with a codec and an element order, or one value per block of B)."""

    name: str
    kind: TLiteral["plain", "packed", "blocked"] = "plain"
    factor: int | str = 1  # a number, or a param of the scheme (`in / group_size block`)
    codec: str | None = None
    order: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class DimDecl:
    """One stored dim in ``as [...]``: a literal size, or a logical axis size divided (ceil)."""

    axis: str | None
    divisor: int = 1
    literal: int | None = None


@dataclass(frozen=True)
class RoleDecl:
    """``role NAME DTYPE [axes] as [...] | [...] flags``. ``axes`` is None for ``shape``
    metadata roles (compressed-tensors ``weight_shape``), which are recomputed, not moved."""

    name: str
    dtype: str
    axes: tuple[AxisDecl, ...] | None
    views: tuple[tuple[DimDecl, ...], ...] = ()
    flags: tuple[str, ...] = ()
    span: Span = _span()
    part_of: tuple[str, ...] = ()  # stem names that may carry it (companion roles)


@dataclass(frozen=True)
class Detect:
    """``for quant_algo NVFP4, NVFP4_AWQ``: config values that point at this scheme."""

    key: str
    values: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Param:
    """``param group_size 128``: a block size the checkpoint's config may set."""

    name: str
    default: int
    span: Span = _span()


@dataclass(frozen=True)
class Scheme:
    name: str
    detects: tuple[Detect, ...]
    roles: tuple[RoleDecl, ...]
    dequant: Expr | None
    params: tuple[Param, ...] = ()
    path: str = field(default="<string>", compare=False)
    span: Span = _span()
    companion: bool = False  # ``companion NAME``: roles that sit next to any scheme's
