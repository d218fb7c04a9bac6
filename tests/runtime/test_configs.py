"""Quantization configs follow the weights (convlens.configs.map_quantization_configs).

Key maps come from real plans of shipped conversions; the configs are shaped like the real ones
(/work/shared/reference/quant-layouts.md: ModelOpt hf_quant_config.json and its config.json
lookalike, compressed-tensors ``ignore``/``targets``, gpt-oss ``modules_to_not_convert``)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

import convlens
from convlens import TensorMeta
from convlens.configs import ModuleMap, map_quantization_configs, module_of

E, FFN, H = 2, 4, 8  # experts, intermediate size, hidden size


def mixtral_memory_metas(layers: int = 2) -> dict[str, TensorMeta]:
    """A small Mixtral state dict in transformers' in-memory layout."""
    metas = {"model.embed_tokens.weight": TensorMeta((16, H), "BF16"),
             "model.norm.weight": TensorMeta((H,), "BF16"),
             "lm_head.weight": TensorMeta((16, H), "BF16")}
    for n in range(layers):
        p = f"model.layers.{n}"
        metas[f"{p}.mlp.experts.gate_up_proj"] = TensorMeta((E, 2 * FFN, H), "BF16")
        metas[f"{p}.mlp.experts.down_proj"] = TensorMeta((E, H, FFN), "BF16")
        metas[f"{p}.mlp.gate.weight"] = TensorMeta((E, H), "BF16")
        for x in "qkvo":
            metas[f"{p}.self_attn.{x}_proj.weight"] = TensorMeta((H, H), "BF16")
        metas[f"{p}.input_layernorm.weight"] = TensorMeta((H,), "BF16")
    return metas


