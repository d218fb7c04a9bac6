#!/usr/bin/env python
"""Regenerate the real quantized fixtures in tests/fixtures/real/ with the real producers.

Tiny random models (deterministic seeds, CPU only) are quantized by NVIDIA ModelOpt
(``mtq.quantize`` + ``export_hf_checkpoint``) and by llm-compressor (``oneshot`` +
``save_pretrained(save_compressed=True)``), and each export is written to
``tests/fixtures/real/<producer>/<format>-<arch>/``:

- ``model.safetensors``, ``config.json``, ``hf_quant_config.json`` (ModelOpt): the producer's
  export, unchanged;
- ``original.safetensors``: the original bf16 tensors (hub names) that differ from the export
  (the others, embeddings and norms, are byte-identical in ``model.safetensors``);
- ``memory.safetensors`` and ``memory_hf_quant_config.json`` (ModelOpt, fused-expert MoE
  models): the same quantized model in
  transformers' in-memory layout (experts stacked into ``gate_up_proj [E, 2I, H]`` with
  ``_weight_scale`` / ``[E]`` ``_weight_scale_2`` / a shared ``_input_scale``), made by ModelOpt's
  own ``_export_quantized_weight`` on the fused tensors, and ``hf_quant_config.json`` as ModelOpt
  held it before mapping its module names to the hub's: the "seed scenario" (reverting them must
  give ModelOpt's per-expert export and its config, bit for bit);
- ``logits.safetensors`` (llm-compressor): a fixed ``input_ids``, the logits of the quantized model
  in the producer's process (``quantized``) and of the original bf16 model (``original``).

``MANIFEST.json`` lists every fixture tried: producer and versions, format, arch, files and sizes,
or why it could not be produced (no fake fixture is written for those).

The producers do not share one environment (llm-compressor 0.14.0.1 pins transformers <= 5.17;
ModelOpt runs with transformers 5.24, as in the main venv, although its ``[hf]`` extra asks for
< 5.15: ModelOpt warns it is untested), so run the script once per producer venv; entries of the
other producer are kept in the manifest. The venvs (CPU torch first, from the wheel on disk):

    python3.11 -m venv /work/fixtures-venv-modelopt
    /work/fixtures-venv-modelopt/bin/pip install torch==2.13.0
    /work/fixtures-venv-modelopt/bin/pip install -c <(echo torch==2.13.0) \
        'nvidia-modelopt[hf]==0.47.0' transformers accelerate safetensors requests
    /work/fixtures-venv-modelopt/bin/pip install -c <(echo torch==2.13.0) transformers==5.24.0
    python3.11 -m venv /work/fixtures-venv-llmc
    /work/fixtures-venv-llmc/bin/pip install torch==2.13.0
    /work/fixtures-venv-llmc/bin/pip install -c <(echo torch==2.13.0) llmcompressor==0.14.0.1

Then:

    /work/fixtures-venv-modelopt/bin/python scripts/make_fixtures.py --producer modelopt
    /work/fixtures-venv-llmc/bin/python scripts/make_fixtures.py --producer llmcompressor

``--only GLOB`` (repeatable) limits the run to fixture ids such as ``modelopt/nvfp4-llama``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import importlib.metadata as md
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "real"
SEED = 1234
CALIB_BATCHES = 4
CALIB_LEN = 32
VOCAB = 128

# --- models ----------------------------------------------------------------------------------


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM, cfg


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                              moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                              num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                              decoder_sparse_step=1, mlp_only_layers=[],
                              tie_word_embeddings=False)
    cfg = Qwen3MoeConfig(**kw)
    return Qwen3MoeForCausalLM, cfg


def _mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, tie_word_embeddings=False)
    return MixtralForCausalLM, cfg


def _gpt_oss() -> Any:
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention"], sliding_window=32,
                       max_position_embeddings=128, tie_word_embeddings=False)
    return GptOssForCausalLM, cfg


def _minimax_m3_vl() -> Any:
    import transformers
    from transformers.models.minimax_m3_vl import configuration_minimax_m3_vl as mm

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
                dense_intermediate_size=64, shared_intermediate_size=64, rotary_dim=16,
                mlp_layer_types=["dense", "sparse"],
                layer_types=["full_attention", "full_attention"], index_n_heads=2,
                index_head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=56, patch_size=14)
    top: dict[str, Any] = dict(text_config=text, vision_config=vision, projector_hidden_size=64,
                               merged_hidden_size=128, image_token_index=100,
                               video_token_index=101, tie_word_embeddings=False)
    cfg = mm.MiniMaxM3VLConfig(**top)
    return transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(cfg)], cfg


def _qwen3_moe_i128() -> Any:
    """Qwen3-MoE whose every input dim is a multiple of 128 (group-128 and 128x128-block
    formats; llm-compressor refuses moe_intermediate_size 64 for those)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                              moe_intermediate_size=128, num_experts=2, num_experts_per_tok=1,
                              num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                              decoder_sparse_step=1, mlp_only_layers=[],
                              tie_word_embeddings=False)
    cfg = Qwen3MoeConfig(**kw)
    return Qwen3MoeForCausalLM, cfg


