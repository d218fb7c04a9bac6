"""Converting checkpoint folders on disk (convlens.checkpoint and ``convlens apply|revert``).

Every checkpoint here is built by hand, in both layouts, from the same per-expert tensors, so the
expected output of each direction is known independently of convlens. Outputs are read back
with a plain parser (8-byte length, JSON header, raw bytes) and compared byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import convlens
from convlens.checkpoint import convert_checkpoint
from convlens.cli import main
from convlens.runtime.report import RunReport

L, E, H, INTER = 2, 4, 64, 32  # layers, experts, hidden, intermediate
ROLES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
ST_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8",
            torch.float8_e4m3fn: "F8_E4M3"}
MIXTRAL_RULES = ["convlens/rules/mixtral.conv:8 rename", "convlens/rules/mixtral.conv:10 fuse",
                 "convlens/rules/mixtral.conv:14 fuse"]
MIXTRAL_INVERSE = ["convlens/rules/mixtral.conv:14 split (derived inverse)",
                   "convlens/rules/mixtral.conv:10 split (derived inverse)",
                   "convlens/rules/mixtral.conv:8 rename (derived inverse)"]
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "\\u00e9": 1}}}\n'

Raw = dict[str, tuple[str, tuple[int, ...], bytes]]


# --- building checkpoints -----------------------------------------------------------------------


def _nvfp4(g: torch.Generator, out: int, inp: int) -> dict[str, torch.Tensor]:
    """Packed FP4 bytes and FP8 block scales (one per 16 inputs), as ModelOpt exports them."""
    return {"weight": torch.randint(0, 256, (out, inp // 2), generator=g, dtype=torch.uint8),
            "weight_scale": (torch.rand(out, inp // 16, generator=g) * 300 + 10).to(
                torch.float8_e4m3fn)}


def _linear(g: torch.Generator, quant: str, out: int, inp: int, s2: float, act: float
            ) -> dict[str, torch.Tensor]:
    if quant == "bf16":
        return {"weight": torch.randn(out, inp, generator=g).bfloat16()}
    return {**_nvfp4(g, out, inp), "weight_scale_2": torch.tensor(s2),
            "input_scale": torch.tensor(act)}


def model(quant: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A tiny Mixtral in the hub layout and in transformers' in-memory layout, built by hand.

    NVFP4: w1 and w3 of an expert share weight_scale_2 (different per expert); every expert
    shares one input_scale per projection, as the fused in-memory layout requires."""
    g = torch.Generator().manual_seed(seed)
    hub: dict[str, torch.Tensor] = {}
    mem: dict[str, torch.Tensor] = {}
    common = {"model.embed_tokens.weight": torch.randn(128, H, generator=g).bfloat16(),
              "lm_head.weight": torch.randn(128, H, generator=g).bfloat16(),
              "model.norm.weight": torch.randn(H, generator=g).bfloat16()}
    for i in range(L):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", H), ("o_proj", H)):
            for role, t in _linear(g, quant, rows, H, 1e-3 * (i + 1), 0.02).items():
                common[f"{p}.self_attn.{name}.{role}"] = t
        common[f"{p}.input_layernorm.weight"] = torch.randn(H, generator=g).bfloat16()
        common[f"{p}.post_attention_layernorm.weight"] = torch.randn(H, generator=g).bfloat16()
        gate = torch.randn(E, H, generator=g).bfloat16()
        hub[f"{p}.block_sparse_moe.gate.weight"] = gate
        mem[f"{p}.mlp.gate.weight"] = gate
        experts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for e in range(E):
            s2 = float(torch.rand(1, generator=g)) * 1e-3 + 1e-4
            experts[e, "w1"] = _linear(g, quant, INTER, H, s2, 0.03)
            experts[e, "w3"] = _linear(g, quant, INTER, H, s2, 0.03)
            experts[e, "w2"] = _linear(g, quant, H, INTER, s2 * 2, 0.05)
            for w in ("w1", "w2", "w3"):
                for role, t in experts[e, w].items():
                    hub[f"{p}.block_sparse_moe.experts.{e}.{w}.{role}"] = t
        for stem, parts in (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))):
            for role in experts[0, parts[0]]:
                key = f"{p}.mlp.experts.{stem}" + ("" if role == "weight" else f"_{role}")
                if role == "input_scale":  # one for every expert
                    mem[key] = experts[0, parts[0]][role].clone()
                elif role == "weight_scale_2":  # one per expert (gate and up share it)
                    mem[key] = torch.stack([experts[e, parts[0]][role] for e in range(E)])
                else:  # stacked over experts, gate and up concatenated along the rows
                    mem[key] = torch.stack([torch.cat([experts[e, w][role] for w in parts])
                                            for e in range(E)])
    hub.update(common)
    mem.update(common)
    return hub, mem


