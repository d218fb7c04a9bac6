"""How convlens copies byte ranges: ``os.copy_file_range`` against its buffered copier.

    .venv/bin/python benchmarks/bench_copy.py [--mib 1024] [--repeats 3]

Copies one cached file's bytes into a new file at several (source, destination) offset pairs,
the situation of a tensor moved between safetensors files (offsets are only 8-byte aligned):

- ``copy_file_range``: one call per 1 GiB, in the kernel (what convlens used before);
- ``_Copier``: convlens' ``runtime.disk._Copier`` (``pread`` into a 1 MiB buffer whose start
  is chosen per block, one ``pwrite`` per full buffer);
- ``pread/pwrite, buffer at 0``: the same loop with the buffer's start fixed at offset 0.

It reports GB/s of CPU time (user + system of this process), which a busy machine does not
inflate the way it inflates wall time, and the ratio of ``_Copier`` to ``copy_file_range``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from convlens.runtime.disk import COPY_BLOCK, _Copier, _Reader

PAIRS = [(0, 0), (8, 0), (0, 8), (88, 96), (88, 1008), (3000, 16)]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def by_copy_file_range(src: Path, out: int, so: int, do: int, n: int) -> None:
    fd = os.open(src, os.O_RDONLY)
    try:
        done = 0
        while done < n:
            done += os.copy_file_range(fd, out, min(1 << 30, n - done), so + done, do + done)
    finally:
        os.close(fd)


def by_copier(src: Path, out: int, so: int, do: int, n: int) -> None:
    reader = _Reader()
    try:
        copier = _Copier(reader, out)
        copier.copy([(src, so, n)], do)
        copier.flush()
        copier.close()
    finally:
        reader.close()


def by_fixed_buffer(src: Path, out: int, so: int, do: int, n: int) -> None:
    fd = os.open(src, os.O_RDONLY)
    buf = memoryview(bytearray(COPY_BLOCK))
    try:
        done = 0
        while done < n:
            k = os.preadv(fd, [buf[:min(COPY_BLOCK, n - done)]], so + done)
            os.pwrite(out, buf[:k], do + done)
            done += k
    finally:
        os.close(fd)


METHODS = {"copy_file_range": by_copy_file_range, "_Copier": by_copier,
           "pread/pwrite, buffer at 0": by_fixed_buffer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="bytes copied per run (MiB)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.mib << 20
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src = Path(tmp) / "src.bin"
        with src.open("wb") as f:
            block = os.urandom(16 << 20)
            for _ in range(-(-(n + 8192) // len(block))):
                f.write(block)
        with src.open("rb") as f:  # into the page cache
            while f.read(64 << 20):
                pass
        dst = Path(tmp) / "dst.bin"
        print(f"{args.mib} MiB per copy, median of {args.repeats}, GB/s of CPU time "
              f"(wall GB/s in brackets)\n")
        print("| source offset | destination offset | " + " | ".join(METHODS) +
              " | _Copier / copy_file_range |")
        print("|---:|---:|" + "---:|" * (len(METHODS) + 1))
        for so, do in PAIRS:
            rates: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
            for _ in range(args.repeats):
                for name, fn in METHODS.items():
                    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.ftruncate(out, n + do)
                    c, t = cpu(), time.perf_counter()
                    fn(src, out, so, do, n)
                    rates[name].append((n / (cpu() - c) / 1e9, n / (time.perf_counter() - t) / 1e9))
                    os.close(out)
                    dst.unlink()
            med = {m: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                   for m, v in rates.items()}
            cells = " | ".join(f"{c:.2f} ({w:.2f})" for c, w in med.values())
            ratio = med["_Copier"][0] / med["copy_file_range"][0]
            print(f"| {so} | {do} | {cells} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
