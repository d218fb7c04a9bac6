"""Follow one key through a program by name alone (for ``expect`` lines and ``explain``).

A key's trace is the list of steps it takes: which rule matched it, with which captures and
role, and what it became. A tensor rule maps a key to the keys of its group's results; where a
result depends on values the key does not carry (indices made by ``unstack``), the result keeps a
``{e}`` placeholder that stands for any index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convlens.compiler.naming import key_for, owns, role_of
from convlens.compiler.patterns import NeedsConfig
from convlens.compiler.program import Program, Rule
from convlens.errors import ConversionError


@dataclass(frozen=True)
class Step:
    rule: Rule
    before: str
    after: tuple[str, ...]
    captures: dict[str, str]
    role: str | None


@dataclass(frozen=True)
class Trace:
    key: str
    steps: tuple[Step, ...]
    results: tuple[str, ...]  # may hold "{e}" placeholders for indices made by unstack
    note: str = ""

    @property
    def concrete(self) -> bool:
        return not any(_PLACEHOLDER.search(r) for r in self.results)

    def reaches(self, key: str) -> bool:
        """Whether ``key`` is one of the results (placeholders match any index)."""
        return any(_template(r).match(key) for r in self.results)


_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def _template(result: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(result)
    return re.compile("^" + "(?:0|[1-9][0-9]*)".join(re.escape(p) for p in parts) + "$")


def _step(rule: Rule, key: str) -> Step | str | None:
    """What ``rule`` does to ``key``: a Step, None (no match) or why it cannot be followed."""
    try:
        return _follow(rule, key)
    except NeedsConfig as exc:
        setting = " = N, ".join(".".join(r) for r in rule.config_refs) + " = N"
        return f"{rule.ref.label}: {exc.message} (an expect gives it: with {setting})"
    except ConversionError as exc:  # a capture out of its range on the other side
        return f"{rule.ref.label}: {exc.message}"


def _follow(rule: Rule, key: str) -> Step | str | None:
    for pat in rule.src.patterns:
        m = pat.match(key)
        if m is None or not all(g.allows(m.captures) for g in rule.guards):
            continue
        if rule.kind in ("rename", "drop", "restore"):
            dst = rule.dst.patterns[0].format(m.captures)
            if rule.src.naming == rule.dst.naming:
                new = dst + m.tail
            else:
                role = role_of(m.tail, rule.src.naming)
                if role is None:
                    return f"{key!r} does not fit {rule.src.naming} naming"
                new = key_for(dst, role, rule.dst.naming)
            if rule.kind == "drop":
                return Step(rule, key, (), m.captures, None)
            if rule.kind == "restore":
                return Step(rule, key, (key, new), m.captures, None)
            return Step(rule, key, (new,), m.captures, None)
        if not owns(m.tail, rule.src.naming):
            continue
        role = role_of(m.tail, rule.src.naming)
        if role is None:
            return f"{key!r} is not a tensor of {pat.text!r} under {rule.src.naming} naming"
        caps = {c: v for c, v in m.captures.items() if c not in rule.stacked}
        caps.update({c: "{" + c + "}" for c in rule.unstacked})
        targets = rule.dst.patterns[:1] if rule.kind == "fuse" else rule.dst.patterns
        out = tuple(key_for(p.format(caps), role, rule.dst.naming) for p in targets)
        return Step(rule, key, out, m.captures, role)
    return None


def trace_key(program: Program, key: str, config: Mapping[str, Any] | None = None) -> Trace:
    """Follow ``key`` through every rule of ``program``, by name. ``config`` gives the values
    of the config fields that patterns read (``{e+config.n}``); without it, a key that reaches
    such a rule stops there with a note."""
    if config is not None:
        program = program.resolve(config)
    steps: list[Step] = []
    current = [key]
    for rule in program.rules:
        nxt: list[str] = []
        for k in current:
            step = _step(rule, k)
            if step is None:
                nxt.append(k)
            elif isinstance(step, str):
                return Trace(key, tuple(steps), tuple(current), step)
            else:
                steps.append(step)
                nxt.extend(step.after)
        current = nxt
    return Trace(key, tuple(steps), tuple(current))
