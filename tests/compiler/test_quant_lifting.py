"""Quantization-aware lifting on the shipped MoE rules: per-expert NVFP4 hub <-> stacked in memory.

The "done" scenario: for ``mixtral``, ``qwen2_moe`` and ``minimax_m3_vl`` a ModelOpt NVFP4 hub
state dict (every expert's gate/up/down with ``weight`` U8 ``[out, in/2]``, ``weight_scale``
F8_E4M3 ``[out, in/16]``, a 0-d ``weight_scale_2`` of its own and a 0-d ``input_scale`` shared by
all experts; for minimax_m3_vl also a dense NVFP4 MLP and shared experts whose gate and up share
one ``weight_scale_2``, as ModelOpt unifies them, under the VLM prefix ``language_model.model``)

- applies to the in-memory layout: ``experts.gate_up_proj`` U8 ``[E, 2I, H/2]``,
  ``gate_up_proj_weight_scale`` ``[E, 2I, H/16]``, ``gate_up_proj_weight_scale_2`` ``[E]``, one
  0-d ``gate_up_proj_input_scale``; dense ``gate_up_proj.weight`` ``[2I, H/2]``;
- equals an in-memory state dict stacked here with torch.stack / torch.cat, and that one reverts
  to the hub tensors bit for bit; ``revert(apply(x)) == x`` bit for bit;
- dequantizes the same on both sides (law 3, float64, exact);
- refuses what it cannot do losslessly or cannot read: gate and up with different
  ``weight_scale_2``, a role the scheme does not know, a scale whose shape does not fit.

Everything here is built by hand; no transformers needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch
from bitexact import assert_bit_exact

import convlens
from convlens.compiler.layout import RoleMeta, detect
from convlens.compiler.schemes import all_schemes
from convlens.runtime.dequant import dequantize
from convlens.runtime.dtypes import dtype_name

StateDict = dict[str, torch.Tensor]
ROLES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
E, H, I, DI = 4, 64, 32, 48  # noqa: E741  (experts, hidden, expert / dense intermediate)

# --- helpers ---------------------------------------------------------------------------------


class Gen:
    """Deterministic random bytes. FP8 scales are any E4M3 bit pattern, NaN included unless
    ``finite`` (dequantization compares values, the round trips compare bytes)."""

    def __init__(self, seed: int, finite: bool = True) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.finite = finite

    def u8(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=self.g)

    def f8(self, *shape: int) -> torch.Tensor:
        b = self.u8(*shape)
        if self.finite:
            b = torch.where((b & 0x7F) == 0x7F, b ^ 0x01, b)
        return b.view(torch.float8_e4m3fn)

    def linear(self, out: int, inp: int, scale_2: float, input_scale: float
               ) -> dict[str, torch.Tensor]:
        """One ModelOpt NVFP4 linear, role -> tensor."""
        return {"weight": self.u8(out, inp // 2), "weight_scale": self.f8(out, inp // 16),
                "weight_scale_2": torch.tensor(scale_2, dtype=torch.float32),
                "input_scale": torch.tensor(input_scale, dtype=torch.float32)}


@dataclass(frozen=True)
class Family:
    rules: str
    expert: str  # hub stem of one expert projection: {l}, {e}, {w}
    names: tuple[str, str, str]  # gate, up, down
    experts_mem: str  # in-memory stem of the stacked experts: {l}
    moe_layers: tuple[int, ...]
    # dense (and shared-expert) MLPs whose gate/up are fused: (hub stem, in-memory stem)
    dense: tuple[tuple[str, str], ...] = ()
    # unquantized tensors: hub key -> in-memory key
    plain: dict[str, str] = field(default_factory=dict)


FAMILIES = {
    "mixtral": Family(
        "mixtral", "model.layers.{l}.block_sparse_moe.experts.{e}.{w}", ("w1", "w3", "w2"),
        "model.layers.{l}.mlp.experts", (0, 1),
        plain={"model.layers.0.block_sparse_moe.gate.weight": "model.layers.0.mlp.gate.weight",
               "model.embed_tokens.weight": "model.embed_tokens.weight"}),
    "qwen2_moe": Family(
        "qwen2_moe", "model.layers.{l}.mlp.experts.{e}.{w}", ("gate_proj", "up_proj", "down_proj"),
        "model.layers.{l}.mlp.experts", (0, 1),
        plain={"model.layers.1.mlp.gate.weight": "model.layers.1.mlp.gate.weight",
               "model.layers.1.mlp.shared_expert_gate.weight":
                   "model.layers.1.mlp.shared_expert_gate.weight"}),
    "minimax_m3_vl": Family(
        "minimax_m3_vl", "language_model.model.layers.{l}.block_sparse_moe.experts.{e}.{w}",
        ("w1", "w3", "w2"), "model.language_model.layers.{l}.mlp.experts", (1,),
        dense=(("language_model.model.layers.0.mlp", "model.language_model.layers.0.mlp"),
               ("language_model.model.layers.1.block_sparse_moe.shared_experts",
                "model.language_model.layers.1.mlp.shared_experts")),
        plain={"language_model.lm_head.weight": "lm_head.weight",
               "language_model.model.layers.1.block_sparse_moe.gate.weight":
                   "model.language_model.layers.1.mlp.gate.weight",
               "language_model.model.layers.1.block_sparse_moe.e_score_correction_bias":
                   "model.language_model.layers.1.mlp.gate.e_score_correction_bias"}),
}


@dataclass
class Built:
    hub: StateDict
    mem: StateDict  # stacked here, independently of convlens
    per: dict[tuple[int, int, str], dict[str, torch.Tensor]]  # (layer, expert, proj) -> roles
    dense: dict[tuple[str, str], dict[str, torch.Tensor]]  # (hub stem, proj) -> roles


def build(fam: Family, seed: int = 0, finite: bool = True) -> Built:
    gen = Gen(seed, finite)
    gate, up, down = fam.names
    hub: StateDict = {}
    mem: StateDict = {}
    per: dict[tuple[int, int, str], dict[str, torch.Tensor]] = {}
    for layer in fam.moe_layers:
        inp_gu, inp_d = 0.0625 + layer / 64, 0.1875 + layer / 64  # one per layer, all experts
        for e in range(E):
            s2_gu, s2_d = 0.5 + e / 8 + layer, 1.25 + e / 4 + layer
            per[layer, e, gate] = gen.linear(I, H, s2_gu, inp_gu)
            per[layer, e, up] = gen.linear(I, H, s2_gu, inp_gu)
            per[layer, e, down] = gen.linear(H, I, s2_d, inp_d)
            for w in fam.names:
                for role, t in per[layer, e, w].items():
                    hub[f"{fam.expert.format(l=layer, e=e, w=w)}.{role}"] = t
        stem = fam.experts_mem.format(l=layer)
        experts = range(E)
        mem[f"{stem}.gate_up_proj"] = torch.stack(
            [torch.cat([per[layer, e, gate]["weight"], per[layer, e, up]["weight"]], 0)
             for e in experts])
        mem[f"{stem}.gate_up_proj_weight_scale"] = torch.stack(
            [torch.cat([per[layer, e, gate]["weight_scale"], per[layer, e, up]["weight_scale"]],
                       0) for e in experts])
        mem[f"{stem}.gate_up_proj_weight_scale_2"] = torch.stack(
            [per[layer, e, gate]["weight_scale_2"] for e in experts])
        mem[f"{stem}.gate_up_proj_input_scale"] = per[layer, 0, gate]["input_scale"]
        mem[f"{stem}.down_proj"] = torch.stack([per[layer, e, down]["weight"] for e in experts])
        for role in ("weight_scale", "weight_scale_2"):
            mem[f"{stem}.down_proj_{role}"] = torch.stack(
                [per[layer, e, down][role] for e in experts])
        mem[f"{stem}.down_proj_input_scale"] = per[layer, 0, down]["input_scale"]
    dense: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, (hub_stem, mem_stem) in enumerate(fam.dense):
        s2 = 0.375 + k  # ModelOpt unifies weight_scale_2 (and input_scale) over gate and up
        for w, (o, i) in (("gate_proj", (DI, H)), ("up_proj", (DI, H)), ("down_proj", (H, DI))):
            dense[hub_stem, w] = gen.linear(o, i, s2 if w != "down_proj" else 2.5 + k,
                                            0.03125 if w != "down_proj" else 0.09375)
            for role, t in dense[hub_stem, w].items():
                hub[f"{hub_stem}.{w}.{role}"] = t
        g, u, d = (dense[hub_stem, w] for w in ("gate_proj", "up_proj", "down_proj"))
        for role in ("weight", "weight_scale"):
            mem[f"{mem_stem}.gate_up_proj.{role}"] = torch.cat([g[role], u[role]], 0)
        for role in ("weight_scale_2", "input_scale"):
            mem[f"{mem_stem}.gate_up_proj.{role}"] = g[role]
        for role, t in d.items():
            mem[f"{mem_stem}.down_proj.{role}"] = t
    for hub_key, mem_key in fam.plain.items():
        t = torch.randn(E if "gate" in hub_key else 8, H, generator=gen.g).to(torch.bfloat16)
        if hub_key.endswith("e_score_correction_bias"):
            t = torch.randn(E, generator=gen.g)
        hub[hub_key] = t
        mem[mem_key] = t
    return Built(hub, mem, per, dense)


def dequant(roles: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A stem's logical float64 tensor, through the shipped scheme detection."""
    metas = {r: RoleMeta(tuple(t.shape), dtype_name(t.dtype)) for r, t in roles.items()}
    found = detect(all_schemes(), metas, None)
    assert not isinstance(found, str), found
    assert found.scheme.name == "modelopt_nvfp4", found.scheme.name
    return dequantize(found.scheme, roles, {r: f.layout for r, f in found.roles.items()},
                      {r: f.view for r, f in found.roles.items()}, found.axes, found.shape)


