"""Op results against independent references: explicit index loops, and transformers' own ops
(``transformers.core_model_loading``) when transformers is importable.

Tensors are filled with distinct values (distinct bit patterns for 16-bit floats), so a row in
the wrong place cannot compare equal by accident.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_testlib import DTYPES, Fill, assert_bits, conversion, hf_ops

import convlens

HF = hf_ops()

dtypes = st.sampled_from(DTYPES)
small = st.integers(1, 4)


def rows(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    return [t.select(dim, i) for i in range(t.shape[dim])]


# --- stack: expert e lands at index e, whatever the order of the keys ------------------------

MIXTRAL_PREFIX = "model.layers.0.block_sparse_moe.experts"


def mixtral_hub(order: list[int], O_: int, I_: int, dt: torch.dtype, fill: Fill
                ) -> dict[str, torch.Tensor]:
    hub = {}
    for e in order:
        hub[f"{MIXTRAL_PREFIX}.{e}.w1.weight"] = fill(O_, I_, dtype=dt)
        hub[f"{MIXTRAL_PREFIX}.{e}.w2.weight"] = fill(I_, O_, dtype=dt)
        hub[f"{MIXTRAL_PREFIX}.{e}.w3.weight"] = fill(O_, I_, dtype=dt)
    return hub


def test_stack_places_expert_e_at_index_e_when_keys_come_3_1_0_2() -> None:
    fill = Fill()
    hub = mixtral_hub([3, 1, 0, 2], 3, 2, torch.float32, fill)
    assert next(iter(hub)).endswith("experts.3.w1.weight")
    mem = convlens.load_rules("mixtral").apply(hub)
    gate_up = mem["model.layers.0.mlp.experts.gate_up_proj"]
    down = mem["model.layers.0.mlp.experts.down_proj"]
    assert gate_up.shape == (4, 6, 2) and down.shape == (4, 2, 3)
    for e in range(4):
        w1, w2, w3 = (hub[f"{MIXTRAL_PREFIX}.{e}.{w}.weight"] for w in ("w1", "w2", "w3"))
        for r in range(3):
            assert_bits(gate_up[e, r], w1[r], f"gate_up[{e}, {r}]")
            assert_bits(gate_up[e, 3 + r], w3[r], f"gate_up[{e}, {3 + r}]")
        assert_bits(down[e], w2, f"down[{e}]")


@settings(max_examples=30)
@given(E=st.integers(1, 5), O_=small, I_=small, dim=st.sampled_from([0, 1, 2]), dt=dtypes,
       data=st.data())
def test_stack_any_dim_any_order(E: int, O_: int, I_: int, dim: int, dt: torch.dtype,
                                 data: st.DataObject) -> None:
    order = data.draw(st.permutations(range(E)))
    fill = Fill()
    axes = ["out", "in"]
    axes.insert(dim, "e")
    conv = conversion(f'fuse "m.experts.{{e:int}}.up" -> "m.experts.up" naming param '
                      f'axes ({", ".join(axes)}) by stack(e, {dim})')
    sd = {f"m.experts.{e}.up.weight": fill(O_, I_, dtype=dt) for e in order}
    out = conv.apply(sd)["m.experts.up"]
    expected_shape = [O_, I_]
    expected_shape.insert(dim, E)
    assert list(out.shape) == expected_shape
    for e in range(E):
        w = sd[f"m.experts.{e}.up.weight"]
        for i in range(O_):
            for j in range(I_):
                idx = [i, j]
                idx.insert(dim, e)
                assert_bits(out[tuple(idx)], w[i, j], f"expert {e} [{i}, {j}]")


@settings(max_examples=25)
@given(E=st.integers(1, 5), O_=small, I_=small, dt=dtypes)
def test_unstack_gives_expert_e_row_e(E: int, O_: int, I_: int, dt: torch.dtype) -> None:
    fill = Fill()
    conv = conversion('split "m.experts.down" naming param -> "m.experts.{e:int}.w2" '
                      'by unstack(e, 0)')
    x = fill(E, O_, I_, dtype=dt)
    b = fill(E, O_, dtype=dt)
    out = conv.apply({"m.experts.down": x, "m.experts.down_bias": b})
    assert sorted(out) == sorted(f"m.experts.{e}.w2.{r}" for e in range(E)
                                 for r in ("weight", "bias"))
    for e in range(E):
        for r in range(O_):
            assert_bits(out[f"m.experts.{e}.w2.weight"][r], x[e, r], f"expert {e} row {r}")
            assert_bits(out[f"m.experts.{e}.w2.bias"][r], b[e, r], f"expert {e} bias {r}")


# --- concat / split: row placement ----------------------------------------------------------

SIZES_TEXT = "[config.s0, config.s1, config.s2]"


@settings(max_examples=30)
@given(sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3), other=small,
       dim=st.sampled_from([0, 1]), dt=dtypes, bias=st.booleans())
def test_concat_sized_row_placement(sizes: list[int], other: int, dim: int, dt: torch.dtype,
                                    bias: bool) -> None:
    fill = Fill()
    conv = conversion(f'fuse "m.a", "m.b", "m.c" -> "m.abc" by concat({dim}, sizes={SIZES_TEXT})')
    cfg = {f"s{i}": s for i, s in enumerate(sizes)}
    parts = [fill(*((s, other) if dim == 0 else (other, s)), dtype=dt) for s in sizes]
    sd = {f"m.{n}.weight": p for n, p in zip("abc", parts, strict=True)}
    shared_bias = fill(other, dtype=dt)
    biases = []
    if bias:
        for n, s in zip("abc", sizes, strict=True):
            b = fill(s, dtype=dt) if dim == 0 else shared_bias.clone()
            sd[f"m.{n}.bias"] = b
            biases.append(b)
    out = conv.apply(sd, cfg)
    w = out["m.abc.weight"]
    assert w.shape[dim] == sum(sizes)
    r = 0
    for j, s in enumerate(sizes):
        for i in range(s):
            assert_bits(w.select(dim, r), parts[j].select(dim, i), f"row {r} = part {j} row {i}")
            if bias and dim == 0:
                assert_bits(out["m.abc.bias"][r], biases[j][i], f"bias {r}")
            r += 1
    if bias and dim == 1:
        assert_bits(out["m.abc.bias"], shared_bias, "kept bias")


@settings(max_examples=30)
@given(n=st.integers(2, 3), width=small, other=small, dim=st.sampled_from([0, 1]), dt=dtypes,
       sized=st.booleans(), data=st.data())
def test_split_row_placement(n: int, width: int, other: int, dim: int, dt: torch.dtype,
                             sized: bool, data: st.DataObject) -> None:
    fill = Fill()
    names = ["a", "b", "c"][:n]
    if sized:
        sizes = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
        args = f"{dim}, sizes=[" + ", ".join(f"config.s{i}" for i in range(n)) + "]"
    else:
        sizes = [width] * n
        args = f"{dim}"
    cfg = {f"s{i}": s for i, s in enumerate(sizes)}
    conv = conversion(f'split "m.fused" -> {", ".join(f"{chr(34)}m.{x}{chr(34)}" for x in names)}'
                      f' by split({args})')
    total = sum(sizes)
    x = fill(*((total, other) if dim == 0 else (other, total)), dtype=dt)
    b = fill(x.shape[0], dtype=dt)
    out = conv.apply({"m.fused.weight": x, "m.fused.bias": b}, cfg)
    r = 0
    for j, s in enumerate(sizes):
        part = out[f"m.{names[j]}.weight"]
        assert part.shape[dim] == s
        for i in range(s):
            assert_bits(part.select(dim, i), x.select(dim, r), f"part {j} row {i} = row {r}")
            if dim == 0:
                assert_bits(out[f"m.{names[j]}.bias"][i], b[r], f"part {j} bias {i}")
            r += 1
        if dim == 1:
            assert_bits(out[f"m.{names[j]}.bias"], b, "duplicated bias")


# --- interleave / deinterleave ----------------------------------------------------------------


@settings(max_examples=30)
@given(k=st.integers(2, 3), O_=small, I_=small, dim=st.sampled_from([0, 1]), dt=dtypes)
def test_interleave_rows_alternate(k: int, O_: int, I_: int, dim: int, dt: torch.dtype) -> None:
    fill = Fill()
    names = ["g", "u", "x"][:k]
    src = ", ".join(f'"m.{n}"' for n in names)
    conv = conversion(f'fuse {src} -> "m.gu" by interleave({dim})')
    parts = [fill(O_, I_, dtype=dt) for _ in names]
    biases = [fill(O_, dtype=dt) for _ in names]
    sd = {}
    for n, p, b in zip(names, parts, biases, strict=True):
        sd[f"m.{n}.weight"] = p
        if dim == 0:
            sd[f"m.{n}.bias"] = b
    out = conv.apply(sd)
    w = out["m.gu.weight"]
    n_rows = parts[0].shape[dim]
    assert w.shape[dim] == k * n_rows
    # part0[0], part1[0], ..., part0[1], part1[1], ...
    for i in range(n_rows):
        for j in range(k):
            assert_bits(w.select(dim, i * k + j), parts[j].select(dim, i), f"row {i * k + j}")
            if dim == 0:
                assert_bits(out["m.gu.bias"][i * k + j], biases[j][i], f"bias {i * k + j}")


@settings(max_examples=30)
@given(k=st.integers(2, 3), O_=small, I_=small, dim=st.sampled_from([0, 1]), dt=dtypes)
def test_deinterleave_takes_every_kth_row(k: int, O_: int, I_: int, dim: int,
                                          dt: torch.dtype) -> None:
    fill = Fill()
    names = ["g", "u", "x"][:k]
    dst = ", ".join(f'"m.{n}"' for n in names)
    conv = conversion(f'split "m.gu" -> {dst} by deinterleave({dim})')
    shape = (k * O_, I_) if dim == 0 else (O_, k * I_)
    x = fill(*shape, dtype=dt)
    out = conv.apply({"m.gu.weight": x})
    for j, n in enumerate(names):
        part = out[f"m.{n}.weight"]
        for i in range(part.shape[dim]):
            assert_bits(part.select(dim, i), x.select(dim, i * k + j), f"part {j} row {i}")
    # and interleave undoes it
    back = conversion(f'fuse {dst} -> "m.gu" by interleave({dim})').apply(out)
    assert_bits(back["m.gu.weight"], x, "interleave(deinterleave(x))")


# --- rope_permute -----------------------------------------------------------------------------


def test_rope_permute_one_head_of_four() -> None:
    conv = conversion('map "m.q" -> "m.q" by rope_permute(heads=config.num_attention_heads)')
    x = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    out = conv.apply({"m.q.weight": x}, {"num_attention_heads": 1})["m.q.weight"]
    # [x0, x1, x2, x3] -> [x0, x2, x1, x3]
    assert out.flatten().tolist() == [10.0, 12.0, 11.0, 13.0]


def rope_reference(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows [x0, x1, ..., x_{2h-1}] -> [x0, x2, ..., x1, x3, ...] (explicit loop)."""
    hd = x.shape[0] // heads
    half = hd // 2
    out = torch.empty_like(x)
    for h in range(heads):
        for i in range(half):
            out[h * hd + i] = x[h * hd + 2 * i]
            out[h * hd + half + i] = x[h * hd + 2 * i + 1]
    return out


