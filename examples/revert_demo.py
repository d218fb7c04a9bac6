"""Revert a small checkpoint from transformers' in-memory layout to the hub layout.

This is what a quantizer's export needs: it holds the model's state dict with in-memory names
(experts stacked into 3-D ``gate_up_proj`` / ``down_proj``), and must publish the names and
layout that inference engines load (one 2-D ``w1``/``w2``/``w3`` per expert).

    python examples/revert_demo.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import convlens

LAYERS, EXPERTS, HIDDEN, INTER = 2, 4, 64, 96


def build_memory_layout() -> dict[str, torch.Tensor]:
    """A tiny Mixtral-style state dict as transformers keeps it in memory."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rand(128, HIDDEN), "lm_head.weight": rand(128, HIDDEN),
          "model.norm.weight": rand(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", HIDDEN), ("k_proj", 32), ("v_proj", 32), ("o_proj", HIDDEN)):
            sd[f"{p}.self_attn.{name}.weight"] = rand(rows, HIDDEN)
        sd[f"{p}.mlp.gate.weight"] = rand(EXPERTS, HIDDEN)
        sd[f"{p}.mlp.experts.gate_up_proj"] = rand(EXPERTS, 2 * INTER, HIDDEN)
        sd[f"{p}.mlp.experts.down_proj"] = rand(EXPERTS, HIDDEN, INTER)
        sd[f"{p}.input_layernorm.weight"] = rand(HIDDEN)
        sd[f"{p}.post_attention_layernorm.weight"] = rand(HIDDEN)
    return sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/out", help="where to write the checkpoints")
    out = Path(parser.parse_args().out)
    (out / "memory").mkdir(parents=True, exist_ok=True)
    (out / "hub").mkdir(parents=True, exist_ok=True)

    memory = build_memory_layout()
    save_file(memory, str(out / "memory" / "model.safetensors"))
    conv = convlens.load_rules("mixtral")
    print(f"rules: {conv.name} ({len(conv.program.rules)} rules, serves "
          f"{', '.join(conv.model_types)})\n")

    loaded = load_file(str(out / "memory" / "model.safetensors"))
    plan = conv.plan(convlens.api.metas_of(loaded), direction="revert")
    hub = {k: t.contiguous() for k, t in conv.revert(loaded).items()}
    save_file(hub, str(out / "hub" / "model.safetensors"))

    print(f"{'in-memory key (input)':52} {'shape':>14}   ->  hub keys (output)")
    by_input: dict[str, list[str]] = {}
    for key, sources in plan.key_map().items():
        for s in sources:
            by_input.setdefault(s, []).append(key)
    for key in [k for k in loaded if k.startswith("model.layers.0.")]:
        outs = by_input[key]
        shown = outs[0] if len(outs) == 1 else f"{outs[0]}  (+{len(outs) - 1} more)"
        print(f"{key:52} {list(loaded[key].shape)!s:>14}   ->  {shown}")
    print(f"\n{len(loaded)} tensors in, {len(hub)} tensors out "
          f"({plan.output_bytes() / 1e6:.1f} MB), written to {out / 'hub'}")

    again = conv.apply(load_file(str(out / "hub" / "model.safetensors")))
    exact = set(again) == set(loaded) and all(torch.equal(again[k], loaded[k]) for k in loaded)
    print(f"apply(revert(x)) == x bit for bit: {exact}")
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
