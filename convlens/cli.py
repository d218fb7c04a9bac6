"""The ``convlens`` command line: one subcommand per stage.

    convlens check FILE...              parse, compile, static checks, expects, round trips
    convlens explain --rules R KEY      which rule maps KEY, its derived inverse, the result
    convlens fmt FILE... [--write|--check]
    convlens parse FILE                 the AST outline
    convlens plan --rules R SAFETENSORS [--revert]   the plan listing for a checkpoint file
    convlens apply|revert [--rules R] SRC DST       convert a checkpoint folder on disk
    convlens verify SRC DST             recompute DST from SRC and compare byte for byte
    convlens rules | schemes            the shipped conversions and quantization formats
    convlens import-transformers NAME [--all] [-o DIR]   .conv text from transformers' mapping

Exit codes: 0 ok, 1 rule or conversion error, 2 usage. Errors print ``file:line:col``, the source
line and a caret, without a traceback unless ``-v``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convlens.errors import ConvlensError


def _load(rules: str) -> object:
    from convlens.api import load_rules

    return load_rules(rules)


def cmd_check(args: argparse.Namespace) -> int:
    from convlens.api import load_rules
    from convlens.checking import check_program

    failed = 0
    for name in args.files:
        try:
            conversion = load_rules(name)
        except ConvlensError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        schemes = _schemes(args.schemes)
        report = check_program(conversion.program, range(args.seeds), schemes)
        print(report.summary())
        if args.verbose or not report.ok:
            for line in report.scheme_lines():
                print(line)
        for err in report.errors:
            print(err, file=sys.stderr)
        failed += not report.ok
    return 1 if failed else 0


def _schemes(spec: str) -> list[Any]:
    from convlens.compiler.schemes import all_schemes

    if spec == "none":
        return []
    every = [s for s in all_schemes() if s.quantized]
    if spec == "all":
        return every
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    names = {s.name: s for s in every}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"unknown scheme {unknown[0]!r}; schemes: {', '.join(sorted(names))}")
    return [names[w] for w in wanted]


def cmd_schemes(args: argparse.Namespace) -> int:
    from convlens.compiler.schemes import all_schemes

    for s in all_schemes():
        roles = ", ".join(
            f"{r.name} {r.dtype or 'any'}"
            + ("[" + ", ".join(a.describe() for a in r.axes) + "]" if r.kind == "tensor" else
               f" ({r.kind})")
            for r in s.roles.values())
        print(f"{s.name:26} {roles}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from convlens.api import load_rules
    from convlens.compiler.trace import trace_key

    conversion = load_rules(args.rules)
    config = None
    if args.config:  # the values of config fields that patterns read ({e+config.n})
        path = Path(args.config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    shown = False
    for direction, program in (("apply", conversion.program),
                               ("revert", conversion.inverse_program)):
        trace = trace_key(program, args.key, config)
        if not trace.steps and not trace.note:  # a note: a rule it reaches needs the config
            continue
        shown = True
        print(f"{direction} ({conversion.name}): {args.key}")
        for step in trace.steps:
            rule = step.rule
            print(f"  {rule.ref.label}")
            print(f"    rule:    {rule.describe()}")
            print(f"    inverse: {rule.inverse().describe()}")
            caps = ", ".join(f"{k}={v!r}" for k, v in sorted(step.captures.items()))
            print(f"    captures: {caps or '-'}" + (f"; role: {step.role}" if step.role else ""))
            print(f"    {step.before} -> {', '.join(step.after) or '(dropped)'}")
        print(f"  result: {', '.join(trace.results)}" + (f" ({trace.note})" if trace.note else ""))
        if not trace.concrete:
            print("  ({e}-style placeholders stand for every index of the unstacked axis)")
    if not shown:
        print(f"{args.key}: no rule of {conversion.name} matches it in either direction; it "
              "passes through unchanged")
    return 0


def cmd_fmt(args: argparse.Namespace) -> int:
    from convlens.dsl.formatter import format_conversion
    from convlens.dsl.parser import parse_file

    changed = 0
    for name in args.files:
        path = Path(name)
        text = format_conversion(parse_file(path))
        if args.write:
            if path.read_text(encoding="utf-8") != text:
                tmp = path.with_name(path.name + ".convlens-tmp")
                tmp.write_text(text, encoding="utf-8")
                tmp.replace(path)
                print(f"formatted {path}")
        elif args.check:
            if path.read_text(encoding="utf-8") != text:
                print(f"{path}: not formatted", file=sys.stderr)
                changed += 1
        else:
            sys.stdout.write(text)
    return 1 if changed else 0


def cmd_parse(args: argparse.Namespace) -> int:
    from convlens.dsl.outline import outline
    from convlens.dsl.parser import parse_file

    sys.stdout.write(outline(parse_file(args.file)))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from safetensors import safe_open

    from convlens.api import load_rules
    from convlens.compiler.planner import TensorMeta

    conversion = load_rules(args.rules)
    metas = {}
    with safe_open(args.file, framework="pt") as f:
        for key in f:
            sl = f.get_slice(key)
            metas[key] = TensorMeta(tuple(sl.get_shape()), sl.get_dtype())
    config = json.loads(Path(args.config).read_text()) if args.config else None
    p = conversion.plan(metas, config, direction="revert" if args.revert else "apply",
                        strict=args.strict)
    sys.stdout.write(p.listing())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from convlens.checkpoint import convert_checkpoint

    if args.dst is None and not args.dry_run:
        args.parser.error(f"{args.command}: DST is required (or --dry-run)")
    policies = [p.strip() for p in (args.lossy or "").split(",") if p.strip()]
    report = convert_checkpoint(
        args.src, None if args.dry_run else args.dst, rules=args.rules,
        direction=args.command, strict=args.strict, policies=policies,
        max_shard_size=int(args.max_shard_size) if args.max_shard_size.isdigit()
        else args.max_shard_size, workers=args.workers, force=args.force,
        dry_run=args.dry_run, quiet=args.quiet, fsync=args.fsync)
    if not args.quiet or args.dry_run:
        print(report.summary())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from convlens.checkpoint import verify_checkpoint

    report = verify_checkpoint(args.src, args.dst, rules=args.rules, workers=args.workers)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_rules(args: argparse.Namespace) -> int:
    from convlens.api import load_rules, shipped_rules

    for name in sorted(shipped_rules()):
        conv = load_rules(name)
        serves = ", ".join(conv.model_types + conv.architectures)
        print(f"{name:20} {len(conv.program.rules):3} rules  {serves}")
    return 0


def cmd_import_transformers(args: argparse.Namespace) -> int:
    from convlens.importer import import_all, import_transformers, summary

    if args.all == (args.name is not None):
        args.parser.error("import-transformers: give a MODEL_TYPE_OR_CLASS or --all")
    results = import_all() if args.all else {args.name: import_transformers(args.name)}
    out = Path(args.output) if args.output else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        if out is not None:
            (out / f"{name}.conv").write_text(result.text, encoding="utf-8")
        elif not args.all:
            sys.stdout.write(result.text)
        if not args.all:
            for u in result.untranslatable:
                print(f"untranslated: {u.item}: {u.reason}", file=sys.stderr)
    if args.all:
        print(summary(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convlens", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="check rule files: compile, expects, round trips")
    p.add_argument("files", nargs="+", help="rule files or shipped names")
    p.add_argument("--seeds", type=int, default=3, help="generated state dicts per file")
    p.add_argument("--schemes", default="all",
                   help="quantized schemes to check the rules on: all (default), none, or a "
                        "comma-separated list; -v lists which are exact and which refused")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("schemes", help="list the quantization schemes and their role layouts")
    p.set_defaults(func=cmd_schemes)

    p = sub.add_parser("explain", help="which rule maps a key, and its inverse")
    p.add_argument("--rules", required=True, help="a shipped name or a .conv file")
    p.add_argument("--config", help="config.json (or its folder), for patterns that read it")
    p.add_argument("key")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("fmt", help="print rule files in canonical form")
    p.add_argument("files", nargs="+")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the files in place")
    g.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser("parse", help="print the AST outline of a rule file")
    p.add_argument("file")
    p.set_defaults(func=cmd_parse)

    p = sub.add_parser("plan", help="print the plan for a safetensors file")
    p.add_argument("--rules", required=True)
    p.add_argument("--config", help="config.json for size expressions")
    p.add_argument("--revert", action="store_true", help="plan the inverse")
    p.add_argument("--strict", action="store_true", help="fail on keys no rule matches")
    p.add_argument("file")
    p.set_defaults(func=cmd_plan)

    for direction, text in (("apply", "convert a checkpoint folder forward (hub -> in-memory "
                                      "layout for the shipped rules)"),
                            ("revert", "convert a checkpoint folder back (in-memory -> hub "
                                       "layout)")):
        p = sub.add_parser(direction, help=text)
        p.add_argument("src", help="checkpoint folder (or one .safetensors file)")
        p.add_argument("dst", nargs="?", help="output folder (written atomically)")
        p.add_argument("--rules", help="a shipped name or a .conv file (default: from the "
                       "checkpoint's provenance or config.json)")
        p.add_argument("--dry-run", action="store_true", help="print the plan summary, write "
                       "nothing")
        p.add_argument("--strict", action="store_true", help="fail on keys no rule matches")
        p.add_argument("--max-shard-size", default="5GB", help="bytes, or with a unit "
                       "like transformers: 500MB, 5GB (default 5GB)")
        p.add_argument("--workers", type=int, default=None,
                       help="parallel writers (default: the CPUs, at most 4)")
        p.add_argument("--lossy", help="allow lossy steps: a comma-separated list of max, "
                       "rescale, requantize")
        p.add_argument("--force", action="store_true", help="replace an existing DST")
        p.add_argument("--fsync", action="store_true", help="flush DST to disk before it "
                       "appears, so it also survives a power loss (slower, like cp + sync)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or report")
        p.set_defaults(func=cmd_convert, parser=p)

    p = sub.add_parser("verify", help="recompute a converted checkpoint from its source and "
                       "compare, byte for byte")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--rules", help="the conversion (default: the destination's provenance)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel readers (default: the CPUs, at most 4)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("import-transformers", help="write .conv text from transformers' "
                       "conversion mapping (what cannot be translated is reported)")
    p.add_argument("name", nargs="?", metavar="MODEL_TYPE_OR_CLASS")
    p.add_argument("--all", action="store_true", help="every key of the mapping")
    p.add_argument("-o", "--output", metavar="DIR", help="write NAME.conv files here")
    p.set_defaults(func=cmd_import_transformers, parser=p)

    p = sub.add_parser("rules", help="list the shipped conversions")
    p.set_defaults(func=cmd_rules)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConvlensError as exc:
        if args.verbose:
            raise
        print(f"convlens: {exc}" if exc.span is None else str(exc), file=sys.stderr)
        return 1
    except OSError as exc:  # the filesystem refused (permissions, full disk): not a usage error
        if args.verbose:
            raise
        print(f"convlens: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        if args.verbose:
            raise
        print(f"convlens: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
