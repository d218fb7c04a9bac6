"""convlens against the key layouts of released checkpoints (tests/fixtures/published).

Each fixture is the ``model.safetensors.index.json`` of a published model (gzip-compressed when
large) with its ``config.json`` and a ``SOURCE.md`` naming the repository, commit and path both
came from. Nothing else is stored: the weights are replaced by tiny placeholder tensors.

Per fixture:

1. transformers builds the model for the config on the meta device (the class named by
   ``architectures``, nothing shrunk); its ``state_dict`` key set is the in-memory layout;
2. ``select_rules(config)`` picks the shipped conversion, and ``apply`` on placeholders for the
   published keys gives exactly that key set (experts stacked to the model's expert count);
3. ``revert`` of the result gives back exactly the published key list.

Keys transformers keeps in memory that no checkpoint stores (tied weights) are listed per model
in ``MEMORY_ONLY`` with the reason, and each is checked to really be tied, so an allowance cannot
hide a missing tensor.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from convlens.checkpoint import select_rules

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "published"
FIXTURES = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").exists())

# The shipped conversion each fixture must select (checked: a wrong pick is a finding too).
EXPECTED_RULES = {
    "medgemma-27b-it": "llava",
    "mixtral-8x7b-v0.1": "mixtral",
    "olmocr-7b": "qwen2_vl",
    "qwen3.5-18b-reap-a3b": "qwen3_5_moe_text",
}

# In-memory keys no published checkpoint has, per fixture: {key: the parameter it is tied to}.
MEMORY_ONLY: dict[str, dict[str, str]] = {
    # Gemma 3 ties the output projection to the input embeddings (tie_word_embeddings defaults to
    # true for Gemma3ForConditionalGeneration); the hub checkpoint stores only the embeddings.
    "medgemma-27b-it": {"lm_head.weight": "model.language_model.embed_tokens.weight"},
}


def test_every_fixture_is_covered() -> None:
    assert FIXTURES, f"no fixtures under {ROOT}"
    assert set(FIXTURES) == set(EXPECTED_RULES), "add the fixture to EXPECTED_RULES"
    for name in FIXTURES:
        assert (ROOT / name / "SOURCE.md").exists(), f"{name}: SOURCE.md missing"


@functools.cache
def _config(name: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((ROOT / name / "config.json").read_text())
    return config


@functools.cache
def _published(name: str) -> tuple[str, ...]:
    d = ROOT / name
    plain = d / "model.safetensors.index.json"
    raw = plain.read_bytes() if plain.exists() else gzip.decompress(
        (d / "model.safetensors.index.json.gz").read_bytes())
    keys = tuple(json.loads(raw)["weight_map"])
    assert len(set(keys)) == len(keys)
    return keys


@functools.cache
def _meta_model(name: str) -> torch.nn.Module:
    cfg_dict = _config(name)
    fields = {k: v for k, v in cfg_dict.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(cfg_dict["model_type"], **fields)
    (arch,) = cfg_dict["architectures"]
    cls = getattr(transformers, arch)
    with torch.device("meta"):
        model: torch.nn.Module = cls(cfg)
    return model


def _placeholders(keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tiny tensors: [12, 12] for weights (so expert stacks and the gate/up concat work), [12]
    for norms, biases and everything else; values are irrelevant to a key-set check."""
    return {k: torch.zeros(12, 12) if k.endswith(".weight") and "norm" not in k.rsplit(".", 2)[-2]
            else torch.zeros(12) for k in keys}


@functools.cache
def _applied(name: str) -> dict[str, torch.Tensor]:
    conv, _ = select_rules(_config(name))
    return conv.apply(_placeholders(_published(name)), _config(name))


@pytest.mark.parametrize("name", FIXTURES)
def test_select_rules(name: str) -> None:
    conv, why = select_rules(_config(name))
    assert conv.name == EXPECTED_RULES[name], why


@pytest.mark.parametrize("name", FIXTURES)
def test_memory_only_keys_are_tied(name: str) -> None:
    model = _meta_model(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, target in MEMORY_ONLY.get(name, {}).items():
        assert params[key] is params[target], f"{name}: {key} is not tied to {target}"


@pytest.mark.parametrize("name", FIXTURES)
def test_apply_gives_the_in_memory_key_set(name: str) -> None:
    model = _meta_model(name)
    memory = set(model.state_dict())
    allowed = set(MEMORY_ONLY.get(name, {}))
    got = set(_applied(name))
    extra, missing = sorted(got - memory), sorted(memory - got - allowed)
    assert not extra and not missing, (
        f"{name}: apply made {len(extra)} key(s) transformers does not have "
        f"(e.g. {extra[:5]}) and lacks {len(missing)} it has (e.g. {missing[:5]})")
    assert not allowed & got, f"{name}: stale MEMORY_ONLY entries {sorted(allowed & got)}"


@pytest.mark.parametrize("name", FIXTURES)
def test_stacked_experts_match_the_model(name: str) -> None:
    """Every stacked tensor apply builds (3-D from the 2-D placeholders) is a 3-D parameter of the
    model with the model's expert count on dim 0, and every 3-D expert parameter of the model is
    such a stack."""
    memory = _meta_model(name).state_dict()
    out = _applied(name)
    stacked = {k for k, t in out.items() if t.dim() == 3}
    experts = {k for k, t in memory.items() if t.dim() == 3 and ".experts." in k}
    assert stacked == experts, f"{name}: {sorted(stacked ^ experts)[:5]}"
    for key in stacked:
        assert out[key].shape[0] == memory[key].shape[0], (
            f"{name}: {key} stacks {out[key].shape[0]} experts, model has "
            f"{memory[key].shape[0]}")


@pytest.mark.parametrize("name", FIXTURES)
def test_revert_gives_the_published_list(name: str) -> None:
    conv, _ = select_rules(_config(name))
    back = conv.revert(_applied(name), _config(name))
    published = _published(name)
    assert sorted(back) == sorted(published)
    assert len(back) == len(published)
