"""Laws every op of the closed op set must obey, stated as hypothesis properties.

For every op in :data:`convlens.compiler.ops.OPS` a tiny rule text uses it (with random shapes,
expert counts, dtypes, with and without biases). Each case builds two state dicts *independently*:
``x`` in the source layout and ``y`` in the destination layout (same dimensions), filled with
distinct bit patterns so that a misplaced row cannot go unnoticed. Then:

(a) ``revert(apply(x)) == x`` bit for bit (keys, dtypes, shapes, bytes);
(b) ``apply(revert(y)) == y``;
(c) the plan (headers only) declares exactly the keys, shapes and dtypes execution produces, its
    ``key_map`` is the real data dependence (perturb one input, see which outputs change), and
    ``apply(x)`` has exactly the keys/shapes/dtypes of the independently written ``y``;
(d) accounting: every input key is a leaf of some output; unmatched keys pass through as the
    very same tensor object.

The tables: every op has exactly one INVERSE entry, inverting twice gives an equal op, and every
(op, relation) pair has a LIFT entry.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from bitexact import raw_bits
from hypothesis import event, given, settings
from hypothesis import strategies as st

import convlens
from convlens.compiler import ops as O
from convlens.compiler import plan as P
from convlens.compiler.layout import RELATIONS

# --- tensors with distinct bits, and bitwise comparison (no convlens code) ---------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32)
SAFETENSORS_NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                    torch.int32: "I32"}
_SAME_SIZE_INT = {torch.float32: torch.int32, torch.int32: torch.int32,
                  torch.bfloat16: torch.int16, torch.float16: torch.int16}


class Fill:
    """Hands out tensors whose elements are all distinct (across calls too): arange values for
    float32/int32, arange *bit patterns* for 16-bit floats (finite, no -0.0, no NaN)."""

    def __init__(self) -> None:
        self.next = 1

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        start = self.next
        self.next += n
        if dtype in (torch.float16, torch.bfloat16):
            assert self.next < 0x7000, "keep 16-bit patterns finite"
            return torch.arange(start, start + n, dtype=torch.int16).view(dtype).reshape(shape)
        if dtype == torch.float32:
            return torch.arange(start, start + n, dtype=torch.float64).to(dtype).reshape(shape)
        return torch.arange(start, start + n, dtype=dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bits(a), raw_bits(b))


def flip_bits(t: torch.Tensor) -> torch.Tensor:
    """The same shape and dtype with the lowest bit of every element flipped."""
    fresh = torch.empty(t.shape, dtype=t.dtype)
    fresh.copy_(t)
    as_int = fresh.view(_SAME_SIZE_INT[t.dtype])
    return (as_int ^ 1).view(t.dtype)


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), (
        f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}")
    for k in want:
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        assert tuple(got[k].shape) == tuple(want[k].shape), (k, got[k].shape, want[k].shape)
        assert torch.equal(raw_bits(got[k]), raw_bits(want[k])), f"{k}: bytes differ"


def header(sd: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(t.shape), SAFETENSORS_NAME[t.dtype]) for k, t in sd.items()}


def metas(sd: dict[str, torch.Tensor]) -> dict[str, convlens.TensorMeta]:
    return {k: convlens.TensorMeta(tuple(t.shape), SAFETENSORS_NAME[t.dtype])
            for k, t in sd.items()}


# --- cases: one tiny rule text per op, with independently written x and y --------------------

PASSTHROUGH = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class Case:
    text: str
    x: dict[str, torch.Tensor] = field(default_factory=dict)
    y: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


Items = Iterator[tuple[str, torch.Tensor]]


def module(stem: str, w: torch.Tensor, b: torch.Tensor | None) -> Items:
    yield f"{stem}.weight", w
    if b is not None:
        yield f"{stem}.bias", b


def param(stem: str, w: torch.Tensor, b: torch.Tensor | None) -> Items:
    yield stem, w
    if b is not None:
        yield f"{stem}_bias", b


def header_text() -> str:
    return "conversion laws\n  for model_type laws\n"


Builder = Callable[[Any, Fill, torch.dtype, bool, list[str]], Case]
BUILDERS: dict[str, Builder] = {}


def builder(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn
    return deco


small = st.integers(1, 4)


@builder("stack+concat (mixtral)")
def _stack_concat(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    E, O_, I_ = draw(st.integers(1, 12)), draw(small), draw(small)  # 10, 11 sort after 1, not 2
    dim = draw(st.sampled_from([1, 2]))  # rows (out) or columns (in) of each expert
    order = draw(st.permutations(range(E)))
    case = Case(header_text() + f'''
rename "{{p*}}.block_sparse_moe" -> "{{p*}}.mlp"
fuse "{{p*}}.mlp.experts.{{e:int}}.w1", "{{p*}}.mlp.experts.{{e:int}}.w3"
  -> "{{p*}}.mlp.experts.gate_up_proj" naming param
  by stack(e, 0), concat({dim})
fuse "{{p*}}.mlp.experts.{{e:int}}.w2" -> "{{p*}}.mlp.experts.down_proj" naming param
  by stack(e, 0)
''')
    for p in prefixes:
        for e in order:  # experts inserted out of order on purpose
            b1 = fill((O_,), dt) if bias else None
            b3 = (b1.clone() if dim == 2 else fill((O_,), dt)) if bias else None
            for w, shape, b in (("w1", (O_, I_), b1), ("w2", (I_, O_), fill((I_,), dt) if bias
                                                           else None), ("w3", (O_, I_), b3)):
                case.x.update(module(f"{p}.block_sparse_moe.experts.{e}.{w}", fill(shape, dt), b))
        gu = (E, 2 * O_, I_) if dim == 1 else (E, O_, 2 * I_)
        case.y.update(param(f"{p}.mlp.experts.gate_up_proj", fill(gu, dt),
                            fill(gu[:2], dt) if bias else None))
        case.y.update(param(f"{p}.mlp.experts.down_proj", fill((E, I_, O_), dt),
                            fill((E, I_), dt) if bias else None))
    return case


@builder("stack at any dim")
def _stack_dim(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    E, O_, I_ = draw(st.integers(1, 4)), draw(small), draw(small)
    dim = draw(st.sampled_from([0, 1, 2]))
    axes = ["out", "in"]
    axes.insert(dim, "e")
    order = draw(st.permutations(range(E)))
    case = Case(header_text() + f'''
fuse "{{p*}}.experts.{{e:int}}.up" -> "{{p*}}.experts.up_proj" naming param axes ({", ".join(axes)})
  by stack(e, {dim})
''')
    for p in prefixes:
        for e in order:
            case.x.update(module(f"{p}.experts.{e}.up", fill((O_, I_), dt),
                                 fill((O_,), dt) if bias else None))
        shape = [O_, I_]
        shape.insert(dim, E)
        bshape = [O_]
        bshape.insert(min(dim, 1), E)
        case.y.update(param(f"{p}.experts.up_proj", fill(tuple(shape), dt),
                            fill(tuple(bshape), dt) if bias else None))
    return case


@builder("unstack")
def _unstack(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    E, O_, I_ = draw(st.integers(1, 12)), draw(small), draw(small)
    order = draw(st.permutations(range(E)))
    case = Case(header_text() + '''
split "{p*}.experts.down_proj" naming param -> "{p*}.experts.{e:int}.w2" by unstack(e, 0)
''')
    for p in prefixes:
        case.x.update(param(f"{p}.experts.down_proj", fill((E, O_, I_), dt),
                            fill((E, O_), dt) if bias else None))
        for e in order:
            case.y.update(module(f"{p}.experts.{e}.w2", fill((O_, I_), dt),
                                 fill((O_,), dt) if bias else None))
    return case


QKV = ("q", "k", "v")


def _fused_rows(draw: Any, n_parts: int) -> tuple[int, int, int]:
    return n_parts, draw(small), draw(small)


@builder("concat equal")
def _concat(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    n, O_, I_ = _fused_rows(draw, draw(st.integers(2, 3)))
    dim = draw(st.sampled_from([0, 1]))
    src = ", ".join(f'"{{p*}}.attn.{q}"' for q in QKV[:n])
    case = Case(header_text() + f'fuse {src} -> "{{p*}}.attn.fused" by concat({dim})\n')
    for p in prefixes:
        b0 = fill((O_,), dt) if bias else None
        for j in range(n):
            b = (b0.clone() if dim == 1 else fill((O_,), dt)) if bias else None
            case.x.update(module(f"{p}.attn.{QKV[j]}", fill((O_, I_), dt), b))
        shape = (n * O_, I_) if dim == 0 else (O_, n * I_)
        case.y.update(module(f"{p}.attn.fused", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
    return case


SIZED = ("[config.num_attention_heads * config.head_dim, config.num_key_value_heads * "
         "config.head_dim, (config.num_key_value_heads * 2) * config.head_dim // 2]")
SIZED_SPLIT = ("[config.num_attention_heads * config.head_dim, config.num_key_value_heads * "
               "config.head_dim, config.kv_total - config.num_key_value_heads * config.head_dim]")


def _gqa(draw: Any) -> tuple[dict[str, int], list[int]]:
    h, kv, d = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    cfg = {"num_attention_heads": h, "num_key_value_heads": kv, "head_dim": d,
           "kv_total": 2 * kv * d}
    return cfg, [h * d, kv * d, kv * d]


@builder("concat sized")
def _concat_sized(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    cfg, sizes = _gqa(draw)
    other = draw(small)
    dim = draw(st.sampled_from([0, 1]))
    case = Case(header_text() + f'''
fuse "{{p*}}.attn.q_proj", "{{p*}}.attn.k_proj", "{{p*}}.attn.v_proj" -> "{{p*}}.attn.qkv_proj"
  by concat({dim}, sizes={SIZED})
''', config=cfg)
    for p in prefixes:
        shared = fill((other,), dt) if bias else None
        for name, s in zip(("q_proj", "k_proj", "v_proj"), sizes, strict=True):
            shape = (s, other) if dim == 0 else (other, s)
            b = (fill((s,), dt) if dim == 0 else shared.clone()) if bias else None  # type: ignore[union-attr]
            case.x.update(module(f"{p}.attn.{name}", fill(shape, dt), b))
        shape = (sum(sizes), other) if dim == 0 else (other, sum(sizes))
        case.y.update(module(f"{p}.attn.qkv_proj", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
    return case


@builder("interleave")
def _interleave(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    n, O_, I_ = _fused_rows(draw, draw(st.integers(2, 3)))
    dim = draw(st.sampled_from([0, 1]))
    names = ("gate", "up", "extra")[:n]
    src = ", ".join(f'"{{p*}}.mlp.{w}"' for w in names)
    case = Case(header_text() + f'fuse {src} -> "{{p*}}.mlp.gate_up" by interleave({dim})\n')
    for p in prefixes:
        b0 = fill((O_,), dt) if bias else None
        for w in names:
            b = (b0.clone() if dim == 1 else fill((O_,), dt)) if bias else None
            case.x.update(module(f"{p}.mlp.{w}", fill((O_, I_), dt), b))
        shape = (n * O_, I_) if dim == 0 else (O_, n * I_)
        case.y.update(module(f"{p}.mlp.gate_up", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
    return case


@builder("split equal")
def _split(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    n, O_, I_ = _fused_rows(draw, draw(st.integers(2, 3)))
    dim = draw(st.sampled_from([0, 1]))
    explicit = draw(st.booleans())
    dst = ", ".join(f'"{{p*}}.attn.{q}"' for q in QKV[:n])
    args = f"{dim}, parts={n}" if explicit else f"{dim}"
    case = Case(header_text() + f'split "{{p*}}.attn.fused" -> {dst} by split({args})\n')
    for p in prefixes:
        shape = (n * O_, I_) if dim == 0 else (O_, n * I_)
        case.x.update(module(f"{p}.attn.fused", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
        b0 = fill((O_,), dt) if bias else None
        for j in range(n):
            b = (b0.clone() if dim == 1 else fill((O_,), dt)) if bias else None
            case.y.update(module(f"{p}.attn.{QKV[j]}", fill((O_, I_), dt), b))
    return case


@builder("split sized")
def _split_sized(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    cfg, sizes = _gqa(draw)
    other = draw(small)
    dim = draw(st.sampled_from([0, 1]))
    case = Case(header_text() + f'''
split "{{p*}}.attn.qkv_proj" -> "{{p*}}.attn.q_proj", "{{p*}}.attn.k_proj", "{{p*}}.attn.v_proj"
  by split({dim}, sizes={SIZED_SPLIT})
''', config=cfg)
    for p in prefixes:
        shape = (sum(sizes), other) if dim == 0 else (other, sum(sizes))
        case.x.update(module(f"{p}.attn.qkv_proj", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
        shared = fill((other,), dt) if bias else None
        for name, s in zip(("q_proj", "k_proj", "v_proj"), sizes, strict=True):
            shape = (s, other) if dim == 0 else (other, s)
            b = (fill((s,), dt) if dim == 0 else shared.clone()) if bias else None  # type: ignore[union-attr]
            case.y.update(module(f"{p}.attn.{name}", fill(shape, dt), b))
    return case


@builder("deinterleave")
def _deinterleave(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    n, O_, I_ = _fused_rows(draw, draw(st.integers(2, 3)))
    dim = draw(st.sampled_from([0, 1]))
    names = ("gate", "up", "extra")[:n]
    dst = ", ".join(f'"{{p*}}.mlp.{w}"' for w in names)
    case = Case(header_text() + f'split "{{p*}}.mlp.gate_up" -> {dst} by deinterleave({dim})\n')
    for p in prefixes:
        shape = (n * O_, I_) if dim == 0 else (O_, n * I_)
        case.x.update(module(f"{p}.mlp.gate_up", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
        b0 = fill((O_,), dt) if bias else None
        for w in names:
            b = (b0.clone() if dim == 1 else fill((O_,), dt)) if bias else None
            case.y.update(module(f"{p}.mlp.{w}", fill((O_, I_), dt), b))
    return case


@builder("transpose")
def _transpose(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    O_, I_ = draw(small), draw(small)
    experts = draw(st.booleans())
    if experts:
        E = draw(st.integers(1, 3))
        text = ('map "{p*}.experts.up" naming param -> "{p*}.experts.up_t" naming param '
                'axes (e, in, out) by transpose(1, 2)\n')
    else:
        text = 'map "{p*}.fc" -> "{p*}.fc_t" axes (in, out) by transpose(0, 1)\n'
    case = Case(header_text() + text)
    for p in prefixes:
        if experts:
            case.x.update(param(f"{p}.experts.up", fill((E, O_, I_), dt),
                                fill((E, O_), dt) if bias else None))
            case.y.update(param(f"{p}.experts.up_t", fill((E, I_, O_), dt),
                                fill((E, O_), dt) if bias else None))
        else:
            case.x.update(module(f"{p}.fc", fill((O_, I_), dt), fill((O_,), dt) if bias else None))
            case.y.update(module(f"{p}.fc_t", fill((I_, O_), dt),
                                 fill((O_,), dt) if bias else None))
    return case


def _rope_case(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str],
               op: str) -> Case:
    heads, half, other = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(small)
    dim = draw(st.sampled_from([0, 1]))
    extra = f", dim={dim}" if dim else ""
    case = Case(header_text() + f'''
map "{{p*}}.attn.q_proj" -> "{{p*}}.attn.q_rot" by {op}(heads=config.num_attention_heads{extra})
''', config={"num_attention_heads": heads})
    rows = heads * 2 * half
    shape = (rows, other) if dim == 0 else (other, rows)
    for p in prefixes:
        case.x.update(module(f"{p}.attn.q_proj", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
        case.y.update(module(f"{p}.attn.q_rot", fill(shape, dt),
                             fill(shape[:1], dt) if bias else None))
    return case


@builder("rope_permute")
def _rope(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    return _rope_case(draw, fill, dt, bias, prefixes, "rope_permute")


@builder("rope_unpermute")
def _rope_un(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    return _rope_case(draw, fill, dt, bias, prefixes, "rope_unpermute")


FLAT_SIZES = ("[config.in_channels, config.temporal_patch_size, config.patch_size, "
              "config.patch_size]")


def _conv(draw: Any) -> tuple[dict[str, int], tuple[int, int, int, int]]:
    c, kt, k = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return ({"in_channels": c, "temporal_patch_size": kt, "patch_size": k}, (c, kt, k, k))


@builder("flatten")
def _flatten(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    cfg, kernel = _conv(draw)
    out = draw(small)
    case = Case(header_text() + f'''
map "{{p*}}.patch_embed.proj" -> "{{p*}}.patch_embed.linear" by flatten(1, sizes={FLAT_SIZES})
''', config=cfg)
    for p in prefixes:
        case.x.update(module(f"{p}.patch_embed.proj", fill((out, *kernel), dt),
                             fill((out,), dt) if bias else None))
        case.y.update(module(f"{p}.patch_embed.linear", fill((out, math.prod(kernel)), dt),
                             fill((out,), dt) if bias else None))
    return case


@builder("unflatten")
def _unflatten(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    cfg, kernel = _conv(draw)
    out = draw(small)
    case = Case(header_text() + f'''
map "{{p*}}.patch_embed.linear" -> "{{p*}}.patch_embed.proj" by unflatten(1, sizes={FLAT_SIZES})
''', config=cfg)
    for p in prefixes:
        case.x.update(module(f"{p}.patch_embed.linear", fill((out, math.prod(kernel)), dt),
                             fill((out,), dt) if bias else None))
        case.y.update(module(f"{p}.patch_embed.proj", fill((out, *kernel), dt),
                             fill((out,), dt) if bias else None))
    return case


@builder("per-tensor ops 'on' parts, then sized concat")
def _on_parts(draw: Any, fill: Fill, dt: torch.dtype, bias: bool, prefixes: list[str]) -> Case:
    h, kv, half, other = (draw(st.integers(1, 3)), draw(st.integers(1, 2)),
                          draw(st.integers(1, 2)), draw(small))
    d = 2 * half
    cfg = {"num_attention_heads": h, "num_key_value_heads": kv, "head_dim": d,
           "kv_total": 2 * kv * d}
    sizes = [h * d, kv * d, kv * d]
    case = Case(header_text() + f'''
fuse "{{p*}}.attn.q_proj", "{{p*}}.attn.k_proj", "{{p*}}.attn.v_proj" -> "{{p*}}.attn.qkv_proj"
  by rope_permute(heads=config.num_attention_heads) on [0],
     rope_permute(heads=config.num_key_value_heads) on [1],
     concat(0, sizes={SIZED})
''', config=cfg)
    for p in prefixes:
        for name, s in zip(("q_proj", "k_proj", "v_proj"), sizes, strict=True):
            case.x.update(module(f"{p}.attn.{name}", fill((s, other), dt),
                                 fill((s,), dt) if bias else None))
        case.y.update(module(f"{p}.attn.qkv_proj", fill((sum(sizes), other), dt),
                             fill((sum(sizes),), dt) if bias else None))
    return case


@st.composite
def cases(draw: Any, name: str) -> Case:
    fill = Fill()
    dt = draw(st.sampled_from(DTYPES))
    bias = draw(st.booleans())
    layers = draw(st.integers(1, 2))
    root = draw(st.sampled_from(["model.layers", "model.language_model.layers", "blocks"]))
    prefixes = [f"{root}.{i}" for i in range(layers)]
    case = BUILDERS[name](draw, fill, dt, bias, prefixes)
    # Keys no rule matches, one before and one after the converted ones.
    first, last = (fill((3, 2), dt) for _ in range(2))
    for sd in (case.x, case.y):
        items = list(sd.items())
        sd.clear()
        sd[PASSTHROUGH[0]] = first
        sd.update(items)
        sd[PASSTHROUGH[1]] = last
    return case


def conversion(case: Case) -> convlens.Conversion:
    return convlens.Conversion(convlens.compile_text(case.text, "<laws>"))


# --- helpers over plans ------------------------------------------------------------------------


def walk(node: P.Node) -> Iterator[P.Node]:
    yield node
    for c in P.children(node):
        yield from walk(c)


def same_members(plan: P.Plan) -> set[str]:
    """Input keys read under a Same node (they must be bit-identical to their siblings)."""
    out: set[str] = set()
    for node in plan.outputs.values():
        for n in walk(node):
            if isinstance(n, P.Same):
                out |= {leaf.key for leaf in P.leaves(n)}
    return out


def check_plan_matches_execution(conv: convlens.Conversion, sd: dict[str, torch.Tensor],
                                 config: dict[str, Any], direction: str) -> None:
    """Law 4 (plan == execution) and law 6 (accounting) in one direction."""
    plan = conv.plan(metas(sd), config, direction=direction)  # type: ignore[arg-type]
    run = getattr(conv, direction)
    out = run(sd, config)
    # (c) keys, order, shapes and dtypes declared by the plan are what execution produced
    assert list(plan.outputs) == list(out)
    for k, node in plan.outputs.items():
        assert node.shape == tuple(out[k].shape), k
        assert node.dtype == SAFETENSORS_NAME[out[k].dtype], k
    key_map = plan.key_map()
    assert set(key_map) == set(out)
    # plans are plain data: the JSON round trip gives an equal plan that executes the same
    again = P.plan_from_json(P.plan_to_json(plan))
    assert again.outputs == plan.outputs and again.listing() == plan.listing()
    assert again.passthrough == plan.passthrough and again.key_map() == key_map
    # (c) key_map is the real data dependence: perturb one input, watch which outputs change
    guarded = same_members(plan)
    keys = list(sd)
    step = max(1, len(keys) // 16)  # big expert counts: every step-th key, and the last one
    for k in dict.fromkeys(keys[::step] + keys[-1:]):
        changed_input = dict(sd)
        changed_input[k] = flip_bits(sd[k])
        try:
            out2 = run(changed_input, config)
        except convlens.ConversionError as exc:
            assert k in guarded, f"perturbing {k} failed: {exc}"
            assert "bit for bit" in str(exc)
            continue
        changed = {o for o in out if not same_bits(out[o], out2[o])}
        depends = {o for o, srcs in key_map.items() if k in srcs}
        assert changed == depends, f"input {k}: outputs changed {changed}, key_map says {depends}"
    # (d) every input is read by some output; unmatched keys pass through as the same object
    read = {leaf.key for node in plan.outputs.values() for leaf in P.leaves(node)}
    assert set(sd) <= read
    assert set(plan.passthrough) == set(PASSTHROUGH)
    for k in PASSTHROUGH:
        assert out[k] is sd[k]
        assert isinstance(plan.outputs[k], P.Load) and plan.outputs[k].key == k


# --- the laws ----------------------------------------------------------------------------------

CASE_NAMES = sorted(BUILDERS)


@pytest.mark.parametrize("name", CASE_NAMES)
@settings(max_examples=30)
@given(data=st.data())
def test_revert_apply_is_identity(name: str, data: st.DataObject) -> None:
    """(a) revert(apply(x)) == x and the forward result has y's header."""
    case = data.draw(cases(name))
    conv = conversion(case)
    mem = conv.apply(case.x, case.config)
    assert header(mem) == header(case.y), "apply(x) does not have the destination layout"
    assert_state_equal(conv.revert(mem, case.config), case.x)


