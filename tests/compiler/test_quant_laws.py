"""Laws 1, 2, 4, 6 and 3 (dequantization commutes) for every shipped rule file x every scheme,
on generated state dicts whose stems are stored in that scheme (hypothesis picks the seeds).

A (rule file, scheme) pair may only fail with one of the designed refusals: a split or concat
that is not aligned to the scheme's packing or blocks, or a row permutation across blocks that
would need requantizing. The MoE families must pass for every scheme.

Files with tensor rules run here (three seeds for the families in MUST_PASS, one for the rest;
one file per distinct set of tensor rules, since includers share their family's rules);
a file of renames only moves every role of a stem as it is, whatever the scheme, which
test_renames_carry_every_role_whatever_the_scheme checks once per file and scheme family."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convlens import ConversionError, load_rules, shipped_rules
from convlens.checking import check_dequant_commutes, check_laws, generate_state_dict
from convlens.compiler.samples import SampleError
from convlens.compiler.schemes import all_schemes

MUST_PASS = {"mixtral", "qwen2_moe", "minimax_m3_vl", "qwen3_vl_moe", "llava", "qwen2_vl"}
RULES = sorted(shipped_rules())
SCHEMES = [s.name for s in all_schemes()]


def _tensor_rules(name: str) -> bool:
    return any(r.kind in ("fuse", "split", "map") for r in load_rules(name).program.rules)


def _signature(name: str) -> tuple[str, ...]:
    """A file's tensor rules by origin: files that include the same family file share them."""
    return tuple(r.ref.label for r in load_rules(name).program.rules
                 if r.kind in ("fuse", "split", "map"))


def _one_per_signature(names: list[str]) -> list[str]:
    """The MUST_PASS families, then the first file of every other set of tensor rules (a file
    that includes qwen2_moe.conv and only adds renames lifts exactly what qwen2_moe does)."""
    seen = {_signature(n) for n in names if n in MUST_PASS}
    out = [n for n in names if n in MUST_PASS]
    for n in names:
        sig = _signature(n)
        if n not in MUST_PASS and sig not in seen:
            seen.add(sig)
            out.append(n)
    return sorted(out)


TENSOR_RULES = _one_per_signature([r for r in RULES if _tensor_rules(r)])
RENAMES_ONLY = [r for r in RULES if not _tensor_rules(r)]
DESIGNED = ("is not a multiple of", "would need requantizing")


def _scheme(name: str):  # type: ignore[no-untyped-def]
    return next(s for s in all_schemes() if s.name == name)


def _cases(families: bool) -> list[object]:
    return [pytest.param(rules, scheme, id=f"{rules}-{scheme}")
            for rules in TENSOR_RULES if (rules in MUST_PASS) == families for scheme in SCHEMES]


@pytest.mark.parametrize(("rules", "scheme"), _cases(families=True))
@settings(max_examples=3)
@given(seed=st.integers(0, 2**16))
def test_laws_hold_for_every_scheme(rules: str, scheme: str, seed: int) -> None:
    _laws(rules, scheme, seed)


@pytest.mark.parametrize(("rules", "scheme"), _cases(families=False))
@settings(max_examples=1)
@given(seed=st.integers(0, 2**16))
def test_laws_hold_for_every_scheme_in_every_other_file(rules: str, scheme: str,
                                                         seed: int) -> None:
    _laws(rules, scheme, seed)


@pytest.mark.parametrize("rules", RENAMES_ONLY)
@settings(max_examples=1)
@given(seed=st.integers(0, 2**16))
def test_renames_carry_every_role_whatever_the_scheme(rules: str, seed: int) -> None:
    """A rename moves whole stems: one packed, one blocked and one per-tensor scheme stand for
    the rest (the laws hold for them or the file would have tensor rules)."""
    for scheme in ("modelopt_nvfp4", "deepseek_fp8_block", "gptq"):
        _laws(rules, scheme, seed)


def _laws(rules: str, scheme: str, seed: int) -> None:
    conv = load_rules(rules)
    try:
        x, config = generate_state_dict(conv.program, seed, _scheme(scheme))
        check_laws(conv, x, config)
        compared = check_dequant_commutes(conv.program, x, config)
    except (ConversionError, SampleError) as exc:
        if rules in MUST_PASS or not any(p in str(exc) for p in DESIGNED):
            raise
        return
    if any(r.kind in ("fuse", "split", "map") for r in conv.program.rules):
        assert compared > 0