ARCHS: dict[str, Callable[[], Any]] = {
    "llama": _llama, "qwen3_moe": _qwen3_moe, "qwen3_moe_i128": _qwen3_moe_i128,
    "mixtral": _mixtral, "gpt_oss": _gpt_oss, "minimax_m3_vl": _minimax_m3_vl,
}


def build_model(arch: str) -> Any:
    model_cls, cfg = ARCHS[arch]()
    cfg.architectures = [model_cls.__name__]  # ModelOpt's export needs it (is_multimodal_model)
    torch.manual_seed(SEED)
    model = model_cls(cfg)
    with torch.no_grad():  # deterministic, and not so small that every FP8 scale is a subnormal
        g = torch.Generator().manual_seed(SEED)
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(torch.bfloat16).eval()


def calib_ids(n: int = CALIB_BATCHES, length: int = CALIB_LEN) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(0, VOCAB, (1, length), generator=g) for _ in range(n)]


def probe_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randint(0, VOCAB, (1, 12), generator=g)


# --- specs -----------------------------------------------------------------------------------


@dataclass
class Spec:
    producer: str
    fmt: str
    arch: str
    recipe: str
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.producer}/{self.fmt}-{self.arch}"


MODELOPT_FORMATS = {
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "w4a16_nvfp4": "W4A16_NVFP4_CFG",
    "fp8": "FP8_DEFAULT_CFG",
    "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "fp8_pb_wo": "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    "mxfp8": "MXFP8_DEFAULT_CFG",
    "mxfp4": "MXFP4_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "fp8_kv": "FP8_DEFAULT_CFG + FP8_KV_CFG",
    "nvfp4_fp8kv": "NVFP4_DEFAULT_CFG + FP8_KV_CFG",
    "mixed": "FP8_DEFAULT_CFG with NVFP4_DEFAULT_CFG quantizers on *mlp* (MIXED_PRECISION)",
    "nvfp4_awq": "NVFP4_AWQ_LITE_CFG",
}
MODELOPT_ARCHS = {
    "llama": list(MODELOPT_FORMATS),
    "qwen3_moe": ["nvfp4", "w4a16_nvfp4", "fp8", "fp8_pc_pt", "fp8_pb_wo", "mxfp8", "mxfp4",
                  "int4_awq", "nvfp4_fp8kv"],
    "qwen3_moe_i128": ["fp8_pb_wo", "int4_awq"],
    "mixtral": ["nvfp4", "fp8"],
    "gpt_oss": ["nvfp4", "fp8", "mxfp4"],
    "minimax_m3_vl": ["nvfp4"],
}

LLMC_FORMATS = {  # format -> (scheme, needs calibration data, extra modifier kwargs)
    "fp8_dynamic": ("FP8_DYNAMIC", False, {}),
    "fp8_block": ("FP8_BLOCK", False, {}),
    "w4a16": ("W4A16", False, {}),
    "w4a16_asym": ("W4A16_ASYM", False, {}),
    "w8a16": ("W8A16", False, {}),
    "nvfp4a16": ("NVFP4A16", False, {}),
    "mxfp4a16": ("MXFP4A16", False, {}),
    "nvfp4": ("NVFP4", True, {}),
    "fp8": ("FP8", True, {}),
    "fp8_kv": ("FP8", True, {"kv_cache_scheme": {"num_bits": 8, "type": "float",
                                                 "strategy": "tensor", "dynamic": False,
                                                 "symmetric": True}}),
}
LLMC_ARCHS = {"llama": list(LLMC_FORMATS),
              "qwen3_moe": [f for f in LLMC_FORMATS if f != "fp8_kv"],
              "qwen3_moe_i128": ["fp8_block", "w4a16", "w4a16_asym", "w8a16"]}


def all_specs() -> list[Spec]:
    specs = [Spec("modelopt", f, a, MODELOPT_FORMATS[f])
             for a, fs in MODELOPT_ARCHS.items() for f in fs]
    specs += [Spec("llmcompressor", f, a, LLMC_FORMATS[f][0])
              for a, fs in LLMC_ARCHS.items() for f in fs]
    return specs