@pytest.mark.parametrize("name", CASE_NAMES)
@settings(max_examples=30)
@given(data=st.data())
def test_apply_revert_is_identity(name: str, data: st.DataObject) -> None:
    """(b) apply(revert(y)) == y and the reverted result has x's header."""
    case = data.draw(cases(name))
    conv = conversion(case)
    hub = conv.revert(case.y, case.config)
    assert header(hub) == header(case.x), "revert(y) does not have the source layout"
    assert_state_equal(conv.apply(hub, case.config), case.y)


@pytest.mark.parametrize("name", CASE_NAMES)
@settings(max_examples=25)
@given(data=st.data())
def test_plan_equals_execution_and_accounts_for_every_key(name: str, data: st.DataObject) -> None:
    """(c) law 4 and (d) law 6, in both directions."""
    case = data.draw(cases(name))
    conv = conversion(case)
    check_plan_matches_execution(conv, case.x, case.config, "apply")
    check_plan_matches_execution(conv, case.y, case.config, "revert")


def test_every_op_has_a_case() -> None:
    """The cases above exercise every op of the closed set, in one direction or the other."""
    used: set[type[O.Op]] = set()
    for name in CASE_NAMES:
        for text in _texts_of(name):
            program = convlens.compile_text(text)
            for prog in (program, program.inverse()):
                for rule in prog.rules:
                    used |= {type(op) for op in rule.ops}
    assert used == set(O.OPS), f"no case for {sorted(c.name for c in set(O.OPS) - used)}"