@settings(max_examples=30)
@given(heads=st.integers(1, 4), half=st.integers(1, 3), other=small, dt=dtypes,
       unpermute=st.booleans())
def test_rope_permute_reference_loop(heads: int, half: int, other: int, dt: torch.dtype,
                                     unpermute: bool) -> None:
    fill = Fill()
    op = "rope_unpermute" if unpermute else "rope_permute"
    conv = conversion(f'map "m.q_proj" -> "m.q_rot" by {op}(heads=config.num_attention_heads)')
    rows_ = heads * 2 * half
    w, b = fill(rows_, other, dtype=dt), fill(rows_, dtype=dt)
    out = conv.apply({"m.q_proj.weight": w, "m.q_proj.bias": b}, {"num_attention_heads": heads})
    if unpermute:  # rope_reference(result) must give back the input
        assert_bits(rope_reference(out["m.q_rot.weight"], heads), w, "weight")
        assert_bits(rope_reference(out["m.q_rot.bias"], heads), b, "bias")
    else:
        assert_bits(out["m.q_rot.weight"], rope_reference(w, heads), "weight")
        assert_bits(out["m.q_rot.bias"], rope_reference(b, heads), "bias")


@settings(max_examples=25)
@given(heads=st.integers(1, 3), half=st.integers(1, 3), O_=small, E=st.integers(1, 3),
       dt=dtypes)
