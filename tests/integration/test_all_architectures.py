"""Differential suite over every transformers architecture class with a conversion mapping.

The classes are found in transformers' conversion registry: every class of a model type that is a
registry key (through the auto mappings) and every class name that is a key. For each class a tiny
random model is built from its model type's default config with every size shrunk
(``tiny_models.py``), seeded, and saved with ``save_pretrained``. Then, with the rules chosen from
the saved ``config.json`` by ``convlens.checkpoint.select_rules`` (as ``convlens apply`` does):

(a) ``apply`` of the saved files equals ``from_pretrained(saved).state_dict()``: names, shapes,
    dtypes, values bit-exact (keys dropped on save because they are tied to another key excepted);
(b) ``revert`` of the in-memory state dict equals the saved files.

Where the mapping holds a ``PrefixChange``, transformers writes a model built from scratch without
the prefix (it only restores prefixes it removed on load), so its file is not the published layout:
the published layout is made from the saved file with transformers' own reversed ``PrefixChange``s
and must load through ``from_pretrained`` to the same model before it is used as the hub file.

Outcomes: pass; skip with the reason (the class cannot be built from a shrunk config, transformers
converts nothing for it, transformers does not load its own save, no shipped rule serves it, or a
documented gap, listed in ``GAPS``); fail. ``-rs`` lists the skips. Classes after the first one of
each mapping are marked ``transformers_slow`` (deselect with ``-m "not transformers_slow"``; CI
runs them).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from bitexact import state_dict_diff  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build  # noqa: E402

from convlens.checkpoint import select_rules  # noqa: E402
from convlens.errors import ConversionError, ConvlensError  # noqa: E402

pytestmark = pytest.mark.transformers

StateDict = dict[str, torch.Tensor]

# Rule files for which transformers' save side does not write the hub layout; the published
# layout is tested in test_transformers_differential.py.
NOT_HUB_ON_SAVE = {
    "qwen3_vl_moe": "transformers' Transpose(1, 2, check_dims=True) never transposes on save, so "
                    "save_pretrained writes the in-memory [E, out, in] experts, not the hub's "
                    "[E, in, out] (the hub layout is tested in test_transformers_differential.py)",
    "vit_mae_pretraining": "transformers' save reverses its unanchored 'encoder\\.layer\\.' -> "
                           "'layers.' inside a segment, so save_pretrained writes "
                           "decoder.decoder_encoder.layer.*, not the hub's "
                           "decoder.decoder_layers.* (which it loads unchanged)",
    "ultrabert_masked_lm": "transformers' save does not reverse its '^cls\\.' -> 'head.decoder.' "
                           "renaming: save_pretrained writes head.decoder.* (which it also "
                           "loads), not the hub's cls.*",
    "dots3_note": "the published layout made here applies the bare Dots3NoteModel's "
                  "PrefixChange(prefix_to_remove='model'), which transformers scopes under the "
                  "composite's model., in reverse to every key: model.model.*, model.lm_head.* "
                  "and model.vision_encoder.* for the per-expert keys, a layout no checkpoint "
                  "has; transformers' own save (model.{embed_tokens,layers,norm}, lm_head, "
                  "vision_encoder.*, audio_encoder.*) is the hub layout, which dots3_note.conv "
                  "maps both ways bit-exact",
}
# Why a mapping is not served, by registry key (model type or class name): a language gap of
# convlens (named as such in the reason), or transformers behaviour that depends on the model's
# own keys. A class whose mapping has one of these keys and that no shipped rule serves is
# skipped with the reason.
# The reasons are the importer's (convlens.importer), grouped by the construct that is missing.
_ORDER = ("rules whose sources overlap, so the result depends on their order, which convlens "
          "refuses (every rule must claim its stems alone)")
GAPS: dict[str, str] = {
    "pi0": "the root PrefixChange removes 'model.' from every key, then renames write "
           "model.vlm.* / model.dit.* (paligemma_with_expert.paligemma.model -> model.vlm): a "
           "result key under model. could come from either rule, so the way back (which claims "
           "every key) is ambiguous ('would not map back'); also " + _ORDER,
    **{k: "WeightRenaming('tracker_model.(.+)' -> '\\1') removes a prefix anywhere in a key "
          "(unanchored) and overlaps the '{p*}.tracker_neck' rename: " + _ORDER
       for k in ("sam3_tracker", "sam3_tracker_video")},
    "kimi_k25": "the deepseek_v3 experts converters apply both unscoped and scoped under "
                "model.language_model: " + _ORDER,
    "mistral_large4": "the text model's attention.wq PermuteForRope converter applies both "
                      "unscoped and under model.language_model: " + _ORDER,
    "lara_mini": "Split sizes of linear_attn.in_proj -> in_proj_qkv/z/b/a come from the model's "
                 "parameter shapes; no config expression gives them",
    "qwen4_exp_text": "a '.*' inside a segment (it could span dots): segment-aware patterns have "
                      "no such wildcard",
    "inkling2_text": "Inkling2TextForCausalLM: Inkling2UnpadVocab, a custom tensor op, on its head "
                     "(the rule file serves Inkling2TextModel)",
    "inkling2": "Inkling2ForConditionalGeneration: Inkling2UnpadVocab, a custom tensor op, on its "
                "head (the rule file serves Inkling2Model)",
    **{k: "custom tensor ops (Inkling2UnpadVocab, Inkling2LoopMergeMessageQueries, "
          "Inkling2LoopDequantizeExperts); converters whose sources name tensors differently "
          "(module .weight vs a bare parameter)"
       for k in ("inkling2_loop", "inkling2_loop_text")},
    "deepseek_v4": "DeepseekV4ForCausalLM: transformers leaves model.norm alone where its "
                   "'\\.norm\\.' -> '.kv_norm.' renaming (the rule '{p*}.norm' -> '{p*}.kv_norm') "
                   "matches it; the rule file serves DeepseekV4Model only (deepseek_v4.conv)",
    "paddleocr_vl": "PaddleOCRVLModel: the bare model gets its ForConditionalGeneration's mapping "
                    "(renames to model.visual / model.language_model) and its tower keys stay at "
                    "visual.*; the rule file serves the ForConditionalGeneration only",
    **{k: "the mapping holds the vision tower's root PrefixChange ^vision_encoder\\.(.+) "
          "unscoped next to the head's unanchored 'vision_encoder' -> 'backbone' rename: which "
          "applies to a key depends on their order (the importer's class-level output drops the "
          "PrefixChange)"
       for k in ("Tipsv2DptForDepthEstimation", "Tipsv2DptForNormalEstimation",
                 "Tipsv2DptForSemanticSegmentation")},
    **{k: "WeightRenaming('^' -> 'model.') prefixes every key, yet transformers keeps "
          "class_embed / bbox_embed at the root (a renamed key the model lacks is left as it "
          "was): the rename depends on the model's own keys; written as an every-key rename "
          "guarded by 'unless n in (...)', convlens check's law 6 (a key no rule matches passes "
          "through) fails"
       for k in ("RfDetrForObjectDetection", "RfDetrForInstanceSegmentation")},
    "glm5_next": "the text model's renames and expert converters apply both unscoped and under "
                 "model.language_model: " + _ORDER,
    "hy_v4_vl": "convlens check fails: the result would not map back (a rename's result is also "
                "a key of the unconverted layout, so the way back is ambiguous)",
    "tipsv2": "the towers' root PrefixChanges (text_encoder.*, vision_encoder.*) apply unscoped "
              "inside the composite next to text_encoder -> text_model renames: not invertible on "
              "the keys transformers makes, and " + _ORDER,
    "maskformer": "the Swin backbone's and the DETR decoder's renames apply both unscoped and "
                  "under model.pixel_level_module / model.transformer_module: " + _ORDER,
    "esm": "a source that matches varying text the target drops ({w}): many keys would get one "
           "name",
    "legacy": "role renames: LayerNorm.gamma/beta and weight_g/weight_v, several sources to one "
              "target",
}


# --- discovery ------------------------------------------------------------------------------------


def _registry() -> dict[str, list[Any]]:
    from convlens.importer import registry

    return registry()


def discover() -> list[str]:
    """Model classes whose conversion mapping is not empty: classes of a model type that is a
    registry key, and class names that are keys."""
    from transformers.models.auto import modeling_auto

    reg = _registry()
    by_type: dict[str, set[str]] = {}
    for attr in dir(modeling_auto):
        names = getattr(modeling_auto, attr)
        if not attr.endswith("_MAPPING_NAMES") or not isinstance(names, Mapping):
            continue
        for model_type, cls in names.items():
            for c in (cls if isinstance(cls, (list, tuple)) else [cls]):
                by_type.setdefault(model_type, set()).add(c)
    out: set[str] = {k for k in reg if k[:1].isupper()}
    for key in reg:
        out |= by_type.get(key, set())
    return sorted(c for c in out if not c.endswith("Config"))


CLASSES = discover()


# --- one class: build, save, load, convert --------------------------------------------------------


@dataclass
class Built:
    cls: str
    skip: str | None = None
    memory: StateDict = field(default_factory=dict)
    hub: StateDict = field(default_factory=dict)
    loaded: StateDict = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # registry keys of the mapping
    note: str = ""
    aliases: list[set[str]] = field(default_factory=list)  # keys that share storage (tied)


def _load_dir(path: Path) -> StateDict:
    out: StateDict = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _state(model: Any) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mapping_keys(model: Any, transforms: list[Any]) -> tuple[str, ...]:
    """The registry keys transformers looked up for the model (class names, then model types)."""
    reg = _registry()
    keys: list[str] = []
    for _, module in model.named_modules():
        if isinstance(module, transformers.PreTrainedModel):
            for k in (type(module).__name__, getattr(module.config, "model_type", None)):
                if k in reg and k not in keys:
                    keys.append(k)
                    break
    return tuple(keys)


def _published(model: Any, transforms: list[Any], saved: StateDict) -> dict[str, str]:
    """Saved key -> published key, where transformers' reversed PrefixChanges move it."""
    from transformers.core_model_loading import WeightConverter, rename_source_key

    def reverse(with_prefix: bool) -> tuple[list[Any], list[Any]]:
        rev = []
        for t in reversed(transforms):
            if type(t).__name__ == "PrefixChange" and not with_prefix:
                continue
            try:
                rev.append(t.reverse_transform())
            except Exception:
                continue
        return ([t for t in rev if not isinstance(t, WeightConverter)],
                [t for t in rev if isinstance(t, WeightConverter)])

    without, with_ = reverse(False), reverse(True)
    out = {}
    for key in model.state_dict():
        a = str(rename_source_key(key, *without, reverse=True)[0])
        b = str(rename_source_key(key, *with_, reverse=True)[0])
        if a != b and a in saved:
            out[a] = b
    # keys written by a converter (per-expert tensors of a fused one): the reversed PrefixChanges
    # on the saved name itself
    prefixes = [t for t in with_[0] if type(t).__name__ == "PrefixChange"]
    for key in saved:
        if key in out:
            continue
        moved = key
        for t in prefixes:
            moved = str(t.rename_source_key(moved)[0])
        if moved != key:
            out[key] = moved
    return out


