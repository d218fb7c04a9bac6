"""Revert a small NVFP4 checkpoint from transformers' in-memory layout to the hub layout.

This is what a quantizer's export needs (NVIDIA ModelOpt's use case): it holds the quantized
model with in-memory names (experts stacked into 3-D ``gate_up_proj`` / ``down_proj`` with their
scale siblings ``gate_up_proj_weight_scale``, a ``[E]`` ``gate_up_proj_weight_scale_2`` and one
shared ``input_scale``) and must publish the hub layout inference engines load: every expert's
``w1``/``w2``/``w3`` with its own scales. transformers' own revert cannot do this (it cannot
chunk a 0-d scale and splits ``[E]`` vectors into junk names).

    python examples/revert_demo.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import convlens
from convlens.compiler.layout import RoleMeta, detect
from convlens.compiler.schemes import all_schemes
from convlens.runtime.dequant import dequantize
from convlens.runtime.dtypes import dtype_name

LAYERS, EXPERTS, HIDDEN, INTER = 2, 4, 64, 96


def nvfp4(g: torch.Generator, *shape: int) -> dict[str, torch.Tensor]:
    """One NVFP4 tensor set as ModelOpt exports it: packed FP4 bytes, FP8 block scales."""
    *lead, out, inp = shape
    return {"": torch.randint(0, 256, (*lead, out, inp // 2), generator=g, dtype=torch.uint8),
            "weight_scale": (torch.rand(*lead, out, inp // 16, generator=g) * 300 + 10).to(
                torch.float8_e4m3fn)}


def build_memory_layout() -> dict[str, torch.Tensor]:
    """A tiny Mixtral-style NVFP4 state dict in transformers' in-memory layout."""
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(128, HIDDEN, generator=g).bfloat16(),
          "lm_head.weight": torch.randn(128, HIDDEN, generator=g).bfloat16(),
          "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", HIDDEN), ("k_proj", 32), ("v_proj", 32), ("o_proj", HIDDEN)):
            t = nvfp4(g, rows, HIDDEN)
            sd[f"{p}.self_attn.{name}.weight"] = t[""]
            sd[f"{p}.self_attn.{name}.weight_scale"] = t["weight_scale"]
            sd[f"{p}.self_attn.{name}.weight_scale_2"] = torch.tensor(1e-3)
            sd[f"{p}.self_attn.{name}.input_scale"] = torch.tensor(0.02)
        sd[f"{p}.mlp.gate.weight"] = torch.randn(EXPERTS, HIDDEN, generator=g).bfloat16()
        for name, (out, inp) in (("gate_up_proj", (2 * INTER, HIDDEN)),
                                 ("down_proj", (HIDDEN, INTER))):
            t = nvfp4(g, EXPERTS, out, inp)
            stem = f"{p}.mlp.experts.{name}"
            sd[stem] = t[""]
            sd[f"{stem}_weight_scale"] = t["weight_scale"]
            sd[f"{stem}_weight_scale_2"] = torch.rand(EXPERTS, generator=g) * 1e-3
            sd[f"{stem}_input_scale"] = torch.tensor(0.03)
        sd[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    return sd


def logical(sd: dict[str, torch.Tensor], keys: dict[str, str]) -> torch.Tensor:
    """The dequantized weight of one stem (role -> key), with convlens' reference dequantizer."""
    tensors = {role: sd[key] for role, key in keys.items()}
    found = detect(all_schemes(), {r: RoleMeta(tuple(t.shape), dtype_name(t.dtype))
                                   for r, t in tensors.items()}, None)
    assert not isinstance(found, str), found
    return dequantize(found.scheme, tensors, {r: f.layout for r, f in found.roles.items()},
                      {r: f.view for r, f in found.roles.items()}, found.axes, found.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/out", help="where to write the checkpoints")
    out = Path(parser.parse_args().out)
    (out / "memory").mkdir(parents=True, exist_ok=True)
    (out / "hub").mkdir(parents=True, exist_ok=True)

    memory = build_memory_layout()
    save_file(memory, str(out / "memory" / "model.safetensors"))
    conv = convlens.load_rules("mixtral")
    print(f"rules: {conv.name} ({len(conv.program.rules)} rules; serves "
          f"{', '.join(conv.model_types)})\n")

    loaded = load_file(str(out / "memory" / "model.safetensors"))
    plan = conv.plan(convlens.api.metas_of(loaded), direction="revert")
    hub = conv.revert(loaded, copy=True)  # own memory per tensor, as save_file requires
    save_file(hub, str(out / "hub" / "model.safetensors"))

    print(f"{'in-memory key (input)':54} {'dtype[shape]':20} ->  hub keys (output)")
    by_input: dict[str, list[str]] = {}
    for key, sources in plan.key_map().items():
        for s in sources:
            by_input.setdefault(s, []).append(key)
    for key in sorted(k for k in loaded if k.startswith("model.layers.0.mlp")):
        outs = sorted(by_input[key])
        shown = outs[0] if len(outs) == 1 else f"{outs[0]}  (+{len(outs) - 1} more)"
        shape = f"{dtype_name(loaded[key].dtype)}{list(loaded[key].shape)}"
        print(f"{key:54} {shape:20} ->  {shown}")
    print(f"\n{len(loaded)} tensors in, {len(hub)} tensors out "
          f"({plan.output_bytes() / 1e6:.2f} MB), written to {out / 'hub'}")

    e = 2
    w1 = logical(hub, {r: f"model.layers.0.block_sparse_moe.experts.{e}.w1.{r}"
                       for r in ("weight", "weight_scale", "weight_scale_2", "input_scale")})
    stacked = logical(loaded, {"weight": "model.layers.0.mlp.experts.gate_up_proj",
                               **{r: f"model.layers.0.mlp.experts.gate_up_proj_{r}"
                                  for r in ("weight_scale", "weight_scale_2", "input_scale")}})
    same = torch.equal(w1, stacked[e, :INTER])
    print(f"dequantized hub expert {e} w1 == rows [:{INTER}] of the dequantized in-memory "
          f"gate_up_proj[{e}]: {same}")
    again = conv.apply(load_file(str(out / "hub" / "model.safetensors")))
    exact = set(again) == set(loaded) and all(
        torch.equal(again[k].view(torch.uint8) if again[k].dtype.itemsize == 1 else again[k],
                    loaded[k].view(torch.uint8) if loaded[k].dtype.itemsize == 1 else loaded[k])
        for k in loaded)
    print(f"apply(revert(x)) == x bit for bit: {exact}")
    if not (exact and same):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
