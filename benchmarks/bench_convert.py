#!/usr/bin/env python
"""Benchmark convlens' disk runtime against cp -r, a hand-written torch baseline and transformers.

    .venv/bin/python benchmarks/bench_convert.py [--size-gb 3] [--repeats 5] [--workloads 1,2,3]
                                                 [--workdir DIR] [--keep] [--no-write]

Generates synthetic but realistically shaped checkpoints locally (no downloads), converts each
with every method in a fresh subprocess (so its peak RSS is its own, read with os.wait4), and
prints a markdown report that is also written into BENCHMARKS.md (between markers; text outside
them is kept). See benchmarks/README.md for what each workload and method is.

Timing: the page cache cannot be dropped without root, so before each method the source files
are read once (warm cache) and every timed run reads from memory; outputs are deleted and
``sync()`` is called between runs so one run's write-back is not billed to the next. Seconds
are measured inside the worker process around the conversion itself (interpreter start-up and
imports excluded; cp -r is timed as a whole process).
"""

# ruff: noqa: E741  (I, H, E, l: the usual names for model dimensions)
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
MB = 1e6
INDEX = "model.safetensors.index.json"
BEGIN, END = "<!-- bench_convert:begin -->", "<!-- bench_convert:end -->"

DTYPE_SIZE = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}

# --- workloads: shapes -------------------------------------------------------------------------

Spec = tuple[str, tuple[int, ...], str, str]  # key, shape, dtype, fill ("rand", "ones", "scale")


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * DTYPE_SIZE[dtype]


def spec_bytes(specs: list[Spec]) -> int:
    return sum(nbytes(s, d) for _, s, d, _ in specs)


def fit_layers(size: float, fixed: int, per_layer: int, minimum: int = 2) -> int:
    return max(minimum, round((size - fixed) / per_layer))


# Workload 1: MiniMax-M3-VL-like NVFP4 checkpoint in transformers' in-memory layout (what a
# quantizer exports from a loaded model), to be reverted to the hub layout. Names and shapes follow
# transformers' MiniMaxM3SparseForConditionalGeneration (checked on a meta-device instance),
# scaled down (MiniMax-M3 itself: hidden 6144, 128 experts, 60 layers).
W1 = dict(hidden=2048, experts=64, moe_inter=1024, shared_inter=1024, dense_inter=4096,
          heads=16, kv_heads=4, head_dim=128, index_heads=4, index_dim=128, vocab=32768,
          dense_layers=1, v_hidden=1024, v_inter=4096, v_layers=4, v_heads=16)


def nvfp4(stem: str, out: int, inp: int, lead: tuple[int, ...] = (), sep: str = ".",
          per_lead_scale_2: bool = False) -> list[Spec]:
    """A ModelOpt NVFP4 linear: packed FP4 bytes, FP8 block scales (per 16), FP32 scale_2 and
    input_scale. ``sep="_"``: the scales are suffix siblings of a stacked param
    (``gate_up_proj_weight_scale``)."""
    w = stem if sep == "_" else f"{stem}.weight"
    s2 = lead if per_lead_scale_2 else ()
    return [(w, (*lead, out, inp // 2), "U8", "rand"),
            (f"{stem}{sep}weight_scale", (*lead, out, inp // 16), "F8_E4M3", "rand"),
            (f"{stem}{sep}weight_scale_2", s2, "F32", "scale"),
            (f"{stem}{sep}input_scale", (), "F32", "scale")]


def w1_layer(l: int, c: dict[str, int]) -> list[Spec]:
    H, E = c["hidden"], c["experts"]
    p = f"model.language_model.layers.{l}"
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    out: list[Spec] = []
    for name, rows, cols in (("q_proj", q, H), ("k_proj", kv, H), ("v_proj", kv, H),
                             ("o_proj", H, q)):
        out += nvfp4(f"{p}.self_attn.{name}", rows, cols)
    out += [(f"{p}.self_attn.q_norm.weight", (c["head_dim"],), "BF16", "ones"),
            (f"{p}.self_attn.k_norm.weight", (c["head_dim"],), "BF16", "ones")]
    if l >= c["dense_layers"]:  # the lightning indexer (BF16) of the sparse-attention layers
        d = c["index_dim"]
        out += [(f"{p}.self_attn.indexer.q_proj.weight", (c["index_heads"] * d, H), "BF16",
                 "rand"),
                (f"{p}.self_attn.indexer.k_proj.weight", (d, H), "BF16", "rand"),
                (f"{p}.self_attn.indexer.q_norm.weight", (d,), "BF16", "ones"),
                (f"{p}.self_attn.indexer.k_norm.weight", (d,), "BF16", "ones")]
    if l < c["dense_layers"]:
        I = c["dense_inter"]
        out += nvfp4(f"{p}.mlp.gate_up_proj", 2 * I, H)
        out += nvfp4(f"{p}.mlp.down_proj", H, I)
    else:
        I, Is = c["moe_inter"], c["shared_inter"]
        out += [(f"{p}.mlp.gate.weight", (E, H), "BF16", "rand"),
                (f"{p}.mlp.gate.e_score_correction_bias", (E,), "F32", "scale")]
        out += nvfp4(f"{p}.mlp.experts.gate_up_proj", 2 * I, H, (E,), "_", True)
        out += nvfp4(f"{p}.mlp.experts.down_proj", H, I, (E,), "_", True)
        out += nvfp4(f"{p}.mlp.shared_experts.gate_up_proj", 2 * Is, H)
        out += nvfp4(f"{p}.mlp.shared_experts.down_proj", H, Is)
    out += [(f"{p}.input_layernorm.weight", (H,), "BF16", "ones"),
            (f"{p}.post_attention_layernorm.weight", (H,), "BF16", "ones")]
    return out


def w1_specs(size: float) -> tuple[list[Spec], dict[str, Any]]:
    c = dict(W1)
    H, V, vh, vi = c["hidden"], c["vocab"], c["v_hidden"], c["v_inter"]
    head = [("model.vision_tower.embeddings.proj.weight", (vh, 3, 2, 14, 14), "BF16", "rand"),
            ("model.vision_tower.pre_layrnorm.weight", (vh,), "BF16", "ones"),
            ("model.vision_tower.pre_layrnorm.bias", (vh,), "BF16", "ones")]
    for i in range(c["v_layers"]):
        p = f"model.vision_tower.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            head += [(f"{p}.self_attn.{name}.weight", (vh, vh), "BF16", "rand"),
                     (f"{p}.self_attn.{name}.bias", (vh,), "BF16", "ones")]
        head += [(f"{p}.layer_norm1.weight", (vh,), "BF16", "ones"),
                 (f"{p}.layer_norm1.bias", (vh,), "BF16", "ones"),
                 (f"{p}.mlp.fc1.weight", (vi, vh), "BF16", "rand"),
                 (f"{p}.mlp.fc1.bias", (vi,), "BF16", "ones"),
                 (f"{p}.mlp.fc2.weight", (vh, vi), "BF16", "rand"),
                 (f"{p}.mlp.fc2.bias", (vh,), "BF16", "ones"),
                 (f"{p}.layer_norm2.weight", (vh,), "BF16", "ones"),
                 (f"{p}.layer_norm2.bias", (vh,), "BF16", "ones")]
    for name, rows, cols in (("linear_1", H, vh), ("linear_2", H, H),
                             ("merge_linear_1", H, 4 * H), ("merge_linear_2", H, H)):
        head += [(f"model.multi_modal_projector.{name}.weight", (rows, cols), "BF16", "rand"),
                 (f"model.multi_modal_projector.{name}.bias", (rows,), "BF16", "ones")]
    head.append(("model.language_model.embed_tokens.weight", (V, H), "BF16", "rand"))
    tail = [("model.language_model.norm.weight", (H,), "BF16", "ones"),
            ("lm_head.weight", (V, H), "BF16", "rand")]
    dense = sum(spec_bytes(w1_layer(i, c)) for i in range(c["dense_layers"]))
    layers = c["dense_layers"] + fit_layers(size, spec_bytes(head + tail) + dense,
                                            spec_bytes(w1_layer(c["dense_layers"], c)))
    specs = head + [s for i in range(layers) for s in w1_layer(i, c)] + tail
    text = {"model_type": "minimax_m3_vl_text", "hidden_size": H,
            "intermediate_size": c["moe_inter"], "num_hidden_layers": layers,
            "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"],
            "head_dim": c["head_dim"], "num_local_experts": c["experts"],
            "num_experts_per_tok": 4, "dense_intermediate_size": c["dense_inter"],
            "shared_intermediate_size": c["shared_inter"], "vocab_size": V,
            "index_n_heads": c["index_heads"], "index_head_dim": c["index_dim"],
            "mlp_layer_types": ["dense" if i < c["dense_layers"] else "sparse"
                                for i in range(layers)],
            "layer_types": ["full_attention" if i < c["dense_layers"] else "minimax_m3_sparse"
                            for i in range(layers)],
            "bos_token_id": 1, "eos_token_id": 2}
    config = {"architectures": ["MiniMaxM3SparseForConditionalGeneration"],
              "model_type": "minimax_m3_vl", "text_config": text, "projector_hidden_size": H,
              "vision_config": {"model_type": "minimax_m3_vl_vision", "hidden_size": vh,
                                "intermediate_size": vi, "num_hidden_layers": c["v_layers"],
                                "num_attention_heads": c["v_heads"]},
              "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4",
                                      "group_size": 16},
              "torch_dtype": "bfloat16"}
    return specs, config


# Workload 2: Mixtral-like bf16 checkpoint in the hub layout (per-expert w1/w2/w3), applied.
W2 = dict(hidden=1536, inter=4096, experts=8, heads=12, kv_heads=4, vocab=32000)


def w2_layer(l: int, c: dict[str, int]) -> list[Spec]:
    H, I, E = c["hidden"], c["inter"], c["experts"]
    hd = H // c["heads"]
    p = f"model.layers.{l}"
    out: list[Spec] = [(f"{p}.input_layernorm.weight", (H,), "BF16", "ones")]
    for name, rows, cols in (("q_proj", H, H), ("k_proj", c["kv_heads"] * hd, H),
                             ("v_proj", c["kv_heads"] * hd, H), ("o_proj", H, H)):
        out.append((f"{p}.self_attn.{name}.weight", (rows, cols), "BF16", "rand"))
    out.append((f"{p}.post_attention_layernorm.weight", (H,), "BF16", "ones"))
    out.append((f"{p}.block_sparse_moe.gate.weight", (E, H), "BF16", "rand"))
    for e in range(E):
        q = f"{p}.block_sparse_moe.experts.{e}"
        out += [(f"{q}.w1.weight", (I, H), "BF16", "rand"),
                (f"{q}.w2.weight", (H, I), "BF16", "rand"),
                (f"{q}.w3.weight", (I, H), "BF16", "rand")]
    return out


def w2_specs(size: float) -> tuple[list[Spec], dict[str, Any]]:
    c = dict(W2)
    H, V = c["hidden"], c["vocab"]
    head = [("model.embed_tokens.weight", (V, H), "BF16", "rand")]
    tail = [("model.norm.weight", (H,), "BF16", "ones"), ("lm_head.weight", (V, H), "BF16", "rand")]
    layers = fit_layers(size, spec_bytes(head + tail), spec_bytes(w2_layer(0, c)))
    specs = head + [s for i in range(layers) for s in w2_layer(i, c)] + tail
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": H, "intermediate_size": c["inter"], "num_hidden_layers": layers,
              "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"],
              "num_local_experts": c["experts"], "num_experts_per_tok": 2, "vocab_size": V,
              "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
              "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2}
    return specs, config