def param_roles(sd: Mapping[str, torch.Tensor], stem: str) -> dict[str, torch.Tensor]:
    """The roles of a ``naming param`` stem: ``stem`` is the weight, ``stem_ROLE`` the others."""
    return {"weight": sd[stem], **{r: sd[f"{stem}_{r}"] for r in ROLES[1:]}}


def module_roles(sd: Mapping[str, torch.Tensor], stem: str) -> dict[str, torch.Tensor]:
    return {r: sd[f"{stem}.{r}"] for r in ROLES}


ALL = sorted(FAMILIES)


# --- the in-memory layout and the round trips ----------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_apply_stacks_nvfp4_experts_into_the_in_memory_layout(name: str) -> None:
    fam = FAMILIES[name]
    b = build(fam)
    mem = convlens.load_rules(fam.rules).apply(b.hub)
    for layer in fam.moe_layers:
        stem = fam.experts_mem.format(l=layer)
        shapes = {
            f"{stem}.gate_up_proj": ((E, 2 * I, H // 2), torch.uint8),
            f"{stem}.gate_up_proj_weight_scale": ((E, 2 * I, H // 16), torch.float8_e4m3fn),
            f"{stem}.gate_up_proj_weight_scale_2": ((E,), torch.float32),
            f"{stem}.gate_up_proj_input_scale": ((), torch.float32),
            f"{stem}.down_proj": ((E, H, I // 2), torch.uint8),
            f"{stem}.down_proj_weight_scale": ((E, H, I // 16), torch.float8_e4m3fn),
            f"{stem}.down_proj_weight_scale_2": ((E,), torch.float32),
            f"{stem}.down_proj_input_scale": ((), torch.float32),
        }
        for key, (shape, dtype) in shapes.items():
            assert key in mem, f"{key} missing; got {sorted(mem)}"
            assert (tuple(mem[key].shape), mem[key].dtype) == (shape, dtype), key
    for _, mem_stem in fam.dense:
        for key, shape in ((f"{mem_stem}.gate_up_proj.weight", (2 * DI, H // 2)),
                           (f"{mem_stem}.gate_up_proj.weight_scale", (2 * DI, H // 16)),
                           (f"{mem_stem}.gate_up_proj.weight_scale_2", ()),
                           (f"{mem_stem}.gate_up_proj.input_scale", ()),
                           (f"{mem_stem}.down_proj.weight", (H, DI // 2))):
            assert tuple(mem[key].shape) == shape, key
    assert_bit_exact(mem, b.mem, f"{name}: apply vs torch.stack/cat by hand")


@pytest.mark.parametrize("name", ALL)
def test_revert_of_apply_is_bit_exact_on_nvfp4_experts(name: str) -> None:
    """Any E4M3 bit pattern (NaN included) survives both ways."""
    fam = FAMILIES[name]
    b = build(fam, seed=1, finite=False)
    conv = convlens.load_rules(fam.rules)
    mem = conv.apply(b.hub)
    assert_bit_exact(conv.revert(mem), b.hub, f"{name}: revert(apply(x))")


@pytest.mark.parametrize("name", ALL)
def test_independently_stacked_in_memory_nvfp4_reverts_to_the_per_expert_hub(name: str) -> None:
    fam = FAMILIES[name]
    b = build(fam, seed=2)
    conv = convlens.load_rules(fam.rules)
    hub = conv.revert(b.mem)
    assert_bit_exact(hub, b.hub, f"{name}: revert of the hand-stacked state dict")
    gate, up, _ = fam.names
    for layer in fam.moe_layers:
        for e in range(E):
            for w in (gate, up):
                t = hub[f"{fam.expert.format(l=layer, e=e, w=w)}.weight_scale_2"]
                assert t.shape == () and t.item() == 0.5 + e / 8 + layer
    assert_bit_exact(conv.apply(hub), b.mem, f"{name}: apply(revert(y))")


# --- law 3: dequantization commutes with the conversion ------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_dequantized_in_memory_experts_equal_stacked_per_expert_dequantization(name: str) -> None:
    fam = FAMILIES[name]
    b = build(fam, seed=3)
    mem = convlens.load_rules(fam.rules).apply(b.hub)
    gate, up, down = fam.names
    for layer in fam.moe_layers:
        stem = fam.experts_mem.format(l=layer)
        got = dequant(param_roles(mem, f"{stem}.gate_up_proj"))
        want = torch.stack([torch.cat([dequant(b.per[layer, e, gate]),
                                       dequant(b.per[layer, e, up])], 0) for e in range(E)])
        assert got.dtype == torch.float64 and got.shape == (E, 2 * I, H)
        assert torch.equal(got, want), f"{name} layer {layer}: gate_up"
        assert torch.isfinite(want).all() and want.abs().sum() > 0
        got = dequant(param_roles(mem, f"{stem}.down_proj"))
        want = torch.stack([dequant(b.per[layer, e, down]) for e in range(E)])
        assert torch.equal(got, want), f"{name} layer {layer}: down"
    for hub_stem, mem_stem in fam.dense:
        got = dequant(module_roles(mem, f"{mem_stem}.gate_up_proj"))
        want = torch.cat([dequant(b.dense[hub_stem, "gate_proj"]),
                          dequant(b.dense[hub_stem, "up_proj"])], 0)
        assert got.shape == (2 * DI, H) and torch.equal(got, want), f"{name}: {mem_stem}"


# --- refusals ------------------------------------------------------------------------------------


def _differing_weight_scale_2(name: str, where: str) -> tuple[Family, StateDict, str, str]:
    """A hub state dict where one gate/up pair has different weight_scale_2; the two keys."""
    fam = FAMILIES[name]
    hub = build(fam, seed=4).hub
    gate, up, _ = fam.names
    if where == "experts":
        layer = fam.moe_layers[-1]
        k_gate = f"{fam.expert.format(l=layer, e=1, w=gate)}.weight_scale_2"
        k_up = f"{fam.expert.format(l=layer, e=1, w=up)}.weight_scale_2"
    else:
        hub_stem = fam.dense[0][0]
        k_gate, k_up = f"{hub_stem}.gate_proj.weight_scale_2", f"{hub_stem}.up_proj.weight_scale_2"
    hub[k_gate] = torch.tensor(0.75)
    hub[k_up] = torch.tensor(1.5)
    return fam, hub, k_gate, k_up


DIFFERING = [("mixtral", "experts"), ("qwen2_moe", "experts"), ("minimax_m3_vl", "experts"),
             ("minimax_m3_vl", "dense")]


@pytest.mark.parametrize(("name", "where"), DIFFERING)
def test_fusing_gate_up_with_different_weight_scale_2_is_refused_by_default(
        name: str, where: str) -> None:
    fam, hub, k_gate, k_up = _differing_weight_scale_2(name, where)
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules(fam.rules).apply(hub)
    msg = str(info.value)
    assert "weight_scale_2" in msg
    assert k_up in msg or k_gate in msg, msg


@pytest.mark.parametrize(("name", "where"), DIFFERING)
def test_refused_weight_scale_2_fusion_reports_both_values(name: str, where: str) -> None:
    fam, hub, _, _ = _differing_weight_scale_2(name, where)
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules(fam.rules).apply(hub)
    msg = str(info.value)
    assert "0.75" in msg and "1.5" in msg, msg  # [E] vectors too (compared after stack(e))


@pytest.mark.parametrize("name", ALL)
def test_input_scale_that_differs_across_experts_is_refused(name: str) -> None:
    """input_scale is one value for all experts (shared): stacking keeps one, so unequal values
    are an error with both values, not a silent pick."""
    fam = FAMILIES[name]
    hub = build(fam, seed=5).hub
    layer = fam.moe_layers[-1]
    for w in fam.names[:2]:
        hub[f"{fam.expert.format(l=layer, e=2, w=w)}.input_scale"] = torch.tensor(0.25)
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules(fam.rules).apply(hub)
    msg = str(info.value)
    assert "input_scale" in msg and "0.25" in msg, msg


@pytest.mark.parametrize("name", ALL)
def test_unknown_role_next_to_an_expert_weight_is_an_error(name: str) -> None:
    fam = FAMILIES[name]
    gate = fam.names[0]
    conv = convlens.load_rules(fam.rules)
    b = build(fam, seed=6)
    layer = fam.moe_layers[0]
    hub = dict(b.hub)
    hub[f"{fam.expert.format(l=layer, e=0, w=gate)}.weight_foo"] = torch.zeros(3)
    with pytest.raises(convlens.ConversionError) as info:
        conv.apply(hub)
    assert "weight_foo" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_role_the_scheme_does_not_model_next_to_stacked_experts_is_an_error(name: str) -> None:
    """In memory (``naming param``): ``gate_up_proj_k_scale`` (a KV-cache scale, which
    modelopt_nvfp4 does not describe on an MLP weight) next to the stacked weight is refused,
    not split or unstacked by a guess."""
    fam = FAMILIES[name]
    mem = dict(build(fam, seed=6).mem)
    key = f"{fam.experts_mem.format(l=fam.moe_layers[0])}.gate_up_proj_k_scale"
    mem[key] = torch.ones(E, dtype=torch.float32)
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules(fam.rules).revert(mem)
    assert "k_scale" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_nvfp4_awq_pre_quant_scale_goes_to_both_gate_and_up(name: str) -> None:
    """NVFP4_AWQ's per-input ``pre_quant_scale`` next to stacked experts: gate and up read the
    same input, so each expert's w1 and w3 get that expert's vector back."""
    fam = FAMILIES[name]
    mem = dict(build(fam, seed=6).mem)
    stem = fam.experts_mem.format(l=fam.moe_layers[0])
    pqs = torch.arange(E * H, dtype=torch.float32).reshape(E, H).bfloat16()
    mem[f"{stem}.gate_up_proj_pre_quant_scale"] = pqs
    hub = convlens.load_rules(fam.rules).revert(mem)
    found = {k: v for k, v in hub.items() if k.endswith("pre_quant_scale")}
    assert len(found) == 2 * E
    for k, v in found.items():
        e = int(k.split(".experts.")[1].split(".")[0])
        assert torch.equal(v, pqs[e]), k


def test_unknown_role_next_to_a_dense_weight_is_an_error() -> None:
    fam = FAMILIES["minimax_m3_vl"]
    hub = build(fam, seed=7).hub
    hub[f"{fam.dense[0][0]}.up_proj.weight_foo"] = torch.zeros(3)
    with pytest.raises(convlens.ConversionError) as info:
        convlens.load_rules(fam.rules).apply(hub)
    assert "weight_foo" in str(info.value)


def _misfit_cases() -> list[tuple[str, str, str, tuple[int, ...], torch.dtype]]:
    """(family, side, role, bad shape, dtype): a scale whose shape the scheme cannot explain."""
    cases = []
    for name in ALL:
        cases += [(name, "hub", "weight_scale", (I, H // 8), torch.float8_e4m3fn),
                  (name, "hub", "weight_scale_2", (2,), torch.float32),
                  (name, "mem", "weight_scale", (E, 2 * I, H // 8), torch.float8_e4m3fn),
                  (name, "mem", "weight_scale_2", (E + 1,), torch.float32)]
    return cases


@pytest.mark.parametrize(("name", "side", "role", "shape", "dtype"), _misfit_cases())
def test_scale_whose_shape_does_not_fit_the_scheme_is_an_error_naming_the_role(
        name: str, side: str, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    fam = FAMILIES[name]
    b = build(fam, seed=8)
    layer = fam.moe_layers[0]
    bad = torch.ones(shape, dtype=torch.float32).to(dtype)
    conv = convlens.load_rules(fam.rules)
    if side == "hub":
        sd = dict(b.hub)
        sd[f"{fam.expert.format(l=layer, e=1, w=fam.names[0])}.{role}"] = bad
        run = conv.apply
    else:
        sd = dict(b.mem)
        sd[f"{fam.experts_mem.format(l=layer)}.gate_up_proj_{role}"] = bad
        run = conv.revert
    with pytest.raises(convlens.ConversionError) as info:
        run(sd)
    msg = str(info.value)
    assert f"{role} has shape {list(shape)}" in msg, msg
