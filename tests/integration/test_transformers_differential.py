"""Differential tests: the shipped rule files against transformers' own load-time conversion.

For every case a tiny random model is built from a small config and saved with
``save_pretrained``. The hub-layout file is what transformers wrote, or, where transformers does not
write the published layout for a model built from scratch (PrefixChange dropped on save, the
no-op reverse of ``Transpose(check_dims=True)``), that file rewritten into the published layout.
Then

(a) ``load_rules(name).apply(hub, config)`` must equal ``Model.from_pretrained(hub).state_dict()``
    (same keys, shapes, dtypes and values), and
(b) ``revert(model.state_dict(), config)`` must equal the hub file exactly.

The expect lines of each file are checked on the same tensors: the hub key must be among the
inputs of the memory key in the plan.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from bitexact import state_dict_diff  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import convlens  # noqa: E402
from convlens.api import metas_of  # noqa: E402
from convlens.compiler import plan as P  # noqa: E402

pytestmark = pytest.mark.transformers

StateDict = dict[str, torch.Tensor]


# --- helpers --------------------------------------------------------------------------------------


def assert_same(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                what: str) -> None:
    lines = state_dict_diff(got, want)
    if lines:
        pytest.fail(f"{what}: state dicts differ\n  " + "\n  ".join(lines), pytrace=False)


def load_dir(path: Path) -> StateDict:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors files in {path}"
    out: StateDict = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def write_hub(saved_dir: Path, hub: StateDict, hub_dir: Path) -> Path:
    """A checkpoint directory with the config of ``saved_dir`` and the tensors ``hub``."""
    hub_dir.mkdir()
    for name in ("config.json", "generation_config.json"):
        if (saved_dir / name).is_file():
            shutil.copy(saved_dir / name, hub_dir / name)
    save_file({k: v.contiguous() for k, v in hub.items()}, str(hub_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return hub_dir


def from_pretrained(cls: type, path: Path) -> Any:
    """``cls.from_pretrained(path)``, which must load every tensor with no report at all."""
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported problems loading {path.name}: {problems}"
    return model


def state_of(model: Any) -> StateDict:
    return {k: v.detach() for k, v in model.state_dict().items()}


def check_expects(conv: convlens.Conversion, hub: StateDict, config: Any, *,
                  require_all: bool) -> None:
    """Every expect line whose hub key is in ``hub``: the memory key reads that hub key."""
    plan = conv.plan(metas_of(hub), config)
    unused, wrong = [], []
    for e in conv.program.expects:
        if e.src not in hub:
            unused.append(e.src)
            continue
        node = plan.outputs.get(e.dst)
        if node is None or e.src not in {leaf.key for leaf in P.leaves(node)}:
            wrong.append(f"{e.src!r} -> {e.dst!r}")
    assert not wrong, f"{conv.name}: expect lines that do not hold: {wrong}"
    if require_all:
        assert not unused, f"{conv.name}: expect lines not exercised by this model: {unused}"


def transpose_experts(sd: StateDict) -> StateDict:
    """qwen3_vl_moe: the in-memory [E, out, in] experts -> the hub's [E, in, out]."""
    return {k: v.transpose(1, 2).contiguous()
            if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) else v
            for k, v in sd.items()}


# --- tiny models ----------------------------------------------------------------------------------


def _finish(config: Any, arch: str) -> Any:
    config.architectures = [arch]
    torch.manual_seed(0)
    return getattr(transformers, arch)(config).eval()


def qwen2_moe() -> Any:
    c = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    return _finish(c, "Qwen2MoeForCausalLM")


def qwen3_moe() -> Any:
    c = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2)
    return _finish(c, "Qwen3MoeForCausalLM")


def minimax_m3_vl() -> Any:
    text = dict(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=4,
        num_local_experts=4, num_experts_per_tok=2, dense_intermediate_size=24,
        shared_intermediate_size=16, mlp_layer_types=["dense", "sparse"],
        layer_types=["full_attention", "minimax_m3_sparse"], index_n_heads=2, index_head_dim=8,
        index_block_size=4, index_topk_blocks=2, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  image_size=16, patch_size=4)
    c = transformers.MiniMaxM3VLConfig(text_config=text, vision_config=vision,
                                       projector_hidden_size=32, image_token_index=60,
                                       video_token_index=61)
    return _finish(c, "MiniMaxM3SparseForConditionalGeneration")


def nomic_bert() -> Any:
    c = transformers.NomicBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64)
    return _finish(c, "NomicBertModel")


