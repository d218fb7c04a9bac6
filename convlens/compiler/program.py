"""AST -> a checked program of rules, and its derived inverse.

:func:`compile_conversion` runs every static check of a file and reports all errors together
(:class:`ErrorGroup`); a :class:`Program` that comes out is consistent: captures agree on both
sides, ops exist with valid arguments, stream counts line up with the patterns, and every op has
its inverse. ``Program.inverse()`` is the reversed list of inverted rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from convlens.compiler import ops as O
from convlens.compiler.naming import NAMINGS, NamingKind
from convlens.compiler.patterns import (
    CompiledPattern,
    ConfigPath,
    bind_domains,
    check_pattern,
    compile_guard_values,
    stems_overlap,
)
from convlens.compiler.plan import RuleRef
from convlens.dsl import ast
from convlens.dsl.formatter import format_statement
from convlens.errors import (
    ConversionError,
    ConvlensError,
    ErrorGroup,
    RuleError,
    Span,
    did_you_mean,
)

RuleKind = Literal["rename", "fuse", "split", "map", "drop", "restore"]
_INVERSE_KIND: dict[RuleKind, RuleKind] = {
    "rename": "rename", "fuse": "split", "split": "fuse", "map": "map",
    "drop": "restore", "restore": "drop",
}


@dataclass(frozen=True)
class Endpoint:
    patterns: tuple[CompiledPattern, ...]
    naming: NamingKind
    axes: tuple[str, ...] | None
    span: Span


@dataclass(frozen=True)
class Guard:
    capture: str
    negate: bool
    values: tuple[str, ...]
    regex: object = field(compare=False)

    def allows(self, captures: dict[str, str]) -> bool:
        hit = self.regex.match(captures[self.capture]) is not None  # type: ignore[attr-defined]
        return not hit if self.negate else hit

    def describe(self) -> str:
        word = "unless" if self.negate else "where"
        return f"{word} {self.capture} in ({', '.join(repr(v) for v in self.values)})"


@dataclass(frozen=True)
class Rule:
    """One checked rule. ``stacked``: captures only on the source side (consumed by stack);
    ``unstacked``: captures only on the destination side (made by unstack)."""

    kind: RuleKind
    src: Endpoint
    dst: Endpoint
    ops: tuple[O.Op, ...]
    guards: tuple[Guard, ...]
    span: Span
    text: str
    stacked: tuple[str, ...] = ()
    unstacked: tuple[str, ...] = ()
    derived: bool = False  # made by inverse()

    @property
    def ref(self) -> RuleRef:
        word = self.kind + (" (derived inverse)" if self.derived else "")
        return RuleRef(label=f"{self.span.path}:{self.span.line} {word}", path=self.span.path,
                       line=self.span.line, text=self.text)

    def inverse(self) -> Rule:
        return Rule(
            kind=_INVERSE_KIND[self.kind], src=self.dst, dst=self.src,
            ops=tuple(O.invert(op) for op in reversed(self.ops)), guards=self.guards,
            span=self.span, text=self.text, stacked=self.unstacked, unstacked=self.stacked,
            derived=not self.derived,
        )

    @property
    def config_refs(self) -> tuple[ConfigPath, ...]:
        """The config fields its patterns' offsets and bounds read (``{e+config.n}``)."""
        refs = {r for p in self.src.patterns + self.dst.patterns for r in p.config_refs}
        return tuple(sorted(refs))

    def resolve(self, values: Mapping[ConfigPath, int]) -> Rule:
        """The rule with its patterns resolved against the config's ``values``."""
        if not self.config_refs:
            return self

        def side(e: Endpoint) -> Endpoint:
            return replace(e, patterns=tuple(p.resolve(values) for p in e.patterns))

        return replace(self, src=side(self.src), dst=side(self.dst))

    def describe(self) -> str:
        """The rule as text in its own direction (used by explain for derived inverses)."""
        def ep(e: Endpoint) -> str:
            pats = ", ".join(f'"{p.text}"' for p in e.patterns)
            extra = f" naming {e.naming}" if e.naming != "module" else ""
            if e.axes:
                extra += f" axes ({', '.join(e.axes)})"
            return pats + extra

        keyword = {"restore": "restore", "drop": "drop"}.get(self.kind, self.kind)
        text = f"{keyword} {ep(self.src)} -> {ep(self.dst)}"
        if self.ops:
            text += " by " + ", ".join(op.describe() for op in self.ops)
        for g in self.guards:
            text += " " + g.describe()
        return text


