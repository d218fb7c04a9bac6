"""Generate small consistent inputs for every rule of a program (for ``convlens check``).

For each tensor rule, the shapes of its parts are solved from its ops in the *fusing* direction
(for a split rule, its inverse): a little union-find over dimension symbols, where concat and
stack make dims equal, sized concats and flattens bind them to config values, and equal splits,
deinterleaves and rope permutes require multiples. Config fields used by size expressions get
small even values. Each sample comes with a *prelude*: the inverse rules that carry it from the
rule's own input back to the program's input layout.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from convlens.compiler import ops as O
from convlens.compiler.layout import (
    PLAIN,
    RoleSpec,
    Scheme,
    canonical_from_view,
    default_axes,
    view_shape,
)
from convlens.compiler.naming import key_for
from convlens.compiler.patterns import CompiledPattern
from convlens.compiler.planner import TensorMeta
from convlens.compiler.program import Program, Rule
from convlens.dsl import ast


class SampleError(Exception):
    """The generator could not find consistent shapes for a rule."""


@dataclass
class Sample:
    """Tensors to make (key -> meta and a fill id: equal ids mean equal contents) and the rules
    that bring them to the program's input layout."""

    rule: Rule
    metas: dict[str, TensorMeta]
    fills: dict[str, int]
    prelude: list[Rule]
    consts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # metadata contents


@dataclass
class _Sym:
    parent: int
    value: int | None = None
    mult: int = 1


