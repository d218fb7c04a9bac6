"""Convert a checkpoint folder on disk: plan from the headers, validate the whole plan, stream.

The output is written into a temporary folder next to the destination and moved into place only
when complete; the source is never written to. The conversion is recorded in every shard's
metadata (provenance), so that a later revert undoes exactly the rules that were applied.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from convlens.api import Conversion, load_rules, shipped_rules
from convlens.compiler import plan as P
from convlens.compiler.program import Program
from convlens.errors import ConversionError
from convlens.runtime.disk import (
    VerifyStats,
    WriteStats,
    plan_shards,
    verify_outputs,
    write_checkpoint,
)
from convlens.runtime.report import RunReport
from convlens.runtime.safetensors_io import INDEX_NAME, Checkpoint, open_checkpoint

Direction = Literal["apply", "revert"]
PROVENANCE_KEY = "convlens"
TMP_MARK = ".convlens-tmp-"
OLD_MARK = ".convlens-old-"


@dataclass
class ConvertReport:
    """What a run did (or, for a dry run, would do)."""

    conversion: str
    direction: str
    src: Path
    dst: Path | None
    selected_by: str
    tensors_in: int
    tensors_out: int
    bytes_out: int
    shards: int
    per_rule: dict[str, int]
    passthrough: list[str]
    lossy_steps: list[str]
    lossy: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: WriteStats | None = None
    dry_run: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.direction} {self.conversion} ({self.selected_by}): {self.src} -> "
                 f"{self.dst if self.dst else '(dry run)'}"]
        lines.append(f"  {self.tensors_in} tensors in, {self.tensors_out} out, "
                     f"{self.bytes_out / 1e9:.3f} GB in {self.shards} shard(s)")
        for label, n in self.per_rule.items():
            lines.append(f"  {n:8} tensors made by {label} (intermediate ones included)")
        lines.append(f"  {len(self.passthrough):8} passed through unchanged"
                     + (f" (e.g. {', '.join(self.passthrough[:3])})" if self.passthrough else ""))
        for step in self.lossy_steps:
            lines.append(f"  lossy: {step}")
        for event in self.lossy:
            lines.append(f"  lossy step taken: {event}")
        for note in self.notes:
            lines.append(f"  config: {note}")
        if self.stats is not None:
            s = self.stats
            lines.append(f"  wrote {s.bytes / 1e9:.3f} GB in {s.seconds:.2f} s "
                         f"({s.throughput / 1e9:.2f} GB/s): {s.copied_tensors} tensors copied as "
                         f"byte ranges, {s.computed_tensors} computed")
        return "\n".join(lines)


# --- selecting the rules ------------------------------------------------------------------------


def _configs(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The config and its nested sub-model configs (text_config, vision_config, ...)."""
    out = [config]
    for value in config.values():
        if isinstance(value, Mapping) and "model_type" in value:
            out.append(value)
    return out


def select_rules(config: Mapping[str, Any]) -> tuple[Conversion, str]:
    """The shipped conversion for a config.json: by class name (``architectures``) first, then
    by ``model_type``, as transformers looks up its mappings. A file that serves only a nested
    sub-model (``text_config``) is not chosen for the composite, whose keys sit under other
    prefixes: the error names it, for ``--rules`` if converting that sub-model is meant."""
    by_arch, by_type = _served()
    for arch in config.get("architectures") or ():
        if arch in by_arch:
            return load_rules(by_arch[arch]), f"architecture {arch}"
    mt = config.get("model_type")
    if isinstance(mt, str) and mt in by_type:
        return load_rules(by_type[mt]), f"model_type {mt}"
    archs = ", ".join(config.get("architectures") or []) or "none"
    subs = [f"{sub.get('model_type')} (served by {by_type[sub['model_type']]})"
            for sub in _configs(config)[1:]
            if isinstance(sub.get("model_type"), str) and sub["model_type"] in by_type]
    raise ConversionError(
        f"no shipped conversion serves this config (architectures: {archs}; model_type: "
        f"{mt!r})" + (f"; its sub-model {', '.join(subs)} is converted on its own, not inside "
                      "this model" if subs else "") + "; pass --rules NAME|FILE")