@dataclass(frozen=True)
class Expectation:
    src: str
    dst: str
    span: Span
    config: Mapping[str, Any] | None = None  # from ``with config.n = 4``: what patterns read


@dataclass(frozen=True)
class Program:
    name: str
    path: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]
    expects: tuple[Expectation, ...] = ()
    direction: Literal["forward", "inverse"] = "forward"
    # resolved programs by the config values their patterns read (see resolve)
    _resolved: dict[tuple[tuple[ConfigPath, int], ...], Program] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    def inverse(self) -> Program:
        return replace(self, rules=tuple(r.inverse() for r in reversed(self.rules)),
                       direction="inverse" if self.direction == "forward" else "forward")

    def resolve(self, config: Mapping[str, Any] | None) -> Program:
        """The program with the config's values in its patterns' offsets and bounds
        (``{e+config.n}``, ``{e:int<config.n}``); itself if no pattern reads the config. A field
        that is missing, or not a non-negative integer, is an error naming the rule and the
        field."""
        reading = [r for r in self.rules if r.config_refs]
        if not reading:
            return self
        values: dict[ConfigPath, int] = {}
        for rule in reading:
            for path in rule.config_refs:
                if path not in values:
                    values[path] = _config_value(rule, path, config or {})
        key = tuple(sorted(values.items()))
        found = self._resolved.get(key)
        if found is None:
            found = replace(self, rules=tuple(r.resolve(values) for r in self.rules))
            if len(self._resolved) > 64:
                self._resolved.clear()
            self._resolved[key] = found
        return found

    def catch_all(self) -> Rule | None:
        """A rule whose result is any key at all (``rename "vision_model.{rest*}" ->
        "{rest*}"``, transformers' PrefixChange): its inverse claims every key, so this
        direction can only convert checkpoints whose every key some rule matches."""
        for r in self.rules:
            if r.kind == "rename" and not r.guards and _matches_anything(r.dst.patterns[0]):
                return r
        return None


def _config_value(rule: Rule, path: ConfigPath, config: Mapping[str, Any]) -> int:
    """The value of a config field a rule's patterns read, as the static checks assume it:
    a non-negative integer."""
    field_name = ".".join(path)
    where = ", ".join(repr(p.text) for p in rule.src.patterns + rule.dst.patterns
                      if path in p.config_refs)
    try:
        value = O.eval_expr(ast.Ref(path), config)
    except ConversionError as exc:
        raise ConversionError(f"{exc.message}; the rule reads {field_name} in {where}",
                              span=rule.span, rule=rule.ref.label) from None
    if value < 0:
        raise ConversionError(f"{field_name} is {value}; {where} needs a non-negative integer",
                              span=rule.span, rule=rule.ref.label)
    return value


def _matches_anything(pattern: CompiledPattern) -> bool:
    segs = pattern.source.segments
    # "{x*}" or "{x}": the first segment of any key is a stem, the rest its leaves
    return (len(segs) == 1 and len(segs[0]) == 1 and isinstance(segs[0][0], ast.Capture)
            and segs[0][0].kind in ("many", "one"))


# --- compilation --------------------------------------------------------------------------------

Loader = Callable[[str, Span], ast.Conversion]


def compile_conversion(conv: ast.Conversion, load_include: Loader | None = None) -> Program:
    """Check a parsed file and build its program; raises :class:`ErrorGroup` with every error."""
    errors: list[ConvlensError] = []
    rules: list[Rule] = []
    expects: list[Expectation] = []
    statements = _inline_includes(conv, load_include, errors, seen=(conv.name,))
    for st in statements:
        if isinstance(st, ast.Expect):
            if st.span.path == conv.path or st.span.path == "<none>":
                expects.append(Expectation(st.src, st.dst, st.span, given_config(st.given)))
            continue
        try:
            rule = _compile_rule(st, errors)
        except ConvlensError as exc:
            errors.append(exc)
            continue
        if rule is not None:
            rules.append(rule)
    errors += check_order(rules)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise ErrorGroup(errors)
    return Program(conv.name, conv.path, conv.model_types, conv.architectures, tuple(rules),
                   tuple(expects))