def mixtral_hub_metas(layers: int = 2) -> dict[str, TensorMeta]:
    """The same model in the hub layout (per-expert w1/w2/w3 under block_sparse_moe)."""
    metas = {"model.embed_tokens.weight": TensorMeta((16, H), "BF16"),
             "lm_head.weight": TensorMeta((16, H), "BF16")}
    for n in range(layers):
        p = f"model.layers.{n}"
        for e in range(E):
            for w, shape in (("w1", (FFN, H)), ("w2", (H, FFN)), ("w3", (FFN, H))):
                metas[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"] = TensorMeta(shape, "BF16")
        metas[f"{p}.block_sparse_moe.gate.weight"] = TensorMeta((E, H), "BF16")
        for x in "qkvo":
            metas[f"{p}.self_attn.{x}_proj.weight"] = TensorMeta((H, H), "BF16")
    return metas


def nomic_hub_metas(layers: int = 2) -> dict[str, TensorMeta]:
    metas = {"emb_ln.weight": TensorMeta((H,), "BF16"), "emb_ln.bias": TensorMeta((H,), "BF16"),
             "embeddings.word_embeddings.weight": TensorMeta((16, H), "BF16")}
    for n in range(layers):
        p = f"encoder.layers.{n}"
        metas[f"{p}.attn.Wqkv.weight"] = TensorMeta((3 * H, H), "BF16")
        metas[f"{p}.attn.out_proj.weight"] = TensorMeta((H, H), "BF16")
        for f in ("fc11", "fc12", "fc2"):
            metas[f"{p}.mlp.{f}.weight"] = TensorMeta((H, H), "BF16")
        for norm in ("norm1", "norm2"):
            metas[f"{p}.{norm}.weight"] = TensorMeta((H,), "BF16")
            metas[f"{p}.{norm}.bias"] = TensorMeta((H,), "BF16")
    return metas


def nomic_memory_metas(layers: int = 2) -> dict[str, TensorMeta]:
    plan = convlens.load_rules("nomic_bert").plan(nomic_hub_metas(layers))
    return {k: TensorMeta(tuple(n.shape), n.dtype) for k, n in plan.outputs.items()}


def mixtral_revert() -> dict[str, list[str]]:
    """In-memory layout -> hub layout: experts unstacked and unfused, mlp -> block_sparse_moe."""
    return convlens.load_rules("mixtral").plan(mixtral_memory_metas(),
                                               direction="revert").key_map()


def mixtral_apply() -> dict[str, list[str]]:
    """Hub layout -> in-memory layout: per-expert w1/w3 and w2 fused into mlp.experts."""
    return convlens.load_rules("mixtral").plan(mixtral_hub_metas()).key_map()


def nomic_split() -> dict[str, list[str]]:
    """Hub -> memory: encoder.layers.N.attn.Wqkv split into layers.N.self_attn.{q,k,v}_proj."""
    return convlens.load_rules("nomic_bert").plan(nomic_hub_metas()).key_map()


def nomic_fuse() -> dict[str, list[str]]:
    """Memory -> hub: layers.N.self_attn.{q,k,v}_proj fused into encoder.layers.N.attn.Wqkv."""
    return convlens.load_rules("nomic_bert").plan(nomic_memory_metas(),
                                                  direction="revert").key_map()


def mapped(key_map: dict[str, list[str]], config: dict[str, Any] | None,
           hf_quant_config: dict[str, Any] | None = None
           ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """map_quantization_configs, checking that it leaves its inputs alone."""
    before = copy.deepcopy((config, hf_quant_config))
    result = map_quantization_configs(key_map, config, hf_quant_config)
    assert (config, hf_quant_config) == before
    if config is not None:
        assert result[0] is not config
    return result


def raised(key_map: dict[str, list[str]], config: dict[str, Any] | None,
           hf_quant_config: dict[str, Any] | None = None) -> str:
    with pytest.raises(convlens.ConversionError) as e:
        map_quantization_configs(key_map, config, hf_quant_config)
    return str(e.value)


# --- module names --------------------------------------------------------------------------------


def test_module_of() -> None:
    assert module_of("model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate"
    assert module_of("model.layers.0.mlp.experts.gate_up_proj") == "model.layers.0.mlp.experts"
    assert (module_of("model.layers.0.mlp.experts.gate_up_proj_weight_scale")
            == "model.layers.0.mlp.experts")
    assert module_of("model.layers.0.mlp.down_proj.weight.absmax") == "model.layers.0.mlp.down_proj"
    assert module_of("logit_scale") == ""


def test_module_map_of_a_fusing_plan() -> None:
    mm = ModuleMap.of(mixtral_apply())
    assert mm.forward["model.layers.0.block_sparse_moe.experts.1.w3"] == {
        "model.layers.0.mlp.experts"}
    assert mm.forward["model.layers.1.block_sparse_moe.gate"] == {"model.layers.1.mlp.gate"}
    assert mm.fused["model.layers.0.mlp.experts"] == {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}" for e in range(E)
        for w in ("w1", "w2", "w3")}
    assert set(mm.fused) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}


def test_biases_moved_to_another_module_do_not_count_as_fusion() -> None:
    # minimax_m3_vl moves block_sparse_moe.e_score_correction_bias under mlp.gate
    conv = convlens.load_rules("minimax_m3_vl")
    p = "language_model.model.layers.0.block_sparse_moe"
    metas = {f"{p}.gate.weight": TensorMeta((E, H), "BF16"),
             f"{p}.e_score_correction_bias": TensorMeta((E,), "F32")}
    for e in range(E):
        for w, shape in (("w1", (FFN, H)), ("w2", (H, FFN)), ("w3", (FFN, H))):
            metas[f"{p}.experts.{e}.{w}.weight"] = TensorMeta(shape, "BF16")
    key_map = conv.plan(metas).key_map()
    hf = {"quantization": {
        "quant_algo": "NVFP4",
        "exclude_modules": ["language_model.model.layers.*.block_sparse_moe.gate"]}}
    _, new_hf, notes = mapped(key_map, None, hf)
    assert new_hf == {"quantization": {
        "quant_algo": "NVFP4", "exclude_modules": ["model.language_model.layers.*.mlp.gate"]}}
    assert notes == []


# --- renames -------------------------------------------------------------------------------------


MODELOPT_PRODUCER = {"name": "modelopt", "version": "0.37.0"}


def test_modelopt_exclude_modules_globs_follow_renames() -> None:
    exclude = ["lm_head", "model.embed_tokens", "model.layers.*.block_sparse_moe.gate",
               "model.layers.1.self_attn*", "model.layers.*.block_sparse_moe.experts.*",
               "model.vision_tower*"]
    hf = {"producer": MODELOPT_PRODUCER,
          "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8",
                           "group_size": 16, "exclude_modules": exclude}}
    config: dict[str, Any]
    config = {"model_type": "mixtral", "hidden_size": 4096,
              "quantization_config": {
                  "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": exclude,
                  "producer": MODELOPT_PRODUCER,
                  "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
                  "config_groups": {"group_0": {
                      "weights": {"num_bits": 4, "type": "float", "group_size": 16,
                                  "dynamic": False},
                      "input_activations": {"num_bits": 4, "type": "float", "group_size": 16,
                                            "dynamic": False},
                      "targets": ["Linear"]}}}}
    new_config, new_hf, notes = mapped(mixtral_apply(), config, hf)
    new_exclude = ["lm_head", "model.embed_tokens", "model.layers.*.mlp.gate",
                   "model.layers.1.self_attn*", "model.layers.*.mlp.experts",
                   "model.vision_tower*"]
    assert new_hf == {"producer": MODELOPT_PRODUCER,
                      "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8",
                                       "group_size": 16, "exclude_modules": new_exclude}}
    expected_config = copy.deepcopy(config)
    expected_config["quantization_config"]["ignore"] = new_exclude
    assert new_config == expected_config
    assert notes == [
        "config.json quantization_config.ignore: 'model.vision_tower*' matches no module of the "
        "checkpoint; kept unchanged",
        "hf_quant_config.json quantization.exclude_modules: 'model.vision_tower*' matches no "
        "module of the checkpoint; kept unchanged",
    ]


