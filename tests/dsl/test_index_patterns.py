"""Integer arithmetic inside patterns, as the parser reads it: bounds (``{e:int<N}``) and
expression captures (``{2*i+1}``, ``{e+config.n}``), their canonical text, the formatter and
outline round trips, ``expect ... with config.n = 4``, and an error with a column for each
malformed form."""

from __future__ import annotations

import re

import pytest

from convlens.dsl import ast
from convlens.dsl.formatter import format_conversion
from convlens.dsl.outline import outline
from convlens.dsl.parser import parse
from convlens.errors import RuleError


def _pattern(text: str) -> ast.Pattern:
    st = parse(f'conversion x\nrename "{text}" -> "z"').statements[0]
    assert isinstance(st, ast.Rename)
    return st.src.patterns[0]


def _capture(text: str) -> ast.Capture:
    caps = [c for c in _pattern(text).captures().values() if c.kind == "int"]
    assert len(caps) == 1
    return caps[0]


# pattern as written -> canonical text
CANONICAL = [
    ("layers.{2*i}.mixer", "layers.{2*i}.mixer"),
    ("layers.{2*i+1}.mixer", "layers.{2*i+1}.mixer"),
    ("a.{ 2 * i + 1 }.b", "a.{2*i+1}.b"),
    ("a.{(2*i)+1}", "a.{2*i+1}"),
    ("a.{2*(i+1)}", "a.{2*(i+1)}"),
    ("a.{i-1}", "a.{i-1}"),
    ("a.{i-(1-1)}", "a.{i-(1-1)}"),
    ("x.{e+config.text_config.moe_num_experts}.w",
     "x.{e+config.text_config.moe_num_experts}.w"),
    ("x.{e:int<config.n}", "x.{e:int<config.n}"),
    ("x.{e:int< config.a * 2 }", "x.{e:int<config.a*2}"),
    ("l_{2*n}", "l_{2*n}"),
]


@pytest.mark.parametrize(("written", "canonical"), CANONICAL)
def test_pattern_text_is_canonical(written: str, canonical: str) -> None:
    assert _pattern(written).text == canonical


def test_an_expression_capture_is_an_int_capture_of_its_one_name() -> None:
    cap = _capture("layers.{2*i+1}.mixer")
    assert (cap.name, cap.kind, cap.bound) == ("i", "int", None)
    assert cap.expr == ast.BinOp("+", ast.BinOp("*", ast.Int(2), ast.Ref(("i",))), ast.Int(1))
    bounded = _capture("x.{e:int<config.n}")
    assert (bounded.name, bounded.kind, bounded.expr) == ("e", "int", None)
    assert bounded.bound == ast.Ref(("config", "n"))


FILE = '''
conversion arith
  for model_type demo
rename "{p*}.layers.{2*i}.mixer" -> "{p*}.layers.{i:int}.self_attn"
rename "{p*}.layers.{2*i+1}.mixer" -> "{p*}.layers.{i:int}.mlp"
rename "q.{ i - 1 }" -> "r.{i:int}"
fuse "{p*}.experts.{e:int<config.text_config.moe_num_experts}.w1",
     "{p*}.experts.{e:int}.w3"
  -> "{p*}.text.gate_up" naming param
  by stack(e, 0), concat(1)
fuse "{p*}.experts.{e+config.text_config.moe_num_experts}.w1",
     "{p*}.experts.{e+config.text_config.moe_num_experts}.w3"
  -> "{p*}.vision.gate_up" naming param
  by stack(e, 0), concat(1)
expect "m.experts.5.w1.weight" -> "m.vision.gate_up" with config.text_config.moe_num_experts = 4
expect "m.layers.3.mixer.w" -> "m.layers.1.mlp.w"
'''


def test_format_then_parse_gives_the_same_ast_and_is_idempotent() -> None:
    conv = parse(FILE)
    text = format_conversion(conv)
    assert parse(text) == conv
    assert format_conversion(parse(text)) == text
    assert '"q.{i-1}"' in text  # spaces go, the meaning stays
    assert "    with config.text_config.moe_num_experts = 4" in text


def test_the_outline_shows_canonical_patterns_and_the_expect_config() -> None:
    conv = parse(FILE)
    dump = outline(conv)
    assert "Pattern text='{p*}.layers.{2*i+1}.mixer'" in dump
    assert "text='{p*}.experts.{e+config.text_config.moe_num_experts}.w1'" in dump
    assert "given=(((\'config\', \'text_config\', \'moe_num_experts\'), 4),)" in dump
    again = outline(parse(format_conversion(conv)))
    assert re.sub(r"  @\d+:\d+", "", again) == re.sub(r"  @\d+:\d+", "", dump)  # places move


