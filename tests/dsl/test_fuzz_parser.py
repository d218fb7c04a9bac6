"""Fuzzing the rule parser and compiler (issue 7).

Random text, random token soups, programs generated from the grammar itself, and mutations of
every shipped rule and scheme file (byte flips, deletions, duplications, truncations, non-UTF-8
bytes, deep nesting, very long identifiers) go through the whole front end: read the file,
parse, compile (rules: the program and its derived inverse; schemes: the scheme), and format
then re-parse what parsed. The only exceptions allowed are convlens errors, each with a place in
a file (path, line >= 1, column >= 1), and each input must be handled within ``BOUND`` CPU
seconds.

Example counts scale with the hypothesis profile (``ci`` by default, see tests/conftest.py), or
with ``CONVLENS_FUZZ_EXAMPLES`` for a long run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

from convlens.api import Conversion, _include_loader  # the loader load_rules uses
from convlens.compiler.program import compile_conversion
from convlens.compiler.schemes import compile_scheme
from convlens.dsl import ast
from convlens.dsl.formatter import format_conversion, format_scheme
from convlens.dsl.parser import build_lark, parse_document, read_text
from convlens.errors import ConvlensError, ErrorGroup

BOUND = 2.0  # CPU seconds per input, parse + compile + format (CPU: other processes may run)
PKG = Path(str(resources.files("convlens")))
SHIPPED = sorted((PKG / "rules").glob("*.conv")) + sorted((PKG / "schemes").glob("*.conv"))
SHIPPED_BYTES = [p.read_bytes() for p in SHIPPED]
SHIPPED_PATHS = {str(p) for p in SHIPPED} | {f"convlens/rules/{p.name}" for p in SHIPPED}

# 30 under the ci profile; CONVLENS_FUZZ_EXAMPLES=5000 (with HYPOTHESIS_PROFILE=dev) for a long run
BASE = int(os.environ.get("CONVLENS_FUZZ_EXAMPLES", settings.default.max_examples))


def scaled(factor: float) -> settings:
    return settings(max_examples=max(10, int(BASE * factor)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="convlens-fuzz-") as d:
        yield Path(d)


# --- the front end, and what its failures must look like -----------------------------------------


def front_end(path: Path, display: str) -> None:
    """Everything a rule or scheme file goes through before any tensor is seen."""
    doc = parse_document(read_text(path, display), display)
    if isinstance(doc, ast.Conversion):
        program = compile_conversion(doc, _include_loader(path.parent))
        Conversion(program)  # derives and checks the inverse
        again = parse_document(format_conversion(doc), display)
    else:
        compile_scheme(doc)
        again = parse_document(format_scheme(doc), display)
    assert again == doc, "parse(format(ast)) != ast"


def assert_located(err: ConvlensError, display: str, text: bytes) -> None:
    errors = err.errors if isinstance(err, ErrorGroup) else [err]
    assert errors, "an empty ErrorGroup"
    lines = text.count(b"\n") + 1
    for e in errors:
        assert e.span is not None, f"no location: {e!r}"
        assert e.span.path == display or e.span.path in SHIPPED_PATHS, e.span
        assert e.span.line >= 1 and e.span.column >= 1, f"no line/column: {e.span!r} {e!r}"
        if e.span.path == display:
            assert e.span.line <= lines, (e.span, lines)
        str(e)  # renders (caret and all) without failing


def check(workdir: Path, text: bytes, name: str = "fuzz.conv") -> None:
    """Run ``text`` through the front end: ok, or a located convlens error, within BOUND."""
    path = workdir / name
    path.write_bytes(text)
    display = f"fuzz/{name}"
    start = time.process_time()
    try:
        front_end(path, display)
    except ConvlensError as err:
        assert_located(err, display, text)
    elapsed = time.process_time() - start
    assert elapsed < BOUND, f"{elapsed:.2f} s for {len(text)} bytes"


# --- strategies ------------------------------------------------------------------------------

TOKENS = [
    "conversion", "scheme", "for", "model_type", "architecture", "rename", "fuse", "split",
    "map", "drop", "restore", "from", "include", "expect", "naming", "axes", "by", "where",
    "unless", "in", "on", "role", "param", "dequant", "as", "shape", "packed", "block",
    "optional", "shared", "activation", "reciprocal", "index", "module", "param", "flat",
    "->", ",", "(", ")", "[", "]", "=", "+", "-", "*", "//", "/", "|", ".", ":", "\n", "#c\n",
    "0", "1", "2", "16", "128", "x", "e", "out", "in", "config.hidden_size", "weight", "U8",
    "F32", "float", "stack(e, 0)", "concat(1)", "split(0, parts=2)", "transpose(0, 1)",
    "interleave(0)", "rope_permute(heads=2)", "flatten(0, sizes=[2, 3])", '"{p*}.a"',
    '"{p*}.b"', '"{p*}.experts.{e:int}.w1"', '"{x}"', '"{l*}.{m}.x"', '"a.b"', '""', '"{"',
    '"\\x00"', '"\\N{BULLET}"', "e2m1", "e8m0",
]

random_text = st.text(max_size=300)
token_soup = st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=60).map(" ".join)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A shipped rule or scheme file, with a few mutations."""
    data = bytearray(draw(st.sampled_from(SHIPPED_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "delete", "duplicate", "truncate", "non_utf8",
                                     "nest", "chain", "long_name", "token"]))
        at = draw(st.integers(0, len(data)))
        span = draw(st.integers(1, 64))
        if kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "delete":
            del data[at:at + span]
        elif kind == "duplicate":
            data[at:at] = data[at:at + span]
        elif kind == "truncate":
            del data[at:]
        elif kind == "non_utf8":
            data[at:at] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80",
                                                b"\xf4\x90\x80\x80", b"\x00"]))
        elif kind == "nest":
            n = draw(st.sampled_from([10, 200, 5000]))
            data[at:at] = b"(" * n + b"1" + b")" * n
        elif kind == "chain":
            n = draw(st.sampled_from([10, 99, 150, 600]))
            data[at:at] = b"+".join([b"config.x"] * n)
        elif kind == "long_name":
            data[at:at] = b"a" * draw(st.sampled_from([300, 5000, 50_000]))
        else:
            data[at:at] = b" " + draw(st.sampled_from(TOKENS)).encode() + b" "
    return bytes(data)


