"""``convlens check``: a rule file's inline expects and the laws of DESIGN.md on generated data.

For every rule, :mod:`convlens.compiler.samples` makes consistent tensors (filled with distinct
arange values, so a wrong row shows), carried back to the program's input layout. Then:

1. ``revert(apply(x)) == x`` bit for bit,
2. ``apply(revert(y)) == y``,
4. the plan made from names, shapes and dtypes equals what execution produces,
6. every input tensor is used, and keys no rule matches pass through as the same object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from convlens.api import Conversion, metas_of
from convlens.compiler import plan as P
from convlens.compiler.layout import PLAIN, Scheme
from convlens.compiler.planner import TensorMeta, plan
from convlens.compiler.program import Program
from convlens.compiler.samples import SampleError, sample_program
from convlens.compiler.trace import trace_key
from convlens.errors import ConversionError, ConvlensError, ExpectationError
from convlens.runtime.dtypes import TORCH_DTYPES
from convlens.runtime.execute import bit_equal, execute

DISTRACTORS = ("zz_unmatched.t00.weight", "zz_unmatched.t01.bias")


@dataclass
class CheckReport:
    name: str
    path: str
    expects: int = 0
    seeds: int = 0
    tensors: int = 0
    errors: list[ConvlensError] = field(default_factory=list)
    exact: list[str] = field(default_factory=list)  # schemes whose laws hold (incl. law 3)
    refused: dict[str, str] = field(default_factory=dict)  # scheme -> designed refusal

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        status = "ok" if self.ok else f"{len(self.errors)} error(s)"
        text = (f"{self.path}: {status}: {self.expects} expect(s), round trips on {self.seeds} "
                f"generated state dict(s) ({self.tensors} tensors)")
        if self.exact or self.refused:
            text += f"; schemes: {len(self.exact)} exact, {len(self.refused)} refused"
        return text

    def scheme_lines(self) -> list[str]:
        lines = [f"  exact: {', '.join(self.exact)}"] if self.exact else []
        lines += [f"  refused {name}: {why}" for name, why in sorted(self.refused.items())]
        return lines


# Refusals that a (rule, scheme) pair may meet by design: the scheme's packing or blocks do not
# line up with the rule's splits, or a row permutation would cross blocks.
DESIGNED_REFUSALS = ("is not a multiple of", "would need requantizing")


def make_tensor(meta: TensorMeta, fill: int) -> torch.Tensor:
    """Distinct, reproducible contents per tensor: arange values for floats (exact in float32 up
    to 2**24, so a wrong row shows), seeded random bits for quantized storage. FP8 avoids NaN
    bit patterns so that dequantized values compare."""
    n = 1
    for d in meta.shape:
        n *= d
    dtype = TORCH_DTYPES[meta.dtype]
    if dtype.is_floating_point and dtype.itemsize > 1:
        base = torch.arange(n, dtype=torch.float64) + (fill % 4096) * 4096
        return base.reshape(meta.shape).to(dtype)
    gen = torch.Generator().manual_seed(fill)
    if dtype.is_floating_point:  # fp8: random bytes without NaN (0x7f / 0xff)
        raw = torch.randint(0, 127, (n,), generator=gen, dtype=torch.int16)
        sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int16) * 128
        return (raw + sign).to(torch.uint8).view(dtype).reshape(meta.shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, meta.shape, generator=gen).to(torch.bool)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, meta.shape, generator=gen, dtype=torch.int64).to(dtype)


def check_expectations(program: Program) -> list[ConvlensError]:
    """Every ``expect "a" -> "b"``: a maps to b forward, and b maps back to a."""
    errors: list[ConvlensError] = []
    inverse = program.inverse()
    for exp in program.expects:
        fwd = trace_key(program, exp.src, exp.config)
        back = trace_key(inverse, exp.dst, exp.config)
        problems = []
        if fwd.note or not fwd.reaches(exp.dst):
            note = f" ({fwd.note})" if fwd.note else ""
            problems.append(f"forward gives {_list(fwd.results)}{note}")
        if back.note or not back.reaches(exp.src):
            problems.append(f"the inverse gives {_list(back.results)} for {exp.dst!r}"
                            + (f" ({back.note})" if back.note else ""))
        if problems:
            errors.append(ExpectationError(
                f"expect {exp.src!r} -> {exp.dst!r} fails: " + "; ".join(problems),
                span=exp.span))
    return errors


def _list(keys: Iterable[str]) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys) if keys else "nothing (dropped)"


def _run(program: Program, tensors: dict[str, torch.Tensor], config: Mapping[str, Any]
         ) -> dict[str, torch.Tensor]:
    p = plan(program, metas_of(tensors), config)
    return execute(p, tensors)


def generate_state_dict(program: Program, seed: int, scheme: Scheme = PLAIN
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict in the program's input layout that exercises every rule (tensor rules with
    stems stored in ``scheme``), and its config."""
    samples, config = sample_program(program, seed, scheme)
    out: dict[str, torch.Tensor] = {}
    for sample in samples:
        tensors = {k: make_tensor(m, sample.fills[k]) for k, m in sample.metas.items()}
        for k, values in sample.consts.items():
            meta = sample.metas[k]
            tensors[k] = torch.tensor(values, dtype=TORCH_DTYPES[meta.dtype]).reshape(meta.shape)
        if sample.prelude:
            pre = Program(program.name, program.path, (), (), tuple(sample.prelude))
            try:
                tensors = _run(pre, tensors, config)
            except ConversionError as exc:
                raise SampleError(f"{sample.rule.ref.label}: generated data does not pass the "
                                  f"earlier rules: {exc}") from exc
        for k, t in tensors.items():
            out.setdefault(k, t)
    # a rename of every key (either way) leaves no key to pass through: no distractors
    if program.catch_all() is None and program.inverse().catch_all() is None:
        for i, key in enumerate(DISTRACTORS):
            out[key] = make_tensor(TensorMeta((3,) if key.endswith("bias") else (3, 2), "F32"),
                                   4000 + i)
    return out, config


