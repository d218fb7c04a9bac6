"""Patterns compiled for matching keys: anchored, segment-aware, with stems that own their tensors.

A pattern matches a *stem*: a key prefix that ends at a segment boundary. The stem owns

- the key equal to it (``experts.gate_up_proj`` under param naming),
- its leaves, any key that continues with ``.`` (``q_proj.weight``, ``q_proj.k_scale``),
- its suffix siblings, a key that continues with ``_ROLE`` for a known role name
  (``experts.gate_up_proj_weight_scale``, ``gate_up_proj_blocks``), optionally followed by leaves.

Where several stems of one key match, the shortest wins (multi-segment captures are lazy), so the
result is deterministic. Captures never cross a dot unless written ``{name*}``; ints are canonical
(no leading zeros) so that formatting a match gives the key back.

**Integer arithmetic.** An integer capture may sit in a segment as an expression
(``{2*i+1}``: the segment is ``a*i + b``) and may have a bound (``{e:int<config.n}``). A rule
gives each integer capture one *range*, ``lo <= i < hi``, the same in all its patterns on both
sides (:class:`IntDomain`): ``hi`` is the bound, ``lo`` the least value for which every form of
the capture in the rule is a non-negative segment (``{i-1}`` on either side makes it 1). Matching
solves the segment for the capture and refuses a segment with no solution in the range, so a
key either maps both ways or is left alone; rendering computes the segment and refuses a value
out of the range (an error: ``unstack`` made more experts than the bound allows). Offsets and
bounds may read ``config.*`` fields: such a pattern is resolved against the config before it
matches (:meth:`CompiledPattern.resolve`). Matching then takes the regex's match when it solves
and otherwise searches segment by segment (:func:`_match_pieces`), so the stem is the shortest
one whose captures solve, as without arithmetic.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from convlens.compiler.naming import SUFFIX_ROLES
from convlens.dsl.ast import BinOp, Capture, Expr, Int, Literal, Pattern, Ref, Segment
from convlens.dsl.patterns import evaluate, format_capture_expr
from convlens.errors import ConversionError, RuleError, Span

_INT = r"(?:0|[1-9][0-9]*)"
_ROLE_ALT = "|".join(re.escape(r) for r in sorted(SUFFIX_ROLES, key=len, reverse=True))
_TAIL = rf"(?=$|\.|_(?:{_ROLE_ALT})(?:$|\.))"


class Match(NamedTuple):
    captures: dict[str, str]
    stem: str
    tail: str  # "" | ".leaf..." | "_role[.leaf...]"


@dataclass(frozen=True)
class IntDomain:
    """What a rule says about one integer capture: its bound (``{e:int<N}``, written on any of
    its occurrences) and the form of every occurrence in the rule's patterns (an expression, or
    None for the capture itself). Every pattern of the rule gets the same domain, so the capture
    ranges over the same values whichever side is matched."""

    bound: Expr | None
    forms: tuple[Expr | None, ...]


@dataclass(frozen=True)
class IntForm:
    """A resolved integer capture of one pattern: the segment is ``scale * value + offset``, for
    values ``lo <= value < hi`` (``hi`` None: no bound)."""

    scale: int
    offset: int
    lo: int
    hi: int | None


class NeedsConfig(ConversionError):
    """A pattern whose offsets or bounds read the config was used before being resolved."""


ConfigPath = tuple[str, ...]  # ("config", "text_config", "moe_num_experts")


class CompiledPattern:
    """One pattern, ready to match keys and to format captures back into a stem.

    ``domains``: the rule's :class:`IntDomain` of each integer capture (by default each capture
    as written in this pattern alone)."""

    def __init__(self, pattern: Pattern, domains: Mapping[str, IntDomain] | None = None) -> None:
        self.source = pattern
        self.text = pattern.text
        self.span = pattern.span
        self.captures: dict[str, Capture] = pattern.captures()
        self._regex: re.Pattern[str] | None = None  # compiled on first use (~1 ms each)
        literals = [p.text for seg in pattern.segments for p in seg if isinstance(p, Literal)]
        # A literal that every matching key contains: a cheap test before the regex.
        self.needle = max(literals, key=len) if literals else ""
        self.min_segments = len(pattern.segments)
        self.ints = tuple(n for n, c in self.captures.items() if c.kind == "int")
        # Several {x*} captures make the regex backtrack in O(n^k) on a key of n segments that
        # fails late; such patterns are matched segment by segment with memoized failures.
        self._pieces = _pieces(pattern) if sum(
            1 for c in self.captures.values() if c.kind == "many") > 1 else None
        # str.format template: literals cannot hold braces (the scanner refuses them)
        self._template = ".".join(
            "".join(p.text if isinstance(p, Literal) else "{" + p.name + "}" for p in seg)
            for seg in pattern.segments)
        own = {n: IntDomain(c.bound, (c.expr,)) for n, c in self.captures.items()
               if c.kind == "int"}
        if domains:
            own.update({n: d for n, d in domains.items() if n in own})
        # integer captures with arithmetic: an expression, a bound, or a form that limits them
        self.domains: dict[str, IntDomain] = {
            n: d for n, d in own.items()
            if d.bound is not None or any(f is not None for f in d.forms)}
        self.arith = bool(self.domains)
        refs: set[ConfigPath] = set()
        for n, d in self.domains.items():
            for e in (d.bound, self.captures[n].expr, *d.forms):
                if e is not None:
                    refs |= _config_refs(e)
        self.config_refs: tuple[ConfigPath, ...] = tuple(sorted(refs))
        # resolved forms (None until resolve() gives the config's values)
        self.forms: dict[str, IntForm] | None = None if refs else self._forms({})
        self._all_pieces: list[_Piece] | None = None
        self._static: dict[str, _IntSet] | None = None

    @property
    def regex(self) -> re.Pattern[str]:
        if self._regex is None:
            body = r"\.".join(_segment_regex(s) for s in self.source.segments)
            self._regex = re.compile("^" + body + _TAIL)
        return self._regex

    # --- integer arithmetic ---------------------------------------------------------------

    def _forms(self, values: Mapping[ConfigPath, int]) -> dict[str, IntForm]:
        out = {}
        for name, d in self.domains.items():
            scale, offset = _line(self.captures[name].expr, name, values)
            lo = 0
            for f in d.forms:
                a, b = _line(f, name, values)
                lo = max(lo, -(b // a))  # least i with a*i + b >= 0
            hi = None if d.bound is None else _evaluate(d.bound, "", 0, values)
            out[name] = IntForm(scale, offset, lo, hi)
        return out

    def resolve(self, values: Mapping[ConfigPath, int]) -> CompiledPattern:
        """This pattern with the config's values of its ``config_refs`` (which must all be
        given, as non-negative integers)."""
        if not self.config_refs:
            return self
        out = copy.copy(self)
        out.forms = self._forms(values)
        return out

    def _resolved(self) -> dict[str, IntForm]:
        if self.forms is None:
            refs = ", ".join(".".join(r) for r in self.config_refs)
            raise NeedsConfig(f"{self.text!r} reads {refs}: it needs the model's config",
                              span=self.span)
        return self.forms

    def _solve(self, caps: dict[str, str]) -> dict[str, str] | None:
        """The captures with each arithmetic segment solved for its capture, or None if one
        has no solution in the capture's range."""
        out = dict(caps)
        for name, f in self._resolved().items():
            text = out.get(name)
            if text is None:
                continue
            rest = int(text) - f.offset
            if rest % f.scale:
                return None
            value = rest // f.scale
            if value < f.lo or (f.hi is not None and value >= f.hi):
                return None
            out[name] = str(value)
        return out

    def static_ints(self) -> dict[str, _IntSet]:
        """The values each integer segment can show, for the static checks (cached)."""
        if self._static is None:
            self._static = _static_ints(self.source, self.domains)
        return self._static

    def range_text(self, name: str) -> str:
        """``0 <= e < 4`` for messages."""
        f = self._resolved()[name]
        return f"{f.lo} <= {name}" + (f" < {f.hi}" if f.hi is not None else "")

    # --- matching and formatting -----------------------------------------------------------

    def match(self, key: str) -> Match | None:
        if self.needle and self.needle not in key:
            return None
        if self.arith:
            return self._match_arith(key)
        if self._pieces is not None:
            found = _match_pieces(self._pieces, key)
            if found is None:
                return None
            spans, end, _ = found
            return Match({n: key[a:b] for n, (a, b) in spans.items()}, key[:end], key[end:])
        m = (self._regex or self.regex).match(key)
        if m is None:
            return None
        end = m.end()
        return _new_tuple(Match, (m.groupdict(), key[:end], key[end:]))

    @property
    def regex_only(self) -> bool:
        """Whether :meth:`match` is the regex's match (not arithmetic, not segment pieces)."""
        return not self.arith and self._pieces is None

    def stem_end(self, key: str) -> int:
        """``len(self.match(key).stem)``, or -1 where it gives None."""
        if not self.regex_only:
            m = self.match(key)
            return -1 if m is None else len(m.stem)
        if self.needle and self.needle not in key:
            return -1
        found = (self._regex or self.regex).match(key)
        return -1 if found is None else found.end()

    def _match_arith(self, key: str) -> Match | None:
        # No match even without the arithmetic: None, whether the config is known or not.
        if self._pieces is None:  # the regex's match (the shortest stem), if it solves
            m = self.regex.match(key)
            if m is None:
                return None
            self._resolved()
            solved = self._solve(m.groupdict())
            if solved is not None:
                return Match(solved, key[: m.end()], key[m.end():])
        else:
            if _match_pieces(self._pieces, key) is None:
                return None
            self._resolved()
        if self._all_pieces is None:
            self._all_pieces = _pieces(self.source)
        assert self._all_pieces is not None  # {x*} captures always stand alone
        found = _match_pieces(self._all_pieces, key, self._solve)
        if found is None:
            return None
        spans, end, values = found
        caps = {n: key[a:b] for n, (a, b) in spans.items()}
        caps.update(values)
        return Match(caps, key[:end], key[end:])

    def spans(self, key: str) -> dict[str, tuple[int, int]]:
        """Where each capture sits in ``key`` (which must match; not for arithmetic patterns,
        whose values are not the text at these places)."""
        if self._pieces is not None:
            found = _match_pieces(self._pieces, key)
            assert found is not None
            return found[0]
        m = self.regex.match(key)
        assert m is not None
        return {name: m.span(name) for name in self.captures}

    def format(self, captures: dict[str, str]) -> str:
        if not self.arith:
            return self._template.format_map(captures)
        caps = dict(captures)
        for name, f in self._resolved().items():
            text = caps[name]
            if not text.isdigit():  # a placeholder such as "{e}" (trace): any index
                continue
            value = int(text)
            if value < f.lo or (f.hi is not None and value >= f.hi):
                raise ConversionError(
                    f"{name}={value} is outside the range of {{{name}}} in {self.text!r} "
                    f"({self.range_text(name)}), so no key of this pattern can hold it",
                    span=self.span)
            caps[name] = str(f.scale * value + f.offset)
        return self._template.format_map(caps)

    def is_literal(self) -> bool:
        return not self.captures

    def __repr__(self) -> str:
        return f"CompiledPattern({self.text!r})"


