"""Plans: the only contract between the compiler and the runtime.

A plan maps every output key to a small expression over input keys, built from a closed set of
immutable nodes. Every node knows its shape and dtype (so the key mapping, shapes and sizes of the
output are known from headers alone) and the rule that made it (``origin``, an index into
``Plan.rules``). Plans are plain data: :func:`plan_to_json` / :func:`plan_from_json` round-trip
them.

This module imports neither lark nor the AST.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[int, ...]

# safetensors dtype names and their sizes in bytes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True, slots=True)
class Load:
    """An input tensor, by key."""

    key: str
    shape: Shape
    dtype: str
    origin: int = -1


@dataclass(frozen=True, slots=True)
class Stack:
    """``torch.stack(args, dim)``."""

    args: tuple[Node, ...]
    dim: int
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Cat:
    """``torch.cat(args, dim)``."""

    args: tuple[Node, ...]
    dim: int
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Slice:
    """``arg[..., start:stop:step, ...]`` along ``dim`` (a view)."""

    arg: Node
    dim: int
    start: int
    stop: int
    step: int
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Select:
    """``arg.select(dim, index)`` (a view)."""

    arg: Node
    dim: int
    index: int
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Permute:
    """``arg.permute(dims)`` (a view)."""

    arg: Node
    dims: tuple[int, ...]
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Reshape:
    """``arg.reshape(shape)``."""

    arg: Node
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Same:
    """All args must be bit-identical; the value is the first. This is how a broadcast role (one
    bias for parts fused along ``in``, a restored duplicate) is kept exactly once."""

    args: tuple[Node, ...]
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Take:
    """``arg.index_select(dim, indices)``: a row permutation that no reshape expresses."""

    arg: Node
    dim: int
    indices: tuple[int, ...]
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Unpack:
    """Storage elements -> one integer code per logical element along ``dim``. Element j of a
    unit sits at bit ``positions[j]`` and is ``bits`` wide; the result is int32 codes."""

    arg: Node
    dim: int
    factor: int
    bits: int
    positions: tuple[int, ...]
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Pack:
    """The inverse of Unpack: codes -> storage elements of ``dtype``."""

    arg: Node
    dim: int
    factor: int
    bits: int
    positions: tuple[int, ...]
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Const:
    """A small constant (recomputed metadata such as compressed-tensors ``weight_shape``)."""

    values: tuple[int, ...]
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Verify:
    """The value of ``arg`` once every check (a Same node) holds: how inputs that are consumed
    but not copied (metadata recomputed from the logical shape) are still checked and counted."""

    arg: Node
    checks: tuple[Node, ...]
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Reduce:
    """Lossy reconcile of per-part scalars that should be equal: their elementwise max or min
    (the ``max`` policy, and the common scale of ``rescale`` / ``requantize``). ``role`` names
    what is reconciled, for the run report."""

    args: tuple[Node, ...]
    mode: str  # "max" | "min"
    role: str
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Rescale:
    """Lossy: ``arg * num / den`` computed in float64 and cast back to ``dtype``. With
    ``num == den`` it is exact; the runtime reports the relative error it introduces."""

    arg: Node
    num: Node
    den: Node
    role: str
    shape: Shape
    dtype: str
    origin: int


@dataclass(frozen=True, slots=True)
class Shift:
    """Index values moved by ``delta`` (``arg + delta``), after checking every value of ``arg``
    lies in ``[lo, hi)``: how GPTQ ``g_idx`` is sliced and renumbered when its axis is split or
    joined. A value outside (act-order groups that straddle the cut) is an error."""

    arg: Node
    delta: int
    lo: int
    hi: int
    role: str
    shape: Shape
    dtype: str
    origin: int


Node = (Load | Stack | Cat | Slice | Select | Permute | Reshape | Same | Take | Unpack | Pack
        | Const | Verify | Reduce | Rescale | Shift)
NODE_TYPES: dict[str, type[Any]] = {
    "load": Load, "stack": Stack, "cat": Cat, "slice": Slice, "select": Select,
    "permute": Permute, "reshape": Reshape, "same": Same, "take": Take, "unpack": Unpack,
    "pack": Pack, "const": Const, "verify": Verify, "reduce": Reduce, "rescale": Rescale,
    "shift": Shift,
}
LOSSY_NODES = (Reduce, Rescale)


# --- fast constructors for the hot node types ---------------------------------------------------
# A frozen dataclass's generated __init__ sets each field through object.__setattr__, about twice
# the cost of writing the slots directly; planning 300k keys builds a Load for every key and a
# Select for every unstacked expert. These build the very same objects (same class, same field
# values; equality, hashing, pickling and repr come from the class), for callers that pass every
# field, in field order.

_new = object.__new__


def _setters(cls: type[Any]) -> tuple[Any, ...]:
    return tuple(getattr(cls, name).__set__ for name in cls.__slots__)


_LOAD_SET = _setters(Load)
_SELECT_SET = _setters(Select)
_STACK_SET = _setters(Stack)
assert Load.__slots__ == ("key", "shape", "dtype", "origin")
assert Select.__slots__ == ("arg", "dim", "index", "shape", "dtype", "origin")
assert Stack.__slots__ == ("args", "dim", "shape", "dtype", "origin")


def new_load(key: str, shape: Shape, dtype: str, origin: int = -1) -> Load:
    """``Load(key, shape, dtype, origin)``."""
    node = _new(Load)
    k, s, d, o = _LOAD_SET
    k(node, key)
    s(node, shape)
    d(node, dtype)
    o(node, origin)
    return node


def new_select(arg: Node, dim: int, index: int, shape: Shape, dtype: str, origin: int
               ) -> Select:
    """``Select(arg, dim, index, shape, dtype, origin)``."""
    node = _new(Select)
    a, m, i, s, d, o = _SELECT_SET
    a(node, arg)
    m(node, dim)
    i(node, index)
    s(node, shape)
    d(node, dtype)
    o(node, origin)
    return node


def new_stack(args: tuple[Node, ...], dim: int, shape: Shape, dtype: str, origin: int) -> Stack:
    """``Stack(args, dim, shape, dtype, origin)``."""
    node = _new(Stack)
    a, m, s, d, o = _STACK_SET
    a(node, args)
    m(node, dim)
    s(node, shape)
    d(node, dtype)
    o(node, origin)
    return node
_NODE_NAMES = {cls: name for name, cls in NODE_TYPES.items()}


def children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, (Load, Const)):
        return ()
    if isinstance(node, (Stack, Cat, Same, Reduce)):
        return node.args
    if isinstance(node, Rescale):
        return (node.arg, node.num, node.den)
    if isinstance(node, Verify):
        return (node.arg, *node.checks)
    return (node.arg,)


def leaves(node: Node) -> Iterator[Load]:
    """The input tensors an expression reads, in order, with repeats."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Load):
            yield n
        else:
            stack.extend(reversed(children(n)))


