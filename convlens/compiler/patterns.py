"""Patterns compiled for matching keys: anchored, segment-aware, with stems that own their tensors.

A pattern matches a *stem*: a key prefix that ends at a segment boundary. The stem owns

- the key equal to it (``experts.gate_up_proj`` under param naming),
- its leaves, any key that continues with ``.`` (``q_proj.weight``, ``q_proj.k_scale``),
- its suffix siblings, a key that continues with ``_ROLE`` for a known role name
  (``experts.gate_up_proj_weight_scale``, ``gate_up_proj_blocks``), optionally followed by leaves.

Where several stems of one key match, the shortest wins (multi-segment captures are lazy), so the
result is deterministic. Captures never cross a dot unless written ``{name*}``; ints are canonical
(no leading zeros) so that formatting a match gives the key back.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from typing import Any, NamedTuple

from convlens.compiler.naming import SUFFIX_ROLES
from convlens.dsl.ast import Capture, Literal, Pattern, Segment
from convlens.errors import RuleError, Span

_INT = r"(?:0|[1-9][0-9]*)"
_ROLE_ALT = "|".join(re.escape(r) for r in sorted(SUFFIX_ROLES, key=len, reverse=True))
_TAIL = rf"(?=$|\.|_(?:{_ROLE_ALT})(?:$|\.))"


class Match(NamedTuple):
    captures: dict[str, str]
    stem: str
    tail: str  # "" | ".leaf..." | "_role[.leaf...]"


class CompiledPattern:
    """One pattern, ready to match keys and to format captures back into a stem."""

    def __init__(self, pattern: Pattern) -> None:
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

    @property
    def regex(self) -> re.Pattern[str]:
        if self._regex is None:
            body = r"\.".join(_segment_regex(s) for s in self.source.segments)
            self._regex = re.compile("^" + body + _TAIL)
        return self._regex

    def match(self, key: str) -> Match | None:
        if self.needle and self.needle not in key:
            return None
        if self._pieces is not None:
            found = _match_pieces(self._pieces, key)
            if found is None:
                return None
            spans, end = found
            return Match({n: key[a:b] for n, (a, b) in spans.items()}, key[:end], key[end:])
        m = self.regex.match(key)
        if m is None:
            return None
        return Match(captures=m.groupdict(), stem=key[: m.end()], tail=key[m.end():])

    def spans(self, key: str) -> dict[str, tuple[int, int]]:
        """Where each capture sits in ``key`` (which must match)."""
        if self._pieces is not None:
            found = _match_pieces(self._pieces, key)
            assert found is not None
            return found[0]
        m = self.regex.match(key)
        assert m is not None
        return {name: m.span(name) for name in self.captures}

    def format(self, captures: dict[str, str]) -> str:
        return self._template.format_map(captures)

    def is_literal(self) -> bool:
        return not self.captures

    def __repr__(self) -> str:
        return f"CompiledPattern({self.text!r})"


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


def _match_pieces(pieces: list[_Piece], key: str
                  ) -> tuple[dict[str, tuple[int, int]], int] | None:
    """The match the regex would find (leftmost, each {x*} as short as possible), in
    O(pieces x segments^2): a failure at (piece, segment) is remembered, not retried."""
    segs = key.split(".")
    starts = [0]
    for s in segs[:-1]:
        starts.append(starts[-1] + len(s) + 1)
    failed: set[tuple[int, int]] = set()
    spans: dict[str, tuple[int, int]] = {}

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
            if m is not None:
                end = starts[j] + m.end() if last else go(i + 1, j + 1)
                if end is not None:
                    for name, (a, b) in zip(m.groupdict(), (m.span(g) for g in m.groupdict()),
                                            strict=True):
                        spans[name] = (starts[j] + a, starts[j] + b)
                    return end
        failed.add((i, j))
        return None

    end = go(0, 0)
    return None if end is None else (spans, end)


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


def stems_overlap(a: Pattern, b: Pattern) -> bool:
    """Whether some stem matches both patterns (same depth, not prefix/leaf relations)."""
    sa, sb = a.segments, b.segments
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
            res = _segments_meet(sa[i], sb[j]) and f(i + 1, j + 1)
        memo[(i, j)] = res
        return res

    return f(0, 0)


def _segments_meet(a: Segment, b: Segment) -> bool:
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
    """The literal texts of a pattern, longest first (the likeliest to be missing)."""
    texts = {piece.text for seg in pattern.source.segments for piece in seg
             if isinstance(piece, Literal) and piece.text}
    return tuple(sorted(texts, key=lambda t: (-len(t), t)))


class KeyMatcher:
    """Match keys against a rule's source patterns, caching per key template.

    Keys of a large checkpoint differ mostly in their digit segments (layer and expert
    indices): ``model.layers.#.mlp.experts.#.w1.weight``. The first key of a template is
    matched with the regexes; where its captures and stem end sit is recorded by segment, and
    later keys of the same template are read off their segments with no regex. Patterns with
    digits in their literals take the regex path every time. A capture that covers whole
    segments is re-read per key; one inside a segment with literal text around it sits in a
    segment the template keeps verbatim, so its value is the same for the whole template.
    Templates are learned only from keys whose digit segments are canonical ints: ``{e:int}``
    turns down ``01``, so what a key with ``01`` taught (no match, or a later pattern) would
    be wrong for the keys of its template with ``1``; such keys take the regex path.

    Before any of that, a key that lacks some literal text of every pattern is turned down: a
    pattern's literals occur verbatim in every key it matches (its regex, or its pieces, spell
    them out), so no pattern could match such a key and the answer is None either way.

    The template itself (a regex substitution) is looked up through a cheaper fingerprint
    first: the key's UTF-8 bytes with every ASCII digit turned into ``#``. Two keys with one
    fingerprint differ only in which digits sit where the other has digits (UTF-8 spells
    every other character without ASCII digit bytes). If the first key's template has no digit
    left, each of its segments is all digits or has none; the second key's segments are then
    all digits in the same places and equal elsewhere, so it has the same template. Only such
    entries are filed under the fingerprint; other keys take the template path every time.
    """

    def __init__(self, patterns: tuple[CompiledPattern, ...]) -> None:
        self.patterns = patterns
        self.cacheable = not any(
            isinstance(piece, Literal) and any(c.isdigit() for c in piece.text)
            for p in patterns for seg in p.source.segments for piece in seg)
        self.cache: dict[str, Any] = {}
        self.quick: dict[bytes, Any] = {}  # fingerprint -> the entry of its template
        self.literals = tuple(_literals(p) for p in patterns)

    def _slow(self, key: str) -> tuple[int, Match] | None:
        for j, pat in enumerate(self.patterns):
            m = pat.match(key)
            if m is not None:
                return j, m
        return None

    def match(self, key: str) -> tuple[int, Match] | None:
        for literals in self.literals:
            for text in literals:
                if text not in key:
                    break
            else:
                break  # this pattern may match
        else:
            return None  # every pattern lacks one of its literals in ``key``
        if not self.cacheable:
            return self._slow(key)
        fingerprint = key.encode().translate(_HASH_DIGITS)
        entry = self.quick.get(fingerprint)
        if entry is None:
            template = _DIGIT_SEGMENT.sub(".#", "." + key)
            entry = self.cache.get(template)
            filed = _ANY_DIGIT.search(template) is None
            if entry is None:
                found = self._slow(key)
                if _LEADING_ZERO.search("." + key) is not None:
                    return found  # nothing to learn from a non-canonical int
                entry = self.cache[template] = (False if found is None
                                                else self._learn(key, *found))
                if filed:
                    self.quick[fingerprint] = entry
                return found
            if filed:
                self.quick[fingerprint] = entry
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
