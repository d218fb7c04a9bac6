"""Workers share a shard: its tensors are cut into runs written at their offsets at once.

The output must not depend on how many workers wrote it: the same files, byte for byte, from
one worker and from several, for one big shard and for several shards, with tensors copied as
byte ranges and tensors computed with torch in the same shard."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
from test_checkpoint import model, write_ckpt

import convlens.runtime.disk as disk
from convlens.checkpoint import convert_checkpoint
from convlens.runtime.safetensors_io import read_header


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("quant", ["bf16", "nvfp4"])
@pytest.mark.parametrize("shard_size", ["5GB", "30KB"])
def test_the_output_does_not_depend_on_the_number_of_workers(
        tmp_path: Path, quant: str, shard_size: str) -> None:
    hub, _ = model(quant, seed=5)
    src = write_ckpt(tmp_path / "hub", hub, "hub", quant)
    outs = {}
    for workers in (1, 2, 3, 7):
        dst = tmp_path / f"w{workers}"
        report = convert_checkpoint(src, dst, direction="apply", max_shard_size=shard_size,
                                    workers=workers)
        assert report.stats is not None and report.stats.tensors == report.tensors_out
        outs[workers] = _digest(dst)
    assert outs[2] == outs[1] and outs[3] == outs[1] and outs[7] == outs[1]


def test_one_shard_is_cut_into_runs_of_about_equal_bytes(tmp_path: Path) -> None:
    hub, _ = model("bf16", seed=6)
    src = write_ckpt(tmp_path / "hub", hub, "hub", "bf16")
    seen: list[tuple[int, int]] = []
    real = disk.write_piece

    def spy(piece: disk._Piece, *args: object) -> None:
        seen.append((piece.start, piece.nbytes))
        real(piece, *args)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(disk, "write_piece", spy)
    try:
        convert_checkpoint(src, tmp_path / "dst", direction="apply", workers=3)
    finally:
        mp.undo()
    seen.sort()
    assert len(seen) == 3
    for (a, n), (b, _) in itertools.pairwise(seen):
        assert a + n == b  # contiguous, no gap, no overlap
    sizes = [n for _, n in seen]
    header = read_header(tmp_path / "dst" / "model.safetensors")
    largest = max(e.nbytes for e in header.entries.values())
    assert max(sizes) - min(sizes) <= largest, (sizes, largest)