# --- helpers ---------------------------------------------------------------------------------


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Producers print progress bars and warnings; keep them out of the run's output."""
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf


def load_st(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_st(tensors: dict[str, torch.Tensor], path: Path,
            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path),
              metadata=metadata)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                            b.contiguous().reshape(-1).view(torch.uint8)))


def single_file(d: Path) -> dict[str, torch.Tensor]:
    """The tensors of an export folder, sharded or not."""
    files = sorted(d.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_st(f))
    return out


def save_original(model: Any, where: Path) -> dict[str, torch.Tensor]:
    """The original model saved by transformers (hub names), reloaded as tensors."""
    with quiet():
        model.save_pretrained(where)
    return single_file(where)


def write_fixture(dst: Path, quantized: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                  configs: dict[str, Any], extra: dict[str, dict[str, torch.Tensor]]) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    meta = {"format": "pt"}
    save_st(quantized, dst / "model.safetensors", meta)
    differs = {k: v for k, v in original.items()
               if k not in quantized or not same_bytes(quantized[k], v)}
    save_st(differs, dst / "original.safetensors", meta)
    for name, tensors in extra.items():
        save_st(tensors, dst / name, meta)
    for name, value in configs.items():
        (dst / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    for p in dst.iterdir():
        p.chmod(0o644)


def files_of(dst: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(dst.iterdir())}


def short_error(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(tb)
                  if "site-packages" in f.filename), "")
    msg = f"{type(exc).__name__}: {exc}".strip()
    if len(msg) > 600:
        msg = msg[:600] + " ..."
    return f"{msg} (at {where})" if where else msg


# --- ModelOpt --------------------------------------------------------------------------------


def modelopt_cfg(fmt: str) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    def get(name: str) -> dict[str, Any]:
        return copy.deepcopy(getattr(mtq, name))

    if fmt == "fp8_kv":
        cfg = get("FP8_DEFAULT_CFG")
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(get("FP8_KV_CFG")["quant_cfg"])
        return cfg
    if fmt == "nvfp4_fp8kv":
        cfg = get("NVFP4_DEFAULT_CFG")
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(get("FP8_KV_CFG")["quant_cfg"])
        return cfg
    if fmt == "mixed":
        cfg = get("FP8_DEFAULT_CFG")
        nv = get("NVFP4_DEFAULT_CFG")["quant_cfg"]
        w = next(e["cfg"] for e in nv if e.get("quantizer_name") == "*weight_quantizer")
        i = next(e["cfg"] for e in nv if e.get("quantizer_name") == "*input_quantizer")
        cfg["quant_cfg"] = [*cfg["quant_cfg"],
                            {"quantizer_name": "*mlp*weight_quantizer", "cfg": w},
                            {"quantizer_name": "*mlp*input_quantizer", "cfg": i}]
        return cfg
    return get(MODELOPT_FORMATS[fmt])


def fused_experts_modules(model: Any) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "gate_up_proj_weight_quantizers") and hasattr(m, "gate_up_proj")]


