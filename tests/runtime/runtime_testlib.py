"""Helpers shared by the tests in tests/runtime (no convlens code: these are the references)."""

from __future__ import annotations

import math
from typing import Any

import torch
from bitexact import raw_bits

import convlens

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32)
SAFETENSORS_NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                    torch.int32: "I32", torch.float64: "F64", torch.int64: "I64"}


class Fill:
    """Tensors whose elements are all distinct (across calls too): arange values for float32 and
    int32, arange *bit patterns* for 16-bit floats (finite, never -0.0 or NaN)."""

    def __init__(self) -> None:
        self.next = 1

    def __call__(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        start = self.next
        self.next += n
        if dtype in (torch.float16, torch.bfloat16):
            assert self.next < 0x7000, "keep 16-bit patterns finite"
            return torch.arange(start, start + n, dtype=torch.int16).view(dtype).reshape(shape)
        if dtype in (torch.float32, torch.float64):
            return torch.arange(start, start + n, dtype=torch.float64).to(dtype).reshape(shape)
        return torch.arange(start, start + n, dtype=dtype).reshape(shape)


def assert_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), (
        f"{what}: shape {list(got.shape)} != {list(want.shape)}")
    assert torch.equal(raw_bits(got), raw_bits(want)), f"{what}: values differ\n{got}\n!=\n{want}"


def metas(sd: dict[str, torch.Tensor]) -> dict[str, convlens.TensorMeta]:
    return {k: convlens.TensorMeta(tuple(t.shape), SAFETENSORS_NAME[t.dtype])
            for k, t in sd.items()}


def conversion(text: str) -> convlens.Conversion:
    return convlens.Conversion(convlens.compile_text("conversion t\n" + text + "\n"))


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def hf_ops() -> Any:
    """transformers.core_model_loading, or None when transformers is not installed."""
    try:
        import transformers.core_model_loading as hf
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return hf