def config(layout: str, quant: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                           "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": L,
                           "num_local_experts": E, "torch_dtype": "bfloat16"}
    if quant == "nvfp4":
        moe = "block_sparse_moe" if layout == "hub" else "mlp"
        cfg["quantization_config"] = {
            "quant_method": "modelopt", "quant_algo": "NVFP4",
            "ignore": ["lm_head"] + [f"model.layers.{i}.{moe}.gate" for i in range(L)]}
    return cfg


def hf_quant_config(layout: str) -> dict[str, Any]:
    moe = "block_sparse_moe" if layout == "hub" else "mlp"
    return {"producer": {"name": "modelopt", "version": "0.29.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                             "group_size": 16, "exclude_modules": ["lm_head"] + [
                                 f"model.layers.{i}.{moe}.gate" for i in range(L)]}}


def write_ckpt(folder: Path, sd: dict[str, torch.Tensor], layout: str, quant: str,
               shards: list[list[str]] | None = None, metadata: dict[str, str] | None = None
               ) -> Path:
    """``sd`` as model.safetensors, or as the given shards with an index; plus config.json,
    hf_quant_config.json (NVFP4), tokenizer.json and a nested file."""
    folder.mkdir(parents=True)
    if shards is None:
        save_file(sd, str(folder / "model.safetensors"), metadata=metadata)
    else:
        assert sorted(k for s in shards for k in s) == sorted(sd)
        weight_map = {}
        for n, keys in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: sd[k] for k in keys}, str(folder / name), metadata=metadata)
            weight_map.update(dict.fromkeys(keys, name))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config(layout, quant), indent=2))
    if quant == "nvfp4":
        (folder / "hf_quant_config.json").write_text(json.dumps(hf_quant_config(layout)))
    (folder / "tokenizer.json").write_bytes(TOKENIZER)
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_bytes(b'{"dim": 64}')
    return folder


def spanning_shards(hub: dict[str, torch.Tensor]) -> list[list[str]]:
    """Two shards: every expert's w1 in the first, its w3 (and w2) in the second, so each fused
    gate_up group spans both files."""
    first = [k for k in hub
             if ".w1." in k or (k.startswith("model.layers.0.") and "experts" not in k)]
    return [first, [k for k in hub if k not in first]]


# --- reading them back (no convlens code) ---------------------------------------------------------


def header(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def read_raw(folder: Path) -> Raw:
    """Every tensor of every *.safetensors file in ``folder``: dtype, shape, raw bytes."""
    out: Raw = {}
    for path in sorted(folder.glob("*.safetensors")):
        head, base = header(path)
        head.pop("__metadata__", None)
        data = path.read_bytes()
        for key, info in head.items():
            assert key not in out, f"{key} in two output shards"
            begin, end = info["data_offsets"]
            out[key] = (info["dtype"], tuple(info["shape"]), data[base + begin:base + end])
    return out


def raw_of(sd: dict[str, torch.Tensor]) -> Raw:
    return {k: (ST_DTYPE[t.dtype], tuple(t.shape),
                t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            for k, t in sd.items()}


def assert_same_raw(got: Raw, want: Raw) -> None:
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5],
                                   sorted(set(want) - set(got))[:5])
    bad = [k for k in want if got[k] != want[k]]
    assert not bad, f"{len(bad)} tensor(s) differ, e.g. {bad[:3]}"