def test_compressed_tensors_ignore_and_regex_targets() -> None:
    config: dict[str, Any]
    config = {"architectures": ["MixtralForCausalLM"],
              "quantization_config": {
                  "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                  "quantization_status": "compressed",
                  "config_groups": {
                      "group_0": {"targets": ["re:.*self_attn.(q|k|v|o)_proj$"],
                                  "weights": {"num_bits": 4, "type": "float",
                                              "strategy": "tensor_group", "group_size": 16},
                                  "input_activations": None, "output_activations": None,
                                  "format": "nvfp4-pack-quantized"},
                      "group_1": {"targets": ["Linear"], "weights": {"num_bits": 8}}},
                  "ignore": ["lm_head", "re:.*mlp.gate$"],
                  "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
                  "version": "0.19.0"}}
    new_config, new_hf, notes = mapped(mixtral_revert(), config)
    expected = copy.deepcopy(config)
    expected["quantization_config"]["ignore"] = ["lm_head", "re:.*block_sparse_moe.gate$"]
    assert new_config == expected
    assert new_hf is None
    assert notes == []


def test_module_split_into_many_gets_a_pattern_for_everything_below() -> None:
    # mlp.experts (one stacked module in memory) becomes experts.{e}.w{1,2,3} on the hub
    config = {"quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"targets": [r"re:.*layers\.1\.mlp\.experts$"]}},
        "ignore": [r"re:.*mlp\.gate$"]}}
    hf = {"quantization": {"quant_algo": "NVFP4",
                           "exclude_modules": ["model.layers.*.mlp.experts"]}}
    new_config, new_hf, notes = mapped(mixtral_revert(), config, hf)
    assert new_config == {"quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {
            "targets": [r"re:.*layers\.1\.block_sparse_moe\.experts\..*$"]}},
        "ignore": [r"re:.*block_sparse_moe\.gate$"]}}
    assert new_hf == {"quantization": {
        "quant_algo": "NVFP4", "exclude_modules": ["model.layers.*.block_sparse_moe.experts.*"]}}
    assert notes == []


def test_pattern_that_cannot_be_rewritten_lists_the_modules() -> None:
    config = {"quantization_config": {"quant_method": "compressed-tensors",
                                      "ignore": [r"re:.*attn\.Wqkv$"]}}
    new_config, _, notes = mapped(nomic_split(), config)
    assert new_config == {"quantization_config": {
        "quant_method": "compressed-tensors",
        "ignore": [f"layers.{n}.self_attn.{x}_proj" for n in range(2) for x in "kqv"]}}
    assert notes == [
        "config.json quantization_config.ignore: no pattern like "
        r"'re:.*attn\\.Wqkv$' selects exactly the 6 module(s) it maps to; "
        "listed them explicitly"]


def test_gpt_oss_modules_to_not_convert() -> None:
    # gpt-oss writes globs below which everything stays unquantized (transformers'
    # should_convert_module); Mixtral's router is mlp.gate where gpt-oss has mlp.router
    config = {"quantization_config": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.gate",
                                   "model.embed_tokens", "lm_head"]}}
    new_config, _, notes = mapped(mixtral_revert(), config)
    assert new_config == {"quantization_config": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn",
                                   "model.layers.*.block_sparse_moe.gate",
                                   "model.embed_tokens", "lm_head"]}}
    assert notes == []


