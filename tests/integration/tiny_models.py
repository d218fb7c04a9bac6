"""Tiny random transformers models built by shrinking a model type's default config.

Used by ``test_all_architectures.py``: every size-like field of the default config (and of its
sub-configs: text, vision, audio, ...) is set to a small value, lists sized by the number of layers
are cut to the new depth (keeping one layer of each kind a layer-type list names), and the model is
built seeded on the CPU in float32. A few consistency fixes follow from the shrinking, for every
model alike: attention head counts that divide the new widths, backbone ``out_features`` /
``out_indices`` within the new stages, ``mrope_section`` summing to the new rotary half-width, a
size left ``None`` in a default config set (``vocab_size``, ``head_dim``), and the per-layer
overrides of a heterogeneous config shrunk and cut with its layers. Model classes that
transformers does not export are taken from the modeling module that defines them. What cannot be
built that way is reported with the exception; the only per-model values are the documented
``OVERRIDES``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

# field -> small value (only fields the config already has, and only where the default is larger)
SMALL: dict[str, int] = {
    # widths
    "hidden_size": 32, "d_model": 32, "embed_dim": 32, "n_embd": 32, "dim": 32,
    "out_hidden_size": 32, "projector_hidden_size": 32, "text_hidden_size": 32,
    "vision_hidden_size": 32, "audio_hidden_size": 32, "projection_dim": 32,
    "adapter_in_dim": 32, "adapter_out_dim": 32, "adapter_input_size": 32, "condition_dim": 32,
    "upsample_groups": 32,  # Mimi's depthwise upsampling: one group per channel of the width
    "hidden_dim": 32, "encoder_hidden_size": 32, "decoder_hidden_size": 32,
    "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "n_inner": 64, "ffn_hidden_size": 64, "dense_intermediate_size": 64,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 16, "expert_intermediate_size": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "head_dim": 8, "attention_head_dim": 8,
    # depth
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "depth": 2,
    # two decoder layers: detection heads tie bbox_embed.0 to bbox_embed.1.. (tie_weights_keys)
    "encoder_layers": 1, "decoder_layers": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
    "num_mtp_layers": 1, "num_nextn_predict_layers": 1,
    # heads
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_heads": 4, "n_head": 4,
    "n_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_kv_heads": 2, "n_kv_heads": 2,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "moe_topk": 2, "n_shared_experts": 1,
    "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    # vocab
    "vocab_size": 128,
}

# model_type -> field -> value, applied after shrinking, for what a generic rule cannot know
OVERRIDES: dict[str, dict[str, Any]] = {
    # validate_architecture: multi-head attention only (num_key_value_heads == num_attention_heads)
    "glm5_next": {"num_key_value_heads": 4},
    "glm5_next_text": {"num_key_value_heads": 4},
    # the default configs leave the per-layer kind lists and the routing width None (the model
    # indexes them per layer): one layer of each kind, the second one routed
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"], "num_experts_per_tok": 2},
    # the default config leaves the expert counts and the routing width None
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    # validate_architecture: multi-head attention in every kind of layer; the sliding-window
    # layers' head_dim is qk_nope_head_dim + qk_rope_head_dim (8 + 8)
    "dots3_note_text": {"num_key_value_heads": 4, "head_dim": 16},
    # __post_init__ sets num_key_value_heads = num_attention_heads (so a reload recomputes it)
    "dots3_note_audio_encoder": {"num_key_value_heads": 4},
    # the vision layers the adapter reads, within the shrunk vision tower (the default [24, 18]
    # index a 25-layer tower)
    "molmo2_adapter": {"vision_feature_layer": [1, 0]},
    # the default head config has no layers (every per-stage list None): one upsampling and one
    # conv stage
    "sapiens2_head": {"upsample_out_channels": [16], "upsample_kernel_sizes": [4],
                      "conv_out_channels": [16], "conv_kernel_sizes": [1]},
}

SUB_CONFIG_NAMES = ("text_config", "vision_config", "audio_config", "encoder_config",
                    "decoder_config", "speech_config", "thinker_config", "talker_config",
                    "backbone_config", "perceiver_config", "qformer_config", "vq_config",
                    "audio_encoder_config", "flow_head_config")


def _sub_configs(config: Any) -> list[tuple[str, Any]]:
    from transformers import PretrainedConfig

    out = []
    for name in dir(config):
        if name.startswith("_") or name in ("base_config_key",):
            continue
        try:
            value = getattr(config, name)
        except Exception:  # properties that need other fields
            continue
        if isinstance(value, PretrainedConfig):
            out.append((name, value))
    return out


def shrink(config: Any, _depth: int = 0) -> Any:
    """A copy of ``config`` with every size field made small (sub-configs too)."""
    config = copy.deepcopy(config)
    _shrink_in_place(config, _depth)
    return config


def _shrink_in_place(config: Any, depth: int) -> None:
    spec = getattr(config, "__dict__", {}).get("_heterogeneity_spec")
    if spec is None:
        _shrink_fields(config, depth, None)
        return
    # a heterogeneous config (per-layer overrides) refuses reads of its per-layer attributes on the
    # global config: allowed while shrinking, and the overrides are shrunk and cut with the layers
    allowed = config.allow_global_per_layer_attribute_access
    config.allow_global_per_layer_attribute_access = True
    try:
        _shrink_fields(config, depth, spec)
    finally:
        config.allow_global_per_layer_attribute_access = allowed


def _shrink_fields(config: Any, depth: int, spec: Any) -> None:
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    old_layers = {fields.get(k) for k in ("num_hidden_layers", "num_layers", "n_layer")
                  if isinstance(fields.get(k), int)}
    new_layers = None
    for name, small in SMALL.items():
        value = getattr(config, name, None) if name in fields else None
        if isinstance(value, bool) or not isinstance(value, int) or value <= small:
            continue
        try:
            setattr(config, name, small)
        except Exception:
            continue
        if name in ("num_hidden_layers", "num_layers", "n_layer"):
            new_layers = small
    if new_layers is not None:
        kinds = None
        if spec is not None and len(old_layers) == 1:
            # the set of overridden attributes and values is a layer kind too
            overrides = spec.per_layer_overrides
            kinds = [repr(sorted(overrides.get(i, {}).items())) for i in range(max(old_layers))]
        keep = _cut_layer_lists(config, fields, old_layers, new_layers, kinds)
        if spec is not None:
            spec.per_layer_overrides = {
                j: _shrink_values(spec.per_layer_overrides[i])
                for j, i in enumerate(keep) if i in spec.per_layer_overrides}
    elif spec is not None:
        spec.per_layer_overrides = {i: _shrink_values(over)
                                    for i, over in spec.per_layer_overrides.items()}
    _fix_heads(config, fields)
    _fix_backbone(config)
    _fix_mrope(config)
    for name, value in OVERRIDES.get(getattr(config, "model_type", ""), {}).items():
        with contextlib.suppress(Exception):
            setattr(config, name, value)
        for layer in (spec.per_layer_overrides.values() if spec is not None else ()):
            if name in layer:
                layer[name] = value
    if "vocab_size" in fields and fields["vocab_size"] is None:
        with contextlib.suppress(Exception):
            config.vocab_size = SMALL["vocab_size"]
    _fill_head_dim(config, fields)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        for name in ("pad_token_id", "padding_idx"):
            v = getattr(config, name, None)
            if isinstance(v, int) and v >= vocab:
                with contextlib.suppress(Exception):
                    setattr(config, name, 0)
    if depth < 3:
        for _, sub in _sub_configs(config):
            _shrink_in_place(sub, depth + 1)


def _shrink_values(overrides: dict[str, Any]) -> dict[str, Any]:
    """One layer's overrides of a heterogeneous config, shrunk like the global fields."""
    out = {}
    for name, value in overrides.items():
        if isinstance(value, int) and not isinstance(value, bool):
            if name in SMALL:
                value = min(value, SMALL[name])
            elif name.endswith("heads"):
                value = min(value, 2 if ("kv" in name or "key_value" in name) else 4)
        out[name] = value
    return out