def _build(cls: str, tmp: Path) -> Built:
    from transformers.conversion_mapping import get_model_conversion_mapping

    try:
        model = build(cls)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Built(cls, skip=f"cannot instantiate from a shrunk default config: "
                              f"{type(exc).__name__}: {first[:160]}")
    transforms = get_model_conversion_mapping(model, add_legacy=False)
    if not transforms:
        # listed through an auto mapping of a registry key, but the built class gets no transform
        return Built(cls, skip="transformers converts nothing for this class: "
                               "get_model_conversion_mapping of the built model is empty")
    keys = _mapping_keys(model, transforms)
    memory = _state(model)
    aliases = _aliases(model)
    saved_dir = tmp / "saved"
    try:
        model.save_pretrained(str(saved_dir))
    except Exception as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        return Built(cls, skip=f"cannot save the model of a shrunk default config: "
                               f"{type(exc).__name__}: {first.strip()[:160]}", keys=keys)
    saved = _load_dir(saved_dir)
    config = json.loads((saved_dir / "config.json").read_text())
    hub, hub_dir, note = saved, saved_dir, ""
    if any(type(t).__name__ == "PrefixChange" for t in transforms):
        moves = _published(model, transforms, saved)
        if moves:
            hub = {moves.get(k, k): v for k, v in saved.items()}
            hub_dir = tmp / "hub"
            hub_dir.mkdir()
            (hub_dir / "config.json").write_text((saved_dir / "config.json").read_text())
            save_file({k: v.contiguous() for k, v in hub.items()},
                      str(hub_dir / "model.safetensors"), metadata={"format": "pt"})
            note = f"published layout: {len(moves)} key(s) moved by reversed PrefixChange"
    what = "the published layout (its save with PrefixChange reverted)" if note else "its own save"
    try:
        loaded_model, info = type(model).from_pretrained(str(hub_dir), output_loading_info=True)
    except Exception as exc:
        return Built(cls, skip=f"transformers does not load {what}: {type(exc).__name__}: "
                               f"{str(exc).strip()[:160]}", keys=keys)
    problems = {k: sorted(map(str, v))[:4] for k, v in info.items() if v}
    if problems:
        return Built(cls, skip=f"transformers does not load {what} cleanly: {problems}",
                     keys=keys)
    loaded = _state(loaded_model)
    aliases += _aliases(loaded_model)
    if state_dict_diff(loaded, memory):
        return Built(cls, skip=f"transformers does not load {what} back to the model: "
                               + "; ".join(state_dict_diff(loaded, memory))[:300], keys=keys)
    return Built(cls, memory=memory, hub=hub, loaded=loaded, config=config, keys=keys, note=note,
                 aliases=aliases)


