"""A rename of every key: transformers' PrefixChange at the root (CLIP/SigLIP vision and text
models drop ``vision_model.``; timm wrappers add ``timm_model.``).

The way back of ``rename "vision_model.{rest*}" -> "{rest*}"`` claims every key, so that
direction converts only checkpoints whose every key its rules match; a key no rule matches is an
error naming it and the rule (not a silent pass-through that the way back would prefix).
"""

from __future__ import annotations

import pytest
import torch
from bitexact import assert_bit_exact

import convlens
from convlens.api import compile_text
from convlens.checking import check_program

DROP = """
conversion clip_vision
rename "vision_model.{rest*}" -> "{rest*}"
rename "{l*}.attn_ln" -> "{l*}.post_attention_layernorm"
expect "vision_model.encoder.layers.0.attn_ln.weight"
    -> "encoder.layers.0.post_attention_layernorm.weight"
"""
ADD = """
conversion timm
rename "{rest}" -> "timm_model.{rest}"
"""


def test_prefix_removal_passes_convlens_check() -> None:
    for text in (DROP, ADD):
        report = check_program(compile_text(text))
        assert not report.errors, report.errors
        assert report.seeds == 3


def test_prefix_removal_round_trips() -> None:
    conv = convlens.Conversion(compile_text(DROP))
    x = {"vision_model.encoder.layers.0.attn_ln.weight": torch.ones(3),
         "vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 2)}
    y = conv.apply(x)
    assert sorted(y) == ["embeddings.patch_embedding.weight",
                         "encoder.layers.0.post_attention_layernorm.weight"]
    assert_bit_exact(conv.revert(y), x, "revert(apply)")


def test_a_key_outside_the_prefix_is_refused_by_name() -> None:
    conv = convlens.Conversion(compile_text(DROP))
    with pytest.raises(convlens.ConversionError) as info:
        conv.apply({"vision_model.a.weight": torch.ones(1), "logit_scale": torch.ones(())})
    assert info.value.key == "logit_scale"
    assert "every key" in str(info.value) and "'vision_model.{rest*}'" in str(info.value)


def test_adding_a_prefix_converts_every_key_and_back() -> None:
    conv = convlens.Conversion(compile_text(ADD))
    x = {"conv1.weight": torch.ones(1), "head.fc.bias": torch.ones(2)}
    y = conv.apply(x)
    assert sorted(y) == ["timm_model.conv1.weight", "timm_model.head.fc.bias"]
    assert_bit_exact(conv.revert(y), x, "revert(apply)")
    with pytest.raises(convlens.ConversionError, match="match no rule"):
        conv.revert({**y, "stray.weight": torch.ones(1)})