def _qwen3_vl_moe(moe_intermediate_size: int) -> Any:
    text = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48,
        moe_intermediate_size=moe_intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                  patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    c = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision,
                                      image_token_id=60, video_token_id=61,
                                      vision_start_token_id=62, vision_end_token_id=63)
    return _finish(c, "Qwen3VLMoeForConditionalGeneration")


def qwen3_vl_moe() -> Any:
    return _qwen3_vl_moe(8)  # gate_up [E, 16, 32], down [E, 32, 8]: no square layout


def qwen3_vl_moe_square() -> Any:
    return _qwen3_vl_moe(16)  # gate_up [E, 32, 32] in memory and on the hub


def llava() -> Any:
    text = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48,
                  num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8,
                  projection_dim=32)
    c = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=63,
                                 vision_feature_layer=-1)
    return _finish(c, "LlavaForConditionalGeneration")


def llava_hub(saved: StateDict) -> StateDict:
    """The published layout: the CLIP tower under vision_tower.vision_model (transformers drops
    this PrefixChange when it saves a model that was not loaded from a hub file)."""
    out = {}
    for k, v in saved.items():
        if k.startswith("vision_tower."):
            assert not k.startswith("vision_tower.vision_model."), k
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        out[k] = v
    return out


def qwen2_vl() -> Any:
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2)
    c = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=60,
                                   video_token_id=61, vision_start_token_id=62,
                                   vision_end_token_id=63)
    return _finish(c, "Qwen2VLForConditionalGeneration")


def inkling() -> Any:
    text = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
        swa_head_dim=8, sliding_window_size=8, d_rel=4, rel_extent=16, intermediate_size=48,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        mlp_layer_types=["dense", "sparse"], local_layer_ids=[0], max_position_embeddings=64)
    # patch 2 x 2 and three layers: plan_out_scales then needs no scipy
    vision = dict(text_hidden_size=32, patch_size=2, temporal_patch_size=2, hidden_size=32,
                  num_hidden_layers=3, num_attention_heads=4)
    audio = dict(n_mel_bins=4, mel_vocab_size=8, text_hidden_size=32)
    c = transformers.InklingConfig(text_config=text, vision_config=vision, audio_config=audio,
                                   image_token_id=60, audio_token_id=61, image_bos_token_id=62,
                                   audio_bos_token_id=63)
    return _finish(c, "InklingForConditionalGeneration")


def gradium_phonon_tts() -> Any:
    flow_head = dict(hidden_size=32, num_hidden_layers=1, latent_dim=8, condition_dim=32,
                     frequency_embedding_size=16, loss_weighting_hidden_size=8,
                     loss_weighting_num_layers=2)
    c = transformers.GradiumPhononTTSConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, latent_dim=8, audio_prompt_dim=16, num_speakers_vocab_size=8,
        num_speakers_embedding_dim=8, duration_delta_embedding_dim=8, flow_head_config=flow_head,
        max_position_embeddings=64)
    return _finish(c, "GradiumPhononTTSForConditionalGeneration")


@dataclass(frozen=True)
class Case:
    id: str
    rules: str
    build: Callable[[], Any]
    # saved files -> published hub layout, where save_pretrained of a model built from scratch
    # does not write it
    to_hub: Callable[[StateDict], StateDict] | None = None
    # where to_hub is given: transformers' save_pretrained of the model loaded from the hub file
    # writes the hub file back (its own save side as a second oracle for revert)
    resave_is_hub: bool = False
    all_expects: bool = True

    def __str__(self) -> str:
        return self.id


CASES = [
    Case("qwen2_moe", "qwen2_moe", qwen2_moe),
    Case("qwen2_moe[qwen3_moe]", "qwen2_moe", qwen3_moe, all_expects=False),
    Case("minimax_m3_vl", "minimax_m3_vl", minimax_m3_vl),
    Case("nomic_bert", "nomic_bert", nomic_bert),
    Case("qwen3_vl_moe", "qwen3_vl_moe", qwen3_vl_moe, to_hub=transpose_experts),
    Case("llava", "llava", llava, to_hub=llava_hub, resave_is_hub=True),
    Case("qwen2_vl", "qwen2_vl", qwen2_vl),
    Case("inkling[interleave]", "inkling", inkling),
    Case("gradium_phonon_tts[rope_permute]", "gradium_phonon_tts", gradium_phonon_tts),
]


