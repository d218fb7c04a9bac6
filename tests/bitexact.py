"""Bit-exact comparison of state dicts, shared by the quantized tests."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (a fresh flat copy: one-element views keep odd strides)."""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return flat.view(torch.uint8)


def assert_bit_exact(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                     what: str = "") -> None:
    """Same keys, and every tensor the same dtype, shape and bytes."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{what}: missing {missing[:8]}, unexpected {extra[:8]}"
    for k in sorted(want):
        g, w = got[k], want[k]
        assert g.dtype == w.dtype, f"{what}: {k}: dtype {g.dtype} != {w.dtype}"
        assert tuple(g.shape) == tuple(w.shape), (
            f"{what}: {k}: shape {list(g.shape)} != {list(w.shape)}")
        assert torch.equal(raw_bits(g), raw_bits(w)), f"{what}: {k}: bytes differ"


def state_dict_diff(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
                    ) -> list[str]:
    """Readable differences between two state dicts: missing and unexpected keys, then keys
    whose shape, dtype or values differ (empty when equal)."""
    lines = []
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        lines.append(f"{len(missing)} missing: {', '.join(missing[:8])}")
    if extra:
        lines.append(f"{len(extra)} unexpected: {', '.join(extra[:8])}")
    bad = []
    for k in sorted(set(got) & set(want)):
        g, w = got[k], want[k]
        if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            bad.append(f"{k}: {list(g.shape)} {g.dtype} vs {list(w.shape)} {w.dtype}")
        elif not torch.equal(g, w):
            bad.append(f"{k}: values")
    if bad:
        lines.append(f"{len(bad)} differ: {'; '.join(bad[:8])}")
    return lines