def test_rope_permute_along_dim_1_of_stacked_experts(heads: int, half: int, O_: int, E: int,
                                                     dt: torch.dtype) -> None:
    fill = Fill()
    conv = conversion('map "m.experts.q" naming param -> "m.experts.q_rot" naming param '
                      'by rope_permute(heads=config.h, dim=1)')
    rows_ = heads * 2 * half
    w, b = fill(E, rows_, O_, dtype=dt), fill(E, rows_, dtype=dt)
    out = conv.apply({"m.experts.q": w, "m.experts.q_bias": b}, {"h": heads})
    for e in range(E):
        assert_bits(out["m.experts.q_rot"][e], rope_reference(w[e], heads), f"expert {e}")
        assert_bits(out["m.experts.q_rot_bias"][e], rope_reference(b[e], heads), f"bias {e}")


# --- transpose / flatten ----------------------------------------------------------------------


@settings(max_examples=25)
@given(O_=small, I_=small, dt=dtypes)
def test_transpose_reference_loop(O_: int, I_: int, dt: torch.dtype) -> None:
    fill = Fill()
    conv = conversion('map "m.fc" -> "m.fc_t" axes (in, out) by transpose(0, 1)')
    w, b = fill(O_, I_, dtype=dt), fill(O_, dtype=dt)
    out = conv.apply({"m.fc.weight": w, "m.fc.bias": b})
    t = out["m.fc_t.weight"]
    assert t.shape == (I_, O_)
    for i in range(O_):
        for j in range(I_):
            assert_bits(t[j, i], w[i, j], f"[{j}, {i}]")
    assert_bits(out["m.fc_t.bias"], b, "bias is untouched")


