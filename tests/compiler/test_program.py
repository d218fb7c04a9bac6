"""Static checks of the compiler: each bad rule with its exact message, all errors of a file
reported together, and the derived inverse."""

from __future__ import annotations

import pytest

from convlens import compile_text
from convlens.errors import ConvlensError, ErrorGroup, RuleError

HEAD = "conversion t\n"

# (rule text, exact message of the first error, line)
SEMANTIC_ERRORS = [
    ('fuse "a.{e:int}" -> "b" by stak(e, 0)', "unknown op 'stak'", 2),
    ('fuse "a.{e:int}" -> "b" by stack(0)',
     "stack: the first argument is a capture name, like stack(e, 0)", 2),
    ('fuse "a.{e:int}" -> "b" by stack(e, 0, 1)',
     "stack takes at most 2 positional argument(s) (capture, dim)", 2),
    ('fuse "a", "b" -> "c" by concat(0, size=[1, 2])', "concat has no argument 'size'", 2),
    ('fuse "a", "b" -> "c" by concat(0, sizes=[1, 2, 3])', "concat: 3 sizes for 2 parts", 2),
    ('fuse "a", "b" -> "c" by concat(0, sizes=[rows, 2])',
     "'rows': sizes are numbers or config.<field> expressions", 2),
    ('rename "a.{x}" -> "b"',
     "both sides of a rename must bind the same captures: left binds {x}, right binds nothing", 2),
    ('rename "a.{x}" -> "b.{x*}"',
     "capture {x} is {x} (one segment) on the left but {x*} (segments) on the right; the rule "
     "would not be a bijection", 2),
    ('fuse "a.{e}" -> "b" by stack(e, 0)',
     "capture {e} appears only on the left, so it must be stacked, and stacking needs an integer "
     "capture: write {e:int}", 2),
    ('fuse "a.{e:int}", "b.{e:int}" -> "c" by concat(0)',
     "concat: parts are still families over {e}; stack them first", 2),
    ('split "a" -> "b", "c" by split(0, parts=3)',
     "the ops leave 3 part(s) but the rule names 2 target pattern(s)", 2),
    ('split "a" -> "b.{e:int}" by split(0)', "'b.{e:int}': {e} is not made by any unstack", 2),
    ('fuse "a", "b" -> "c" by concat(0) on [0]',
     "'on [...]' applies to per-tensor ops; concat combines or splits parts", 2),
    ('rename "a" naming modul -> "b"', "unknown naming 'modul'", 2),
    ('rename "a.{x}" -> "b.{x}" unless y in ("q")',
     "guard on {y}, which this rule does not capture", 2),
    ('drop "a.{x}" restore from "b"',
     "drop ... restore from: both patterns must bind the same captures ({x} vs nothing), or the "
     "inverse could not tell what to restore", 2),
    ('fuse "a.{x}", "b.{y}" -> "c.{x}" by concat(0)',
     "patterns of one side must bind the same captures: 'b.{y}' binds {y}, 'a.{x}' binds {x}", 2),
    ('fuse "a.{x}.w", "a.{y}.w" -> "c" by concat(0)',
     "patterns 'a.{x}.w' and 'a.{y}.w' can match the same key, so a tensor could belong to either "
     "part", 2),
    ('map "a" -> "b", "c" by transpose(0, 1)',
     "map makes one tensor, got 2 targets", 2),
    ('fuse "a.{x}_{y}" -> "b.{x}_{y}" by concat(0)',
     "ambiguous pattern 'a.{x}_{y}': {x} and {y} in one segment can split it in more than one way",
     2),
    ('rename "w{n:int}9" -> "v{n:int}"',
     "ambiguous pattern 'w{n:int}9': digits next to {n:int}", 2),
    ('include nowhere', "include 'nowhere': no such conversion", 2),
]


@pytest.mark.parametrize(("rule", "message", "line"), SEMANTIC_ERRORS)
def test_semantic_error_has_exact_message_and_span(rule: str, message: str, line: int) -> None:
    with pytest.raises(ConvlensError) as info:
        compile_text(HEAD + rule, "t.conv")
    err = info.value.errors[0] if isinstance(info.value, ErrorGroup) else info.value
    assert isinstance(err, RuleError)
    assert err.message == message
    assert err.span is not None and err.span.path == "t.conv" and err.span.line == line


def test_unknown_op_suggests_the_closest_name() -> None:
    with pytest.raises(RuleError) as info:
        compile_text(HEAD + 'fuse "a.{e:int}" -> "b" by stak(e, 0)', "t.conv")
    assert info.value.hint == "did you mean 'stack'?"
    assert "hint: did you mean 'stack'?" in str(info.value)


def test_all_errors_of_a_file_are_reported_together() -> None:
    text = HEAD + "\n".join([
        'fuse "a.{e:int}" -> "b" by stak(e, 0)',
        'rename "x.{y}" -> "z"',
        'split "a" -> "b", "c" by split(0, parts=3)',
    ])
    with pytest.raises(ErrorGroup) as info:
        compile_text(text, "t.conv")
    lines = [e.span.line for e in info.value.errors]  # type: ignore[union-attr]
    assert lines == [2, 3, 4]
    rendered = str(info.value)
    assert "t.conv:2:" in rendered and "t.conv:3:" in rendered and "t.conv:4:" in rendered


def test_rules_whose_result_depends_on_their_order_are_reported() -> None:
    text = HEAD + 'rename "{p*}.gate" -> "{p*}.router"\nrename "model.{l*}.gate" -> "x.{l*}"'
    with pytest.raises(RuleError) as info:
        compile_text(text, "t.conv")
    assert info.value.message == (
        "'model.{l*}.gate' (line 3) matches stems that the earlier rule at line 2 ('{p*}.gate') "
        "already converts; the result depends on the order of the two rules")


def test_a_chain_of_rules_is_not_an_order_error() -> None:
    # mixtral: the rename feeds the fuse on purpose
    compile_text(HEAD + 'rename "{p*}.moe" -> "{p*}.mlp"\n'
                 'fuse "{p*}.mlp.experts.{e:int}.w1" -> "{p*}.mlp.w" naming param by stack(e, 0)')


def test_inverse_is_the_reversed_list_of_inverted_rules() -> None:
    program = compile_text(HEAD + "\n".join([
        'rename "{p*}.block_sparse_moe" -> "{p*}.mlp"',
        'fuse "{p*}.mlp.experts.{e:int}.w1", "{p*}.mlp.experts.{e:int}.w3" -> '
        '"{p*}.mlp.experts.gate_up_proj" naming param by stack(e, 0), concat(1)',
        'map "{p*}.q" -> "{p*}.q_proj" by rope_permute(heads=config.h), transpose(0, 1)',
    ]), "t.conv")
    inverse = program.inverse()
    assert [r.describe() for r in inverse.rules] == [
        'map "{p*}.q_proj" -> "{p*}.q" by transpose(0, 1), rope_unpermute(heads=config.h)',
        'split "{p*}.mlp.experts.gate_up_proj" naming param -> "{p*}.mlp.experts.{e:int}.w1", '
        '"{p*}.mlp.experts.{e:int}.w3" by split(1, parts=2), unstack(e, 0)',
        'rename "{p*}.mlp" -> "{p*}.block_sparse_moe"',
    ]
    assert [r.derived for r in inverse.rules] == [True, True, True]
    assert inverse.inverse().rules == program.rules


def test_split_without_parts_divides_into_as_many_parts_as_targets() -> None:
    program = compile_text(HEAD + 'split "a" -> "q", "k", "v" by split(0)')
    assert program.rules[0].ops[0].describe() == "split(0, parts=3)"
