"""``fsync``: a converted folder is flushed to disk before it appears, only when asked.

Atomicity (DST complete or absent) never depends on fsync: the rename does it. Durability across
a power loss does, and costs about a second per 3 GB on the benchmark machine, so it is opt-in
(``--fsync``), like running ``sync`` after ``cp``. These tests count the fsync calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import convlens.runtime.disk as disk
from convlens.checkpoint import convert_checkpoint
from convlens.cli import main


def _source(folder: Path) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight":
          torch.randn(8, 16, generator=g).bfloat16() for e in range(2) for w in ("w1", "w2", "w3")}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "mixtral"}')
    return folder


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_no_fsync_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_fsyncs(monkeypatch)
    convert_checkpoint(_source(tmp_path / "src"), tmp_path / "dst", direction="apply")
    assert calls == []
    assert len(load_file(str(tmp_path / "dst" / "model.safetensors"))) == 2


def test_fsync_flushes_every_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             ) -> None:
    calls = _count_fsyncs(monkeypatch)
    kicked: list[Any] = []
    monkeypatch.setattr(disk, "WRITEBACK_EVERY", 1)  # start write-back after every tensor
    real = disk._start_writeback
    monkeypatch.setattr(disk, "_start_writeback",
                        lambda fd, at, n: (kicked.append(n), real(fd, at, n)))
    src = _source(tmp_path / "src")
    assert main(["apply", str(src), str(tmp_path / "dst"), "--fsync", "-q",
                 "--max-shard-size", "600"]) == 0
    shards = sorted((tmp_path / "dst").glob("*.safetensors"))
    assert len(shards) == 2
    # one per shard, one per other file (config, index), the temp folder, and DST's parent
    others = [p for p in (tmp_path / "dst").iterdir() if p.suffix != ".safetensors"]
    assert len(calls) == len(shards) + len(others) + 2
    assert kicked, "write-back was never started"