# Workload 3: DeepSeek-V3-like FP8-block checkpoint (hub layout, per-expert tensors, tiny H/I so
# that ~3 GB holds 200k+ keys), applied with the qwen2_moe rules (which serve deepseek_v3).
W3 = dict(hidden=224, moe_inter=128, dense_inter=512, experts=256, q_lora=96, kv_lora=64,
          heads=2, qk_head=96, v_head=64, vocab=32000, dense_layers=1)


def fp8(stem: str, out: int, inp: int) -> list[Spec]:
    return [(f"{stem}.weight", (out, inp), "F8_E4M3", "rand"),
            (f"{stem}.weight_scale_inv", (-(-out // 128), -(-inp // 128)), "F32", "scale")]


def w3_layer(l: int, c: dict[str, int]) -> list[Spec]:
    H, E, I = c["hidden"], c["experts"], c["moe_inter"]
    p = f"model.layers.{l}"
    out: list[Spec] = [(f"{p}.input_layernorm.weight", (H,), "BF16", "ones")]
    out += fp8(f"{p}.self_attn.q_a_proj", c["q_lora"], H)
    out.append((f"{p}.self_attn.q_a_layernorm.weight", (c["q_lora"],), "BF16", "ones"))
    out += fp8(f"{p}.self_attn.q_b_proj", c["heads"] * c["qk_head"], c["q_lora"])
    out += fp8(f"{p}.self_attn.kv_a_proj_with_mqa", c["kv_lora"] + 32, H)
    out.append((f"{p}.self_attn.kv_a_layernorm.weight", (c["kv_lora"],), "BF16", "ones"))
    out += fp8(f"{p}.self_attn.kv_b_proj", c["heads"] * (c["qk_head"] - 32 + c["v_head"]),
               c["kv_lora"])
    out += fp8(f"{p}.self_attn.o_proj", H, c["heads"] * c["v_head"])
    out.append((f"{p}.post_attention_layernorm.weight", (H,), "BF16", "ones"))
    if l < c["dense_layers"]:
        Id = c["dense_inter"]
        out += fp8(f"{p}.mlp.gate_proj", Id, H) + fp8(f"{p}.mlp.up_proj", Id, H)
        out += fp8(f"{p}.mlp.down_proj", H, Id)
        return out
    out += [(f"{p}.mlp.gate.weight", (E, H), "BF16", "rand"),
            (f"{p}.mlp.gate.e_score_correction_bias", (E,), "F32", "scale")]
    for e in range(E):
        q = f"{p}.mlp.experts.{e}"
        out += fp8(f"{q}.gate_proj", I, H) + fp8(f"{q}.up_proj", I, H) + fp8(f"{q}.down_proj", H, I)
    out += fp8(f"{p}.mlp.shared_experts.gate_proj", I, H)
    out += fp8(f"{p}.mlp.shared_experts.up_proj", I, H)
    out += fp8(f"{p}.mlp.shared_experts.down_proj", H, I)
    return out


def w3_config(c: dict[str, int], layers: int) -> dict[str, Any]:
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": c["hidden"], "intermediate_size": c["dense_inter"],
            "moe_intermediate_size": c["moe_inter"], "num_hidden_layers": layers,
            "first_k_dense_replace": c["dense_layers"], "n_routed_experts": c["experts"],
            "n_shared_experts": 1, "num_experts_per_tok": 8, "num_attention_heads": c["heads"],
            "q_lora_rank": c["q_lora"], "kv_lora_rank": c["kv_lora"],
            "qk_nope_head_dim": c["qk_head"] - 32, "qk_rope_head_dim": 32,
            "v_head_dim": c["v_head"], "vocab_size": c["vocab"], "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                    "fmt": "e4m3", "weight_block_size": [128, 128]}}


def w3_specs(size: float) -> tuple[list[Spec], dict[str, Any]]:
    c = dict(W3)
    H, V = c["hidden"], c["vocab"]
    head = [("model.embed_tokens.weight", (V, H), "BF16", "rand")]
    tail = [("model.norm.weight", (H,), "BF16", "ones"), ("lm_head.weight", (V, H), "BF16", "rand")]
    dense = sum(spec_bytes(w3_layer(i, c)) for i in range(c["dense_layers"]))
    layers = c["dense_layers"] + fit_layers(size, spec_bytes(head + tail) + dense,
                                            spec_bytes(w3_layer(c["dense_layers"], c)))
    specs = head + [s for i in range(layers) for s in w3_layer(i, c)] + tail
    return specs, w3_config(c, layers)


def w3_synthetic_metas(min_keys: int) -> tuple[dict[str, tuple[tuple[int, ...], str]],
                                                dict[str, Any]]:
    """Headers only (no files): a DeepSeek-like FP8-block key set with at least ``min_keys``."""
    c = dict(W3)
    per = len(w3_layer(c["dense_layers"], c))
    layers = c["dense_layers"] + -(-min_keys // per)
    metas = {k: (s, d) for i in range(layers) for k, s, d, _ in w3_layer(i, c)}
    return metas, w3_config(c, layers)


WORKLOADS: dict[str, dict[str, Any]] = {
    "1": dict(title="MiniMax-M3-like NVFP4 revert (in-memory -> hub; minimax_m3_vl rules)",
              specs=w1_specs,
              rules="minimax_m3_vl", direction="revert"),
    "2": dict(title="Mixtral-like bf16 apply (hub -> stacked and fused)", specs=w2_specs,
              rules="mixtral", direction="apply"),
    "3": dict(title="DeepSeek-like FP8-block apply, 200k+ keys (qwen2_moe rules)",
              specs=w3_specs, rules="qwen2_moe", direction="apply"),
    # derived from workload 2: the in-memory checkpoint convlens wrote, reverted again
    "2r": dict(title="Mixtral-like bf16 revert (in-memory -> hub; transformers comparison)",
               specs=None, rules="mixtral", direction="revert"),
}


# --- generating checkpoints ------------------------------------------------------------------

POOL_BYTES = 64 << 20


class Filler:
    """Cheap tensor contents: bytes copied from one random pool at a per-tensor offset."""

    def __init__(self) -> None:
        import torch

        g = torch.Generator().manual_seed(1234)
        self.pool = torch.randint(0, 256, (POOL_BYTES,), dtype=torch.uint8, generator=g)
        self.n = 0

    def make(self, shape: tuple[int, ...], dtype: str, fill: str) -> Any:
        import torch

        tdt = {"BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8,
               "F8_E4M3": torch.float8_e4m3fn}[dtype]
        self.n += 1
        if fill == "ones":
            return torch.ones(shape, dtype=tdt)
        if fill == "scale":
            return (torch.rand(shape) * 0.01 + 1e-3).to(tdt)
        size = nbytes(shape, dtype)
        buf = torch.empty(size, dtype=torch.uint8)
        off = (self.n * 7919 * 64) % POOL_BYTES
        pos = 0
        while pos < size:
            m = min(size - pos, POOL_BYTES - off)
            buf[pos:pos + m].copy_(self.pool[off:off + m])
            pos += m
            off = 0
        return buf.view(tdt).reshape(shape)


def split_shards(specs: list[Spec], shard_bytes: float) -> list[list[Spec]]:
    """Greedy in model order, as transformers' save_pretrained splits (groups may straddle)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        n = nbytes(s[1], s[2])
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def write_checkpoint(folder: Path, specs: list[Spec], config: dict[str, Any],
                     shard_bytes: float) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    filler = Filler()
    shards = split_shards(specs, shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: filler.make(s, d, f) for k, s, d, f in shard}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: name for k, *_ in shard})
    index = {"metadata": {"total_size": spec_bytes(specs)}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def tensor_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def warm(folder: Path) -> float:
    """Read every file of ``folder`` once so the timed runs read from the page cache."""
    t = time.perf_counter()
    buf = bytearray(16 << 20)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with p.open("rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - t


# --- reading safetensors headers (verification) ----------------------------------------------


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def compare_outputs(a: Path, b: Path) -> str | None:
    """None if both folders hold the same tensors (names, dtypes, shapes, bytes), else why not."""
    import mmap

    def entries(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
        out = {}
        for p in sorted(folder.glob("*.safetensors")):
            header, base = read_header(p)
            for k, v in header.items():
                s, e = v["data_offsets"]
                out[k] = (p, v["dtype"], v["shape"], base + s, base + e)
        return out

    ea, eb = entries(a), entries(b)
    if set(ea) != set(eb):
        only_a, only_b = sorted(set(ea) - set(eb)), sorted(set(eb) - set(ea))
        return (f"key sets differ: {len(only_a)} only in {a.name} (e.g. {only_a[:2]}), "
                f"{len(only_b)} only in {b.name} (e.g. {only_b[:2]})")
    maps: dict[Path, Any] = {}

    def view(p: Path) -> Any:
        if p not in maps:
            with p.open("rb") as f:
                maps[p] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return maps[p]

    try:
        for k in sorted(ea):
            pa, da, sa, s0, e0 = ea[k]
            pb, db, sb, s1, e1 = eb[k]
            if (da, sa) != (db, sb):
                return f"{k}: {da}{sa} vs {db}{sb}"
            if view(pa)[s0:e0] != view(pb)[s1:e1]:
                return f"{k}: bytes differ"
    finally:
        for m in maps.values():
            m.close()
    return None


# --- the naive baseline: load_file per shard, hand-written torch, save_file ------------------


def _w1_hub_name(k: str) -> str:
    """The hub name of an in-memory MiniMax-M3-VL key (renames only)."""
    subs = [(r"^model\.language_model\.", "language_model.model."),
            (r"^lm_head\.", "language_model.lm_head."),
            (r"^model\.vision_tower\.embeddings\.proj\.",
             "vision_tower.vision_model.embeddings.patch_embedding."),
            (r"^model\.vision_tower\.layers\.", "vision_tower.vision_model.encoder.layers."),
            (r"^model\.vision_tower\.pre_layrnorm\.", "vision_tower.vision_model.pre_layrnorm."),
            (r"^model\.multi_modal_projector\.merge_linear_(\d)\.", r"patch_merge_mlp.linear_\1."),
            (r"^model\.multi_modal_projector\.linear_(\d)\.", r"multi_modal_projector.linear_\1."),
            (r"\.mlp\.gate\.e_score_correction_bias$", ".block_sparse_moe.e_score_correction_bias"),
            (r"\.mlp\.(experts|gate|shared_experts)([._])", r".block_sparse_moe.\1\2"),
            (r"\.self_attn\.indexer\.(q|k)_(proj|norm)\.", r".self_attn.index_\1_\2.")]
    for pat, rep in subs:
        k = re.sub(pat, rep, k)
    return k


_W1_STACKED = re.compile(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)"
                         r"(_weight_scale_2|_weight_scale|_input_scale)?$")
_W1_FUSED = re.compile(r"^(.*)\.gate_up_proj\.(weight|weight_scale|weight_scale_2|input_scale)$")


def naive_w1(pending: dict[str, Any], out: dict[str, Any], config: dict[str, Any]) -> None:
    """MiniMax-M3-VL NVFP4 revert. Every output depends on one input key, so no carry-over."""
    for k in list(pending):
        t = pending.pop(k)
        m = _W1_STACKED.match(k)
        if m:
            stem = _w1_hub_name(f"{m.group(1)}.mlp.experts.x")[:-2]
            role = (m.group(3) or "_weight")[1:]
            E = t.shape[0] if role in ("weight", "weight_scale", "weight_scale_2") else \
                config["text_config"]["num_local_experts"]
            for e in range(E):
                if m.group(2) == "gate_up_proj":
                    if role in ("weight", "weight_scale"):
                        half = t.shape[1] // 2
                        parts = {"w1": t[e, :half], "w3": t[e, half:]}
                    elif role == "weight_scale_2":
                        parts = {"w1": t[e], "w3": t[e]}
                    else:
                        parts = {"w1": t, "w3": t}
                else:
                    parts = {"w2": t if role == "input_scale" else t[e]}
                for w, v in parts.items():
                    out[f"{stem}.{e}.{w}.{role}"] = v.clone()
            continue
        m = _W1_FUSED.match(k)
        if m:
            stem = _w1_hub_name(m.group(1) + ".x")[:-2]
            role = m.group(2)
            if role in ("weight", "weight_scale"):
                gate, up = t.chunk(2, 0)
            else:
                gate, up = t, t
            out[f"{stem}.gate_proj.{role}"] = gate.clone()
            out[f"{stem}.up_proj.{role}"] = up.clone()
            continue
        out[_w1_hub_name(k)] = t


_W2_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def naive_w2(pending: dict[str, Any], out: dict[str, Any], config: dict[str, Any]) -> None:
    """Mixtral apply: a layer's experts are fused once all 3E of its tensors are loaded."""
    import torch

    E = config["num_local_experts"]
    layers: dict[str, dict[tuple[int, str], str]] = {}
    for k in list(pending):
        m = _W2_EXPERT.match(k)
        if m:
            layers.setdefault(m.group(1), {})[int(m.group(2)), m.group(3)] = k
        else:
            out[k.replace(".block_sparse_moe.", ".mlp.")] = pending.pop(k)
    for p, got in layers.items():
        if len(got) < 3 * E:
            continue  # the rest is in the next shard
        t = {ew: pending.pop(k) for ew, k in got.items()}
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([t[e, "w1"], t[e, "w3"]], 0) for e in range(E)])
        out[f"{p}.mlp.experts.down_proj"] = torch.stack([t[e, "w2"] for e in range(E)])


_W3_EXPERT = re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\."
                        r"(weight|weight_scale_inv)$")


def naive_w3(pending: dict[str, Any], out: dict[str, Any], config: dict[str, Any]) -> None:
    """Qwen2-MoE-style apply on FP8-block experts: weights and their block scales alike."""
    import torch

    E = config["n_routed_experts"]
    layers: dict[str, dict[tuple[int, str, str], str]] = {}
    for k in list(pending):
        m = _W3_EXPERT.match(k)
        if m:
            layers.setdefault(m.group(1), {})[int(m.group(2)), m.group(3), m.group(4)] = k
        else:
            out[k] = pending.pop(k)
    for p, got in layers.items():
        if len(got) < 6 * E:
            continue
        t = {key: pending.pop(k) for key, k in got.items()}
        # transformers' FP8 experts name the block scale gate_up_proj_scale_inv
        for role, suffix in (("weight", ""), ("weight_scale_inv", "_scale_inv")):
            out[f"{p}.mlp.experts.gate_up_proj{suffix}"] = torch.stack(
                [torch.cat([t[e, "gate_proj", role], t[e, "up_proj", role]], 0)
                 for e in range(E)])
            out[f"{p}.mlp.experts.down_proj{suffix}"] = torch.stack(
                [t[e, "down_proj", role] for e in range(E)])


NAIVE: dict[str, Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]] = {
    "1": naive_w1, "2": naive_w2, "3": naive_w3}


def run_naive(workload: str, src: Path, dst: Path) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    names = sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))
    dst.mkdir(parents=True)
    pending: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, name in enumerate(names):
        pending.update(load_file(str(src / name)))
        out: dict[str, Any] = {}
        NAIVE[workload](pending, out, config)
        if out:
            shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
            save_file(out, str(dst / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, shard))
            total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    if pending:
        raise RuntimeError(f"naive {workload}: {len(pending)} tensors never converted, e.g. "
                           f"{next(iter(pending))}")
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=2))
    shutil.copy2(src / "config.json", dst / "config.json")
    return {"shards_out": len(set(weight_map.values()))}


