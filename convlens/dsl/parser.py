"""Text -> AST. The only module that touches lark; its exceptions become convlens errors here."""

from __future__ import annotations

import ast as pyast
import pickle
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from lark import Lark, Token, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.visitors import Transformer_NonRecursive

from convlens import cache
from convlens.dsl import ast
from convlens.dsl.patterns import MAX_EXPR_DEPTH, MAX_INT, parse_pattern
from convlens.errors import ConvlensError, RuleError, RuleSyntaxError, Span

# Limits on hostile input: each is far above what a real file needs and keeps the later stages
# (compiler, formatter, evaluation: recursive over expressions, quadratic over rules) bounded.
# MAX_EXPR_DEPTH (operators nested in one expression) and MAX_INT (a number in a rule or scheme
# file) come from convlens.dsl.patterns, which reads expressions inside patterns too.
MAX_STATEMENTS = 10_000  # statements of one file

# What the lexer would read as a statement keyword: strings and comments are skipped, and a
# keyword counts when a pattern (or, for include, a name) follows, which op names never have.
_STATEMENT_SCAN = re.compile(
    r'"(?:[^"\\\n]|\\[^\n])*"|#[^\n]*'
    r'|\b(?:rename|fuse|split|map|drop|expect)\b(?=\s*")|\binclude\b(?=\s+[A-Za-z_])')
_SHORTEST_STATEMENT = len("include a") + 1

# Friendly messages for common mistakes: lark matches a failing input against these examples by
# parser state (UnexpectedInput.match_examples). tests/dsl/test_errors.py runs every entry.
SYNTAX_EXAMPLES: dict[str, list[str]] = {
    "a conversion file starts with 'conversion NAME'": [
        'rename "a" -> "b"',
        'fuse "a" -> "b" by concat(0)',
    ],
    "expected '->' between the two sides of the rule": [
        'conversion x\nrename "a" "b"',
        'conversion x\nrename "a" => "b"',
        'conversion x\nfuse "a", "b" "c" by concat(0)',
    ],
    "patterns are written in double quotes: \"model.{rest*}\"": [
        "conversion x\nrename a -> b",
        'conversion x\nrename "a" -> b',
        "conversion x\nrename 'a' -> 'b'",
    ],
    "a tensor rule needs 'by' followed by its ops: by stack(e, 0), concat(1)": [
        'conversion x\nfuse "a", "b" -> "c"',
        'conversion x\nfuse "a", "b" -> "c" concat(1)',
        'conversion x\nsplit "a" -> "b", "c"\nrename "x" -> "y"',
    ],
    "an op is a name with its arguments in parentheses: concat(1)": [
        'conversion x\nfuse "a", "b" -> "c" by concat',
        'conversion x\nfuse "a", "b" -> "c" by concat 1',
        'conversion x\nfuse "a", "b" -> "c" by stack(e, 0) concat(1)',
    ],
    "unclosed '(' in the op's arguments": [
        'conversion x\nfuse "a", "b" -> "c" by concat(1',
        'conversion x\nfuse "a", "b" -> "c" by split(0, sizes=[1, 2]',
    ],
    "a guard reads: unless NAME in (\"value\", ...)": [
        'conversion x\nrename "{a}" -> "b.{a}" unless a ("x")',
        'conversion x\nrename "{a}" -> "b.{a}" unless a in "x"',
        'conversion x\nrename "{a}" -> "b.{a}" unless "a" in ("x")',
    ],
    "'for' takes model_type or architecture and a list of names": [
        "conversion x\nfor model mixtral",
        "conversion x\nfor model_type",
        'conversion x\nfor model_type "mixtral"',
    ],
    "'expect' takes two quoted keys: expect \"hub key\" -> \"memory key\"": [
        "conversion x\nexpect a -> b",
        'conversion x\nexpect "a" "b"',
    ],
    "'with' gives an expect the config values its patterns read: with config.num_experts = 4": [
        'conversion x\nexpect "a" -> "b" with config.n 4',
        'conversion x\nexpect "a" -> "b" with config.n = x',
        'conversion x\nexpect "a" -> "b" with config.n = 4 config.m = 2',
        'conversion x\nexpect "a" -> "b" with',
    ],
}


_LARK_OPTIONS: dict[str, Any] = {"parser": "lalr", "propagate_positions": True,
                                 "maybe_placeholders": True}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    """The parser, built from the grammar once per grammar text: building the LALR tables takes
    ~65 ms, loading them from the user's cache (:mod:`convlens.cache`) ~10 ms."""
    name = f"conv-{_code_digest()}.lark"
    parser = cache.load("grammar", name, Lark.load)
    if parser is None:
        parser = build_lark()
        cache.store("grammar", name, parser.save)
    return parser