def check_laws(conversion: Conversion, x: dict[str, torch.Tensor], config: Mapping[str, Any]
               ) -> None:
    """Raise ConversionError if a law fails on ``x``."""
    p = conversion.plan(metas_of(x), config, direction="apply")
    y = execute(p, x)
    # law 4: the plan from headers equals what execution produced
    for key, node in p.outputs.items():
        t = y[key]
        if tuple(t.shape) != node.shape or TORCH_DTYPES[node.dtype] != t.dtype:
            raise ConversionError(f"law 4: plan says {node.dtype}{list(node.shape)}, execution "
                                  f"gave {t.dtype}{list(t.shape)}", key=key)
    # law 6: accounting
    used = {leaf.key for node in p.outputs.values() for leaf in P.leaves(node)}
    unused = [k for k in x if k not in used]
    if unused:
        raise ConversionError(f"law 6: input tensors not used: {unused[:5]}", key=unused[0])
    for key in DISTRACTORS:
        if key in x and y.get(key) is not x[key]:
            raise ConversionError("law 6: a key no rule matches must pass through unchanged",
                                  key=key)
    # law 1: revert(apply(x)) == x
    back = conversion.revert(y, config)
    _same_dicts("law 1: revert(apply(x)) != x", back, x)
    # law 2: apply(revert(y)) == y
    again = conversion.apply(back, config)
    _same_dicts("law 2: apply(revert(y)) != y", again, y)


def _same_dicts(what: str, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
                ) -> None:
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise ConversionError(f"{what}: keys differ (missing {missing[:3]}, extra {extra[:3]})")
    for k in want:
        if not bit_equal(got[k], want[k]):
            raise ConversionError(f"{what}: values differ", key=k)


def check_program(program: Program, seeds: Iterable[int] = range(3),
                  schemes: Iterable[Scheme] = ()) -> CheckReport:
    """Expects, laws 1, 2, 4, 6 on plain generated data for each seed, and for each scheme the
    same laws plus law 3 (dequantization commutes) on data stored in that scheme."""
    report = CheckReport(program.name, program.path)
    report.errors += check_expectations(program)
    report.expects = len(program.expects)
    conversion = Conversion(program)
    for seed in seeds:
        try:
            x, config = generate_state_dict(program, seed)
            check_laws(conversion, x, config)
        except SampleError as exc:
            report.errors.append(ConversionError(f"seed {seed}: cannot generate data: {exc}"))
            break
        except ConvlensError as exc:
            exc.message = f"seed {seed}: {exc.message}"
            report.errors.append(exc)
            break
        report.seeds += 1
        report.tensors += len(x)
    if schemes and not report.errors:
        for scheme in schemes:
            try:
                x, config = generate_state_dict(program, 0, scheme)
                check_laws(conversion, x, config)
                check_dequant_commutes(program, x, config)
            except (ConvlensError, SampleError) as exc:
                first = str(exc).splitlines()[0]
                if any(p in first for p in DESIGNED_REFUSALS):
                    report.refused[scheme.name] = first.split(": ", 1)[-1]
                    continue
                report.errors.append(ConversionError(f"scheme {scheme.name}: {first}"))
                continue
            report.exact.append(scheme.name)
    return report