def nbytes(shape: Shape, dtype: str) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


@dataclass(frozen=True)
class RuleRef:
    """Where a rule comes from, for messages and provenance: ``mixtral.conv:7 fuse``."""

    label: str
    path: str
    line: int
    text: str

    def __str__(self) -> str:
        return self.label


@dataclass
class Plan:
    """Every output key with the expression that builds it.

    ``outputs`` keeps insertion order: passed-through keys stay where they were, converted groups
    appear where their first input was.
    """

    conversion: str
    direction: str
    outputs: dict[str, Node]
    rules: list[RuleRef]
    rule_counts: dict[int, int] = field(default_factory=dict)  # rule index -> outputs it made
    passthrough: list[str] = field(default_factory=list)  # input keys that no rule touched

    _kinds: frozenset[type] | None = field(default=None, init=False, repr=False, compare=False)

    def kinds(self) -> frozenset[type]:
        """The node classes the plan holds (one walk, kept): lets a question about a few
        classes (lossy steps, torch-only nodes) skip a walk over every output when none of
        them occurs."""
        if self._kinds is None:
            seen: set[int] = set()
            found: set[type] = set()
            stack = list(self.outputs.values())
            while stack:
                n = stack.pop()
                if id(n) in seen:
                    continue
                seen.add(id(n))
                found.add(n.__class__)
                stack.extend(children(n))
            self._kinds = frozenset(found)
        return self._kinds

    def lossy(self) -> list[str]:
        """Where the plan may lose precision (a lossy policy was applied): one line each."""
        if not any(issubclass(k, LOSSY_NODES) for k in self.kinds()):
            return []
        seen: set[int] = set()
        out = []
        for key, node in self.outputs.items():
            stack = [node]
            while stack:
                n = stack.pop()
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if isinstance(n, LOSSY_NODES):
                    what = "reconcile" if isinstance(n, Reduce) else "rescale"
                    out.append(f"{key}: {what} {n.role} ({self.rules[n.origin].label})")
                stack.extend(children(n))
        return out

    def key_map(self) -> dict[str, list[str]]:
        """Output key -> the input keys it is built from (sorted, unique)."""
        return {k: sorted({leaf.key for leaf in leaves(n)}) for k, n in self.outputs.items()}

    def output_bytes(self) -> int:
        return sum(nbytes(n.shape, n.dtype) for n in self.outputs.values())

    def listing(self) -> str:
        """A deterministic text dump (golden tests store these)."""
        lines = [f"plan {self.conversion} {self.direction}: {len(self.outputs)} outputs"]
        for key, node in self.outputs.items():
            lines.append(f"{key} {node.dtype}{list(node.shape)} = {format_node(node, self.rules)}")
        return "\n".join(lines) + "\n"