def _texts_of(name: str) -> set[str]:
    """The rule texts a case draws (a few examples)."""
    found: set[str] = set()

    @settings(max_examples=5, database=None)
    @given(cases(name))
    def grab(case: Case) -> None:
        found.add(case.text)

    grab()
    return found


# --- the tables --------------------------------------------------------------------------------

# One op instance (or several) per op class, written in the language and compiled.
OP_TEXTS = {
    "stack": ('fuse "a.{e:int}.w" -> "a.w" naming param by stack(e, 1)', 0),
    "unstack": ('split "a.w" naming param -> "a.{e:int}.w" by unstack(e, 2)', 0),
    "concat": ('fuse "a.x", "a.y", "a.z" -> "a.xyz" by concat(1, sizes=[config.a * 2, 3, '
               'config.b.c - 1])', 0),
    "split": ('split "a.xyz" -> "a.x", "a.y" by split(0, sizes=[config.a // 2, (config.b + 1)])',
              0),
    "split_parts": ('split "a.xyz" -> "a.x", "a.y", "a.z" by split(1)', 0),
    "interleave": ('fuse "a.x", "a.y" -> "a.xy" by interleave(1)', 0),
    "deinterleave": ('split "a.xy" -> "a.x", "a.y", "a.z" by deinterleave(0, parts=3)', 0),
    "transpose": ('map "a.x" -> "a.y" by transpose(0, 2)', 0),
    "rope_permute": ('map "a.x" -> "a.y" by rope_permute(heads=config.n * 2, dim=1)', 0),
    "rope_permute_on": ('fuse "a.q", "a.k" -> "a.qk" by rope_permute(heads=config.h) on [1], '
                        'concat(0)', 0),
    "rope_unpermute": ('map "a.x" -> "a.y" by rope_unpermute(heads=4)', 0),
    "flatten": ('map "a.x" -> "a.y" by flatten(1, sizes=[config.c, 2, config.k])', 0),
    "unflatten": ('map "a.x" -> "a.y" by unflatten(0, sizes=[2, config.k])', 0),
}