# --- transformers: revert_weight_conversion + save --------------------------------------------


def run_transformers(src: Path, dst: Path, max_shard_size: str) -> dict[str, Any]:
    """Workload 2r: the in-memory Mixtral checkpoint back to the hub layout with transformers'
    own revert_weight_conversion, saved with save_file in hub-split shards."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, MixtralForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):  # no weights: revert_weight_conversion only reads its mapping
        model = MixtralForCausalLM(config)
    how = "revert_weight_conversion(model, state_dict), model = MixtralForCausalLM on meta"
    t0 = time.perf_counter()
    names = sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values())) \
        if (src / INDEX).exists() else [p.name for p in sorted(src.glob("*.safetensors"))]
    state: dict[str, Any] = {}
    for name in names:
        state.update(load_file(str(src / name)))
    t_load = time.perf_counter()
    try:
        hub = revert_weight_conversion(model, state)
    except Exception as exc:
        model._weight_conversions = get_model_conversion_mapping(model)
        how += f"; retried with _weight_conversions set ({type(exc).__name__}: {exc})"
        hub = revert_weight_conversion(model, state)
    t_revert = time.perf_counter()
    split = split_torch_state_dict_into_shards(hub, max_shard_size=max_shard_size)
    dst.mkdir(parents=True)
    for fname, keys in split.filename_to_tensors.items():
        # the reverted experts are views (unbind/chunk) of one storage; save_file needs each
        # tensor to own its memory
        shard = {k: hub[k].clone(memory_format=torch.contiguous_format) for k in keys}
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        (dst / INDEX).write_text(json.dumps({"metadata": split.metadata,
                                             "weight_map": split.tensor_to_filename}, indent=2))
    shutil.copy2(src / "config.json", dst / "config.json")
    t_save = time.perf_counter()
    return {"how": how, "load_s": t_load - t0, "revert_s": t_revert - t_load,
            "save_s": t_save - t_revert, "seconds": t_save - t0, "tensors_out": len(hub)}


TORCH_DT = {"BF16": "bfloat16", "F32": "float32", "U8": "uint8", "F8_E4M3": "float8_e4m3fn"}


def probe_transformers(src: Path, rules: str, direction: str) -> dict[str, Any]:
    """What transformers' revert_weight_conversion does with a checkpoint's key set (meta
    tensors from the headers, no data), compared with convlens' plan of the same revert."""
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.core_model_loading import revert_weight_conversion

    from convlens.api import load_rules
    from convlens.compiler.planner import TensorMeta
    from convlens.runtime.safetensors_io import open_checkpoint

    config = json.loads((src / "config.json").read_text())
    arch = config["architectures"][0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        return {"model": arch, "error": f"transformers {transformers.__version__} has no {arch}"}
    cfg = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = cls(cfg)
    ckpt = open_checkpoint(src)
    entries = {k: e for s in ckpt.shards for k, e in s.entries.items()}
    state = {k: torch.empty(e.shape, dtype=getattr(torch, TORCH_DT[e.dtype]), device="meta")
             for k, e in entries.items()}
    metas = {k: TensorMeta(e.shape, e.dtype) for k, e in entries.items()}
    want = {k: n.shape for k, n in load_rules(rules).plan(metas, config,
                                                          direction=direction).outputs.items()}
    out: dict[str, Any] = {"model": type(model).__name__, "keys_in": len(state),
                           "keys_convlens": len(want)}
    try:
        got = revert_weight_conversion(model, state)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        # the same key set without the quantization siblings, to show where it breaks
        plain = {k: v for k, v in state.items() if not re.search(r"(_|\.)(weight_scale(_2)?|"
                                                                 r"input_scale)$", k)}
        try:
            revert_weight_conversion(model, plain)
            out["unquantized_ok"] = True
        except Exception as exc2:
            out["unquantized_error"] = f"{type(exc2).__name__}: {exc2}"[:200]
        return out
    shapes = {k: tuple(v.shape) for k, v in got.items()}
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = sorted(k for k in set(want) & set(shapes) if tuple(want[k]) != shapes[k])
    def templates(keys: list[str], shape_of: dict[str, Any] | None = None) -> list[str]:
        """Keys grouped by template (indices as #), the biggest groups first."""
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(re.sub(r"\.\d+\.", ".#.", k), []).append(k)
        top = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:4]
        return [f"{t} x{len(ks)}" + (f" {list(shape_of[ks[0]])}" if shape_of else "")
                for t, ks in top]

    scale = re.compile(r"(_|\.)(weight_scale(_2)?|input_scale)$")
    plain = [k for k in want if not scale.search(k)]
    out["plain_agree"] = sum(1 for k in plain if shapes.get(k) == tuple(want[k]))
    out["plain"] = len(plain)
    out.update(keys_transformers=len(shapes), missing=len(missing),
               missing_eg=templates(missing), extra=len(extra),
               extra_eg=templates(extra, shapes), wrong_shape=len(wrong),
               wrong_eg=[f"{k} {list(shapes[k])} (want {list(want[k])})" for k in wrong[:3]])
    return out


