"""Every shipped rule file passes ``convlens check``: compiles, its expects hold both ways, and
laws 1, 2, 4 and 6 hold on generated state dicts (hypothesis picks the seeds)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convlens import load_rules, shipped_rules
from convlens.checking import check_expectations, check_laws, check_program, generate_state_dict

NAMES = sorted(shipped_rules())


@pytest.mark.parametrize("name", NAMES)
def test_shipped_file_compiles_and_its_expects_hold(name: str) -> None:
    program = load_rules(name).program
    assert program.expects, f"{name} has no expect lines"
    assert check_expectations(program) == []


@pytest.mark.parametrize("name", NAMES)
def test_shipped_file_serves_model_types_or_architectures(name: str) -> None:
    conv = load_rules(name)
    assert conv.model_types or conv.architectures


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(seed=st.integers(0, 2**20))
def test_laws_hold_on_generated_state_dicts(name: str, seed: int) -> None:
    conv = load_rules(name)
    x, config = generate_state_dict(conv.program, seed)
    check_laws(conv, x, config)


def test_check_program_reports_a_broken_expect() -> None:
    from convlens import compile_text

    program = compile_text(
        'conversion t\nrename "{p*}.a" -> "{p*}.b"\nexpect "x.a.weight" -> "x.c.weight"', "t.conv")
    report = check_program(program, range(1))
    assert not report.ok
    assert report.errors[0].message == (
        "expect 'x.a.weight' -> 'x.c.weight' fails: forward gives 'x.b.weight'; the inverse "
        "gives 'x.c.weight' for 'x.c.weight'")
