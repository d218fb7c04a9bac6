"""Syntax and pattern errors: friendly messages from the table, file:line:col and a caret."""

from __future__ import annotations

import pytest

from convlens.dsl.parser import SYNTAX_EXAMPLES, parse
from convlens.errors import ConvlensError, RuleError, RuleSyntaxError

TABLE = [(label, example) for label, examples in SYNTAX_EXAMPLES.items() for example in examples]


@pytest.mark.parametrize(("label", "example"), TABLE)
def test_each_common_mistake_gets_its_friendly_message(label: str, example: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse(example, "bad.conv")
    assert info.value.message == label
    assert str(info.value).startswith("bad.conv:")


def test_syntax_error_renders_path_line_column_source_and_caret() -> None:
    text = 'conversion x\nfuse "a", "b" -> "c" by concat 1\n'
    with pytest.raises(RuleSyntaxError) as info:
        parse(text, "rules/x.conv")
    assert str(info.value).splitlines() == [
        "rules/x.conv:2:32: an op is a name with its arguments in parentheses: concat(1)",
        '    fuse "a", "b" -> "c" by concat 1',
        "    " + " " * 31 + "^",
        "  hint: unexpected '1'; expected one of: '('",
    ]


def test_unknown_character_is_reported_where_it_is() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse('conversion x\nrename "a" -> "b" $', "f.conv")
    err = info.value
    assert (err.span.line, err.span.column) == (2, 19)  # type: ignore[union-attr]
    assert "'$'" in str(err)


def test_unterminated_string_is_an_error_not_a_hang() -> None:
    with pytest.raises(RuleSyntaxError):
        parse('conversion x\nrename "a -> "b"\n', "f.conv")


PATTERN_ERRORS = [
    ('"a..b"', "empty segment in pattern 'a..b' (two dots, or a dot at an end)", 11),
    ('"a.{b"', "'{' without a closing '}'", 11),
    ('"a.b}"', "'}' without an opening '{'", 12),
    ('"{x:float}.a"', "unknown capture type 'float' in {x:float}", 9),
    ('"{1x}.a"', "bad capture name '1x' in {1x}", 9),
    ('"{a}{b}.c"', "ambiguous pattern: captures {a} and {b} touch inside one segment", 12),
    ('"{a*}.{b*}.c"', "ambiguous pattern: two multi-segment captures side by side", 14),
    ('"x{a*}.c"', "{a*} matches whole segments and must stand alone between dots", 10),
    ('"{a}.{a}"', "capture {a} appears twice in one pattern", 13),
    ('"a b"', "character not allowed in a key: 'a b'", 9),
    ('""', "empty pattern", 9),
]


@pytest.mark.parametrize(("pattern", "message", "column"), PATTERN_ERRORS)
def test_pattern_errors_name_the_place_inside_the_string(pattern: str, message: str,
                                                         column: int) -> None:
    with pytest.raises(RuleError) as info:
        parse(f"conversion x\nrename {pattern} -> \"z\"", "p.conv")
    assert info.value.message == message
    assert info.value.span is not None
    assert (info.value.span.line, info.value.span.column) == (2, column)


def test_non_utf8_rule_file_is_a_convlens_error(tmp_path: object) -> None:
    from pathlib import Path

    from convlens.dsl.parser import parse_file

    path = Path(str(tmp_path)) / "bad.conv"
    path.write_bytes(b"conversion x\nrename \"\xff\" -> \"b\"\n")
    with pytest.raises(ConvlensError) as info:
        parse_file(path)
    assert "not UTF-8" in str(info.value)
