"""convlens verify: a converted checkpoint is recomputed from its source and compared byte for
byte; a flipped byte, a missing or extra tensor, a wrong shape or a changed config is found."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convlens.checkpoint import convert_checkpoint, verify_checkpoint
from convlens.cli import main

E, H, INTER = 3, 32, 48


def hub_checkpoint(root: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    sd = {"model.embed_tokens.weight": torch.randn(16, H, generator=g).bfloat16()}
    for e in range(E):
        for w, (o, i) in (("w1", (INTER, H)), ("w3", (INTER, H)), ("w2", (H, INTER))):
            sd[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] = torch.randn(
                o, i, generator=g).bfloat16()
    sd["model.layers.0.block_sparse_moe.gate.weight"] = torch.randn(E, H, generator=g)
    root.mkdir()
    save_file(sd, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "quantization_config": {"ignore": ["model.layers.0.block_sparse_moe.gate"]}}))
    return root


def converted(tmp_path: Path) -> tuple[Path, Path]:
    src = hub_checkpoint(tmp_path / "hub")
    dst = tmp_path / "mem"
    convert_checkpoint(src, dst, direction="apply")
    return src, dst


def test_a_faithful_conversion_verifies(tmp_path: Path) -> None:
    src, dst = converted(tmp_path)
    report = verify_checkpoint(src, dst)
    assert report.ok, report.summary()
    assert report.stats.tensors == 4 and report.direction == "apply"
    assert main(["verify", str(src), str(dst)]) == 0


def _flip_last_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))


def test_a_flipped_byte_is_found(tmp_path: Path) -> None:
    src, dst = converted(tmp_path)
    _flip_last_byte(dst / "model.safetensors")
    report = verify_checkpoint(src, dst)
    assert not report.ok
    assert any("bytes differ from the recomputed tensor" in m for m in report.stats.mismatches)
    assert main(["verify", str(src), str(dst)]) == 1


def test_a_changed_config_is_found(tmp_path: Path) -> None:
    src, dst = converted(tmp_path)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["model.layers.0.mlp.gate"]
    config["quantization_config"]["ignore"] = ["model.layers.0.block_sparse_moe.gate"]
    (dst / "config.json").write_text(json.dumps(config))
    report = verify_checkpoint(src, dst)
    assert report.config_problems == ["config.json differs from the one the conversion maps"]


def _rewrite(shard: Path, mutate: object) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)  # type: ignore[operator]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def test_a_missing_tensor_is_found(tmp_path: Path) -> None:
    src, dst = converted(tmp_path)
    _rewrite(dst / "model.safetensors",
             lambda h: h.pop("model.layers.0.mlp.experts.down_proj"))
    report = verify_checkpoint(src, dst)
    assert "model.layers.0.mlp.experts.down_proj: missing from the destination" in (
        report.stats.mismatches)


def test_verify_needs_provenance_or_rules(tmp_path: Path) -> None:
    src = hub_checkpoint(tmp_path / "hub")
    from convlens import ConversionError

    with pytest.raises(ConversionError, match="carries no convlens provenance"):
        verify_checkpoint(src, src)