def _served() -> tuple[dict[str, str], dict[str, str]]:
    by_arch: dict[str, str] = {}
    by_type: dict[str, str] = {}
    for name in sorted(shipped_rules()):
        conv = load_rules(name)
        for a in conv.architectures:
            by_arch.setdefault(a, name)
        for t in conv.model_types:
            by_type.setdefault(t, name)
    return by_arch, by_type


# --- provenance ---------------------------------------------------------------------------------


def read_provenance(ckpt: Checkpoint) -> dict[str, Any] | None:
    found = None
    for shard in ckpt.shards:
        raw = shard.metadata.get(PROVENANCE_KEY)
        if raw is None:
            continue
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise ConversionError(f"{shard.path}: unreadable convlens provenance") from None
        if found is not None and value != found:
            raise ConversionError(f"{shard.path}: shards disagree about how they were made")
        found = value
    if found is None:
        return None
    if (not isinstance(found, dict) or not isinstance(found.get("conversion"), str)
            or found.get("direction") not in ("apply", "revert")
            or not isinstance(found.get("fired"), list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in found["fired"])):
        raise ConversionError(f"{ckpt.shards[0].path}: malformed convlens provenance "
                              f"({str(found)[:200]})")
    return found


def _subset(conversion: Conversion, fired: Iterable[int]) -> Conversion:
    """The conversion restricted to the rules (forward indices) that were applied."""
    keep = sorted(set(fired))
    rules = conversion.program.rules
    if any(not 0 <= i < len(rules) for i in keep):
        raise ConversionError("provenance names rules this conversion does not have")
    program = Program(conversion.program.name, conversion.program.path,
                      conversion.program.model_types, conversion.program.architectures,
                      tuple(rules[i] for i in keep), conversion.program.expects)
    return Conversion(program)


