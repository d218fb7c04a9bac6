"""Checks of a concrete plan that need the derived inverse.

``check_names`` maps every output key back through the inverse program and requires the input
keys, shapes and dtypes to come back exactly. It is what catches a state dict that is already
converted, or half converted, before anything is written: such keys pass through the forward
rules untouched but are matched by the inverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convlens.compiler import plan as P
from convlens.compiler.planner import TensorMeta, plan
from convlens.compiler.program import Program
from convlens.errors import ConversionError


def output_metas(p: P.Plan) -> dict[str, TensorMeta]:
    return {k: TensorMeta(n.shape, n.dtype) for k, n in p.outputs.items()}


def check_names(forward: Program, inverse: Program, metas: Mapping[str, TensorMeta],
                result: P.Plan, config: Mapping[str, Any] | None) -> None:
    """Raise if the inverse of ``result`` does not give back exactly ``metas``."""
    try:
        back = plan(inverse, output_metas(result), config)
    except ConversionError as exc:
        raise ConversionError(
            f"the result of {forward.name} cannot be mapped back ({exc.message}); the input is "
            "probably already converted, or half converted", key=exc.key, rule=exc.rule,
            span=exc.span) from None
    got = {k: TensorMeta(n.shape, n.dtype) for k, n in back.outputs.items()}
    if got == dict(metas):
        return
    lost = [k for k in metas if k not in got]
    extra = [k for k in got if k not in metas]
    changed = [k for k in metas if k in got and got[k] != metas[k]]
    # Keys the inverse touches in the *input* look like the forward's output already.
    converted = _already_converted(inverse, metas, config)
    lines = [f"{forward.name}: the result would not map back to the input"]
    if converted:
        lines.append("these input keys are already in the converted layout: "
                     + ", ".join(converted[:5]) + (" ..." if len(converted) > 5 else ""))
    if lost:
        lines.append(f"{len(lost)} input key(s) would not come back, e.g. {lost[0]!r}")
    if extra:
        lines.append(f"{len(extra)} key(s) would come back that were not in the input, e.g. "
                     f"{extra[0]!r}")
    for k in changed[:3]:
        lines.append(f"{k!r} would come back as {got[k].dtype}{list(got[k].shape)}, was "
                     f"{metas[k].dtype}{list(metas[k].shape)}")
    culprit = (converted or lost or extra or changed)[0]
    raise ConversionError("; ".join(lines), key=culprit,
                          hint="is the state dict already converted (or half converted)? "
                          "convert only what the rules expect")


def _already_converted(inverse: Program, metas: Mapping[str, TensorMeta],
                       config: Mapping[str, Any] | None) -> list[str]:
    try:
        p = plan(inverse, metas, config)
    except ConversionError:
        return []
    return [k for k in metas if k not in set(p.passthrough)]
