"""The reference dequantizers against values computed from each format's definition.

Every stem here is built by hand: the test picks the logical values it wants (FP4 E2M1 codes,
int4 in -8..7, int8 in -128..127, FP8 E4M3 bytes, E8M0 exponents), encodes them into storage
with explicit bit arithmetic written from the format definition (reference/quant-layouts.md
sections 0, 1, 2, 3, 5, 6), and computes the expected logical tensor in Python floats (float64).
Nothing here calls convlens' packer, so a dequantizer that agrees with a wrong packer cannot pass.

Each case also carries expectations under *wrong* conventions (multiply instead of divide, the
wrong E8M0 bias, no unsigned offset, transposed blocks, ...) and packed cases are re-encoded
with the element order flipped: the dequantized tensor must differ from all of those, so the
equality checks are not vacuous.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from convlens.compiler.layout import AxisSpec, Detected, RoleMeta, Scheme, detect
from convlens.compiler.naming import SUFFIX_ROLES
from convlens.compiler.schemes import all_schemes, scheme
from convlens.runtime.dequant import decode_codes, dequantize, role_on_logical
from convlens.runtime.dtypes import dtype_name
from convlens.runtime.execute import bit_equal, pack, unpack

# --- the formats, written out from their definitions (no convlens code) ----------------------

# FP4 E2M1: bit 3 is the sign, bits 0-2 index the magnitude.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_NAN = (0x7F, 0xFF)


def e2m1(code: int) -> float:
    mag = E2M1_MAGNITUDES[code & 7]
    return -mag if code & 8 else mag


def e4m3(byte: int) -> float:
    """FP8 E4M3 (fn variant): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities."""
    assert byte not in E4M3_NAN
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 7
    if exp == 0:
        return sign * 2.0 ** -6 * (man / 8)
    return sign * 2.0 ** (exp - 7) * (1 + man / 8)


def e8m0(byte: int) -> float:
    return 2.0 ** (byte - 127)


def fp8_tensor(rows: Any) -> torch.Tensor:
    """Bytes -> a float8_e4m3fn tensor with exactly those bit patterns."""
    return torch.tensor(rows, dtype=torch.uint8).view(torch.float8_e4m3fn)


def fp8_byte(o: int, i: int, e: int = 0) -> int:
    """A varied FP8 byte per position, covering normals, subnormals, zeros and negatives but
    never NaN (0x7F, 0xFF)."""
    b = (o * 37 + i * 11 + e * 29 + 3) % 254
    return b + 1 if b >= 0x7F else b


def pack_word(codes: Sequence[int], bits: int, slot: Sequence[int]) -> int:
    """One storage unit: element j's code goes to bit offset ``slot[j] * bits``."""
    word = 0
    for j, c in enumerate(codes):
        assert 0 <= c < (1 << bits)
        word |= c << (slot[j] * bits)
    return word


def signed32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


LO2 = (0, 1)  # even element in the LOW nibble (every FP4 layout in the reference)
HI2 = (1, 0)  # flipped: even element in the high nibble (the negative control)
SEQ8 = tuple(range(8))  # compressed-tensors int4: element i at bits 4i
REV8 = tuple(reversed(range(8)))
SEQ4 = tuple(range(4))  # compressed-tensors int8: element i at bits 8i
REV4 = tuple(reversed(range(4)))
AWQ_NIBBLE_HOLDS = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble k holds element AWQ_ORDER[k]
AWQ8 = tuple(AWQ_NIBBLE_HOLDS.index(j) for j in range(8))  # element j -> its nibble (0,4,1,...)


def pack_fp4_rows(codes: list[list[int]], slot: Sequence[int] = LO2) -> list[list[int]]:
    """[rows, in] E2M1 codes -> [rows, in/2] bytes (byte k = codes 2k, 2k+1)."""
    return [[pack_word(r[k:k + 2], 4, slot) for k in range(0, len(r), 2)] for r in codes]


def pack_int_rows(codes: list[list[int]], bits: int, slot: Sequence[int]) -> list[list[int]]:
    """[rows, in] unsigned codes -> [rows, ceil(in/P)] signed int32 words, zero padded."""
    p = 32 // bits
    out = []
    for r in codes:
        padded = list(r) + [0] * (-len(r) % p)
        out.append([signed32(pack_word(padded[k:k + p], bits, slot))
                    for k in range(0, len(padded), p)])
    return out


def transpose(m: list[list[Any]]) -> list[list[Any]]:
    return [list(col) for col in zip(*m, strict=True)]


def f64(rows: Any) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    scheme: str
    tensors: dict[str, torch.Tensor]
    expected: list[Any]  # nested Python floats on the logical shape
    axes: tuple[str, ...] = ("out", "in")
    wrong: dict[str, list[Any]] = field(default_factory=dict)  # must NOT equal the result

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(f64(self.expected).shape)


def grid(OUT: int, IN: int, f: Callable[[int, int], Any]) -> list[list[Any]]:
    return [[f(o, i) for i in range(IN)] for o in range(OUT)]


def grid3(E: int, OUT: int, IN: int, f: Callable[[int, int, int], Any]) -> list[list[list[Any]]]:
    return [[[f(e, o, i) for i in range(IN)] for o in range(OUT)] for e in range(E)]


def fp4_code(o: int, i: int, e: int = 0) -> int:
    # every code 0..15 appears, and neighbours differ, so a nibble swap shows
    return (o * 5 + i * 7 + e * 3 + 1) % 16


# FP8 E4M3 block scales (bytes), distinct per block, moderate magnitudes
NVFP4_SCALE_BYTES = [[0x38, 0x41, 0x2E], [0x30, 0x4C, 0x3B], [0x45, 0x22, 0x36]]