def _grammar_strategy(start: str) -> st.SearchStrategy[str]:
    # A STRING of the grammar is any quoted text; patterns made of pattern pieces get further.
    piece = st.sampled_from(["{p*}", "{l*}", "{e:int}", "{x}", "{n}", "a", "b", "w1", "w3",
                             "experts", "mlp", "0", "x{y}", "{z:int}", "{q:float}", ""])
    pattern = st.lists(piece, min_size=1, max_size=5).map(lambda ps: '"' + ".".join(ps) + '"')
    names = st.sampled_from(["e", "x", "p", "l", "stack", "concat", "split", "interleave",
                             "transpose", "rope_permute", "flatten", "unflatten", "param",
                             "module", "flat", "out", "in", "sizes", "parts", "heads", "dim",
                             "config", "weight", "weight_scale", "U8", "F32", "float", "e2m1",
                             "group_size", "quant_algo", "mixtral"])
    ints = st.sampled_from(["0", "1", "2", "3", "16", "128", "9223372036854775807",
                            "9223372036854775808"])
    return from_lark(build_lark(), start=start,
                     explicit={"STRING": pattern, "NAME": names, "INT": ints})


# --- the tests ---------------------------------------------------------------------------------


@scaled(1)
@given(random_text)
def test_random_text(workdir: Path, text: str) -> None:
    check(workdir, text.encode("utf-8", "surrogatepass"))


@scaled(2)
@given(token_soup)
def test_token_soup(workdir: Path, text: str) -> None:
    check(workdir, ("conversion fuzz\n" + text).encode())


@scaled(3)
@given(_grammar_strategy("start"))
def test_programs_generated_from_the_grammar(workdir: Path, text: str) -> None:
    check(workdir, text.encode())


@scaled(4)
@given(mutated())
def test_mutated_shipped_files(workdir: Path, text: bytes) -> None:
    check(workdir, text)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_truncation_point_of_a_line(workdir: Path, path: Path) -> None:
    """Each shipped file cut at the end of every line, and in the middle of the line."""
    data = path.read_bytes()
    cuts = {0, len(data)}
    pos = data.find(b"\n")
    while pos >= 0:
        cuts.add(pos)
        nxt = data.find(b"\n", pos + 1)
        cuts.add((pos + (nxt if nxt >= 0 else len(data))) // 2)
        pos = nxt
    for cut in sorted(cuts):
        check(workdir, data[:cut])
