"""Regressions on quantized companions: transformers' save-side revert against convlens.

transformers 5.x reverts its load-time conversion on save with ``revert_weight_conversion(model,
state_dict)``. Its reverse converters match ``...experts.gate_up_proj(?!\\w)`` and push every dotted
companion (``gate_up_proj.weight_scale_2``, ``gate_up_proj.weight_scale_inv``) through the ops
sized for the weight: a 0-d scale cannot be chunked, an ``[E]`` vector is split into junk names
(``...w2.weight.weight_scale_2``), FP8 block scales are chunked as if they were rows. Suffix
companions (``gate_up_proj_weight_scale_2``) are not matched at all and leave unconverted.
(shared/reference/transformers-conversion.md section 6.)

Each behaviour gets two tests: one pins what transformers does (it raises or writes junk), one
shows that convlens gets the same tensors right, bit for bit, or refuses with an error naming the
role. The transformers models are tiny ``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM`` built from
a config and loaded with ``save_pretrained`` + ``from_pretrained``, so ``_weight_conversions`` is
the one a real load records. Tests that do not call transformers run without it.

The quantized tensors are made here, not by convlens: per-expert hub tensors first, then the
in-memory ones by ``torch.stack`` / ``torch.cat`` of the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from bitexact import assert_bit_exact, raw_bits

import convlens

StateDict = dict[str, torch.Tensor]

# --- helpers ---------------------------------------------------------------------------------


class Gen:
    """Deterministic random bytes. ``f8`` is any FP8 E4M3 bit pattern but NaN (0x7f, 0xff)."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def u8(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=self.g)

    def f8(self, *shape: int) -> torch.Tensor:
        b = self.u8(*shape)
        b = torch.where((b & 0x7F) == 0x7F, b ^ 0x01, b)
        return b.view(torch.float8_e4m3fn)

    def f32(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, dtype=torch.float32) + 0.25