# --- convlens -----------------------------------------------------------------------------


def run_convlens(src: Path, dst: Path, rules: str, direction: str, workers: int | None,
                 max_shard_size: str | None, force_torch: bool, fsync: bool
                 ) -> dict[str, Any]:
    import convlens.runtime.disk as disk
    from convlens.checkpoint import convert_checkpoint

    if force_torch:  # diagnostic: every output through the torch path (bounded by its group)
        disk.MAX_SEGMENTS = 0
    kwargs: dict[str, Any] = {} if workers is None else {"workers": workers}
    if fsync:  # durable like cp -r + sync: every file flushed before the rename
        kwargs["fsync"] = True
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    t0 = time.perf_counter()
    rep = convert_checkpoint(src, dst, rules=rules, direction=direction, quiet=True, **kwargs)
    seconds = time.perf_counter() - t0
    s = rep.stats
    assert s is not None
    return {"seconds": seconds, "write_s": s.seconds, "before_write_s": rep.seconds - s.seconds,
            "bytes": s.bytes, "copied_tensors": s.copied_tensors,
            "computed_tensors": s.computed_tensors, "shards_out": len(s.shards),
            "tensors_in": rep.tensors_in, "tensors_out": rep.tensors_out}


# --- planning --------------------------------------------------------------------------------


