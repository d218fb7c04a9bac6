"""Companion roles that belong to one part: ModelOpt's KV-cache scales.

ModelOpt stores the attention's K and V output scales on ``k_proj.k_scale`` and
``v_proj.v_scale`` (reference/quant-layouts.md, ModelOpt KV cache), next to whatever the
projection's own weight scheme is. When q/k/v are fused, each scale stays with the fused stem (the
place vLLM's qkv loader reads them from); when the fused tensor is split, each goes back to its own
part only, never duplicated to q or v. These tests build the tensors by hand and check both
directions bit for bit, and that every ambiguity is refused with the role named.
"""

from __future__ import annotations

import pytest
import torch
from bitexact import assert_bit_exact

import convlens
from convlens.compiler.schemes import companion_roles

H = 32
L = "layers.0.self_attn."
HUB = "encoder.layers.0.attn."


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fp8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return torch.where((b & 0x7F) == 0x7F, b ^ 1, b).view(torch.float8_e4m3fn)


def _scalar(g: torch.Generator) -> torch.Tensor:
    return torch.rand((), generator=g, dtype=torch.float32) + 0.5


def fp8_attention(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(nomic-bert hub tensors with a fused FP8 Wqkv, the in-memory q/k/v of the same bytes)."""
    g = _g(seed)
    w = _fp8((3 * H, H), g)
    scale, inp = _scalar(g), _scalar(g)
    k_scale, v_scale = _scalar(g), _scalar(g)
    hub = {HUB + "Wqkv.weight": w, HUB + "Wqkv.weight_scale": scale,
           HUB + "Wqkv.input_scale": inp, HUB + "Wqkv.k_scale": k_scale,
           HUB + "Wqkv.v_scale": v_scale}
    mem = {}
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        mem[L + f"{part}.weight"] = w[i * H:(i + 1) * H]
        mem[L + f"{part}.weight_scale"] = scale
        mem[L + f"{part}.input_scale"] = inp
    mem[L + "k_proj.k_scale"] = k_scale
    mem[L + "v_proj.v_scale"] = v_scale
    return hub, mem


def test_the_kv_cache_companion_is_shipped_as_data() -> None:
    roles = companion_roles()
    assert roles["k_scale"].homes[0] == "k_proj" and roles["v_scale"].homes[0] == "v_proj"
    assert roles["k_scale"].dtype == "F32" and roles["k_scale"].axes == ()


def test_split_gives_each_kv_scale_to_its_own_part_only() -> None:
    hub, mem = fp8_attention()
    conv = convlens.load_rules("nomic_bert")
    out = conv.apply(hub)
    assert_bit_exact(out, mem, "apply")
    assert L + "q_proj.k_scale" not in out and L + "v_proj.k_scale" not in out


def test_fuse_keeps_kv_scales_on_the_fused_stem() -> None:
    hub, mem = fp8_attention(1)
    conv = convlens.load_rules("nomic_bert")
    assert_bit_exact(conv.revert(mem), hub, "revert")
    assert_bit_exact(conv.apply(conv.revert(mem)), mem, "apply(revert)")


@pytest.mark.parametrize("view", [(), (1,)])
def test_kv_scales_keep_their_stored_shape(view: tuple[int, ...]) -> None:
    hub, mem = fp8_attention(2)
    hub[HUB + "Wqkv.k_scale"] = hub[HUB + "Wqkv.k_scale"].reshape(view)
    mem[L + "k_proj.k_scale"] = mem[L + "k_proj.k_scale"].reshape(view)
    conv = convlens.load_rules("nomic_bert")
    assert_bit_exact(conv.apply(hub), mem, "apply")
    assert_bit_exact(conv.revert(mem), hub, "revert")


def test_kv_scales_next_to_an_unquantized_weight() -> None:
    """KV-cache-only quantization: the projections stay bf16, the scales still follow."""
    hub, mem = fp8_attention(3)
    w = torch.randn(3 * H, H, generator=_g(9)).to(torch.bfloat16)
    for d in (hub, mem):
        for k in [k for k in d if k.endswith(("weight_scale", "input_scale"))]:
            del d[k]
    hub[HUB + "Wqkv.weight"] = w
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        mem[L + f"{part}.weight"] = w[i * H:(i + 1) * H]
    conv = convlens.load_rules("nomic_bert")
    assert_bit_exact(conv.apply(hub), mem, "apply")
    assert_bit_exact(conv.revert(mem), hub, "revert")


def test_a_kv_scale_on_a_part_that_is_not_its_home_is_refused() -> None:
    """A k_scale on q_proj could not be given back to q_proj by the split: refused on fuse."""
    _, mem = fp8_attention(4)
    mem[L + "q_proj.k_scale"] = mem.pop(L + "k_proj.k_scale")
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules("nomic_bert").revert(mem)
    assert info.value.role == "k_scale"
    assert "'q_proj'" in str(info.value) and "k_proj" in str(info.value)


def test_a_split_without_a_home_for_the_scale_is_refused() -> None:
    rules = """
conversion odd
split "{l*}.qkv" -> "{l*}.first", "{l*}.second", "{l*}.third"
  by split(0)
"""
    hub, _ = fp8_attention(5)
    sd = {k.replace(HUB + "Wqkv", "x.qkv"): v for k, v in hub.items()}
    with pytest.raises(convlens.ConversionError) as info:
        convlens.Conversion(convlens.compile_text(rules)).apply(sd)
    assert info.value.role in ("k_scale", "v_scale")
    assert "first, second, third" in str(info.value)


def test_a_kv_scale_of_the_wrong_dtype_is_refused() -> None:
    hub, _ = fp8_attention(6)
    hub[HUB + "Wqkv.k_scale"] = hub[HUB + "Wqkv.k_scale"].to(torch.bfloat16)
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules("nomic_bert").apply(hub)
    assert info.value.role == "k_scale" and "BF16" in str(info.value)


def test_kv_scales_cannot_be_stacked_with_experts() -> None:
    sd = {}
    g = _g(7)
    for e in range(2):
        for w in ("gate_proj", "up_proj", "down_proj"):
            sd[f"model.layers.0.mlp.experts.{e}.{w}.weight"] = torch.randn(8, 8, generator=g)
    sd["model.layers.0.mlp.experts.1.up_proj.k_scale"] = torch.ones(())
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules("qwen2_moe").apply(sd)
    assert "k_scale" in str(info.value) and "stack" in str(info.value)
