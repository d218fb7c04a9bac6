"""Lossy steps are opt-in: refused by default with the values in the message; with a policy the
dequantized error is bounded and reported. NVFP4 `rescale` is compared with vLLM's naive max
(keep the largest weight_scale_2, leave the block scales alone) and FP8 `requantize` with the
same naive max."""

from __future__ import annotations

import pytest
import torch

import convlens
from convlens.checking import _dequantized, _stems
from convlens.runtime.report import RunReport

FUSE = 'conversion t\nfuse "{p*}.gate_proj", "{p*}.up_proj" -> "{p*}.gate_up_proj" by concat(0)\n'
HIDDEN, INTER = 64, 32


def nvfp4_part(seed: int, s2: float, input_scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # block scales drawn like a real export: amax/6 of each 16-block, so mid-range in fp8
    return {"weight": torch.randint(0, 256, (INTER, HIDDEN // 2), generator=g,
                                    dtype=torch.uint8),
            "weight_scale": (torch.rand(INTER, HIDDEN // 16, generator=g) * 200 + 20).to(
                torch.float8_e4m3fn),
            "weight_scale_2": torch.tensor(s2),
            "input_scale": torch.tensor(input_scale)}


def fp8_part(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(INTER, HIDDEN, generator=g) * 100).clamp(-440, 440).to(torch.float8_e4m3fn)
    return {"weight": w, "weight_scale": torch.tensor(scale), "input_scale": torch.tensor(0.5)}


def state(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"model.mlp.{name}.{role}": t for name, roles in parts.items()
            for role, t in roles.items()}


def logical(conv: convlens.Conversion, sd: dict[str, torch.Tensor], fused: bool
            ) -> torch.Tensor:
    rule = conv.program.rules[0]
    ep = rule.dst if fused else rule.src
    out = _dequantized(_stems(ep.patterns, ep.naming, sd), sd, None, ep.naming, frozenset())
    if fused:
        return out["model.mlp.gate_up_proj.weight"]
    return torch.cat([out["model.mlp.gate_proj.weight"], out["model.mlp.up_proj.weight"]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_unequal_weight_scale_2_is_refused_by_default_with_the_values() -> None:
    conv = convlens.Conversion(convlens.compile_text(FUSE))
    sd = state({"gate_proj": nvfp4_part(1, 0.01, 0.5), "up_proj": nvfp4_part(2, 0.04, 0.5)})
    with pytest.raises(convlens.ConversionError) as info:
        conv.apply(sd)
    text = str(info.value)
    assert "weight_scale_2" in text and "0.009999999776482582 vs 0.03999999910593033" in text
    assert "rescale" in (info.value.hint or "")


def test_nvfp4_rescale_is_bounded_and_beats_naive_max() -> None:
    conv = convlens.Conversion(convlens.compile_text(FUSE))
    # a 3x difference: the ratio 1/3 is not a power of two, so rescaling rounds
    sd = state({"gate_proj": nvfp4_part(1, 0.01, 0.5), "up_proj": nvfp4_part(2, 0.03, 0.7)})
    truth = logical(conv, sd, fused=False)
    report = RunReport()
    out = conv.apply(sd, policies=["rescale", "max"], report=report)
    rescaled = rel(logical(conv, out, fused=True), truth)
    # vLLM's behaviour: one weight_scale_2 (the max) for both parts, block scales untouched
    naive = dict(sd)
    naive["model.mlp.gate_proj.weight_scale_2"] = torch.tensor(0.03)
    naive_err = rel(logical(conv, naive, fused=False), truth)
    assert 0 < rescaled < 0.02, rescaled
    assert naive_err > 0.5, naive_err
    actions = {(e.action, e.role) for e in report.lossy}
    assert ("rescale", "weight_scale") in actions
    assert ("reconcile (max)", "weight_scale_2") in actions
    assert ("reconcile (max)", "input_scale") in actions
    rescale = next(e for e in report.lossy if e.action == "rescale")
    assert rescale.naive_rel_error == pytest.approx(2 / 3, rel=1e-6)
    assert rescale.max_rel_error < 0.07  # one fp8 rounding of the block scale
    assert float(out["model.mlp.gate_up_proj.input_scale"]) == pytest.approx(0.7)


def test_equal_scales_take_no_lossy_step_even_with_policies() -> None:
    conv = convlens.Conversion(convlens.compile_text(FUSE))
    sd = state({"gate_proj": nvfp4_part(1, 0.02, 0.5), "up_proj": nvfp4_part(2, 0.02, 0.5)})
    report = RunReport()
    exact = conv.apply(sd)
    out = conv.apply(sd, policies=["rescale", "max", "requantize"], report=report)
    assert report.lossy == []
    assert all(torch.equal(out[k].view(torch.uint8) if out[k].dtype == torch.float8_e4m3fn
                           else out[k], exact[k].view(torch.uint8)
                           if exact[k].dtype == torch.float8_e4m3fn else exact[k])
               for k in exact)


def test_fp8_requantize_is_bounded_and_reported() -> None:
    conv = convlens.Conversion(convlens.compile_text(FUSE))
    sd = state({"gate_proj": fp8_part(3, 0.001), "up_proj": fp8_part(4, 0.0013)})
    with pytest.raises(convlens.ConversionError):
        conv.apply(sd)
    truth = logical(conv, sd, fused=False)
    report = RunReport()
    out = conv.apply(sd, policies=["requantize"], report=report)
    err = rel(logical(conv, out, fused=True), truth)
    naive = dict(sd)
    naive["model.mlp.gate_proj.weight_scale"] = torch.tensor(0.0013)
    naive_err = rel(logical(conv, naive, fused=False), truth)
    assert err < 0.05, err
    assert naive_err > 0.1, naive_err
    event = next(e for e in report.lossy if e.action == "rescale")
    assert event.role == "weight" and 0 < event.max_rel_error < 0.13


def test_policies_are_named_in_the_plan() -> None:
    conv = convlens.Conversion(convlens.compile_text(FUSE))
    sd = state({"gate_proj": nvfp4_part(1, 0.01, 0.5), "up_proj": nvfp4_part(2, 0.04, 0.5)})
    plan = conv.plan(convlens.api.metas_of(sd), policies=["rescale"])
    lossy = plan.lossy()
    assert any("rescale weight_scale" in line for line in lossy)
    with pytest.raises(convlens.ConversionError, match="unknown lossy policy 'rescal'"):
        conv.plan(convlens.api.metas_of(sd), policies=["rescal"])