def test_expect_with_gives_config_values() -> None:
    conv = parse('conversion x\nexpect "a" -> "b" with config.a.b = 2, config.c = 0')
    exp = conv.statements[0]
    assert isinstance(exp, ast.Expect)
    assert exp.given == ((("config", "a", "b"), 2), (("config", "c"), 0))


# (pattern, message, column in the file: the rule text starts at column 1, its pattern string
# at column 8 with the quote)
ERRORS = [
    ('"x.{i+j}"', "an expression capture names one capture, this one names i and j", 11),
    ('"x.{i*i}"', "i times i cannot be solved for i", 11),
    ('"x.{i//2}"', "'//' on the capture i cannot be undone (a segment would have several "
                   "solutions)", 11),
    ('"x.{10-i}"', "in {10-i} the capture i has coefficient -1: matching could not solve for it",
     11),
    ('"x.{i-i}"', "in {i-i} the capture i has coefficient 0: matching could not solve for it", 11),
    ('"x.{i*config.n}"', "the capture i is multiplied by a config field: its coefficient must be "
                         "a number, so that the pattern can be matched without the config", 11),
    ('"x.{1+2}"', "{1+2} names no capture: an expression capture computes a segment from one "
                  "capture", 11),
    ('"x.{(i)}"', "{(i)} is not an expression of a capture", 11),
    ('"x.{i+}"', "the capture expression ends early", 13),
    ('"x.{i+#}"', "unexpected '#' in the capture expression", 14),
    ('"x.{i+(1}"', "'(' without a closing ')' in the capture expression", 14),
    ('"x.{a.b+1}"', "'a.b' is neither a capture name nor config.<field>", 12),
    ('"x.{config+1}"', "config needs a field: config.<field>", 12),
    ('"x.{i+99999999999999999999}"', "number 99999999999999999999 is too large (the limit is "
                                     "2**63 - 1)", 14),
    ('"x.{e:int<}"', "empty expression in a capture", 17),
    ('"x.{e:int<j}"', "a bound is a number or a config.<field> expression, not 'j'", 18),
    ('"x.{e:int<config.n+}"', "the capture expression ends early", 26),
    ('"x.{e:in<3}"', "unknown capture type 'in' in {e:in<3}", 11),
    ('"x.{2*i:int}"', "bad capture name '2*i' in {2*i:int}", 11),
    ('"x.{i+1"', "'{' without a closing '}'", 11),
    ('"x.{i+{j}}"', "'{' without a closing '}'", 11),
    ('"{a}{2*i}.x"', "ambiguous pattern: captures {a} and {i} touch inside one segment", 12),
    ('"{2*i}.{i+1}"', "capture {i} appears twice in one pattern", 15),
    ('"x.{i+' + "(" * 101 + "1" + ")" * 101 + '}"',
     "expression nested too deeply (more than 100 parentheses)", 114),
    ('"x.{i' + "+1" * 101 + '}"',
     "expression nested too deeply (more than 100 operators deep, counting each + - * / of a "
     "chain)", 12),
]


@pytest.mark.parametrize(("pattern", "message", "column"), ERRORS)
def test_malformed_integer_captures_are_errors_at_their_place(pattern: str, message: str,
                                                             column: int) -> None:
    with pytest.raises(RuleError) as info:
        parse(f'conversion x\nrename {pattern} -> "z"', "p.conv")
    assert info.value.message == message
    assert info.value.span is not None
    assert (info.value.span.line, info.value.span.column) == (2, column)
    assert str(info.value).startswith(f"p.conv:2:{column}: ")


EXPECT_ERRORS = [
    ('expect "a" -> "b" with n = 4',
     "'n': an expect sets config fields, like config.num_experts = 4", 24),
    ('expect "a" -> "b" with config.n = 4, config.n = 5', "config.n is given twice", 38),
]


@pytest.mark.parametrize(("text", "message", "column"), EXPECT_ERRORS)
def test_bad_expect_settings_are_errors_at_their_place(text: str, message: str,
                                                       column: int) -> None:
    with pytest.raises(RuleError) as info:
        parse(f"conversion x\n{text}", "e.conv")
    assert info.value.message == message
    assert info.value.span is not None
    assert (info.value.span.line, info.value.span.column) == (2, column)