def provenance(path: Path) -> dict[str, Any]:
    head, _ = header(path)
    return json.loads(head["__metadata__"]["convlens"])


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), and every directory."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = "dir"
        for name in files:
            path = os.path.join(root, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            out[os.path.relpath(path, folder)] = h.hexdigest()
    return out


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def temp_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".convlens-" in p.name)


def cli(*argv: str | Path) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse reports usage errors by exiting with 2
        return int(exc.code or 0)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["bf16", "nvfp4"])
def test_revert_then_apply_gives_back_every_byte(tmp_path: Path, quant: str) -> None:
    hub, mem = model(quant)
    src = write_ckpt(tmp_path / "mem", mem, "mem", quant)
    before = snapshot(src)

    r1 = convert_checkpoint(src, tmp_path / "hub", direction="revert")
    assert_same_raw(read_raw(tmp_path / "hub"), raw_of(hub))
    assert (r1.conversion, r1.direction, r1.tensors_in, r1.tensors_out) == (
        "mixtral", "revert", len(mem), len(hub))
    r2 = convert_checkpoint(tmp_path / "hub", tmp_path / "back", direction="apply")
    assert r2.selected_by == "provenance (undoing exactly the recorded rules)"
    back = tmp_path / "back"
    assert_same_raw(read_raw(back), raw_of(mem))

    assert entries(back) == entries(src)
    assert json.loads((back / "config.json").read_text()) == config("mem", quant)
    if quant == "nvfp4":
        assert json.loads((back / "hf_quant_config.json").read_text()) == hf_quant_config("mem")
    for out in (tmp_path / "hub", back):
        assert (out / "tokenizer.json").read_bytes() == TOKENIZER
        assert (out / "original" / "params.json").read_bytes() == b'{"dim": 64}'
    assert snapshot(src) == before
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("quant", ["bf16", "nvfp4"])
def test_apply_then_revert_gives_back_every_byte(tmp_path: Path, quant: str) -> None:
    hub, mem = model(quant, seed=1)
    src = write_ckpt(tmp_path / "hub", hub, "hub", quant, shards=spanning_shards(hub))
    before = snapshot(src)

    convert_checkpoint(src, tmp_path / "mem", direction="apply")
    assert_same_raw(read_raw(tmp_path / "mem"), raw_of(mem))
    convert_checkpoint(tmp_path / "mem", tmp_path / "back", direction="revert")
    back = tmp_path / "back"
    assert_same_raw(read_raw(back), raw_of(hub))

    assert json.loads((back / "config.json").read_text()) == config("hub", quant)
    if quant == "nvfp4":
        assert json.loads((back / "hf_quant_config.json").read_text()) == hf_quant_config("hub")
    assert (back / "tokenizer.json").read_bytes() == TOKENIZER
    assert snapshot(src) == before


def test_disk_matches_the_in_memory_api(tmp_path: Path) -> None:
    """The disk runtime (byte-range copies) and the in-memory executor agree bit for bit."""
    hub, mem = model("nvfp4", seed=2)
    conv = convlens.load_rules("mixtral")
    write_ckpt(tmp_path / "hub", hub, "hub", "nvfp4", shards=spanning_shards(hub))
    convert_checkpoint(tmp_path / "hub", tmp_path / "mem", rules="mixtral", direction="apply")
    assert_same_raw(read_raw(tmp_path / "mem"), raw_of(conv.apply(hub, copy=True)))
    write_ckpt(tmp_path / "mem0", mem, "mem", "nvfp4")
    convert_checkpoint(tmp_path / "mem0", tmp_path / "hub1", rules="mixtral",
                       direction="revert", max_shard_size="20KB")
    assert_same_raw(read_raw(tmp_path / "hub1"), raw_of(conv.revert(mem, copy=True)))


# --- sharding -----------------------------------------------------------------------------------


