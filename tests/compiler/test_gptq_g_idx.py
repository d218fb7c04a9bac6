"""GPTQ ``g_idx`` through splits and joins along ``in``: sliced and renumbered, never guessed.

``g_idx[i]`` is the group (row of ``scales`` / ``qzeros``) of input channel ``i``. Cutting the
input axis at a group boundary gives each part the channels' slice with group numbers counted
from the part's first group; joining adds the groups before. That is exact whenever every
channel's group lies inside its part, with act-order (desc_act) shuffles too; a channel whose group
lies across the cut cannot be cut out, which is an error naming the role and the value.
"""

from __future__ import annotations

import pytest
import torch
from bitexact import assert_bit_exact

import convlens
from convlens.checking import check_dequant_commutes

OUT, IN, G = 16, 128, 32  # 4 groups along in
CONFIG = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": G}}
SPLIT = """
conversion wide_split
split "{l*}.wide" -> "{l*}.left", "{l*}.right" by split(1)
"""


def gptq(g_idx: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, generator=g,  # noqa: E731
                                       dtype=torch.int64).to(torch.int32)
    return {"m.wide.qweight": rnd(IN // 8, OUT), "m.wide.qzeros": rnd(IN // G, OUT // 8),
            "m.wide.scales": (torch.rand(IN // G, OUT, generator=g) + 0.5).half(),
            "m.wide.g_idx": torch.tensor(g_idx, dtype=torch.int32)}


def conversion() -> convlens.Conversion:
    return convlens.Conversion(convlens.compile_text(SPLIT))


def test_split_slices_and_renumbers_g_idx_and_joins_back() -> None:
    x = gptq([i // G for i in range(IN)])
    y = conversion().apply(x, CONFIG)
    assert y["m.left.g_idx"].tolist() == [i // G for i in range(IN // 2)]
    assert y["m.right.g_idx"].tolist() == [i // G for i in range(IN // 2)]  # renumbered from 0
    assert torch.equal(y["m.right.scales"], x["m.wide.scales"][2:])
    assert_bit_exact(conversion().revert(y, CONFIG), x, "revert(apply)")


def test_act_order_inside_each_part_is_exact_and_dequantization_commutes() -> None:
    g = torch.Generator().manual_seed(3)
    left = [i // G for i in range(IN // 2)]
    right = [2 + i // G for i in range(IN // 2)]
    shuffled = ([left[i] for i in torch.randperm(IN // 2, generator=g).tolist()]
                + [right[i] for i in torch.randperm(IN // 2, generator=g).tolist()])
    x = gptq(shuffled, 1)
    y = conversion().apply(x, CONFIG)
    assert y["m.right.g_idx"].tolist() == [v - 2 for v in shuffled[IN // 2:]]
    assert_bit_exact(conversion().revert(y, CONFIG), x, "revert(apply)")
    assert check_dequant_commutes(conversion().program, x, CONFIG) == 2


def test_a_group_across_the_cut_is_refused_naming_the_value() -> None:
    idx = [i // G for i in range(IN)]
    idx[5], idx[100] = idx[100], idx[5]  # channel 5 (left half) now in group 3 (right half)
    with pytest.raises(convlens.ConversionError) as info:
        conversion().apply(gptq(idx), CONFIG)
    msg = str(info.value)
    assert "g_idx[5] = 3 points outside groups 0..1" in msg and "act-order" in msg


def test_a_cut_inside_a_group_is_refused_at_plan_time() -> None:
    text = SPLIT.replace("by split(1)", "by split(1, sizes=[48, 80])")
    with pytest.raises(convlens.ConversionError, match="not a multiple of 32"):
        convlens.Conversion(convlens.compile_text(text)).apply(
            gptq([i // G for i in range(IN)]), CONFIG)