FLAT = "[config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size]"


def conv_config(c: int, kt: int, k: int) -> dict[str, int]:
    return {"in_channels": c, "temporal_patch_size": kt, "patch_size": k}


@settings(max_examples=25)
@given(out_=small, c=st.integers(1, 3), kt=st.integers(1, 2), k=st.integers(1, 3), dt=dtypes)
def test_flatten_conv3d_kernel_is_reshape_out_minus_one(out_: int, c: int, kt: int, k: int,
                                                        dt: torch.dtype) -> None:
    fill = Fill()
    conv = conversion(f'map "m.proj" -> "m.linear" by flatten(1, sizes={FLAT})')
    w, b = fill(out_, c, kt, k, k, dtype=dt), fill(out_, dtype=dt)
    out = conv.apply({"m.proj.weight": w, "m.proj.bias": b}, conv_config(c, kt, k))
    flat = out["m.linear.weight"]
    assert_bits(flat, w.reshape(out_, -1), "reshape(out, -1)")
    for o in range(out_):  # and an explicit loop over the row-major index
        for ci in range(c):
            for t in range(kt):
                for h in range(k):
                    for x in range(k):
                        col = ((ci * kt + t) * k + h) * k + x
                        assert_bits(flat[o, col], w[o, ci, t, h, x], f"[{o}, {col}]")
    assert_bits(out["m.linear.bias"], b, "bias is untouched")
    back = conversion(f'map "m.linear" -> "m.proj" by unflatten(1, sizes={FLAT})').apply(
        out, conv_config(c, kt, k))
    assert_bits(back["m.proj.weight"], w, "unflatten(flatten(w))")


# --- transformers' own ops --------------------------------------------------------------------


def hf_convert(op: Any, inputs: dict[str, Any], targets: list[str], **kw: Any) -> dict[str, Any]:
    return op.convert(dict(inputs), list(inputs), targets, **kw)


