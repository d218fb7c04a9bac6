"""The inside of a pattern string: ``"{layer*}.mlp.experts.{e:int}.w1"``.

A pattern is a list of dot-separated segments. A segment is literal text and captures:

- ``{name}``      text inside one segment (no dots), at least one character;
- ``{name:int}``  one or more digits;
- ``{name*}``     one or more whole segments (must be a segment on its own).

Two captures side by side in one segment, or two ``{x*}`` segments side by side, could split a key
in more than one way: both are errors. A scan is one linear pass over the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from convlens.dsl.ast import Capture, CaptureKind, Literal, Pattern, Piece, Segment
from convlens.errors import RuleError, Span

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LITERAL_OK = re.compile(r"[^{}.\s\"\\]+\Z")


def parse_pattern(text: str, span: Span) -> Pattern:
    """Parse pattern text (without quotes); ``span`` points at the opening quote."""

    def err(msg: str, col: int, width: int = 1, hint: str | None = None) -> RuleError:
        return RuleError(msg, span=span.shifted(col + 1, width), hint=hint)

    if not text:
        raise err("empty pattern", 0)
    segments: list[Segment] = []
    seen: dict[str, int] = {}
    pos = 0
    for raw in text.split("."):
        if raw == "":
            raise err(f"empty segment in pattern {text!r} (two dots, or a dot at an end)", pos)
        pieces: list[Piece] = []
        i = 0
        while i < len(raw):
            if raw[i] == "{":
                close = raw.find("}", i)
                if close < 0:
                    raise err("'{' without a closing '}'", pos + i)
                body = raw[i + 1 : close]
                cap = _capture(body, pos + i, err)
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
        pos += len(raw) + 1
    return Pattern(text=text, segments=tuple(segments), span=span)


def _is_many(seg: Segment) -> bool:
    return len(seg) == 1 and isinstance(seg[0], Capture) and seg[0].kind == "many"


def _capture(body: str, col: int, make: Callable[..., RuleError]) -> Capture:
    kind: CaptureKind = "one"
    name = body
    if body.endswith("*"):
        kind, name = "many", body[:-1]
    elif ":" in body:
        name, _, typ = body.partition(":")
        if typ != "int":
            raise make(f"unknown capture type {typ!r} in {{{body}}}", col, len(body) + 2,
                       "the only capture type is 'int': {e:int}")
        kind = "int"
    if not _NAME.match(name):
        raise make(f"bad capture name {name!r} in {{{body}}}", col, len(body) + 2,
                   "captures look like {name}, {name*} or {name:int}")
    return Capture(name=name, kind=kind, column=col)


def format_pattern(p: Pattern) -> str:
    """Pattern text from segments (the inverse of :func:`parse_pattern`)."""
    return ".".join("".join(_piece(x) for x in seg) for seg in p.segments)


def _piece(p: Piece) -> str:
    if isinstance(p, Literal):
        return p.text
    suffix = {"one": "", "many": "*", "int": ":int"}[p.kind]
    return "{" + p.name + suffix + "}"