def modelopt_memory_experts(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stacked in-memory layout of every fused-experts module, quantized by ModelOpt itself.

    For each expert, ModelOpt's ``_export_quantized_weight`` runs on the whole fused
    ``gate_up_proj[e]`` ([2I, H]) with (a copy of) that expert's gate_up weight quantizer, and on
    ``down_proj[e]``; the results are stacked over the experts under transformers' param names
    (``experts.gate_up_proj``, ``experts.gate_up_proj_weight_scale``, ...). This is what a quantizer
    holding the in-memory model would publish; ModelOpt's own export instead splits every expert
    first (``_export_fused_experts``)."""
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight
    from torch import nn

    out: dict[str, torch.Tensor] = {}
    for name, module in fused_experts_modules(model):
        for proj, quantizers, input_q in (
                ("gate_up_proj", module.gate_up_proj_weight_quantizers,
                 module.gate_up_proj_input_quantizer),
                ("down_proj", module.down_proj_weight_quantizers,
                 module.down_proj_input_quantizer)):
            weight = getattr(module, proj).data
            per_role: dict[str, list[torch.Tensor]] = {}
            for e in range(weight.shape[0]):
                wrapper = nn.Module()
                wrapper.weight = nn.Parameter(weight[e].clone().contiguous(), requires_grad=False)
                wrapper.weight_quantizer = copy.deepcopy(quantizers[e])
                wrapper.input_quantizer = copy.deepcopy(input_q)
                _export_quantized_weight(wrapper, dtype)
                per_role.setdefault("weight", []).append(wrapper.weight.data)
                for role in ("weight_scale", "weight_scale_2", "input_scale"):
                    if hasattr(wrapper, role):
                        per_role.setdefault(role, []).append(getattr(wrapper, role))
            for role, values in per_role.items():
                key = f"{name}.{proj}" if role == "weight" else f"{name}.{proj}_{role}"
                if role == "input_scale":  # one activation quantizer for all experts
                    assert all(same_bytes(v, values[0]) for v in values), key
                    out[key] = values[0].clone()
                else:
                    out[key] = torch.stack(values)
    return out


def run_modelopt(spec: Spec, tmp: Path, out: Path) -> dict[str, Any]:
    import modelopt.torch.export.unified_export_hf as ue
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = build_model(spec.arch)
    original = save_original(model, tmp / "original")
    batches = calib_ids()

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    with quiet():
        model = mtq.quantize(model, modelopt_cfg(spec.fmt), forward_loop)
    extra: dict[str, dict[str, torch.Tensor]] = {}
    memory_experts: dict[str, torch.Tensor] = {}
    if fused_experts_modules(model):
        try:
            with quiet():
                memory_experts = modelopt_memory_experts(model, torch.bfloat16)
        except Exception as exc:  # recorded, the hub export is still useful
            spec.notes.append("memory layout (seed scenario) not produced: " + short_error(exc))
    captured: dict[str, torch.Tensor] = {}
    original_revert = ue.revert_weight_conversion_quant_aware

    def capture(m: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        captured.update(state_dict)
        out: dict[str, torch.Tensor] = original_revert(m, state_dict)
        return out

    captured_quant: dict[str, Any] = {}
    original_names = ue.revert_quant_config_names

    def capture_names(quant: dict[str, Any], mapper: Any) -> Any:
        captured_quant.update(copy.deepcopy(quant))  # in-memory module names, before mapping
        return original_names(quant, mapper)

    ue.revert_weight_conversion_quant_aware = capture
    ue.revert_quant_config_names = capture_names
    try:
        with quiet() as log:
            export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp / "export")
    finally:
        ue.revert_weight_conversion_quant_aware = original_revert
        ue.revert_quant_config_names = original_names
    if "Quant-aware reverse weight conversion skipped" in log.getvalue():
        spec.notes.append("ModelOpt skipped its quant-aware reverse conversion: "
                          + log.getvalue().split("Quant-aware reverse weight conversion skipped")
                          [1].split("\n")[0][:300])
    quantized = single_file(tmp / "export")
    if memory_experts:
        stacked = {k.rsplit(".", 1)[0] + "." for k in memory_experts if k.endswith("_proj")}

        def per_expert(key: str) -> bool:  # "<experts>.<e>.<proj>.<role>", split by ModelOpt
            return any(key.startswith(p) and key[len(p):].split(".")[0].isdigit()
                       for p in stacked)

        memory = {k: v for k, v in captured.items() if not per_expert(k)}
        memory.update(memory_experts)
        extra["memory.safetensors"] = memory
    configs = {"config.json": json.loads((tmp / "export" / "config.json").read_text())}
    hq = tmp / "export" / "hf_quant_config.json"
    if hq.exists():
        configs["hf_quant_config.json"] = json.loads(hq.read_text())
        if "memory.safetensors" in extra:
            # the same file as ModelOpt held it before mapping module names to the hub's (when
            # ModelOpt found no names to map, it is the written file itself)
            memory_quant = copy.deepcopy(configs["hf_quant_config.json"])
            if captured_quant:
                memory_quant["quantization"] = captured_quant
            configs["memory_hf_quant_config.json"] = memory_quant
    write_fixture(out, quantized, original, configs, extra)
    return {}


# --- llm-compressor --------------------------------------------------------------------------


def write_tokenizer(where: Path) -> None:
    """An offline word-level tokenizer, only so that oneshot accepts a processor (not kept)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fast_cls: Any = PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = fast_cls(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                   eos_token="t1", bos_token="t2")
    fast.save_pretrained(where)


def run_llmcompressor(spec: Spec, tmp: Path, out: Path) -> dict[str, Any]:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    scheme, calibrate, kwargs = LLMC_FORMATS[spec.fmt]
    model = build_model(spec.arch)
    src = tmp / "original"
    original = save_original(model, src)
    write_tokenizer(src)
    cls = type(model)
    with quiet():
        # oneshot re-reads the config from model.name_or_path: use a saved copy
        model = cls.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = probe_ids()
    with torch.no_grad():
        original_logits = model(input_ids=ids).logits.float()
    recipe = QuantizationModifier(targets="Linear", scheme=scheme,
                                  ignore=["lm_head", "re:.*mlp.gate$"], **kwargs)
    with quiet():
        if calibrate:
            from datasets import Dataset

            data = Dataset.from_dict({"input_ids": [b[0].tolist() for b in calib_ids()],
                                      "attention_mask": [[1] * CALIB_LEN] * CALIB_BATCHES})
            oneshot(model=model, recipe=recipe, dataset=data, processor=str(src),
                    num_calibration_samples=CALIB_BATCHES, max_seq_length=CALIB_LEN)
        else:
            oneshot(model=model, recipe=recipe)
    with torch.no_grad():
        quantized_logits = model(input_ids=ids).logits.float()
    with quiet():
        model.save_pretrained(tmp / "export", save_compressed=True)
    quantized = single_file(tmp / "export")
    configs = {"config.json": json.loads((tmp / "export" / "config.json").read_text())}
    logits = {"input_ids": ids, "quantized": quantized_logits, "original": original_logits}
    write_fixture(out, quantized, original, configs, {"logits.safetensors": logits})
    return {}


# --- driver ----------------------------------------------------------------------------------

PRODUCERS = {"modelopt": ("nvidia-modelopt", run_modelopt),
             "llmcompressor": ("llmcompressor", run_llmcompressor)}


def available(producer: str) -> bool:
    return version(PRODUCERS[producer][0]) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root (%(default)s)")
    ap.add_argument("--producer", choices=[*PRODUCERS, "auto"], default="auto",
                    help="which producer to run (auto: the ones installed here)")
    ap.add_argument("--only", action="append", default=[], metavar="GLOB",
                    help="only fixture ids matching GLOB (modelopt/nvfp4-llama, '*qwen3_moe')")
    ap.add_argument("--list", action="store_true", help="list the fixture ids and exit")
    args = ap.parse_args(argv)

    specs = all_specs()
    if args.list:
        print("\n".join(s.id for s in specs))
        return 0
    producers = [p for p in PRODUCERS if available(p)] if args.producer == "auto" \
        else [args.producer]
    for p in producers:
        if not available(p):
            ap.error(f"{PRODUCERS[p][0]} is not installed in this environment")
    specs = [s for s in specs if s.producer in producers
             and (not args.only or any(fnmatch.fnmatch(s.id, g) for g in args.only))]
    if not specs:
        ap.error("no fixture selected")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "MANIFEST.json"
    entries: dict[str, Any] = {}
    failures = 0
    for spec in specs:
        dist, run = PRODUCERS[spec.producer]
        dst = args.out / spec.producer / f"{spec.fmt}-{spec.arch}"
        entry: dict[str, Any] = {
            "producer": spec.producer, "producer_version": version(dist),
            "transformers_version": version("transformers"), "torch_version": torch.__version__,
            "compressed_tensors_version": version("compressed-tensors"),
            "format": spec.fmt, "arch": spec.arch, "recipe": spec.recipe, "seed": SEED,
        }
        print(f"{spec.id} ...", end=" ", flush=True)
        with tempfile.TemporaryDirectory(prefix="convlens-fixture-") as t:
            try:
                run(spec, Path(t), dst)
            except Exception as exc:
                if dst.exists():
                    shutil.rmtree(dst)
                entry.update(status="failed", error=short_error(exc))
                failures += 1
                print("FAILED:", entry["error"])
            else:
                entry.update(status="ok", path=str(dst.relative_to(args.out)),
                             files=files_of(dst))
                print("ok", sum(entry["files"].values()), "bytes")
        if spec.notes:
            entry["notes"] = spec.notes
        entries[spec.id] = entry
    # read only now: the other producer's run may have written it meanwhile
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = {**previous.get("fixtures", {}), **entries}
    manifest = {
        "description": "Real quantized checkpoints of tiny random models, made on the CPU by "
                       "scripts/make_fixtures.py (see its docstring for the files of a fixture).",
        "regenerate": [
            "/work/fixtures-venv-modelopt/bin/python scripts/make_fixtures.py --producer modelopt",
            "/work/fixtures-venv-llmc/bin/python scripts/make_fixtures.py "
            "--producer llmcompressor",
        ],
        "fixtures": dict(sorted(entries.items())),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    ok = sum(1 for s in specs if entries[s.id]["status"] == "ok")
    print(f"{ok} produced, {failures} failed; manifest: {manifest_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