@dataclass
class _Solver:
    rng: random.Random
    syms: list[_Sym] = field(default_factory=list)

    def new(self, value: int | None = None) -> int:
        self.syms.append(_Sym(len(self.syms), value))
        return len(self.syms) - 1

    def find(self, i: int) -> int:
        while self.syms[i].parent != i:
            self.syms[i].parent = self.syms[self.syms[i].parent].parent
            i = self.syms[i].parent
        return i

    def bind(self, i: int, value: int) -> None:
        r = self.syms[self.find(i)]
        if r.value is not None and r.value != value:
            raise SampleError(f"a dim must be both {r.value} and {value}")
        r.value = value

    def require_multiple(self, i: int, m: int) -> None:
        r = self.syms[self.find(i)]
        r.mult = math.lcm(r.mult, m)

    def unify(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.syms[ra], self.syms[rb]
        if sa.value is not None and sb.value is not None and sa.value != sb.value:
            raise SampleError(f"a dim must be both {sa.value} and {sb.value}")
        sb.parent = ra
        sa.value = sa.value if sa.value is not None else sb.value
        sa.mult = math.lcm(sa.mult, sb.mult)

    def value(self, i: int) -> int:
        r = self.syms[self.find(i)]
        if r.value is None:
            r.value = r.mult * self.rng.randint(1, 3) if r.mult > 1 else self.rng.randint(1, 5)
        if r.value % r.mult:
            raise SampleError(f"a dim bound to {r.value} must be a multiple of {r.mult}")
        return r.value


def config_refs(program: Program) -> set[tuple[str, ...]]:
    refs: set[tuple[str, ...]] = set()

    def walk(e: Any) -> None:
        if isinstance(e, ast.Ref):
            refs.add(e.path[1:])
        elif isinstance(e, ast.BinOp):
            walk(e.left)
            walk(e.right)

    for rule in program.rules:
        for op in rule.ops:
            for name in ("sizes", "heads"):
                value = getattr(op, name, None)
                for e in value if isinstance(value, tuple) else (value,):
                    walk(e)
        refs.update(path[1:] for path in rule.config_refs)  # {e+config.n}, {e:int<config.n}
    return refs


def sample_config(program: Program, rng: random.Random) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for path in sorted(config_refs(program)):
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = rng.choice((2, 4))
    return config


def _token(rng: random.Random) -> str:
    return "t" + "".join(rng.choice("0123456789") for _ in range(2))


def _int_range(rule: Rule, name: str) -> tuple[int, int | None]:
    """The range ``lo <= value < hi`` of an integer capture of a resolved rule (every pattern of
    a rule gives a capture the same range; 0 and no bound without arithmetic)."""
    for p in rule.src.patterns + rule.dst.patterns:
        if p.forms is not None and name in p.forms:
            f = p.forms[name]
            return f.lo, f.hi
    return 0, None


def _counts(rule: Rule, rng: random.Random) -> dict[str, int]:
    """How many members each stacked (or unstacked) capture gets: 1 to 3, within its range,
    whose low end must be 0 (stack places index e at e, from 0)."""
    out = {}
    for c in rule.stacked + rule.unstacked:
        lo, hi = _int_range(rule, c)
        if lo > 0 or hi == 0:
            raise SampleError(f"{rule.ref.label}: {{{c}}} ranges over {lo} <= {c}"
                              + (f" < {hi}" if hi is not None else "")
                              + ", so it cannot index experts 0..E-1")
        out[c] = rng.randint(1, 3 if hi is None else min(3, hi))
    return out


def _capture_values(rule: Rule, rng: random.Random, ints: dict[str, int]) -> dict[str, str]:
    caps: dict[str, ast.Capture] = {}
    for p in rule.src.patterns + rule.dst.patterns:
        caps.update(p.captures)
    guards = {g.capture: g for g in rule.guards}
    out: dict[str, str] = {}
    for name, cap in caps.items():
        if name in ints:
            out[name] = str(ints[name])
            continue
        lo, hi = _int_range(rule, name) if cap.kind == "int" else (0, None)
        if hi is not None and hi <= lo:
            raise SampleError(f"{rule.ref.label}: no value of {{{name}}} lies in {lo} <= {name} "
                              f"< {hi}")
        for _ in range(50):
            if cap.kind == "int":
                value = str(rng.randint(lo, lo + 12 if hi is None else min(lo + 12, hi - 1)))
            elif cap.kind == "many":
                value = ".".join(_token(rng) for _ in range(rng.randint(1, 2)))
            else:
                value = _token(rng)
            g = guards.get(name)
            if g is not None and not g.negate:
                value = rng.choice(g.values).replace("*", _token(rng))
            if g is None or g.allows({name: value}):
                break
        else:
            raise SampleError(f"no value of {{{name}}} passes its guard")
        out[name] = value
    return out


def _stem(p: CompiledPattern, caps: dict[str, str]) -> str:
    return p.format(caps)


def _solve_parts(rule: Rule, solver: _Solver, config: dict[str, Any], counts: dict[str, int],
                 rank: int, quanta: dict[str, int]) -> tuple[list[list[int]], set[str]]:
    """Symbols for the per-member shape of each source stream of a fusing-direction rule, and
    the axes along which parts are combined (roles without them must be equal in the parts)."""
    ctx = O.OpContext(-1, rule.ref.label, rule.span, config, "sample")
    starts = [[solver.new() for _ in range(rank)] for _ in rule.src.patterns]
    streams = [list(s) for s in starts]
    axes = list(rule.src.axes or default_axes(rank))
    for s in starts:
        for sym, name in zip(s, axes, strict=True):
            if quanta.get(name, 1) > 1:
                solver.require_multiple(sym, quanta[name])
    combined: set[str] = set()

    def check(d: int, s: list[int]) -> None:
        if not 0 <= d < len(s):
            raise SampleError(f"dim {d} out of range for rank {len(s)}")

    for op in rule.ops:
        sel = range(len(streams)) if op.on is None else op.on
        if isinstance(op, O.Stack):
            for s in streams:
                check(op.dim, s + [0])
                s.insert(op.dim, solver.new(counts[op.capture]))
            axes.insert(op.dim, op.capture)
        elif isinstance(op, O.Unstack):
            for s in streams:
                check(op.dim, s)
                solver.bind(s.pop(op.dim), counts[op.capture])
            axes.pop(op.dim)
        elif isinstance(op, (O.Concat, O.Interleave)):
            first = streams[0]
            check(op.dim, first)
            combined.add(axes[op.dim])
            for s in streams[1:]:
                if len(s) != len(first):
                    raise SampleError("parts of different ranks")
                for d in range(len(first)):
                    if d != op.dim or isinstance(op, O.Interleave) or op.sizes is None:
                        solver.unify(first[d], s[d])
            if isinstance(op, O.Concat) and op.sizes is not None:
                for s, e in zip(streams, op.sizes, strict=True):
                    solver.bind(s[op.dim], ctx.eval(e))
            merged = list(first)
            merged[op.dim] = solver.new()
            streams = [merged]
        elif isinstance(op, (O.Split, O.Deinterleave)):
            s = streams[0]
            check(op.dim, s)
            if isinstance(op, O.Split) and op.sizes is not None:
                solver.bind(s[op.dim], sum(ctx.eval(e) for e in op.sizes))
            else:  # equal parts, each aligned to the scheme's packing and blocks
                solver.require_multiple(s[op.dim], op.parts * quanta.get(axes[op.dim], 1))
            streams = [[*s[: op.dim], solver.new(), *s[op.dim + 1:]] for _ in range(op.parts)]
        elif isinstance(op, O.Transpose):
            for i in sel:
                s = streams[i]
                check(op.dim0, s)
                check(op.dim1, s)
                s[op.dim0], s[op.dim1] = s[op.dim1], s[op.dim0]
            axes[op.dim0], axes[op.dim1] = axes[op.dim1], axes[op.dim0]
        elif isinstance(op, O.RopePermute):
            for i in sel:
                check(op.dim, streams[i])
                solver.require_multiple(streams[i][op.dim], 2 * ctx.eval(op.heads))
        elif isinstance(op, O.Flatten):
            sizes = [ctx.eval(e) for e in op.sizes]
            for i in sel:
                s = streams[i]
                check(op.dim + len(sizes) - 1, s)
                for d, v in zip(range(op.dim, op.dim + len(sizes)), sizes, strict=True):
                    solver.bind(s[d], v)
                streams[i] = [*s[: op.dim], solver.new(), *s[op.dim + len(sizes):]]
            del axes[op.dim + 1: op.dim + len(sizes)]
        elif isinstance(op, O.Unflatten):
            sizes = [ctx.eval(e) for e in op.sizes]
            for i in sel:
                s = streams[i]
                check(op.dim, s)
                solver.bind(s[op.dim], math.prod(sizes))
                streams[i] = [*s[: op.dim], *(solver.new(v) for v in sizes), *s[op.dim + 1:]]
            axes[op.dim + 1: op.dim + 1] = [f"k{i}" for i in range(90, 89 + len(sizes))]
        else:  # pragma: no cover - every op is handled above
            raise SampleError(f"no sampler for {op.name}")
    return starts, combined


def _fusing(rule: Rule) -> tuple[Rule, bool]:
    """The orientation whose source side holds the many parts, and whether it is inverted."""
    return (rule.inverse(), True) if rule.kind == "split" else (rule, False)


def sample_rule(program: Program, index: int, rng: random.Random, config: dict[str, Any],
                fill: Iterator[int], scheme: Scheme = PLAIN) -> Sample:
    rule = program.rules[index].resolve(_values(program.rules[index], config))
    prelude = [r.inverse() for r in reversed(program.rules[:index])]
    metas: dict[str, TensorMeta] = {}
    fills: dict[str, int] = {}
    caps = _capture_values(rule, rng, {})
    if rule.kind in ("rename", "drop", "restore"):
        stem = _stem(rule.src.patterns[0], caps)
        key = key_for(stem, "weight", rule.src.naming)
        metas[key] = TensorMeta((2, 3), "F32")
        fills[key] = next(fill)
        if rule.kind == "drop":
            kept = key_for(_stem(rule.dst.patterns[0], caps), "weight", rule.dst.naming)
            metas[kept] = metas[key]
            fills[kept] = fills[key]
        return Sample(rule, metas, fills, prelude)
    gen, inverted = _fusing(rule)
    if inverted:
        prelude = [rule.inverse(), *prelude]
    counts = _counts(gen, rng)
    quanta = _quanta(scheme)
    last: SampleError | None = None
    ranks = [len(gen.src.axes)] if gen.src.axes else [2, 3] if scheme.quantized else [2, 3, 5]
    for rank in ranks:
        solver = _Solver(rng)
        try:
            starts, combined = _solve_parts(gen, solver, config, counts, rank, quanta)
            shapes = [tuple(solver.value(s) for s in syms) for syms in starts]
        except SampleError as exc:
            last = exc
            continue
        break
    else:
        raise SampleError(f"{rule.ref.label}: {last}")
    axes = gen.src.axes or default_axes(rank)
    present = [name for name, spec in scheme.roles.items()
               if not spec.optional or rng.random() < 0.5]
    # Views that hold any size (not a 0-d form of a blocked scale, which only fits one block
    # and so cannot come back unchanged from a fusion into several blocks).
    views = {name: rng.choice((None, *(i for i, v in enumerate(spec.views)
                                        if any(d.axis for d in v) or not spec.axes)))
             for name, spec in scheme.roles.items()}
    common: dict[tuple[Any, ...], int] = {}
    consts: dict[str, tuple[int, ...]] = {}
    for group in range(rng.randint(1, 2)):
        gcaps = caps if group == 0 else _capture_values(rule, rng, {})
        for j, pattern in enumerate(gen.src.patterns):
            sizes = dict(zip(axes, shapes[j], strict=True))
            for idx in _indices([counts[c] for c in gen.stacked]):
                c = dict(gcaps)
                c.update({name: str(i) for name, i in zip(gen.stacked, idx, strict=True)})
                stem = _stem(pattern, c)
                for name in present:
                    spec = scheme.roles[name]
                    key = key_for(stem, name, gen.src.naming)
                    metas[key] = _role_meta(spec, axes, sizes, views[name])
                    fills[key] = next(fill)
                    # roles the parts can only hold once must be equal where parts meet
                    if spec.kind == "shape":
                        consts[key] = tuple(sizes[a] for a in axes)
                        continue
                    if spec.index:  # the plain group of each element: i // block
                        axis = spec.axes[0].name
                        block = quanta.get(axis, 1)
                        per = tuple(i // block for i in range(sizes[axis]))
                        consts[key] = per * (math.prod(metas[key].shape) // len(per))
                        continue
                    carried = {a.name for a in spec.layout(axes, not spec.shared)}
                    if spec.shared:
                        fills[key] = common.setdefault((group, name), fills[key])
                    elif combined - carried:
                        fills[key] = common.setdefault((group, name, idx), fills[key])
    return Sample(rule, metas, fills, prelude, consts)


def _values(rule: Rule, config: dict[str, Any]) -> dict[tuple[str, ...], int]:
    """The config's values of the fields a rule's patterns read (sample_config made them)."""
    out = {}
    for path in rule.config_refs:
        node: Any = config
        for part in path[1:]:
            node = node[part]
        out[path] = node
    return out


def _value(text: str) -> str | int | bool:
    if text in ("True", "False"):
        return text == "True"
    return int(text) if text.isdigit() else text


def _quanta(scheme: Scheme) -> dict[str, int]:
    """Per logical axis, the multiple every size must be for this scheme's packing and blocks."""
    out: dict[str, int] = {}
    for spec in scheme.roles.values():
        for a in spec.axes:
            if a.kind != "plain":
                out[a.name] = math.lcm(out.get(a.name, 1), a.factor)
    return out


def _role_meta(spec: RoleSpec, axes: tuple[str, ...], sizes: dict[str, int],
               view: int | None) -> TensorMeta:
    if spec.kind == "shape":
        return TensorMeta((len(axes),), spec.dtype or "I64")
    layout = spec.layout(axes, not spec.shared)
    shape = tuple(a.physical(sizes[a.name]) for a in layout)
    if view is not None:
        own = {a.name for a in spec.axes}
        lead = 0
        while lead < len(layout) and layout[lead].name not in own:
            lead += 1
        stored = shape[:lead] + view_shape(spec.views[view], sizes)
        if canonical_from_view(spec.views[view], stored, lead, len(layout) - lead) == shape:
            shape = stored
    return TensorMeta(shape, "F32" if spec.dtype in (None, "float") else spec.dtype)


def _indices(counts: list[int]) -> Iterator[tuple[int, ...]]:
    if not counts:
        yield ()
        return
    for i in range(counts[0]):
        for rest in _indices(counts[1:]):
            yield (i, *rest)


def sample_program(program: Program, seed: int, scheme: Scheme = PLAIN
                   ) -> tuple[list[Sample], dict[str, Any]]:
    """Samples for every rule of ``program``; tensor rules get stems stored in ``scheme``."""
    rng = random.Random(seed)
    config = sample_config(program, rng)
    if scheme.detects:  # as a real checkpoint's config would say, so detection is not guessing
        config["quantization_config"] = {k: _value(sorted(v)[0]) for k, v in scheme.detects.items()}
    counter = iter(range(1, 1 << 30))
    samples = [sample_rule(program, i, rng, config, counter, scheme)
               for i in range(len(program.rules))]
    return samples, config