def test_groups_spanning_input_shards_and_small_output_shards(tmp_path: Path,
                                                              capsys: Any) -> None:
    hub, mem = model("nvfp4", seed=3)
    shards = spanning_shards(hub)
    assert any(".w1." in k for k in shards[0]) and not any(".w3." in k for k in shards[0])
    src = write_ckpt(tmp_path / "hub", hub, "hub", "nvfp4", shards=shards)

    assert cli("apply", src, tmp_path / "dry", "--max-shard-size", "20KB", "--dry-run") == 0
    dry = capsys.readouterr().out
    assert cli("apply", src, tmp_path / "out", "--max-shard-size", "20KB", "--workers", "1",
               "-q") == 0
    out = tmp_path / "out"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 3
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert f" in {n} shard(s)" in dry

    index = json.loads((out / "model.safetensors.index.json").read_text())
    raw = read_raw(out)
    assert_same_raw(raw, raw_of(mem))
    assert set(index["weight_map"]) == set(raw) == set(mem)
    assert set(index["weight_map"].values()) == set(files)
    for name in files:
        keys = {k for k, v in index["weight_map"].items() if v == name}
        head, _ = header(out / name)
        head.pop("__metadata__")
        assert set(head) == keys, name
        with safe_open(str(out / name), framework="pt") as f:  # the reference reader agrees
            assert set(f.keys()) == keys
    assert index["metadata"]["total_size"] == sum(len(b) for _, _, b in raw.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in mem.values())

    # several workers write the very same files
    assert cli("apply", src, tmp_path / "par", "--max-shard-size", "20KB", "--workers", "2",
               "-q") == 0
    assert snapshot(tmp_path / "par") == snapshot(out)


def test_single_shard_output_is_model_safetensors_without_index(tmp_path: Path) -> None:
    hub, mem = model("nvfp4", seed=4)
    src = write_ckpt(tmp_path / "hub", hub, "hub", "nvfp4", shards=spanning_shards(hub))
    report = convert_checkpoint(src, tmp_path / "out", direction="apply")
    assert report.shards == 1
    assert entries(tmp_path / "out") == ["config.json", "hf_quant_config.json",
                                         "model.safetensors", "original", "tokenizer.json"]
    assert_same_raw(read_raw(tmp_path / "out"), raw_of(mem))


# --- dry run, failures, existing destinations ---------------------------------------------


def test_dry_run_writes_nothing_and_summarises(tmp_path: Path, capsys: Any) -> None:
    hub, _ = model("nvfp4", seed=5)
    src = write_ckpt(tmp_path / "hub", hub, "hub", "nvfp4")
    before, listing = snapshot(src), entries(tmp_path)
    assert cli("apply", src, tmp_path / "dst", "--dry-run", "--max-shard-size", "20KB") == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "dst").exists()
    assert entries(tmp_path) == listing  # no temporary folder either
    assert snapshot(src) == before

    lines = out.splitlines()
    assert lines[0] == f"apply mixtral (architecture MixtralForCausalLM): {src} -> (dry run)"
    for label in MIXTRAL_RULES:
        assert any(line.endswith(f"tensors made by {label} (intermediate ones included)")
                   for line in lines), label
    untouched = [k for k in hub if "block_sparse_moe" not in k]
    assert f"{len(untouched):8} passed through unchanged" in out
    n = convert_checkpoint(src, None, direction="apply", max_shard_size="20KB",
                           dry_run=True).shards
    assert n > 1 and f" in {n} shard(s)" in lines[1]
    assert "wrote" not in out


def _missing_expert(tmp_path: Path) -> tuple[Path, str, str]:
    hub, _ = model("nvfp4")
    hub = {k: v for k, v in hub.items() if ".experts.2.w1." not in k}
    return (write_ckpt(tmp_path / "src", hub, "hub", "nvfp4"), "apply",
            "stack(e): '{layer*}.mlp.experts.{e:int}.w1' has e = 0-1, 3 but not 2; indices "
            "must be exactly 0..3 (group layer=model.layers.0)")


def _already_applied(tmp_path: Path) -> tuple[Path, str, str]:
    _, mem = model("nvfp4")  # no provenance: found from the keys
    return (write_ckpt(tmp_path / "src", mem, "mem", "nvfp4"), "apply",
            "mixtral: the result would not map back to the input; these input keys are "
            "already in the converted layout")