def test_modules_to_not_convert_prefixes_and_suffixes() -> None:
    # a prefix selects everything below it; a bare name also matches as a suffix (AWQ "gate")
    config = {"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["model.layers.*.mlp", "gate", "model.layers.0.mlp.experts"]}}
    new_config, _, notes = mapped(mixtral_revert(), config)
    assert new_config == {"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["model.layers.*.block_sparse_moe", "gate",
                                   "model.layers.0.block_sparse_moe.experts"]}}
    assert notes == []


def test_fp8_release_modules_to_not_convert_none_and_other_fields_kept() -> None:
    config = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128],
                                      "modules_to_not_convert": None},
              "torch_dtype": "bfloat16"}
    new_config, _, notes = mapped(mixtral_apply(), config)
    assert new_config == config
    assert notes == []
    assert mapped(mixtral_apply(), None, None) == (None, None, [])
    assert mapped(mixtral_apply(), {"model_type": "mixtral"}) == (
        {"model_type": "mixtral"}, None, [])


def test_renamed_quantized_layers_keep_their_settings() -> None:
    layers = {"model.layers.0.block_sparse_moe.gate": {"quant_algo": "FP8"},
              "model.layers.0.self_attn.q_proj": {"quant_algo": "NVFP4", "group_size": 16},
              "model.layers.9.self_attn.q_proj": {"quant_algo": "FP8"}}
    hf = {"producer": MODELOPT_PRODUCER,
          "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                           "quantized_layers": layers}}
    _, new_hf, notes = mapped(mixtral_apply(), None, hf)
    assert new_hf == {"producer": MODELOPT_PRODUCER,
                      "quantization": {"quant_algo": "MIXED_PRECISION",
                                       "kv_cache_quant_algo": None,
                                       "quantized_layers": {
                                           "model.layers.0.mlp.gate": {"quant_algo": "FP8"},
                                           "model.layers.0.self_attn.q_proj": {
                                               "quant_algo": "NVFP4", "group_size": 16},
                                           "model.layers.9.self_attn.q_proj": {
                                               "quant_algo": "FP8"}}}}
    assert notes == []


# --- splits --------------------------------------------------------------------------------------


def test_split_module_expands_into_its_parts() -> None:
    config = {"quantization_config": {
        "quant_method": "compressed-tensors",
        "ignore": ["encoder.layers.0.attn.Wqkv", "re:.*attn.out_proj$", "re:.*fc2",
                   "emb_ln", "lm_head"],
        "modules_to_not_convert": ["encoder.layers.*.attn"]}}
    hf: dict[str, Any] = {
        "producer": MODELOPT_PRODUCER,
        "quantization": {"quant_algo": "MIXED_PRECISION",
                         "exclude_modules": ["encoder.layers.*.attn.Wqkv"],
                         "quantized_layers": {
                             "encoder.layers.1.attn.Wqkv": {"quant_algo": "FP8"},
                             "encoder.layers.1.mlp.fc11": {"quant_algo": "NVFP4",
                                                           "group_size": 16}}}}
    new_config, new_hf, notes = mapped(nomic_split(), config, hf)
    qkv0 = [f"layers.0.self_attn.{x}_proj" for x in "kqv"]
    qkv1 = [f"layers.1.self_attn.{x}_proj" for x in "kqv"]
    assert new_config == {"quantization_config": {
        "quant_method": "compressed-tensors",
        "ignore": [*qkv0, "re:.*self_attn.o_proj$", "re:.*down_proj",
                   "embeddings.LayerNorm", "lm_head"],
        "modules_to_not_convert": ["layers.*.self_attn"]}}
    assert new_hf == {"producer": MODELOPT_PRODUCER,
                      "quantization": {"quant_algo": "MIXED_PRECISION",
                                       "exclude_modules": qkv0 + qkv1,
                                       "quantized_layers": {
                                           **{m: {"quant_algo": "FP8"} for m in qkv1},
                                           "layers.1.mlp.up_proj": {"quant_algo": "NVFP4",
                                                                    "group_size": 16}}}}
    assert notes == [
        "config.json quantization_config.ignore: 'encoder.layers.0.attn.Wqkv' expanded into "
        "its 3 parts: " + ", ".join(qkv0),
        "hf_quant_config.json quantization.exclude_modules: no pattern like "
        "'encoder.layers.*.attn.Wqkv' selects exactly the 6 module(s) it maps to; "
        "listed them explicitly",
        "hf_quant_config.json quantization.quantized_layers: 'encoder.layers.1.attn.Wqkv' "
        "expanded into its 3 parts: " + ", ".join(qkv1),
    ]
    # the expanded settings are copies, not one shared dict
    assert new_hf is not None
    layers = new_hf["quantization"]["quantized_layers"]
    assert layers[qkv1[0]] is not layers[qkv1[1]]
    assert layers[qkv1[0]] is not hf["quantization"]["quantized_layers"][
        "encoder.layers.1.attn.Wqkv"]


# --- fusions -------------------------------------------------------------------------------------


def test_fused_parts_merge_into_one_entry() -> None:
    qkv0 = [f"layers.0.self_attn.{x}_proj" for x in "qkv"]
    config = {"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
        "ignore": [*qkv0, "layers.1.mlp.down_proj"],
        "quantized_layers": {
            **{f"layers.1.self_attn.{x}_proj": {"quant_algo": "NVFP4", "group_size": 16}
               for x in "qkv"},
            "layers.1.self_attn.o_proj": {"quant_algo": "FP8"}},
        "config_groups": {
            "group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16},
                        "targets": [f"layers.1.self_attn.{x}_proj" for x in "qkv"]},
            "group_1": {"weights": {"num_bits": 8, "type": "float"},
                        "targets": ["layers.1.self_attn.o_proj"]}}}}
    new_config, _, notes = mapped(nomic_fuse(), config)
    assert new_config == {"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
        "ignore": ["encoder.layers.0.attn.Wqkv", "encoder.layers.1.mlp.fc2"],
        "quantized_layers": {
            "encoder.layers.1.attn.Wqkv": {"quant_algo": "NVFP4", "group_size": 16},
            "encoder.layers.1.attn.out_proj": {"quant_algo": "FP8"}},
        "config_groups": {
            "group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16},
                        "targets": ["encoder.layers.1.attn.Wqkv"]},
            "group_1": {"weights": {"num_bits": 8, "type": "float"},
                        "targets": ["encoder.layers.1.attn.out_proj"]}}}}
    merged = "'layers.{n}.self_attn.q_proj', 'layers.{n}.self_attn.k_proj', " \
             "'layers.{n}.self_attn.v_proj' merged into 'encoder.layers.{n}.attn.Wqkv'"
    assert notes == [
        "config.json quantization_config.ignore: " + merged.format(n=0),
        "config.json quantization_config.quantized_layers: " + merged.format(n=1),
        "config.json quantization_config.config_groups.group_0.targets: " + merged.format(n=1),
    ]


