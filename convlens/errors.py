"""One error hierarchy for every stage.

Every error carries structured fields (where in a rule file, which rule, key and role) and renders
as ``path:line:col: message`` followed by the source line and a caret, like a compiler. lark's own
exceptions never leave :mod:`convlens.dsl`; the runtime raises :class:`ConversionError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A place in a rule file: 1-based line and column, plus the source line for the caret."""

    path: str
    line: int
    column: int
    end_column: int | None = field(default=None, compare=False)
    source_line: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"

    def shifted(self, columns: int, width: int | None = None) -> Span:
        """The same line, ``columns`` further right (for places inside a pattern string)."""
        start = self.column + columns
        end = start + width if width is not None else None
        return Span(self.path, self.line, start, end, self.source_line)


class ConvlensError(Exception):
    """Base of every error convlens raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        span: Span | None = None,
        rule: str | None = None,
        key: str | None = None,
        role: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.rule = rule
        self.key = key
        self.role = role
        self.hint = hint

    def __str__(self) -> str:
        head = f"{self.span}: {self.message}" if self.span else self.message
        lines = [head]
        context = []
        if self.rule:
            context.append(f"rule: {self.rule}")
        if self.key:
            context.append(f"key: {self.key}")
        if self.role:
            context.append(f"role: {self.role}")
        if context:
            lines.append("  " + ", ".join(context))
        if self.span and self.span.source_line is not None:
            src = self.span.source_line.rstrip("\n")
            lines.append("    " + src)
            width = 1
            if self.span.end_column and self.span.end_column > self.span.column:
                width = self.span.end_column - self.span.column
            lines.append("    " + " " * (self.span.column - 1) + "^" * width)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class RuleSyntaxError(ConvlensError):
    """The text of a rule file does not parse."""


class RuleError(ConvlensError):
    """A rule parses but is wrong: bad pattern, unknown op, captures that do not match, ..."""


class ErrorGroup(ConvlensError):
    """Several rule errors of one file, reported together."""

    def __init__(self, errors: list[ConvlensError]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} error(s)")

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class ConversionError(ConvlensError):
    """A conversion cannot be planned or executed on this state dict or checkpoint."""


class ExpectationError(RuleError):
    """An inline ``expect`` line of a rule file does not hold."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest of ``choices`` to ``word``, phrased as a hint, or None."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None
