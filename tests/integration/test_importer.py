"""The importer (convlens/importer.py) against transformers' live conversion mapping.

1. Every key of the registry: the emitted text compiles, and either the importer translated every
   transform and the file passes ``check_program`` (what ``convlens check`` runs), or each left-out
   transform is reported with its reason.
2. A handful of families: the program imported from ``get_model_conversion_mapping(model)`` plans
   the keys of a tiny model's hub file onto exactly transformers' in-memory key set (and values).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from test_transformers_differential import (  # noqa: E402
    _finish,
    assert_same,
    llava,
    llava_hub,
    load_dir,
    qwen2_moe,
    qwen2_vl,
    state_of,
)

from convlens.api import Conversion, compile_text, metas_of  # noqa: E402
from convlens.checking import check_program  # noqa: E402
from convlens.cli import main  # noqa: E402
from convlens.importer import (  # noqa: E402
    ImportResult,
    import_all,
    import_model,
    import_transformers,
    registry,
    summary,
)

pytestmark = pytest.mark.transformers


@pytest.fixture(scope="module")
def everything() -> dict[str, ImportResult]:
    return import_all()


def test_every_registry_key_is_translated_and_checked_or_reported(
        everything: dict[str, ImportResult]) -> None:
    assert set(everything) == set(registry())
    checked_bodies: dict[str, bool] = {}
    for name, result in everything.items():
        program = compile_text(result.text, f"<{name}>")  # always compiles
        for u in result.untranslatable:
            assert u.key == name and u.item and u.reason, u
        if result.untranslatable:
            continue
        assert result.checked, f"{name}: nothing reported, but the checks did not run or pass"
        # independently of the importer's own run: the checks convlens check runs (plain data)
        body = "\n".join(r.text for r in program.rules)
        if body not in checked_bodies:
            report = check_program(program, range(3))
            checked_bodies[body] = report.ok
            assert report.ok, f"{name}:\n" + "\n".join(str(e) for e in report.errors)


def test_count_summary(everything: dict[str, ImportResult]) -> None:
    text = summary(everything)
    print("\n" + text)
    complete = sum(r.complete for r in everything.values())
    assert text.startswith(f"{len(everything)} keys: {complete} translated completely")
    # the families with shipped rule files translate completely
    for name in ("mixtral", "qwen2_moe", "qwen3_moe", "llava", "Qwen2VLForConditionalGeneration",
                 "nomic_bert", "qwen3_vl_moe"):
        assert everything[name].complete, (name, everything[name].untranslatable)
    # index arithmetic (LayerPairCollapse, the index offset, the Ernie op) is translated
    assert everything["dory"].complete, everything["dory"].untranslatable
    reasons = {u.reason for r in everything.values() for u in r.untranslatable}
    assert not any("gap" in r or "offset" in r or "LayerPairCollapse" in r for r in reasons)
    assert not any("Ernie" in u.item for r in everything.values() for u in r.untranslatable)
    # what cannot be expressed is reported, with the construct named
    assert any("custom tensor operation" in r for r in reasons)


def test_untranslated_transforms_are_comments_in_the_text(
        everything: dict[str, ImportResult]) -> None:
    result = everything["inkling2_text"]
    assert "# UNTRANSLATED: Inkling2UnpadVocab has no convlens op" in result.text
    assert ("# transformers: WeightRenaming('attn_res\\\\.output_query' -> 'final_input.query')"
            in result.text)


def test_index_arithmetic_is_translated(everything: dict[str, ImportResult]) -> None:
    dory = everything["dory"].text
    assert 'rename "{p*}.layers.{2*i+1}.mixer" -> "{p*}.layers.{i:int}.mlp"' in dory
    assert 'expect "x.0.layers.3.mixer.weight"\n    -> "x.0.layers.1.mlp.weight"' in dory
    offset = everything["inkling2_text"].text
    assert ('rename "{p*}.attn_res.attn_queries.{i:int}" -> '
            '"{p*}.layers.{i+1}.attention_input.query"') in offset
    ernie = everything["ernie4_5_vl_moe"].text
    n = "config.text_config.moe_num_experts"
    assert (f'fuse "{{p*}}.experts.{{e+{n}}}.gate_proj", "{{p*}}.experts.{{e+{n}}}.up_proj"\n'
            '  -> "{p*}.vision_moe.experts.gate_up_proj" naming param\n'
            '  by stack(e, 0), concat(1)') in ernie
    assert f'fuse "{{p*}}.experts.{{e:int<{n}}}.down_proj"' in ernie
    # the target of each example expert comes from transformers' own op
    assert ('expect "x.0.experts.3.gate_proj.weight"\n    -> "x.0.vision_moe.experts.gate_up_proj"'
            f'\n    with {n} = 2') in ernie


def test_lookarounds_become_guards() -> None:
    text = import_transformers("Qwen2VLForConditionalGeneration").text
    assert 'rename "model.{n}" -> "model.language_model.{n}"' in text
    assert 'unless n in ("language_model*", "visual*")' in text
    text = import_transformers("dinov3_convnext").text  # (?<!model\.)stages
    assert 'unless p in ("*model")' in text
    text = import_transformers("shieldgemma2").text  # PrefixChange(add model, model_prefix model)
    assert 'rename "model.{s}" -> "model.model.{s}"\n  unless s in ("model")' in text


def test_converter_ops() -> None:
    text = import_transformers("mixtral").text
    assert ('fuse "{p*}.experts.{e:int}.w1", "{p*}.experts.{e:int}.w3"\n'
            '  -> "{p*}.experts.gate_up_proj" naming param\n  by stack(e, 0), concat(1)') in text
    text = import_transformers("inkling_mm_model").text
    assert "by deinterleave(1, parts=2), concat(1)" in text
    text = import_transformers("qwen3_vl_moe").text
    assert "axes (e, in, out)" in text and "by transpose(1, 2)" in text
    text = import_transformers("kimi_k25").text
    assert "rope_permute(heads=config.vision_config.num_attention_heads) on [0, 1]" in text
    text = import_transformers("Molmo2TextModel").text
    assert "split(0, sizes=[config.num_attention_heads * config.head_dim" in text


def test_cli_import_transformers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import-transformers", "mixtral", "-o", str(tmp_path)]) == 0
    assert main(["check", "--schemes", "none", str(tmp_path / "mixtral.conv")]) == 0
    capsys.readouterr()
    assert main(["import-transformers", "inkling2_text"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# Imported by convlens import-transformers")
    assert "untranslated: WeightConverter('lm_head" in captured.err
    with pytest.raises(SystemExit):
        main(["import-transformers"])


# --- families: the imported program against transformers' own load ------------------------------


def mixtral() -> Any:
    c = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return _finish(c, "MixtralForCausalLM")


FAMILIES: list[tuple[str, Callable[[], Any], Callable[[dict[str, torch.Tensor]],
                                                      dict[str, torch.Tensor]] | None]] = [
    ("mixtral", mixtral, None),
    ("qwen2_moe", qwen2_moe, None),
    ("llava", llava, llava_hub),
    ("qwen2_vl", qwen2_vl, None),
]


@pytest.mark.parametrize(("family", "build", "to_hub"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_imported_program_plans_the_hub_keys_onto_transformers_memory_keys(
        family: str, build: Callable[[], Any],
        to_hub: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None,
        tmp_path: Path) -> None:
    model = build()
    memory = state_of(model)
    model.save_pretrained(str(tmp_path))
    saved = load_dir(tmp_path)
    hub = to_hub(saved) if to_hub is not None else saved
    assert set(hub) != set(memory), f"{family}: the hub file has the memory layout already"

    result = import_model(model)
    conversion = Conversion(compile_text(result.text, f"<{family}>"))
    plan = conversion.plan(metas_of(hub), model.config)
    assert set(plan.outputs) == set(memory)
    assert_same(conversion.apply(hub, model.config), memory, f"{family}: imported apply(hub)")
    assert_same(conversion.revert(memory, model.config), hub, f"{family}: imported revert")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "llava",
                                  "Qwen2VLForConditionalGeneration"])
def test_family_files_pass_the_scheme_checks_too(name: str) -> None:
    """``convlens check`` also runs every quantized scheme; the whole registry with schemes takes
    minutes (``import_all(schemes=True)``), so the suite runs them on the families."""
    result = import_transformers(name, schemes=True)
    assert result.complete, result.untranslatable
