"""Evaluate a plan on in-memory tensors.

Renames and pass-through return the input tensor object itself; slices, selects and permutes are
views; only stack, cat and reshapes of non-contiguous data allocate. ``Same`` nodes are checked
bit-for-bit (not with ``==``, which would let -0.0 equal 0.0 and fail on NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from convlens.compiler import plan as P
from convlens.errors import ConversionError


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(_bytes(a), _bytes(b)))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # A flat contiguous copy: size-1 dims may keep odd strides even when "contiguous".
    return t.contiguous().reshape(-1).clone().view(torch.uint8)


def execute(plan: P.Plan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every output of ``plan``, computed from ``tensors`` (which must hold every Load key)."""
    memo: dict[int, torch.Tensor] = {}

    def fail(node: P.Node, message: str) -> ConversionError:
        rule = plan.rules[node.origin].label if 0 <= node.origin < len(plan.rules) else None
        keys = sorted({leaf.key for leaf in P.leaves(node)})
        return ConversionError(message, rule=rule, key=keys[0] if keys else None)

    def ev(node: P.Node) -> torch.Tensor:
        cached = memo.get(id(node))
        if cached is not None:
            return cached
        value = load(node) if isinstance(node, P.Load) else _EVAL[type(node)](node, ev, fail)
        if tuple(value.shape) != node.shape:  # pragma: no cover - planner and executor disagree
            raise fail(node, f"planned shape {list(node.shape)} but got {list(value.shape)}")
        memo[id(node)] = value
        return value

    def load(node: P.Load) -> torch.Tensor:
        try:
            t = tensors[node.key]
        except KeyError:
            raise ConversionError(f"tensor {node.key!r} is missing", key=node.key) from None
        return t

    return {key: ev(node) for key, node in plan.outputs.items()}


def _same(node: P.Same, ev: Callable[[P.Node], torch.Tensor],
          fail: Callable[[P.Node, str], ConversionError]) -> torch.Tensor:
    values = [ev(a) for a in node.args]
    for i, v in enumerate(values[1:], start=1):
        if not bit_equal(values[0], v):
            k0 = sorted({leaf.key for leaf in P.leaves(node.args[0])})
            ki = sorted({leaf.key for leaf in P.leaves(node.args[i])})
            raise fail(node, f"{', '.join(ki)} must equal {', '.join(k0)} bit for bit (the "
                       "result keeps one of them), but they differ")
    return values[0]


_EVAL: dict[type, Callable[..., torch.Tensor]] = {
    P.Stack: lambda n, ev, f: torch.stack([ev(a) for a in n.args], n.dim),
    P.Cat: lambda n, ev, f: torch.cat([ev(a) for a in n.args], n.dim),
    P.Slice: lambda n, ev, f: _slice(ev(n.arg), n),
    P.Select: lambda n, ev, f: ev(n.arg).select(n.dim, n.index),
    P.Permute: lambda n, ev, f: ev(n.arg).permute(n.dims),
    P.Reshape: lambda n, ev, f: ev(n.arg).reshape(n.shape),
    P.Same: _same,
}


def _slice(t: torch.Tensor, n: P.Slice) -> torch.Tensor:
    index = [slice(None)] * t.dim()
    index[n.dim] = slice(n.start, n.stop, n.step)
    return t[tuple(index)]
