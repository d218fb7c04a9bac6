"""A conversion that could not fit in memory is refused before it writes anything.

Byte-range outputs (renames, stacks, splits, expert picks) need no tensor in memory; outputs
computed with torch (permutations, checks, lossy steps) need their inputs. If the largest such
group (times the workers that may compute at once) exceeds the memory the system has available,
the run stops with an error naming the tensor, instead of being killed by the OOM killer
halfway through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import convlens
import convlens.runtime.disk as disk
from convlens.checkpoint import convert_checkpoint
from convlens.runtime.safetensors_io import read_header

KEY = "model.language_model.layers.0.mlp.experts.gate_up_proj"


def _source(folder: Path) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    # qwen3_vl_moe keeps experts [E, H, 2I] on the hub: converting transposes (torch path)
    sd = {KEY: torch.randn(2, 16, 32, generator=g).bfloat16(),
          "model.language_model.layers.0.mlp.experts.down_proj":
          torch.randn(2, 16, 16, generator=g).bfloat16()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "qwen3_vl_moe"}')
    return folder


def test_the_largest_computed_group_is_known_from_the_plan(tmp_path: Path) -> None:
    conv = convlens.load_rules("qwen3_vl_moe")
    src = _source(tmp_path / "src")
    shard = read_header(src / "model.safetensors")
    metas = {k: convlens.TensorMeta(e.shape, e.dtype) for k, e in shard.entries.items()}
    need, key = disk.largest_computed(conv.plan(metas, direction="apply"))
    assert key == KEY and need == 3 * 2 * 16 * 32 * 2  # input once, twice its size on top


def test_a_conversion_that_cannot_fit_is_refused_before_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk, "available_memory", lambda: 4096)
    src = _source(tmp_path / "src")
    with pytest.raises(convlens.ConversionError, match="GiB are available") as info:
        convert_checkpoint(src, tmp_path / "dst", rules="qwen3_vl_moe", direction="apply")
    assert info.value.key == KEY
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_enough_memory_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk, "available_memory", lambda: 1 << 30)
    src = _source(tmp_path / "src")
    convert_checkpoint(src, tmp_path / "dst", rules="qwen3_vl_moe", direction="apply")
    assert (tmp_path / "dst" / "model.safetensors").exists()


def test_available_memory_reads_the_system() -> None:
    have = disk.available_memory()
    assert have is None or have > 0


def _imports_torch(src: Path, dst: Path, rules: str, direction: str) -> bool:
    """Convert in a fresh interpreter; whether torch got imported on the way."""
    code = ("import sys\n"
            "from convlens.checkpoint import convert_checkpoint\n"
            f"convert_checkpoint({str(src)!r}, {str(dst)!r}, rules={rules!r}, "
            f"direction={direction!r})\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-1] in ("True", "False"), out
    return out[-1] == "True"


def test_byte_copies_run_without_importing_torch(tmp_path: Path) -> None:
    # importing torch alone costs ~200 MB of resident memory: a conversion made only of byte
    # ranges (here mixtral's stack + concat) must not pay it, or the memory bound (2x the largest
    # computed group + 300 MB) is mostly spent before the first byte
    from test_checkpoint import model, write_ckpt

    hub, _ = model("bf16")
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    assert not _imports_torch(src, tmp_path / "mem", "mixtral", "apply")
    assert (tmp_path / "mem" / "model.safetensors").exists()
    # and an output that needs torch (qwen3_vl_moe transposes its experts) does import it
    assert _imports_torch(_source(tmp_path / "vl"), tmp_path / "vl-out", "qwen3_vl_moe", "apply")