def compiled_ops() -> list[O.Op]:
    ops: list[O.Op] = []
    for text, rule in OP_TEXTS.values():
        program = convlens.compile_text(f"conversion t\n{text}\n")
        ops.extend(program.rules[rule].ops)
    return ops


def test_inverse_table_has_exactly_one_entry_per_op() -> None:
    assert len(O.OPS) == len(set(O.OPS))
    assert set(O.INVERSE) == set(O.OPS)
    assert len(O.INVERSE) == len(O.OPS)
    assert set(O.OPS_BY_NAME.values()) == set(O.OPS)
    assert {cls.name for cls in O.OPS} == set(O.OPS_BY_NAME)


def test_every_op_class_is_covered_by_the_table_instances() -> None:
    assert {type(op) for op in compiled_ops()} == set(O.OPS)


@pytest.mark.parametrize("op", compiled_ops(), ids=lambda op: op.describe())
def test_inverting_twice_gives_an_equal_op(op: O.Op) -> None:
    once = O.invert(op)
    assert isinstance(once, O.Op)
    assert O.invert(once) == op
    assert type(O.invert(once)) is type(op)
    assert once.on == op.on
    # The inverse of a combining op splits and vice versa; only transpose is its own inverse.
    if isinstance(op, O.Transpose):
        assert once == op
    else:
        assert type(once) is not type(op)