def _already_reverted(tmp_path: Path) -> tuple[Path, str, str]:
    hub, _ = model("bf16")
    return (write_ckpt(tmp_path / "src", hub, "hub", "bf16"), "revert",
            "mixtral: the result would not map back to the input; these input keys are "
            "already in the converted layout")


@pytest.mark.parametrize("make", [_missing_expert, _already_applied, _already_reverted])
def test_failing_plan_writes_nothing(tmp_path: Path, capsys: Any, make: Any) -> None:
    src, direction, message = make(tmp_path)
    before, listing = snapshot(src), entries(tmp_path)
    assert cli(direction, src, tmp_path / "dst", "-q") == 1
    assert message in capsys.readouterr().err
    with pytest.raises(convlens.ConversionError) as info:
        convert_checkpoint(src, tmp_path / "dst", direction=direction)
    assert message in str(info.value)
    assert not (tmp_path / "dst").exists()
    assert entries(tmp_path) == listing
    assert snapshot(src) == before


def test_failure_while_writing_leaves_nothing(tmp_path: Path) -> None:
    """Values are only checked while writing (input scales every expert must share): the error
    comes after the temporary folder exists, and the folder goes."""
    hub, _ = model("nvfp4")
    hub["model.layers.1.block_sparse_moe.experts.3.w3.input_scale"] = torch.tensor(0.5)
    src = write_ckpt(tmp_path / "src", hub, "hub", "nvfp4", shards=spanning_shards(hub))
    before, listing = snapshot(src), entries(tmp_path)
    with pytest.raises(convlens.ConversionError, match="bit for bit") as info:
        convert_checkpoint(src, tmp_path / "dst", direction="apply", max_shard_size="20KB")
    assert "model.layers.1.block_sparse_moe.experts.3.w3.input_scale" in str(info.value)
    assert not (tmp_path / "dst").exists()
    assert entries(tmp_path) == listing
    assert snapshot(src) == before


def test_existing_dst_is_refused_without_force_and_replaced_with_force(tmp_path: Path,
                                                                         capsys: Any) -> None:
    hub, mem = model("bf16")
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    before = snapshot(dst)
    assert cli("apply", src, dst, "-q") == 1
    assert f"{dst} exists; pass --force to replace it" in capsys.readouterr().err
    assert snapshot(dst) == before
    assert temp_leftovers(tmp_path) == []

    assert cli("apply", src, dst, "-q", "--force") == 0
    assert not (dst / "keep.txt").exists()
    assert_same_raw(read_raw(dst), raw_of(mem))
    assert temp_leftovers(tmp_path) == []


def test_src_is_never_modified(tmp_path: Path, capsys: Any) -> None:
    hub, _ = model("nvfp4", seed=6)
    src = write_ckpt(tmp_path / "hub", hub, "hub", "nvfp4", shards=spanning_shards(hub))
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    before = snapshot(src)
    stat = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    assert cli("apply", src, tmp_path / "a", "--dry-run") == 0
    assert cli("apply", src, tmp_path / "a", "-q", "--max-shard-size", "20KB") == 0
    assert cli("apply", src, tmp_path / "a", "-q", "--force") == 0
    assert cli("revert", src, tmp_path / "b", "-q") == 1  # already in the hub layout
    capsys.readouterr()
    assert snapshot(src) == before
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == stat


# --- interruptions ------------------------------------------------------------------------------

BIG_E, BIG_H, BIG_I, BIG_L = 4, 1024, 2048, 4  # 192 MB of bf16 experts


def write_big(folder: Path) -> int:
    """A ~200 MB in-memory-layout checkpoint of zeros, written as a sparse file (instant)."""
    folder.mkdir()
    header_: dict[str, Any] = {}
    offset = 0
    shapes = {"model.embed_tokens.weight": [128, BIG_H]}
    for i in range(BIG_L):
        shapes[f"model.layers.{i}.mlp.experts.gate_up_proj"] = [BIG_E, 2 * BIG_I, BIG_H]
        shapes[f"model.layers.{i}.mlp.experts.down_proj"] = [BIG_E, BIG_H, BIG_I]
    for key, shape in shapes.items():
        n = 2 * shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1)
        header_[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header_).encode()
    raw += b" " * (-len(raw) % 8)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps(config("mem", "bf16")))
    return 1 + 3 * BIG_E * BIG_L  # tensors after revert