def given_config(settings: tuple[tuple[tuple[str, ...], int], ...]) -> dict[str, Any] | None:
    """``with config.text_config.n = 4`` (an expect's settings) as the config dict it stands
    for; the importer builds its expects' configs with it too."""
    if not settings:
        return None
    config: dict[str, Any] = {}
    for path, value in settings:
        node = config
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return config


def _inline_includes(conv: ast.Conversion, load: Loader | None, errors: list[ConvlensError],
                     seen: tuple[str, ...]) -> list[ast.Statement]:
    out: list[ast.Statement] = []
    for st in conv.statements:
        if not isinstance(st, ast.Include):
            out.append(st)
            continue
        if st.name in seen:
            cycle = " -> ".join((*seen, st.name))
            errors.append(RuleError(f"include cycle: {cycle}", span=st.span))
            continue
        if load is None:
            errors.append(RuleError(f"cannot include {st.name!r} here", span=st.span))
            continue
        try:
            inner = load(st.name, st.span)
        except ConvlensError as exc:
            errors.append(exc)
            continue
        out += _inline_includes(inner, load, errors, (*seen, st.name))
    return out


def _endpoint(ep: ast.Endpoint, errors: list[ConvlensError]) -> Endpoint:
    naming = ep.naming or "module"
    if naming not in NAMINGS:
        errors.append(RuleError(f"unknown naming {naming!r}", span=ep.span,
                                hint=did_you_mean(naming, NAMINGS) or
                                f"namings: {', '.join(NAMINGS)}"))
        naming = "module"
    if ep.axes is not None and len(set(ep.axes)) != len(ep.axes):
        errors.append(RuleError(f"axes ({', '.join(ep.axes)}) names an axis twice", span=ep.span))
    for p in ep.patterns:
        errors += check_pattern(p)
    return Endpoint(tuple(CompiledPattern(p) for p in ep.patterns), cast(NamingKind, naming),
                    ep.axes, ep.span)


def _with_domains(src: Endpoint, dst: Endpoint, errors: list[ConvlensError]
                  ) -> tuple[Endpoint, Endpoint]:
    """Both sides with the rule's range of each integer capture (its bound and every form it
    takes), so that whichever side is matched, the capture ranges over the same values."""
    sources = [p.source for p in src.patterns + dst.patterns]
    if not any(c.kind == "int" and (c.expr is not None or c.bound is not None)
               for p in sources for c in p.captures().values()):
        return src, dst
    found: list[RuleError] = []
    domains = bind_domains(sources, found)
    errors += found

    def side(e: Endpoint) -> Endpoint:
        return replace(e, patterns=tuple(CompiledPattern(p.source, domains) for p in e.patterns))

    return side(src), side(dst)


def _captures(ep: Endpoint, errors: list[ConvlensError]) -> dict[str, ast.Capture]:
    first = ep.patterns[0].captures
    for p in ep.patterns[1:]:
        if set(p.captures) != set(first):
            errors.append(RuleError(
                f"patterns of one side must bind the same captures: {p.text!r} binds "
                f"{_names(p.captures)}, {ep.patterns[0].text!r} binds {_names(first)}",
                span=p.span))
    return first


def _names(caps: dict[str, ast.Capture]) -> str:
    return "{" + ", ".join(sorted(caps)) + "}" if caps else "nothing"


def _compile_rule(st: ast.Statement, errors: list[ConvlensError]) -> Rule | None:
    text = format_statement(st)
    if isinstance(st, ast.Rename):
        return _compile_rename(st, text, errors)
    if isinstance(st, ast.Drop):
        return _compile_drop(st, text, errors)
    assert isinstance(st, (ast.Fuse, ast.Split, ast.Map))
    return _compile_tensor_rule(st, text, errors)


def _one_pattern(ep: ast.Endpoint, what: str, errors: list[ConvlensError]) -> bool:
    if len(ep.patterns) != 1:
        errors.append(RuleError(f"{what} takes one pattern on each side, got {len(ep.patterns)}",
                                span=ep.span))
        return False
    return True


def _guards(guards: tuple[ast.Guard, ...], both: set[str], errors: list[ConvlensError]
            ) -> tuple[Guard, ...]:
    out = []
    for g in guards:
        if g.capture not in both:
            errors.append(RuleError(f"guard on {{{g.capture}}}, which this rule does not capture",
                                    span=g.span, hint=did_you_mean(g.capture, sorted(both))))
            continue
        out.append(Guard(g.capture, g.negate, g.values, compile_guard_values(g.values)))
    return tuple(out)