def _config_refs(e: Expr) -> set[ConfigPath]:
    if isinstance(e, Ref):
        return {e.path} if e.path[0] == "config" else set()
    if isinstance(e, BinOp):
        return _config_refs(e.left) | _config_refs(e.right)
    return set()


def _evaluate(e: Expr, name: str, value: int, values: Mapping[ConfigPath, int]) -> int:
    """An integer expression with the capture ``name`` set to ``value``."""
    found = evaluate(e, lambda path: value if path == (name,) else values[path])
    if found is None:  # every reference has a value: only a division by zero gets here
        raise ConversionError(f"division by zero in {format_capture_expr(e)}", span=e.span)
    return found


def _line(e: Expr | None, name: str, values: Mapping[ConfigPath, int]) -> tuple[int, int]:
    """(a, b) of a form ``a*name + b`` (the parser made sure it is one, with a >= 1)."""
    if e is None:
        return 1, 0
    b = _evaluate(e, name, 0, values)
    return _evaluate(e, name, 1, values) - b, b


def bind_domains(patterns: list[Pattern], errors: list[RuleError]) -> dict[str, IntDomain]:
    """The :class:`IntDomain` of each integer capture of a rule's patterns (both sides): its
    forms, and its bound, which may be written on one occurrence or on several alike."""
    bounds: dict[str, tuple[Expr, Pattern]] = {}
    forms: dict[str, list[Expr | None]] = {}
    for p in patterns:
        for name, cap in p.captures().items():
            if cap.kind != "int":
                continue
            forms.setdefault(name, []).append(cap.expr)
            if cap.bound is None:
                continue
            seen = bounds.get(name)
            if seen is None:
                bounds[name] = (cap.bound, p)
            elif seen[0] != cap.bound:
                errors.append(RuleError(
                    f"{{{name}}} has two bounds: <{format_capture_expr(seen[0])} in "
                    f"{seen[1].text!r} and <{format_capture_expr(cap.bound)} in {p.text!r}",
                    span=p.span.shifted(cap.column + 1, len(name) + 2),
                    hint="write the bound once: it holds for the capture on both sides"))
    return {n: IntDomain(bounds[n][0] if n in bounds else None, tuple(f))
            for n, f in forms.items()}


