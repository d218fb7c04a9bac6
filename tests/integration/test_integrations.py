"""The transformers drop-in and the one-call export helper, against transformers itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import convlens
from convlens.integrations.export import revert_quantized_state_dict
from convlens.integrations.transformers import apply, revert_weight_conversion

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers


def tiny_mixtral(tmp_path: Path) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                        vocab_size=64, max_position_embeddings=64,
                        architectures=["MixtralForCausalLM"])
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "m")
    return MixtralForCausalLM.from_pretrained(tmp_path / "m")


def test_drop_in_revert_equals_transformers_revert_on_a_plain_model(tmp_path: Path) -> None:
    from transformers.core_model_loading import revert_weight_conversion as theirs

    model = tiny_mixtral(tmp_path)
    sd = model.state_dict()
    want = theirs(model, dict(sd))
    got = revert_weight_conversion(model, sd)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    back = apply(model, got)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def nvfp4_memory(model: Any) -> dict[str, torch.Tensor]:
    """The model's state dict with its experts replaced by NVFP4 tensors in ModelOpt's
    in-memory naming, as a quantizer export holds them."""
    g = torch.Generator().manual_seed(1)
    sd = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    for name, (out, inp) in (("gate_up_proj", (96, 32)), ("down_proj", (32, 48))):
        stem = f"model.layers.0.mlp.experts.{name}"
        sd[stem] = torch.randint(0, 256, (3, out, inp // 2), generator=g, dtype=torch.uint8)
        sd[f"{stem}_weight_scale"] = (torch.rand(3, out, inp // 16, generator=g) * 100 + 1).to(
            torch.float8_e4m3fn)
        sd[f"{stem}_weight_scale_2"] = torch.rand(3, generator=g)
        sd[f"{stem}_input_scale"] = torch.tensor(0.5)
    return sd


def test_drop_in_reverts_quantized_experts_where_transformers_fails(tmp_path: Path) -> None:
    from transformers.core_model_loading import revert_weight_conversion as theirs

    model = tiny_mixtral(tmp_path)
    sd = nvfp4_memory(model)
    # transformers splits the packed weights but leaves ModelOpt's suffix siblings stacked,
    # under hub-looking names that no engine loads (its pattern stops at "_")
    junk = theirs(model, dict(sd))
    left = "model.layers.0.block_sparse_moe.experts.gate_up_proj_weight_scale"
    assert left in junk and junk[left].dim() == 3
    hub = revert_weight_conversion(model, sd)
    assert left not in hub
    p = "model.layers.0.block_sparse_moe.experts"
    for e in range(3):
        gate_up = sd["model.layers.0.mlp.experts.gate_up_proj"]
        assert torch.equal(hub[f"{p}.{e}.w1.weight"], gate_up[e, :48])
        assert torch.equal(hub[f"{p}.{e}.w3.weight"], gate_up[e, 48:])
        scales = sd["model.layers.0.mlp.experts.gate_up_proj_weight_scale"]
        assert torch.equal(hub[f"{p}.{e}.w1.weight_scale"].view(torch.uint8),
                           scales[e, :48].view(torch.uint8))
        assert float(hub[f"{p}.{e}.w1.weight_scale_2"]) == float(
            sd["model.layers.0.mlp.experts.gate_up_proj_weight_scale_2"][e])
        assert hub[f"{p}.{e}.w2.input_scale"].shape == ()
    assert not any(".weight.weight_scale" in k for k in hub)


def test_export_helper_maps_the_quant_config(tmp_path: Path) -> None:
    model = tiny_mixtral(tmp_path)
    sd = nvfp4_memory(model)
    hf_quant = {"producer": {"name": "modelopt"},
                "quantization": {"quant_algo": "NVFP4",
                                 "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"]}}
    hub, mapped = revert_quantized_state_dict(sd, model, hf_quant)
    assert mapped is not None
    assert mapped["quantization"]["exclude_modules"] == [
        "lm_head", "model.layers.*.block_sparse_moe.gate"]
    assert hf_quant["quantization"]["exclude_modules"][1] == "model.layers.*.mlp.gate"
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in hub
    ct = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*mlp.gate$"]}
    _, mapped_ct = revert_quantized_state_dict(sd, model.config, ct)
    assert mapped_ct is not None and mapped_ct["ignore"][0] == "lm_head"
    assert mapped_ct["ignore"][1] != "re:.*mlp.gate$"


def test_export_helper_fails_loudly_for_a_model_it_does_not_know(tmp_path: Path) -> None:
    with pytest.raises(convlens.ConversionError, match="no shipped conversion serves"):
        revert_quantized_state_dict({"x.weight": torch.zeros(2, 2)},
                                    {"model_type": "nonesuch", "architectures": ["Nope"]})