def _same_kinds(src: dict[str, ast.Capture], dst: dict[str, ast.Capture], span: Span,
                errors: list[ConvlensError]) -> None:
    for name in sorted(set(src) & set(dst)):
        if src[name].kind != dst[name].kind:
            errors.append(RuleError(
                f"capture {{{name}}} is {_kind(src[name])} on the left but {_kind(dst[name])} on "
                "the right; the rule would not be a bijection", span=span))


def _kind(c: ast.Capture) -> str:
    return {"one": "{x} (one segment)", "many": "{x*} (segments)", "int": "{x:int}"}[c.kind]


def _compile_rename(st: ast.Rename, text: str, errors: list[ConvlensError]) -> Rule | None:
    n = len(errors)
    src, dst = _endpoint(st.src, errors), _endpoint(st.dst, errors)
    if not (_one_pattern(st.src, "rename", errors) and _one_pattern(st.dst, "rename", errors)):
        return None
    src, dst = _with_domains(src, dst, errors)
    sc, dc = src.patterns[0].captures, dst.patterns[0].captures
    if set(sc) != set(dc):
        errors.append(RuleError(
            f"both sides of a rename must bind the same captures: left binds {_names(sc)}, "
            f"right binds {_names(dc)}", span=st.span,
            hint="a capture on one side only makes the rename impossible to invert"))
    _same_kinds(sc, dc, st.span, errors)
    if src.axes or dst.axes:
        errors.append(RuleError("axes (...) belongs to tensor rules, not renames", span=st.span))
    guards = _guards(st.guards, set(sc) & set(dc), errors)
    if len(errors) > n:
        return None
    return Rule("rename", src, dst, (), guards, st.span, text)


def _compile_drop(st: ast.Drop, text: str, errors: list[ConvlensError]) -> Rule | None:
    n = len(errors)
    target, source = _endpoint(st.target, errors), _endpoint(st.source, errors)
    if not (_one_pattern(st.target, "drop", errors) and _one_pattern(st.source, "drop", errors)):
        return None
    target, source = _with_domains(target, source, errors)
    tc, sc = target.patterns[0].captures, source.patterns[0].captures
    if set(tc) != set(sc):
        errors.append(RuleError(
            f"drop ... restore from: both patterns must bind the same captures ({_names(tc)} vs "
            f"{_names(sc)}), or the inverse could not tell what to restore", span=st.span))
    _same_kinds(tc, sc, st.span, errors)
    guards = _guards(st.guards, set(tc) & set(sc), errors)
    if len(errors) > n:
        return None
    # A drop is written target-first; as a rule its source side is what it removes.
    return Rule("drop", target, source, (), guards, st.span, text)


def _compile_tensor_rule(st: ast.Fuse | ast.Split | ast.Map, text: str,
                         errors: list[ConvlensError]) -> Rule | None:
    n = len(errors)
    kind: RuleKind = {ast.Fuse: "fuse", ast.Split: "split", ast.Map: "map"}[type(st)]  # type: ignore[assignment]
    src, dst = _endpoint(st.src, errors), _endpoint(st.dst, errors)
    if kind in ("split", "map") and len(src.patterns) != 1:
        errors.append(RuleError(f"{kind} takes one source pattern, got {len(src.patterns)}",
                                span=st.src.span, hint="use fuse for many -> one"))
    if kind in ("fuse", "map") and len(dst.patterns) != 1:
        errors.append(RuleError(f"{kind} makes one tensor, got {len(dst.patterns)} targets",
                                span=st.dst.span, hint="use split for one -> many"))
    src, dst = _with_domains(src, dst, errors)
    for side in (src, dst):
        for i, a in enumerate(side.patterns):
            for b in side.patterns[i + 1:]:
                if a.text == b.text or stems_overlap(a, b):
                    errors.append(RuleError(
                        f"patterns {a.text!r} and {b.text!r} can match the same key, so a tensor "
                        "could belong to either part", span=b.span))
    sc, dc = _captures(src, errors), _captures(dst, errors)
    _same_kinds(sc, dc, st.span, errors)
    stacked = tuple(c for c in sc if c not in dc)
    unstacked = tuple(c for c in dc if c not in sc)
    ops = _compile_ops(st.ops, len(src.patterns), len(dst.patterns), errors)
    if ops is not None:
        _check_streams(ops, stacked, unstacked, src, dst, sc, dc, st.span, errors)
    guards = _guards(st.guards, set(sc) & set(dc), errors)
    if len(errors) > n or ops is None:
        return None
    return Rule(kind, src, dst, ops, guards, st.span, text, stacked, unstacked)