# --- the run ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def clean_stale(dst: Path) -> list[Path]:
    """Remove temporary folders that interrupted runs left next to ``dst`` (their names end in
    ``-{pid}-{token}``; only those whose process is gone are removed)."""
    removed = []
    for mark in (TMP_MARK, OLD_MARK):
        for p in dst.parent.glob(f"{glob.escape('.' + dst.name + mark)}*"):
            pid = p.name[len(dst.name) + 1 + len(mark):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(p)
                removed.append(p)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _check_paths(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConversionError(f"the destination {dst} must not be the source {src}, inside it, or "
                              "contain it")


def convert_checkpoint(src: str | Path, dst: str | Path | None, rules: str | Path | None = None,
                       direction: Direction = "revert", *, strict: bool = False,
                       policies: Iterable[str] = (), max_shard_size: int | str = "5GB",
                       workers: int | None = None, force: bool = False, dry_run: bool = False,
                       quiet: bool = True, fsync: bool = False) -> ConvertReport:
    """Convert the checkpoint folder ``src`` into ``dst`` (``apply`` or ``revert``).

    Without ``rules`` the conversion is chosen from the source's provenance (a checkpoint that
    convlens wrote) or its ``config.json``. The whole plan is validated before any byte is
    written; a plan that fails writes nothing. ``workers`` (default: the CPUs, at most 4)
    write the shards, and runs of tensors within them, in parallel. DST appears complete or
    not at all whatever
    happens to the process; ``fsync`` also flushes every file and the folder to disk before
    the rename, so that DST survives a power loss or an OS crash too (like ``cp`` + ``sync``).
    """
    started = time.perf_counter()
    src = Path(src)
    ckpt = open_checkpoint(src)
    root = ckpt.root
    config = _read_json(root / "config.json") or {}
    hf_quant = _read_json(root / "hf_quant_config.json")
    plan_config = dict(config)
    if hf_quant is not None:
        plan_config["hf_quant_config"] = hf_quant
    provenance = read_provenance(ckpt)
    if rules is not None:
        conversion, chosen = load_rules(rules), f"--rules {rules}"
    elif provenance is not None:
        conversion, chosen = load_rules(provenance["conversion"]), "provenance"
    else:
        conversion, chosen = select_rules(config)
    if provenance is not None and provenance.get("conversion") == conversion.name:
        if provenance.get("direction") == direction:
            raise ConversionError(f"{src} was written by convlens {direction} {conversion.name} "
                                  f"already; {direction} again would convert it twice")
        conversion = _subset(conversion, provenance.get("fired", []))
        chosen += " (undoing exactly the recorded rules)"
    # header entries have shape and dtype: planning reads them as they are (200k+ keys)
    metas = {k: e for s in ckpt.shards for k, e in s.entries.items()}
    plan = conversion.plan(metas, plan_config, direction=direction, strict=strict,
                           policies=policies)
    shards = plan_shards(plan, max_shard_size)
    per_rule = {plan.rules[i].label: n for i, n in sorted(plan.rule_counts.items())}
    report = ConvertReport(
        conversion=conversion.name, direction=direction, src=src, dst=None if dry_run else
        Path(dst) if dst is not None else None, selected_by=chosen, tensors_in=len(metas),
        tensors_out=len(plan.outputs), bytes_out=plan.output_bytes(), shards=len(shards),
        per_rule=per_rule, passthrough=plan.passthrough, lossy_steps=plan.lossy(),
        dry_run=dry_run)
    new_config, new_hf_quant, notes = _map_configs(plan, config, hf_quant)
    report.notes = notes
    if dry_run:
        report.seconds = time.perf_counter() - started
        return report
    if dst is None:
        raise ConversionError("no destination folder given")
    if workers is None:
        workers = default_workers()
    _check_memory(plan, workers)
    dst = Path(dst)
    _check_paths(root, dst)
    clean_stale(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} exists; pass --force to replace it")
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # unique even if a pid is reused
    tmp = dst.parent / f".{dst.name}{TMP_MARK}{token}"
    run = RunReport()
    n = len(conversion.program.rules)
    fired = sorted(plan.rule_counts) if direction == "apply" else sorted(
        n - 1 - i for i in plan.rule_counts)
    provenance_out: dict[str, Any] = {
        "conversion": conversion.name, "direction": direction, "fired": fired,
        "rules": [plan.rules[i].label for i in sorted(plan.rule_counts)],
        "policies": sorted(policies), "version": _version()}
    if report.lossy_steps:  # where precision may be lost; what was lost is in the report
        provenance_out["lossy_steps"] = report.lossy_steps
    try:
        tmp.mkdir(parents=True)
        metadata = {"format": "pt", PROVENANCE_KEY: json.dumps(provenance_out, sort_keys=True)}
        report.stats = write_checkpoint(plan, ckpt, tmp, shards, metadata, workers=workers,
                                        report=run, quiet=quiet, durable=fsync)
        report.lossy = [str(e) for e in run.lossy]
        _write_index(tmp, plan, shards, provenance_out)
        _copy_other_files(root, tmp, new_config, new_hf_quant)
        if fsync:
            _sync_tree(tmp)
        _swap_in(tmp, dst, force, token)
        if fsync:
            _sync_dir(dst.parent)
    except BaseException:
        _remove(tmp)
        raise
    report.seconds = time.perf_counter() - started
    return report


def default_workers() -> int:
    """Parallel writers by default: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _check_memory(plan: P.Plan, workers: int) -> None:
    """Refuse, before writing, a conversion whose largest computed output cannot fit in memory
    (a clear error instead of an out-of-memory kill halfway)."""
    from convlens.runtime import disk

    need, key = disk.largest_computed(plan)
    have = disk.available_memory()
    if have is None or not need:
        return
    need *= max(1, min(workers, len(plan.outputs)))  # workers may compute at the same time
    if need > have:
        raise ConversionError(
            f"{key} is computed in memory (not a byte copy) and needs about {need / 2**30:.1f} "
            f"GiB with {workers} worker(s); {have / 2**30:.1f} GiB are available", key=key,
            hint="free memory, or use --workers 1")


def _version() -> str:
    from convlens import __version__

    return __version__


def _map_configs(plan: P.Plan, config: dict[str, Any], hf_quant: dict[str, Any] | None
                 ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    try:
        from convlens.configs import map_quantization_configs
    except ImportError:  # pragma: no cover - configs.py is part of the package
        return config or None, hf_quant, []
    return map_quantization_configs(plan.key_map, config or None, hf_quant)


def _write_index(folder: Path, plan: P.Plan, shards: list[Any], provenance: Mapping[str, Any]
                 ) -> None:
    if len(shards) <= 1:
        return
    weight_map = {k: s.name for s in shards for k in s.keys}
    index = {"metadata": {"total_size": plan.output_bytes()},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_other_files(src: Path, dst: Path, config: dict[str, Any] | None,
                      hf_quant: dict[str, Any] | None) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or rel.parts[0].startswith(".") or path.suffix == ".safetensors":
            continue
        if rel.name == INDEX_NAME and len(rel.parts) == 1:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() == "config.json" and config is not None:
            target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        elif rel.as_posix() == "hf_quant_config.json" and hf_quant is not None:
            target.write_text(json.dumps(hf_quant, indent=4) + "\n", encoding="utf-8")
        else:
            shutil.copy2(path, target)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file below ``folder`` that is not yet on disk, then the folders."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            _sync_dir(path)
        elif not path.name.endswith(".safetensors"):  # shards were synced as they were written
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_dir(folder)


def _swap_in(tmp: Path, dst: Path, force: bool, token: str) -> None:
    if dst.exists() or dst.is_symlink():
        if not force:  # pragma: no cover - checked before writing
            raise ConversionError(f"{dst} exists; pass --force to replace it")
        old = dst.parent / f".{dst.name}{OLD_MARK}{token}"
        dst.rename(old)
        tmp.rename(dst)
        _remove(old)
    else:
        tmp.rename(dst)


@dataclass
class VerifyReport:
    src: Path
    dst: Path
    conversion: str
    direction: str
    stats: VerifyStats
    config_problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.stats.mismatches and not self.config_problems

    def summary(self) -> str:
        s = self.stats
        head = (f"verify {self.direction} {self.conversion}: {self.src} -> {self.dst}: "
                f"{'ok' if self.ok else 'MISMATCH'}: {s.tensors} tensors, {s.bytes / 1e9:.3f} GB "
                f"recomputed and compared in {s.seconds:.2f} s")
        return "\n".join([head, *(f"  {m}" for m in s.mismatches),
                          *(f"  config: {c}" for c in self.config_problems)])


def verify_checkpoint(src: str | Path, dst: str | Path, rules: str | Path | None = None,
                      *, workers: int | None = None) -> VerifyReport:
    """Check a converted checkpoint against its source without trusting the writer: the
    conversion is taken from the destination's provenance (or ``rules``), every output tensor is
    recomputed from the source and compared byte for byte, the key sets are accounted for, and
    the configs are checked against the ones the conversion maps."""
    src, dst = Path(src), Path(dst)
    src_ckpt, dst_ckpt = open_checkpoint(src), open_checkpoint(dst)
    provenance = read_provenance(dst_ckpt)
    if provenance is None and rules is None:
        raise ConversionError(f"{dst} carries no convlens provenance; pass --rules to say which "
                              "conversion made it")
    direction: Direction = (provenance or {}).get("direction", "revert")
    conversion = load_rules(rules if rules is not None else provenance["conversion"])  # type: ignore[index]
    if provenance is not None and provenance["conversion"] == conversion.name:
        conversion = _subset(conversion, provenance["fired"])
    config = _read_json(src_ckpt.root / "config.json") or {}
    hf_quant = _read_json(src_ckpt.root / "hf_quant_config.json")
    plan_config = dict(config)
    if hf_quant is not None:
        plan_config["hf_quant_config"] = hf_quant
    metas = {k: e for s in src_ckpt.shards for k, e in s.entries.items()}
    policies = (provenance or {}).get("policies", [])
    plan = conversion.plan(metas, plan_config, direction=direction, policies=policies)
    stats = verify_outputs(plan, src_ckpt, dst_ckpt,
                           workers=default_workers() if workers is None else workers)
    problems = []
    new_config, new_hf_quant, _ = _map_configs(plan, config, hf_quant)
    for name, want in (("config.json", new_config), ("hf_quant_config.json", new_hf_quant)):
        if want is None:
            continue
        got = _read_json(dst_ckpt.root / name)
        if got != want:
            problems.append(f"{name} differs from the one the conversion maps")
    return VerifyReport(src, dst, conversion.name, direction, stats, problems)