def build_lark() -> Lark:
    """The parser built from the grammar (its analysed grammar kept, which a cached one lacks)."""
    return Lark.open_from_package("convlens", "conv.lark", ("grammars",), **_LARK_OPTIONS)


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """A digest of what a parse result depends on besides the text: the grammar, the modules
    that build the AST, lark's and Python's versions. A cached result made by other code is
    never used (a changed source file changes the digest, version number or not)."""
    import lark

    here = Path(__file__).parent
    sources = [here.parent / "grammars" / "conv.lark", here.parent / "errors.py"] + [
        here / name for name in ("parser.py", "ast.py", "patterns.py")]  # all the AST is made of
    return cache.digest(*(p.read_bytes() for p in sources), lark.__version__,
                        repr(sorted(_LARK_OPTIONS.items())), sys.version)


def grammar_text() -> str:
    """The grammar, which is the language reference."""
    return (Path(__file__).parent.parent / "grammars" / "conv.lark").read_text()


_E = TypeVar("_E", ast.BinOp, ast.Call)


class _Builder(Transformer_NonRecursive[Token, Any]):  # deep expressions: no recursion
    def __init__(self, path: str, lines: list[str]) -> None:
        super().__init__()
        self.path = path
        self.lines = lines
        # operator depth of each expression node built so far (node kept alive with its depth)
        self.depths: dict[int, tuple[Any, int]] = {}

    def _int(self, tok: Token) -> int:
        text = str(tok)
        digits = text.lstrip("0")
        if len(digits) > len(str(MAX_INT)) or int(text) > MAX_INT:
            shown = text if len(text) <= 30 else f"{text[:12]}...{text[-6:]} ({len(text)} digits)"
            raise RuleError(f"number {shown} is too large (the limit is 2**63 - 1)",
                            span=self._tok_span(tok))
        return int(text)

    def _depth(self, node: Any) -> int:
        found = self.depths.get(id(node))
        return found[1] if found is not None and found[0] is node else 0

    def _span(self, meta: Any) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.path, 0, 0)
        line = meta.line
        end = meta.end_column if meta.end_line == meta.line else None
        src = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        return Span(self.path, line, meta.column, end, src)

    def _tok_span(self, tok: Token) -> Span:
        line = tok.line or 0
        col = tok.column or 0
        src = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        return Span(self.path, line, col, col + len(tok), src)

    def _string(self, tok: Token) -> str:
        try:
            value = pyast.literal_eval(str(tok))
        except (ValueError, SyntaxError) as exc:
            raise RuleError(f"bad string literal {tok!s}", span=self._tok_span(tok)) from exc
        assert isinstance(value, str)
        return value

    @v_args(meta=True)
    def conversion_file(self, meta: Any, children: list[Any]) -> ast.Conversion:
        name, targets, span = children[0]
        return ast.Conversion(name=name, targets=targets, statements=tuple(children[1:]),
                              path=self.path, span=span)

    @v_args(meta=True)
    def scheme_file(self, meta: Any, children: list[Any]) -> ast.Scheme:
        name, span, *kind = children[0]
        detects = tuple(c for c in children[1:] if isinstance(c, ast.Detect))
        roles = tuple(c for c in children[1:] if isinstance(c, ast.RoleDecl))
        dequants = [c for c in children[1:] if isinstance(c, tuple) and c[0] == "dequant"]
        if len(dequants) > 1:
            raise RuleError("a scheme has one dequant formula", span=dequants[1][2])
        params = tuple(c for c in children[1:] if isinstance(c, ast.Param))
        return ast.Scheme(name=name, detects=detects, roles=roles,
                          dequant=dequants[0][1] if dequants else None, params=params,
                          path=self.path, span=span, companion=bool(kind))

    @v_args(meta=True)
    def param(self, meta: Any, children: list[Token]) -> ast.Param:
        return ast.Param(name=str(children[0]), default=self._int(children[1]),
                         span=self._span(meta))

    @v_args(meta=True)
    def scheme_header(self, meta: Any, children: list[Token]) -> tuple[str, Span]:
        return str(children[0]), self._span(meta)

    @v_args(meta=True)
    def companion_header(self, meta: Any, children: list[Token]) -> tuple[str, Span, str]:
        return str(children[0]), self._span(meta), "companion"

    def part_of(self, children: list[Token]) -> tuple[str, tuple[str, ...]]:
        return "part_of", tuple(str(c) for c in children)

    @v_args(meta=True)
    def detect(self, meta: Any, children: list[Token]) -> ast.Detect:
        values = tuple(self._string(c) if c.type == "STRING" else str(c) for c in children[1:])
        return ast.Detect(key=str(children[0]), values=values, span=self._span(meta))

    @v_args(meta=True)
    def role(self, meta: Any, children: list[Any]) -> ast.RoleDecl:
        name, dtype, shape = str(children[0]), str(children[1]), children[2]
        views: tuple[tuple[ast.DimDecl, ...], ...] = ()
        flags: list[str] = []
        part_of: tuple[str, ...] = ()
        for c in children[3:]:
            if isinstance(c, Token) and c.type == "FLAG":
                flags.append(str(c))
            elif isinstance(c, tuple) and c and c[0] == "view":
                views = c[1]
            elif isinstance(c, tuple) and c and c[0] == "part_of":
                part_of = c[1]
        axes = None if shape == "shape" else tuple(shape)
        return ast.RoleDecl(name=name, dtype=dtype, axes=axes, views=views, flags=tuple(flags),
                            span=self._span(meta), part_of=part_of)

    def shape(self, children: list[Any]) -> list[ast.AxisDecl]:
        return [c for c in children if c is not None]

    def shape_of(self, children: list[Any]) -> str:
        return "shape"

    @v_args(meta=True)
    def axis_plain(self, meta: Any, children: list[Token]) -> ast.AxisDecl:
        return ast.AxisDecl(name=str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def axis_packed(self, meta: Any, children: list[Any]) -> ast.AxisDecl:
        order = str(children[3]) if len(children) > 3 and children[3] is not None else None
        return ast.AxisDecl(name=str(children[0]), kind="packed", factor=self._int(children[1]),
                            codec=str(children[2]), order=order, span=self._span(meta))

    @v_args(meta=True)
    def axis_blocked(self, meta: Any, children: list[Token]) -> ast.AxisDecl:
        size = children[1]
        factor: int | str = self._int(size) if size.type == "INT" else str(size)
        return ast.AxisDecl(name=str(children[0]), kind="blocked", factor=factor,
                            span=self._span(meta))

    def view(self, children: list[Any]) -> tuple[str, tuple[tuple[ast.DimDecl, ...], ...]]:
        return ("view", tuple(children))

    def stored(self, children: list[Any]) -> tuple[ast.DimDecl, ...]:
        return tuple(c for c in children if c is not None)

    def dim_literal(self, children: list[Token]) -> ast.DimDecl:
        return ast.DimDecl(axis=None, literal=self._int(children[0]))

    def dim_div(self, children: list[Token]) -> ast.DimDecl:
        return ast.DimDecl(axis=str(children[0]), divisor=self._int(children[1]))

    def dim_axis(self, children: list[Token]) -> ast.DimDecl:
        return ast.DimDecl(axis=str(children[0]))

    @v_args(meta=True)
    def dequant(self, meta: Any, children: list[Any]) -> tuple[str, Any, Span]:
        return ("dequant", children[0], self._span(meta))

    @v_args(meta=True)
    def d_add(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("+", meta, children)

    @v_args(meta=True)
    def d_sub(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("-", meta, children)

    @v_args(meta=True)
    def d_mul(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("*", meta, children)

    @v_args(meta=True)
    def d_div(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("/", meta, children)

    def d_int(self, children: list[Token]) -> ast.Int:
        return ast.Int(value=self._int(children[0]), span=self._tok_span(children[0]))

    def d_role(self, children: list[Token]) -> ast.Ref:
        return ast.Ref(path=(str(children[0]),), span=self._tok_span(children[0]))

    @v_args(meta=True)
    def d_call(self, meta: Any, children: list[Any]) -> ast.Call:
        return self._nested(ast.Call(func=str(children[0]), arg=children[1],
                                     span=self._span(meta)), children[1:])

    @v_args(meta=True)
    def header(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Target, ...], Span]:
        return str(children[0]), tuple(children[1:]), self._span(meta)

    @v_args(meta=True)
    def target(self, meta: Any, children: list[Any]) -> ast.Target:
        kind = str(children[0])
        assert kind in ("model_type", "architecture")
        return ast.Target(kind=kind, names=tuple(str(c) for c in children[1:]),  # type: ignore[arg-type]
                          span=self._span(meta))

    def pattern(self, children: list[Token]) -> ast.Pattern:
        tok = children[0]
        return parse_pattern(self._string(tok), self._tok_span(tok))

    @v_args(meta=True)
    def endpoint(self, meta: Any, children: list[Any]) -> ast.Endpoint:
        patterns = tuple(c for c in children if isinstance(c, ast.Pattern))
        naming = next((c[1] for c in children if isinstance(c, tuple) and c[0] == "naming"), None)
        axes = next((c[1] for c in children if isinstance(c, tuple) and c[0] == "axes"), None)
        return ast.Endpoint(patterns=patterns, naming=naming, axes=axes, span=self._span(meta))

    def naming(self, children: list[Token]) -> tuple[str, str]:
        return ("naming", str(children[0]))

    def axes(self, children: list[Token]) -> tuple[str, tuple[str, ...]]:
        return ("axes", tuple(str(c) for c in children))

    def _guard(self, meta: Any, children: list[Any], negate: bool) -> ast.Guard:
        return ast.Guard(capture=str(children[0]), negate=negate,
                         values=tuple(self._string(t) for t in children[1:]),
                         span=self._span(meta))

    @v_args(meta=True)
    def guard_in(self, meta: Any, children: list[Any]) -> ast.Guard:
        return self._guard(meta, children, False)

    @v_args(meta=True)
    def guard_not_in(self, meta: Any, children: list[Any]) -> ast.Guard:
        return self._guard(meta, children, True)

    def _split_rule(self, children: list[Any]) -> tuple[Any, Any, tuple[Any, ...], tuple[Any, ...]]:
        src, dst = children[0], children[1]
        ops = tuple(c for c in children[2:] if isinstance(c, ast.Op))
        guards = tuple(c for c in children[2:] if isinstance(c, ast.Guard))
        return src, dst, ops, guards

    @v_args(meta=True)
    def rename(self, meta: Any, children: list[Any]) -> ast.Rename:
        src, dst, _, guards = self._split_rule(children)
        return ast.Rename(src=src, dst=dst, guards=guards, span=self._span(meta))

    @v_args(meta=True)
    def fuse(self, meta: Any, children: list[Any]) -> ast.Fuse:
        src, dst, ops, guards = self._split_rule(children)
        return ast.Fuse(src=src, dst=dst, ops=ops, guards=guards, span=self._span(meta))

    @v_args(meta=True)
    def split(self, meta: Any, children: list[Any]) -> ast.Split:
        src, dst, ops, guards = self._split_rule(children)
        return ast.Split(src=src, dst=dst, ops=ops, guards=guards, span=self._span(meta))

    @v_args(meta=True)
    def map(self, meta: Any, children: list[Any]) -> ast.Map:
        src, dst, ops, guards = self._split_rule(children)
        return ast.Map(src=src, dst=dst, ops=ops, guards=guards, span=self._span(meta))

    @v_args(meta=True)
    def drop(self, meta: Any, children: list[Any]) -> ast.Drop:
        target, source, _, guards = self._split_rule(children)
        return ast.Drop(target=target, source=source, guards=guards, span=self._span(meta))

    @v_args(meta=True)
    def include(self, meta: Any, children: list[Any]) -> ast.Include:
        return ast.Include(name=str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def expect(self, meta: Any, children: list[Any]) -> ast.Expect:
        given = children[2] if len(children) > 2 and children[2] is not None else ()
        return ast.Expect(src=self._string(children[0]), dst=self._string(children[1]),
                          span=self._span(meta), given=given)

    def given(self, children: list[Any]) -> tuple[tuple[tuple[str, ...], int], ...]:
        seen: set[tuple[str, ...]] = set()
        for path, _, span in children:
            if path in seen:
                raise RuleError(f"{'.'.join(path)} is given twice", span=span)
            seen.add(path)
        return tuple((path, value) for path, value, _ in children)

    @v_args(meta=True)
    def setting(self, meta: Any, children: list[Token]) -> tuple[tuple[str, ...], int, Span]:
        path = tuple(str(c) for c in children[:-1])
        span = self._span(meta)
        if path[0] != "config" or len(path) < 2:
            raise RuleError(f"{'.'.join(path)!r}: an expect sets config fields, like "
                            "config.num_experts = 4", span=span)
        return path, self._int(children[-1]), span

    @v_args(meta=True)
    def op(self, meta: Any, children: list[Any]) -> ast.Op:
        name = str(children[0])
        args = tuple(c for c in children[1:] if isinstance(c, ast.Arg))
        on = next((c for c in children[1:] if isinstance(c, tuple)), None)
        return ast.Op(name=name, args=args, on=on, span=self._span(meta))

    def on(self, children: list[Token]) -> tuple[int, ...]:
        return tuple(self._int(c) for c in children)

    @v_args(meta=True)
    def kwarg(self, meta: Any, children: list[Any]) -> ast.Arg:
        return ast.Arg(name=str(children[0]), value=children[1], span=self._span(meta))

    @v_args(meta=True)
    def posarg(self, meta: Any, children: list[Any]) -> ast.Arg:
        return ast.Arg(name=None, value=children[0], span=self._span(meta))

    @v_args(meta=True)
    def tuple(self, meta: Any, children: list[Any]) -> ast.Tuple:
        return ast.Tuple(items=tuple(children), span=self._span(meta))

    def _bin(self, op: str, meta: Any, children: list[Any]) -> ast.BinOp:
        node = ast.BinOp(op=op, left=children[0], right=children[1],  # type: ignore[arg-type]
                         span=self._span(meta))
        return self._nested(node, children)

    def _nested(self, node: _E, operands: list[Any]) -> _E:
        """``node`` with its operator depth recorded; too deep is an error at its place (the
        later stages walk expressions recursively)."""
        depth = 1 + max((self._depth(c) for c in operands), default=0)
        if depth > MAX_EXPR_DEPTH:
            raise RuleError(f"expression nested too deeply (more than {MAX_EXPR_DEPTH} operators "
                            "deep, counting each + - * / of a chain)", span=node.span,
                            hint="compute the value in the config, or split the expression")
        self.depths[id(node)] = (node, depth)
        return node

    @v_args(meta=True)
    def add(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("+", meta, children)

    @v_args(meta=True)
    def sub(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("-", meta, children)

    @v_args(meta=True)
    def mul(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("*", meta, children)

    @v_args(meta=True)
    def floordiv(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._bin("//", meta, children)

    def int(self, children: list[Token]) -> ast.Int:
        return ast.Int(value=self._int(children[0]), span=self._tok_span(children[0]))

    @v_args(meta=True)
    def ref(self, meta: Any, children: list[Token]) -> ast.Ref:
        return ast.Ref(path=tuple(str(c) for c in children), span=self._span(meta))


def parse(text: str, path: str = "<string>") -> ast.Conversion:
    """Parse conversion text into an AST; raises :class:`RuleSyntaxError` / :class:`RuleError`.

    >>> conv = parse('conversion demo\\nrename "{p*}.block_sparse_moe" -> "{p*}.mlp"')
    >>> conv.name, type(conv.statements[0]).__name__
    ('demo', 'Rename')
    """
    doc = parse_document(text, path)
    if not isinstance(doc, ast.Conversion):
        raise RuleError(f"{path} is a scheme file, not a conversion", span=doc.span)
    return doc


def parse_scheme(text: str, path: str = "<string>") -> ast.Scheme:
    """Parse a scheme file (a quantization format written as data)."""
    doc = parse_document(text, path)
    if not isinstance(doc, ast.Scheme):
        raise RuleError(f"{path} is a conversion, not a scheme file", span=doc.span)
    return doc


def parse_document(text: str, path: str = "<string>") -> ast.Conversion | ast.Scheme:
    """Parse a conversion or a scheme file. A text parsed before (by the same code) is read
    from the user's cache: parsing the 23 files of a quantized conversion took ~45 ms."""
    limits = repr((MAX_STATEMENTS, _SHORTEST_STATEMENT, MAX_INT, MAX_EXPR_DEPTH))
    name = cache.digest(_code_digest(), limits, path, text) + ".ast"
    cached = cache.load("ast", name, pickle.load)
    if isinstance(cached, (ast.Conversion, ast.Scheme)):
        return cached
    result = _parse_document(text, path)
    cache.store("ast", name, lambda f: pickle.dump(result, f, pickle.HIGHEST_PROTOCOL))
    return result


def _parse_document(text: str, path: str) -> ast.Conversion | ast.Scheme:
    lines = text.splitlines()
    _check_size(text, path, lines)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, path, lines) from None
    try:
        result = _Builder(path, lines).transform(tree)
    except ConvlensError:
        raise
    except Exception as exc:  # lark wraps errors raised inside callbacks
        inner = getattr(exc, "orig_exc", None)
        if isinstance(inner, ConvlensError):
            raise inner from None
        raise
    assert isinstance(result, (ast.Conversion, ast.Scheme))
    return result


def _check_size(text: str, path: str, lines: list[str]) -> None:
    """Refuse a file of more than MAX_STATEMENTS statements before parsing it (a cheap scan)."""
    if len(text) <= MAX_STATEMENTS * _SHORTEST_STATEMENT:
        return
    count = 0
    for m in _STATEMENT_SCAN.finditer(text):
        if m.group().startswith(('"', "#")):
            continue
        count += 1
        if count > MAX_STATEMENTS:
            line = text.count("\n", 0, m.start()) + 1
            col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
            src = lines[line - 1] if line <= len(lines) else ""
            raise RuleSyntaxError(
                f"too many statements: more than {MAX_STATEMENTS} in one file",
                span=Span(path, line, col, col + len(m.group()), src),
                hint="split the conversion into files and 'include' them")


def read_text(p: Path, display: str | None = None) -> str:
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise RuleSyntaxError(f"cannot read rule file {p}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        begin = raw.rfind(b"\n", 0, exc.start) + 1
        end = raw.find(b"\n", exc.start)
        src = raw[begin:end if end >= 0 else len(raw)].decode("utf-8", "replace")
        col = len(raw[begin:exc.start].decode("utf-8", "replace")) + 1
        raise RuleSyntaxError(f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                              span=Span(display or str(p), line, col, col + 1, src)) from None


def parse_scheme_file(path: str | Path, display: str | None = None) -> ast.Scheme:
    p = Path(path)
    return parse_scheme(read_text(p, display), display or str(p))


def parse_file(path: str | Path, display: str | None = None) -> ast.Conversion:
    """Parse a rule file; ``display`` is how messages name it (default: the path)."""
    p = Path(path)
    return parse(read_text(p, display), display or str(p))


def _syntax_error(exc: UnexpectedInput, text: str, path: str, lines: list[str]) -> RuleSyntaxError:
    line = getattr(exc, "line", 0) or 0
    col = getattr(exc, "column", 0) or 0
    if isinstance(exc, UnexpectedEOF) or line <= 0:
        line = max(1, len(lines))
        col = len(lines[-1]) + 1 if lines else 1
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    span = Span(path, line, col, None, src)
    label = _example_signatures().get(_signature(exc))
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        found = repr(text[pos]) if pos < len(text) else "end of file"
        detail = f"unexpected character {found}"
    elif isinstance(exc, UnexpectedToken):
        tok = exc.token
        found = "end of file" if tok.type == "$END" else repr(str(tok))
        expected = sorted(_pretty_terminal(t) for t in exc.accepts or exc.expected)
        detail = f"unexpected {found}; expected one of: {', '.join(expected)}"
    else:
        detail = "unexpected end of file"
    message = label if isinstance(label, str) else detail
    hint = detail if isinstance(label, str) else None
    return RuleSyntaxError(message, span=span, hint=hint)


def _signature(exc: UnexpectedInput) -> tuple[str, int, frozenset[str]]:
    """Where the parser was when it failed: its LALR state and what it would have accepted.

    lark's own ``match_examples`` does this too, but crashes formatting a debug message when two
    examples share a state (lark 1.3), so the table is matched here.
    """
    state = getattr(exc, "state", None)
    position = getattr(state, "position", state if isinstance(state, int) else -1)
    accepts = getattr(exc, "accepts", None) or getattr(exc, "expected", None) or ()
    return type(exc).__name__, int(position), frozenset(accepts)


@lru_cache(maxsize=1)
def _example_signatures() -> dict[tuple[str, int, frozenset[str]], str]:
    table: dict[tuple[str, int, frozenset[str]], str] = {}
    for label, examples in SYNTAX_EXAMPLES.items():
        for example in examples:
            try:
                _lark().parse(example)
            except UnexpectedInput as exc:
                table.setdefault(_signature(exc), label)
            else:  # pragma: no cover - guarded by tests/dsl/test_errors.py
                raise AssertionError(f"syntax example parses: {example!r}")
    return table


def _pretty_terminal(name: str) -> str:
    names = {
        "NAME": "a name", "STRING": "a quoted pattern", "INT": "a number", "LPAR": "'('",
        "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "__ANON_0": "'->'",
        "$END": "end of file", "EQUAL": "'='", "DOT": "'.'",
        "TARGET_KIND": "model_type|architecture",
    }
    if name in names:
        return names[name]
    if name.isupper() and not name.startswith("_"):
        return name.lower()
    return name