def _check_streams(ops: tuple[O.Op, ...], stacked: tuple[str, ...], unstacked: tuple[str, ...],
                   src: Endpoint, dst: Endpoint, sc: dict[str, ast.Capture],
                   dc: dict[str, ast.Capture], span: Span, errors: list[ConvlensError]) -> None:
    for c in stacked:
        if sc[c].kind != "int":
            errors.append(RuleError(
                f"capture {{{c}}} appears only on the left, so it must be stacked, and stacking "
                f"needs an integer capture: write {{{c}:int}}", span=src.span))
    for c in unstacked:
        if dc[c].kind != "int":
            errors.append(RuleError(
                f"capture {{{c}}} appears only on the right, so it must come from unstack, "
                f"which makes integers: write {{{c}:int}}", span=dst.span))
    families: list[tuple[str, ...]] = [stacked] * len(src.patterns)
    for op in ops:
        try:
            families = op.simulate(families)
        except ValueError as exc:
            errors.append(RuleError(str(exc), span=op.span or span))
            return
    if len(families) != len(dst.patterns):
        errors.append(RuleError(
            f"the ops leave {len(families)} part(s) but the rule names {len(dst.patterns)} "
            "target pattern(s)", span=span))
        return
    for fam, pat in zip(families, dst.patterns, strict=True):
        extra = set(fam) - set(pat.captures)
        if extra:
            errors.append(RuleError(
                f"{pat.text!r}: the ops leave a family over {{{', '.join(sorted(extra))}}}, which "
                "this pattern does not capture; stack it, or capture it", span=pat.span))
        missing = {c for c in pat.captures if c in unstacked} - set(fam)
        if missing:
            errors.append(RuleError(
                f"{pat.text!r}: {{{', '.join(sorted(missing))}}} is not made by any unstack",
                span=pat.span))


# (positional parameter names, keyword parameter names) of each op in the language.
_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stack": (("capture", "dim"), ()),
    "unstack": (("capture", "dim"), ()),
    "concat": (("dim",), ("sizes",)),
    "split": (("dim",), ("sizes", "parts")),
    "interleave": (("dim",), ()),
    "deinterleave": (("dim",), ("parts",)),
    "transpose": (("dim0", "dim1"), ()),
    "rope_permute": (("heads",), ("heads", "dim")),
    "rope_unpermute": (("heads",), ("heads", "dim")),
    "flatten": (("dim",), ("sizes",)),
    "unflatten": (("dim",), ("sizes",)),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "stack": ("capture", "dim"), "unstack": ("capture", "dim"), "concat": ("dim",),
    "split": ("dim",), "interleave": ("dim",), "deinterleave": ("dim",),
    "transpose": ("dim0", "dim1"), "rope_permute": ("heads",), "rope_unpermute": ("heads",),
    "flatten": ("dim", "sizes"), "unflatten": ("dim", "sizes"),
}
assert set(_SIGNATURES) == set(O.OPS_BY_NAME)


def _compile_ops(ops: tuple[ast.Op, ...], n_src: int, n_dst: int,
                 errors: list[ConvlensError]) -> tuple[O.Op, ...] | None:
    out: list[O.Op] = []
    count = n_src
    ok = True
    for op in ops:
        try:
            compiled = _compile_op(op, count, n_dst)
        except RuleError as exc:
            errors.append(exc)
            ok = False
            continue
        out.append(compiled)
        if isinstance(compiled, (O.Concat, O.Interleave)):
            count = 1
        elif isinstance(compiled, (O.Split, O.Deinterleave)):
            count = compiled.parts
    return tuple(out) if ok else None


