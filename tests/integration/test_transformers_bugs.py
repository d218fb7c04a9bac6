"""Where transformers' own conversion is wrong, convlens does the right thing (reference section
4.3): each test pins what transformers does and shows what convlens does on the same input.

- The save-side revert is not idempotent: unanchored reverse renames apply again to keys that
  already are in the hub layout (nomic_bert ``encoder.layers`` -> ``encoder.encoder.layers``,
  transformers #46650). convlens' revert refuses a state dict that is already converted.
- ``Chunk`` is ``torch.chunk``: a fused dim that does not divide is split unevenly without a
  word. convlens' ``split`` refuses a size that does not divide, naming it.
- (``Transpose(check_dims)`` being a no-op on save and companions pushed through ops are pinned
  in ``test_transformers_differential.py`` and ``test_quantized_regressions.py``.)
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

import convlens

transformers = pytest.importorskip("transformers")
core = pytest.importorskip("transformers.core_model_loading")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def nomic(tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = transformers.NomicBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=1, num_attention_heads=4,
                                          max_position_embeddings=64)
    torch.manual_seed(0)
    where = tmp_path_factory.mktemp("nomic")
    transformers.NomicBertModel(config).save_pretrained(where)
    model = transformers.NomicBertModel.from_pretrained(where)
    assert model._weight_conversions
    return model


@pytest.mark.transformers
def test_transformers_revert_is_not_idempotent_convlens_refuses_a_converted_input(
        nomic: Any) -> None:
    hub = core.revert_weight_conversion(nomic, dict(nomic.state_dict()))
    assert any(k.startswith("encoder.layers.0.") for k in hub)
    again = core.revert_weight_conversion(nomic, dict(hub))
    assert any(k.startswith("encoder.encoder.layers.0.") for k in again), sorted(again)[:5]
    conv = convlens.load_rules("nomic_bert")
    ours = conv.revert(dict(nomic.state_dict()))
    assert set(ours) == set(hub)
    with pytest.raises(convlens.ConversionError, match="already"):
        conv.revert(ours)


@pytest.mark.transformers
def test_transformers_chunk_splits_unevenly_convlens_split_refuses() -> None:
    from transformers.core_model_loading import Chunk

    fused = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)  # 7 rows into 3 parts
    chunk = Chunk(dim=0)
    parts = chunk.convert({"qkv": [fused]}, source_patterns=["qkv"],
                          target_patterns=["q", "k", "v"], full_layer_name="qkv", model=None,
                          config=None)
    sizes = [t.shape[0] for t in parts.values()]
    assert sizes == [3, 3, 1], sizes  # no error, uneven parts
    conv = convlens.load_rules("nomic_bert")
    bad = {"encoder.layers.0.attn.Wqkv.weight": torch.zeros(7 * 4 + 1, 32)}
    with pytest.raises(convlens.ConversionError, match="not a multiple of 3"):
        conv.apply(bad)