def start_cli(tmp_path: Path, src: Path, dst: Path, *extra: str
              ) -> tuple[subprocess.Popen[bytes], Path]:
    """``convlens revert`` in a subprocess, returned once it has begun writing a shard."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "convlens.cli", "revert", "--rules", "mixtral", str(src), str(dst),
         "--workers", "1", "--max-shard-size", "20MB", "-q", *extra], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def started() -> Path | None:  # the run's folder: .{dst}.convlens-tmp-{pid}-{token}
        found = list(dst.parent.glob(f".{dst.name}.convlens-tmp-{proc.pid}-*"))
        return found[0] if found and any(found[0].glob("*.safetensors")) else None

    deadline = time.monotonic() + 60
    while started() is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the run ended before it could be interrupted: {proc.returncode} "
                        f"{err.decode()[-2000:]}")
        time.sleep(0.002)
    tmp = started()
    assert tmp is not None
    return proc, tmp


def test_interrupted_runs_leave_no_destination(tmp_path: Path) -> None:
    src = tmp_path / "big"
    tensors_out = write_big(src)
    before = snapshot(src)

    # SIGKILL: nothing can clean up; dst must still not exist, the next run removes the rest
    dst = tmp_path / "out"
    proc, tmp = start_cli(tmp_path, src, dst)
    proc.kill()
    proc.communicate()  # reaped: its pid is no longer alive
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_dir(), "the run was killed before it finished writing"
    assert not dst.exists()
    assert snapshot(src) == before

    report = convert_checkpoint(src, dst, direction="revert", max_shard_size="20MB")
    assert not tmp.exists(), "the stale temporary folder was not cleaned"
    assert temp_leftovers(tmp_path) == []
    assert report.tensors_out == tensors_out
    files = sorted(dst.glob("*.safetensors"))
    assert len(files) == report.shards > 1
    assert sum(len(header(f)[0]) - 1 for f in files) == tensors_out
    assert sum(f.stat().st_size - header(f)[1] for f in files) == report.bytes_out

    # SIGINT (KeyboardInterrupt): the run removes its own temporary folder
    dst2 = tmp_path / "out2"
    proc, tmp = start_cli(tmp_path, src, dst2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in err
    assert not tmp.exists()
    assert not dst2.exists()
    assert temp_leftovers(tmp_path) == []
    assert snapshot(src) == before


def test_keyboard_interrupt_in_process_removes_the_temporary_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import convlens.runtime.disk as disk

    hub, _ = model("bf16")
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    real = disk.write_piece
    written: list[Path] = []

    def interrupted(piece: Any, *args: Any) -> None:
        real(piece, *args)
        written.append(piece.path)
        raise KeyboardInterrupt

    monkeypatch.setattr(disk, "write_piece", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, tmp_path / "dst", direction="apply", max_shard_size="20KB",
                           workers=1)
    assert len(written) == 1 and ".convlens-tmp-" in written[0].parent.name
    assert not written[0].parent.exists()
    assert not (tmp_path / "dst").exists()
    assert temp_leftovers(tmp_path) == []


# --- provenance ---------------------------------------------------------------------------------


def test_provenance_is_recorded_in_every_shard(tmp_path: Path) -> None:
    _, mem = model("nvfp4")
    src = write_ckpt(tmp_path / "mem", mem, "mem", "nvfp4")
    convert_checkpoint(src, tmp_path / "hub", direction="revert", max_shard_size="20KB")
    files = sorted((tmp_path / "hub").glob("*.safetensors"))
    assert len(files) > 1
    for f in files:
        assert provenance(f) == {"conversion": "mixtral", "direction": "revert",
                                 "fired": [0, 1, 2], "policies": [], "rules": MIXTRAL_INVERSE,
                                 "version": convlens.__version__}
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata()["format"] == "pt"


def test_revert_without_rules_takes_the_conversion_from_provenance(tmp_path: Path) -> None:
    hub, _ = model("bf16")
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    (src / "config.json").write_text(json.dumps({"model_type": "not_served"}))
    with pytest.raises(convlens.ConversionError, match="no shipped conversion serves"):
        convert_checkpoint(src, tmp_path / "mem", direction="apply")
    applied = convert_checkpoint(src, tmp_path / "mem", rules="mixtral", direction="apply")
    assert applied.selected_by == "--rules mixtral"
    assert provenance(tmp_path / "mem" / "model.safetensors")["direction"] == "apply"

    report = convert_checkpoint(tmp_path / "mem", tmp_path / "back", direction="revert")
    assert report.conversion == "mixtral"
    assert report.selected_by == "provenance (undoing exactly the recorded rules)"
    assert list(report.per_rule) == MIXTRAL_INVERSE
    assert_same_raw(read_raw(tmp_path / "back"), raw_of(hub))


def test_revert_undoes_exactly_the_recorded_rules(tmp_path: Path) -> None:
    """A checkpoint whose provenance says only the rename fired: revert renames back and does
    not split the stacked experts (which a full revert would)."""
    _, mem = model("bf16")
    recorded = {"conversion": "mixtral", "direction": "apply", "fired": [0],
                "rules": MIXTRAL_RULES[:1], "policies": [], "version": "0.1.0"}
    src = write_ckpt(tmp_path / "src", mem, "mem", "bf16",
                     metadata={"format": "pt", "convlens": json.dumps(recorded)})
    report = convert_checkpoint(src, tmp_path / "out", direction="revert")
    assert list(report.per_rule) == ["convlens/rules/mixtral.conv:8 rename (derived inverse)"]
    want = {k.replace(".mlp.", ".block_sparse_moe."): t for k, t in mem.items()}
    assert_same_raw(read_raw(tmp_path / "out"), raw_of(want))
    assert provenance(tmp_path / "out" / "model.safetensors")["fired"] == [0]

    full = convert_checkpoint(src, tmp_path / "full", rules="mixtral", direction="revert",
                              dry_run=True)
    assert full.tensors_out == report.tensors_out  # same rules: --rules mixtral is the same name
    # without provenance the whole conversion runs and splits the experts
    plain = write_ckpt(tmp_path / "plain", mem, "mem", "bf16")
    assert convert_checkpoint(plain, None, direction="revert",
                              dry_run=True).tensors_out > report.tensors_out


@pytest.mark.parametrize("direction,first", [("apply", "hub"), ("revert", "mem")])
def test_converting_twice_is_refused(tmp_path: Path, capsys: Any, direction: str,
                                     first: str) -> None:
    hub, mem = model("bf16")
    src = write_ckpt(tmp_path / "src", hub if first == "hub" else mem, first, "bf16")
    convert_checkpoint(src, tmp_path / "once", direction=direction)  # type: ignore[arg-type]
    before, listing = snapshot(tmp_path / "once"), entries(tmp_path)
    assert cli(direction, tmp_path / "once", tmp_path / "twice", "-q") == 1
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'once'} was written by convlens {direction} mixtral already; "
            f"{direction} again would convert it twice") in err
    assert cli(direction, "--rules", "mixtral", tmp_path / "once", tmp_path / "twice") == 1
    assert "would convert it twice" in capsys.readouterr().err
    assert entries(tmp_path) == listing
    assert snapshot(tmp_path / "once") == before


@pytest.mark.parametrize("recorded", [{"direction": "apply"},
                                      {"conversion": "mixtral", "direction": "apply",
                                       "fired": ["x"]},
                                      {"conversion": "mixtral", "direction": "apply",
                                       "fired": 5}])
def test_malformed_provenance_is_a_conversion_error(tmp_path: Path,
                                                    recorded: dict[str, Any]) -> None:
    _, mem = model("bf16")
    src = write_ckpt(tmp_path / "src", mem, "mem", "bf16",
                     metadata={"convlens": json.dumps(recorded)})
    with pytest.raises(convlens.ConversionError, match="provenance"):
        convert_checkpoint(src, tmp_path / "out", direction="revert")
    assert not (tmp_path / "out").exists()


# --- lossy policies -----------------------------------------------------------------------------

GATE_UP = 'conversion gateup\nfuse "{p*}.w1", "{p*}.w3" -> "{p*}.gate_up_proj" by concat(0)\n'


def lossy_src(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    rules = tmp_path / "gateup.conv"
    rules.write_text(GATE_UP)
    g = torch.Generator().manual_seed(7)
    sd = {"model.norm.weight": torch.randn(H, generator=g).bfloat16()}
    for w, s2, act in (("w1", 0.01, 0.5), ("w3", 0.03, 0.7)):  # ratio 1/3: rescale rounds
        for role, t in _linear(g, "nvfp4", INTER, H, s2, act).items():
            sd[f"model.layers.0.block_sparse_moe.experts.0.{w}.{role}"] = t
    return write_ckpt(tmp_path / "src", sd, "hub", "nvfp4"), rules, sd


def test_lossy_policies_are_recorded_and_reported(tmp_path: Path, capsys: Any) -> None:
    src, rules, sd = lossy_src(tmp_path)
    listing = entries(tmp_path)
    assert cli("apply", "--rules", rules, src, tmp_path / "exact", "-q") == 1
    err = capsys.readouterr().err
    assert "must equal" in err and "bit for bit" in err and "rescale" in err
    assert entries(tmp_path) == listing

    assert cli("apply", "--rules", rules, "--lossy", "rescale,max", src, tmp_path / "out",
               "--workers", "1") == 0
    out = capsys.readouterr().out
    stem = "model.layers.0.block_sparse_moe.experts.0"
    assert (f"  lossy: {stem}.gate_up_proj.weight_scale: rescale weight_scale "
            f"({rules}:2 fuse)") in out
    assert (f"  lossy: {stem}.gate_up_proj.weight_scale_2: reconcile weight_scale_2 "
            f"({rules}:2 fuse)") in out
    assert f"  lossy step taken: rescale weight_scale of {stem}.w1.weight_scale" in out
    assert "without compensation it would be 0.667" in out
    assert f"  lossy step taken: reconcile (max) input_scale of {stem}.w1.input_scale" in out

    recorded = provenance(tmp_path / "out" / "model.safetensors")
    assert recorded["policies"] == ["max", "rescale"]
    assert (recorded["conversion"], recorded["direction"], recorded["fired"]) == (
        "gateup", "apply", [0])
    assert recorded["rules"] == [f"{rules}:2 fuse"]
    want = convlens.load_rules(rules).apply(sd, policies=["rescale", "max"], copy=True)
    assert_same_raw(read_raw(tmp_path / "out"), raw_of(want))
    assert float(want[f"{stem}.gate_up_proj.weight_scale_2"]) == pytest.approx(0.03)


def test_lossy_steps_on_disk_are_reported_once_like_in_memory(tmp_path: Path) -> None:
    src, rules, sd = lossy_src(tmp_path)
    report = convert_checkpoint(src, tmp_path / "out", rules=rules, direction="apply",
                                policies=["rescale", "max"])
    memory = RunReport()
    convlens.load_rules(rules).apply(sd, policies=["rescale", "max"], report=memory)
    assert sorted(report.lossy) == sorted(memory.lines())


# --- smaller edges ------------------------------------------------------------------------------


def test_missing_dst_is_a_usage_error(tmp_path: Path) -> None:
    hub, _ = model("bf16")
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    assert cli("apply", src, "-q") == 2


def test_force_over_a_file_leaves_nothing_behind(tmp_path: Path) -> None:
    hub, _ = model("bf16")
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    (tmp_path / "dst").write_text("a file")
    convert_checkpoint(src, tmp_path / "dst", direction="apply", force=True)
    assert (tmp_path / "dst" / "model.safetensors").is_file()
    assert temp_leftovers(tmp_path) == []


def test_stale_temporary_folders_are_cleaned_for_any_name(tmp_path: Path) -> None:
    hub, _ = model("bf16")
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    stale = tmp_path / ".out[1].convlens-tmp-999999999"  # a pid that cannot be alive
    stale.mkdir()
    convert_checkpoint(src, tmp_path / "out[1]", direction="apply")
    assert not stale.exists()