def _cut_layer_lists(config: Any, fields: dict[str, Any], old_layers: set[int], new: int,
                     kinds: list[str] | None = None) -> list[int]:
    """Cut the per-layer lists to ``new`` entries: the first layers, except that a list of layer
    kinds (strings: "full_attention", "linear_attention", ...; and ``kinds``, the per-layer
    overrides of a heterogeneous config) keeps the first layer of each kind, and every per-layer
    list is cut at the same layers (growing the depth to at most 4 for that). Returns the layers
    kept (old indices)."""
    lists = {n: v for n, v in fields.items()
             if isinstance(v, list) and len(v) in old_layers and len(v) > new}
    keep: list[int] = []
    for v in [*lists.values(), *([kinds] if kinds else [])]:
        if all(isinstance(x, str) for x in v):
            for kind in dict.fromkeys(v):
                if v.index(kind) not in keep:
                    keep.append(v.index(kind))
    keep = sorted(keep)[:4]
    if len(keep) > new:
        for n in ("num_hidden_layers", "num_layers", "n_layer"):
            if n in fields:
                with contextlib.suppress(Exception):
                    setattr(config, n, len(keep))
    for i in range(max(map(len, [*lists.values(), kinds or []]), default=new)):
        if len(keep) >= new:
            break
        if i not in keep:
            keep.append(i)
    keep.sort()
    for name, value in lists.items():
        with contextlib.suppress(Exception):
            setattr(config, name, [value[i] for i in keep if i < len(value)])
    return keep