# A pattern as pieces: a {name*} segment, or one segment's regex (the last one followed by an
# optional suffix role, as _TAIL allows).
_Piece = tuple[str, Any]


def _pieces(pattern: Pattern) -> list[_Piece] | None:
    """Pieces of a pattern whose {x*} captures are whole segments, else None (regex only)."""
    out: list[_Piece] = []
    last = len(pattern.segments) - 1
    for i, seg in enumerate(pattern.segments):
        if len(seg) == 1 and isinstance(seg[0], Capture) and seg[0].kind == "many":
            out.append(("many", seg[0].name))
        elif any(isinstance(p, Capture) and p.kind == "many" for p in seg):
            return None
        elif i == last:
            out.append(("seg", re.compile(_segment_regex(seg) + rf"(?=$|_(?:{_ROLE_ALT})$)")))
        else:
            out.append(("seg", re.compile(_segment_regex(seg) + "$")))
    return out


_Solve = Callable[[dict[str, str]], "dict[str, str] | None"]


def _match_pieces(pieces: list[_Piece], key: str, solve: _Solve | None = None
                  ) -> tuple[dict[str, tuple[int, int]], int, dict[str, str]] | None:
    """The match the regex would find (leftmost, each {x*} as short as possible), in
    O(pieces x segments^2): a failure at (piece, segment) is remembered, not retried.

    ``solve`` (arithmetic patterns) turns a segment's captures into the captures' values, or
    None where the segment has no solution: the search goes on as if the segment did not match
    (a failure that depends on that segment alone, so remembering it stays right). The values
    are returned apart from the spans."""
    segs = key.split(".")
    starts = [0]
    for s in segs[:-1]:
        starts.append(starts[-1] + len(s) + 1)
    failed: set[tuple[int, int]] = set()
    spans: dict[str, tuple[int, int]] = {}
    values: dict[str, str] = {}

    def go(i: int, j: int) -> int | None:  # returns the stem's end in ``key``
        if j >= len(segs) or (i, j) in failed:
            return None
        kind, what = pieces[i]
        last = i == len(pieces) - 1
        if kind == "many":
            for k in range(j, len(segs)):  # the capture covers segments j..k
                if last:
                    end: int | None = starts[k] + len(segs[k])
                else:
                    end = go(i + 1, k + 1)
                if end is not None:
                    spans[what] = (starts[j], starts[k] + len(segs[k]))
                    return end
        else:
            m = what.match(segs[j])
            solved = m.groupdict() if m is not None else None
            if solved and solve is not None:
                solved = solve(solved)
            if m is not None and solved is not None:
                end = starts[j] + m.end() if last else go(i + 1, j + 1)
                if end is not None:
                    for name, (a, b) in zip(m.groupdict(), (m.span(g) for g in m.groupdict()),
                                            strict=True):
                        spans[name] = (starts[j] + a, starts[j] + b)
                    values.update(solved)
                    return end
        failed.add((i, j))
        return None

    end = go(0, 0)
    return None if end is None else (spans, end, values)


