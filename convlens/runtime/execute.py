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
from convlens.runtime.report import LossyEvent, RunReport


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


def execute(plan: P.Plan, tensors: Mapping[str, torch.Tensor],
            report: RunReport | None = None, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """Every output of ``plan``, computed from ``tensors`` (which must hold every Load key).
    Lossy steps taken under a policy are appended to ``report``. With ``copy``, every output
    is a contiguous tensor of its own (what ``safetensors.torch.save_file`` needs); otherwise
    outputs are views of the inputs where possible and may share memory."""
    memo: dict[int, torch.Tensor] = {}
    events = report.lossy if report is not None else []

    def fail(node: P.Node, message: str) -> ConversionError:
        rule = plan.rules[node.origin].label if 0 <= node.origin < len(plan.rules) else None
        keys = sorted({leaf.key for leaf in P.leaves(node)})
        return ConversionError(message, rule=rule, key=keys[0] if keys else None)

    def ev(node: P.Node) -> torch.Tensor:
        cached = memo.get(id(node))
        if cached is not None:
            return cached
        if isinstance(node, P.Load):
            value = load(node)
        elif isinstance(node, P.Reduce):
            value = _reduce(node, ev, plan, events)
        elif isinstance(node, P.Rescale):
            value = _rescale(node, ev, plan, events)
        else:
            value = _EVAL[type(node)](node, ev, fail)
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

    result = {key: ev(node) for key, node in plan.outputs.items()}
    # ev is a recursive closure (a reference cycle through its cell): without this the memo of
    # intermediate tensors would live until the cyclic GC runs, not until this call returns
    memo.clear()
    return separate(result, tensors) if copy else result


def separate(outputs: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    """Contiguous outputs that share no memory with each other or with the inputs."""
    taken = {t.untyped_storage().data_ptr() for t in inputs.values() if t.numel()}
    out = {}
    for key, t in outputs.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in taken or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None:
            taken.add(ptr)
        out[key] = t
    return out


def _difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two tensors first differ, with both values (for messages)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f": {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.numel() == 1:
        return f": {a.double().item()!r} vs {b.double().item()!r}"
    diff = (_bytes(a).reshape(a.numel(), -1) != _bytes(b).reshape(b.numel(), -1)).any(1)
    i = int(diff.nonzero()[0, 0]) if bool(diff.any()) else 0
    where = list(torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else []
    index = [int(w) for w in where]
    return (f": at {index} {a.reshape(-1)[i].double().item()!r} vs "
            f"{b.reshape(-1)[i].double().item()!r}")


POLICY_HINT = ("if a lossy step is acceptable, allow a policy: max (activation scales), "
               "rescale (NVFP4: move the ratio into the block scales), requantize (FP8 weights)")


def _same(node: P.Same, ev: Callable[[P.Node], torch.Tensor],
          fail: Callable[[P.Node, str], ConversionError]) -> torch.Tensor:
    values = [ev(a) for a in node.args]
    for i, v in enumerate(values[1:], start=1):
        if not bit_equal(values[0], v):
            k0 = sorted({leaf.key for leaf in P.leaves(node.args[0])})
            ki = sorted({leaf.key for leaf in P.leaves(node.args[i])})
            detail = _difference(values[0], v)
            err = fail(node, f"{', '.join(ki) or 'a recomputed value'} must equal "
                       f"{', '.join(k0) or 'a recomputed value'} bit for bit (the result keeps "
                       f"one of them), but they differ{detail}")
            if detail:
                err.hint = POLICY_HINT
            raise err
    return values[0]


def _verify(node: P.Verify, ev: Callable[[P.Node], torch.Tensor],
            fail: Callable[[P.Node, str], ConversionError]) -> torch.Tensor:
    for check in node.checks:
        ev(check)
    return ev(node.arg)


def _rule(plan: P.Plan, node: P.Node) -> str:
    return plan.rules[node.origin].label if 0 <= node.origin < len(plan.rules) else "?"


def _keys(node: P.Node) -> tuple[str, ...]:
    return tuple(sorted({leaf.key for leaf in P.leaves(node)}))


def _reduce(node: P.Reduce, ev: Callable[[P.Node], torch.Tensor], plan: P.Plan,
            events: list[LossyEvent]) -> torch.Tensor:
    values = [ev(a) for a in node.args]
    if all(bit_equal(values[0], v) for v in values[1:]):
        return values[0]
    stacked = torch.stack([v.to(torch.float64) for v in values])
    common = stacked.amax(0) if node.mode == "max" else stacked.amin(0)
    out = common.to(values[0].dtype)
    shown = [v.to(torch.float64).flatten()[:4].tolist() for v in values]
    _record(events, LossyEvent(
        _rule(plan, node), node.role, _keys(node), f"reconcile ({node.mode})",
        f"parts {shown} -> {out.to(torch.float64).flatten()[:4].tolist()}",
        float(((stacked - common).abs() / common.abs().clamp_min(1e-30)).max())))
    return out


def _record(events: list[LossyEvent], event: LossyEvent) -> None:
    # A value shared by several outputs (one reconciled scale) is one step, however often it
    # is evaluated (the disk runtime evaluates each output on its own).
    if event not in events:
        events.append(event)


def _rescale(node: P.Rescale, ev: Callable[[P.Node], torch.Tensor], plan: P.Plan,
             events: list[LossyEvent]) -> torch.Tensor:
    x, num, den = ev(node.arg), ev(node.num), ev(node.den)
    if bit_equal(num, den):
        return x
    ratio = num.to(torch.float64) / den.to(torch.float64)
    exact = x.to(torch.float64) * ratio
    out = exact.to(x.dtype)
    nonzero = exact != 0
    err = ((out.to(torch.float64) - exact).abs() / exact.abs().clamp_min(1e-300))[nonzero]
    naive = float((ratio - 1).abs().max())
    _record(events, LossyEvent(_rule(plan, node), node.role, _keys(node.arg), "rescale",
                               f"by {ratio.flatten()[:4].tolist()}",
                               float(err.max()) if err.numel() else 0.0, naive))
    return out


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
    P.Shift: lambda n, ev, f: _shift(n, ev, f),
}


def _shift(node: P.Shift, ev: Callable[[P.Node], torch.Tensor],
           fail: Callable[[P.Node, str], ConversionError]) -> torch.Tensor:
    x = ev(node.arg)
    outside = (x < node.lo) | (x >= node.hi)
    if bool(outside.any()):
        i = int(outside.reshape(-1).nonzero()[0, 0])
        raise fail(node, f"{node.role}[{i}] = {int(x.reshape(-1)[i])} points outside groups "
                   f"{node.lo}..{node.hi - 1}, the groups of its part: its groups straddle the "
                   "cut (act-order), so the part cannot be cut out")
    return (x.to(torch.int64) + node.delta).to(x.dtype)


def _slice(t: torch.Tensor, n: P.Slice) -> torch.Tensor:
    index = [slice(None)] * t.dim()
    index[n.dim] = slice(n.start, n.stop, n.step)
    return t[tuple(index)]