# A class's tiny model is built once for its two tests and dropped after the second
# (tests/integration/conftest.py runs them one after the other): keeping every built model
# for the whole run grew the suite to ~20 GB of memory. A test run alone builds it again.
_CACHE: dict[str, Built] = {}
_LEFT: dict[str, int] = {}
TESTS_PER_CLASS = 2


@pytest.fixture
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    cls = request.param
    if cls not in _CACHE:
        _CACHE[cls] = _build(cls, tmp_path_factory.mktemp(cls))
        _LEFT[cls] = TESTS_PER_CLASS
    _LEFT[cls] -= 1
    return _CACHE[cls] if _LEFT[cls] else _CACHE.pop(cls)


def _aliases(model: Any) -> list[set[str]]:
    """Groups of state dict keys that share one tensor (tied weights)."""
    groups: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        groups.setdefault(key, set()).add(k)
    return [g for g in groups.values() if len(g) > 1]


def _tied_away(aliases: list[set[str]], produced: set[str]) -> set[str]:
    """Keys not written on save because they are tied to a key that is."""
    out: set[str] = set()
    for group in aliases:
        if group & produced:
            out |= group - produced
    return out


@pytest.fixture(autouse=True, scope="module")
def _compiled_once() -> Any:
    """select_rules loads every shipped file per call (convlens.api caches the compiled
    programs, but checks each file's mtime); the conversions are memoized here for the module
    (the selection itself is select_rules')."""
    import convlens.checkpoint as checkpoint

    original = checkpoint.load_rules
    memo: dict[Any, Any] = {}

    def load(name: Any) -> Any:
        if name not in memo:
            memo[name] = original(name)
        return memo[name]

    checkpoint.load_rules = load
    yield
    checkpoint.load_rules = original