def _fix_heads(config: Any, fields: dict[str, Any]) -> None:
    """Head counts SMALL does not name (decoder_num_attention_heads, mamba_n_heads, ...): at most 4
    (2 for key/value heads), so that they divide the shrunk widths."""
    for name, value in fields.items():
        if (not name.endswith("heads") or name in SMALL or isinstance(value, bool)
                or not isinstance(value, int)):
            continue
        small = 2 if ("kv" in name or "key_value" in name) else 4
        if value > small:
            with contextlib.suppress(Exception):
                setattr(config, name, small)


def _fill_head_dim(config: Any, fields: dict[str, Any]) -> None:
    """``head_dim`` left ``None`` by a default config whose attention reads it (HunYuan): the
    width per head of the shrunk config."""
    if "head_dim" not in fields or fields["head_dim"] is not None:
        return
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads and hidden % heads == 0:
        with contextlib.suppress(Exception):
            config.head_dim = hidden // heads


def _fix_backbone(config: Any) -> None:
    """A backbone config's stage names, out_features and out_indices for the shrunk depth: the
    last stages, as many as were asked for (the depth grows to that number where it has no
    per-stage list)."""
    if not hasattr(config, "set_output_features_output_indices"):
        return
    depths = getattr(config, "depths", None)
    n = len(depths) if isinstance(depths, list) else getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        return
    wanted = getattr(config, "out_indices", None) or getattr(config, "out_features", None) or [0]
    k = len(wanted)
    if k > n and not isinstance(depths, list) and k <= 4:
        with contextlib.suppress(Exception):
            config.num_hidden_layers = k
            n = k
    k = min(k, n)
    with contextlib.suppress(Exception):
        config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, n + 1)]
        config.set_output_features_output_indices(out_features=None,
                                                  out_indices=list(range(n - k + 1, n + 1)))


def _fix_mrope(config: Any) -> None:
    """``rope_parameters.mrope_section`` rescaled to sum to half the shrunk rotary dimension."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not isinstance(rope.get("mrope_section"), list):
        return
    sections = rope["mrope_section"]
    dim = next((getattr(config, n) for n in ("qk_rope_head_dim", "head_dim")
                if isinstance(getattr(config, n, None), int)), None)
    if dim is None:
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(hidden, int) or not isinstance(heads, int) or not heads:
            return
        dim = hidden // heads
    target, total = dim // 2, sum(sections)
    if not total or target < len(sections) or total == target:
        return
    new = [max(1, s * target // total) for s in sections]
    new[-1] += target - sum(new)
    if new[-1] < 1:
        return
    rope["mrope_section"] = new
    with contextlib.suppress(Exception):
        config.rope_parameters = rope


def build(cls_name: str, seed: int = 0) -> Any:
    """The tiny model of class ``cls_name``, seeded, float32, in eval mode."""
    import torch
    import transformers

    cls = getattr(transformers, cls_name, None) or _unexported_class(cls_name)
    config = shrink(cls.config_class())
    config.architectures = [cls_name]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.float().eval()


def _unexported_class(cls_name: str) -> Any:
    """A model class that transformers' conversion registry names but the package does not export
    (sub-models such as ``MaskFormerDetrDecoder``): the modeling module that defines it."""
    import importlib
    from pathlib import Path

    import transformers

    models = Path(transformers.__file__).parent / "models"
    for path in sorted(models.glob("*/modeling_*.py")):
        if f"\nclass {cls_name}(" in path.read_text(encoding="utf-8"):
            module = importlib.import_module(f"transformers.models.{path.parent.name}.{path.stem}")
            return getattr(module, cls_name)
    raise AttributeError(f"module transformers has no attribute {cls_name}")
