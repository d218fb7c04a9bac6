"""Reference dequantizers: a stem's roles -> its logical tensor, from the scheme's formula.

Each role is decoded to float64 on the logical shape: packed roles are unpacked and their codes
decoded by the codec; blocked roles are repeated over their blocks and cropped; roles without an
axis broadcast. Then the scheme's formula (plain data compiled from its ``dequant`` line) is
evaluated. Float64 keeps the arithmetic exact for every format here, so "dequantization
commutes" can be asserted bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from convlens.compiler.layout import AxisSpec, Scheme
from convlens.runtime.execute import unpack

STORAGE_BITS = {torch.uint8: 8, torch.int8: 8, torch.int16: 16, torch.int32: 32}

# FP4 E2M1: magnitude index 0..7 -> value; bit 3 is the sign.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def decode_codes(codes: torch.Tensor, codec: str) -> torch.Tensor:
    c = codes.to(torch.int64)
    if codec == "e2m1":
        table = torch.tensor(E2M1, dtype=torch.float64)
        mag = table[c & 7]
        return torch.where((c & 8) != 0, -mag, mag)
    if codec in ("u4", "u8", "u2", "u3"):
        return c.to(torch.float64)
    if codec == "s4":
        return torch.where(c >= 8, c - 16, c).to(torch.float64)
    if codec == "s8":
        return torch.where(c >= 128, c - 256, c).to(torch.float64)
    if codec == "u4o8":
        return (c - 8).to(torch.float64)
    if codec == "u8o128":
        return (c - 128).to(torch.float64)
    raise ValueError(f"unknown codec {codec}")


def role_on_logical(t: torch.Tensor, layout: tuple[AxisSpec, ...], logical: tuple[str, ...],
                    shape: tuple[int, ...],
                    groups: Mapping[str, tuple[torch.Tensor, tuple[str, ...]]] | None = None
                    ) -> torch.Tensor:
    """One role, canonical layout -> float64 broadcastable to the logical shape. ``groups``
    maps an axis to the block of each element (GPTQ act-order g_idx) where blocks are not
    contiguous."""
    sizes = dict(zip(logical, shape, strict=True))
    x = t
    packed = [i for i, a in enumerate(layout) if a.kind == "packed"]
    if packed:
        i = packed[0]
        ax = layout[i]
        bits = STORAGE_BITS[x.dtype] // ax.factor
        codes = unpack(x, i, ax.factor, bits, ax.positions(bits))
        x = decode_codes(codes, ax.codec or "u4")
    else:
        x = x.to(torch.float64)
    for i, a in enumerate(layout):
        if a.kind == "blocked" and groups and a.name in groups:
            x = _gather_groups(x, i, layout, *groups[a.name])
        elif a.kind == "blocked":
            x = x.repeat_interleave(a.factor, dim=i).narrow(i, 0, sizes[a.name])
        if a.kind == "packed":
            x = x.narrow(i, 0, sizes[a.name])
    # put the role's axes in logical order, with size-1 dims for the axes it lacks
    names = [a.name for a in layout]
    order = sorted(range(len(names)), key=lambda k: logical.index(names[k]))
    x = x.permute(order)
    present = [names[k] for k in order]
    view = [sizes[a] if a in present else 1 for a in logical]
    return x.reshape(view)


def _gather_groups(x: torch.Tensor, dim: int, layout: tuple[AxisSpec, ...], index: torch.Tensor,
                   index_axes: tuple[str, ...]) -> torch.Tensor:
    """x[..., index[...,i], ...] along ``dim``: each element takes its own block's value. The
    index may carry stacked axes too (one g_idx per expert)."""
    names = [a.name for a in layout]
    order = sorted(range(len(index_axes)), key=lambda k: names.index(index_axes[k]))
    idx = index.to(torch.int64).permute(order)
    present = [index_axes[k] for k in order]
    view = [idx.shape[present.index(n)] if n in present else 1 for n in names]
    shape = list(x.shape)
    shape[dim] = idx.shape[present.index(names[dim])]
    return torch.gather(x, dim, idx.reshape(view).expand(shape))


def evaluate(formula: Any, values: Mapping[str, torch.Tensor],
             optional: frozenset[str] = frozenset()) -> torch.Tensor:
    kind = formula[0]
    if kind == "int":
        return torch.tensor(float(formula[1]), dtype=torch.float64)
    if kind == "role":
        if formula[1] not in values and formula[1] in optional:
            return torch.tensor(1.0, dtype=torch.float64)  # e.g. a folded pre_quant_scale
        return values[formula[1]]
    if kind == "call":
        x = evaluate(formula[2], values, optional)
        if formula[1] == "e8m0":
            return torch.pow(2.0, x - 127.0)
        if formula[1] == "recip":
            return 1.0 / x
        raise ValueError(formula[1])
    a, b = evaluate(formula[1], values, optional), evaluate(formula[2], values, optional)
    if kind == "+":
        return a + b
    if kind == "-":
        return a - b
    if kind == "*":
        return a * b
    return a / b


def dequantize(scheme: Scheme, roles: Mapping[str, torch.Tensor],
               layouts: Mapping[str, tuple[AxisSpec, ...]], views: Mapping[str, int | None],
               logical: tuple[str, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """The logical float64 tensor of one stem."""
    if scheme.dequant is None:
        return roles[scheme.primary].to(torch.float64)
    values = {}
    sizes = dict(zip(logical, shape, strict=True))
    # index roles (GPTQ g_idx) say which block each element of their axis belongs to
    groups = {scheme.roles[n].axes[0].name: (roles[n], tuple(a.name for a in layouts[n]))
              for n in roles if scheme.roles[n].index and scheme.roles[n].axes}
    for name, t in roles.items():
        spec = scheme.roles[name]
        if spec.kind == "shape" or spec.index:
            continue
        layout = layouts[name]
        canonical = tuple(
            a.physical(sizes[a.name]) for a in layout)
        x = t.reshape(canonical) if views.get(name) is not None or t.shape != canonical else t
        values[name] = role_on_logical(x, layout, logical, shape, groups)
    optional = frozenset(n for n, spec in scheme.roles.items() if spec.optional)
    return evaluate(scheme.dequant, values, optional).expand(shape)
