"""Integer arithmetic in patterns: matching solves, rendering computes, inverses swap sides.

``{2*i+1}`` matches an integer segment ``j`` when ``j = 2*i + 1`` has a solution ``i >= 0`` in the
capture's range; ``{e:int<N}`` matches integers below ``N``; ``{e+config.n}`` reads the config. The
static checks (overlaps, order, streams), the generated samples of ``convlens check``, stacking
(indices ``0..E-1`` of the solved capture) and the name traces all work with the solved values.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from convlens.api import Conversion, compile_text
from convlens.checking import check_program
from convlens.compiler.patterns import CompiledPattern, KeyMatcher, stems_overlap
from convlens.compiler.program import Program
from convlens.compiler.samples import sample_program
from convlens.compiler.trace import trace_key
from convlens.dsl.patterns import parse_pattern
from convlens.errors import ConversionError, ConvlensError, ErrorGroup, RuleError, Span

SPAN = Span("t.conv", 1, 1)


def pattern(text: str, config: dict[tuple[str, ...], int] | None = None) -> CompiledPattern:
    cp = CompiledPattern(parse_pattern(text, SPAN))
    return cp.resolve(config) if config else cp


def errors_of(text: str) -> list[str]:
    try:
        compile_text(text, "r.conv")
    except ErrorGroup as group:
        return [e.message for e in group.errors]
    except ConvlensError as exc:
        return [exc.message]
    return []


# --- matching and rendering -------------------------------------------------------------------

# (pattern, key, captures the key solves to, or None if it has no solution)
MATCHES = [
    ("{p*}.layers.{2*i}.mixer", "m.layers.4.mixer.q.weight", {"p": "m", "i": "2"}),
    ("{p*}.layers.{2*i}.mixer", "m.layers.5.mixer.q.weight", None),  # odd
    ("{p*}.layers.{2*i+1}.mixer", "m.layers.5.mixer", {"p": "m", "i": "2"}),
    ("{p*}.layers.{2*i+1}.mixer", "m.layers.0.mixer", None),
    ("layers.{i+1}.q", "layers.0.q", None),  # i would be -1
    ("layers.{i+1}.q", "layers.1.q", {"i": "0"}),
    ("layers.{i-1}.q", "layers.0.q", {"i": "1"}),  # the range starts at 1
    ("x.{3*k+2}", "x.14", {"k": "4"}),
    ("x.{3*k+2}", "x.13", None),
    ("x.{e:int<4}", "x.3", {"e": "3"}),
    ("x.{e:int<4}", "x.4", None),
    ("x.{2*(e+1)}", "x.2", {"e": "0"}),
    ("x.{2*(e+1)}", "x.0", None),
    ("l_{2*n}.w", "l_6.w", {"n": "3"}),
    ("l_{2*n}.w", "l_06.w", None),  # ints are canonical
    # the shortest stem whose captures solve (the first 'layers.3' does not)
    ("{p*}.layers.{2*i}.mixer", "layers.3.mixer.layers.4.mixer.w",
     {"p": "layers.3.mixer", "i": "2"}),
    ("{a*}.x.{b*}.y_{2*i}", "q.x.r.y_3.x.s.y_4.w", {"a": "q", "b": "r.y_3.x.s", "i": "2"}),
]


@pytest.mark.parametrize(("text", "key", "captures"), MATCHES)
def test_matching_solves_for_the_capture_and_refuses_non_solutions(
        text: str, key: str, captures: dict[str, str] | None) -> None:
    m = pattern(text).match(key)
    assert (None if m is None else m.captures) == captures
    if m is not None:  # rendering the captures gives the stem back
        assert pattern(text).format(m.captures) == m.stem


def test_config_offsets_and_bounds_need_the_config_values() -> None:
    text = pattern("experts.{e:int<config.n}.w", {("config", "n"): 4})
    vision = pattern("experts.{e+config.n}.w", {("config", "n"): 4})
    assert [text.match(f"experts.{j}.w") is not None for j in range(8)] == [True] * 4 + [False] * 4
    assert [vision.match(f"experts.{j}.w") for j in (3, 4, 7)][1:] == [
        vision.match("experts.4.w"), vision.match("experts.7.w")]
    assert vision.match("experts.3.w") is None
    assert vision.match("experts.7.w").captures == {"e": "3"}  # type: ignore[union-attr]
    assert vision.format({"e": "0"}) == "experts.4.w"
    unresolved = pattern("experts.{e+config.n}.w")
    assert unresolved.match("other.3.w") is None  # no structural match: no config needed
    with pytest.raises(ConversionError, match=r"reads config\.n: it needs the model's config"):
        unresolved.match("experts.3.w")


def test_rendering_a_value_out_of_range_is_an_error_naming_the_pattern() -> None:
    with pytest.raises(ConversionError) as info:
        pattern("x.{e:int<2}.w").format({"e": "2"})
    assert info.value.message == ("e=2 is outside the range of {e} in 'x.{e:int<2}.w' "
                                  "(0 <= e < 2), so no key of this pattern can hold it")


@given(a=st.integers(1, 7), b=st.integers(-20, 20), i=st.integers(0, 10_000),
       j=st.integers(0, 10_000))
def test_render_then_match_is_the_identity_and_non_solutions_are_refused(
        a: int, b: int, i: int, j: int) -> None:
    """For ``{a*i+b}``: every i of the range renders to a segment that matches back to i; a
    segment matches exactly when j = a*i + b has a solution i >= lo, where lo is the least i with
    a*i + b >= 0."""
    offset = f"+{b}" if b >= 0 else f"-{-b}"
    cp = pattern(f"m.{{{a}*i{offset}}}.w")
    lo = max(0, -(b // a))
    i += lo
    stem = cp.format({"i": str(i)})
    assert stem == f"m.{a * i + b}.w"
    m = cp.match(stem + ".weight")
    assert m is not None and m.captures == {"i": str(i)} and m.tail == ".weight"
    solves = (j - b) % a == 0 and (j - b) // a >= lo
    found = cp.match(f"m.{j}.w")
    assert (found is not None) == solves
    if found is not None:
        assert cp.format(found.captures) == f"m.{j}.w"


def test_a_matcher_of_arithmetic_patterns_learns_nothing_per_key_template() -> None:
    """Keys of one template (``a.#.w``) go to different patterns by their digits."""
    matcher = KeyMatcher((pattern("a.{2*i}.w"), pattern("a.{2*i+1}.v"), pattern("a.{2*i+1}.w")))
    got = [matcher.match(f"a.{j}.w") for j in range(4)]
    assert [(h[0], h[1].captures) for h in got if h is not None] == [
        (0, {"i": "0"}), (2, {"i": "0"}), (0, {"i": "1"}), (2, {"i": "1"})]


# --- the static checks ------------------------------------------------------------------------

OVERLAPS = [
    ("{p*}.layers.{2*i}.mixer", "{p*}.layers.{2*i+1}.mixer", False),
    ("{p*}.layers.{2*i}.mixer", "{p*}.layers.{i:int}.mixer", True),
    ("{p*}.layers.{2*i}.mixer", "{p*}.layers.3.mixer", False),
    ("{p*}.layers.{2*i}.mixer", "{p*}.layers.4.mixer", True),
    ("x.{e:int<config.n}", "x.{e+config.n}", False),
    ("x.{e:int<config.n}", "x.{e+config.n-1}", True),
    ("x.{e:int<3}", "x.{e+3}", False),
    ("x.{e:int<4}", "x.{e+3}", True),
    ("x.{3*i+1}", "x.{6*j+4}", True),
    ("x.{3*i+1}", "x.{6*j+5}", False),
    ("x.{2*i+config.n}", "x.{2*j+config.n+1}", False),
    ("x.{2*i+config.n}", "x.{2*j+2*config.n+1}", True),  # n odd: they meet
    ("x_{2*i}", "x_{2*i+1}", False),
    ("x_{2*i}", "y_{2*i}", False),
]


@pytest.mark.parametrize(("a", "b", "meet"), OVERLAPS)
def test_integer_segments_overlap_unless_provably_apart(a: str, b: str, meet: bool) -> None:
    assert stems_overlap(pattern(a), pattern(b)) is meet
    assert stems_overlap(pattern(b), pattern(a)) is meet


DORY = '''conversion dory_demo
rename "{p*}.layers.{2*i}.mixer" -> "{p*}.layers.{i:int}.self_attn"
rename "{p*}.layers.{2*i+1}.mixer" -> "{p*}.layers.{i:int}.mlp"
rename "{p*}.layers.{2*i}.attn_alpha" -> "{p*}.layers.{i:int}.lambda_1"
rename "{p*}.layers.{2*i+1}.mlp_alpha" -> "{p*}.layers.{i:int}.lambda_2"
expect "m.layers.5.mixer.up.weight" -> "m.layers.2.mlp.up.weight"
expect "m.layers.4.mixer.q.weight" -> "m.layers.2.self_attn.q.weight"
'''

N = "config.text_config.moe_num_experts"
ERNIE = f'''conversion ernie_demo
fuse "{{p*}}.experts.{{e:int<{N}}}.gate_proj", "{{p*}}.experts.{{e:int}}.up_proj"
  -> "{{p*}}.text_moe.experts.gate_up_proj" naming param
  by stack(e, 0), concat(1)
fuse "{{p*}}.experts.{{e+{N}}}.gate_proj", "{{p*}}.experts.{{e+{N}}}.up_proj"
  -> "{{p*}}.vision_moe.experts.gate_up_proj" naming param
  by stack(e, 0), concat(1)
fuse "{{p*}}.experts.{{e:int<{N}}}.down_proj" -> "{{p*}}.text_moe.experts.down_proj" naming param
  by stack(e, 0)
fuse "{{p*}}.experts.{{e+{N}}}.down_proj" -> "{{p*}}.vision_moe.experts.down_proj" naming param
  by stack(e, 0)
expect "m.experts.1.up_proj.weight" -> "m.text_moe.experts.gate_up_proj"
  with {N} = 2
expect "m.experts.2.up_proj.weight" -> "m.vision_moe.experts.gate_up_proj"
  with {N} = 2
'''


def test_parity_and_range_split_rules_are_not_reported_as_overlapping() -> None:
    assert errors_of(DORY) == []
    assert errors_of(ERNIE) == []


def test_overlapping_integer_rules_are_still_reported() -> None:
    text = ('conversion x\nrename "a.{2*i}.w" -> "b.{i:int}.w"\n'
            'rename "a.{i:int}.w" -> "c.{i:int}.w"\n')
    assert errors_of(text) == [
        "'a.{i:int}.w' (line 3) matches stems that the earlier rule at line 2 ('a.{2*i}.w') "
        "already converts; the result depends on the order of the two rules"]
    same_side = ('conversion x\nfuse "a.{e:int}.w", "a.{e+1}.w" -> "b.w" naming param\n'
                 '  by stack(e, 0), concat(1)\n')
    assert errors_of(same_side) == [
        "patterns 'a.{e:int}.w' and 'a.{e+1}.w' can match the same key, so a tensor could "
        "belong to either part"]


def test_a_bound_is_written_once_or_alike() -> None:
    assert errors_of('conversion x\nrename "a.{e:int<4}" -> "b.{e:int<4}"\n') == []
    assert errors_of('conversion x\nrename "a.{e:int<4}" -> "b.{e:int<5}"\n') == [
        "{e} has two bounds: <4 in 'a.{e:int<4}' and <5 in 'b.{e:int<5}'"]


def test_kinds_must_agree_on_both_sides() -> None:
    assert errors_of('conversion x\nrename "a.{i+1}" -> "b.{i}"\n') == [
        "capture {i} is {x:int} on the left but {x} (one segment) on the right; the rule would "
        "not be a bijection"]


# --- conversions: both directions, the config, stacking ------------------------------------------


def test_a_shifted_index_converts_both_ways_bit_exactly() -> None:
    conv = Conversion(compile_text(
        'conversion x\nrename "{p*}.attn_queries.{i:int}" -> "{p*}.layers.{i+1}.query"\n'))
    sd = {f"m.attn_queries.{i}": torch.arange(3.0) + i for i in range(3)}
    sd["m.layers.0.query"] = torch.zeros(1)  # the inverse's pattern, with i = -1: left alone
    out = conv.apply({k: v for k, v in sd.items() if "attn_queries" in k})
    assert sorted(out) == ["m.layers.1.query", "m.layers.2.query", "m.layers.3.query"]
    assert torch.equal(out["m.layers.3.query"], sd["m.attn_queries.2"])
    back = conv.revert(out)
    assert sorted(back) == [f"m.attn_queries.{i}" for i in range(3)]
    mixed = conv.revert({**out, "m.layers.0.query": sd["m.layers.0.query"]})
    assert "m.layers.0.query" in mixed


def test_layer_pairs_collapse_and_come_back() -> None:
    conv = Conversion(compile_text(DORY))
    sd = {f"m.layers.{n}.mixer.w.weight": torch.full((2,), float(n)) for n in range(6)}
    sd.update({"m.layers.0.attn_alpha": torch.zeros(2), "m.layers.1.mlp_alpha": torch.ones(2)})
    out = conv.apply(sd)
    assert torch.equal(out["m.layers.2.mlp.w.weight"], sd["m.layers.5.mixer.w.weight"])
    assert torch.equal(out["m.layers.2.self_attn.w.weight"], sd["m.layers.4.mixer.w.weight"])
    assert sorted(k for k in out if "lambda" in k) == ["m.layers.0.lambda_1",
                                                     "m.layers.0.lambda_2"]
    back = conv.revert(out)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _experts(n_text: int, n_vision: int) -> dict[str, torch.Tensor]:
    sd = {}
    for e in range(n_text + n_vision):
        rows = 4 if e < n_text else 2  # text and vision experts of different sizes
        for w in ("gate_proj", "up_proj", "down_proj"):
            sd[f"m.l.1.experts.{e}.{w}.weight"] = torch.full((rows, 3), float(e))
    return sd


def test_text_and_vision_experts_are_two_fuses_over_one_list() -> None:
    conv = Conversion(compile_text(ERNIE))
    config = {"text_config": {"moe_num_experts": 2}}
    sd = _experts(2, 2)
    out = conv.apply(sd, config)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "m.l.1.text_moe.experts.gate_up_proj": (2, 8, 3),
        "m.l.1.text_moe.experts.down_proj": (2, 4, 3),
        "m.l.1.vision_moe.experts.gate_up_proj": (2, 4, 3),
        "m.l.1.vision_moe.experts.down_proj": (2, 2, 3)}
    # the solved index places each expert: vision expert e is hub expert 2 + e
    assert out["m.l.1.vision_moe.experts.down_proj"][:, 0, 0].tolist() == [2.0, 3.0]
    back = conv.revert(out, config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_a_missing_config_field_is_an_error_naming_the_rule_and_the_field() -> None:
    conv = Conversion(compile_text(ERNIE, "ernie.conv"))
    with pytest.raises(ConversionError) as info:
        conv.apply(_experts(2, 2), {"text_config": {}})
    assert info.value.rule == "ernie.conv:2 fuse"
    assert info.value.message.startswith(
        "config has no field 'config.text_config.moe_num_experts' (config.text_config has no "
        "'moe_num_experts'); the rule reads config.text_config.moe_num_experts in")
    with pytest.raises(ConversionError, match=r"is -1; .* needs a non-negative integer"):
        conv.apply(_experts(2, 2), {"text_config": {"moe_num_experts": -1}})


def test_stacking_needs_indices_0_to_e_minus_1_of_the_solved_capture() -> None:
    conv = Conversion(compile_text(ERNIE))
    sd = _experts(2, 2)
    del sd["m.l.1.experts.2.gate_proj.weight"]  # vision expert e=0
    with pytest.raises(ConversionError, match=r"has e = 1 but not 0; indices must be exactly "
                                              r"0\.\.1"):
        conv.apply(sd, {"text_config": {"moe_num_experts": 2}})


def test_unstacking_past_the_bound_is_an_error() -> None:
    conv = Conversion(compile_text(ERNIE))
    out = conv.apply(_experts(2, 2), {"text_config": {"moe_num_experts": 2}})
    with pytest.raises(ConversionError, match=r"e=1 is outside the range of \{e\}"):
        conv.revert(out, {"text_config": {"moe_num_experts": 1}})


def test_resolved_programs_are_memoized_per_config_value() -> None:
    program = compile_text(ERNIE)
    a = program.resolve({"text_config": {"moe_num_experts": 2}})
    assert program.resolve({"text_config": {"moe_num_experts": 2}, "other": 1}) is a
    assert program.resolve({"text_config": {"moe_num_experts": 3}}) is not a
    plain = compile_text('conversion x\nrename "a" -> "b"\n')
    assert plain.resolve(None) is plain


# --- convlens check: samples, expects, traces ----------------------------------------------------


@pytest.mark.parametrize("text", [DORY, ERNIE], ids=["dory", "ernie"])
def test_convlens_check_passes_with_generated_samples(text: str) -> None:
    report = check_program(compile_text(text, "demo.conv"), range(4))
    assert report.ok, [str(e) for e in report.errors]
    assert report.expects == 2 and report.seeds == 4


def test_generated_keys_satisfy_the_ranges() -> None:
    program = compile_text(ERNIE + 'rename "r.{i-1}.x" -> "s.{i:int<5}.x"\n')
    for seed in range(6):
        samples, config = sample_program(program, seed)
        n = config["text_config"]["moe_num_experts"]
        for k, sample in enumerate(samples[:4]):  # text rules (0, 2): experts below n
            for key in sample.metas:
                e = int(key.split(".experts.")[1].split(".")[0])
                assert (e < n) is (k % 2 == 0), (key, n)
        for key in samples[4].metas:  # r.{i-1}: 1 <= i < 5, so the segment is 0..3
            assert key.startswith("r.") and 0 <= int(key.split(".")[1]) <= 3, key


def test_expects_and_traces_take_the_config() -> None:
    program = compile_text(ERNIE)
    assert trace_key(program, "m.experts.3.up_proj.weight",
                     {"text_config": {"moe_num_experts": 2}}).results == (
        "m.vision_moe.experts.gate_up_proj",)
    assert trace_key(program, "m.experts.3.up_proj.weight",
                     {"text_config": {"moe_num_experts": 4}}).results == (
        "m.text_moe.experts.gate_up_proj",)
    blind = trace_key(program, "m.experts.3.up_proj.weight")
    assert blind.note == (
        "<string>:2 fuse: '{p*}.experts.{e:int}.up_proj' reads "
        "config.text_config.moe_num_experts: it needs the model's config (an expect gives it: "
        "with config.text_config.moe_num_experts = N)")
    assert trace_key(program, "m.other.weight").results == ("m.other.weight",)  # no config needed
    wrong = ERNIE.replace("-> \"m.vision_moe.experts.gate_up_proj\"\n  with " + N + " = 2",
                          "-> \"m.vision_moe.experts.gate_up_proj\"\n  with " + N + " = 3")
    report = check_program(compile_text(wrong, "w.conv"), range(1))
    assert [e.message.split(" fails:")[0] for e in report.errors] == [
        "expect 'm.experts.2.up_proj.weight' -> 'm.vision_moe.experts.gate_up_proj'"]


def test_random_shift_programs_obey_the_laws() -> None:
    """A rename with random arithmetic on both sides, round trips on generated data."""
    rng = random.Random(7)
    for _ in range(12):
        a, b, c, d = rng.randint(1, 4), rng.randint(-3, 5), rng.randint(1, 4), rng.randint(0, 5)
        off = f"+{b}" if b >= 0 else f"-{-b}"
        text = (f'conversion r\nrename "{{p*}}.x.{{{a}*i{off}}}.w" -> '
                f'"{{p*}}.y.{{{c}*i+{d}}}.w"\n')
        program = compile_text(text)
        report = check_program(program, range(2))
        assert report.ok, (text, [str(e) for e in report.errors])


def test_programs_keep_their_rules_unresolved_until_planned() -> None:
    program: Program = compile_text(ERNIE)
    assert all(p.forms is None for r in program.rules for p in r.src.patterns)
    resolved = program.resolve({"text_config": {"moe_num_experts": 3}})
    forms: dict[str, Any] = resolved.rules[1].src.patterns[0].forms or {}
    assert (forms["e"].offset, forms["e"].hi) == (3, None)
    assert resolved.rules[0].src.patterns[1].forms["e"].hi == 3  # type: ignore[index]


def test_bad_integer_captures_are_rule_errors() -> None:
    with pytest.raises(RuleError, match="coefficient -1"):
        compile_text('conversion x\nrename "a.{1-i}" -> "b.{i:int}"\n')


def test_explain_takes_the_config(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from convlens.cli import main

    rules = Path(str(tmp_path)) / "ernie.conv"
    rules.write_text(ERNIE)
    (Path(str(tmp_path)) / "config.json").write_text('{"text_config": {"moe_num_experts": 2}}')
    assert main(["explain", "--rules", str(rules), "--config", str(tmp_path),
                 "m.experts.3.up_proj.weight"]) == 0
    out = capsys.readouterr().out
    assert "captures: e='1', p='m'; role: weight" in out
    assert "result: m.vision_moe.experts.gate_up_proj\n" in out
    assert main(["explain", "--rules", str(rules), "m.experts.3.up_proj.weight"]) == 0
    assert "it needs the model's config" in capsys.readouterr().out
