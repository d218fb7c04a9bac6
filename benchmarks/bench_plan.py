"""Pure planning time on the DeepSeek-like synthetic key set (issue 4: 300k keys < 5 s).

    .venv/bin/python benchmarks/bench_plan.py [KEYS] [REPEATS]
"""
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
from bench_convert import w3_synthetic_metas

from convlens.api import load_rules
from convlens.compiler.planner import TensorMeta


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    raw, config = w3_synthetic_metas(n)
    metas = {k: TensorMeta(s, d) for k, (s, d) in raw.items()}
    conv = load_rules("qwen2_moe")
    conv.plan(metas, config, direction="apply", check=False)  # warm caches
    print(f"{len(metas)} keys")
    for check in (False, True):
        times, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            conv.plan(metas, config, direction="apply", check=check)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(f"check={check}: median {statistics.median(times):.2f} s wall "
              f"({', '.join(f'{x:.2f}' for x in times)}), {statistics.median(cpu):.2f} s cpu "
              "(a busy machine inflates wall time)")


if __name__ == "__main__":
    main()
