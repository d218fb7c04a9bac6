"""Fault injection into checkpoint conversion (issue 7).

A disk that fills up after N bytes (ENOSPC from every way convlens/runtime/disk.py writes: the
header through ``write_all``, tensor bytes through ``os.pwrite``), a source whose Nth read fails
(EIO from ``os.preadv``, which every byte-range copy and torch input goes through), and a
process killed with
SIGKILL in the middle of a run. After each: the source is byte-identical (every file hashed),
the destination is absent (or, with ``force=True``, the previous one is intact), the temporary
folder is gone or removed by the next run, and a rerun without the fault succeeds with the
expected bytes.

The faults are injected by replacing ``disk.os`` (the module object disk.py calls) with a proxy,
so nothing else in the process (pytest, other threads) sees them.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_checkpoint import (
    assert_same_raw,
    model,
    raw_of,
    read_raw,
    snapshot,
    spanning_shards,
    start_cli,
    temp_leftovers,
    write_big,
    write_ckpt,
)

import convlens.runtime.disk as disk
from convlens.checkpoint import clean_stale, convert_checkpoint


class FaultyOS:
    """``os`` as disk.py sees it, with a byte budget for writes and a count of reads."""

    def __init__(self, write_budget: int | None = None, fail_read: int | None = None) -> None:
        self.write_budget = write_budget
        self.fail_read = fail_read
        self.written = 0
        self.reads = 0
        self.fired: list[str] = []
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _spend(self, n: int, what: str) -> int:
        """How many of ``n`` bytes may still be written; ENOSPC once the budget is gone."""
        with self.lock:
            if self.write_budget is None:
                return n
            left = self.write_budget - self.written
            if left <= 0:
                self.fired.append(what)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            allowed = min(n, left)
            self.written += allowed
            return allowed

    def _read(self, what: str) -> None:
        with self.lock:
            self.reads += 1
            if self.fail_read is not None and self.reads >= self.fail_read:
                self.fired.append(what)
                raise OSError(errno.EIO, os.strerror(errno.EIO))

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        n = self._spend(len(data), "os.pwrite")
        return os.pwrite(fd, memoryview(data)[:n], offset)

    def preadv(self, fd: int, buffers: Any, offset: int, *args: Any) -> int:
        self._read("os.preadv")
        return os.preadv(fd, buffers, offset, *args)


def faulty_write_all(faults: FaultyOS) -> Callable[[Any, Any], None]:
    real = disk.write_all

    def write_all(f: Any, data: Any) -> None:  # the shard headers
        view = memoryview(data)
        n = faults._spend(len(view), "write_all")
        real(f, view[:n])
        if n < len(view):
            faults._spend(len(view) - n, "write_all")  # raises ENOSPC

    return write_all


def hub_source(tmp_path: Path, quant: str = "nvfp4") -> tuple[Path, dict[str, Any]]:
    """A hub checkpoint in two shards (fused groups span them); NVFP4 has outputs computed with
    torch (shared input scales are checked), so both write paths run."""
    hub, mem = model(quant, seed=11)
    return write_ckpt(tmp_path / "hub", hub, "hub", quant, shards=spanning_shards(hub)), mem


def total_output_bytes(src: Path) -> int:
    report = convert_checkpoint(src, None, direction="apply", max_shard_size="20KB",
                                dry_run=True)
    return report.bytes_out


def after_a_failure(tmp_path: Path, src: Path, before: dict[str, str], dst: Path,
                    mem: dict[str, Any]) -> None:
    """The state a failed run must leave, then a clean rerun."""
    assert snapshot(src) == before, "the source changed"
    assert not dst.exists(), "a destination appeared"
    assert temp_leftovers(tmp_path) == [], "the temporary folder was left behind"
    convert_checkpoint(src, dst, direction="apply", max_shard_size="20KB")
    assert_same_raw(read_raw(dst), raw_of(mem))
    assert snapshot(src) == before
    assert temp_leftovers(tmp_path) == []


# --- a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.7, 0.999])
@pytest.mark.parametrize("workers", [1, 2])
def test_enospc_after_n_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraction: float,
                              workers: int) -> None:
    src, mem = hub_source(tmp_path)
    before = snapshot(src)
    budget = int(total_output_bytes(src) * fraction)
    faults = FaultyOS(write_budget=budget)
    monkeypatch.setattr(disk, "os", faults)
    monkeypatch.setattr(disk, "write_all", faulty_write_all(faults))
    dst = tmp_path / "dst"
    with pytest.raises(OSError) as info:
        convert_checkpoint(src, dst, direction="apply", max_shard_size="20KB", workers=workers)
    assert info.value.errno == errno.ENOSPC
    assert faults.fired, "the fault was never reached"
    monkeypatch.undo()
    after_a_failure(tmp_path, src, before, dst, mem)


def test_enospc_with_force_keeps_the_previous_destination(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src, mem = hub_source(tmp_path)
    before = snapshot(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "previous.txt").write_text("the previous conversion")
    previous = snapshot(dst)
    faults = FaultyOS(write_budget=total_output_bytes(src) // 2)
    monkeypatch.setattr(disk, "os", faults)
    monkeypatch.setattr(disk, "write_all", faulty_write_all(faults))
    with pytest.raises(OSError):
        convert_checkpoint(src, dst, direction="apply", max_shard_size="20KB", force=True)
    monkeypatch.undo()
    assert snapshot(dst) == previous, "the previous destination was touched"
    assert snapshot(src) == before
    assert temp_leftovers(tmp_path) == []
    convert_checkpoint(src, dst, direction="apply", max_shard_size="20KB", force=True)
    assert not (dst / "previous.txt").exists()
    assert_same_raw(read_raw(dst), raw_of(mem))


# --- a failing source disk ----------------------------------------------------------------------


@pytest.mark.parametrize("nth", [1, 2, 7, 40])
def test_eio_on_the_nth_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    src, mem = hub_source(tmp_path)
    before = snapshot(src)
    faults = FaultyOS(fail_read=nth)
    monkeypatch.setattr(disk, "os", faults)
    dst = tmp_path / "dst"
    with pytest.raises(OSError) as info:
        convert_checkpoint(src, dst, direction="apply", max_shard_size="20KB")
    assert info.value.errno == errno.EIO
    assert faults.fired
    monkeypatch.undo()
    after_a_failure(tmp_path, src, before, dst, mem)


def test_a_full_disk_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: Any) -> None:
    from convlens.cli import main

    src, mem = hub_source(tmp_path)
    before = snapshot(src)
    faults = FaultyOS(write_budget=total_output_bytes(src) // 3)
    monkeypatch.setattr(disk, "os", faults)
    monkeypatch.setattr(disk, "write_all", faulty_write_all(faults))
    dst = tmp_path / "dst"
    assert main(["apply", str(src), str(dst), "--max-shard-size", "20KB", "-q"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    after_a_failure(tmp_path, src, before, dst, mem)


def test_a_source_shrinking_after_planning_is_a_conversion_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard truncated between reading the headers and copying (another process): the
    writer must not produce a short output."""
    import convlens
    import convlens.checkpoint as checkpoint

    src, mem = hub_source(tmp_path)
    shard = sorted(src.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    real = checkpoint.write_checkpoint

    def truncate_then_write(*args: Any, **kwargs: Any) -> Any:
        shard.write_bytes(data[: len(data) // 2])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_checkpoint", truncate_then_write)
    dst = tmp_path / "dst"
    with pytest.raises(convlens.ConversionError, match=r"read error|shorter"):
        convert_checkpoint(src, dst, direction="apply", max_shard_size="20KB")
    monkeypatch.undo()
    assert not dst.exists() and temp_leftovers(tmp_path) == []
    shard.write_bytes(data)
    before = snapshot(src)
    after_a_failure(tmp_path, src, before, dst, mem)


# --- a killed process ---------------------------------------------------------------------------


def test_sigkill_then_force_keeps_the_previous_destination(tmp_path: Path) -> None:
    """SIGKILL during a --force run over an existing destination: the previous destination is
    untouched, the temporary folder is removed by the next run, which then succeeds."""
    src = tmp_path / "big"
    tensors_out = write_big(src)
    before = snapshot(src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "previous.txt").write_text("the previous conversion")
    previous = snapshot(dst)

    proc, tmp = start_cli(tmp_path, src, dst, "--force")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_dir()
    assert snapshot(dst) == previous
    assert snapshot(src) == before

    assert clean_stale(dst) == [tmp]  # what the next run does first
    assert temp_leftovers(tmp_path) == []
    report = convert_checkpoint(src, dst, direction="revert", rules="mixtral",
                                max_shard_size="20MB", force=True)
    assert report.tensors_out == tensors_out
    assert not (dst / "previous.txt").exists()
    assert snapshot(src) == before
    assert temp_leftovers(tmp_path) == []
