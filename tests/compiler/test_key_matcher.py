"""KeyMatcher's shortcuts (template cache, mixed segments, literal prefilter, stem ends) give
exactly what matching each pattern in turn gives, on keys chosen to fool them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from convlens.compiler.patterns import CompiledPattern, KeyMatcher, Match
from convlens.dsl.patterns import parse_pattern
from convlens.errors import Span

SPAN = Span("t.conv", 1, 1)

# several {x*} captures: matched segment by segment, through the template cache
CACHED = ("{pre*}.experts.{e:int}.{leaf*}", "{pre*}.layers.{i:int}.{mid*}.w{k}")
# one {x*} or none: the regex decides
PLAIN = ("{layer*}.block_sparse_moe.{part}", "language_model.model", "model.layers.{i:int}.w{k}")

SEGMENTS = ["model", "layers", "experts", "w1", "w2", "w", "weight_scale_2", "0", "1", "7",
            "12", "01", "#", "1#", "language_model", "block_sparse_moe", "gate", "x.y"]
keys = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=7).map(".".join)


def compiled(texts: tuple[str, ...]) -> tuple[CompiledPattern, ...]:
    return tuple(CompiledPattern(parse_pattern(t, SPAN)) for t in texts)


def reference(patterns: tuple[CompiledPattern, ...], key: str) -> tuple[int, Match] | None:
    for j, p in enumerate(patterns):
        m = p.match(key)
        if m is not None:
            return j, m
    return None


def test_cache_applies_to_piece_patterns_only() -> None:
    assert KeyMatcher(compiled(CACHED)).cacheable
    assert not KeyMatcher(compiled(PLAIN)).cacheable


@settings(max_examples=300, deadline=None)
@given(st.lists(keys, min_size=1, max_size=40), st.sampled_from([CACHED, PLAIN, CACHED + PLAIN]))
def test_matcher_equals_matching_in_turn(batch: list[str], texts: tuple[str, ...]) -> None:
    patterns = compiled(texts)
    matcher = KeyMatcher(patterns)  # one matcher for the whole batch: its caches fill up
    for key in batch + batch:
        want = reference(patterns, key)
        assert matcher.match(key) == want, key
        assert matcher.stem_end(key) == (None if want is None else (want[0], len(want[1].stem)))
    found = set(matcher.candidates(batch))
    assert {k for k in batch if reference(patterns, k) is not None} <= found
    assert matcher.candidate_positions(batch) == [i for i, k in enumerate(batch) if k in found]


def test_a_hash_is_not_a_digit() -> None:
    """``#`` is what digits turn into in a fingerprint and a template: a key holding one
    must not be read off the entry a key with digits there filed."""
    patterns = compiled(CACHED)
    matcher = KeyMatcher(patterns)
    assert matcher.match("m.experts.1.w.x") is not None
    assert matcher.match("m.experts.#.w.x") is None
    assert matcher.match("m.layers.3.a.w1") == reference(patterns, "m.layers.3.a.w1")
    assert matcher.match("m.layers.#.a.w1") is None


def test_mixed_segments_keep_their_text() -> None:
    """``w1`` and ``w2`` share a fingerprint (``w#``) but not a template: ``k`` inside the
    segment is read from the template, so it must be the key's own."""
    patterns = compiled(("{pre*}.layers.{i:int}.{mid*}.w{k}",))
    matcher = KeyMatcher(patterns)
    assert matcher.cacheable
    for key in ["a.layers.0.b.w1", "a.layers.0.b.w2", "a.layers.5.b.w1", "a.layers.5.b.w2",
                "a.layers.5.b.w1.weight_scale_2", "a.layers.5.b.w2.weight_scale_2"]:
        assert matcher.match(key) == reference(patterns, key), key
    hit = matcher.match("a.layers.7.b.c.w2_weight_scale")
    assert hit is not None and hit[1].captures == {"pre": "a", "i": "7", "mid": "b.c", "k": "2"}