def _stems(endpoint_patterns: Any, naming: Any, keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Stem -> role -> key, for the keys that a rule endpoint's patterns own."""
    from convlens.compiler.naming import owns, role_of

    out: dict[str, dict[str, str]] = {}
    for key in keys:
        for pat in endpoint_patterns:
            m = pat.match(key)
            if m is None or not owns(m.tail, naming):
                continue
            role = role_of(m.tail, naming)
            if role is not None:
                out.setdefault(m.stem, {})[role] = key
            break
    return out


def _dequantized(stems: dict[str, dict[str, str]], tensors: Mapping[str, torch.Tensor],
                 axes: tuple[str, ...] | None, naming: Any, hints: frozenset[str]
                 ) -> dict[str, torch.Tensor]:
    """Each stem as a plain float64 weight (and its bias, if any) under the same naming."""
    from convlens.compiler.layout import RoleMeta, detect
    from convlens.compiler.naming import key_for
    from convlens.compiler.schemes import all_schemes, companion_roles
    from convlens.runtime.dequant import dequantize
    from convlens.runtime.dtypes import dtype_name

    out: dict[str, torch.Tensor] = {}
    for stem, every in stems.items():
        # companions (KV-cache scales) scale activations, not this weight: not dequantized
        roles = {r: k for r, k in every.items() if r not in companion_roles()}
        metas = {r: RoleMeta(tuple(tensors[k].shape), dtype_name(tensors[k].dtype))
                 for r, k in roles.items()}
        found = detect(all_schemes(), metas, axes, hints)
        if isinstance(found, str):
            raise ConversionError(f"law 3: {stem}: {found}")
        values = {r: tensors[k] for r, k in roles.items()}
        layouts = {r: f.layout for r, f in found.roles.items()}
        views = {r: f.view for r, f in found.roles.items()}
        logical = dequantize(found.scheme, values, layouts, views, found.axes, found.shape)
        out[key_for(stem, "weight", naming)] = logical
        if "bias" in roles:
            out[key_for(stem, "bias", naming)] = tensors[roles["bias"]].to(torch.float64)
    return out


def check_dequant_commutes(program: Program, x: dict[str, torch.Tensor],
                           config: Mapping[str, Any]) -> int:
    """Law 3 for each tensor rule of ``program``: dequantizing the rule's results gives what
    the rule computes on dequantized inputs, exactly. Returns the number of stems compared."""
    from convlens.compiler.schemes import config_hints

    hints = config_hints(config)
    compared = 0
    state = dict(x)
    program = program.resolve(config)  # its patterns match keys here ({e+config.n})
    for rule in program.rules:
        one = Program(program.name, program.path, (), (), (rule,))
        p = plan(one, metas_of(state), config)
        y = execute(p, state)
        if rule.kind in ("fuse", "split", "map"):
            src = _stems(rule.src.patterns, rule.src.naming, state)
            dst = _stems(rule.dst.patterns, rule.dst.naming, y)
            plain_in = _dequantized(src, state, rule.src.axes, rule.src.naming, hints)
            rest = {k: v for k, v in state.items()
                    if not any(k in roles.values() for roles in src.values())}
            plain_out = execute(plan(one, metas_of({**rest, **plain_in}), config),
                                {**rest, **plain_in})
            got = _dequantized(dst, y, rule.dst.axes, rule.dst.naming, hints)
            for key, value in got.items():
                want = plain_out.get(key)
                if want is None or not bit_equal(value, want.to(torch.float64)):
                    raise ConversionError(
                        f"law 3: dequant(apply(x)) != apply(dequant(x)) for {rule.ref.label}",
                        key=key)
                compared += 1
        state = y
    return compared
