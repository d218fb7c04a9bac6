"""The inside of a pattern string: ``"{layer*}.mlp.experts.{e:int}.w1"``.

A pattern is a list of dot-separated segments. A segment is literal text and captures:

- ``{name}``        text inside one segment (no dots), at least one character;
- ``{name:int}``    one or more digits;
- ``{name:int<N}``  an integer below ``N``, a number or an expression over ``config.*`` fields
  (``{e:int<config.text_config.moe_num_experts}``);
- ``{2*name+1}``    an *expression capture*: the segment is an integer, the value of the
  expression for the capture. The expression is linear in the one capture it names, with a
  positive whole coefficient, plus an offset of numbers and ``config.*`` fields
  (``{i+1}``, ``{2*i}``, ``{i-1}``, ``{e+config.n}``), so it is invertible by construction:
  matching solves ``segment = a*name + b`` for the capture and refuses a segment with no
  solution (not divisible by ``a``, or a negative capture); rendering computes the value;
- ``{name*}``       one or more whole segments (must be a segment on its own).

Two captures side by side in one segment, or two ``{x*}`` segments side by side, could split a key
in more than one way: both are errors. A scan is one linear pass over the text; dots inside braces
belong to the capture (``config.n``), not to the segments.

``Pattern.text`` is the canonical spelling (:func:`format_pattern`): expressions lose their
spaces and redundant parentheses, so that ``parse(format(ast)) == ast``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from convlens.dsl.ast import (
    BinOp,
    Capture,
    CaptureKind,
    Expr,
    Int,
    Literal,
    Pattern,
    Piece,
    Ref,
    Segment,
)
from convlens.errors import RuleError, Span

# Limits on hostile input, shared with the parser (convlens.dsl.parser re-exports them).
MAX_EXPR_DEPTH = 100  # operators nested in one expression (a chain a + b + ... nests too)
MAX_INT = 2**63 - 1  # a number in a rule or scheme file

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LITERAL_OK = re.compile(r"[^{}.\s\"\\]+\Z")
_EXPR_CHARS = frozenset("+-*/()<")  # a capture body with one of these is an expression

_Err = Callable[..., RuleError]


def parse_pattern(text: str, span: Span) -> Pattern:
    """Parse pattern text (without quotes); ``span`` points at the opening quote."""

    def err(msg: str, col: int, width: int = 1, hint: str | None = None) -> RuleError:
        return RuleError(msg, span=span.shifted(col + 1, width), hint=hint)

    if not text:
        raise err("empty pattern", 0)
    segments: list[Segment] = []
    seen: dict[str, int] = {}
    for pos, raw in _split_segments(text, err):
        if raw == "":
            raise err(f"empty segment in pattern {text!r} (two dots, or a dot at an end)", pos)
        pieces: list[Piece] = []
        i = 0
        while i < len(raw):
            if raw[i] == "{":
                close = raw.find("}", i)  # _split_segments made sure there is one
                body = raw[i + 1 : close]
                cap = _capture(body, pos + i, span, err)
                if cap.name in seen:
                    raise err(f"capture {{{cap.name}}} appears twice in one pattern", pos + i,
                              close - i + 1)
                seen[cap.name] = pos + i
                if pieces and isinstance(pieces[-1], Capture):
                    raise err(
                        f"ambiguous pattern: captures {{{pieces[-1].name}}} and {{{cap.name}}} "
                        "touch inside one segment", pos + i, close - i + 1,
                        hint="put literal text between them")
                pieces.append(cap)
                i = close + 1
            elif raw[i] == "}":
                raise err("'}' without an opening '{'", pos + i)
            else:
                j = i
                while j < len(raw) and raw[j] not in "{}":
                    j += 1
                lit = raw[i:j]
                if not _LITERAL_OK.match(lit):
                    raise err(f"character not allowed in a key: {lit!r}", pos + i, j - i)
                pieces.append(Literal(lit))
                i = j
        for p in pieces:
            if isinstance(p, Capture) and p.kind == "many" and len(pieces) > 1:
                raise err(f"{{{p.name}*}} matches whole segments and must stand alone between "
                          "dots", p.column, len(p.name) + 3)
        if (
            segments
            and _is_many(segments[-1])
            and _is_many(tuple(pieces))
        ):
            raise err("ambiguous pattern: two multi-segment captures side by side", pos, len(raw),
                      hint="put a literal segment between them")
        segments.append(tuple(pieces))
    canonical = ".".join("".join(_piece(x) for x in seg) for seg in segments)
    return Pattern(text=canonical, segments=tuple(segments), span=span)


def _split_segments(text: str, err: _Err) -> list[tuple[int, str]]:
    """(offset, raw text) of each segment: dots split, except inside braces."""
    out: list[tuple[int, str]] = []
    start = i = 0
    while i < len(text):
        ch = text[i]
        if ch == "{":
            close = text.find("}", i + 1)
            inner = text.find("{", i + 1, close if close >= 0 else len(text))
            if close < 0 or inner >= 0:
                raise err("'{' without a closing '}'", i)
            i = close + 1
            continue
        if ch == ".":
            out.append((start, text[start:i]))
            start = i + 1
        i += 1
    out.append((start, text[start:]))
    return out


def _is_many(seg: Segment) -> bool:
    return len(seg) == 1 and isinstance(seg[0], Capture) and seg[0].kind == "many"


def _capture(body: str, col: int, span: Span, make: _Err) -> Capture:
    """One ``{...}``; ``col`` is the offset of its '{' in the pattern text."""
    kind: CaptureKind = "one"
    name = body
    bound: Expr | None = None
    if ":" in body:
        name, _, typ = body.partition(":")
        rest = typ.lstrip()
        word = re.match(r"[A-Za-z_0-9]*", rest)
        typ_name = word.group(0) if word else ""
        after = rest[len(typ_name):].strip()
        if typ_name != "int" or (after and not after.startswith("<")):
            shown = typ.split("<", 1)[0].strip() or typ
            raise make(f"unknown capture type {shown!r} in {{{body}}}", col, len(body) + 2,
                       "capture types: {e:int}, or {e:int<N} with a bound (a number or "
                       "config.<field>)")
        kind = "int"
        if after and _NAME.match(name):
            lt = body.index("<", len(name))
            bound = _ExprParser(body[lt + 1:], col + 1 + lt + 1, span, make).parse()
            _constant(bound, "a bound", span, make)
    elif body.endswith("*") and _NAME.match(body[:-1]):
        kind, name = "many", body[:-1]
    elif _EXPR_CHARS.intersection(body) and not body.endswith("*"):
        return _expression_capture(body, col, span, make)
    elif body.endswith("*"):
        kind, name = "many", body[:-1]
    if not _NAME.match(name):
        hint = ("captures look like {name}, {name*}, {name:int} or {name:int<N}; an expression "
                "capture has no type: {2*i+1}" if ":" in body else
                "captures look like {name}, {name*}, {name:int} or an expression like {2*i+1}")
        raise make(f"bad capture name {name!r} in {{{body}}}", col, len(body) + 2, hint)
    return Capture(name=name, kind=kind, column=col, bound=bound)


def _expression_capture(body: str, col: int, span: Span, make: _Err) -> Capture:
    expr = _ExprParser(body, col + 1, span, make).parse()
    if not isinstance(expr, BinOp):
        raise make(f"{{{body}}} is not an expression of a capture", col, len(body) + 2,
                   "write {i:int} for a plain integer, {2*i+1} for an expression")
    name, coef = _linear(expr, col, len(body) + 2, make)
    if name is None:
        raise make(f"{{{body}}} names no capture: an expression capture computes a segment from "
                   "one capture", col, len(body) + 2, "for example {i+1} or {2*i}")
    if coef <= 0:
        raise make(f"in {{{body}}} the capture {name} has coefficient {coef}: matching could not "
                   "solve for it", col, len(body) + 2,
                   "write the capture with a positive coefficient, as in {2*i+1} or {i-1}")
    return Capture(name=name, kind="int", column=col, expr=expr)


def _linear(e: Expr, col: int, width: int, make: _Err) -> tuple[str | None, int]:
    """The capture an expression names and its coefficient; errors where the expression is not
    ``a*capture + b`` with a whole ``a`` (``b`` may use config fields)."""
    if isinstance(e, Int):
        return None, 0
    if isinstance(e, Ref):
        if e.path[0] == "config":
            return None, 0
        return e.path[0], 1  # _ExprParser allows dotted names under config only
    assert isinstance(e, BinOp)
    n1, c1 = _linear(e.left, col, width, make)
    n2, c2 = _linear(e.right, col, width, make)
    if n1 is not None and n2 is not None and n1 != n2:
        raise make(f"an expression capture names one capture, this one names {n1} and {n2}",
                   col, width)
    name = n1 if n1 is not None else n2
    if e.op == "+":
        return name, c1 + c2
    if e.op == "-":
        return name, c1 - c2
    if e.op == "*":
        if n1 is not None and n2 is not None:
            raise make(f"{name} times {name} cannot be solved for {name}", col, width)
        if name is None:
            return None, 0
        factor = e.right if n1 is not None else e.left
        k = _number(factor)
        if k is None:
            raise make(f"the capture {name} is multiplied by a config field: its coefficient must "
                       "be a number, so that the pattern can be matched without the config",
                       col, width, "move the config field to the offset: {2*i+config.n}")
        return name, (c1 if n1 is not None else c2) * k
    if name is not None:
        raise make(f"'//' on the capture {name} cannot be undone (a segment would have several "
                   "solutions)", col, width, "use a coefficient instead: {2*i} or {2*i+1}")
    return None, 0


def evaluate(e: Expr, lookup: Callable[[tuple[str, ...]], int | None]) -> int | None:
    """The value of an integer expression whose references ``lookup`` gives (a capture's value,
    a config field); None if ``lookup`` answers None for one of them or a division is by 0."""
    if isinstance(e, Int):
        return e.value
    if isinstance(e, Ref):
        return lookup(e.path)
    assert isinstance(e, BinOp)
    a, b = evaluate(e.left, lookup), evaluate(e.right, lookup)
    if a is None or b is None:
        return None
    if e.op == "+":
        return a + b
    if e.op == "-":
        return a - b
    if e.op == "*":
        return a * b
    return a // b if b else None


def _number(e: Expr) -> int | None:
    """The value of an expression of numbers only (None if it reads the config)."""
    return evaluate(e, lambda path: None)


def _constant(e: Expr, what: str, span: Span, make: _Err) -> None:
    """Refuse capture names in an expression that must not depend on one (a bound)."""
    if isinstance(e, Ref) and e.path[0] != "config":
        raise make(f"{what} is a number or a config.<field> expression, not {'.'.join(e.path)!r}",
                   e.span.column - span.column - 1, len(".".join(e.path)),
                   "for example {e:int<config.num_experts}")
    if isinstance(e, BinOp):
        _constant(e.left, what, span, make)
        _constant(e.right, what, span, make)


class _ExprParser:
    """``expr := term (('+'|'-') term)*; term := factor (('*'|'//') factor)*;
    factor := INT | NAME | config.NAME(.NAME)* | '(' expr ')'``, spaces allowed. ``col`` is the
    offset of ``text`` in the pattern; errors point at the token."""

    _TOKEN = re.compile(r"\s*(?:(?P<int>[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*"
                        r"(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<op>//|[-+*()])|(?P<bad>\S))")

    def __init__(self, text: str, col: int, span: Span, make: _Err) -> None:
        self.text = text
        self.col = col
        self.span = span
        self.make = make
        self.tokens: list[tuple[str, str, int]] = []  # (kind, text, offset in pattern)
        for m in self._TOKEN.finditer(text):
            kind = m.lastgroup
            if kind is None:  # trailing spaces
                continue
            self.tokens.append((kind, m.group(kind), col + m.start(kind)))
        self.i = 0
        self.parens = 0

    def fail(self, msg: str, at: int, width: int = 1, hint: str | None = None) -> RuleError:
        return self.make(msg, at, width, hint)

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def parse(self) -> Expr:
        if not self.tokens:
            raise self.fail("empty expression in a capture", self.col - 1, 1,
                            "for example {i+1} or {e:int<config.num_experts}")
        e = self.expr()
        tok = self.peek()
        if tok is not None:
            raise self.fail(f"unexpected {tok[1]!r} in the capture expression", tok[2],
                            len(tok[1]), "an expression uses numbers, one capture name, "
                            "config.<field>, + - * // and parentheses")
        return e

    def node_span(self, start: int, end: int) -> Span:
        return self.span.shifted(start + 1, max(1, end - start))

    def expr(self) -> Expr:
        left = self.term()
        while (tok := self.peek()) is not None and tok[1] in ("+", "-"):
            self.i += 1
            right = self.term()
            left = self.binop(tok[1], left, right)
        return left

    def term(self) -> Expr:
        left = self.factor()
        while (tok := self.peek()) is not None and tok[1] in ("*", "//"):
            self.i += 1
            right = self.factor()
            left = self.binop(tok[1], left, right)
        return left

    def binop(self, op: str, left: Expr, right: Expr) -> BinOp:
        start = left.span.column - self.span.column - 1
        end = right.span.end_column - self.span.column - 1 if right.span.end_column else start
        node = BinOp(op=op, left=left, right=right,  # type: ignore[arg-type]
                     span=self.node_span(start, end))
        if _depth(node) > MAX_EXPR_DEPTH:
            raise self.fail(f"expression nested too deeply (more than {MAX_EXPR_DEPTH} operators "
                            "deep, counting each + - * / of a chain)", start, end - start)
        return node

    def factor(self) -> Expr:
        tok = self.peek()
        if tok is None:
            raise self.fail("the capture expression ends early", self.col + len(self.text) - 1,
                            1, "an operator needs a number, a name or '(' after it")
        kind, text, at = tok
        self.i += 1
        if kind == "int":
            digits = text.lstrip("0")
            if len(digits) > len(str(MAX_INT)) or int(text) > MAX_INT:
                shown = text if len(text) <= 30 else \
                    f"{text[:12]}...{text[-6:]} ({len(text)} digits)"
                raise self.fail(f"number {shown} is too large (the limit is 2**63 - 1)", at,
                                len(text))
            return Int(int(text), span=self.node_span(at, at + len(text)))
        if kind == "name":
            path = tuple(text.split("."))
            if len(path) > 1 and path[0] != "config":
                raise self.fail(f"{text!r} is neither a capture name nor config.<field>", at,
                                len(text))
            if path == ("config",):
                raise self.fail("config needs a field: config.<field>", at, len(text))
            return Ref(path, span=self.node_span(at, at + len(text)))
        if text == "(":
            self.parens += 1
            if self.parens > MAX_EXPR_DEPTH:
                raise self.fail(f"expression nested too deeply (more than {MAX_EXPR_DEPTH} "
                                "parentheses)", at)
            inner = self.expr()
            close = self.peek()
            if close is None or close[1] != ")":
                raise self.fail("'(' without a closing ')' in the capture expression", at)
            self.i += 1
            self.parens -= 1
            return inner
        raise self.fail(f"unexpected {text!r} in the capture expression", at, len(text),
                        "an expression uses numbers, one capture name, config.<field>, "
                        "+ - * // and parentheses")


def _depth(e: Expr) -> int:
    if isinstance(e, BinOp):
        return 1 + max(_depth(e.left), _depth(e.right))
    return 0


def format_capture_expr(e: Expr, parent: int = 0, right: bool = False) -> str:
    """Compact text of an expression inside braces: no spaces, minimal parentheses."""
    if isinstance(e, Int):
        return str(e.value)
    if isinstance(e, Ref):
        return ".".join(e.path)
    assert isinstance(e, BinOp)
    prec = 1 if e.op in ("+", "-") else 2
    text = (format_capture_expr(e.left, prec) + e.op
            + format_capture_expr(e.right, prec, right=True))
    # Left-associative: a right operand of equal precedence needs parentheses.
    if prec < parent or (right and prec == parent):
        return f"({text})"
    return text


def format_pattern(p: Pattern) -> str:
    """Pattern text from segments (the inverse of :func:`parse_pattern`)."""
    return ".".join("".join(_piece(x) for x in seg) for seg in p.segments)


def _piece(p: Piece) -> str:
    if isinstance(p, Literal):
        return p.text
    if p.expr is not None:
        return "{" + format_capture_expr(p.expr) + "}"
    suffix = {"one": "", "many": "*", "int": ":int"}[p.kind]
    if p.bound is not None:
        suffix += "<" + format_capture_expr(p.bound)
    return "{" + p.name + suffix + "}"
