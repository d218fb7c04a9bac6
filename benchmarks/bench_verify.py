#!/usr/bin/env python
"""What `convlens verify` costs next to the conversion it checks.

    .venv/bin/python benchmarks/bench_verify.py [--size-gb 0.5] [--repeats 3] [--workloads 2,1]
                                                [--workdir DIR] [--keep] [--workers 1]

Generates a synthetic checkpoint with bench_convert.py's generator (imported, not copied; see
benchmarks/README.md for the workloads), converts it with ``convert_checkpoint`` and verifies the
result with ``verify_checkpoint`` (every output recomputed from the source and compared byte for
byte), alternating the two ``--repeats`` times, and prints the times and the ratio
verify / convert. Both run in this process after one untimed warm-up read of the source (the page
cache is warm for both); the conversion's output is deleted and ``sync()`` called before each
timed conversion. Nothing is written outside the work directory.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_convert as bc  # the generator and the workloads


def bench(workload: str, size: float, repeats: int, workdir: Path, workers: int
          ) -> dict[str, Any]:
    from convlens.checkpoint import convert_checkpoint, verify_checkpoint

    w = bc.WORKLOADS[workload]
    specs, config = w["specs"](size)
    src = workdir / f"w{workload}-src"
    dst = workdir / f"w{workload}-dst"
    if not src.exists():
        bc.write_checkpoint(src, specs, config, shard_bytes=size * bc.GB / 3)
    bc.warm(src)
    convert_s, verify_s = [], []
    for _ in range(repeats):
        shutil.rmtree(dst, ignore_errors=True)
        bc.os.sync()
        t = time.perf_counter()
        report = convert_checkpoint(src, dst, rules=w["rules"], direction=w["direction"],
                                    workers=workers, quiet=True)
        convert_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        checked = verify_checkpoint(src, dst, workers=workers)
        verify_s.append(time.perf_counter() - t)
        if not checked.ok:
            raise SystemExit(f"verify found a mismatch:\n{checked.summary()}")
    c, v = statistics.median(convert_s), statistics.median(verify_s)
    return {"bytes": report.bytes_out, "tensors": report.tensors_out, "convert_s": c,
            "verify_s": v, "ratio": v / c, "convert_runs": convert_s, "verify_runs": verify_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="2,1")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="convlens-bench-verify-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"`{' '.join(['benchmarks/bench_verify.py', *(argv or sys.argv[1:])])}` "
          f"(size {args.size_gb} GB, {args.repeats} repeats, workers {args.workers})")
    print()
    print("| workload | output | convert (median) | verify (median) | verify / convert |")
    print("|---|---|---|---|---|")
    try:
        for w in args.workloads.split(","):
            r = bench(w, args.size_gb, args.repeats, workdir, args.workers)
            runs = (f"convert {', '.join(f'{t:.2f}' for t in r['convert_runs'])}; "
                    f"verify {', '.join(f'{t:.2f}' for t in r['verify_runs'])}")
            print(f"| {w}: {bc.WORKLOADS[w]['title']} | {r['bytes'] / bc.GB:.2f} GB, "
                  f"{r['tensors']} tensors | {r['convert_s']:.2f} s | {r['verify_s']:.2f} s | "
                  f"{r['ratio']:.2f}x |  <!-- {runs} -->", flush=True)
    finally:
        if args.keep:
            print(f"\n(workdir kept: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
