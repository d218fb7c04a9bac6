"""Conversion errors, with their messages asserted. Every one of these is found from headers
alone: ``plan`` raises the same error as ``apply``, before any tensor data is read."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from runtime_testlib import conversion, metas

import convlens

MIXTRAL_PREFIX = "model.layers.0.block_sparse_moe.experts"


def raised(conv: convlens.Conversion, sd: dict[str, torch.Tensor], config: Any = None,
           direction: str = "apply") -> convlens.ConversionError:
    """The error of ``apply``/``revert``; ``plan`` must raise the same message from headers."""
    with pytest.raises(convlens.ConversionError) as planned:
        conv.plan(metas(sd), config, direction=direction)  # type: ignore[arg-type]
    with pytest.raises(convlens.ConversionError) as e:
        getattr(conv, direction)(sd, config)
    assert str(e.value) == str(planned.value)
    return e.value


def mixtral_hub(experts: tuple[int, ...], weights: tuple[str, ...] = ("w1", "w2", "w3"),
                shape_of: Any = None) -> dict[str, torch.Tensor]:
    hub = {}
    for e in experts:
        for w in weights:
            shape = shape_of(e, w) if shape_of else (4, 2)
            hub[f"{MIXTRAL_PREFIX}.{e}.{w}.weight"] = torch.zeros(shape)
    return hub


# --- stack ------------------------------------------------------------------------------------


def test_missing_expert_is_named() -> None:
    err = raised(convlens.load_rules("mixtral"), mixtral_hub((0, 1, 3)))
    msg = str(err)
    assert "stack(e): '{layer*}.mlp.experts.{e:int}.w1' has e = 0-1, 3 but not 2" in msg
    assert "indices must be exactly 0..3" in msg
    assert "(group layer=model.layers.0)" in msg
    assert "mixtral.conv:10 fuse" in msg  # the rule, with its line


def test_experts_not_starting_at_zero() -> None:
    conv = conversion('fuse "{p*}.experts.{e:int}.w" -> "{p*}.experts.w" naming param '
                      'by stack(e, 0)')
    err = raised(conv, {f"m.experts.{e}.w.weight": torch.zeros(2, 2) for e in (1, 2, 3)})
    assert "has e = 1-3 but not 0; indices must be exactly 0..3" in str(err)
    err = raised(conv, {f"m.experts.{e}.w.weight": torch.zeros(2, 2) for e in (0, 5)})
    assert "has e = 0, 5 but not 1-4; indices must be exactly 0..5" in str(err)


def test_stack_members_with_different_shapes() -> None:
    hub = mixtral_hub((0, 1, 2), shape_of=lambda e, w: (5, 2) if (e, w) == (1, "w1") else (4, 2))
    err = raised(convlens.load_rules("mixtral"), hub)
    assert "stack(e): e=1 has shape [5, 2] but e=0 has [4, 2]" in str(err)
    assert err.key is not None and ".experts.1.w1.weight" in err.key


def test_stack_members_with_different_dtypes() -> None:
    conv = conversion('fuse "{p*}.experts.{e:int}.w" -> "{p*}.experts.w" naming param '
                      'by stack(e, 0)')
    sd = {"m.experts.0.w.weight": torch.zeros(2, 2),
          "m.experts.1.w.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}
    err = raised(conv, sd)
    assert "stack(e): weight dtypes differ: F32 vs BF16" in str(err)
    assert err.key == "m.experts.1.w.weight"


def test_gate_and_up_with_different_expert_counts() -> None:
    hub = mixtral_hub((0, 1), ("w1", "w2", "w3")) | mixtral_hub((2,), ("w3",))
    err = raised(convlens.load_rules("mixtral"), hub)
    assert "stack(e): parts have different counts" in str(err)
    assert "'{layer*}.mlp.experts.{e:int}.w1': 2" in str(err)
    assert "'{layer*}.mlp.experts.{e:int}.w3': 3" in str(err)


def test_group_missing_one_of_its_source_patterns() -> None:
    err = raised(convlens.load_rules("mixtral"), mixtral_hub((0, 1), ("w1", "w2")))
    msg = str(err)
    assert "no tensors match '{layer*}.mlp.experts.{e:int}.w3'" in msg
    assert "every pattern of the rule needs its part" in msg
    assert "(group layer=model.layers.0)" in msg


def test_group_missing_a_source_only_in_one_layer() -> None:
    conv = conversion('fuse "{p*}.experts.{e:int}.w1", "{p*}.experts.{e:int}.w3" '
                      '-> "{p*}.experts.gu" naming param by stack(e, 0), concat(1)')
    sd = {f"a.experts.{e}.w{j}.weight": torch.zeros(2, 2) for e in range(2) for j in (1, 3)}
    sd["b.experts.0.w1.weight"] = torch.zeros(2, 2)
    err = raised(conv, sd)
    assert ("no tensors match '{p*}.experts.{e:int}.w3' next to 'b.experts.0.w1.weight'"
            in str(err))
    assert "(group p=b)" in str(err)


def test_members_with_and_without_bias() -> None:
    conv = conversion('fuse "{p*}.experts.{e:int}.w" -> "{p*}.experts.w" naming param '
                      'by stack(e, 0)')
    sd = {"m.experts.0.w.weight": torch.zeros(2, 2), "m.experts.0.w.bias": torch.zeros(2),
          "m.experts.1.w.weight": torch.zeros(2, 2)}
    err = raised(conv, sd)
    assert "the parts have different tensors: [['bias', 'weight'], ['weight']]" in str(err)


# --- concat / split / interleave ---------------------------------------------------------------


def test_unequal_concat_without_sizes() -> None:
    conv = conversion('fuse "{p*}.q", "{p*}.k" -> "{p*}.qk" by concat(0)')
    err = raised(conv, {"m.q.weight": torch.zeros(4, 2), "m.k.weight": torch.zeros(2, 2)})
    msg = str(err)
    assert "concat(0) of unequal parts ({p*}.q: 4, {p*}.k: 2) without sizes" in msg
    assert "the inverse could not tell where to split; give sizes=[...] from config" in msg


def test_concat_parts_differ_outside_the_dim() -> None:
    conv = conversion('fuse "{p*}.a", "{p*}.b" -> "{p*}.ab" by concat(0)')
    err = raised(conv, {"m.a.weight": torch.zeros(2, 2), "m.b.weight": torch.zeros(2, 3)})
    assert "concat(0): parts differ outside dim 0: [2, 2] vs [2, 3]" in str(err)
    assert err.key == "m.b.weight"


def test_concat_sizes_disagree_with_config() -> None:
    conv = conversion('fuse "{p*}.q", "{p*}.k" -> "{p*}.qk" '
                      'by concat(0, sizes=[config.a, config.b])')
    sd = {"m.q.weight": torch.zeros(4, 2), "m.k.weight": torch.zeros(2, 2)}
    err = raised(conv, sd, {"a": 4, "b": 3})
    assert "concat(0): parts have sizes [4, 2] along dim 0, the rule says [4, 3]" in str(err)
    err = raised(conv, sd, {"a": 4})
    assert "config has no field 'config.b'" in str(err)
    err = raised(conv, sd, {"a": 4, "b": 0})
    assert "size config.b is 0; sizes must be positive" in str(err)


def test_non_divisible_equal_split() -> None:
    conv = conversion('split "{p*}.qkv" -> "{p*}.q", "{p*}.k", "{p*}.v" by split(0)')
    err = raised(conv, {"m.qkv.weight": torch.zeros(8, 2)})
    assert "split(0) into 3 equal parts: dim 0 has 8, not a multiple of 3" in str(err)
    assert err.key == "m.qkv.weight"


def test_split_sizes_do_not_add_up() -> None:
    conv = conversion('split "{p*}.qkv" -> "{p*}.q", "{p*}.k" '
                      'by split(0, sizes=[config.a, config.b])')
    err = raised(conv, {"m.qkv.weight": torch.zeros(8, 2)}, {"a": 4, "b": 3})
    assert "split(0): sizes [4, 3] add up to 7 but dim 0 has 8" in str(err)


def test_non_divisible_deinterleave_and_unequal_interleave() -> None:
    err = raised(conversion('split "{p*}.gu" -> "{p*}.g", "{p*}.u" by deinterleave(0)'),
                 {"m.gu.weight": torch.zeros(5, 2)})
    assert "deinterleave(0) into 2: dim 0 has 5, not a multiple of 2" in str(err)
    err = raised(conversion('fuse "{p*}.g", "{p*}.u" -> "{p*}.gu" by interleave(0)'),
                 {"m.g.weight": torch.zeros(4, 2), "m.u.weight": torch.zeros(2, 2)})
    assert "interleave(0): parts must have equal shapes: [4, 2] vs [2, 2]" in str(err)


def test_rope_rows_not_a_multiple_of_two_heads() -> None:
    conv = conversion('map "{p*}.q" -> "{p*}.q_rot" by rope_permute(heads=config.h)')
    err = raised(conv, {"m.q.weight": torch.zeros(6, 2)}, {"h": 2})
    assert "rope_permute: dim 0 has 6 rows, not a multiple of 2 x 2 heads" in str(err)


def test_flatten_sizes_do_not_match() -> None:
    conv = conversion('map "{p*}.p" -> "{p*}.l" by flatten(1, sizes=[3, 2])')
    err = raised(conv, {"m.p.weight": torch.zeros(6, 2, 3)})
    assert "flatten(1): dims 1..2 of [6, 2, 3] are not [3, 2]" in str(err)


# --- collisions -------------------------------------------------------------------------------


def test_rename_onto_an_existing_key_names_both_sources() -> None:
    conv = conversion('rename "{p*}.a" -> "{p*}.b"')
    for sd in ({"m.a.weight": torch.zeros(2), "m.b.weight": torch.zeros(2)},
               {"m.b.weight": torch.zeros(2), "m.a.weight": torch.zeros(2)}):
        err = raised(conv, sd)
        msg = str(err)
        assert "two tensors would be written to 'm.b.weight'" in msg
        assert "one from m.a.weight" in msg and "one from m.b.weight" in msg
        assert err.key == "m.b.weight"


def test_two_renames_onto_one_key_name_both_sources() -> None:
    conv = conversion('rename "{p*}.a" -> "{p*}.c"\nrename "{p*}.b" -> "{p*}.c"')
    err = raised(conv, {"m.a.weight": torch.zeros(2), "m.b.weight": torch.zeros(2)})
    assert ("two tensors would be written to 'm.c.weight': one from m.a.weight, one from "
            "m.b.weight") in str(err)


def test_a_collision_inside_a_run_of_renames_names_its_rule() -> None:
    """Consecutive renames run as one pass; the rule that made two keys meet is still the one
    named, although a later rename moves both on."""
    conv = conversion('rename "{p*}.x" -> "{p*}.y"\nrename "{p*}.a" -> "{p*}.c"\n'
                      'rename "{p*}.c" -> "{p*}.d"\nrename "{p*}.b" -> "{p*}.e"')
    ok = {"m.x.w": torch.zeros(2), "m.a.weight": torch.zeros(2), "m.b.weight": torch.zeros(2)}
    assert list(conv.apply(ok)) == ["m.y.w", "m.d.weight", "m.e.weight"]
    err = raised(conv, {"m.a.weight": torch.zeros(2), "m.c.weight": torch.zeros(2)})
    assert "two tensors would be written to 'm.c.weight'" in str(err)
    assert err.rule is not None and err.rule.endswith(":3 rename")


def test_split_output_onto_an_existing_key() -> None:
    conv = conversion('split "{p*}.x" -> "{p*}.a", "{p*}.b" by split(0)')
    err = raised(conv, {"m.x.weight": torch.zeros(4, 2), "m.a.weight": torch.zeros(2, 2)})
    assert ("two tensors would be written to 'm.a.weight': one from m.x.weight, one from "
            "m.a.weight") in str(err)


def test_fuse_output_onto_an_existing_key() -> None:
    conv = conversion('fuse "{p*}.q", "{p*}.k" -> "{p*}.qk" by concat(0)')
    sd = {"m.q.weight": torch.zeros(2, 2), "m.k.weight": torch.zeros(2, 2),
          "m.qk.weight": torch.zeros(4, 2)}
    err = raised(conv, sd)
    msg = str(err)
    assert "two tensors would be written to 'm.qk.weight'" in msg
    assert "(+1 more)" in msg and "one from m.qk.weight" in msg


# --- values (found at execution) ----------------------------------------------------------------


def test_biases_kept_once_must_be_bit_identical() -> None:
    conv = conversion('fuse "{p*}.a", "{p*}.b" -> "{p*}.ab" by concat(1)')
    sd = {"m.a.weight": torch.zeros(2, 2), "m.a.bias": torch.tensor([1.0, 2.0]),
          "m.b.weight": torch.zeros(2, 2), "m.b.bias": torch.tensor([1.0, 2.5])}
    conv.plan(metas(sd))
    with pytest.raises(convlens.ConversionError) as e:
        conv.apply(sd)
    assert ("m.b.bias must equal m.a.bias bit for bit (the result keeps one of them), but they "
            "differ") in str(e.value)


def test_strict_lists_unmatched_keys() -> None:
    conv = convlens.load_rules("mixtral")
    with pytest.raises(convlens.ConversionError) as e:
        conv.apply({"lm_head.weight": torch.zeros(2)}, strict=True)
    assert "strict: 1 key(s) match no rule of mixtral: lm_head.weight" in str(e.value)


# --- tensors that fit no scheme ----------------------------------------------------------------


# Regression: an earlier snapshot kept only the first four reasons (quantized schemes' "missing
# [weight_scale]") and cut off the plain scheme's, which is the one that matters here.
def test_a_bias_of_the_wrong_shape_is_named() -> None:
    conv = conversion('fuse "m.a", "m.b" -> "m.ab" by concat(0)')
    sd = {"m.a.weight": torch.zeros(2, 3), "m.a.bias": torch.zeros(3),
          "m.b.weight": torch.zeros(2, 3), "m.b.bias": torch.zeros(2)}
    err = raised(conv, sd)
    assert "bias has shape [3], expected [2]" in str(err)