def test_stacked_experts_merge_into_one_entry() -> None:
    experts = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}":
               {"quant_algo": "NVFP4", "group_size": 16} for e in range(E)
               for w in ("w1", "w2", "w3")}
    hf = {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": experts}}
    _, new_hf, notes = mapped(mixtral_apply(), None, hf)
    assert new_hf == {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        "model.layers.0.mlp.experts": {"quant_algo": "NVFP4", "group_size": 16}}}}
    assert notes == ["hf_quant_config.json quantization.quantized_layers: "
                     + ", ".join(repr(k) for k in experts)
                     + " merged into 'model.layers.0.mlp.experts'"]


def test_fused_parts_with_different_settings_are_an_error() -> None:
    hf = {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        "layers.1.self_attn.q_proj": {"quant_algo": "FP8"},
        "layers.1.self_attn.k_proj": {"quant_algo": "NVFP4", "group_size": 16},
        "layers.1.self_attn.v_proj": {"quant_algo": "FP8"}}}}
    assert raised(nomic_fuse(), None, hf) == (
        "hf_quant_config.json quantization.quantized_layers: cannot fuse "
        "'layers.1.self_attn.k_proj' ({\"group_size\": 16, \"quant_algo\": \"NVFP4\"}) and "
        "'layers.1.self_attn.q_proj' ({\"quant_algo\": \"FP8\"}) into "
        "'encoder.layers.1.attn.Wqkv': the parts of a fused module must be quantized alike\n"
        "  hint: quantize every part the same way (or none) before fusing them")


def test_fused_part_missing_from_quantized_layers_is_an_error() -> None:
    config = {"quantization_config": {"quant_method": "modelopt", "quantized_layers": {
        "layers.0.self_attn.q_proj": {"quant_algo": "FP8"},
        "layers.0.self_attn.v_proj": {"quant_algo": "FP8"}}}}
    assert raised(nomic_fuse(), config) == (
        "config.json quantization_config.quantized_layers: cannot fuse "
        "'layers.0.self_attn.q_proj' ({\"quant_algo\": \"FP8\"}) and "
        "'layers.0.self_attn.k_proj' (not listed: unquantized) into "
        "'encoder.layers.0.attn.Wqkv': the parts of a fused module must be quantized alike\n"
        "  hint: quantize every part the same way (or none) before fusing them")


