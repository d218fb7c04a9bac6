"""What the parser keeps in the user's cache folder (convlens.cache): the grammar's LALR tables
and the ASTs of texts it parsed, each under a digest of everything it was made from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from convlens import cache
from convlens.dsl import parser
from convlens.errors import RuleSyntaxError

TEXT = 'conversion x\nrename "a.{rest*}" -> "b.{rest*}"\n'


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A new cache folder and no parser in memory; the process' parser is restored after."""
    monkeypatch.setenv("CONVLENS_CACHE_DIR", str(tmp_path / "cache"))
    parser._lark.cache_clear()
    parser._code_digest.cache_clear()
    yield tmp_path / "cache"
    parser._lark.cache_clear()
    parser._code_digest.cache_clear()


def _parses(text: str = TEXT) -> None:
    doc = parser.parse(text, "x.conv")
    assert [type(s).__name__ for s in doc.statements] == ["Rename"]
    assert doc.statements[0].span.line == 2
    with pytest.raises(RuleSyntaxError) as err:  # positions survive the cached tables
        parser.parse('conversion x\nrename "a" ->\n', "bad.conv")
    assert "bad.conv:2:" in str(err.value)


def _forbid(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran although its result is cached")

    monkeypatch.setattr(obj, name, fail)


def test_tables_built_once_then_loaded(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _parses()
    files = sorted(p.relative_to(fresh).parts[0] for p in fresh.rglob("*") if p.is_file())
    assert files == ["ast", "grammar"]  # the bad file's AST is not kept: only results are
    assert not [p for p in fresh.rglob("*.tmp")]
    parser._lark.cache_clear()
    _forbid(monkeypatch, parser.Lark, "open_from_package")
    _parses()


def test_a_text_parsed_before_is_not_parsed_again(fresh: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = parser.parse(TEXT, "x.conv")
    _forbid(monkeypatch, parser, "_parse_document")
    again = parser.parse(TEXT, "x.conv")
    assert again == first and again is not first
    with pytest.raises(AssertionError, match="_parse_document ran"):
        parser.parse(TEXT, "y.conv")  # messages name the file: another path is another entry


def test_changed_code_gets_new_entries(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _parses()
    before = {p.name for p in fresh.rglob("*")}
    monkeypatch.setattr(parser.sys, "version", "another Python")  # one of the digest's inputs
    parser._code_digest.cache_clear()
    parser._lark.cache_clear()
    _parses()
    after = {p.name for p in fresh.rglob("*")}
    assert len(after - before) == 2  # new tables, new AST


@pytest.mark.parametrize("kind", ["grammar", "ast"])
def test_damaged_files_are_rebuilt(kind: str, fresh: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _parses()
    (cached,) = (fresh / kind).iterdir()
    good = cached.read_bytes()
    for damage in (b"not a pickle", good[: len(good) // 2], b""):
        cached.write_bytes(damage)
        parser._lark.cache_clear()
        _parses()
        assert cached.read_bytes() != damage  # replaced by a whole file
    parser._lark.cache_clear()
    if kind == "grammar":
        _forbid(monkeypatch, parser, "build_lark")
        _parses()
    else:
        _forbid(monkeypatch, parser, "_parse_document")
        parser.parse(TEXT, "x.conv")


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
    assert cache.cache_dir() is None
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_is_skipped(fresh: Path) -> None:
    fresh.parent.mkdir(exist_ok=True)
    fresh.write_text("a file where the folder should be")
    _parses()
    assert fresh.read_text() == "a file where the folder should be"


def test_old_files_are_pruned(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "MAX_FILES", 4)
    for n in range(6):
        parser.parse(TEXT.replace("a.", f"a{n}."), "x.conv")
    left = list((fresh / "ast").iterdir())
    assert 2 <= len(left) <= 4


def test_concurrent_writers_leave_one_whole_file(fresh: Path) -> None:
    """Threads (and processes) write their own temporary files; the rename is atomic."""
    import threading

    texts = [TEXT.replace("a.", f"t{n}.") for n in range(4)]

    def parse_all() -> None:
        for text in texts:
            parser.parse(text, "x.conv")

    threads = [threading.Thread(target=parse_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted((fresh / "ast").iterdir())
    assert len(files) == len(texts) and not list(fresh.rglob("*.tmp"))
    for text in texts:  # each kept AST reads back as what a fresh parse gives
        assert parser.parse(text, "x.conv") == parser._parse_document(text, "x.conv")