@pytest.mark.transformers
@pytest.mark.skipif(HF is None, reason="transformers is not installed")
@pytest.mark.parametrize("order", [[3, 1, 0, 2], [0, 1, 2, 3], [2, 0, 1]])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_mixtral_equals_merge_modulelist_then_concatenate(order: list[int],
                                                          dt: torch.dtype) -> None:
    fill = Fill()
    hub = mixtral_hub(order, 3, 2, dt, fill)
    mem = convlens.load_rules("mixtral").apply(hub)
    E = len(order)

    def experts(w: str) -> list[torch.Tensor]:  # transformers gets them sorted by expert index
        return [hub[f"{MIXTRAL_PREFIX}.{e}.{w}.weight"] for e in range(E)]

    merged = hf_convert(HF.MergeModulelist(dim=0), {"w1": experts("w1"), "w3": experts("w3")},
                        ["gate_up_proj"])
    gate_up = hf_convert(HF.Concatenate(dim=1), merged, ["gate_up_proj"])["gate_up_proj"]
    down = hf_convert(HF.MergeModulelist(dim=0), {"w2": experts("w2")}, ["down_proj"])["down_proj"]
    assert_bits(mem["model.layers.0.mlp.experts.gate_up_proj"], gate_up, "gate_up_proj")
    assert_bits(mem["model.layers.0.mlp.experts.down_proj"], down, "down_proj")
    # and back: SplitModulelist gives the experts again
    back = convlens.load_rules("mixtral").revert(mem)
    split = hf_convert(HF.SplitModulelist(dim=0), {"down_proj": down}, ["experts.*.w2"])
    for e in range(E):
        assert_bits(back[f"{MIXTRAL_PREFIX}.{e}.w2.weight"], split[f"experts.{e}.w2"], f"w2 {e}")


@pytest.mark.transformers
@pytest.mark.skipif(HF is None, reason="transformers is not installed")
@settings(max_examples=25)
@given(n=st.integers(2, 3), O_=small, I_=small, dim=st.sampled_from([0, 1]), dt=dtypes)
def test_concat_and_split_equal_transformers(n: int, O_: int, I_: int, dim: int,
                                             dt: torch.dtype) -> None:
    fill = Fill()
    names = ["q", "k", "v"][:n]
    parts = {f"m.{x}.weight": fill(O_, I_, dtype=dt) for x in names}
    src = ", ".join(f'"m.{x}"' for x in names)
    fused = conversion(f'fuse {src} -> "m.qkv" by concat({dim})').apply(parts)["m.qkv.weight"]
    want = hf_convert(HF.Concatenate(dim=dim), {x: parts[f"m.{x}.weight"] for x in names},
                      ["qkv"])["qkv"]
    assert_bits(fused, want, "concat")
    split = conversion(f'split "m.qkv" -> {src} by split({dim})').apply({"m.qkv.weight": fused})
    chunks = hf_convert(HF.Chunk(dim=dim), {"qkv": want}, names)
    for x in names:
        assert_bits(split[f"m.{x}.weight"], chunks[x], f"chunk {x}")


@pytest.mark.transformers
@pytest.mark.skipif(HF is None, reason="transformers is not installed")
@settings(max_examples=25)
@given(O_=small, I_=small, dim=st.sampled_from([0, 1]), dt=dtypes)
def test_interleave_equals_transformers_interleave(O_: int, I_: int, dim: int,
                                                   dt: torch.dtype) -> None:
    """transformers' Interleave(inverse=True) interleaves the two halves of one tensor; ours
    interleaves two parts. On cat(gate, up) they must agree; inverse=False is our deinterleave
    followed by concat."""
    fill = Fill()
    g, u = fill(O_, I_, dtype=dt), fill(O_, I_, dtype=dt)
    ours = conversion(f'fuse "m.g", "m.u" -> "m.gu" by interleave({dim})').apply(
        {"m.g.weight": g, "m.u.weight": u})["m.gu.weight"]
    theirs = hf_convert(HF.Interleave(dim=dim, inverse=True), {"x": torch.cat([g, u], dim)},
                        ["y"])["y"]
    assert_bits(ours, theirs, "interleave")
    parts = conversion(f'split "m.gu" -> "m.g", "m.u" by deinterleave({dim})').apply(
        {"m.gu.weight": theirs})
    halves = hf_convert(HF.Interleave(dim=dim, inverse=False), {"x": theirs}, ["y"])["y"]
    assert_bits(torch.cat([parts["m.g.weight"], parts["m.u.weight"]], dim), halves, "deinterleave")