def test_every_case_names_a_shipped_file() -> None:
    shipped = convlens.shipped_rules()
    assert {c.rules for c in CASES} <= set(shipped)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_apply_matches_from_pretrained_and_revert_gives_the_hub_file(
        case: Case, tmp_path: Path) -> None:
    model = case.build()
    config = model.config
    memory = {k: v.clone() for k, v in state_of(model).items()}
    saved_dir = tmp_path / "saved"
    model.save_pretrained(str(saved_dir))
    saved = load_dir(saved_dir)
    if case.to_hub is None:
        hub, hub_dir = saved, saved_dir
    else:
        hub = case.to_hub(saved)
        hub_dir = write_hub(saved_dir, hub, tmp_path / "hub")
    assert set(hub) != set(memory) or any(hub[k].shape != memory[k].shape for k in hub), (
        f"{case}: the hub file already has the in-memory layout; the case tests nothing")

    loaded_model = from_pretrained(type(model), hub_dir)
    loaded = state_of(loaded_model)
    assert_same(loaded, memory,
                f"{case}: sanity: transformers loads the hub file back to the model")
    if case.resave_is_hub:
        loaded_model.save_pretrained(str(tmp_path / "resaved"))
        assert_same(load_dir(tmp_path / "resaved"), hub,
                    f"{case}: sanity: transformers re-saves the model loaded from the hub file")

    conv = convlens.load_rules(case.rules)
    assert_same(conv.apply(hub, config), loaded,
                f"{case}: convlens apply(hub) vs transformers from_pretrained(hub).state_dict()")
    assert_same(conv.revert(memory, config), hub,
                f"{case}: convlens revert(model.state_dict()) vs the hub file")
    check_expects(conv, hub, config, require_all=case.all_expects)


# --- transformers' Transpose(check_dims=True) on qwen3_vl_moe -----------------------------------


def test_qwen3_vl_moe_square_experts_load_untransposed_in_transformers_but_not_in_convlens(
        tmp_path: Path) -> None:
    """2 * moe_intermediate_size == hidden_size: the hub's gate_up_proj [E, H, 2I] has the shape of
    the in-memory [E, 2I, H]. transformers' Transpose(1, 2, check_dims=True) compares shapes, sees
    them equal and skips the transpose: the model silently gets the hub tensor as it is. convlens
    always transposes."""
    model = qwen3_vl_moe_square()
    memory = {k: v.clone() for k, v in state_of(model).items()}
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert memory[key].shape[1] == memory[key].shape[2], "the case needs a square gate_up_proj"
    hub = transpose_experts(memory)
    saved_dir = tmp_path / "saved"
    model.save_pretrained(str(saved_dir))
    hub_dir = write_hub(saved_dir, hub, tmp_path / "hub")

    conv = convlens.load_rules("qwen3_vl_moe")
    assert_same(conv.apply(hub, model.config), memory, "convlens apply(square hub file)")
    assert_same(conv.revert(memory, model.config), hub, "convlens revert to the square hub file")

    loaded = state_of(from_pretrained(type(model), hub_dir))
    if torch.equal(loaded[key], memory[key]):
        pytest.skip("transformers now transposes square expert layouts on load")
    assert torch.equal(loaded[key], hub[key]), (
        "transformers loaded the square gate_up_proj neither transposed nor as stored")
    # the non-square down_proj [E, I, H] -> [E, H, I] is transposed by both
    down = "model.language_model.layers.0.mlp.experts.down_proj"
    assert torch.equal(loaded[down], memory[down])


def test_qwen3_vl_moe_transformers_saves_the_memory_layout_and_convlens_reverts_to_the_hub_layout(
        tmp_path: Path) -> None:
    """transformers' reverse of Transpose(check_dims=True) compares with the in-memory shape and
    never transposes, so save_pretrained writes [E, out, in], even for a model loaded from an
    [E, in, out] hub file. convlens reverts to the hub layout."""
    model = qwen3_vl_moe()
    memory = {k: v.clone() for k, v in state_of(model).items()}
    hub = transpose_experts(memory)
    saved_dir = tmp_path / "saved"
    model.save_pretrained(str(saved_dir))
    hub_dir = write_hub(saved_dir, hub, tmp_path / "hub")
    reloaded = type(model).from_pretrained(str(hub_dir))
    resaved_dir = tmp_path / "resaved"
    reloaded.save_pretrained(str(resaved_dir))
    resaved = load_dir(resaved_dir)

    conv = convlens.load_rules("qwen3_vl_moe")
    assert_same(conv.revert(memory, model.config), hub, "convlens revert(model.state_dict())")
    if not state_dict_diff(resaved, memory):
        key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
        assert resaved[key].shape == memory[key].shape != hub[key].shape
    else:
        assert_same(resaved, hub, "transformers now reverts the transpose on save; its file")
        pytest.skip("transformers now writes the hub layout on save")


