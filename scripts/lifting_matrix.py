"""Which op is exact for which quantization scheme, and why the others are refused.

Each op is written once as a one-rule conversion; ``convlens.checking.check_program`` then
generates state dicts stored in every shipped scheme and checks laws 1-4 and 6 on them (round trips
bit-exact, dequantization commutes). A scheme the op cannot lift losslessly is refused by the
planner, and the refusal's message is the reason shown.

    .venv/bin/python scripts/lifting_matrix.py            # markdown table on stdout
    .venv/bin/python scripts/lifting_matrix.py --reasons  # and every refusal's message
"""

from __future__ import annotations

import argparse
import sys

from convlens.api import compile_text
from convlens.checking import check_program
from convlens.compiler.schemes import all_schemes

# op -> (a one-rule conversion, what it stands for)
OPS: dict[str, tuple[str, str]] = {
    "split out": ('split "{l*}.qkv" -> "{l*}.q", "{l*}.k", "{l*}.v" by split(0)',
                  "fused q/k/v or gate/up split along out (inverse: concat)"),
    "split in": ('split "{l*}.wide" -> "{l*}.left", "{l*}.right" by split(1)',
                 "a weight split along in (inverse: concat along in)"),
    "stack": ('fuse "{l*}.experts.{e:int}.w2" -> "{l*}.experts.down_proj" naming param '
              "by stack(e, 0)", "per-expert tensors stacked to [E, out, in] (inverse: unstack)"),
    "stack+concat": ('fuse "{l*}.experts.{e:int}.w1", "{l*}.experts.{e:int}.w3" '
                     '-> "{l*}.experts.gate_up_proj" naming param by stack(e, 0), concat(1)',
                     "MoE gate/up: stacked and fused to [E, 2I, H]"),
    "interleave": ('fuse "{l*}.gate", "{l*}.up" -> "{l*}.gate_up" by interleave(0)',
                   "rows of two parts interleaved (gpt-oss, inkling)"),
    "transpose": ('map "{l*}.experts.gate_up_proj" naming param axes (e, in, out) '
                  '-> "{l*}.experts.gate_up_proj" naming param axes (e, out, in) '
                  "by transpose(1, 2)", "3-D experts stored [E, in, out] (qwen3_vl_moe)"),
    "rope_permute": ('map "{l*}.q_proj" -> "{l*}.q_proj" by rope_permute(heads=2)',
                     "q/k rows permuted for RoPE (PermuteForRope)"),
}


def matrix() -> tuple[list[str], dict[str, dict[str, str]]]:
    """scheme -> op -> "exact" or the refusal's reason."""
    schemes = [s for s in all_schemes() if s.quantized]
    out: dict[str, dict[str, str]] = {s.name: {} for s in schemes}
    for op, (rule, _) in OPS.items():
        program = compile_text(f"conversion {op.replace(' ', '_').replace('+', '_')}\n{rule}\n")
        report = check_program(program, seeds=range(1), schemes=schemes)
        for err in report.errors:
            raise SystemExit(f"{op}: {err}")
        for name in report.exact:
            out[name][op] = "exact"
        for name, reason in report.refused.items():
            out[name][op] = reason
    return list(OPS), out


def render(ops: list[str], table: dict[str, dict[str, str]], reasons: bool) -> str:
    lines = ["| scheme | " + " | ".join(ops) + " |", "| --- |" + " --- |" * len(ops)]
    notes: dict[str, int] = {}
    for name, row in table.items():
        cells = []
        for op in ops:
            value = row.get(op, "?")
            if value == "exact":
                cells.append("exact")
            else:
                n = notes.setdefault(value, len(notes) + 1)
                cells.append(f"refused [{n}]")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if reasons:
        lines.append("")
        lines += [f"- [{n}] {reason}" for reason, n in notes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reasons", action="store_true", help="print each refusal's message")
    args = parser.parse_args(argv)
    ops, table = matrix()
    sys.stdout.write(render(ops, table, args.reasons))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
