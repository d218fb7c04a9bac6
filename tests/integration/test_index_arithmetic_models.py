"""Differential checks of the rule files whose patterns compute indices (``{2*i+1}``,
``{e+config.n}``), on the model classes that the shrinking builder of
``test_all_architectures.py`` cannot build:

- dory: its config serializes each layer as two blocks (``to_dict`` doubles the layer counts), so
  a config shrunk from its dict is inconsistent; the tiny config here is written directly.
  transformers' reverse of LayerPairCollapse matches no in-memory name, so ``save_pretrained``
  keeps the collapsed layers: the published layout (blocks ``2i`` and ``2i+1``, as
  LayerPairCollapse's docstring and vLLM's loader read them) is made here from the saved file, and
  must load through ``from_pretrained`` to the same model before it is used as the hub file.
- ernie4_5_vl_moe: its text rotary embedding defaults to M-RoPE sections for head_dim 128; the
  tiny config gives sections that fit head_dim 8. Its save writes the hub layout (the expert list
  of each MoE layer: text experts, then vision experts).

For each: (a) convlens ``apply`` of the hub files equals ``from_pretrained(hub).state_dict()``
bit for bit; (b) ``revert`` of the model's state dict equals the hub files. The rules are chosen
from ``config.json`` as ``convlens apply`` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from bitexact import state_dict_diff  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from convlens.checkpoint import select_rules  # noqa: E402

pytestmark = pytest.mark.transformers

StateDict = dict[str, torch.Tensor]


def _dory_config() -> Any:
    return transformers.DoryConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_input_layers=1,
        n_output_layers=1, max_position_embeddings=64, sliding_window=16)


def _ernie_config() -> Any:
    config = transformers.Ernie4_5_VLMoeConfig()
    text = config.text_config
    for name, value in dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                            moe_intermediate_size=[16, 8]).items():
        setattr(text, name, value)
    text.rope_parameters = dict(text.rope_parameters, mrope_section=[1, 1, 2])  # head_dim 8
    vision = config.vision_config
    for name, value in dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=64).items():
        setattr(vision, name, value)
    return config


_BLOCK = re.compile(r"(?P<pre>(?:^|.*\.)layers)\.(?P<i>\d+)\.(?P<rest>.*)$")


def _dory_hub(saved: StateDict) -> StateDict:
    """The published Dory layout from transformers' save: layer i's attention block is
    ``layers.{2i}`` (``mixer``, ``attn_alpha``), its mlp block ``layers.{2i+1}`` (``mixer``,
    ``mlp_alpha``)."""
    out: StateDict = {}
    for key, value in saved.items():
        m = _BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        i, rest = int(m["i"]), m["rest"]
        head, _, tail = rest.partition(".")
        block, name = {"self_attn": (2 * i, "mixer"), "mlp": (2 * i + 1, "mixer"),
                       "lambda_1": (2 * i, "attn_alpha"),
                       "lambda_2": (2 * i + 1, "mlp_alpha")}[head]
        out[f"{m['pre']}.{block}.{name}" + (f".{tail}" if tail else "")] = value
    return out


CASES: dict[str, tuple[Callable[[], Any], Callable[[StateDict], StateDict] | None]] = {
    "DoryForCausalLM": (_dory_config, _dory_hub),
    "DoryModel": (_dory_config, _dory_hub),
    "Ernie4_5_VLMoeForConditionalGeneration": (_ernie_config, None),
    "Ernie4_5_VLMoeModel": (_ernie_config, None),
}


def _state(model: Any) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load_dir(path: Path) -> StateDict:
    out: StateDict = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _tied_away(model: Any, produced: set[str]) -> set[str]:
    """Keys not written on save because they share a tensor with a key that is."""
    groups: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        groups.setdefault(key, set()).add(k)
    out: set[str] = set()
    for group in groups.values():
        if len(group) > 1 and group & produced:
            out |= group - produced
    return out


_BUILT: dict[str, tuple[Any, StateDict, StateDict, dict[str, Any]]] = {}


def _built(cls: str, tmp: Path) -> tuple[Any, StateDict, StateDict, dict[str, Any]]:
    """(model, hub files, from_pretrained(hub) state dict, config.json), built once."""
    if cls in _BUILT:
        return _BUILT[cls]
    make_config, to_hub = CASES[cls]
    config = make_config()
    config.architectures = [cls]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).float().eval()
    saved_dir = tmp / "saved"
    model.save_pretrained(str(saved_dir))
    saved = _load_dir(saved_dir)
    hub, hub_dir = saved, saved_dir
    if to_hub is not None:
        hub = to_hub(saved)
        hub_dir = tmp / "hub"
        hub_dir.mkdir()
        (hub_dir / "config.json").write_text((saved_dir / "config.json").read_text())
        save_file({k: v.contiguous() for k, v in hub.items()}, str(hub_dir / "model.safetensors"),
                  metadata={"format": "pt"})
    loaded_model, info = type(model).from_pretrained(str(hub_dir), output_loading_info=True)
    problems = {k: sorted(map(str, v))[:4] for k, v in info.items() if v}
    assert not problems, f"transformers does not load the hub layout cleanly: {problems}"
    loaded = _state(loaded_model)
    assert not state_dict_diff(loaded, _state(model)), (
        "the hub layout does not load back to the model")
    out = (model, hub, loaded, json.loads((hub_dir / "config.json").read_text()))
    _BUILT[cls] = out
    return out


@pytest.mark.parametrize("cls", sorted(CASES))
def test_apply_of_hub_files_equals_from_pretrained(cls: str, tmp_path: Path) -> None:
    model, hub, loaded, config = _built(cls, tmp_path)
    conv, _ = select_rules(config)
    got = conv.apply(hub, config)
    want = {k: v for k, v in loaded.items() if k not in _tied_away(model, set(got))}
    assert not state_dict_diff(got, want), (
        f"{cls} ({conv.name}): apply(hub) vs from_pretrained(hub)")


@pytest.mark.parametrize("cls", sorted(CASES))
def test_revert_of_memory_equals_hub_files(cls: str, tmp_path: Path) -> None:
    model, hub, _, config = _built(cls, tmp_path)
    conv, _ = select_rules(config)
    memory = _state(model)
    memory = {k: v for k, v in memory.items()
              if k not in _tied_away(model, set(conv.apply(hub, config)))}
    got = conv.revert(memory, config)
    assert not state_dict_diff(got, hub), (
        f"{cls} ({conv.name}): revert(model.state_dict()) vs hub files")


def test_the_ernie_hub_layout_holds_text_then_vision_experts(tmp_path: Path) -> None:
    """The premise of the ernie rules: of the 2 x N experts of a MoE layer, 0..N-1 are the text
    experts and N..2N-1 the vision ones (intermediate sizes 16 and 8 tell them apart)."""
    _, hub, _, config = _built("Ernie4_5_VLMoeForConditionalGeneration", tmp_path)
    n = config["text_config"]["moe_num_experts"]
    rows = {int(m[1]): hub[k].shape[0] for k in hub
            if (m := re.search(r"experts\.(\d+)\.gate_proj\.weight$", k)) and ".layers.1." in k}
    assert rows == {e: 16 if e < n else 8 for e in range(2 * n)}
