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
from convlens.compiler.planner import HasMeta, TensorMeta, plan
from convlens.compiler.program import Program
from convlens.errors import ConversionError


def output_metas(p: P.Plan) -> dict[str, TensorMeta]:
    return {k: TensorMeta(n.shape, n.dtype) for k, n in p.outputs.items()}


def check_names(forward: Program, inverse: Program, metas: Mapping[str, HasMeta],
                result: P.Plan, config: Mapping[str, Any] | None) -> None:
    """Raise if the inverse of ``result`` does not give back exactly ``metas``.

    Two shortcuts, both with the very same outcome as the plain version (plan the inverse on
    ``output_metas(result)``, build ``got`` and compare it with ``dict(metas)``):

    - the inverse is planned on ``result.outputs`` itself: ``plan`` reads nothing of a meta but
      ``shape`` and ``dtype`` (each input becomes ``Load(key, tuple(shape), dtype)``), and a
      node has the same two values that ``output_metas`` would copy into a TensorMeta;
    - ``_comes_back`` compares without building a TensorMeta per key, and answers True only
      where ``got == want`` holds; on False the comparison is made again the plain way, so
      every message is built exactly as before from ``got``.

    ``metas`` may be anything with ``shape`` and ``dtype`` (TensorMeta, safetensors header
    entries); ``want`` is their TensorMeta copy."""
    try:
        back = plan(inverse, result.outputs, config)
    except ConversionError as exc:
        raise ConversionError(
            f"the result of {forward.name} cannot be mapped back ({exc.message}); the input is "
            "probably already converted, or half converted", key=exc.key, rule=exc.rule,
            span=exc.span) from None
    if _comes_back(back.outputs, metas):
        return
    want = {k: TensorMeta(tuple(m.shape), m.dtype) for k, m in metas.items()}
    got = {k: TensorMeta(n.shape, n.dtype) for k, n in back.outputs.items()}
    if got == want:  # pragma: no cover - only metas whose shape is not a tuple get here
        return
    lost = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    changed = [k for k in want if k in got and got[k] != want[k]]
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
                     f"{want[k].dtype}{list(want[k].shape)}")
    culprit = (converted or lost or extra or changed)[0]
    raise ConversionError("; ".join(lines), key=culprit,
                          hint="is the state dict already converted (or half converted)? "
                          "convert only what the rules expect")


def _comes_back(outputs: Mapping[str, P.Node], metas: Mapping[str, HasMeta]) -> bool:
    """True only if ``{k: TensorMeta(n.shape, n.dtype) for k, n in outputs.items()}`` equals
    ``{k: TensorMeta(tuple(m.shape), m.dtype) for k, m in metas.items()}``.

    Why: two dicts are equal when they have the same keys and equal values under each key. The
    same number of keys, each key of ``outputs`` in ``metas``, gives the same key set. Two
    TensorMetas are equal when ``(shape, dtype)`` are (the dataclass ``__eq__``), which the test
    below spells out field by field (a node's shape is a tuple; a meta whose shape is not a
    tuple answers False here). Anything else answers False, and the caller then compares the
    plain way."""
    if len(outputs) != len(metas):
        return False
    for k, n in outputs.items():
        m = metas.get(k)
        if m is None or not (n.shape == m.shape and n.dtype == m.dtype):
            return False
    return True


def _already_converted(inverse: Program, metas: Mapping[str, HasMeta],
                       config: Mapping[str, Any] | None) -> list[str]:
    try:
        p = plan(inverse, metas, config)
    except ConversionError:
        return []
    return [k for k in metas if k not in set(p.passthrough)]