# --- the ops themselves: transformers' Interleave and PermuteForRope on odd shapes ----------------


def _converter(mapping_key: str, source: str) -> Any:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    for t in get_checkpoint_conversion_mapping(mapping_key):
        if isinstance(t, WeightConverter) and source in t._original_source_patterns:
            return t
    raise AssertionError(f"transformers has no {mapping_key} converter from {source!r}")


def _run(ops: list[Any], sources: list[str], targets: list[str], tensors: list[torch.Tensor],
         config: Any = None) -> dict[str, torch.Tensor]:
    """A converter's op chain on one group, as WeightConverter.convert runs it: one tensor per
    source pattern in, a dict keyed by target pattern out."""
    values: dict[str, Any] = {s: [t] for s, t in zip(sources, tensors, strict=True)}
    for op in ops:
        values = op.convert(values, sources, targets, config=config, model=None,
                            full_layer_name=None, missing_keys=set())
    return values


def _reverse(ops: list[Any]) -> list[Any]:
    """The op chain transformers runs on save."""
    return [op.reverse_op for op in reversed(ops)]


INKLING_INTERLEAVES = [
    # (transformers source pattern, hub key, memory keys in transformers' target order, hub shape)
    ("mlp.experts.w13_weight", "model.llm.layers.0.mlp.experts.w13_weight",
     ["model.language_model.layers.0.mlp.experts.gate_up_proj"], (3, 10, 7)),
    ("shared_w13_weight", "model.llm.layers.0.mlp.shared_experts.shared_w13_weight",
     ["model.language_model.layers.0.mlp.shared_experts.gate_proj",
      "model.language_model.layers.0.mlp.shared_experts.up_proj"], (2, 6, 5)),
    ("mlp.w13_dn.weight", "model.llm.layers.0.mlp.w13_dn.weight",
     ["model.language_model.layers.0.mlp.gate_proj.weight",
      "model.language_model.layers.0.mlp.up_proj.weight"], (14, 3)),
]


@pytest.mark.parametrize(("source", "hub_key", "memory_keys", "shape"), INKLING_INTERLEAVES,
                         ids=[s for s, *_ in INKLING_INTERLEAVES])
def test_inkling_deinterleave_matches_transformers_interleave_op_both_ways(
        source: str, hub_key: str, memory_keys: list[str], shape: tuple[int, ...]) -> None:
    converter = _converter("inkling_mm_model", source)
    sources, targets = converter._original_source_patterns, converter._original_target_patterns
    ops = list(converter.operations)
    hub = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)

    theirs = _run(ops, sources, targets, [hub])
    memory = dict(zip(memory_keys, (theirs[t] for t in targets), strict=True))
    conv = convlens.load_rules("inkling")
    assert_same(conv.apply({hub_key: hub}), memory, f"convlens inkling vs transformers {ops}")

    back = _run(_reverse(ops), targets, sources, [memory[k] for k in memory_keys])
    assert torch.equal(back[sources[0]], hub), "transformers' reverse does not give the hub back"
    assert_same(conv.revert(memory), {hub_key: hub}, "convlens inkling revert")


@pytest.mark.parametrize(("heads", "head_dim", "hidden"), [(1, 4, 3), (2, 6, 5), (4, 2, 8)])
def test_gradium_rope_permute_matches_transformers_permute_for_rope_both_ways(
        heads: int, head_dim: int, hidden: int) -> None:
    converter = _converter("gradium_phonon_tts", r"self_attn\.in_proj\.weight")
    sources, targets = converter._original_source_patterns, converter._original_target_patterns
    ops = list(converter.operations)
    config = transformers.PretrainedConfig(num_attention_heads=heads)
    rows = 3 * heads * head_dim
    hub = torch.arange(rows * hidden, dtype=torch.float32).reshape(rows, hidden)
    hub_key = "flow_lm.transformer.layers.3.self_attn.in_proj.weight"

    theirs = _run(ops, sources, targets, [hub], config)
    memory = {f"model.layers.3.self_attn.{p}.weight": theirs[t]
              for p, t in zip(("q_proj", "k_proj", "v_proj"), targets, strict=True)}
    conv = convlens.load_rules("gradium_phonon_tts")
    cfg = {"num_attention_heads": heads}
    assert_same(conv.apply({hub_key: hub}, cfg), memory, f"convlens vs transformers {ops}")

    back = _run(_reverse(ops), targets, sources, [theirs[t] for t in targets], config)
    assert torch.equal(back[sources[0]], hub), "transformers' reverse does not give the hub back"
    assert_same(conv.revert(memory, cfg), {hub_key: hub}, "convlens revert")
