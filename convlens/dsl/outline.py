"""A deterministic, indented text dump of an AST (golden tests store these)."""

from __future__ import annotations

import dataclasses

from convlens.dsl import ast


def outline(node: object, indent: int = 0) -> str:
    """One line per node: its class and its scalar fields; children indented below."""
    pad = "  " * indent
    if not dataclasses.is_dataclass(node):
        return f"{pad}{node!r}\n"
    scalars = []
    nested: list[tuple[str, object]] = []
    for f in dataclasses.fields(node):
        if f.name in ("span", "column") or (isinstance(node, ast.Conversion) and f.name == "path"):
            continue
        value = getattr(node, f.name)
        if isinstance(node, ast.Pattern) and f.name == "segments":
            continue
        if dataclasses.is_dataclass(value) or (
            isinstance(value, tuple) and value and any(dataclasses.is_dataclass(v) for v in value)
        ):
            nested.append((f.name, value))
        elif value is not None and value != ():
            scalars.append(f"{f.name}={value!r}")
    line = f"{pad}{type(node).__name__}" + (" " + " ".join(scalars) if scalars else "")
    span = getattr(node, "span", None)
    if span is not None and span.line:
        line += f"  @{span.line}:{span.column}"
    out = [line + "\n"]
    for name, value in nested:
        out.append(f"{pad}  .{name}\n")
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            out.append(outline(item, indent + 2))
    return "".join(out)