def _compile_op(op: ast.Op, streams: int, n_dst: int) -> O.Op:
    cls = O.OPS_BY_NAME.get(op.name)
    if cls is None:
        raise RuleError(f"unknown op {op.name!r}", span=op.span,
                        hint=did_you_mean(op.name, sorted(O.OPS_BY_NAME))
                        or f"ops: {', '.join(sorted(O.OPS_BY_NAME))}")
    positional, keywords = _SIGNATURES[op.name]
    values: dict[str, ast.Value] = {}
    pos_args = [a for a in op.args if a.name is None]
    if len(pos_args) > len(positional):
        raise RuleError(f"{op.name} takes at most {len(positional)} positional argument(s) "
                        f"({', '.join(positional)})", span=op.span)
    for name, a in zip(positional, pos_args, strict=False):
        values[name] = a.value
    for a in op.args:
        if a.name is None:
            continue
        if a.name not in keywords:
            raise RuleError(f"{op.name} has no argument {a.name!r}", span=a.span,
                            hint=did_you_mean(a.name, keywords) or
                            (f"keywords: {', '.join(keywords)}" if keywords else None))
        if a.name in values:
            raise RuleError(f"{op.name}: {a.name} given twice", span=a.span)
        values[a.name] = a.value
    if cls in (O.Stack, O.Unstack):
        cap = values.get("capture")
        if not (isinstance(cap, ast.Ref) and len(cap.path) == 1):
            raise RuleError(f"{op.name}: the first argument is a capture name, like "
                            f"{op.name}(e, 0)", span=op.span)
    missing = [p for p in _REQUIRED[op.name] if p not in values]
    if missing:
        raise RuleError(f"{op.name} needs {', '.join(missing)}", span=op.span)
    if op.on is not None and not cls.per_tensor:
        raise RuleError(f"'on [...]' applies to per-tensor ops; {op.name} combines or splits parts",
                        span=op.span)

    def dim(name: str) -> int:
        v = values[name]
        if not isinstance(v, ast.Int):
            raise RuleError(f"{op.name}: {name} must be a number", span=op.span)
        return v.value

    def sizes(name: str) -> tuple[ast.Expr, ...] | None:
        v = values.get(name)
        if v is None:
            return None
        if not isinstance(v, ast.Tuple):
            raise RuleError(f"{op.name}: {name} is a list: {name}=[...]", span=op.span)
        for item in v.items:
            _check_size_expr(item)
        return v.items

    def count(name: str, default: int) -> int:
        v = values.get(name)
        if v is None:
            return default
        if not isinstance(v, ast.Int) or v.value < 1:
            raise RuleError(f"{op.name}: {name} must be a positive number", span=op.span)
        return v.value

    if cls in (O.Stack, O.Unstack):
        cap = values["capture"]
        assert isinstance(cap, ast.Ref)
        return cls(cap.path[0], dim("dim"), on=op.on, span=op.span)
    if cls is O.Concat:
        sz = sizes("sizes")
        if sz is not None and len(sz) != streams:
            raise RuleError(f"concat: {len(sz)} sizes for {streams} parts", span=op.span)
        return O.Concat(dim("dim"), sz, streams, on=op.on, span=op.span)
    if cls is O.Split:
        sz = sizes("sizes")
        if sz is not None and "parts" in values:
            raise RuleError("split: give sizes or parts, not both", span=op.span)
        parts = len(sz) if sz is not None else count("parts", n_dst)
        return O.Split(dim("dim"), sz, parts, on=op.on, span=op.span)
    if cls is O.Interleave:
        return O.Interleave(dim("dim"), streams, on=op.on, span=op.span)
    if cls is O.Deinterleave:
        return O.Deinterleave(dim("dim"), count("parts", n_dst), on=op.on, span=op.span)
    if cls is O.Transpose:
        return O.Transpose(dim("dim0"), dim("dim1"), on=op.on, span=op.span)
    if cls in (O.RopePermute, O.RopeUnpermute):
        heads = values["heads"]
        if isinstance(heads, ast.Tuple):
            raise RuleError(f"{op.name}: heads is one expression", span=op.span)
        _check_size_expr(heads)
        d = dim("dim") if "dim" in values else 0
        return cls(heads, d, on=op.on, span=op.span)
    assert cls in (O.Flatten, O.Unflatten)
    sz = sizes("sizes")
    assert sz is not None
    if len(sz) < 2:
        raise RuleError(f"{op.name}: sizes lists at least two dims", span=op.span)
    return cls(dim("dim"), sz, on=op.on, span=op.span)


def _check_size_expr(e: ast.Expr) -> None:
    if isinstance(e, ast.Ref) and (e.path[0] != "config" or len(e.path) < 2):
        raise RuleError(f"{'.'.join(e.path)!r}: sizes are numbers or config.<field> expressions",
                        span=e.span,
                        hint="for example config.num_key_value_heads * config.head_dim")
    if isinstance(e, ast.BinOp):
        _check_size_expr(e.left)
        _check_size_expr(e.right)


