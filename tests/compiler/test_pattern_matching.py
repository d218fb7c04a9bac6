"""Patterns with several {x*} captures are matched segment by segment (no regex backtracking);
the result must be exactly the regex's (leftmost, each capture as short as possible)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from convlens.compiler.patterns import _TAIL, CompiledPattern, Match, compile_guard_values
from convlens.dsl.patterns import parse_pattern
from convlens.errors import Span

FIXED = ["x", "y", "{n%d:int}", "{s%d}", "l_{m%d:int}"]  # one-segment pieces
KEY_SEGMENTS = ["x", "y", "0", "12", "l_3", "q", "w_weight", "x_weight_scale", "weight"]


def _regex_match(cp: CompiledPattern, key: str) -> Match | None:
    body = re.compile(cp.regex.pattern)  # the regex every pattern compiles to
    m = body.match(key)
    if m is None:
        return None
    return Match(m.groupdict(), key[:m.end()], key[m.end():])


@st.composite
def pattern_and_key(draw: st.DrawFn) -> tuple[str, str]:
    """2-3 {x*} captures, each followed by 1-2 one-segment pieces (adjacent {x*} captures are a
    compile error), and a key from a small alphabet so that matches and near misses both occur."""
    out: list[str] = []
    if draw(st.booleans()):
        out.append(draw(st.sampled_from(FIXED)))
    for i in range(draw(st.integers(2, 3))):
        out.append(f"{{c{i}*}}")
        for _ in range(draw(st.integers(1, 2))):
            out.append(draw(st.sampled_from(FIXED)))
    out = [piece % i if "%d" in piece else piece for i, piece in enumerate(out)]
    if draw(st.booleans()):  # a random key: mostly near misses
        key = ".".join(draw(st.lists(st.sampled_from(KEY_SEGMENTS), min_size=1, max_size=10)))
        return ".".join(out), key
    segs: list[str] = []  # a key made from the pattern, then perhaps broken
    for piece in out:
        if piece.endswith("*}"):
            segs += draw(st.lists(st.sampled_from(KEY_SEGMENTS), min_size=1, max_size=3))
        elif piece in ("x", "y"):
            segs.append(piece)
        elif piece.startswith("l_"):
            segs.append("l_" + draw(st.sampled_from(["0", "7", "12", "01"])))
        elif ":int" in piece:
            segs.append(draw(st.sampled_from(["0", "12", "01", "x"])))
        else:
            segs.append(draw(st.sampled_from(KEY_SEGMENTS)))
    segs[-1] += draw(st.sampled_from(["", "_weight_scale", "_proj"]))
    segs += draw(st.lists(st.sampled_from(KEY_SEGMENTS), max_size=2))
    return ".".join(out), ".".join(segs)


@given(pattern_and_key())
def test_segment_matcher_agrees_with_the_regex(case: tuple[str, str]) -> None:
    text, key = case
    cp = CompiledPattern(parse_pattern(text, Span("<t>", 1, 1, 1, "")))
    assert cp._pieces is not None
    assert cp.match(key) == _regex_match(cp, key), (text, key)
    assert _TAIL in cp.regex.pattern


def test_guard_globs_treat_only_the_star_as_special() -> None:
    g = compile_guard_values(("a*b", "x?[y]", "*.z"))
    assert g.match("a--b") and g.match("ab") and not g.match("a-b-c")
    assert g.match("x?[y]") and not g.match("xq[y]") and not g.match("xqy")
    assert g.match("q.z") and not g.match("q.zz")
