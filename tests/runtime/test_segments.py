"""Byte-range gathers: which outputs are copied as byte ranges, and that the ranges hold the
bytes torch computes.

The writer copies an output as byte ranges whenever ``segments`` finds them and evaluates it with
torch otherwise; it no longer asks ``_needs_torch`` first. So ``segments`` must answer None for
every node whose value depends on the data (checks, lossy steps, permutations, packing), and the
ranges it does answer must read back as exactly the bytes the torch path makes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_checkpoint import model, write_ckpt
from test_resource_bounds import _source

import convlens
import convlens.runtime.disk as disk
from convlens.compiler.planner import TensorMeta
from convlens.runtime.safetensors_io import open_checkpoint

CASES = [("mixtral", "apply", "bf16"), ("mixtral", "apply", "nvfp4"),
         ("mixtral", "revert", "bf16"), ("mixtral", "revert", "nvfp4"),
         ("qwen3_vl_moe", "apply", "")]


@pytest.mark.parametrize(("rules", "direction", "quant"), CASES)
def test_segments_exist_exactly_when_no_torch_is_needed_and_hold_the_computed_bytes(
        tmp_path: Path, rules: str, direction: str, quant: str) -> None:
    if rules == "qwen3_vl_moe":
        src = _source(tmp_path / "src")
    else:
        hub, mem = model(quant)
        sd, layout = (hub, "hub") if direction == "apply" else (mem, "mem")
        src = write_ckpt(tmp_path / "src", sd, layout, quant)
    ckpt = open_checkpoint(src)
    metas = {k: TensorMeta(e.shape, e.dtype) for s in ckpt.shards for k, e in s.entries.items()}
    conv = convlens.load_rules(rules)
    plan = conv.plan(metas, {}, direction=direction)
    reader = disk._Reader()
    memo: dict[int, object] = {}
    kinds = set()
    try:
        for key, node in plan.outputs.items():
            segs = disk.segments(node, ckpt, memo)
            assert (segs is None) == disk._needs_torch(node), key
            kinds.add(segs is None)
            computed = bytes(disk._tensor_bytes(disk._compute(key, node, plan, ckpt, reader,
                                                              None)))
            if segs is not None:
                copied = b"".join(bytes(reader.read(p, off, n)) for p, off, n in segs)
                assert copied == computed, key
    finally:
        reader.close()
    # the cases cover both paths: byte copies (mixtral's stacks, concats and expert picks) and
    # torch (qwen3_vl_moe's transpose; the check that NVFP4 experts share one input_scale)
    computed = rules == "qwen3_vl_moe" or (quant, direction) == ("nvfp4", "apply")
    assert (True in kinds) == computed, kinds
    assert (False in kinds) == (rules == "mixtral"), kinds
