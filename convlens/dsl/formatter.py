"""AST -> canonical text. ``parse(format_conversion(ast)) == ast`` (tested with hypothesis).

Comments are not kept: the formatter prints the canonical form of a file's meaning.
"""

from __future__ import annotations

import json

from convlens.dsl import ast
from convlens.dsl.patterns import format_pattern

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "//": 2, "/": 2}


def format_expr(e: ast.Value, parent: int = 0, right: bool = False) -> str:
    if isinstance(e, ast.Int):
        return str(e.value)
    if isinstance(e, ast.Ref):
        return ".".join(e.path)
    if isinstance(e, ast.Tuple):
        return "[" + ", ".join(format_expr(i) for i in e.items) + "]"
    if isinstance(e, ast.Call):
        return f"{e.func}({format_expr(e.arg)})"
    prec = _PRECEDENCE[e.op]
    text = f"{format_expr(e.left, prec)} {e.op} {format_expr(e.right, prec, right=True)}"
    # Left-associative: a right operand of equal precedence needs parentheses.
    if prec < parent or (right and prec == parent):
        return f"({text})"
    return text


def _string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def format_endpoint(ep: ast.Endpoint) -> str:
    text = ", ".join(_string(format_pattern(p)) for p in ep.patterns)
    if ep.naming is not None:
        text += f" naming {ep.naming}"
    if ep.axes is not None:
        text += " axes (" + ", ".join(ep.axes) + ")"
    return text


def format_op(op: ast.Op) -> str:
    args = ", ".join((f"{a.name}=" if a.name else "") + format_expr(a.value) for a in op.args)
    text = f"{op.name}({args})"
    if op.on is not None:
        text += " on [" + ", ".join(str(i) for i in op.on) + "]"
    return text


def format_guard(g: ast.Guard) -> str:
    word = "unless" if g.negate else "where"
    return f"{word} {g.capture} in (" + ", ".join(_string(v) for v in g.values) + ")"


def format_statement(st: ast.Statement) -> str:
    if isinstance(st, ast.Include):
        return f"include {st.name}"
    if isinstance(st, ast.Expect):
        text = f"expect {_string(st.src)}\n    -> {_string(st.dst)}"
        if st.given:
            text += "\n    with " + ", ".join(f"{'.'.join(path)} = {value}"
                                              for path, value in st.given)
        return text
    lines: list[str]
    if isinstance(st, ast.Rename):
        lines = [f"rename {format_endpoint(st.src)}", f"  -> {format_endpoint(st.dst)}"]
    elif isinstance(st, ast.Drop):
        lines = [f"drop {format_endpoint(st.target)}",
                 f"  restore from {format_endpoint(st.source)}"]
    else:
        keyword = {ast.Fuse: "fuse", ast.Split: "split", ast.Map: "map"}[type(st)]
        lines = [
            f"{keyword} {format_endpoint(st.src)}",
            f"  -> {format_endpoint(st.dst)}",
            "  by " + ", ".join(format_op(o) for o in st.ops),
        ]
    lines += [f"  {format_guard(g)}" for g in st.guards]
    return "\n".join(lines)


def format_conversion(conv: ast.Conversion) -> str:
    """Canonical text of a whole file."""
    out = [f"conversion {conv.name}"]
    out += [f"  for {t.kind} " + ", ".join(t.names) for t in conv.targets]
    previous: ast.Statement | None = None
    for st in conv.statements:
        if not (isinstance(st, ast.Expect) and isinstance(previous, ast.Expect)):
            out.append("")
        out.append(format_statement(st))
        previous = st
    return "\n".join(out) + "\n"


def _axis(a: ast.AxisDecl) -> str:
    if a.kind == "plain":
        return a.name
    if a.kind == "blocked":
        return f"{a.name} / {a.factor} block"
    return f"{a.name} / {a.factor} packed {a.codec}" + (f" {a.order}" if a.order else "")


def _dim(d: ast.DimDecl) -> str:
    if d.literal is not None:
        return str(d.literal)
    return str(d.axis) + (f" / {d.divisor}" if d.divisor != 1 else "")


def format_scheme(s: ast.Scheme) -> str:
    """Canonical text of a scheme file."""
    out = [f"{'companion' if s.companion else 'scheme'} {s.name}"]
    out += [f"  param {p.name} {p.default}" for p in s.params]
    for d in s.detects:
        out.append(f"  for {d.key} " + ", ".join(v if v.isidentifier() else _string(v)
                                                   for v in d.values))
    width = max((len(r.name) for r in s.roles), default=0)
    dwidth = max((len(r.dtype) for r in s.roles), default=0)
    for r in s.roles:
        shape = "shape" if r.axes is None else "[" + ", ".join(_axis(a) for a in r.axes) + "]"
        line = f"  role {r.name:<{width}}  {r.dtype:<{dwidth}}  {shape}"
        if r.views:
            line += " as " + " | ".join("[" + ", ".join(_dim(d) for d in v) + "]"
                                        for v in r.views)
        line += "".join(f" {f}" for f in r.flags)
        if r.part_of:
            line += " part of " + ", ".join(r.part_of)
        out.append(line)
    if s.dequant is not None:
        out.append(f"  dequant {format_expr(s.dequant)}")
    return "\n".join(out) + "\n"