def format_node(node: Node, rules: list[RuleRef] | None = None) -> str:
    if isinstance(node, Load):
        return repr(node.key)
    args = ", ".join(format_node(c, rules) for c in children(node))
    name = _NODE_NAMES[type(node)]
    extra = ""
    if isinstance(node, (Stack, Cat)):
        extra = f", dim={node.dim}"
    elif isinstance(node, Slice):
        step = f":{node.step}" if node.step != 1 else ""
        extra = f", dim={node.dim}, {node.start}:{node.stop}{step}"
    elif isinstance(node, Select):
        extra = f", dim={node.dim}, index={node.index}"
    elif isinstance(node, Permute):
        extra = f", dims={list(node.dims)}"
    elif isinstance(node, Reshape):
        extra = f", shape={list(node.shape)}"
    elif isinstance(node, Take):
        shown: list[object] = [*node.indices[:8], *(["..."] if len(node.indices) > 8 else [])]
        extra = f", dim={node.dim}, indices={shown}"
    elif isinstance(node, (Unpack, Pack)):
        extra = f", dim={node.dim}, factor={node.factor}, bits={node.bits}"
        if node.positions != tuple(i * node.bits for i in range(node.factor)):
            extra += f", positions={list(node.positions)}"
    elif isinstance(node, Const):
        return f"const({list(node.values)})"
    elif isinstance(node, Reduce):
        extra = f", mode={node.mode}"
    elif isinstance(node, Shift):
        extra = f", {node.delta:+d}, in [{node.lo}, {node.hi})"
    return f"{name}({args}{extra})"


# --- serialisation ----------------------------------------------------------------------------


def node_to_data(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = {"op": _NODE_NAMES[type(node)]}
    for name in node.__slots__:
        value = getattr(node, name)
        if name in ("args", "checks"):
            value = [node_to_data(a) for a in value]
        elif name in ("arg", "num", "den"):
            value = node_to_data(value)
        elif isinstance(value, tuple):
            value = list(value)
        data[name] = value
    return data


def node_from_data(data: dict[str, Any]) -> Node:
    cls = NODE_TYPES[data["op"]]
    kwargs: dict[str, Any] = {}
    for name in cls.__slots__:
        value = data[name]
        if name in ("args", "checks"):
            value = tuple(node_from_data(a) for a in value)
        elif name in ("arg", "num", "den"):
            value = node_from_data(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    node: Node = cls(**kwargs)
    return node


def plan_to_json(plan: Plan) -> str:
    return json.dumps({
        "conversion": plan.conversion,
        "direction": plan.direction,
        "rules": [r.__dict__ for r in plan.rules],
        "outputs": {k: node_to_data(n) for k, n in plan.outputs.items()},
        "rule_counts": {str(k): v for k, v in plan.rule_counts.items()},
        "passthrough": plan.passthrough,
    })


def plan_from_json(text: str) -> Plan:
    data = json.loads(text)
    return Plan(
        conversion=data["conversion"],
        direction=data["direction"],
        outputs={k: node_from_data(v) for k, v in data["outputs"].items()},
        rules=[RuleRef(**r) for r in data["rules"]],
        rule_counts={int(k): v for k, v in data["rule_counts"].items()},
        passthrough=list(data["passthrough"]),
    )