def modelopt_nvfp4(flip: bool = False, s2_view: bool = False) -> Case:
    OUT, IN = 3, 40  # 3 blocks of 16 along in, the last one partial (8)
    codes = grid(OUT, IN, fp4_code)
    s2 = 0.375
    expected = grid(OUT, IN, lambda o, i: e2m1(codes[o][i]) * e4m3(NVFP4_SCALE_BYTES[o][i // 16])
                    * s2)
    wrong_block = grid(OUT, IN, lambda o, i: e2m1(codes[o][i])
                       * e4m3(NVFP4_SCALE_BYTES[o][min(i // 32, 2)]) * s2)
    wrong_div = grid(OUT, IN, lambda o, i: e2m1(codes[o][i])
                     * e4m3(NVFP4_SCALE_BYTES[o][i // 16]) / s2)
    s2_t = torch.tensor([s2] if s2_view else s2, dtype=torch.float32)
    return Case("modelopt_nvfp4", {
        "weight": torch.tensor(pack_fp4_rows(codes, HI2 if flip else LO2), dtype=torch.uint8),
        "weight_scale": fp8_tensor(NVFP4_SCALE_BYTES),
        "weight_scale_2": s2_t,
        "input_scale": torch.tensor(0.25, dtype=torch.float32),
        "bias": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
    }, expected, wrong={"block of 32": wrong_block, "s2 divides": wrong_div})


def modelopt_nvfp4_stacked(flip: bool = False) -> Case:
    """Re-stacked MoE experts: weight [E, out, in/2], per-expert weight_scale_2 [E], one shared
    0-d input_scale (reference section 2.3)."""
    E, OUT, IN = 2, 3, 40
    codes = grid3(E, OUT, IN, lambda e, o, i: fp4_code(o, i, e))
    sbytes = [[[(NVFP4_SCALE_BYTES[o][b] + 5 * e) for b in range(3)] for o in range(OUT)]
              for e in range(E)]
    s2 = [0.375, 1.25]
    expected = grid3(E, OUT, IN, lambda e, o, i: e2m1(codes[e][o][i])
                     * e4m3(sbytes[e][o][i // 16]) * s2[e])
    swapped_s2 = grid3(E, OUT, IN, lambda e, o, i: e2m1(codes[e][o][i])
                       * e4m3(sbytes[e][o][i // 16]) * s2[1 - e])
    slot = HI2 if flip else LO2
    return Case("modelopt_nvfp4", {
        "weight": torch.tensor([pack_fp4_rows(c, slot) for c in codes], dtype=torch.uint8),
        "weight_scale": fp8_tensor(sbytes),
        "weight_scale_2": torch.tensor(s2, dtype=torch.float32),
        "input_scale": torch.tensor(0.25, dtype=torch.float32),
    }, expected, axes=("e", "out", "in"), wrong={"s2 of the other expert": swapped_s2})


def ct_nvfp4(flip: bool = False, e: int = 0) -> Case:
    OUT, IN = 3, 40
    codes = grid(OUT, IN, lambda o, i: fp4_code(o, i, 2 + e))
    g = 0.125 * 2 ** e  # the reciprocal convention: the global scale divides
    expected = grid(OUT, IN, lambda o, i: e2m1(codes[o][i]) * e4m3(NVFP4_SCALE_BYTES[o][i // 16])
                    / g)
    wrong_mul = grid(OUT, IN, lambda o, i: e2m1(codes[o][i])
                     * e4m3(NVFP4_SCALE_BYTES[o][i // 16]) * g)
    return Case("ct_nvfp4", {
        "weight_packed": torch.tensor(pack_fp4_rows(codes, HI2 if flip else LO2),
                                      dtype=torch.uint8),
        "weight_scale": fp8_tensor(NVFP4_SCALE_BYTES),
        "weight_global_scale": torch.tensor([g], dtype=torch.float32),
        "input_global_scale": torch.tensor([3.0], dtype=torch.float32),
    }, expected, wrong={"global scale multiplies": wrong_mul})


MX_SCALE_BYTES = [[127, 121], [130, 0], [118, 133]]  # E8M0 incl. 2^-127


def modelopt_mxfp4(flip: bool = False) -> Case:
    OUT, IN = 3, 48  # 2 blocks of 32, the last one partial (16)
    codes = grid(OUT, IN, lambda o, i: fp4_code(o, i, 1))
    expected = grid(OUT, IN, lambda o, i: e2m1(codes[o][i]) * e8m0(MX_SCALE_BYTES[o][i // 32]))
    wrong_bias = grid(OUT, IN, lambda o, i: e2m1(codes[o][i])
                      * 2.0 ** (MX_SCALE_BYTES[o][i // 32] - 128))
    return Case("modelopt_mxfp4", {
        "weight": torch.tensor(pack_fp4_rows(codes, HI2 if flip else LO2), dtype=torch.uint8),
        "weight_scale": torch.tensor(MX_SCALE_BYTES, dtype=torch.uint8),
    }, expected, wrong={"E8M0 bias 128": wrong_bias})


def ct_mxfp4(flip: bool = False) -> Case:
    """compressed-tensors mxfp4-pack-quantized: the same bytes under weight_packed."""
    c = modelopt_mxfp4(flip)
    return Case("ct_mxfp4", {"weight_packed": c.tensors["weight"],
                             "weight_scale": c.tensors["weight_scale"]}, c.expected,
                wrong=c.wrong)


def modelopt_mxfp8() -> Case:
    OUT, IN = 3, 40
    wbytes = grid(OUT, IN, fp8_byte)
    expected = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i]) * e8m0(MX_SCALE_BYTES[o][i // 32]))
    wrong_block = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i])
                       * e8m0(MX_SCALE_BYTES[o][min(i // 16, 1)]))
    return Case("modelopt_mxfp8", {
        "weight": fp8_tensor(wbytes),
        "weight_scale": torch.tensor(MX_SCALE_BYTES, dtype=torch.uint8),
        "bias": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32),
    }, expected, wrong={"block of 16": wrong_block})


def gpt_oss_mxfp4(flip: bool = False, stacked: bool = True) -> Case:
    """Hub layout: *_blocks [E, out, in/32, 16] (16 bytes = 32 FP4 values, even element in the
    low nibble), *_scales [E, out, in/32] E8M0, *_bias [E, out] bf16."""
    E, OUT, IN = (2, 3, 64) if stacked else (1, 3, 64)
    nb = IN // 32
    codes = grid3(E, OUT, IN, lambda e, o, i: fp4_code(o, i, e + 4))
    sbytes = [[[120 + (e * 7 + o * 3 + b * 5) % 13 for b in range(nb)] for o in range(OUT)]
              for e in range(E)]
    slot = HI2 if flip else LO2
    blocks = [[[pack_fp4_rows([codes[e][o][b * 32:(b + 1) * 32]], slot)[0] for b in range(nb)]
               for o in range(OUT)] for e in range(E)]
    expected = grid3(E, OUT, IN, lambda e, o, i: e2m1(codes[e][o][i])
                     * e8m0(sbytes[e][o][i // 32]))
    wrong_t = grid3(E, OUT, IN, lambda e, o, i: e2m1(codes[e][o][i])
                    * e8m0(sbytes[e][o][nb - 1 - i // 32]))
    tensors = {
        "blocks": torch.tensor(blocks, dtype=torch.uint8),
        "scales": torch.tensor(sbytes, dtype=torch.uint8),
        "bias": torch.tensor([[0.5 * (e + o) for o in range(OUT)] for e in range(E)],
                             dtype=torch.bfloat16),
    }
    if not stacked:
        tensors = {k: v[0] for k, v in tensors.items()}
        return Case("gpt_oss_mxfp4", tensors, expected[0], wrong={"scale blocks reversed":
                                                                  wrong_t[0]})
    return Case("gpt_oss_mxfp4", tensors, expected, axes=("e", "out", "in"),
                wrong={"scale blocks reversed": wrong_t})


INT_SCALES = [[0.5, 0.1875], [2.0, 0.0078125], [1.25, 3.0]]  # bf16-exact


def ct_int4(flip: bool = False) -> Case:
    OUT, IN = 3, 136  # 17 int32 words; 2 groups of 128, the last one partial (8)
    q = grid(OUT, IN, lambda o, i: (o * 5 + i * 3 + 1) % 16 - 8)  # int4 values -8..7
    stored = grid(OUT, IN, lambda o, i: q[o][i] + 8)  # unsigned with a +8 offset
    expected = grid(OUT, IN, lambda o, i: q[o][i] * INT_SCALES[o][i // 128])
    no_offset = grid(OUT, IN, lambda o, i: stored[o][i] * INT_SCALES[o][i // 128])
    twos = grid(OUT, IN, lambda o, i: (stored[o][i] - 16 if stored[o][i] >= 8 else stored[o][i])
                * INT_SCALES[o][i // 128])
    return Case("ct_int4", {
        "weight_packed": torch.tensor(pack_int_rows(stored, 4, REV8 if flip else SEQ8),
                                      dtype=torch.int32),
        "weight_scale": torch.tensor(INT_SCALES, dtype=torch.bfloat16),
        "weight_shape": torch.tensor([OUT, IN], dtype=torch.int64),
    }, expected, wrong={"no +8 offset": no_offset, "two's complement": twos})


def ct_int4_asym(flip: bool = False, flip_zero_point: bool = False, e: int = 0) -> Case:
    OUT, IN = 12, 136  # zero points: 12 rows packed 8 per int32 along out -> 2 words, 4 padding
    groups = 2
    q = grid(OUT, IN, lambda o, i: (o * 5 + i * 3 + e * 7 + 2) % 16 - 8)
    z = grid(OUT, groups, lambda o, g: (o * 3 + g * 5 + e * 9 + 1) % 16 - 8)
    scales = [[0.25 * (1 + (o + e) % 5), 2.0 ** -(o % 4) * 1.5] for o in range(OUT)]
    expected = grid(OUT, IN, lambda o, i: (q[o][i] - z[o][i // 128]) * scales[o][i // 128])
    rows_reversed = grid(OUT, IN, lambda o, i: (q[o][i] - z[OUT - 1 - o][i // 128])
                         * scales[o][i // 128])
    plus_zero = grid(OUT, IN, lambda o, i: (q[o][i] + z[o][i // 128]) * scales[o][i // 128])
    zp_stored_by_out = transpose([[v + 8 for v in row] for row in z])  # [groups, out]
    zp_words = transpose(pack_int_rows(zp_stored_by_out, 4, REV8 if flip_zero_point else SEQ8))
    return Case("ct_int4_asym", {
        "weight_packed": torch.tensor(
            pack_int_rows([[v + 8 for v in row] for row in q], 4, REV8 if flip else SEQ8),
            dtype=torch.int32),
        "weight_scale": torch.tensor(scales, dtype=torch.bfloat16),
        "weight_zero_point": torch.tensor(zp_words, dtype=torch.int32),
        "weight_shape": torch.tensor([OUT, IN], dtype=torch.int64),
        "bias": torch.zeros(OUT, dtype=torch.bfloat16),
    }, expected, wrong={"zero point rows reversed": rows_reversed, "zero point added": plus_zero})


def ct_int8(flip: bool = False) -> Case:
    OUT, IN = 3, 132  # 33 words; 2 groups, the last one partial (4)
    q = grid(OUT, IN, lambda o, i: (o * 37 + i * 13 + 5) % 256 - 128)
    stored = grid(OUT, IN, lambda o, i: q[o][i] + 128)
    expected = grid(OUT, IN, lambda o, i: q[o][i] * INT_SCALES[o][i // 128])
    no_offset = grid(OUT, IN, lambda o, i: stored[o][i] * INT_SCALES[o][i // 128])
    return Case("ct_int8", {
        "weight_packed": torch.tensor(pack_int_rows(stored, 8, REV4 if flip else SEQ4),
                                      dtype=torch.int32),
        "weight_scale": torch.tensor(INT_SCALES, dtype=torch.float16),
        "weight_shape": torch.tensor([OUT, IN], dtype=torch.int64),
    }, expected, wrong={"no +128 offset": no_offset})


# --- ModelOpt INT4 AWQ / W4A8 AWQ / INT8 SmoothQuant (reference sections 1 and 2) ------------


def pack_int4_along_out(q: list[list[int]], slot: Sequence[int] = LO2) -> list[list[int]]:
    """[out, in] signed int4 -> [out/2, in] bytes: rows 2k and 2k+1 share byte [k, j], each
    nibble the two's complement of its value (q & 0xF)."""
    return [[pack_word([q[2 * k][j] & 0xF, q[2 * k + 1][j] & 0xF], 4, slot)
             for j in range(len(q[0]))] for k in range(len(q) // 2)]


def awq_scale(o: int, g: int, e: int = 0) -> float:
    """Distinct per (row, group), exact in bf16/fp16/f32."""
    return (1 + (o * 3 + g * 5 + e) % 7) * 2.0 ** -((o + 2 * g + e) % 6)


def pqs_value(i: int) -> float:
    return 0.5 + 0.25 * ((i * 7) % 9)  # 0.5 .. 2.5, bf16-exact, 1.0 included


def modelopt_int4_awq(flip: bool = False, pqs: bool = True, w4a8: bool = False,
                      s2_view: bool = False, e: int = 0) -> Case:
    """weight U8 [out/2, in]: int4 packed along OUT, even row in the low nibble, two's
    complement; weight_scale F32 [out, ceil(in/128)]; pre_quant_scale bf16 [in] multiplies
    column j. W4A8 adds weight_scale_2 / input_scale, which the dequantization ignores."""
    OUT, IN = 6, 136  # 3 byte rows; 2 groups of 128, the last one partial (8)
    q = grid(OUT, IN, lambda o, i: (o * 5 + i * 3 + e * 7 + 1) % 16 - 8)  # -8..7
    nib = grid(OUT, IN, lambda o, i: q[o][i] & 0xF)
    s = grid(OUT, 2, lambda o, g: awq_scale(o, g, e))
    p = [pqs_value(i) if pqs else 1.0 for i in range(IN)]
    expected = grid(OUT, IN, lambda o, i: q[o][i] * s[o][i // 128] * p[i])
    wrong = {
        "unsigned nibbles": grid(OUT, IN, lambda o, i: nib[o][i] * s[o][i // 128] * p[i]),
        "+8 offset (u4o8)": grid(OUT, IN, lambda o, i: (nib[o][i] - 8) * s[o][i // 128] * p[i]),
        "groups of 64": grid(OUT, IN, lambda o, i: q[o][i] * s[o][min(i // 64, 1)] * p[i]),
        "scale rows of the byte row": grid(OUT, IN, lambda o, i: q[o][i] * s[o // 2][i // 128]
                                           * p[i]),
    }
    tensors = {
        "weight": torch.tensor(pack_int4_along_out(q, HI2 if flip else LO2), dtype=torch.uint8),
        "weight_scale": torch.tensor(s, dtype=torch.float32),
    }
    if pqs:
        tensors["pre_quant_scale"] = torch.tensor(p, dtype=torch.bfloat16)
        wrong["pre_quant_scale divides"] = grid(OUT, IN, lambda o, i: q[o][i] * s[o][i // 128]
                                                / p[i])
        wrong["pre_quant_scale ignored"] = grid(OUT, IN, lambda o, i: q[o][i] * s[o][i // 128])
    if not w4a8:
        return Case("modelopt_int4_awq", tensors, expected, wrong=wrong)
    s2 = 0.375 * 2 ** e
    tensors["weight_scale_2"] = torch.tensor([s2] if s2_view else s2, dtype=torch.float32)
    tensors["input_scale"] = torch.tensor(0.5, dtype=torch.float32)
    wrong["weight_scale_2 multiplies"] = [[v * s2 for v in row] for row in expected]
    wrong["weight_scale_2 divides"] = [[v / s2 for v in row] for row in expected]
    return Case("modelopt_w4a8_awq", tensors, expected, wrong=wrong)


def modelopt_int8_sq(input_scale: bool = True) -> Case:
    """weight I8 [out, in], weight_scale F32 [out], pre_quant_scale bf16 [in] on every layer,
    input_scale F32 0-d."""
    OUT, IN = 4, 6
    q = grid(OUT, IN, lambda o, i: (o * 37 + i * 13 + 5) % 256 - 128)
    ws = [0.0078125, 1.5, 0.375, 3.0]
    p = [0.5, 1.25, 2.0, 0.75, 1.75, 3.5]
    expected = grid(OUT, IN, lambda o, i: q[o][i] * ws[o] * p[i])
    tensors = {"weight": torch.tensor(q, dtype=torch.int8),
               "weight_scale": torch.tensor(ws, dtype=torch.float32),
               "pre_quant_scale": torch.tensor(p, dtype=torch.bfloat16),
               "bias": torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.bfloat16)}
    if input_scale:
        tensors["input_scale"] = torch.tensor(0.0625, dtype=torch.float32)
    return Case("modelopt_int8_sq", tensors, expected, wrong={
        "bytes read unsigned": grid(OUT, IN, lambda o, i: (q[o][i] & 0xFF) * ws[o] * p[i]),
        "weight_scale per column": grid(OUT, IN, lambda o, i: q[o][i] * ws[min(i, 3)] * p[i]),
        "pre_quant_scale per row": grid(OUT, IN, lambda o, i: q[o][i] * ws[o] * p[o]),
        "pre_quant_scale divides": grid(OUT, IN, lambda o, i: q[o][i] * ws[o] / p[i]),
    })


# --- GPTQ v1 and AutoAWQ GEMM (reference section 4) -----------------------------------------


def gptq_qzeros(zs: list[list[int]], slot: Sequence[int]) -> list[list[int]]:
    """[out, groups] stored zeros -> [groups, out/8] words packed along OUT."""
    return pack_int_rows(transpose(zs), 4, slot)


def gptq(flip: bool = False, flip_zeros: bool = False, g_idx: bool = False) -> Case:
    """qweight I32 [in/8, out]: eight codes per word along IN, element i at bits 4i; qzeros I32
    [ceil(in/128), out/8] packed along OUT the same way, storing zero - 1; scales fp16
    [ceil(in/128), out]; W = (q - (z + 1)) * s. in == out, so reading the payload with its axes
    swapped gives a tensor of the same shape."""
    OUT = IN = 136  # 17 words along in and along out; 2 groups, the last one partial (8)
    groups = 2
    q = grid(OUT, IN, lambda o, i: (o * 5 + i * 3 + 2) % 16)  # unsigned 0..15
    zs = grid(OUT, groups, lambda o, g: (o * 3 + g * 5 + 1) % 16)  # stored zero - 1, 0..15
    s = [[awq_scale(o, g) for o in range(OUT)] for g in range(groups)]  # [groups, out]
    expected = grid(OUT, IN, lambda o, i: (q[o][i] - (zs[o][i // 128] + 1)) * s[i // 128][o])
    v2 = grid(OUT, IN, lambda o, i: (q[o][i] - zs[o][i // 128]) * s[i // 128][o])
    swapped = grid(OUT, IN, lambda o, i: (q[i][o] - (zs[o][i // 128] + 1)) * s[i // 128][o])
    tensors = {
        "qweight": torch.tensor(transpose(pack_int_rows(q, 4, REV8 if flip else SEQ8)),
                                dtype=torch.int32),
        "qzeros": torch.tensor(gptq_qzeros(zs, REV8 if flip_zeros else SEQ8), dtype=torch.int32),
        "scales": torch.tensor(s, dtype=torch.float16),
        "bias": torch.tensor([0.25 * (o % 5) for o in range(OUT)], dtype=torch.float16),
    }
    if g_idx:  # no act-order: g_idx[i] = i // 128
        tensors["g_idx"] = torch.tensor([i // 128 for i in range(IN)], dtype=torch.int32)
    return Case("gptq", tensors, expected, wrong={
        "qzeros is the true zero (gptq_v2)": v2,
        "qweight read as [out, in]": swapped,
    })


def awq_gemm(flip: bool = False, flip_zeros: bool = False) -> Case:
    """qweight I32 [in, out/8] packed along OUT with the AWQ interleave (nibble k holds column
    8c + [0,2,4,6,1,3,5,7][k]); qzeros I32 [in/128, out/8] the same way, unsigned zeros; scales
    fp16 [in/128, out]; W = (q - z) * s. ``flip`` packs sequentially instead."""
    OUT, IN = 16, 256  # 2 words along out; 2 groups of 128
    groups = 2
    q = grid(OUT, IN, lambda o, i: (o * 5 + i * 3 + 2) % 16)
    z = grid(OUT, groups, lambda o, g: (o * 3 + g * 7 + 1) % 16)
    s = [[awq_scale(o, g, 1) for o in range(OUT)] for g in range(groups)]
    expected = grid(OUT, IN, lambda o, i: (q[o][i] - z[o][i // 128]) * s[i // 128][o])

    def seq(o: int) -> int:  # the column a sequential reader takes for logical column o
        return o - o % 8 + AWQ_NIBBLE_HOLDS[o % 8]

    sequential = grid(OUT, IN, lambda o, i: (q[seq(o)][i] - z[seq(o)][i // 128])
                      * s[i // 128][o])
    minus_one = grid(OUT, IN, lambda o, i: (q[o][i] - z[o][i // 128] - 1) * s[i // 128][o])
    return Case("awq_gemm", {
        "qweight": torch.tensor(pack_int_rows(transpose(q), 4, SEQ8 if flip else AWQ8),
                                dtype=torch.int32),
        "qzeros": torch.tensor(pack_int_rows(transpose(z), 4, SEQ8 if flip_zeros else AWQ8),
                               dtype=torch.int32),
        "scales": torch.tensor(s, dtype=torch.float16),
    }, expected, wrong={"nibbles read sequentially": sequential,
                        "zero stored minus 1 (GPTQ v1)": minus_one})


def per_tensor_fp8(name: str, scale_dtype: torch.dtype, form: str, e: int = 0) -> Case:
    """ModelOpt FP8 (F32 0-d) and CT FP8 "tensor" ([1] in the model dtype)."""
    OUT, IN = 3, 5
    wbytes = grid(OUT, IN, lambda o, i: fp8_byte(o, i, e))
    s = 0.0390625 * (1 + e)  # bf16-exact
    scale = torch.tensor([s] if form == "[1]" else s, dtype=scale_dtype)
    expected = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i]) * s)
    return Case(name, {
        "weight": fp8_tensor(wbytes),
        "weight_scale": scale,
        "input_scale": scale.clone() * 2,
    }, expected, wrong={"scale divides": grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i]) / s)})


ROW_SCALES = [0.75, 0.0625, 5.0]


def per_channel_fp8(name: str, dtype: torch.dtype, column: bool, e: int = 0) -> Case:
    """One scale per output row: ModelOpt [out] F32, compressed-tensors [out, 1] model dtype."""
    OUT, IN = 3, 5
    rs = [v * (1 + e) for v in ROW_SCALES]
    wbytes = grid(OUT, IN, lambda o, i: fp8_byte(o, i, e))
    expected = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i]) * rs[o])
    by_column = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i]) * rs[min(i, 2)])
    scale = torch.tensor([[v] for v in rs] if column else rs, dtype=dtype)
    return Case(name, {"weight": fp8_tensor(wbytes), "weight_scale": scale}, expected,
                wrong={"scale per column": by_column})


BLOCK_SCALES = [[0.5, 1.75, 0.01953125], [3.0, 0.3125, 96.0]]  # bf16-exact, distinct


def block_fp8(name: str, scale_role: str, OUT: int, IN: int, stored: Callable[[list[list[float]]],
              torch.Tensor], e: int = 0) -> Case:
    """128x128 blocks with partial edge blocks on both axes."""
    ob, ib = -(-OUT // 128), -(-IN // 128)
    s = [[v * 2 ** -e for v in row[:ib]] for row in BLOCK_SCALES[:ob]]
    wbytes = grid(OUT, IN, lambda o, i: fp8_byte(o, i, e))
    expected = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i]) * s[o // 128][i // 128])
    wrong = {"scale divides": grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i])
                                   / s[o // 128][i // 128])}
    if ob == ib == 2:
        wrong["blocks transposed"] = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i])
                                          * s[i // 128][o // 128])
    if ob > 1 or ib > 1:
        wrong["blocks of 64"] = grid(OUT, IN, lambda o, i: e4m3(wbytes[o][i])
                                     * s[min(o // 64, ob - 1)][min(i // 64, ib - 1)])
    return Case(name, {"weight": fp8_tensor(wbytes), scale_role: stored(s)}, expected,
                wrong=wrong)


def f32(s: list[list[float]]) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.float32)


def bf16(s: list[list[float]]) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.bfloat16)


SHARED_ROLES = ("input_scale", "input_global_scale")  # one value for all experts


def stacked(experts: list[Case]) -> Case:
    """Experts stacked on a leading axis (torch.stack, no convlens code): every role gains E,
    shared activation scales stay one value, weight_shape gets the E entry."""
    first = experts[0]
    tensors = {}
    for role, t in first.tensors.items():
        if role in SHARED_ROLES:
            tensors[role] = t
        elif role == "weight_shape":
            tensors[role] = torch.tensor([len(experts), *t.tolist()], dtype=torch.int64)
        else:
            tensors[role] = torch.stack([c.tensors[role] for c in experts])
    expected = [c.expected for c in experts]
    return Case(first.scheme, tensors, expected, axes=("e", *first.axes),
                wrong={"experts reversed": expected[::-1]})


# One or more hand-built stems per scheme; `flip` re-encodes the packed payload with the
# element order reversed (None: the scheme packs nothing).
CASES: dict[str, tuple[str, Callable[..., Case], bool]] = {
    # FP4 formats
    "modelopt_nvfp4 s2 0-d": ("modelopt_nvfp4", modelopt_nvfp4, True),
    "modelopt_nvfp4 s2 [1]": ("modelopt_nvfp4", lambda flip=False: modelopt_nvfp4(flip, True),
                              True),
    "modelopt_nvfp4 stacked [E]": ("modelopt_nvfp4", modelopt_nvfp4_stacked, True),
    "ct_nvfp4": ("ct_nvfp4", ct_nvfp4, True),
    "modelopt_mxfp4": ("modelopt_mxfp4", modelopt_mxfp4, True),
    "ct_mxfp4": ("ct_mxfp4", ct_mxfp4, True),
    "gpt_oss_mxfp4 [E, out, in/32, 16]": ("gpt_oss_mxfp4", gpt_oss_mxfp4, True),
    "gpt_oss_mxfp4 [out, in/32, 16]": ("gpt_oss_mxfp4",
                                        lambda flip=False: gpt_oss_mxfp4(flip, stacked=False),
                                        True),
    # integer formats (compressed-tensors pack-quantized)
    "ct_int4": ("ct_int4", ct_int4, True),
    "ct_int4_asym": ("ct_int4_asym", ct_int4_asym, True),
    "ct_int4_asym zero point": ("ct_int4_asym",
                                lambda flip=False: ct_int4_asym(flip_zero_point=flip), True),
    "ct_int8": ("ct_int8", ct_int8, True),
    # ModelOpt integer formats (int4 packed along OUT, signed)
    "modelopt_int4_awq pre_quant_scale": ("modelopt_int4_awq", modelopt_int4_awq, True),
    "modelopt_int4_awq folded (no pre_quant_scale)": ("modelopt_int4_awq", lambda flip=False:
                                                      modelopt_int4_awq(flip, pqs=False), True),
    "modelopt_w4a8_awq s2 0-d": ("modelopt_w4a8_awq", lambda flip=False: modelopt_int4_awq(
        flip, w4a8=True), True),
    "modelopt_w4a8_awq s2 [1], folded": ("modelopt_w4a8_awq", lambda flip=False:
                                         modelopt_int4_awq(flip, pqs=False, w4a8=True,
                                                           s2_view=True), True),
    "modelopt_int8_sq": ("modelopt_int8_sq", lambda flip=False: modelopt_int8_sq(), False),
    "modelopt_int8_sq no input_scale": ("modelopt_int8_sq", lambda flip=False: modelopt_int8_sq(
        input_scale=False), False),
    # GPTQ v1 and AutoAWQ GEMM
    "gptq": ("gptq", gptq, True),
    "gptq qzeros": ("gptq", lambda flip=False: gptq(flip_zeros=flip), True),
    "gptq g_idx (no act-order)": ("gptq", lambda flip=False: gptq(flip, g_idx=True), True),
    "awq_gemm": ("awq_gemm", awq_gemm, True),
    "awq_gemm qzeros": ("awq_gemm", lambda flip=False: awq_gemm(flip_zeros=flip), True),
    # FP8 formats
    "modelopt_mxfp8": ("modelopt_mxfp8", lambda flip=False: modelopt_mxfp8(), False),
    "modelopt_fp8 0-d": ("modelopt_fp8",
                         lambda flip=False: per_tensor_fp8("modelopt_fp8", torch.float32, "0-d"),
                         False),
    "modelopt_fp8 [1]": ("modelopt_fp8",
                         lambda flip=False: per_tensor_fp8("modelopt_fp8", torch.float32, "[1]"),
                         False),
    "ct_fp8 [1] bf16": ("ct_fp8",
                        lambda flip=False: per_tensor_fp8("ct_fp8", torch.bfloat16, "[1]"), False),
    "ct_fp8 0-d f16": ("ct_fp8",
                       lambda flip=False: per_tensor_fp8("ct_fp8", torch.float16, "0-d"), False),
    "modelopt_fp8_per_channel": ("modelopt_fp8_per_channel", lambda flip=False: per_channel_fp8(
        "modelopt_fp8_per_channel", torch.float32, column=False), False),
    "ct_fp8_channel [out, 1]": ("ct_fp8_channel", lambda flip=False: per_channel_fp8(
        "ct_fp8_channel", torch.bfloat16, column=True), False),
    "ct_fp8_channel [out]": ("ct_fp8_channel", lambda flip=False: per_channel_fp8(
        "ct_fp8_channel", torch.bfloat16, column=False), False),
    "modelopt_fp8_block [ob, 1, ib, 1]": ("modelopt_fp8_block", lambda flip=False: block_fp8(
        "modelopt_fp8_block", "weight_scale", 130, 200,
        lambda s: f32(s).reshape(len(s), 1, len(s[0]), 1)), False),
    "modelopt_fp8_block 0-d": ("modelopt_fp8_block", lambda flip=False: block_fp8(
        "modelopt_fp8_block", "weight_scale", 3, 5, lambda s: f32(s).reshape(())), False),
    "modelopt_fp8_block [1, 1, 1, 1]": ("modelopt_fp8_block", lambda flip=False: block_fp8(
        "modelopt_fp8_block", "weight_scale", 3, 5, lambda s: f32(s).reshape(1, 1, 1, 1)),
        False),
    "ct_fp8_block": ("ct_fp8_block", lambda flip=False: block_fp8(
        "ct_fp8_block", "weight_scale", 130, 260, bf16), False),
    "deepseek_fp8_block f32": ("deepseek_fp8_block", lambda flip=False: block_fp8(
        "deepseek_fp8_block", "weight_scale_inv", 130, 140, f32), False),
    "deepseek_fp8_block bf16 (Qwen3)": ("deepseek_fp8_block", lambda flip=False: block_fp8(
        "deepseek_fp8_block", "weight_scale_inv", 130, 200, bf16), False),
}
# Stacked MoE forms (reference sections 0 and 3.5: scalars -> [E] or [E, 1], [E, out, 1],
# [E, ob, 1, ib, 1]; compressed-tensors weight_shape gains the E entry).
CASES.update({
    "ct_nvfp4 stacked, global [E, 1]": ("ct_nvfp4", lambda flip=False: stacked(
        [ct_nvfp4(flip, e) for e in range(2)]), True),
    "modelopt_int4_awq stacked [E, out/2, in]": ("modelopt_int4_awq", lambda flip=False:
        stacked([modelopt_int4_awq(flip, e=e) for e in range(2)]), True),
    "modelopt_w4a8_awq stacked, s2 [E]": ("modelopt_w4a8_awq", lambda flip=False: stacked(
        [modelopt_int4_awq(flip, pqs=False, w4a8=True, e=e) for e in range(2)]), True),
    "ct_int4_asym stacked": ("ct_int4_asym", lambda flip=False: stacked(
        [ct_int4_asym(flip, flip, e) for e in range(2)]), True),
    "ct_fp8 stacked [E, 1]": ("ct_fp8", lambda flip=False: stacked(
        [per_tensor_fp8("ct_fp8", torch.bfloat16, "[1]", e) for e in range(2)]), False),
    "ct_fp8_channel stacked [E, out, 1]": ("ct_fp8_channel", lambda flip=False: stacked(
        [per_channel_fp8("ct_fp8_channel", torch.bfloat16, True, e) for e in range(2)]), False),
    "modelopt_fp8_per_channel stacked [E, out]": ("modelopt_fp8_per_channel", lambda flip=False:
        stacked([per_channel_fp8("modelopt_fp8_per_channel", torch.float32, False, e)
                 for e in range(2)]), False),
    "modelopt_fp8_block stacked [E, ob, 1, ib, 1]": ("modelopt_fp8_block", lambda flip=False:
        stacked([block_fp8("modelopt_fp8_block", "weight_scale", 130, 140,
                           lambda s: f32(s).reshape(len(s), 1, len(s[0]), 1), e)
                 for e in range(2)]), False),
    "deepseek_fp8_block stacked [E, ob, ib]": ("deepseek_fp8_block", lambda flip=False: stacked(
        [block_fp8("deepseek_fp8_block", "weight_scale_inv", 130, 140, f32, e)
         for e in range(3)]), False),
})
PACKED = [k for k, (_, _, packed) in CASES.items() if packed]


@functools.cache  # the tensors are only read; the Python grids are the slow part
def build(case_id: str, flip: bool = False) -> Case:
    name, builder, _ = CASES[case_id]
    case = builder(flip=flip)
    assert case.scheme == name
    return case


def metas(tensors: dict[str, torch.Tensor]) -> dict[str, RoleMeta]:
    return {r: RoleMeta(tuple(t.shape), dtype_name(t.dtype)) for r, t in tensors.items()}


def run(det: Detected, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return dequantize(det.scheme, tensors, {r: f.layout for r, f in det.roles.items()},
                      {r: f.view for r, f in det.roles.items()}, det.axes, det.shape)


def detect_only(name: str, tensors: dict[str, torch.Tensor]) -> Detected:
    det = detect((scheme(name),), metas(tensors), None)
    assert isinstance(det, Detected), det
    return det


def quantized_schemes() -> Iterator[Scheme]:
    return (s for s in all_schemes() if s.name != "plain")


# --- every scheme has a hand-built stem ---------------------------------------------------------


def test_every_shipped_scheme_has_a_hand_built_stem() -> None:
    covered = {name for name, _, _ in CASES.values()}
    missing = sorted({s.name for s in quantized_schemes()} - covered)
    assert not missing, f"schemes without a hand-built dequant reference here: {missing}"


@pytest.mark.parametrize("case_id", list(CASES))
def test_dequantize_matches_the_format_definition(case_id: str) -> None:
    case = build(case_id)
    det = detect_only(case.scheme, case.tensors)
    assert det.axes == case.axes and det.shape == case.shape
    got = run(det, case.tensors)
    want = f64(case.expected)
    assert got.dtype == torch.float64
    assert torch.equal(got, want), f"{case_id}: max |diff| {(got - want).abs().max()}"
    for label, wrong in case.wrong.items():
        assert not torch.equal(got, f64(wrong)), f"{case_id}: result also fits {label!r}"


@pytest.mark.parametrize("case_id", list(CASES))
def test_detection_with_config_hints_picks_the_scheme(case_id: str) -> None:
    """With the hints a real config gives (quant_algo / format / quant_method), detection over
    all shipped schemes lands on this scheme, and its dequantization is the same."""
    case = build(case_id)
    hints = frozenset(f"{key}={value}" for key, values in scheme(case.scheme).detects.items()
                      for value in values)
    det = detect(all_schemes(), metas(case.tensors), None, hints)
    assert isinstance(det, Detected), det
    assert det.scheme.name == case.scheme
    assert torch.equal(run(det, case.tensors), f64(case.expected))


@pytest.mark.parametrize("case_id", PACKED)
def test_flipped_element_order_does_not_dequantize_to_the_same_values(case_id: str) -> None:
    case = build(case_id)
    flipped = build(case_id, flip=True)
    det = detect_only(flipped.scheme, flipped.tensors)
    packed = {r for r, fit in det.roles.items() if any(a.kind == "packed" for a in fit.layout)}
    changed = {r for r in case.tensors if not bit_equal(case.tensors[r], flipped.tensors[r])}
    assert changed and changed <= packed, "only the packed bytes may change"
    assert not torch.equal(run(det, flipped.tensors), f64(case.expected))


def test_the_fp4_negative_control_really_swaps_nibbles() -> None:
    codes = [[0x1, 0xE, 0x7, 0x8]]
    assert pack_fp4_rows(codes) == [[0xE1, 0x87]]
    assert pack_fp4_rows(codes, HI2) == [[0x1E, 0x78]]


# --- the bit orders themselves ---------------------------------------------------------------


def positions(factor: int, bits: int, order: str = "lo") -> tuple[int, ...]:
    return AxisSpec("in", "packed", factor, "u4", order).positions(bits)


def test_unpack_0x3a_low_nibble_first() -> None:
    byte = torch.tensor([0x3A], dtype=torch.uint8)
    assert positions(2, 4) == (0, 4)
    assert unpack(byte, 0, 2, 4, positions(2, 4)).tolist() == [0xA, 0x3]


def test_unpack_int32_word_of_codes_1_to_8() -> None:
    word = signed32(sum(c << (4 * i) for i, c in enumerate(range(1, 9))))
    assert word == signed32(0x87654321) and word < 0
    t = torch.tensor([[word]], dtype=torch.int32)
    assert unpack(t, 1, 8, 4, positions(8, 4)).tolist() == [list(range(1, 9))]


def test_unpack_int32_bytes_of_compressed_tensors_int8() -> None:
    word = signed32(0x80FF017F)  # bytes LSB first: 0x7F, 0x01, 0xFF, 0x80
    t = torch.tensor([word], dtype=torch.int32)
    codes = unpack(t, 0, 4, 8, positions(4, 8))
    assert codes.tolist() == [0x7F, 0x01, 0xFF, 0x80]
    assert decode_codes(codes, "u8o128").tolist() == [-1.0, -127.0, 127.0, 0.0]


def test_unpack_along_dim_0_keeps_rows_in_order() -> None:
    # two zero-point words stacked along out: rows 0..7 from word 0, rows 8..15 from word 1
    w0, w1 = signed32(0x76543210), signed32(0xFEDCBA98)
    t = torch.tensor([[w0, w1], [w1, w0]], dtype=torch.int32)
    codes = unpack(t, 0, 8, 4, positions(8, 4))
    assert codes.shape == (16, 2)
    assert codes[:, 0].tolist() == list(range(16))
    assert codes[:, 1].tolist() == list(range(8, 16)) + list(range(8))


def test_hi_order_puts_the_even_element_in_the_high_nibble() -> None:
    assert positions(2, 4, "hi") == (4, 0)
    byte = torch.tensor([0x3A], dtype=torch.uint8)
    assert unpack(byte, 0, 2, 4, positions(2, 4, "hi")).tolist() == [0x3, 0xA]
    word = torch.tensor([signed32(0x12345678)], dtype=torch.int32)
    assert unpack(word, 0, 8, 4, positions(8, 4, "hi")).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_awq_order_nibble_k_holds_element_0_2_4_6_1_3_5_7() -> None:
    elements = [0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8]
    word = sum(elements[AWQ_NIBBLE_HOLDS[k]] << (4 * k) for k in range(8))
    assert word == 0x86427531
    t = torch.tensor([signed32(word)], dtype=torch.int32)
    assert unpack(t, 0, 8, 4, positions(8, 4, "awq")).tolist() == elements
    assert pack(torch.tensor(elements), 0, 8, 4, positions(8, 4, "awq"), torch.int32
                ).tolist() == [signed32(word)]


def test_role_on_logical_decodes_hi_and_awq_layouts() -> None:
    # bitsandbytes-style: even element in the high nibble, unsigned codes
    hi = (AxisSpec("out"), AxisSpec("in", "packed", 2, "u4", "hi"))
    x = role_on_logical(torch.tensor([[0x3A, 0xF0]], dtype=torch.uint8), hi, ("out", "in"), (1, 4))
    assert x.tolist() == [[3.0, 10.0, 15.0, 0.0]]
    # AWQ GEMM qweight [in, out/8], packed along out with the interleave
    awq = (AxisSpec("in"), AxisSpec("out", "packed", 8, "u4", "awq"))
    t = torch.tensor([[signed32(0x86427531)], [0]], dtype=torch.int32)
    y = role_on_logical(t, awq, ("out", "in"), (8, 2))
    assert y.tolist() == [[float(v), 0.0] for v in range(1, 9)]


def test_pack_unpack_round_trip_random_bytes() -> None:
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (5, 12), dtype=torch.uint8, generator=g)
    for order in ("lo", "hi"):
        p = positions(2, 4, order)
        assert bit_equal(pack(unpack(raw, 1, 2, 4, p), 1, 2, 4, p, torch.uint8), raw)
        assert bit_equal(pack(unpack(raw, 0, 2, 4, p), 0, 2, 4, p, torch.uint8), raw)


def test_pack_unpack_round_trip_negative_int32_words() -> None:
    g = torch.Generator().manual_seed(1)
    words = torch.randint(-2 ** 31, 2 ** 31, (4, 6), dtype=torch.int64, generator=g)
    words[0, 0], words[0, 1], words[0, 2] = -1, -2 ** 31, signed32(0x87654321)
    raw = words.to(torch.int32)
    assert (raw < 0).any()
    for factor, bits in ((8, 4), (4, 8), (16, 2)):
        for order in ("lo", "hi") + (("awq",) if factor == 8 else ()):
            p = positions(factor, bits, order)
            for dim in (0, 1):
                codes = unpack(raw, dim, factor, bits, p)
                assert int(codes.min()) >= 0 and int(codes.max()) < 1 << bits
                assert bit_equal(pack(codes, dim, factor, bits, p, torch.int32), raw)


# --- codecs -----------------------------------------------------------------------------------


def test_e2m1_codec_all_sixteen_codes() -> None:
    got = decode_codes(torch.arange(16, dtype=torch.int32), "e2m1")
    assert got.tolist() == [e2m1(c) for c in range(16)]
    assert got.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_integer_codecs() -> None:
    c16 = torch.arange(16, dtype=torch.int32)
    assert decode_codes(c16, "u4o8").tolist() == [float(v - 8) for v in range(16)]
    assert decode_codes(c16, "s4").tolist() == [float(v) for v in [*range(8), *range(-8, 0)]]
    assert decode_codes(c16, "u4").tolist() == [float(v) for v in range(16)]
    c256 = torch.arange(256, dtype=torch.int32)
    assert decode_codes(c256, "u8o128").tolist() == [float(v - 128) for v in range(256)]
    assert decode_codes(c256, "s8").tolist() == [float(v) for v in [*range(128),
                                                                     *range(-128, 0)]]


def test_torch_float8_e4m3fn_bytes_decode_as_the_format_says() -> None:
    """The hand decoder used for the FP8 expectations agrees with torch on every non-NaN byte."""
    good = [b for b in range(256) if b not in E4M3_NAN]
    got = fp8_tensor(good).to(torch.float64).tolist()
    assert got == [e4m3(b) for b in good]
    assert e4m3(0x7E) == 448.0 and e4m3(0x01) == 2.0 ** -9


# --- formulas ------------------------------------------------------------------------------


def formula_roles(f: Any) -> set[str]:
    if f[0] == "role":
        return {f[1]}
    if f[0] == "int":
        return set()
    if f[0] == "call":
        return formula_roles(f[2])
    return formula_roles(f[1]) | formula_roles(f[2])


def top_level_factors(f: Any) -> list[Any]:
    """The operands of the outermost product/quotient chain: ``a * b / c`` -> [a, b, c]."""
    if f[0] in ("*", "/"):
        return top_level_factors(f[1]) + top_level_factors(f[2])
    return [f]


@pytest.mark.parametrize("s", list(quantized_schemes()), ids=lambda s: s.name)
def test_dequant_formula_uses_only_declared_tensor_roles(s: Scheme) -> None:
    """Every role the formula reads is a declared tensor role. An optional one (ModelOpt's
    pre_quant_scale, absent where it was folded into the layer norm) evaluates to 1 when absent,
    so it may only appear as a bare factor of the outermost product, where 1 changes nothing."""
    assert s.dequant is not None
    used = formula_roles(s.dequant)
    assert used <= set(s.roles), f"undeclared roles {used - set(s.roles)}"
    assert s.primary in used, "the formula must read the role carrying the logical tensor"
    factors = top_level_factors(s.dequant)
    for r in used:
        spec = s.roles[r]
        assert spec.kind == "tensor", f"{r} is {spec.kind} metadata, not a value"
        if spec.optional:
            bare = sum(1 for f in factors if f == ("role", r))
            nested = sum(len(formula_roles(f) & {r}) for f in factors if f != ("role", r))
            assert bare == 1 and nested == 0, (
                f"{r} is optional but not a bare factor of the outermost product, so a stem "
                "without it cannot dequantize")
    assert set(s.roles) <= SUFFIX_ROLES, f"{set(s.roles) - SUFFIX_ROLES} not in SUFFIX_ROLES"


# --- compressed-tensors weight_shape: the logical in need not be a multiple of the pack factor --


def test_ct_int4_dequantize_on_the_weight_shape_crops_the_padding_nibbles() -> None:
    """in = 130: 17 words hold 136 nibbles, the last 6 are padding (stored 0, i.e. -8). Given
    the logical shape from weight_shape, the dequantizer crops them."""
    OUT, IN = 3, 130
    q = grid(OUT, IN, lambda o, i: (o * 5 + i * 3 + 1) % 16 - 8)
    words = pack_int_rows([[v + 8 for v in row] for row in q], 4, SEQ8)
    assert len(words[0]) == 17
    tensors = {"weight_packed": torch.tensor(words, dtype=torch.int32),
               "weight_scale": torch.tensor(INT_SCALES, dtype=torch.bfloat16),
               "weight_shape": torch.tensor([OUT, IN], dtype=torch.int64)}
    det = detect_only("ct_int4", tensors)
    assert det.shape == (3, 136)  # headers alone cannot see the padding
    shape = tuple(tensors["weight_shape"].tolist())
    got = dequantize(det.scheme, tensors, {r: f.layout for r, f in det.roles.items()},
                     {r: f.view for r, f in det.roles.items()}, det.axes, shape)
    assert torch.equal(got, f64(grid(OUT, IN, lambda o, i: q[o][i] * INT_SCALES[o][i // 128])))


# --- regressions of bugs these tests found ---------------------------------------------------


def modelopt_bmm_nvfp4() -> tuple[dict[str, torch.Tensor], list[Any]]:
    """ModelOpt export of BMM-style experts (gpt-oss, Llama4; reference section 2.3, [E]):
    gate_up_proj uint8 [E, in/2, out] (packed and blocked along dim -2), weight_scale
    [E, in/16, out], and ONE 0-d weight_scale_2 / input_scale for the whole 3-D tensor."""
    E, IN, OUT = 2, 40, 3
    codes = [[[fp4_code(o, i, e) for o in range(OUT)] for i in range(IN)] for e in range(E)]
    sbytes = [[[0x30 + 3 * e + 5 * b + o for o in range(OUT)] for b in range(3)] for e in range(E)]
    s2 = 0.375
    # pack pairs of in-rows (2k, 2k+1) of each out column, even element in the low nibble
    weight = [[[pack_word([codes[e][2 * k][o], codes[e][2 * k + 1][o]], 4, LO2)
                for o in range(OUT)] for k in range(IN // 2)] for e in range(E)]
    tensors = {"weight": torch.tensor(weight, dtype=torch.uint8),
               "weight_scale": fp8_tensor(sbytes),
               "weight_scale_2": torch.tensor(s2, dtype=torch.float32),
               "input_scale": torch.tensor(0.5, dtype=torch.float32)}
    expected = [[[e2m1(codes[e][i][o]) * e4m3(sbytes[e][i // 16][o]) * s2 for o in range(OUT)]
                 for i in range(IN)] for e in range(E)]
    return tensors, expected


def modelopt_bmm_fp8() -> tuple[dict[str, torch.Tensor], list[Any]]:
    """The FP8 variant of the same export: [E, in, out] fp8 and one 0-d weight_scale."""
    E, IN, OUT = 2, 5, 3
    wbytes = [[[fp8_byte(o, i, e) for o in range(OUT)] for i in range(IN)] for e in range(E)]
    s = 0.0390625
    tensors = {"weight": fp8_tensor(wbytes), "weight_scale": torch.tensor(s, dtype=torch.float32),
               "input_scale": torch.tensor(0.5, dtype=torch.float32)}
    return tensors, [[[e4m3(b) * s for b in row] for row in ex] for ex in wbytes]


@pytest.mark.parametrize("name,build_stem,hint", [
    ("modelopt_nvfp4", modelopt_bmm_nvfp4, "quant_algo=NVFP4"),
    ("modelopt_fp8", modelopt_bmm_fp8, "quant_algo=FP8"),
], ids=["nvfp4", "fp8"])
def test_modelopt_bmm_experts_with_one_0d_scale_for_all_experts_dequantize(
        name: str, build_stem: Callable[[], tuple[dict[str, torch.Tensor], list[Any]]],
        hint: str) -> None:
    tensors, expected = build_stem()
    det = detect(all_schemes(), metas(tensors), ("e", "in", "out"), frozenset({hint}))
    assert isinstance(det, Detected), det
    assert det.scheme.name == name
    assert torch.equal(run(det, tensors), f64(expected))


def test_ct_w8a16_with_in_64_is_not_dequantized_as_int4() -> None:
    from convlens.compiler.schemes import config_hints

    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                      "weights": {"num_bits": 8, "type": "int",
                                                  "strategy": "group", "group_size": 128,
                                                  "symmetric": True}}}}}
    OUT, IN = 2, 64
    q = grid(OUT, IN, lambda o, i: (o * 37 + i * 13 + 5) % 256 - 128)
    tensors = {"weight_packed": torch.tensor(
                   pack_int_rows([[v + 128 for v in row] for row in q], 8, SEQ4),
                   dtype=torch.int32),
               "weight_scale": torch.tensor([[0.5], [0.25]], dtype=torch.bfloat16),
               "weight_shape": torch.tensor([OUT, IN], dtype=torch.int64)}
    det = detect(all_schemes(), metas(tensors), None, config_hints(config))
    assert isinstance(det, Detected), det
    assert det.scheme.name == "ct_int8" and det.shape == (OUT, IN)
    assert torch.equal(run(det, tensors), f64(grid(OUT, IN, lambda o, i: q[o][i] * (0.5, 0.25)[o])))


def test_gptq_act_order_g_idx_picks_each_input_channel_s_group() -> None:
    """desc_act / act-order (reference section 4): g_idx[i] is the group of input channel i and
    the groups are not contiguous, so W[o, i] = (q - (z[g_idx[i]] + 1)) * s[g_idx[i], o]
    (AutoGPTQ: scales[g_idx], zeros[g_idx]). Same bytes as the "gptq" case, only g_idx differs:
    input channels 0, 17, ..., 119 form group 1, the other 128 group 0."""
    base = build("gptq")
    OUT = IN = 136
    g_of = [1 if i % 17 == 0 else 0 for i in range(IN)]
    assert sum(g_of) == 8
    q = grid(OUT, IN, lambda o, i: (o * 5 + i * 3 + 2) % 16)
    zs = grid(OUT, 2, lambda o, g: (o * 3 + g * 5 + 1) % 16)
    expected = grid(OUT, IN, lambda o, i: (q[o][i] - (zs[o][g_of[i]] + 1))
                    * awq_scale(o, g_of[i]))
    tensors = dict(base.tensors, g_idx=torch.tensor(g_of, dtype=torch.int32))
    det = detect_only("gptq", tensors)
    got = run(det, tensors)
    assert not torch.equal(got, f64(base.expected)), "g_idx was ignored (groups taken as i // 128)"
    assert torch.equal(got, f64(expected))


def test_hand_packers_put_the_nibbles_where_the_formats_say() -> None:
    # ModelOpt int4: rows 0 and 1 of a column share a byte, row 0 low, two's complement
    assert pack_int4_along_out([[1, -8], [-1, 7]]) == [[0xF1, 0x78]]
    # GPTQ qweight: input channel i of a word at bits 4i; 8 inputs of one output column
    assert transpose(pack_int_rows([list(range(1, 9))], 4, SEQ8)) == [[signed32(0x87654321)]]
    # AWQ: columns 0..7 with values 1..8 -> nibbles (LSB first) 1,3,5,7,2,4,6,8
    assert pack_int_rows([list(range(1, 9))], 4, AWQ8) == [[signed32(0x86427531)]]
