"""The executor: views where possible, the bit-exact Same check, missing inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_testlib import DTYPES, Fill, assert_bits, conversion, metas, storage

import convlens
from convlens.compiler import plan as P
from convlens.runtime.execute import bit_equal, execute

# --- views ----------------------------------------------------------------------------------


def test_rename_returns_the_same_tensor_object() -> None:
    conv = conversion('rename "{p*}.block_sparse_moe" -> "{p*}.mlp"')
    w, b, other = torch.ones(2, 2), torch.zeros(2), torch.ones(3)
    out = conv.apply({"model.layers.0.block_sparse_moe.gate.weight": w,
                      "model.layers.0.block_sparse_moe.gate.bias": b, "norm.weight": other})
    assert out["model.layers.0.mlp.gate.weight"] is w
    assert out["model.layers.0.mlp.gate.bias"] is b
    assert out["norm.weight"] is other
    back = conv.revert(out)
    assert back["model.layers.0.block_sparse_moe.gate.weight"] is w


def test_passthrough_returns_the_same_tensor_object() -> None:
    conv = convlens.load_rules("mixtral")
    t = torch.ones(4, 2)
    out = conv.apply({"lm_head.weight": t})
    assert out == {"lm_head.weight": t} and out["lm_head.weight"] is t


@settings(max_examples=25)
@given(n=st.integers(2, 3), rows=st.integers(1, 4), cols=st.integers(1, 4),
       dim=st.sampled_from([0, 1]), dt=st.sampled_from(DTYPES))
def test_split_results_are_views_of_the_input(n: int, rows: int, cols: int, dim: int,
                                              dt: torch.dtype) -> None:
    fill = Fill()
    names = ["a", "b", "c"][:n]
    dst = ", ".join(f'"m.{x}"' for x in names)
    shape = (n * rows, cols) if dim == 0 else (rows, n * cols)
    x, b = fill(*shape, dtype=dt), fill(shape[0], dtype=dt)
    for op in (f"split({dim})", f"deinterleave({dim})"):
        out = conversion(f'split "m.fused" -> {dst} by {op}').apply(
            {"m.fused.weight": x, "m.fused.bias": b})
        for name in names:
            part = out[f"m.{name}.weight"]
            assert storage(part) == storage(x), f"{op}: {name} is a copy"
            if dim == 0:
                assert storage(out[f"m.{name}.bias"]) == storage(b)
            else:  # the bias has no 'in' axis: every part gets the input bias itself
                assert out[f"m.{name}.bias"] is b


def test_split_view_writes_through() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    out = conversion('split "m.qkv" -> "m.q", "m.k", "m.v" by split(0)').apply({"m.qkv.weight": x})
    out["m.k.weight"][0, 0] = -1.0
    assert x[2, 0].item() == -1.0  # the same memory


@settings(max_examples=25)
@given(E=st.integers(1, 4), rows=st.integers(1, 4), cols=st.integers(1, 4),
       dt=st.sampled_from(DTYPES))
def test_unstack_results_are_selects_sharing_storage(E: int, rows: int, cols: int,
                                                     dt: torch.dtype) -> None:
    fill = Fill()
    x, b = fill(E, rows, cols, dtype=dt), fill(E, rows, dtype=dt)
    out = conversion('split "m.experts.down" naming param -> "m.experts.{e:int}.w2" '
                     'by unstack(e, 0)').apply({"m.experts.down": x, "m.experts.down_bias": b})
    for e in range(E):
        w = out[f"m.experts.{e}.w2.weight"]
        assert storage(w) == storage(x)
        assert w.data_ptr() == x[e].data_ptr()
        assert storage(out[f"m.experts.{e}.w2.bias"]) == storage(b)


def test_transpose_and_flatten_are_views() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    t = conversion('map "m.fc" -> "m.fc_t" axes (in, out) by transpose(0, 1)').apply(
        {"m.fc.weight": x})["m.fc_t.weight"]
    assert storage(t) == storage(x) and not t.is_contiguous()
    k = torch.arange(24.0).reshape(2, 3, 1, 2, 2)
    flat = conversion('map "m.p" -> "m.l" by flatten(1, sizes=[3, 1, 2, 2])').apply(
        {"m.p.weight": k})["m.l.weight"]
    assert storage(flat) == storage(k)  # reshape of contiguous memory is a view


def test_stack_and_concat_allocate() -> None:
    a, b = torch.ones(2, 2), torch.zeros(2, 2)
    out = conversion('fuse "m.a", "m.b" -> "m.ab" by concat(0)').apply(
        {"m.a.weight": a, "m.b.weight": b})["m.ab.weight"]
    assert storage(out) not in (storage(a), storage(b))


def test_kept_bias_of_a_concat_along_in_is_the_first_part_bias() -> None:
    b1 = torch.tensor([1.0, 2.0])
    out = conversion('fuse "m.a", "m.b" -> "m.ab" by concat(1)').apply(
        {"m.a.weight": torch.ones(2, 2), "m.a.bias": b1, "m.b.weight": torch.ones(2, 2),
         "m.b.bias": b1.clone()})
    assert out["m.ab.bias"] is b1


# --- the Same node is bit-exact ---------------------------------------------------------------


def same_plan(shape: tuple[int, ...], dtype: str) -> P.Plan:
    node = P.Same((P.Load("a", shape, dtype), P.Load("b", shape, dtype)), shape, dtype, 0)
    rule = P.RuleRef("test.conv:1 fuse", "test.conv", 1, "fuse ...")
    return P.Plan("t", "forward", {"out": node}, [rule], {0: 1}, [])


def test_same_accepts_bit_identical_values_and_keeps_the_first() -> None:
    a = torch.tensor([1.0, 2.0])
    out = execute(same_plan((2,), "F32"), {"a": a, "b": a.clone()})
    assert out["out"] is a


def test_same_tells_zero_from_negative_zero() -> None:
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])
    assert bool((a == b).all())  # == would let them pass
    assert not bit_equal(a, b)
    with pytest.raises(convlens.ConversionError) as e:
        execute(same_plan((2,), "F32"), {"a": a, "b": b})
    msg = str(e.value)
    assert "b must equal a bit for bit" in msg
    assert "rule: test.conv:1 fuse" in msg


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_same_accepts_the_same_nan_bits(dt: torch.dtype) -> None:
    a = torch.tensor([float("nan"), 1.0], dtype=dt)
    b = a.clone()
    assert not bool((a == b).all())  # == would reject them
    assert bit_equal(a, b)
    name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.float64: "F64"}[dt]
    assert execute(same_plan((2,), name), {"a": a, "b": b})["out"] is a


def test_same_rejects_nans_with_other_bits() -> None:
    a = torch.tensor([0x7FC00000, 0x7FC00001], dtype=torch.int32).view(torch.float32)
    b = torch.tensor([0x7FC00000, 0x7FC00002], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(a).all() and torch.isnan(b).all()
    assert not bit_equal(a, b)
    with pytest.raises(convlens.ConversionError, match="bit for bit"):
        execute(same_plan((2,), "F32"), {"a": a, "b": b})


def test_bit_equal_needs_same_dtype_and_shape() -> None:
    assert not bit_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not bit_equal(torch.zeros(2), torch.zeros(1, 2))
    assert bit_equal(torch.zeros(0), torch.zeros(0))
    assert bit_equal(torch.tensor(3.0), torch.tensor(3.0))
    assert not bit_equal(torch.tensor(0.0), torch.tensor(-0.0))


def test_bit_equal_of_non_contiguous_views() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    assert bit_equal(x[:, 1], x[:, 1].clone())
    assert not bit_equal(x[:, 1], x[:, 2])


# Regressions: an earlier snapshot flattened with .contiguous()/.reshape(-1)/.clone(), which all
# keep the stride (2,) of a one-element view, so .view(torch.uint8) raised a bare RuntimeError.
def test_bit_equal_of_a_one_element_strided_view() -> None:
    t = torch.tensor([[7.0, 7.0]])[:, 0]  # shape [1], stride (2,)
    assert t.shape == (1,) and t.stride() == (2,)
    assert bit_equal(t, t.clone())
    assert not bit_equal(t, torch.tensor([8.0]))


def test_same_check_on_strided_one_element_biases_through_the_api() -> None:
    conv = conversion('split "{p*}.gu" -> "{p*}.g", "{p*}.u" by deinterleave(0)\n'
                      'fuse "{p*}.g", "{p*}.u" -> "{p*}.gu2" by concat(1)')
    x = {"m.gu.weight": torch.arange(6.0).reshape(2, 3), "m.gu.bias": torch.tensor([7.0, 7.0])}
    out = conv.apply(x)
    assert_bits(out["m.gu2.weight"], torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]))
    assert_bits(out["m.gu2.bias"], torch.tensor([7.0]))


def test_same_through_the_api_zero_vs_negative_zero_bias() -> None:
    conv = conversion('fuse "{p*}.a", "{p*}.b" -> "{p*}.ab" by concat(1)')
    sd = {"m.a.weight": torch.ones(2, 2), "m.a.bias": torch.tensor([0.0, 1.0]),
          "m.b.weight": torch.ones(2, 2), "m.b.bias": torch.tensor([-0.0, 1.0])}
    conv.plan(metas(sd))  # headers alone cannot see it
    with pytest.raises(convlens.ConversionError) as e:
        conv.apply(sd)
    msg = str(e.value)
    assert "m.b.bias must equal m.a.bias bit for bit" in msg
    assert "the result keeps one of them" in msg
    assert e.value.rule is not None and "fuse" in e.value.rule


def test_same_through_the_api_nan_bias() -> None:
    conv = conversion('fuse "{p*}.a", "{p*}.b" -> "{p*}.ab" by concat(1)')
    nan = torch.tensor([float("nan"), 1.0])
    sd = {"m.a.weight": torch.ones(2, 2), "m.a.bias": nan,
          "m.b.weight": torch.ones(2, 2), "m.b.bias": nan.clone()}
    out = conv.apply(sd)
    assert out["m.ab.bias"] is nan
    back = conv.revert(out)
    assert back["m.a.bias"] is nan and back["m.b.bias"] is nan  # the restored copies


# --- missing inputs ---------------------------------------------------------------------------


def test_missing_load_key_names_the_key() -> None:
    conv = conversion('fuse "m.a", "m.b" -> "m.ab" by concat(0)')
    sd = {"m.a.weight": torch.ones(2, 2), "m.b.weight": torch.ones(2, 2)}
    plan = conv.plan(metas(sd))
    with pytest.raises(convlens.ConversionError) as e:
        execute(plan, {"m.a.weight": sd["m.a.weight"]})
    assert "tensor 'm.b.weight' is missing" in str(e.value)
    assert e.value.key == "m.b.weight"


def test_missing_load_key_in_a_hand_written_plan() -> None:
    plan = P.Plan("t", "forward", {"x": P.Load("some.key", (2,), "F32")}, [], {}, ["some.key"])
    with pytest.raises(convlens.ConversionError, match=r"tensor 'some\.key' is missing"):
        execute(plan, {})


def test_execute_evaluates_every_node_of_a_hand_written_plan() -> None:
    """All node kinds at once, against plain torch calls."""
    a = torch.arange(24.0).reshape(2, 3, 4)
    b = a + 100
    la, lb = P.Load("a", (2, 3, 4), "F32"), P.Load("b", (2, 3, 4), "F32")
    stack = P.Stack((la, lb), 1, (2, 2, 3, 4), "F32", 0)
    cat = P.Cat((la, lb), 2, (2, 3, 8), "F32", 0)
    sl = P.Slice(la, 2, 1, 4, 2, (2, 3, 2), "F32", 0)
    sel = P.Select(lb, 1, 2, (2, 4), "F32", 0)
    perm = P.Permute(la, (2, 0, 1), (4, 2, 3), "F32", 0)
    resh = P.Reshape(perm, (4, 6), "F32", 0)
    plan = P.Plan("t", "forward", {"stack": stack, "cat": cat, "slice": sl, "select": sel,
                                   "permute": perm, "reshape": resh}, [], {}, [])
    out = execute(plan, {"a": a, "b": b})
    assert list(out) == ["stack", "cat", "slice", "select", "permute", "reshape"]
    assert_bits(out["stack"], torch.stack([a, b], 1))
    assert_bits(out["cat"], torch.cat([a, b], 2))
    assert_bits(out["slice"], a[:, :, 1:4:2])
    assert_bits(out["select"], b[:, 2])
    assert_bits(out["permute"], a.permute(2, 0, 1))
    assert_bits(out["reshape"], a.permute(2, 0, 1).reshape(4, 6))
    for k in ("slice", "select", "permute"):
        assert storage(out[k]) in (storage(a), storage(b)), k
    assert math.prod(out["reshape"].shape) == 24