def _segment_regex(seg: Segment) -> str:
    parts = []
    for p in seg:
        if isinstance(p, Literal):
            parts.append(re.escape(p.text))
        elif p.kind == "many":
            parts.append(rf"(?P<{p.name}>[^.]+(?:\.[^.]+)*?)")
        elif p.kind == "int":
            parts.append(rf"(?P<{p.name}>{_INT})")
        else:
            parts.append(rf"(?P<{p.name}>[^.]+?)")
    return "".join(parts)


def check_pattern(pattern: Pattern) -> list[RuleError]:
    """Ambiguities that the segment scanner cannot see alone."""
    errors = []
    for seg in pattern.segments:
        free = [p for p in seg if isinstance(p, Capture) and p.kind == "one"]
        if len(free) > 1:
            errors.append(RuleError(
                f"ambiguous pattern {pattern.text!r}: {{{free[0].name}}} and {{{free[1].name}}} in "
                "one segment can split it in more than one way", span=_at(pattern, free[1]),
                hint="use one text capture per segment"))
        for a, b in itertools.pairwise(seg):
            if isinstance(a, Capture) and a.kind == "int" and isinstance(b, Literal):
                cap, digit = a, b.text[:1].isdigit()
            elif isinstance(b, Capture) and b.kind == "int" and isinstance(a, Literal):
                cap, digit = b, a.text[-1:].isdigit()
            else:
                continue
            if digit:
                errors.append(RuleError(
                    f"ambiguous pattern {pattern.text!r}: digits next to {{{cap.name}:int}}",
                    span=_at(pattern, cap)))
    return errors


def _at(pattern: Pattern, cap: Capture) -> Span:
    return pattern.span.shifted(cap.column + 1, len(cap.name) + 2)


def compile_guard_values(values: tuple[str, ...]) -> re.Pattern[str]:
    """Guard values are globs: ``*`` matches any text (and nothing else is special).
    ``fnmatch.translate`` writes stars so that they never backtrack into each other, which
    keeps ``*a*a*a*b`` linear on long captures."""
    alts = [fnmatch.translate(v.replace("[", "[[]").replace("?", "[?]")) for v in values]
    return re.compile("(?:" + "|".join(alts) + ")")