EXPECTED_PAIRS = {
    O.Stack: O.Unstack, O.Unstack: O.Stack, O.Concat: O.Split, O.Split: O.Concat,
    O.Interleave: O.Deinterleave, O.Deinterleave: O.Interleave, O.Transpose: O.Transpose,
    O.RopePermute: O.RopeUnpermute, O.RopeUnpermute: O.RopePermute, O.Flatten: O.Unflatten,
    O.Unflatten: O.Flatten,
}


def test_inverse_pairs() -> None:
    assert set(EXPECTED_PAIRS) == set(O.OPS)
    for op in compiled_ops():
        assert type(O.invert(op)) is EXPECTED_PAIRS[type(op)], op.describe()


def test_every_op_and_relation_has_a_lift() -> None:
    missing = [(cls.name, rel) for cls in O.OPS for rel in RELATIONS if (cls, rel) not in O.LIFT]
    assert not missing
    extra = [key for key in O.LIFT if key[0] not in O.OPS or key[1] not in RELATIONS]
    assert not extra
    assert all(callable(fn) for fn in O.LIFT.values())


# --- bugs found by these laws (strict xfails: they pass once the bug is fixed) -------------------


def round_trips_or_refuses(text: str, x: dict[str, torch.Tensor],
                           config: dict[str, Any] | None = None) -> None:
    """The weakest form of law (a): either convlens refuses the rule or the state dict with one
    of its own errors, or revert(apply(x)) gives x back bit for bit."""
    try:
        conv = convlens.Conversion(convlens.compile_text(text))
        back = conv.revert(conv.apply(x, config), config)
    except convlens.ConvlensError:
        return
    assert_state_equal(back, x)


