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
from convlens.runtime.dtypes import TORCH_DTYPES


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(_bytes(a), _bytes(b)))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # A fresh flat buffer: contiguous() and clone() keep odd strides on one-element views.
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return flat.view(torch.uint8)


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
            detail = ""
            if values[0].numel() == 1 and v.numel() == 1:
                detail = f": {values[0].float().item()!r} vs {v.float().item()!r}"
            raise fail(node, f"{', '.join(ki) or 'a recomputed value'} must equal "
                       f"{', '.join(k0) or 'a recomputed value'} bit for bit (the result keeps "
                       f"one of them), but they differ{detail}")
    return values[0]


def _verify(node: P.Verify, ev: Callable[[P.Node], torch.Tensor],
            fail: Callable[[P.Node, str], ConversionError]) -> torch.Tensor:
    for check in node.checks:
        ev(check)
    return ev(node.arg)


def unpack(t: torch.Tensor, dim: int, factor: int, bits: int, positions: tuple[int, ...]
           ) -> torch.Tensor:
    """Storage elements -> int32 codes, ``factor`` per element along ``dim``."""
    wide = t.to(torch.int64)
    mask = (1 << bits) - 1
    parts = [(wide >> pos) & mask for pos in positions]
    codes = torch.stack(parts, dim=dim + 1)
    shape = list(t.shape)
    shape[dim] *= factor
    return codes.reshape(shape).to(torch.int32)


def pack(codes: torch.Tensor, dim: int, factor: int, bits: int, positions: tuple[int, ...],
         dtype: torch.dtype) -> torch.Tensor:
    """int codes -> storage elements of ``dtype`` (the inverse of :func:`unpack`)."""
    shape = list(codes.shape)
    shape[dim] //= factor
    grouped = codes.to(torch.int64).reshape(shape[:dim] + [shape[dim], factor] + shape[dim + 1:])
    mask = (1 << bits) - 1
    word = torch.zeros(shape, dtype=torch.int64)
    for j, pos in enumerate(positions):
        word |= (grouped.select(dim + 1, j) & mask) << pos
    total = bits * factor
    if dtype in (torch.int8, torch.int16, torch.int32, torch.int64) and total < 64:
        word = torch.where(word >= (1 << (total - 1)), word - (1 << total), word)
    return word.to(dtype)


_EVAL: dict[type, Callable[..., torch.Tensor]] = {
    P.Stack: lambda n, ev, f: torch.stack([ev(a) for a in n.args], n.dim),
    P.Cat: lambda n, ev, f: torch.cat([ev(a) for a in n.args], n.dim),
    P.Slice: lambda n, ev, f: _slice(ev(n.arg), n),
    P.Select: lambda n, ev, f: ev(n.arg).select(n.dim, n.index),
    P.Permute: lambda n, ev, f: ev(n.arg).permute(n.dims),
    P.Reshape: lambda n, ev, f: ev(n.arg).reshape(n.shape),
    P.Same: _same,
    P.Take: lambda n, ev, f: ev(n.arg).index_select(n.dim, torch.tensor(n.indices)),
    P.Unpack: lambda n, ev, f: unpack(ev(n.arg), n.dim, n.factor, n.bits, n.positions),
    P.Pack: lambda n, ev, f: pack(ev(n.arg), n.dim, n.factor, n.bits, n.positions,
                                  TORCH_DTYPES[n.dtype]),
    P.Const: lambda n, ev, f: torch.tensor(n.values, dtype=TORCH_DTYPES[n.dtype]).reshape(
        n.shape),
    P.Verify: _verify,
}


def _slice(t: torch.Tensor, n: P.Slice) -> torch.Tensor:
    index = [slice(None)] * t.dim()
    index[n.dim] = slice(n.start, n.stop, n.step)
    return t[tuple(index)]