# --- overlap of two patterns (static checks) --------------------------------------------------


def stems_overlap(a: Pattern | CompiledPattern, b: Pattern | CompiledPattern) -> bool:
    """Whether some stem matches both patterns (same depth, not prefix/leaf relations).

    Integer segments meet unless their values are provably apart (:func:`_ints_apart`): for a
    compiled pattern, with the ranges its rule gives its captures."""
    ia = a.static_ints() if isinstance(a, CompiledPattern) else _static_ints(a, {})
    ib = b.static_ints() if isinstance(b, CompiledPattern) else _static_ints(b, {})
    # without integer captures, the plain segment test
    da, db = (ia, ib) if ia or ib else (None, None)
    sa = (a.source if isinstance(a, CompiledPattern) else a).segments
    sb = (b.source if isinstance(b, CompiledPattern) else b).segments
    memo: dict[tuple[int, int], bool] = {}

    def many(seg: Segment) -> bool:
        return len(seg) == 1 and isinstance(seg[0], Capture) and seg[0].kind == "many"

    def f(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[(i, j)]
        if i == len(sa) or j == len(sb):
            res = i == len(sa) and j == len(sb)
        elif many(sa[i]) and many(sb[j]):
            res = f(i + 1, j + 1) or f(i, j + 1) or f(i + 1, j)
        elif many(sa[i]):
            res = f(i, j + 1) or f(i + 1, j + 1)
        elif many(sb[j]):
            res = f(i + 1, j) or f(i + 1, j + 1)
        else:
            res = _segments_meet(sa[i], sb[j], da, db) and f(i + 1, j + 1)
        memo[(i, j)] = res
        return res

    return f(0, 0)


# The values an integer segment can show, for the static checks: {scale*i + offset : i >= 0,
# i < hi}. Offsets and bounds are affine forms over config fields (Affine: term -> coefficient;
# "1" the constant, "config.x" a field, whose values are non-negative (resolve checks it), any
# other term an expression taken whole, of unknown sign). The range's low end is taken as 0,
# which can only make the set larger: the checks stay on the safe side.
Affine = dict[str, int]
_IntSet = tuple[int, Affine, "Affine | None"]


def _static_ints(pattern: Pattern, domains: Mapping[str, IntDomain]
                 ) -> dict[str, tuple[int, Affine, Affine | None]]:
    out = {}
    for name, cap in pattern.captures().items():
        if cap.kind != "int":
            continue
        form = _affine(cap.expr, name) if cap.expr is not None else {"#": 1}
        scale = form.pop("#", 0)
        bound = domains[name].bound if name in domains else cap.bound
        out[name] = (scale, form, None if bound is None else _affine(bound, name))
    return out


def _affine(e: Expr, name: str) -> Affine:
    """``e`` as an affine form; "#" is the capture ``name``."""
    if isinstance(e, Int):
        return {"1": e.value}
    if isinstance(e, Ref):
        return {"#": 1} if e.path == (name,) else {".".join(e.path): 1}
    assert isinstance(e, BinOp)
    a, b = _affine(e.left, name), _affine(e.right, name)
    if e.op in ("+", "-"):
        sign = 1 if e.op == "+" else -1
        out = dict(a)
        for k, v in b.items():
            out[k] = out.get(k, 0) + sign * v
        return {k: v for k, v in out.items() if v}
    if e.op == "*" and set(a) <= {"1"}:
        return {k: v * a.get("1", 0) for k, v in b.items() if v * a.get("1", 0)}
    if e.op == "*" and set(b) <= {"1"}:
        return {k: v * b.get("1", 0) for k, v in a.items() if v * b.get("1", 0)}
    if e.op == "//" and set(a) <= {"1"} and set(b) <= {"1"} and b.get("1"):
        return {"1": a.get("1", 0) // b["1"]}
    return {"(" + format_capture_expr(e) + ")": 1}  # taken whole (the capture is never inside)


def _sum(*terms: tuple[int, Affine]) -> Affine:
    out: Affine = {}
    for k, form in terms:
        for t, v in form.items():
            out[t] = out.get(t, 0) + k * v
    return {t: v for t, v in out.items() if v}


def _non_negative(form: Affine) -> bool:
    """Whether ``form >= 0`` for every config (fields are non-negative integers)."""
    return form.get("1", 0) >= 0 and all(
        v >= 0 and t.startswith("config.") for t, v in form.items() if t != "1")


def _ints_apart(x: _IntSet, y: _IntSet) -> bool:
    """Whether two integer segments can never show the same value."""
    (a1, b1, h1), (a2, b2, h2) = x, y
    g = math.gcd(a1, a2)
    diff = _sum((1, b1), (-1, b2))
    if g > 1 and all(v % g == 0 for t, v in diff.items() if t != "1") \
            and diff.get("1", 0) % g:
        return True  # different residues: 2*i and 2*i+1
    # every value of x lies below every value of y: a1*(h1-1) + b1 < b2, or the other way
    if h1 is not None and _non_negative(_sum((1, b2), (-a1, h1), (1, {"1": a1 - 1}), (-1, b1))):
        return True
    return h2 is not None and _non_negative(_sum((1, b1), (-a2, h2), (1, {"1": a2 - 1}),
                                                 (-1, b2)))


def _int_piece(seg: Segment) -> tuple[str, Capture, str] | None:
    """(literal before, the integer capture, literal after) of a segment with one integer
    capture and only literal text around it."""
    caps = [p for p in seg if isinstance(p, Capture)]
    if len(caps) != 1 or caps[0].kind != "int":
        return None
    i = seg.index(caps[0])
    before = "".join(p.text for p in seg[:i] if isinstance(p, Literal))
    after = "".join(p.text for p in seg[i + 1:] if isinstance(p, Literal))
    return before, caps[0], after


def _ints_meet(a: Segment, b: Segment, da: Mapping[str, _IntSet], db: Mapping[str, _IntSet]
               ) -> bool | None:
    """Whether two segments with integer captures can show the same text: None where this
    test does not apply (the general test decides)."""
    pa, pb = _int_piece(a), _int_piece(b)
    if pa is not None and pb is not None:
        if (pa[0], pa[2]) != (pb[0], pb[2]):
            return None
        return not _ints_apart(da[pa[1].name], db[pb[1].name])
    for piece, other, dom in ((pa, b, da), (pb, a, db)):
        if piece is None or not all(isinstance(p, Literal) for p in other):
            continue
        text = "".join(p.text for p in other if isinstance(p, Literal))
        before, cap, after = piece
        digits = text[len(before):len(text) - len(after)]
        if not (text.startswith(before) and text.endswith(after)
                and re.fullmatch(_INT, digits)):
            return False
        return not _ints_apart(dom[cap.name], (0, {"1": int(digits)}, {"1": 1}))
    return None


def _segments_meet(a: Segment, b: Segment, da: Mapping[str, _IntSet] | None = None,
                   db: Mapping[str, _IntSet] | None = None) -> bool:
    if da is not None and db is not None:
        ints = _ints_meet(a, b, da, db)
        if ints is not None:
            return ints
    lit_a = all(isinstance(p, Literal) for p in a)
    lit_b = all(isinstance(p, Literal) for p in b)
    text_a = "".join(p.text for p in a if isinstance(p, Literal))
    text_b = "".join(p.text for p in b if isinstance(p, Literal))
    if lit_a and lit_b:
        return text_a == text_b
    if lit_a:
        return re.fullmatch(_segment_regex(b), text_a) is not None
    if lit_b:
        return re.fullmatch(_segment_regex(a), text_b) is not None
    # Both have captures: they can meet only if their literal ends agree.
    pa, pb = _literal_end(a, 0), _literal_end(b, 0)
    sa, sb = _literal_end(a, -1), _literal_end(b, -1)
    prefix_ok = pa.startswith(pb) or pb.startswith(pa)
    suffix_ok = sa.endswith(sb) or sb.endswith(sa)
    return prefix_ok and suffix_ok


def _literal_end(seg: Segment, where: int) -> str:
    piece = seg[where]
    return piece.text if isinstance(piece, Literal) else ""


# --- matching many keys: one regex match per key *shape* ------------------------------------

# A digit segment of ``"." + key`` (the leading dot stands for the start of the key): one regex
# pass with no lookbehind, about twice as fast as a lookbehind at every position. The possessive
# run cannot give digits back, so it matches exactly the whole segments made of [0-9] only.
_DIGIT_SEGMENT = re.compile(r"\.[0-9]++(?![^.])")
_SLOW = object()
_new_tuple = tuple.__new__  # _new_tuple(Match, (c, s, t)) is Match(c, s, t), minus a frame
_HASH_DIGITS = bytes.maketrans(b"0123456789", b"##########")
_ANY_DIGIT = re.compile(r"[0-9]")
_LEADING_ZERO = re.compile(r"\.0[0-9]+(?![^.])")  # a digit segment like 01 (on "." + key)


def _literals(pattern: CompiledPattern) -> tuple[str, ...]:
    """The literal texts of a pattern, longest first (the likeliest to be missing): each
    literal piece, and each run of whole-literal segments joined with their dots (a key the
    pattern matches spells the run verbatim: ``language_model.lm_head``, not just both)."""
    texts = {piece.text for seg in pattern.source.segments for piece in seg
             if isinstance(piece, Literal) and piece.text}
    run: list[str] = []
    for seg in [*pattern.source.segments, ()]:
        if len(seg) == 1 and isinstance(seg[0], Literal):
            run.append(seg[0].text)
            continue
        if len(run) > 1:
            texts.add(".".join(run))
        run = []
    return tuple(sorted(texts, key=lambda t: (-len(t), t)))


@dataclass
class _Mixed:
    """The templates of one fingerprint with mixed segments: ``places`` are those segments'
    indices, ``entries`` maps their texts in a key to the entry of the key's template."""

    places: tuple[int, ...]
    entries: dict[tuple[str, ...], Any]


class KeyMatcher:
    """Match keys against a rule's source patterns, caching per key template.

    Keys of a large checkpoint differ mostly in their digit segments (layer and expert
    indices): ``model.layers.#.mlp.experts.#.w1.weight``. The first key of a template is
    matched with the patterns; where its captures and stem end sit is recorded by segment, and
    later keys of the same template are read off their segments. This pays only where some
    pattern has several ``{x*}`` captures and is matched segment by segment in Python; a
    regex runs in C faster than the lookup (1.2 against 5 us a key over 100k keys), so rules
    whose patterns are all regexes match every key with them (``cacheable`` is False), as do
    patterns with digits in their literals and arithmetic ones. A capture that covers whole
    segments is re-read per key; one inside a segment with literal text around it sits in a
    segment the template keeps verbatim, so its value is the same for the whole template.
    Templates are learned only from keys whose digit segments are canonical ints: ``{e:int}``
    turns down ``01``, so what a key with ``01`` taught (no match, or a later pattern) would
    be wrong for the keys of its template with ``1``; such keys take the regex path.

    Before any of that, a key that lacks some literal text of every pattern is turned down: a
    pattern's literals occur verbatim in every key it matches (its regex, or its pieces, spell
    them out), so no pattern could match such a key and the answer is None either way.

    The template itself (a regex substitution) is looked up through a cheaper fingerprint
    first: the key's UTF-8 bytes with every ASCII digit turned into ``#``. Keys that hold a
    ``#`` of their own take the regex path (their fingerprint and template could not tell a
    ``#`` from a digit). For the others, a segment of the fingerprint is all ``#`` exactly
    where the key's segment is all digits, has no ``#`` exactly where the key's has no digit
    (and then equals it), and mixes both where the key's segment mixes digits and other text
    (``w1``, ``weight_scale_2``). So the template is the fingerprint with each all-``#``
    segment made ``#`` and each mixed segment spelled as the key has it: a fingerprint
    without mixed segments names one template, and one with them names one template per text
    of its mixed segments, which are read off the key's segments at places the fingerprint
    fixes (:class:`_Mixed`).
    """

    def __init__(self, patterns: tuple[CompiledPattern, ...]) -> None:
        self.patterns = patterns
        self.cacheable = not any(
            isinstance(piece, Literal) and any(c.isdigit() for c in piece.text)
            for p in patterns for seg in p.source.segments for piece in seg) and not any(
            p.arith for p in patterns) and any(  # an arithmetic segment's solution needs digits
            p._pieces is not None for p in patterns)
        self.cache: dict[str, Any] = {}
        self.quick: dict[bytes, Any] = {}  # fingerprint -> the entry of its template
        self.literals = tuple(_literals(p) for p in patterns)

    def candidates(self, keys: Iterable[str]) -> list[str]:
        """The keys, in order, that may match: those holding the three longest literals of a
        single pattern, or the longest literal of one of several. A superset of the keys
        :meth:`match` can accept (it needs every literal of a pattern), found with substring
        tests in one comprehension instead of a call per key."""
        keys = list(keys)
        return [keys[i] for i in self.candidate_positions(keys)]

    def candidate_positions(self, keys: list[str]) -> list[int]:
        """The positions in ``keys`` of :meth:`candidates`."""
        if any(not lits for lits in self.literals):
            return list(range(len(keys)))  # a pattern with no literal text: any key may match
        if len(self.literals) > 1:
            needles = {lits[0] for lits in self.literals}  # each pattern's longest
            return [i for i, k in enumerate(keys) if any(n in k for n in needles)]
        lits = self.literals[0]
        if len(lits) == 1:
            a = lits[0]
            return [i for i, k in enumerate(keys) if a in k]
        if len(lits) == 2:
            a, b = lits
            return [i for i, k in enumerate(keys) if a in k and b in k]
        a, b, c = lits[:3]
        return [i for i, k in enumerate(keys) if a in k and b in k and c in k]

    def stem_end(self, key: str) -> tuple[int, int] | None:
        """``(j, len(stem))`` of :meth:`match`, without building the captures where a regex
        decides (what a rename needs per key: its stem's new text is the same for every key
        with that stem)."""
        if self.cacheable:
            hit = self.match(key)
            return None if hit is None else (hit[0], len(hit[1].stem))
        for j, pat in enumerate(self.patterns):
            end = pat.stem_end(key)
            if end >= 0:
                return j, end
        return None

    def _slow(self, key: str, first: int = 0) -> tuple[int, Match] | None:
        """The first pattern from ``first`` on that matches (those before it cannot)."""
        patterns = self.patterns
        for j in range(first, len(patterns)):
            m = patterns[j].match(key)
            if m is not None:
                return j, m
        return None

    def match(self, key: str) -> tuple[int, Match] | None:
        first = 0
        for literals in self.literals:
            for text in literals:
                if text not in key:
                    break
            else:
                break  # this pattern may match
            first += 1
        else:
            return None  # every pattern lacks one of its literals in ``key``
        if not self.cacheable or "#" in key:
            return self._slow(key, first)
        fingerprint = key.encode().translate(_HASH_DIGITS)
        entry = self.quick.get(fingerprint)
        if entry is None:
            return self._first(key, fingerprint)
        if entry.__class__ is _Mixed:
            segs = key.split(".")
            texts = tuple([segs[i] for i in entry.places])
            entry = entry.entries.get(texts)
            if entry is None:
                return self._first(key, fingerprint)
        if entry is False:
            return None
        j, caps, ints, stem_seg, stem_off, upto = entry
        # segments 0..upto-1 (all that captures and the stem need), the rest left joined
        segs = key.split(".", upto)
        captures = {}
        for name, a, b, value in caps:
            captures[name] = value if a < 0 else segs[a] if b == a + 1 else ".".join(segs[a:b])
        for name in ints:
            value = captures[name]
            if len(value) > 1 and value[0] == "0":  # not a canonical int: the regex decides
                return self._slow(key)
        stem = segs[0] if stem_seg == 0 else ".".join(segs[:stem_seg + 1])
        if stem_off is not None:
            stem = stem[: len(stem) - len(segs[stem_seg]) + stem_off]
        return j, _new_tuple(Match, (captures, stem, key[len(stem):]))

    def _first(self, key: str, fingerprint: bytes) -> tuple[int, Match] | None:
        """Match a key whose template this fingerprint (and mixed text) has not filed yet,
        with the regexes the first time a template is seen; file the template's entry."""
        template = _DIGIT_SEGMENT.sub(".#", "." + key)
        entry = self.cache.get(template)
        if entry is None:
            found = self._slow(key)
            if _LEADING_ZERO.search("." + key) is not None:
                return found  # nothing to learn from a non-canonical int
            entry = self.cache[template] = (False if found is None
                                            else self._learn(key, *found))
        self._file(key, fingerprint, template, entry)
        return self.match(key)  # now read off the filed entry

    def _file(self, key: str, fingerprint: bytes, template: str, entry: Any) -> None:
        if _ANY_DIGIT.search(template) is None:  # no mixed segment: one template
            self.quick[fingerprint] = entry
            return
        mixed = self.quick.get(fingerprint)
        if mixed is None:
            places = tuple(i for i, seg in enumerate(fingerprint.split(b"."))
                           if b"#" in seg and seg.strip(b"#"))
            mixed = self.quick[fingerprint] = _Mixed(places, {})
        segs = key.split(".")
        mixed.entries[tuple([segs[i] for i in mixed.places])] = entry

    def _learn(self, key: str, j: int, m: Match) -> Any:
        starts = [0]
        starts += [i + 1 for i, ch in enumerate(key) if ch == "."]
        ends = [b - 1 for b in starts[1:]] + [len(key)]
        spans = self.patterns[j].spans(key)
        caps: list[tuple[str, int, int, str]] = []
        for name in self.patterns[j].captures:
            a, b = spans[name]
            if a in starts and b in ends:
                caps.append((name, starts.index(a), ends.index(b) + 1, ""))
            else:
                caps.append((name, -1, -1, key[a:b]))
        ints = self.patterns[j].ints
        stem_end = len(m.stem)
        seg = max(i for i, st in enumerate(starts) if st <= stem_end) if stem_end < len(key) \
            else len(starts) - 1
        off = None
        if stem_end in ends:
            seg = ends.index(stem_end)
        else:
            off = stem_end - starts[seg]
        # how many splits reach every segment read: the stem's last one and each capture's
        upto = max([seg + 1] + [b for _, a, b, _ in caps if a >= 0])
        return j, caps, ints, seg, off, upto