def _rules(b: Built) -> Any:
    try:
        conv, why = select_rules(b.config)
    except ConversionError:
        root = b.keys[0] if b.keys else ""
        if root in GAPS:  # the root model's own mapping, not a sub-model's
            pytest.skip(f"not served ({root}): {GAPS[root]}")
        pytest.skip(f"no shipped rule serves {b.cls} (mapping {'/'.join(b.keys) or '?'})")
    if conv.name in NOT_HUB_ON_SAVE:
        pytest.skip(f"{conv.name}: {NOT_HUB_ON_SAVE[conv.name]}")
    root_type = b.config.get("model_type")
    if why.startswith("model_type ") and why != f"model_type {root_type}":
        # select_rules fell back to a sub-config's model type: that file converts the sub-model
        # at the root, not this composite (reported; convlens.checkpoint.select_rules)
        root = b.keys[0] if b.keys else root_type
        reason = f"not served ({root}): {GAPS[root]}" if root in GAPS else (
            f"no shipped rule serves {b.cls} (mapping {'/'.join(b.keys) or '?'})")
        pytest.skip(f"{reason}; select_rules would pick {conv.name} by the sub-config's {why}, "
                    "which does not convert the composite")
    return conv


def _param(cls: str, first: set[str]) -> Any:
    marks = [] if cls in first else [pytest.mark.transformers_slow]
    return pytest.param(cls, id=cls, marks=marks)


def _first_per_type() -> set[str]:
    seen: dict[str, str] = {}
    for cls in CLASSES:
        prefix = re.sub(r"(For[A-Z].*|Model|Backbone|Encoder|Decoder)$", "", cls)
        seen.setdefault(prefix, cls)
    return set(seen.values())


PARAMS = [_param(c, _first_per_type()) for c in CLASSES]


@pytest.mark.parametrize("built", PARAMS, indirect=True)
def test_apply_of_saved_files_equals_from_pretrained(built: Built) -> None:
    if built.skip:
        pytest.skip(built.skip)
    conv = _rules(built)
    try:
        got = conv.apply(built.hub, built.config)
    except ConvlensError as exc:
        pytest.fail(f"{built.cls}: convlens {conv.name} apply fails: {exc}", pytrace=False)
    want = {k: v for k, v in built.loaded.items()
            if k not in _tied_away(built.aliases, set(got))}
    lines = state_dict_diff(got, want)
    if lines:
        pytest.fail(f"{built.cls} ({conv.name}; {built.note or 'saved layout'}): apply(saved) vs "
                    "from_pretrained(saved).state_dict():\n  " + "\n  ".join(lines),
                    pytrace=False)


@pytest.mark.parametrize("built", PARAMS, indirect=True)
def test_revert_of_memory_equals_saved_files(built: Built) -> None:
    if built.skip:
        pytest.skip(built.skip)
    conv = _rules(built)
    try:
        forward = set(conv.apply(built.hub, built.config))
    except ConvlensError:
        forward = set(built.memory)
    memory = {k: v for k, v in built.memory.items()
              if k not in _tied_away(built.aliases, forward)}
    try:
        got = conv.revert(memory, built.config)
    except ConvlensError as exc:
        pytest.fail(f"{built.cls}: convlens {conv.name} revert fails: {exc}", pytrace=False)
    lines = state_dict_diff(got, built.hub)
    if lines:
        pytest.fail(f"{built.cls} ({conv.name}): revert(model.state_dict()) vs the saved "
                    "files:\n  " + "\n  ".join(lines), pytrace=False)