@pytest.mark.transformers
@pytest.mark.skipif(HF is None, reason="transformers is not installed")
@settings(max_examples=30)
@given(heads=st.integers(1, 4), half=st.integers(1, 3), other=small, dt=dtypes)
def test_rope_permute_equals_permute_for_rope(heads: int, half: int, other: int,
                                              dt: torch.dtype) -> None:
    fill = Fill()
    rows_ = heads * 2 * half
    w, b = fill(rows_, other, dtype=dt), fill(rows_, dtype=dt)
    cfg = {"num_attention_heads": heads}
    hf_cfg = SimpleNamespace(num_attention_heads=heads)
    out = conversion('map "m.q" -> "m.q" by rope_permute(heads=config.num_attention_heads)').apply(
        {"m.q.weight": w, "m.q.bias": b}, cfg)
    for key, t in (("m.q.weight", w), ("m.q.bias", b)):
        want = hf_convert(HF.PermuteForRope(), {"q": t}, ["q"], config=hf_cfg)["q"]
        assert_bits(out[key], want, key)
        un = conversion('map "m.q" -> "m.q" by rope_unpermute(heads=config.num_attention_heads)'
                        ).apply({"m.q.weight": w, "m.q.bias": b}, cfg)
        want_un = hf_convert(HF.PermuteForRope(inverse=True), {"q": t}, ["q"], config=hf_cfg)["q"]
        assert_bits(un[key], want_un, key + " (inverse)")


@pytest.mark.transformers
@pytest.mark.skipif(HF is None, reason="transformers is not installed")
@settings(max_examples=25)
@given(O_=small, I_=small, E=st.integers(1, 3), dt=dtypes)
def test_transpose_equals_transformers_transpose(O_: int, I_: int, E: int, dt: torch.dtype) -> None:
    fill = Fill()
    w = fill(O_, I_, dtype=dt)
    ours = conversion('map "m.fc" -> "m.fc_t" axes (in, out) by transpose(0, 1)').apply(
        {"m.fc.weight": w})["m.fc_t.weight"]
    assert_bits(ours, hf_convert(HF.Transpose(0, 1), {"x": w}, ["y"])["y"], "2-d")
    w3 = fill(E, O_, I_, dtype=dt)
    ours3 = conversion('map "m.up" naming param -> "m.up_t" naming param axes (e, in, out) '
                       'by transpose(1, 2)').apply({"m.up": w3})["m.up_t"]
    assert_bits(ours3, hf_convert(HF.Transpose(1, 2), {"x": w3}, ["y"])["y"], "3-d")


@pytest.mark.transformers
@pytest.mark.skipif(HF is None, reason="transformers is not installed")
@settings(max_examples=25)
@given(out_=small, c=st.integers(1, 3), kt=st.integers(1, 2), k=st.integers(1, 3), dt=dtypes)
def test_flatten_equals_conv3d_to_linear(out_: int, c: int, kt: int, k: int,
                                         dt: torch.dtype) -> None:
    fill = Fill()
    w = fill(out_, c, kt, k, k, dtype=dt)
    cfg = conv_config(c, kt, k)
    flat = conversion(f'map "m.proj" -> "m.linear" by flatten(1, sizes={FLAT})').apply(
        {"m.proj.weight": w}, cfg)["m.linear.weight"]
    op = HF.Conv3dToLinear(in_channels=c, kernel_size=(kt, k, k))
    assert_bits(flat, hf_convert(op, {"x": w}, ["y"])["y"], "Conv3dToLinear")
    back = conversion(f'map "m.linear" -> "m.proj" by unflatten(1, sizes={FLAT})').apply(
        {"m.linear.weight": flat}, cfg)["m.proj.weight"]
    assert_bits(back, hf_convert(op.reverse_op, {"x": flat}, ["y"])["y"], "LinearToConv3d")
