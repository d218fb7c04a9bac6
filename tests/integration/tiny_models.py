"""Tiny random transformers models built by shrinking a model type's default config.

Used by ``test_all_architectures.py``: every size-like field of the default config (and of its
sub-configs: text, vision, audio, ...) is set to a small value, lists sized by the number of layers
are cut to the new depth, and the model is built seeded on the CPU in float32. What cannot be built
that way is reported with the exception, never patched per model.
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
    "hidden_dim": 32, "encoder_hidden_size": 32, "decoder_hidden_size": 32,
    "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "n_inner": 64, "ffn_hidden_size": 64, "dense_intermediate_size": 64,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 16, "expert_intermediate_size": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "head_dim": 8, "attention_head_dim": 8,
    # depth
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "depth": 2,
    "encoder_layers": 1, "decoder_layers": 1, "num_encoder_layers": 1, "num_decoder_layers": 1,
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
        for name, value in fields.items():
            if isinstance(value, list) and len(value) in old_layers and len(value) > new_layers:
                with contextlib.suppress(Exception):
                    setattr(config, name, list(value[:new_layers]))
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


def build(cls_name: str, seed: int = 0) -> Any:
    """The tiny model of class ``cls_name``, seeded, float32, in eval mode."""
    import torch
    import transformers

    cls = getattr(transformers, cls_name)
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