# --- order checks ----------------------------------------------------------------------------


def check_order(rules: list[Rule]) -> list[ConvlensError]:
    """Rules whose results depend on their order: an earlier rule takes stems that a later rule
    also matches, and its output no longer matches the later rule (the later rule is shadowed)."""
    errors: list[ConvlensError] = []
    near = _neighbours(rules)
    for i, a in enumerate(rules):
        for j in sorted(near[i]):
            b = rules[j]
            for pa in a.src.patterns:
                for pb in b.src.patterns:
                    if not stems_overlap(pa, pb):
                        continue
                    if any(stems_overlap(q, pb) for q in _results(a)):
                        continue  # a's result still reaches b: a chain, which is ordered on purpose
                    if a.guards or b.guards:
                        continue  # guards decide; the overlap may be excluded
                    errors.append(RuleError(
                        f"{pb.text!r} (line {b.span.line}) matches stems that the earlier rule "
                        f"at line {a.span.line} ({pa.text!r}) already converts; the result depends "
                        "on the order of the two rules", span=pb.span,
                        hint="make the patterns disjoint, or add a guard"))
    return errors


def _results(rule: Rule) -> list[CompiledPattern]:
    """Stems a rule's output keys can show a later rule: its targets, and for a rename of
    every key (a prefix removed: ``new.{s}`` -> ``{s}``), which keeps each key's leaves, any
    stem at all (``{s}`` still reaches ``{p*}.attn_ln``)."""
    out = list(rule.dst.patterns)
    if rule.kind == "rename" and not rule.guards and _matches_anything(rule.dst.patterns[0]):
        more = ast.Capture("convlens_leaves", "many")
        out += [CompiledPattern(ast.Pattern(q.text + ".{convlens_leaves*}",
                                            (*q.source.segments, (more,)), q.span), q.domains)
                for q in out]
    return out


def _literal_run(pattern: ast.Pattern, reverse: bool) -> tuple[str, ...]:
    """The pattern's leading (or trailing) segments that are plain text."""
    segs = reversed(pattern.segments) if reverse else iter(pattern.segments)
    out = []
    for seg in segs:
        if not all(isinstance(p, ast.Literal) for p in seg):
            break
        out.append("".join(p.text for p in seg if isinstance(p, ast.Literal)))
    return tuple(out)


class _Trie:
    """Rules by a run of plain segments: those whose run is a prefix of a given run, or
    extends it, are the only ones that can agree with it."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.kids: dict[str, _Trie] = {}

    def add(self, run: tuple[str, ...], i: int) -> None:
        node = self
        for word in run:
            node = node.kids.setdefault(word, _Trie())
        node.ids.add(i)

    def agreeing(self, run: tuple[str, ...]) -> set[int]:
        found: set[int] = set()
        node = self
        for word in run:
            found |= node.ids
            nxt = node.kids.get(word)
            if nxt is None:
                return found
            node = nxt
        stack = [node]
        while stack:
            n = stack.pop()
            found |= n.ids
            stack.extend(n.kids.values())
        return found


def _neighbours(rules: list[Rule]) -> list[set[int]]:
    """For each rule, the later rules whose source patterns might overlap its own: two stems
    can only meet if their leading plain segments agree as far as both have them, and so do
    their trailing ones. Keeps the pairwise check near-linear on large generated files."""
    runs = [[(_literal_run(p.source, False), _literal_run(p.source, True))
             for p in r.src.patterns] for r in rules]
    heads, tails = _Trie(), _Trie()
    for i, pats in enumerate(runs):
        for head, tail in pats:
            heads.add(head, i)  # an empty run sits at the root: it agrees with every run
            tails.add(tail, i)

    def agree(x: tuple[str, ...], y: tuple[str, ...]) -> bool:
        n = min(len(x), len(y))
        return x[:n] == y[:n]

    out: list[set[int]] = []
    for i, pats in enumerate(runs):
        found: set[int] = set()
        for head, tail in pats:
            candidates = heads.agreeing(head) if head else tails.agreeing(tail)
            found |= {j for j in candidates if j > i and any(
                agree(head, h) and agree(tail, t) for h, t in runs[j])}
        out.append(found)
    return out


def compile_file(path: str | Path, load_include: Loader | None = None) -> Program:
    from convlens.dsl.parser import parse_file

    return compile_conversion(parse_file(path), load_include)
