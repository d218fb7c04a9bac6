"""The parser: every statement form, spans, the AST outline (golden), and the formatter law
``parse(format(ast)) == ast`` on shipped files and on random ASTs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convlens.api import shipped_rules
from convlens.dsl import ast
from convlens.dsl.formatter import format_conversion
from convlens.dsl.outline import outline
from convlens.dsl.parser import parse, parse_file

GOLDEN = Path(__file__).parent / "golden"

ALL_FORMS = '''
conversion demo
  for model_type a_type, b_type
  for architecture DemoForCausalLM
# a comment
rename "{p*}.block_sparse_moe" -> "{p*}.mlp"   # trailing comment
fuse "{p*}.experts.{e:int}.w1", "{p*}.experts.{e:int}.w3"
  -> "{p*}.experts.gate_up_proj" naming param
  by stack(e, 0), concat(1)
split "{p*}.qkv" -> "{p*}.q", "{p*}.k", "{p*}.v"
  by split(0, sizes=[config.n_heads * config.head_dim, config.kv * config.head_dim, 8 // 2 + 1])
map "{p*}.experts.down" naming param axes (e, in, out) -> "{p*}.experts.down_proj" naming param
  by transpose(1, 2)
map "{p*}.wq" -> "{p*}.q_proj" by rope_permute(heads=config.vision_config.num_heads) on [0]
rename "model.{rest*}" -> "model.language_model.{rest*}"
  unless rest in ("language_model", "visual*")
rename "a.{x}" -> "b.{x}" where x in ("q", "k")
drop "lm_head" restore from "model.embed_tokens"
include other
expect "model.layers.0.block_sparse_moe.gate.weight" -> "model.layers.0.mlp.gate.weight"
'''


def test_every_statement_form_parses_into_its_node() -> None:
    conv = parse(ALL_FORMS, "demo.conv")
    kinds = [type(s).__name__ for s in conv.statements]
    assert kinds == ["Rename", "Fuse", "Split", "Map", "Map", "Rename", "Rename", "Drop",
                     "Include", "Expect"]
    assert conv.model_types == ("a_type", "b_type")
    assert conv.architectures == ("DemoForCausalLM",)
    fuse = conv.statements[1]
    assert isinstance(fuse, ast.Fuse)
    assert [p.text for p in fuse.src.patterns] == ["{p*}.experts.{e:int}.w1",
                                                    "{p*}.experts.{e:int}.w3"]
    assert fuse.dst.naming == "param"
    assert [o.name for o in fuse.ops] == ["stack", "concat"]
    split = conv.statements[2]
    assert isinstance(split, ast.Split)
    sizes = split.ops[0].args[1]
    assert sizes.name == "sizes" and isinstance(sizes.value, ast.Tuple)
    m = conv.statements[3]
    assert isinstance(m, ast.Map) and m.src.axes == ("e", "in", "out")
    rope = conv.statements[4]
    assert isinstance(rope, ast.Map) and rope.ops[0].on == (0,)
    guard = conv.statements[5].guards[0]  # type: ignore[union-attr]
    assert guard == ast.Guard("rest", True, ("language_model", "visual*"))


def test_spans_point_at_the_statement_line_and_column() -> None:
    conv = parse(ALL_FORMS, "demo.conv")
    fuse = conv.statements[1]
    assert (fuse.span.path, fuse.span.line, fuse.span.column) == ("demo.conv", 7, 1)
    assert fuse.src.patterns[1].span.column == 33
    assert fuse.span.source_line is not None and fuse.span.source_line.startswith("fuse")


def test_captures_are_one_segment_many_segments_or_int() -> None:
    conv = parse('conversion x\nrename "{a*}.x_{b}.{c:int}.y" -> "{a*}.z_{b}.{c:int}"')
    caps = conv.statements[0].src.patterns[0].captures()  # type: ignore[union-attr]
    assert {n: c.kind for n, c in caps.items()} == {"a": "many", "b": "one", "c": "int"}


def test_ast_outline_matches_golden() -> None:
    got = outline(parse(ALL_FORMS, "demo.conv"))
    golden = GOLDEN / "all_forms.outline"
    if not golden.exists():  # pragma: no cover - first run writes the file to review
        golden.write_text(got)
    assert got == golden.read_text()


@pytest.mark.parametrize("name", sorted(shipped_rules()))
def test_format_then_parse_gives_the_same_ast_for_shipped_files(name: str) -> None:
    conv = parse_file(shipped_rules()[name])
    again = parse(format_conversion(conv))
    assert again == conv
    assert format_conversion(again) == format_conversion(conv)  # idempotent


def test_format_then_parse_gives_the_same_ast_for_all_forms() -> None:
    conv = parse(ALL_FORMS)
    assert parse(format_conversion(conv)) == conv


# --- random ASTs ------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in {"conversion", "for", "rename", "fuse", "split", "map", "drop", "include",
                        "expect", "naming", "axes", "by", "on", "where", "unless", "in",
                        "restore", "from", "with", "config"})
literal_segments = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)


@st.composite
def patterns(draw: st.DrawFn, caps: tuple[str, ...]) -> str:
    segs = [draw(literal_segments) for _ in range(draw(st.integers(1, 3)))]
    for i, c in enumerate(caps):
        # plain, segments, int, bounded int, or an expression capture (integer arithmetic)
        kind = draw(st.sampled_from(["", "*", ":int", ":int<4", ":int<config.n*2",
                                     "=2*{}+1", "={}+config.n", "=( {} - 1 )"]))
        text = kind[1:].format(c) if kind.startswith("=") else c + kind
        segs.insert(min(2 * i, len(segs)), "{" + text + "}")
    # keep multi-segment captures apart
    return ".".join(segs)


@st.composite
def exprs(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 2 or draw(st.booleans()):
        return draw(st.one_of(st.integers(0, 99).map(str),
                              names.map(lambda n: f"config.{n}")))
    op = draw(st.sampled_from(["+", "-", "*", "//"]))
    left, right = draw(exprs(depth + 1)), draw(exprs(depth + 1))
    if draw(st.booleans()):
        return f"({left} {op} {right})"
    return f"{left} {op} {right}"


@st.composite
def statements(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["rename", "fuse", "split", "map", "drop", "expect", "include"]))
    if kind == "include":
        return f"include {draw(names)}"
    if kind == "expect":
        given = draw(st.sampled_from(["", " with config.n = 4",
                                      " with config.a.b = 0, config.c = 7"]))
        return f'expect "{draw(literal_segments)}.a" -> "{draw(literal_segments)}.b"{given}'
    caps = tuple(draw(st.lists(names, max_size=2, unique=True)))
    a, b = draw(patterns(caps)), draw(patterns(caps))
    naming = draw(st.sampled_from(["", " naming param", " naming flat", " naming module"]))
    guard = ""
    if caps and draw(st.booleans()):
        word = draw(st.sampled_from(["where", "unless"]))
        guard = f' {word} {caps[0]} in ("x", "y*")'
    if kind == "rename":
        return f'rename "{a}"{naming} -> "{b}"{guard}'
    if kind == "drop":
        return f'drop "{a}" restore from "{b}"{guard}'
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["concat", "split", "transpose", "rope_permute", "stack"]))
        if op == "concat":
            ops.append(f"concat({draw(st.integers(0, 3))}, sizes=[{draw(exprs())}, 2])")
        elif op == "split":
            ops.append(f"split({draw(st.integers(0, 3))}, parts={draw(st.integers(1, 4))})")
        elif op == "transpose":
            ops.append("transpose(0, 1) on [0, 1]")
        elif op == "rope_permute":
            ops.append(f"rope_permute(heads={draw(exprs())})")
        else:
            ops.append(f"stack({draw(names)}, {draw(st.integers(0, 2))})")
    axes = " axes (e, out, in)" if draw(st.booleans()) else ""
    return f'{kind} "{a}"{naming}{axes} -> "{b}" by {", ".join(ops)}{guard}'


@st.composite
def files(draw: st.DrawFn) -> str:
    head = f"conversion {draw(names)}\n"
    if draw(st.booleans()):
        head += f"  for model_type {draw(names)}, {draw(names)}\n"
    body = "\n".join(draw(st.lists(statements(), max_size=6)))
    return head + body + "\n"


@given(files())
def test_law7_parse_format_roundtrip_on_random_files(text: str) -> None:
    try:
        conv = parse(text)
    except Exception as exc:
        from convlens.errors import ConvlensError

        assert isinstance(exc, ConvlensError)
        return
    formatted = format_conversion(conv)
    assert parse(formatted) == conv
    assert format_conversion(parse(formatted)) == formatted