def largest_group(plan: Any) -> tuple[int, str]:
    """The sum of the input bytes of the largest output's leaves (what one output can need)."""
    from convlens.compiler import plan as P

    best, key = 0, ""
    for k, node in plan.outputs.items():
        leaves = {leaf.key: P.nbytes(leaf.shape, leaf.dtype) for leaf in P.leaves(node)}
        n = sum(leaves.values())
        if n > best:
            best, key = n, k
    return best, key


def run_plan(src: Path | None, rules: str, direction: str, repeats: int,
             synthetic_keys: int) -> dict[str, Any]:
    from convlens.api import load_rules
    from convlens.compiler.planner import TensorMeta
    from convlens.runtime.disk import plan_shards
    from convlens.runtime.safetensors_io import open_checkpoint

    conv = load_rules(rules)
    out: dict[str, Any] = {}
    if src is not None:
        t0 = time.perf_counter()
        ckpt = open_checkpoint(src)
        out["headers_s"] = time.perf_counter() - t0
        metas = {k: TensorMeta(e.shape, e.dtype) for s in ckpt.shards for k, e in s.entries.items()}
        config = json.loads((src / "config.json").read_text())
    else:
        raw, config = w3_synthetic_metas(synthetic_keys)
        metas = {k: TensorMeta(s, d) for k, (s, d) in raw.items()}
    times = []
    plan = None
    for _ in range(repeats):
        plan = None  # the previous run's plan is freed here, not inside the next timing
        t0 = time.perf_counter()
        plan = conv.plan(metas, config, direction=direction)
        times.append(time.perf_counter() - t0)
    assert plan is not None
    if src is None:
        t0 = time.perf_counter()
        conv.plan(metas, config, direction=direction, check=False)
        out["plan_unchecked_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shards = plan_shards(plan, "5GB")
    out["plan_shards_s"] = time.perf_counter() - t0
    group, group_key = largest_group(plan)
    out.update(keys=len(metas), outputs=len(plan.outputs), plan_s=statistics.median(times),
               plan_runs=times, largest_group=group, largest_group_key=group_key,
               shards_out=len(shards))
    return out


def _profile(fn: Callable[[], Any], out: Path, top: int) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    with out.open("w") as f:
        st = pstats.Stats(prof, stream=f)
        st.sort_stats("cumulative").print_stats(top)
        st.sort_stats("tottime").print_stats(top)


def child_main(spec: dict[str, Any]) -> None:
    """One measured step in its own process; writes its result as JSON."""
    import resource

    t_start = time.perf_counter()
    kind = spec["kind"]
    src = Path(spec["src"]) if spec.get("src") else None
    dst = Path(spec["dst"]) if spec.get("dst") else None
    # imports are not part of any timing
    if kind in ("naive", "generate", "transformers"):
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    if kind in ("convlens", "plan", "profile", "profile_plan", "probe"):
        import convlens.checkpoint  # noqa: F401
    if kind in ("transformers", "probe"):
        import transformers  # noqa: F401
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res: dict[str, Any]
    if kind == "generate":
        specs, config = WORKLOADS[spec["workload"]]["specs"](spec["size"])
        write_checkpoint(Path(spec["dst"]), specs, config, spec["shard_bytes"])
        res = {"tensors": len(specs)}
    elif kind == "naive":
        assert src and dst
        res = run_naive(spec["workload"], src, dst)
    elif kind == "convlens":
        assert src and dst
        res = run_convlens(src, dst, spec["rules"], spec["direction"], spec.get("workers"),
                           spec.get("max_shard_size"), spec.get("force_torch", False),
                           spec.get("fsync", False))
    elif kind == "transformers":
        assert src and dst
        res = run_transformers(src, dst, spec.get("max_shard_size", "5GB"))
    elif kind == "probe":
        assert src
        res = probe_transformers(src, spec["rules"], spec["direction"])
    elif kind == "plan":
        res = run_plan(src, spec["rules"], spec["direction"], spec["repeats"],
                       spec.get("synthetic_keys", 0))
    elif kind == "profile":
        assert src and dst
        from convlens.checkpoint import convert_checkpoint

        _profile(lambda: convert_checkpoint(src, dst, rules=spec["rules"],
                                            direction=spec["direction"], quiet=True),
                 Path(spec["out"]), 30)
        res = {}
    elif kind == "profile_plan":
        from convlens.api import load_rules
        from convlens.compiler.planner import TensorMeta

        raw, config = w3_synthetic_metas(spec["synthetic_keys"])
        metas = {k: TensorMeta(s, d) for k, (s, d) in raw.items()}
        conv = load_rules(spec["rules"])
        _profile(lambda: conv.plan(metas, config, direction=spec["direction"]),
                 Path(spec["out"]), 30)
        res = {}
    elif kind == "compare":
        res = {"diff": {name: compare_outputs(Path(a), Path(b))
                        for name, (a, b) in spec["pairs"].items()}}
    else:
        raise SystemExit(f"unknown child kind {kind}")
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    res.setdefault("seconds", seconds)
    res["user_s"] = r1.ru_utime - r0.ru_utime
    res["sys_s"] = r1.ru_stime - r0.ru_stime
    res["startup_s"] = t0 - t_start
    try:  # this process's own peak RSS (VmHWM), a cross-check of ru_maxrss
        status = Path("/proc/self/status").read_text()
        res["vmhwm"] = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    Path(spec["result"]).write_text(json.dumps(res))


# --- the harness -----------------------------------------------------------------------------


class Harness:
    """Runs every step in a fresh process. The harness itself never imports torch, so what a
    child inherits in ru_maxrss from it (fork + exec keep the parent's high-water mark) stays
    small."""

    def __init__(self, workdir: Path, repeats: int, log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.repeats = repeats
        self.log = log
        self.n = 0
        self.steal: list[float] = []
        self.loads: list[float] = []

    def spawn(self, argv: list[str], label: str) -> dict[str, Any]:
        """Run a process: wall seconds, its peak RSS (os.wait4), CPU, and its JSON result."""
        self.n += 1
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        out = logs / f"{self.n:03d}.out"
        result = logs / f"{self.n:03d}.json"
        argv = [a.replace("{result}", str(result)) for a in argv]
        result.unlink(missing_ok=True)
        with out.open("wb") as f:
            steal0 = steal_seconds()
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            steal = steal_seconds() - steal0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            tail = out.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{tail}")
        data = json.loads(result.read_text()) if result.exists() else {}
        return {"wall": wall, "rss": usage.ru_maxrss * 1024,  # Linux: KiB
                "user_s": usage.ru_utime, "sys_s": usage.ru_stime, **data,
                "seconds": data.get("seconds", wall), "steal_s": steal}

    def child(self, spec: dict[str, Any], label: str) -> dict[str, Any]:
        spec = dict(spec, result="{result}")
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        return self.spawn(argv, label)

    def run(self, m: dict[str, Any]) -> dict[str, Any]:
        if "argv" in m:
            return self.spawn(m["argv"], m["label"])
        return self.child(m["spec"], m["label"])

    def rounds(self, methods: list[dict[str, Any]], repeats: int | None = None
               ) -> dict[str, dict[str, Any]]:
        """``repeats`` rounds over ``methods`` (rotating the order each round, so that drift in
        the machine is shared out). Before every run: its output is removed, sync(), and its
        source folder read once (warm cache). ``keep``: the last run's output stays."""
        n = repeats or self.repeats
        runs: dict[str, list[dict[str, Any]]] = {m["key"]: [] for m in methods}
        for r in range(n):
            k = r % len(methods)
            for m in methods[k:] + methods[:k]:
                dst = m["dst"]
                shutil.rmtree(dst, ignore_errors=True)
                warm(m["src"])
                os.sync()
                load = os.getloadavg()[0]
                res = self.run(m)
                res["load_before"] = load
                self.loads.append(load)
                runs[m["key"]].append(res)
                self.log(f"    {m['label']:40} {r + 1}/{n}: {res['seconds']:7.2f} s  "
                         f"(user {res['user_s']:5.1f} s, sys {res['sys_s']:5.1f} s, steal "
                         f"{res['steal_s']:4.1f} s), peak RSS {res['rss'] / MB:6.0f} MB")
                self.steal.append(res["steal_s"])
                if not (m.get("keep") and r == n - 1):
                    shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        out = {}
        for m in methods:
            rs = runs[m["key"]]
            secs = [x["seconds"] for x in rs]
            out[m["key"]] = {"label": m["label"], "median_s": statistics.median(secs),
                             "runs_s": secs, "rss": max(x["rss"] for x in rs),
                             "user_s": statistics.median(x["user_s"] for x in rs),
                             "sys_s": statistics.median(x["sys_s"] for x in rs),
                             # the median run (the last one may be one noise slowed)
                             "detail": sorted(rs, key=lambda x: x["seconds"])[len(rs) // 2]}
        return out


def steal_seconds() -> float:
    """CPU time the hypervisor took from this VM (all CPUs), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "convlens"], cwd=REPO,
                               text=True, capture_output=True, check=False).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (" with uncommitted changes under convlens/" if dirty else "")


def machine() -> dict[str, str]:
    from importlib import metadata

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for mod in ("convlens", "torch", "safetensors", "transformers", "huggingface_hub"):
        try:
            versions.append(f"{mod} {metadata.version(mod)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{mod} not installed")
    fs = ""
    try:
        out = subprocess.run(["df", "-T", "/tmp"], capture_output=True, text=True,
                             check=False).stdout.splitlines()
        fs = out[-1].split()[1] if len(out) > 1 else ""
    except (OSError, IndexError):
        pass
    return {"cpu": f"{cpu}, {os.cpu_count()} cores", "mem": mem,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "versions": ", ".join(versions), "fs": fs}


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=3.0,
                    help="approximate tensor bytes per workload checkpoint (GB, 1e9; default 3)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method (median)")
    ap.add_argument("--workloads", default="1,2,3", help="comma-separated subset of 1,2,3")
    ap.add_argument("--workdir", help="where to generate (default: a new temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir and its files")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="input shard size (GB)")
    ap.add_argument("--plan-keys", type=int, default=300_000,
                    help="keys of the pure planning measurement (default 300000)")
    ap.add_argument("--no-diagnostics", action="store_true",
                    help="skip the single-run diagnostic convlens variants (workers=2 with 1GB "
                         "shards, torch path forced), the transformers probe and the profiles")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--output", default=str(REPO / "BENCHMARKS.md"),
                    help="markdown file to update (default: BENCHMARKS.md at the repo root)")
    ap.add_argument("--json", help="also write the raw results (every run) to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0

    started = time.perf_counter()
    command = "python benchmarks/bench_convert.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in ("1", "2", "3")]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from 1,2,3")
    diag = not args.no_diagnostics
    size = args.size_gb * GB
    workdir = Path(tempfile.mkdtemp(prefix="convlens-bench-", dir="/tmp")) if args.workdir is None \
        else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    h = Harness(workdir, args.repeats, log)
    log(f"workdir {workdir}\npage cache: cannot be dropped without root; before every timed "
        "run the source folder is read once (warm cache), the output removed and sync() called")
    R = Results()
    try:
        for w in [w for w in ("1", "2", "3") if w in workloads]:
            bench_workload(h, R, w, workdir, size, args, diag)
        if "3" in workloads:
            log(f"\n== planning, pure: {args.plan_keys} synthetic keys (TensorMeta only)")
            p = h.child({"kind": "plan", "src": None, "rules": "qwen2_moe", "direction": "apply",
                         "repeats": args.repeats, "synthetic_keys": args.plan_keys}, "plan")
            R.plans["synthetic"] = p
            log(f"  {p['keys']} keys -> {p['outputs']} outputs: plan {p['plan_s']:.2f} s (runs "
                f"{', '.join(f'{t:.2f}' for t in p['plan_runs'])}; without the name check "
                f"{p['plan_unchecked_s']:.2f} s), peak RSS {p['rss'] / MB:.0f} MB")
            if diag:
                keys = min(args.plan_keys, 100_000)
                log(f"\n== profile: Conversion.plan on {keys} synthetic keys")
                out = workdir / "profile_plan.txt"
                h.child({"kind": "profile_plan", "rules": "qwen2_moe", "direction": "apply",
                         "synthetic_keys": keys, "out": str(out)}, "profile plan")
                R.profiles[f"`Conversion.plan`, {keys} synthetic workload-3 keys"] = \
                    out.read_text()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    report = render(R, command, args, elapsed, workdir if args.keep else None, h.steal,
                    h.loads)
    print("\n" + report)
    if args.json:
        Path(args.json).write_text(json.dumps(vars(R), indent=1, default=str))
    if not args.no_write:
        update_markdown(Path(args.output), report)
        print(f"\nwritten into {args.output}")
    return 0


PROCESS_KEYS = ("wall", "rss", "user_s", "sys_s", "startup_s", "vmhwm", "seconds")


class Results:
    def __init__(self) -> None:
        self.methods: dict[str, dict[str, dict[str, Any]]] = {}
        self.bytes: dict[str, int] = {}
        self.plans: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, str] = {}
        self.diag: dict[str, list[dict[str, Any]]] = {}
        self.probe: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, str] = {}
        self.generated: dict[str, dict[str, Any]] = {}


def bench_workload(h: Harness, R: Results, w: str, workdir: Path, size: float,
                   args: argparse.Namespace, diag: bool) -> None:
    log = h.log
    wl = WORKLOADS[w]
    log(f"\n== workload {w}: {wl['title']}")
    src = workdir / f"w{w}-src"
    shutil.rmtree(src, ignore_errors=True)
    g = h.child({"kind": "generate", "workload": w, "size": size, "dst": str(src),
                 "shard_bytes": args.shard_gb * GB}, f"generate {w}")
    os.sync()
    R.bytes[w] = tensor_bytes(src)
    R.generated[w] = {"tensors": g["tensors"], "shards": len(list(src.glob("*.safetensors"))),
                      "seconds": g["seconds"]}
    log(f"  generated {g['tensors']} tensors, {R.bytes[w] / GB:.2f} GB in "
        f"{R.generated[w]['shards']} shards ({g['seconds']:.1f} s)")
    plan_of(h, R, w, src, wl["rules"], wl["direction"])
    conv = {"kind": "convlens", "src": str(src), "rules": wl["rules"],
            "direction": wl["direction"]}
    methods = copies(src, workdir / f"w{w}") + [
        {"key": "naive", "label": "naive", "src": src, "dst": workdir / f"w{w}-naive",
         "keep": True, "spec": {"kind": "naive", "workload": w, "src": str(src),
                                "dst": str(workdir / f"w{w}-naive")}},
        {"key": "convlens", "label": "convlens", "src": src, "dst": workdir / f"w{w}-convlens",
         "keep": True, "spec": dict(conv, dst=str(workdir / f"w{w}-convlens"))}]
    if w in ("1", "2"):  # durable, against cp -r + sync
        methods.append({"key": "fsync", "label": "convlens --fsync", "src": src,
                        "dst": workdir / f"w{w}-fsync",
                        "spec": dict(conv, dst=str(workdir / f"w{w}-fsync"), fsync=True)})
    R.methods[w] = h.rounds(methods)
    d = h.child({"kind": "compare", "pairs": {"naive-convlens": [
        str(workdir / f"w{w}-naive"), str(workdir / f"w{w}-convlens")]}}, "compare")
    why = d["diff"]["naive-convlens"]
    R.checks[w] = ("naive and convlens outputs identical (names, dtypes, shapes, bytes)"
                   if why is None else f"MISMATCH naive vs convlens: {why}")
    log(f"  check: {R.checks[w]}")
    shutil.rmtree(workdir / f"w{w}-naive", ignore_errors=True)
    if diag:
        variants = [("workers=2 with max_shard_size=1GB (several output shards)",
                     {"workers": 2, "max_shard_size": "1GB"})]
        if w == "2":
            variants.append(("torch path forced (every group materialized)",
                             {"force_torch": True}))
        if w != "3":
            diag_runs(h, R, w, src, workdir, conv, variants)
        if w == "1" and have("transformers"):
            p = h.child({"kind": "probe", "src": str(src), "rules": wl["rules"],
                         "direction": wl["direction"]}, "probe")
            R.probe[w] = p
            shown = {k: v for k, v in p.items() if k not in PROCESS_KEYS}
            log(f"  transformers probe: {json.dumps(shown)}")
    if w == "2":
        bench_w2r(h, R, workdir, src, diag)
    shutil.rmtree(workdir / f"w{w}-convlens", ignore_errors=True)
    if diag and w in ("1", "3"):  # where the time goes, on the same (warm) source
        log(f"  profiling convlens on workload {w}")
        out, pdst = workdir / f"profile_w{w}.txt", workdir / f"w{w}-profile"
        warm(src)
        os.sync()
        h.child({"kind": "profile", "src": str(src), "dst": str(pdst), "rules": wl["rules"],
                 "direction": wl["direction"], "out": str(out)}, "profile")
        R.profiles[f"`convert_checkpoint` on workload {w} (under cProfile, so Python-heavy "
                   "parts look ~2x slower than they are)"] = out.read_text()
        shutil.rmtree(pdst, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    os.sync()


def copies(src: Path, stem: Path) -> list[dict[str, Any]]:
    """The physical references: cp -r, and cp -r followed by an fsync of every copied file
    (``sync FILE...``), as durable as ``convlens --fsync``."""
    a, b = Path(f"{stem}-cp"), Path(f"{stem}-cpsync")
    return [{"key": "cp", "label": "cp -r", "src": src, "dst": a,
             "argv": ["cp", "-r", str(src), str(a)]},
            {"key": "cpsync", "label": "cp -r + sync", "src": src, "dst": b,
             "argv": ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(src), str(b)]}]


def plan_of(h: Harness, R: Results, w: str, src: Path, rules: str, direction: str) -> None:
    p = h.child({"kind": "plan", "src": str(src), "rules": rules, "direction": direction,
                 "repeats": 1}, f"plan {w}")
    R.plans[w] = p
    h.log(f"  plan: {p['keys']} keys -> {p['outputs']} outputs; headers {p['headers_s']:.2f} s, "
          f"plan {p['plan_s']:.2f} s; largest group {p['largest_group'] / MB:.0f} MB "
          f"({p['largest_group_key']})")


def diag_runs(h: Harness, R: Results, w: str, src: Path, workdir: Path, conv: dict[str, Any],
              variants: list[tuple[str, dict[str, Any]]]) -> None:
    for label, extra in variants:
        d = workdir / f"w{w}-diag"
        r = h.rounds([{"key": "x", "label": f"convlens, {label}", "src": src, "dst": d,
                       "spec": dict(conv, dst=str(d), **extra)}], repeats=1)["x"]
        r["variant"] = label
        R.diag.setdefault(w, []).append(r)


def bench_w2r(h: Harness, R: Results, workdir: Path, hub_src: Path, diag: bool) -> None:
    """transformers only reverts: time it, cp -r and convlens on the in-memory checkpoint that
    convlens wrote in workload 2, back to the hub layout; both outputs must equal the source."""
    log = h.log
    mem = workdir / "w2r-src"
    shutil.rmtree(mem, ignore_errors=True)
    (workdir / "w2-convlens").rename(mem)
    os.sync()
    R.bytes["2r"] = tensor_bytes(mem)
    log(f"\n== workload 2r: {WORKLOADS['2r']['title']}")
    plan_of(h, R, "2r", mem, "mixtral", "revert")
    methods = copies(mem, workdir / "w2r") + [
        {"key": "convlens", "label": "convlens", "src": mem, "dst": workdir / "w2r-convlens",
         "keep": True, "spec": {"kind": "convlens", "src": str(mem),
                                "dst": str(workdir / "w2r-convlens"), "rules": "mixtral",
                                "direction": "revert"}}]
    if have("transformers"):
        methods.insert(2, {"key": "transformers", "label": "transformers", "src": mem,
                           "dst": workdir / "w2r-transformers", "keep": True,
                           "spec": {"kind": "transformers", "src": str(mem),
                                    "dst": str(workdir / "w2r-transformers")}})
    R.methods["2r"] = h.rounds(methods)
    pairs = {k: [str(workdir / f"w2r-{k}"), str(hub_src)] for k in ("transformers", "convlens")
             if k in R.methods["2r"]}
    d = h.child({"kind": "compare", "pairs": pairs}, "compare")["diff"]
    R.checks["2r"] = "; ".join(
        f"{k} output == the original hub checkpoint of workload 2: "
        + ("yes" if v is None else f"NO ({v})") for k, v in d.items())
    log(f"  check: {R.checks['2r']}")
    for k in pairs:
        shutil.rmtree(workdir / f"w2r-{k}", ignore_errors=True)
    shutil.rmtree(mem, ignore_errors=True)


# --- the report ------------------------------------------------------------------------------


METHOD_ORDER = ["cp", "cpsync", "naive", "transformers", "convlens", "fsync"]
LABELS = {"cp": "`cp -r` (physical reference)",
          "cpsync": "`cp -r` + `sync` of each file (durable like `--fsync`)",
          "fsync": "convlens `fsync=True` (`--fsync`: every file on disk before the rename)",
          "naive": "naive: `load_file` per shard, hand-written torch, `save_file`",
          "transformers": "transformers `revert_weight_conversion` + `save_file`",
          "convlens": "**convlens** `convert_checkpoint` (default workers: the CPUs, at most 4)"}
NA = {"1": "transformers: n/a, see the probe below",
      "2": "transformers: n/a in this direction: hub -> in-memory only happens inside "
           "`from_pretrained`, into a live model, not disk to disk; timed in reverse as 2r",
      "3": "transformers: n/a: apply direction (only inside `from_pretrained`), and an FP8-block "
           "checkpoint goes through its FP8 quantizer there, not to disk"}


def render(R: Results, command: str, args: argparse.Namespace, elapsed: float,
           kept: Path | None, steal: list[float], loads: list[float]) -> str:
    mach = machine()
    out = [f"Command: `{command}`  ",
           f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; "
           f"convlens at commit {git_head()}  ",
           f"Machine: {mach['cpu']}, {mach['mem']}, {mach['os']}, /tmp on {mach['fs']}; "
           f"Python {mach['python']}; {mach['versions']}  ",
           f"Whole run: {elapsed / 60:.1f} min. CPU time stolen by the hypervisor during the "
           f"timed runs: {sum(steal):.1f} s in all, at most {max(steal, default=0):.1f} s in "
           f"one run; 1-min load average before a timed run at most "
           f"{max(loads, default=0):.2f} (this benchmark's own runs included).", "",
           f"Method: median of {args.repeats} runs, methods interleaved round-robin (order "
           "rotated each round). The page cache is NOT dropped (that needs root): before every "
           "run the source folder is read once (warm cache), the previous output removed and "
           "`sync()` called. Seconds are measured inside each worker process around the "
           "conversion (interpreter start-up and imports excluded); `cp -r` as a whole process. "
           "Peak RSS = `ru_maxrss` of the worker process from `os.wait4` (max over runs). "
           "CPU = user/sys seconds of the conversion (median). GB = 1e9 bytes of tensor data "
           "in the source checkpoint. x cp -r = (cp -r median s) / (median s).", ""]
    out += ["| workload | method | median s (runs) | GB/s | x cp -r throughput | speed-up vs "
            "naive | CPU user/sys s | peak RSS MB |", "|---|---|---|---:|---:|---:|---|---:|"]
    for w in ("1", "2", "2r", "3"):
        if w not in R.methods:
            continue
        m = R.methods[w]
        cp = m["cp"]["median_s"]
        naive = m["naive"]["median_s"] if "naive" in m else None
        names = [k for k in METHOD_ORDER if k in m]
        gen = R.generated.get(w)
        desc = f"**{w}**: {WORKLOADS[w]['title']}; {R.bytes[w] / GB:.2f} GB, " + (
            f"{gen['tensors']} tensors in {gen['shards']} shards" if gen else
            f"{R.plans[w]['keys']} tensors (convlens' output of 2)")
        for i, k in enumerate(names):
            r = m[k]
            s = r["median_s"]
            runs = "/".join(f"{x:.1f}" for x in r["runs_s"])
            out.append(f"| {desc if i == 0 else ''} | {LABELS[k]} | {s:.2f} ({runs}) | "
                       f"{R.bytes[w] / GB / s:.2f} | {cp / s:.2f}x | "
                       f"{'' if naive is None else f'{naive / s:.2f}x'} | "
                       f"{r['user_s']:.1f}/{r['sys_s']:.1f} | {r['rss'] / MB:.0f} |")
        if w in NA and "transformers" not in m:
            out.append(f"| | {NA[w]} | | | | | | |")
        for r in R.diag.get(w, []):
            s = r["median_s"]
            out.append(f"| | diagnostic (1 run): convlens, {r['variant']} | {s:.2f} | "
                       f"{R.bytes[w] / GB / s:.2f} | {cp / s:.2f}x | "
                       f"{'' if naive is None else f'{naive / s:.2f}x'} | "
                       f"{r['user_s']:.1f}/{r['sys_s']:.1f} | {r['rss'] / MB:.0f} |")
    out.append("")
    if R.checks:
        out.append("What was timed is correct:")
        out += [f"- workload {w}: {c}" for w, c in R.checks.items()]
        out.append("")
    for w, p in R.probe.items():
        if "error" in p:
            extra = (" The same key set without the NVFP4 scale siblings reverts without error."
                     if p.get("unquantized_ok") else
                     f" Without the scale siblings: {p.get('unquantized_error')}.")
            out += [f"transformers probe on workload {w} (`revert_weight_conversion` on a "
                    f"meta-device {p['model']}, meta tensors with the checkpoint's names, shapes "
                    f"and dtypes): it raises `{p['error']}`.{extra} So there is nothing to "
                    "time.", ""]
        else:
            out += [f"transformers probe on workload {w}: `revert_weight_conversion` on a "
                    f"meta-device {p['model']} with meta tensors of the checkpoint's names, "
                    f"shapes and dtypes returns {p['keys_transformers']} keys where convlens' "
                    f"plan has {p['keys_convlens']}; of the {p['plain']} hub keys that are not "
                    f"scales, {p['plain_agree']} come out alike in both. Not a correct "
                    "conversion, so there is nothing to time:", ""]
            out += [f"- {p['missing']} hub keys missing, by template: "
                    + "; ".join(f"`{t}`" for t in p["missing_eg"]),
                    f"- {p['extra']} keys that are not hub names (left under in-memory "
                    "names): " + "; ".join(f"`{t}`" for t in p["extra_eg"])]
            if p["wrong_shape"]:
                out.append(f"- {p['wrong_shape']} keys with a wrong shape, e.g. "
                           + "; ".join(p["wrong_eg"]))
            out.append("")

    out += ["convlens internals (the median run): before write = headers, planning, name "
            "check, shard planning; write = byte-range copies (`pread` into a buffer, `pwrite`) "
            "and torch groups (no fsync unless `--fsync`).", "",
            "| workload | tensors in -> out | headers s | plan s | before write s | write s | "
            "copied / computed | output shards |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for w in ("1", "2", "2r", "3"):
        if w not in R.methods or "convlens" not in R.methods[w]:
            continue
        d = R.methods[w]["convlens"]["detail"]
        p = R.plans.get(w, {})
        out.append(f"| {w} | {d['tensors_in']} -> {d['tensors_out']} | "
                   f"{p.get('headers_s', 0):.2f} | {p.get('plan_s', 0):.2f} | "
                   f"{d['before_write_s']:.2f} | {d['write_s']:.2f} | "
                   f"{d['copied_tensors']} / {d['computed_tensors']} | {d['shards_out']} |")
    out.append("")

    out += ["Memory bound. Largest group = the input bytes of the leaves of the output that "
            "needs the most (from the plan); bound = 2 x largest group + 300 MB; the "
            "demonstration needs a checkpoint of at least 4x the bound.", "",
            "| workload | run | checkpoint GB | largest group MB (output) | bound MB | "
            "checkpoint / bound | peak RSS MB | within bound |",
            "|---|---|---:|---|---:|---:|---:|---|"]
    mem_ok: list[tuple[str, bool, bool]] = []

    def mem_row(w: str, label: str, rss: int, default: bool) -> None:
        p = R.plans[w]
        g = p["largest_group"]
        bound = 2 * g + 300 * MB
        ckpt = R.bytes[w]
        ok, big = rss <= bound, ckpt >= 4 * bound
        if default:
            mem_ok.append((w, ok, big))
        out.append(f"| {w} | {label} | {ckpt / GB:.2f} | {g / MB:.0f} "
                   f"(`{p['largest_group_key']}`) | {bound / MB:.0f} | {ckpt / bound:.1f}x"
                   f"{'' if big else ' (< 4x)'} | {rss / MB:.0f} | {'yes' if ok else '**no**'} |")

    for w in ("1", "2", "2r", "3"):
        if w in R.methods and "convlens" in R.methods[w]:
            mem_row(w, "convlens, default", R.methods[w]["convlens"]["rss"], True)
        for r in R.diag.get(w, []):
            mem_row(w, f"convlens, {r['variant']} (1 run)", r["rss"], False)
    out.append("")

    if "3" in R.plans or "synthetic" in R.plans:
        out += ["Planning (`Conversion.plan` includes its name check, the inverse planned on "
                "the result):", ""]
        if "3" in R.plans:
            p = R.plans["3"]
            out.append(f"- workload 3 from its headers: {p['keys']} keys -> {p['outputs']} "
                       f"outputs: `open_checkpoint` {p['headers_s']:.2f} s, `Conversion.plan` "
                       f"{p['plan_s']:.2f} s, `plan_shards` {p['plan_shards_s']:.2f} s")
        if "synthetic" in R.plans:
            p = R.plans["synthetic"]
            out.append(f"- pure planning on {p['keys']} synthetic keys (TensorMeta only, "
                       f"workload-3 shapes) -> {p['outputs']} outputs: median {p['plan_s']:.2f} s "
                       f"(runs {', '.join(f'{t:.2f}' for t in p['plan_runs'])}); without the "
                       f"name check {p['plan_unchecked_s']:.2f} s; peak RSS "
                       f"{p['rss'] / MB:.0f} MB")
        out.append("")

    out += ["Targets:", "", "| target | measured | met |", "|---|---|---|"]

    def ratio(w: str, a: str, b: str) -> float | None:
        m = R.methods.get(w, {})
        return m[b]["median_s"] / m[a]["median_s"] if a in m and b in m else None

    def paired(w: str, a: str, b: str) -> str:
        m = R.methods.get(w, {})
        if a not in m or b not in m:
            return ""
        per = [y / x for x, y in zip(m[a]["runs_s"], m[b]["runs_s"], strict=True)]
        # noise on this VM only ever adds time: the fastest runs show what each method costs
        best = min(m[b]["runs_s"]) / min(m[a]["runs_s"])
        return (f"; per round {', '.join(f'{x:.2f}' for x in per)} (median "
                f"{statistics.median(per):.2f}x); fastest run against fastest run {best:.2f}x")

    for w in ("1", "2"):
        r = ratio(w, "convlens", "cp")
        if r is not None:
            durable = ratio(w, "fsync", "cpsync")
            extra = "" if durable is None else (f"; `--fsync` vs `cp -r` + sync: "
                                                f"{durable:.2f}x")
            out.append(f"| convlens throughput >= 0.8x `cp -r`, workload {w} | {r:.2f}x"
                       f"{paired(w, 'convlens', 'cp')}{extra} | "
                       f"{'yes' if r >= 0.8 else '**no**'} |")
    for w in ("1", "2", "3"):
        r = ratio(w, "convlens", "naive")
        if r is not None:
            out.append(f"| convlens faster than naive, workload {w} | {r:.2f}x | "
                       f"{'yes' if r > 1 else '**no**'} |")
    if mem_ok:
        shown = "; ".join(f"{w}: {'within' if ok else 'over'}"
                          f"{'' if big else ' (checkpoint < 4x bound)'}" for w, ok, big in mem_ok)
        met = all(ok for _, ok, _ in mem_ok)
        demo = any(ok and big for _, ok, big in mem_ok)
        out.append(f"| peak RSS <= 2x largest group + 300 MB | {shown} | "
                   f"{'yes' if met and demo else '**no**'} |")
    if "synthetic" in R.plans:
        p = R.plans["synthetic"]
        out.append(f"| planning {p['keys']} keys < 5 s | {p['plan_s']:.2f} s | "
                   f"{'yes' if p['plan_s'] < 5 else '**no**'} |")
    out.append("")
    for title, text in R.profiles.items():
        lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
        out += [f"<details><summary>cProfile: {title}</summary>", "", "```", *lines, "```",
                "</details>", ""]
    if kept:
        out.append(f"(workdir kept: {kept})")
    return "\n".join(out)


def update_markdown(path: Path, report: str) -> None:
    block = f"{BEGIN}\n{report}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            path.write_text(pre + block + post)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.write_text("# Benchmarks\n\nGenerated by `benchmarks/bench_convert.py` (see "
                    "benchmarks/README.md).\n\n" + block + "\n")


if __name__ == "__main__":
    sys.exit(main())