# Regression: an earlier snapshot defaulted the destination axes to (out, in) whatever axes the
# ops produced; after transpose the derived inverse then lifted rope_unpermute to the bias (which
# the forward had left alone) and silently permuted it. It must round-trip or refuse.
def test_transpose_then_rope_without_declared_axes_round_trips_or_refuses() -> None:
    fill = Fill()
    x = {"m.fc.weight": fill((4, 4), torch.float32), "m.fc.bias": fill((4,), torch.float32)}
    round_trips_or_refuses(
        'conversion t\nmap "{p*}.fc" -> "{p*}.fc_t" by transpose(0, 1), rope_permute(heads=1)\n', x)


def test_transpose_then_rope_with_declared_axes_round_trips() -> None:
    """The same rule with the destination axes written out works (the control for the xfail)."""
    fill = Fill()
    x = {"m.fc.weight": fill((4, 4), torch.float32), "m.fc.bias": fill((4,), torch.float32)}
    conv = convlens.Conversion(convlens.compile_text(
        'conversion t\nmap "{p*}.fc" -> "{p*}.fc_t" axes (in, out) '
        'by transpose(0, 1), rope_permute(heads=1)\n'))
    y = conv.apply(x)
    assert_state_equal({"b": y["m.fc_t.bias"]}, {"b": x["m.fc.bias"]})  # rope acted on 'in'
    assert_state_equal(conv.revert(y), x)