def test_partially_ignored_fused_module_is_an_error() -> None:
    config = {"quantization_config": {"quant_method": "compressed-tensors",
                                      "ignore": ["lm_head", "re:.*self_attn.k_proj$"]}}
    assert raised(nomic_fuse(), config) == (
        "config.json quantization_config.ignore: 'layers.0.self_attn.k_proj' is excluded from "
        "quantization but 'layers.0.self_attn.q_proj' is not, and both are fused into "
        "'encoder.layers.0.attn.Wqkv': the fused tensor would be partially quantized\n"
        "  hint: list every part of a fused module, or none of them")
    hf = {"quantization": {"quant_algo": "NVFP4",
                           "exclude_modules": ["model.layers.*.block_sparse_moe.experts.*.w2"]}}
    assert raised(mixtral_apply(), None, hf) == (
        "hf_quant_config.json quantization.exclude_modules: "
        "'model.layers.0.block_sparse_moe.experts.0.w2' is excluded from quantization but "
        "'model.layers.0.block_sparse_moe.experts.0.w1' is not, and both are fused into "
        "'model.layers.0.mlp.experts': the fused tensor would be partially quantized\n"
        "  hint: list every part of a fused module, or none of them")


def test_partially_targeted_fused_module_is_an_error() -> None:
    config = {"quantization_config": {"quant_method": "modelopt", "config_groups": {
        "group_0": {"targets": ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]},
        "group_1": {"targets": ["layers.0.self_attn.v_proj"]}}}}
    assert raised(nomic_fuse(), config) == (
        "config.json quantization_config.config_groups.group_0.targets: "
        "'layers.0.self_attn.k_proj' is targeted by this group but 'layers.0.self_attn.v_proj' "
        "is not, and both are fused into 'encoder.layers.0.attn.Wqkv': the fused tensor would "
        "be partially quantized\n"
        "  hint: list every part of a fused module, or none of them")


def test_class_name_targets_skip_the_fusion_check() -> None:
    config = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"targets": ["Linear", "re:.*self_attn.q_proj$"]}}}}
    new_config, _, notes = mapped(nomic_fuse(), config)
    assert new_config == {"quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {
            "group_0": {"targets": ["Linear", "re:.*attn.Wqkv$"]}}}}
    assert notes == []


def test_invalid_regex_is_kept_with_a_note() -> None:
    config = {"quantization_config": {"ignore": ["re:.*mlp.(gate$"]}}
    new_config, _, notes = mapped(mixtral_revert(), config)
    assert new_config == config
    assert len(notes) == 1
    assert notes[0].startswith("config.json quantization_config.ignore: 're:.*mlp.(gate$' is "
                               "not a valid regular expression (")
    assert notes[0].endswith("); kept unchanged")


def test_renamed_layer_colliding_with_a_kept_one_is_an_error() -> None:
    # a half-converted config: the in-memory name (matching nothing on the hub, so kept) and the
    # hub name (renamed onto it) disagree
    hf: dict[str, Any]
    hf = {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        "model.layers.0.mlp.gate": {"quant_algo": "FP8"},
        "model.layers.0.block_sparse_moe.gate": {"quant_algo": "NVFP4", "group_size": 16}}}}
    assert raised(mixtral_apply(), None, hf) == (
        "hf_quant_config.json quantization.quantized_layers: 'model.layers.0.mlp.gate' "
        "({\"quant_algo\": \"FP8\"}) and 'model.layers.0.block_sparse_moe.gate' "
        "({\"group_size\": 16, \"quant_algo\": \"NVFP4\"}) both become 'model.layers.0.mlp.gate'")
    hf["quantization"]["quantized_layers"]["model.layers.0.mlp.gate"] = {
        "quant_algo": "NVFP4", "group_size": 16}
    _, new_hf, notes = mapped(mixtral_apply(), None, hf)
    assert new_hf == {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        "model.layers.0.mlp.gate": {"quant_algo": "NVFP4", "group_size": 16}}}}
    assert notes == ["hf_quant_config.json quantization.quantized_layers: "
                     "'model.layers.0.mlp.gate', 'model.layers.0.block_sparse_moe.gate' merged "
                     "into 'model.layers.0.mlp.gate'"]