def nvfp4_linear(gen: Gen, out: int, inp: int, scale_2: torch.Tensor,
                 input_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """One ModelOpt NVFP4 linear: role -> tensor (module naming roles)."""
    return {"weight": gen.u8(out, inp // 2), "weight_scale": gen.f8(out, inp // 16),
            "weight_scale_2": scale_2.clone(), "input_scale": input_scale.clone()}


# transformers-side names per family: (hub expert stem with {e} and {w}, gate, up, down)
HUB = {
    "mixtral": ("model.layers.0.block_sparse_moe.experts.{e}.{w}", "w1", "w3", "w2"),
    "qwen3_moe": ("model.layers.0.mlp.experts.{e}.{w}", "gate_proj", "up_proj", "down_proj"),
}
RULES = {"mixtral": "mixtral", "qwen3_moe": "qwen2_moe"}
MEM = "model.layers.0.mlp.experts."
E, H, I = 4, 32, 16  # noqa: E741  (experts, hidden, intermediate; NVFP4: multiples of 16)


def nvfp4_experts(family: str, seed: int = 0) -> tuple[StateDict, StateDict]:
    """(per-expert hub tensors, the same bytes stacked/fused in memory layout).

    Every expert has its own weight_scale_2 (gate == up within an expert, as ModelOpt exports),
    input_scale is one value for all experts."""
    gen = Gen(seed)
    stem, gate, up, down = HUB[family]
    hub: StateDict = {}
    per: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    inp_gu, inp_d = torch.tensor(0.0625), torch.tensor(0.1875)
    for e in range(E):
        s2_gu, s2_d = torch.tensor(0.5 + e / 8), torch.tensor(1.25 + e / 4)
        per[e, gate] = nvfp4_linear(gen, I, H, s2_gu, inp_gu)
        per[e, up] = nvfp4_linear(gen, I, H, s2_gu, inp_gu)
        per[e, down] = nvfp4_linear(gen, H, I, s2_d, inp_d)
        for w in (gate, up, down):
            for role, t in per[e, w].items():
                hub[f"{stem.format(e=e, w=w)}.{role}"] = t
    mem: StateDict = {
        MEM + "gate_up_proj": torch.stack(
            [torch.cat([per[e, gate]["weight"], per[e, up]["weight"]]) for e in range(E)]),
        MEM + "gate_up_proj_weight_scale": torch.stack(
            [torch.cat([per[e, gate]["weight_scale"], per[e, up]["weight_scale"]])
             for e in range(E)]),
        MEM + "gate_up_proj_weight_scale_2": torch.stack(
            [per[e, gate]["weight_scale_2"] for e in range(E)]),
        MEM + "gate_up_proj_input_scale": inp_gu.clone(),
        MEM + "down_proj": torch.stack([per[e, down]["weight"] for e in range(E)]),
        MEM + "down_proj_weight_scale": torch.stack(
            [per[e, down]["weight_scale"] for e in range(E)]),
        MEM + "down_proj_weight_scale_2": torch.stack(
            [per[e, down]["weight_scale_2"] for e in range(E)]),
        MEM + "down_proj_input_scale": inp_d.clone(),
    }
    return hub, mem


# --- tiny transformers models ------------------------------------------------------------------


def _load_roundtrip(model_cls: Any, config: Any, where: Path) -> Any:
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(where)
    loaded = model_cls.from_pretrained(where)
    assert loaded._weight_conversions, "from_pretrained recorded no weight conversions"
    return loaded


def _mixtral(hidden: int, inter: int, experts: int, where: Path) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=32, hidden_size=hidden, intermediate_size=inter,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=hidden // 2, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=32)
    return _load_roundtrip(MixtralForCausalLM, cfg, where)


def _qwen3_moe(hidden: int, inter: int, experts: int, where: Path) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=hidden, intermediate_size=2 * inter,
                         moe_intermediate_size=inter, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=hidden // 2, num_experts=experts,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=32)
    return _load_roundtrip(Qwen3MoeForCausalLM, cfg, where)


@pytest.fixture(scope="module")
def hf() -> Any:
    """transformers.core_model_loading (skips the test without transformers)."""
    pytest.importorskip("transformers")
    import transformers.core_model_loading as core

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return core


@pytest.fixture(scope="module")
def models(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf_models")
    return {"mixtral": _mixtral(H, I, E, root / "mixtral"),
            "qwen3_moe": _qwen3_moe(H, I, E, root / "qwen3_moe")}


def with_extra(model: Any, extra: Mapping[str, torch.Tensor]) -> StateDict:
    sd = dict(model.state_dict())
    sd.update(extra)
    return sd


FAMILIES = ("mixtral", "qwen3_moe")


# --- 1. a 0-d weight_scale_2 next to a fused gate_up_proj ----------------------------------------


@pytest.mark.transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_revert_crashes_on_0d_weight_scale_2_of_fused_gate_up(
        hf: Any, models: dict[str, Any], family: str) -> None:
    sd = with_extra(models[family], {MEM + "gate_up_proj.weight_scale_2": torch.tensor(0.5)})
    with pytest.raises(RuntimeError, match="chunk expects at least a 1-dimensional tensor"):
        hf.revert_weight_conversion(models[family], sd)


@pytest.mark.transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_revert_crashes_on_0d_weight_scale_2_of_stacked_down_proj(
        hf: Any, models: dict[str, Any], family: str) -> None:
    sd = with_extra(models[family], {MEM + "down_proj.weight_scale_2": torch.tensor(0.5)})
    with pytest.raises(IndexError, match="no dimensions"):
        hf.revert_weight_conversion(models[family], sd)


@pytest.mark.transformers
def test_transformers_save_pretrained_crashes_on_0d_weight_scale_2(
        hf: Any, models: dict[str, Any], tmp_path: Path) -> None:
    model = models["mixtral"]
    sd = with_extra(model, {MEM + "gate_up_proj.weight_scale_2": torch.tensor(0.5)})
    with pytest.raises(RuntimeError, match="chunk expects at least a 1-dimensional tensor"):
        model.save_pretrained(tmp_path, state_dict=sd)


@pytest.mark.transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_revert_leaves_suffix_scales_stacked_under_a_wrong_name(
        hf: Any, models: dict[str, Any], family: str) -> None:
    """``gate_up_proj_weight_scale_2`` (ModelOpt's suffix name) is not matched by the reverse
    converter: it comes out still stacked, not as per-expert scalars."""
    _, mem = nvfp4_experts(family)
    extra = {k: v for k, v in mem.items() if k.endswith("_weight_scale_2")}
    out = hf.revert_weight_conversion(models[family], with_extra(models[family], extra))
    stem, gate, _, _ = HUB[family]
    assert f"{stem.format(e=0, w=gate)}.weight_scale_2" not in out
    leftovers = sorted(k for k in out if k.endswith("gate_up_proj_weight_scale_2"))
    assert len(leftovers) == 1 and tuple(out[leftovers[0]].shape) == (E,)


@pytest.mark.transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_convlens_reverts_nvfp4_experts_to_per_expert_0d_scales_bit_exact(
        hf: Any, models: dict[str, Any], family: str) -> None:
    """The whole in-memory state dict, NVFP4 experts included: convlens gives every expert its
    own 0-d weight_scale_2 (and the shared input_scale) back under the hub name, and every other
    key as transformers itself reverts it."""
    model = models[family]
    hub, mem = nvfp4_experts(family)
    plain = dict(model.state_dict())
    expert_keys = {MEM + "gate_up_proj", MEM + "down_proj"}
    sd = {k: v for k, v in plain.items() if k not in expert_keys} | mem
    conv = convlens.load_rules(RULES[family])
    got = conv.revert(sd, model.config)

    want_plain = hf.revert_weight_conversion(model, plain)
    want = {k: v for k, v in want_plain.items() if ".experts." not in k} | hub
    assert_bit_exact(got, want, f"{family} revert")
    stem, gate, up, down = HUB[family]
    for e in range(E):
        for w in (gate, up):
            t = got[f"{stem.format(e=e, w=w)}.weight_scale_2"]
            assert t.shape == () and t.item() == 0.5 + e / 8
        assert got[f"{stem.format(e=e, w=down)}.input_scale"].shape == ()
    assert_bit_exact(conv.apply(got, model.config), sd, f"{family} apply(revert)")


@pytest.mark.parametrize("family", FAMILIES)
def test_convlens_never_guesses_a_0d_weight_scale_2_on_stacked_experts(family: str) -> None:
    """One 0-d weight_scale_2 for a whole stacked gate_up_proj (the layout ModelOpt writes for
    BMM experts) either comes back on every expert's gate and up unchanged, or is refused with
    an error naming the role; never a chunked or misnamed tensor."""
    _, mem = nvfp4_experts(family)
    mem[MEM + "gate_up_proj_weight_scale_2"] = torch.tensor(0.75)
    conv = convlens.load_rules(RULES[family])
    try:
        out = conv.revert(mem)
    except convlens.ConversionError as exc:
        assert "weight_scale_2" in str(exc)
        return
    stem, gate, up, _ = HUB[family]
    for e in range(E):
        for w in (gate, up):
            t = out[f"{stem.format(e=e, w=w)}.weight_scale_2"]
            assert t.shape == () and t.item() == 0.75


@pytest.mark.parametrize("family", FAMILIES)
def test_convlens_refuses_dotted_companion_of_param_named_experts(family: str) -> None:
    """Under ``naming param`` the stacked weight is ``experts.gate_up_proj`` and its scales are
    ``gate_up_proj_<role>``; ``gate_up_proj.weight_scale_2`` has no place there: an error naming
    the key, where transformers would chunk it."""
    _, mem = nvfp4_experts(family)
    mem[MEM + "gate_up_proj.weight_scale_2"] = mem.pop(MEM + "gate_up_proj_weight_scale_2")
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules(RULES[family]).revert(mem)
    assert MEM + "gate_up_proj.weight_scale_2" in str(info.value)


# --- 2. [E] per-expert weight_scale_2 through unstack --------------------------------------------


@pytest.mark.transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_revert_splits_E_vector_of_down_proj_into_junk_names(
        hf: Any, models: dict[str, Any], family: str) -> None:
    s2 = torch.arange(1, E + 1, dtype=torch.float32)
    out = hf.revert_weight_conversion(
        models[family], with_extra(models[family], {MEM + "down_proj.weight_scale_2": s2}))
    stem, _, _, down = HUB[family]
    for e in range(E):
        right = f"{stem.format(e=e, w=down)}.weight_scale_2"
        junk = f"{stem.format(e=e, w=down)}.weight.weight_scale_2"
        assert right not in out
        assert junk in out and out[junk].item() == e + 1


@pytest.mark.transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_revert_crashes_on_E_vector_of_fused_gate_up(
        hf: Any, models: dict[str, Any], family: str) -> None:
    s2 = torch.arange(1, E + 1, dtype=torch.float32)
    sd = with_extra(models[family], {MEM + "gate_up_proj.weight_scale_2": s2})
    with pytest.raises(IndexError, match="Dimension out of range"):
        hf.revert_weight_conversion(models[family], sd)


@pytest.mark.transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_revert_chunks_E_by_2_scales_into_junk_names(
        hf: Any, models: dict[str, Any], family: str) -> None:
    """vLLM's w13 form ``[E, 2]`` (one column per gate/up): transformers chunks the columns and
    writes ``[1]`` tensors under ``...{w}.weight.weight_scale_2``."""
    s2 = torch.arange(2 * E, dtype=torch.float32).reshape(E, 2)
    out = hf.revert_weight_conversion(
        models[family], with_extra(models[family], {MEM + "gate_up_proj.weight_scale_2": s2}))
    stem, gate, up, _ = HUB[family]
    for e in range(E):
        for col, w in enumerate((gate, up)):
            junk = f"{stem.format(e=e, w=w)}.weight.weight_scale_2"
            assert f"{stem.format(e=e, w=w)}.weight_scale_2" not in out
            assert tuple(out[junk].shape) == (1,) and out[junk].item() == 2 * e + col


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stored", [(E,), (E, 1)], ids=["E", "E_1"])
def test_convlens_unstacks_E_weight_scale_2_to_each_expert_under_its_name(
        family: str, stored: tuple[int, ...]) -> None:
    """``gate_up_proj_weight_scale_2 [E]`` -> ``experts.{e}.<gate>.weight_scale_2`` and
    ``<up>.weight_scale_2``, each expert's own scalar; ``[E, 1]`` keeps its stored form ``[1]``."""
    _, mem = nvfp4_experts(family)
    s2_gu = torch.tensor([0.5, -0.0, 3.0e-5, 448.0], dtype=torch.float32).reshape(stored)
    s2_d = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float32).reshape(stored)
    mem[MEM + "gate_up_proj_weight_scale_2"] = s2_gu
    mem[MEM + "down_proj_weight_scale_2"] = s2_d
    conv = convlens.load_rules(RULES[family])
    out = conv.revert(mem)
    stem, gate, up, down = HUB[family]
    per_expert = stored[1:]
    for e in range(E):
        for w, src in ((gate, s2_gu), (up, s2_gu), (down, s2_d)):
            t = out[f"{stem.format(e=e, w=w)}.weight_scale_2"]
            assert tuple(t.shape) == per_expert
            assert torch.equal(raw_bits(t), raw_bits(src[e]))
    assert not [k for k in out if ".weight.weight_scale" in k]
    assert_bit_exact(conv.apply(out), mem, "apply(revert)")


# --- 3. FP8 128x128 block scales through a fused gate/up -----------------------------------------


BLOCK_H = 256


def fp8_block_experts(family: str, inter: int, scheme: str, seed: int = 1
                      ) -> tuple[StateDict, StateDict]:
    """Per-expert FP8 block tensors and the same bytes stacked/fused. ``scheme``:
    ``deepseek_fp8_block`` (``weight_scale_inv [out/128, in/128]``, F32) or
    ``modelopt_fp8_block`` (``weight_scale [out/128, 1, in/128, 1]``, F32)."""
    gen = Gen(seed)
    stem, gate, up, down = HUB[family]
    role = "weight_scale_inv" if scheme == "deepseek_fp8_block" else "weight_scale"

    def scale(out: int, inp: int) -> torch.Tensor:
        ob, ib = -(-out // 128), -(-inp // 128)
        s = gen.f32(ob, ib)
        return s if role == "weight_scale_inv" else s.reshape(ob, 1, ib, 1)

    per = {}
    hub: StateDict = {}
    for e in range(2):
        for w, (o, i) in ((gate, (inter, BLOCK_H)), (up, (inter, BLOCK_H)),
                          (down, (BLOCK_H, inter))):
            per[e, w] = {"weight": gen.f8(o, i), role: scale(o, i)}
            for r, t in per[e, w].items():
                hub[f"{stem.format(e=e, w=w)}.{r}"] = t
    suffix = mem_suffix(role)
    mem = {
        MEM + "gate_up_proj": torch.stack(
            [torch.cat([per[e, gate]["weight"], per[e, up]["weight"]]) for e in range(2)]),
        MEM + f"gate_up_proj{suffix}": torch.stack(
            [torch.cat([per[e, gate][role], per[e, up][role]]) for e in range(2)]),
        MEM + "down_proj": torch.stack([per[e, down]["weight"] for e in range(2)]),
        MEM + f"down_proj{suffix}": torch.stack([per[e, down][role] for e in range(2)]),
    }
    return hub, mem


def mem_suffix(role: str) -> str:
    """How a 3-D expert parameter names its scale: transformers' FineGrainedFP8 experts keep
    ``gate_up_proj_scale_inv``; ModelOpt's exports ``gate_up_proj_weight_scale``."""
    return "_scale_inv" if role == "weight_scale_inv" else f"_{role}"


@pytest.fixture(scope="module")
def fp8_models(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    root = tmp_path_factory.mktemp("hf_fp8")
    return {inter: _mixtral(128, inter, 2, root / f"i{inter}") for inter in (128, 64, 192)}


@pytest.mark.transformers
def test_transformers_revert_chunks_fp8_block_scales_into_junk_names(
        hf: Any, fp8_models: dict[int, Any]) -> None:
    """I = 128: the scale rows split at the right place, but the results are named
    ``...w1.weight.weight_scale_inv`` (a child of the weight), not ``...w1.weight_scale_inv``."""
    scales = torch.arange(2 * 2 * 1, dtype=torch.float32).reshape(2, 2, 1)
    model = fp8_models[128]
    out = hf.revert_weight_conversion(
        model, with_extra(model, {MEM + "gate_up_proj.weight_scale_inv": scales}))
    stem, gate, up, _ = HUB["mixtral"]
    for e in range(2):
        for j, w in enumerate((gate, up)):
            assert f"{stem.format(e=e, w=w)}.weight_scale_inv" not in out
            junk = out[f"{stem.format(e=e, w=w)}.weight.weight_scale_inv"]
            assert torch.equal(junk, scales[e, j:j + 1])


@pytest.mark.transformers
def test_transformers_revert_fails_on_fp8_block_scales_when_gate_up_share_a_block(
        hf: Any, fp8_models: dict[int, Any]) -> None:
    """I = 64: gate and up share one 128-row block, ``[E, 1, H/128]``. transformers cannot
    chunk one row into two parts and fails with an unrelated message (no role, no block size)."""
    model = fp8_models[64]
    sd = with_extra(model, {MEM + "gate_up_proj.weight_scale_inv": torch.ones(2, 1, 1)})
    with pytest.raises(ValueError, match="Undefined Operation encountered"):
        hf.revert_weight_conversion(model, sd)


@pytest.mark.transformers
def test_transformers_revert_silently_chunks_a_block_shared_by_gate_and_up(
        hf: Any, fp8_models: dict[int, Any]) -> None:
    """I = 192: 2I = 384 rows are 3 scale rows, the middle one covering gate rows 128..191 and
    up rows 0..63. transformers raises nothing: gate gets scale rows 0-1, up gets row 2 only
    (up's rows 0..63 lose their scale), both under junk names."""
    model = fp8_models[192]
    scales = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    out = hf.revert_weight_conversion(
        model, with_extra(model, {MEM + "gate_up_proj.weight_scale_inv": scales}))
    stem, gate, up, _ = HUB["mixtral"]
    for e in range(2):
        g = out[f"{stem.format(e=e, w=gate)}.weight.weight_scale_inv"]
        u = out[f"{stem.format(e=e, w=up)}.weight.weight_scale_inv"]
        assert torch.equal(g, scales[e, :2]) and torch.equal(u, scales[e, 2:])
        # up_proj [192, 128] needs ceil(192 / 128) = 2 scale rows
        assert u.shape[0] == 1


@pytest.mark.parametrize("scheme", ["deepseek_fp8_block", "modelopt_fp8_block"])
@pytest.mark.parametrize("inter", [128, 256])
def test_convlens_fuses_and_splits_fp8_block_scales_exactly_when_I_is_a_multiple_of_128(
        scheme: str, inter: int) -> None:
    hub, mem = fp8_block_experts("qwen3_moe", inter, scheme)
    conv = convlens.load_rules("qwen2_moe")
    assert_bit_exact(conv.apply(hub), mem, f"{scheme} I={inter} apply")
    assert_bit_exact(conv.revert(mem), hub, f"{scheme} I={inter} revert")


@pytest.mark.parametrize("scheme", ["deepseek_fp8_block", "modelopt_fp8_block"])
@pytest.mark.parametrize("inter", [192])
def test_convlens_refuses_fp8_block_fuse_when_I_is_not_a_multiple_of_128(
        scheme: str, inter: int) -> None:
    """Gate and up would share a 128-row block of scales: no byte move is right, so both
    directions refuse, naming the role, the boundary and the block size."""
    hub, _ = fp8_block_experts("mixtral", inter, scheme)
    role = "weight_scale_inv" if scheme == "deepseek_fp8_block" else "weight_scale"
    gen = Gen(5)
    rows = -(-2 * inter // 128)
    scale = gen.f32(2, rows, BLOCK_H // 128)
    mem = {MEM + "gate_up_proj": gen.f8(2, 2 * inter, BLOCK_H),
           MEM + f"gate_up_proj{mem_suffix(role)}": (scale if role == "weight_scale_inv"
                                          else scale.reshape(2, rows, 1, BLOCK_H // 128, 1))}
    conv = convlens.load_rules("mixtral")
    for direction, sd in (("apply", hub), ("revert", mem)):
        with pytest.raises(convlens.ConversionError) as info:
            getattr(conv, direction)(sd)
        msg = str(info.value)
        assert info.value.role == role, (direction, msg)
        assert f"role {role}" in msg and f"= {inter}" in msg and "of 128" in msg, (direction, msg)


@pytest.mark.parametrize("scheme", ["deepseek_fp8_block", "modelopt_fp8_block"])
def test_fp8_block_gate_and_up_inside_one_block_fuse_only_with_equal_scales(scheme: str) -> None:
    """I = 64: gate, up and the fused 2I = 128 rows all sit in one 128-row block, so the fused
    block's scale row is the parts' scale row. Reverting copies it to both parts, exactly (what
    transformers cannot do, above); applying needs gate's and up's scales to be the same (ModelOpt
    unifies them in its gate/up fusion group) and refuses otherwise, naming the tensors."""
    hub, _ = fp8_block_experts("mixtral", 64, scheme)
    role = "weight_scale_inv" if scheme == "deepseek_fp8_block" else "weight_scale"
    conv = convlens.load_rules("mixtral")
    with pytest.raises(convlens.ConversionError, match="differ") as info:
        conv.apply(hub)
    assert f"w3.{role}" in str(info.value) and f"w1.{role}" in str(info.value)
    stem, gate, up, _ = HUB["mixtral"]
    for e in range(2):  # unify gate/up scales as ModelOpt does
        hub[f"{stem.format(e=e, w=up)}.{role}"] = hub[f"{stem.format(e=e, w=gate)}.{role}"].clone()
    mem = conv.apply(hub)
    fused = mem[MEM + f"gate_up_proj{mem_suffix(role)}"]
    assert raw_bits(fused[1]).equal(raw_bits(hub[f"{stem.format(e=1, w=gate)}.{role}"]))
    assert_bit_exact(conv.revert(mem), hub, "revert(apply)")


# --- 4. gpt-oss interleaved gate/up with blocks, scales and bias ---------------------------------

GPT_OSS_SPLIT = """
split "{p*}.experts.gate_up_proj" naming param
  -> "{p*}.experts.gate_proj", "{p*}.experts.up_proj" naming param
  by deinterleave(1)
"""
GPT_OSS_FUSE = """
fuse "{p*}.experts.gate_proj", "{p*}.experts.up_proj" naming param
  -> "{p*}.experts.gate_up_proj" naming param
  by interleave(1)
"""
GPT = "model.layers.{l}.mlp.experts."
GE, GI, GH = 3, 16, 64  # experts, intermediate, hidden (H / 32 blocks of 16 bytes)


def conversion(body: str) -> convlens.Conversion:
    return convlens.Conversion(convlens.compile_text("conversion t\n" + body))


def gpt_oss_hub(seed: int = 2) -> StateDict:
    gen = Gen(seed)
    sd: StateDict = {}
    for layer in range(2):
        p = GPT.format(l=layer)
        sd[p + "gate_up_proj_blocks"] = gen.u8(GE, 2 * GI, GH // 32, 16)
        sd[p + "gate_up_proj_scales"] = gen.u8(GE, 2 * GI, GH // 32)
        sd[p + "gate_up_proj_bias"] = gen.u8(GE, 2 * GI, 2).view(torch.bfloat16).reshape(
            GE, 2 * GI)
        sd[p + "down_proj_blocks"] = gen.u8(GE, GH, GI // 32 + 1, 16)
        sd[p + "down_proj_scales"] = gen.u8(GE, GH, GI // 32 + 1)
        sd[p + "down_proj_bias"] = gen.u8(GE, GH, 2).view(torch.bfloat16).reshape(GE, GH)
    return sd


def deinterleave_by_index(sd: StateDict) -> StateDict:
    """The reference: gate = rows 0, 2, 4, ... and up = rows 1, 3, 5, ... of dim 1 of every role,
    picked one index at a time."""
    out: StateDict = {}
    for k, t in sd.items():
        if "gate_up_proj_" not in k:
            out[k] = t
            continue
        role = k.split("gate_up_proj_")[1]
        stem = k.split("gate_up_proj_")[0]
        n = t.shape[1]
        out[f"{stem}gate_proj_{role}"] = torch.stack([t[:, i] for i in range(0, n, 2)], 1)
        out[f"{stem}up_proj_{role}"] = torch.stack([t[:, i] for i in range(1, n, 2)], 1)
    return out


def test_gpt_oss_deinterleave_splits_blocks_scales_and_bias_like_an_index_reference() -> None:
    hub = gpt_oss_hub()
    conv = conversion(GPT_OSS_SPLIT)
    got = conv.apply(hub)
    want = deinterleave_by_index(hub)
    assert_bit_exact(got, want, "deinterleave")
    assert tuple(got[GPT.format(l=0) + "gate_proj_blocks"].shape) == (GE, GI, GH // 32, 16)
    assert tuple(got[GPT.format(l=0) + "up_proj_scales"].shape) == (GE, GI, GH // 32)
    assert tuple(got[GPT.format(l=0) + "up_proj_bias"].shape) == (GE, GI)
    assert_bit_exact(conv.revert(got), hub, "interleave(deinterleave(x))")


def test_gpt_oss_interleave_fuses_gate_and_up_back_into_alternating_rows() -> None:
    hub = gpt_oss_hub(seed=3)
    parts = deinterleave_by_index(hub)
    conv = conversion(GPT_OSS_FUSE)
    assert_bit_exact(conv.apply(parts), hub, "interleave")
    assert_bit_exact(conv.revert(hub), parts, "deinterleave (derived inverse)")


def test_gpt_oss_bias_and_scales_stay_paired_with_their_rows() -> None:
    """Mark row r of every role with r: after the split, gate row j carries 2j and up row j
    carries 2j + 1 in blocks, scales and bias alike."""
    p = GPT.format(l=0)
    rows = torch.arange(2 * GI, dtype=torch.uint8)
    sd = {p + "gate_up_proj_blocks": rows.view(1, -1, 1, 1).expand(GE, -1, GH // 32, 16).clone(),
          p + "gate_up_proj_scales": rows.view(1, -1, 1).expand(GE, -1, GH // 32).clone(),
          p + "gate_up_proj_bias": rows.to(torch.bfloat16).view(1, -1).expand(GE, -1).clone()}
    out = conversion(GPT_OSS_SPLIT).apply(sd)
    for name, start in (("gate_proj", 0), ("up_proj", 1)):
        want = torch.arange(start, 2 * GI, 2)
        for role in ("blocks", "scales", "bias"):
            t = out[f"{p}{name}_{role}"]
            assert torch.equal(t.reshape(GE, GI, -1)[..., 0].to(torch.int64),
                               want.expand(GE, -1)), (name, role)


BMM_SPLIT = """
split "{p*}.experts.gate_up_proj" naming param axes (e, in, out)
  -> "{p*}.experts.gate_proj", "{p*}.experts.up_proj" naming param axes (e, in, out)
  by deinterleave(2)
"""


def bmm_nvfp4(scale_2: torch.Tensor, seed: int = 4) -> StateDict:
    """ModelOpt's NVFP4 export of gpt-oss BMM experts: ``gate_up_proj [E, in/2, out]`` (packing
    and blocks on dim -2), ``_weight_scale [E, in/16, out]``, and scalars."""
    gen = Gen(seed)
    p = GPT.format(l=0)
    return {p + "gate_up_proj": gen.u8(GE, GH // 2, 2 * GI),
            p + "gate_up_proj_weight_scale": gen.f8(GE, GH // 16, 2 * GI),
            p + "gate_up_proj_weight_scale_2": scale_2,
            p + "gate_up_proj_input_scale": torch.tensor(0.125)}


def test_bmm_nvfp4_deinterleave_on_unpacked_out_axis_with_per_expert_scale_2() -> None:
    p = GPT.format(l=0)
    sd = bmm_nvfp4(torch.tensor([0.5, 1.0, 2.0]))
    conv = conversion(BMM_SPLIT)
    out = conv.apply(sd)
    for name, start in (("gate_proj", 0), ("up_proj", 1)):
        assert torch.equal(out[p + name], sd[p + "gate_up_proj"][:, :, start::2])
        assert torch.equal(raw_bits(out[p + name + "_weight_scale"]),
                           raw_bits(sd[p + "gate_up_proj_weight_scale"][:, :, start::2]))
        assert torch.equal(out[p + name + "_weight_scale_2"], sd[p + "gate_up_proj_weight_scale_2"])
        assert torch.equal(out[p + name + "_input_scale"], sd[p + "gate_up_proj_input_scale"])
    assert_bit_exact(conv.revert(out), sd, "bmm round trip")


def test_bmm_nvfp4_deinterleave_duplicates_a_0d_weight_scale_2() -> None:
    """ModelOpt keeps one weight_scale_2 for the whole stacked BMM tensor (quant-layouts.md
    2.3): a split along out gives both halves that scalar, and interleave keeps one again."""
    p = GPT.format(l=0)
    sd = bmm_nvfp4(torch.tensor(0.5))
    conv = conversion(BMM_SPLIT)
    out = conv.apply(sd)
    for name, start in (("gate_proj", 0), ("up_proj", 1)):
        assert torch.equal(out[p + name], sd[p + "gate_up_proj"][:, :, start::2])
        assert out[p + name + "_weight_scale_2"].shape == ()
        assert out[p + name + "_weight_scale_2"].item() == 0.5
    assert_bit_exact(conv.revert(out), sd, "bmm round trip, 0-d weight_scale_2")


# --- 3b. transformers' own FP8 experts: the names and shapes it allocates -------------------------


@pytest.mark.transformers
def test_convlens_reverts_transformers_own_fp8_experts_and_applies_back(hf: Any) -> None:
    """transformers' FineGrainedFP8 ``FP8Experts`` (static activations, 128x128 blocks) is the
    in-memory layout a DeepSeek/Qwen3 FP8 checkpoint loads into: ``gate_up_proj`` F8 [E, 2I, H]
    with ``gate_up_proj_scale_inv`` [E, 2I/128, H/128] (no ``weight_`` in the name) and
    ``gate_up_proj_activation_scale`` [E]. Its parameter names and shapes come from transformers
    itself; convlens reverts them to per-expert hub tensors and applies back bit for bit."""
    from transformers import Qwen3MoeConfig
    from transformers.integrations.finegrained_fp8 import FP8Experts

    config = Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=2,
                            intermediate_size=256, num_hidden_layers=1)
    experts = FP8Experts(config, block_size=(128, 128), activation_scheme="static")
    gen = Gen(11)
    mem: StateDict = {}
    for name, p in experts.named_parameters():
        t = gen.f8(*p.shape) if p.dtype == torch.float8_e4m3fn else gen.f32(*p.shape)
        mem[MEM + name] = t
    assert MEM + "gate_up_proj_scale_inv" in mem and MEM + "down_proj_scale_inv" in mem
    # one activation scale per expert, the same for gate and up (they read the same input)
    conv = convlens.load_rules("qwen2_moe")
    hub = conv.revert(mem)
    E_, I_, H_ = 2, 128, 256
    for e in range(E_):
        for w, (o, i) in (("gate_proj", (I_, H_)), ("up_proj", (I_, H_)),
                          ("down_proj", (H_, I_))):
            stem = f"model.layers.0.mlp.experts.{e}.{w}"
            assert hub[f"{stem}.weight"].shape == (o, i)
            assert hub[f"{stem}.weight_scale_inv"].shape == (o // 128, i // 128)
            assert hub[f"{stem}.activation_scale"].shape == ()
        assert raw_bits(hub[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]).equal(
            raw_bits(mem[MEM + "gate_up_proj"][e, :I_]))
    assert len(hub) == E_ * 3 * 3
    assert_bit_exact(conv.apply(hub), mem, "apply(revert(FP8Experts))")
