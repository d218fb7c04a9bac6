"""The parser's LALR tables are cached per grammar text in the user's cache folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from convlens.dsl import parser
from convlens.errors import RuleSyntaxError

TEXT = 'conversion x\nrename "a.{rest*}" -> "b.{rest*}"\n'


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A new cache folder and no parser in memory; the process' parser is restored after."""
    monkeypatch.setenv("CONVLENS_CACHE_DIR", str(tmp_path / "cache"))
    parser._lark.cache_clear()
    yield tmp_path / "cache"
    parser._lark.cache_clear()


def _parses() -> None:
    doc = parser.parse(TEXT, "x.conv")
    assert [type(s).__name__ for s in doc.statements] == ["Rename"]
    with pytest.raises(RuleSyntaxError) as err:  # positions survive the cache
        parser.parse('conversion x\nrename "a" ->\n', "bad.conv")
    assert "bad.conv:2:" in str(err.value)


def test_built_once_then_loaded(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _parses()
    files = list(fresh.iterdir())
    assert [f.name.startswith("conv-grammar-") for f in files] == [True]
    assert not [f for f in files if f.name.endswith(".tmp")]
    parser._lark.cache_clear()

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the grammar was built again although it is cached")

    monkeypatch.setattr(parser.Lark, "open_from_package", no_build)
    _parses()


def test_damaged_cache_is_rebuilt(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _parses()
    (cached,) = fresh.iterdir()
    good = cached.read_bytes()
    for damage in (b"not a pickle", good[: len(good) // 2], b""):
        cached.write_bytes(damage)
        parser._lark.cache_clear()
        _parses()
        with cached.open("rb") as f:  # replaced by whole tables
            parser.Lark.load(f)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the repaired cache was not used")

    monkeypatch.setattr(parser.Lark, "open_from_package", no_build)
    parser._lark.cache_clear()
    _parses()


def test_another_grammar_gets_another_file(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _parses()
    first = {f.name for f in fresh.iterdir()}
    text = parser.grammar_text()
    monkeypatch.setattr(parser, "grammar_text", lambda: text + "\n// changed\n")
    parser._lark.cache_clear()
    _parses()
    assert len({f.name for f in fresh.iterdir()} - first) == 1


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_off_keeps_nothing(value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVLENS_CACHE_DIR", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    parser._lark.cache_clear()
    try:
        _parses()
    finally:
        parser._lark.cache_clear()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_is_skipped(fresh: Path) -> None:
    fresh.parent.mkdir(exist_ok=True)
    fresh.write_text("a file where the folder should be")
    _parses()
    assert fresh.read_text() == "a file where the folder should be"