# Regressions: an earlier snapshot raised a bare AssertionError (n_reshape's assert) for these,
# because unflatten's new axes were named like kernel axes, which a bias does not carry.


def test_unflatten_of_an_axis_the_bias_carries() -> None:
    fill = Fill()
    x = {"m.x.weight": fill((6, 2), torch.float32), "m.x.bias": fill((6,), torch.float32)}
    round_trips_or_refuses('conversion t\nmap "m.x" -> "m.y" by unflatten(0, sizes=[2, 3])\n', x)


def test_flatten_of_stacked_experts_with_bias() -> None:
    fill = Fill()
    x = {"m.x.weight": fill((2, 3, 4), torch.float32), "m.x.bias": fill((2, 3), torch.float32)}
    round_trips_or_refuses('conversion t\nmap "m.x" -> "m.y" by flatten(0, sizes=[2, 3])\n', x)


# --- random chains of per-tensor ops: round-trip or refuse ---------------------------------------


@st.composite
def op_chains(draw: Any) -> tuple[str, tuple[int, ...]]:
    """A chain of 1-3 per-tensor ops that fits a weight of the drawn shape (sizes literal)."""
    shape = list(draw(st.lists(st.sampled_from([2, 4, 6]), min_size=2, max_size=3)))
    start = tuple(shape)
    ops: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        rank = len(shape)
        kinds = []
        if any(n % 2 == 0 for n in shape):
            kinds.append("rope")
        if rank >= 2:
            kinds += ["transpose", "flatten"]
        if rank < 4 and any(n >= 4 for n in shape):
            kinds.append("unflatten")
        kind = draw(st.sampled_from(kinds))
        if kind == "transpose":
            i, j = draw(st.lists(st.integers(0, rank - 1), min_size=2, max_size=2, unique=True))
            ops.append(f"transpose({i}, {j})")
            shape[i], shape[j] = shape[j], shape[i]
        elif kind == "rope":
            d = draw(st.sampled_from([i for i, n in enumerate(shape) if n % 2 == 0]))
            heads = draw(st.sampled_from([h for h in (1, 2, 3) if shape[d] % (2 * h) == 0]))
            name = draw(st.sampled_from(["rope_permute", "rope_unpermute"]))
            ops.append(f"{name}(heads={heads}, dim={d})")
        elif kind == "flatten":
            d = draw(st.integers(0, rank - 2))
            k = draw(st.integers(2, rank - d))
            ops.append(f"flatten({d}, sizes=[{', '.join(map(str, shape[d:d + k]))}])")
            shape[d:d + k] = [math.prod(shape[d:d + k])]
        else:
            d = draw(st.sampled_from([i for i, n in enumerate(shape) if n >= 4]))
            a = draw(st.sampled_from([f for f in range(2, shape[d]) if shape[d] % f == 0]))
            ops.append(f"unflatten({d}, sizes=[{a}, {shape[d] // a}])")
            shape[d:d + 1] = [a, shape[d] // a]
    return ", ".join(ops), start


StateDict = dict[str, torch.Tensor]


def _convert_chain(ops: str, x: StateDict, axes: dict[str, str]
                   ) -> tuple[convlens.Conversion, StateDict, StateDict]:
    def side(pattern: str) -> str:
        return f'"{pattern}"' + (f" axes ({axes[pattern]})" if pattern in axes else "")

    conv = convlens.Conversion(convlens.compile_text(
        f"conversion t\nmap {side('{p*}.w')} -> {side('{p*}.w2')} by {ops}\n"))
    y = conv.apply(x)
    return conv, y, conv.revert(y)


@settings(max_examples=int(os.environ.get('CHAIN_EXAMPLES', '40')))
@given(chain=op_chains(), bias=st.booleans(), dt=st.sampled_from(DTYPES))
def test_random_per_tensor_chains_round_trip_or_refuse(chain: tuple[str, tuple[int, ...]],
                                                      bias: bool, dt: torch.dtype) -> None:
    """Weak law (a) for any chain: convlens refuses with its own error, or revert(apply(x)) == x
    and apply(revert(y)) == y for y = apply(x). Never a crash, never a silent change. When a
    refusal asks for an endpoint's axes to be declared, declare them as asked and try again."""
    ops, shape = chain
    fill = Fill()
    x = {"m.w.weight": fill(shape, dt)}
    if bias:  # a bias carries every axis but the contraction axes: (out,) or (e, out)
        x["m.w.bias"] = fill(shape[:1] if len(shape) == 2 else shape[:2], dt)
    axes: dict[str, str] = {}
    for _attempt in range(3):
        try:
            conv, y, back = _convert_chain(ops, x, axes)
        except convlens.ConvlensError as exc:
            asked = re.search(r"declare them: '([^']*)' \.\.\. axes \(([^)]*)\)", str(exc))
            if asked is None or axes.get(asked.group(1)) == asked.group(2):
                event(f"refused ({len(axes)} endpoint(s) declared): {exc.message[:100]}")
                return
            axes[asked.group(1)] = asked.group(2)
            continue
        event(f"converted ({len(axes)} endpoint(s) declared)")
        assert_state_equal(back, x)
        assert_state_equal(conv.apply(back), y)
        return
