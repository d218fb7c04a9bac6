"""Schemes (quantization formats) written as data in ``convlens/schemes/*.conv``.

A scheme file is compiled into a :class:`~convlens.compiler.layout.Scheme`: role layouts for the
layout algebra, the config values that point at it (detection hints) and its reference
dequantizer, a small formula kept as plain data for :mod:`convlens.runtime.dequant`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from convlens.compiler.layout import CODECS, PLAIN, AxisSpec, Dim, RoleSpec, Scheme
from convlens.compiler.naming import SUFFIX_ROLES
from convlens.compiler.plan import DTYPE_SIZES
from convlens.dsl import ast
from convlens.errors import ConvlensError, ErrorGroup, RuleError, did_you_mean

FUNCTIONS = frozenset({"e8m0", "recip"})
_STORAGE_BITS = {"U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64}
_AXES = ("out", "in")


def compile_scheme(node: ast.Scheme) -> Scheme:
    """Check a parsed scheme file and build its Scheme; all errors are reported together."""
    errors: list[ConvlensError] = []
    roles: dict[str, RoleSpec] = {}
    params = {p.name: p.default for p in node.params}
    for decl in node.roles:
        if decl.name in roles:
            errors.append(RuleError(f"role {decl.name} is declared twice", span=decl.span))
            continue
        try:
            roles[decl.name] = _role(decl, params)
        except RuleError as exc:
            errors.append(exc)
    if node.companion:
        for decl in node.roles:
            if decl.name in roles and (roles[decl.name].axes or not decl.part_of
                                       or roles[decl.name].kind != "tensor"):
                errors.append(RuleError(
                    f"companion role {decl.name} must be a scalar ([]) with `part of NAMES`: "
                    "it belongs to one stem and is never split or joined", span=decl.span))
        if node.dequant is not None or node.params:
            errors.append(RuleError(f"companion {node.name} has no dequant formula or params",
                                    span=node.span))
    elif roles:
        primary = next(iter(roles.values()))
        if primary.kind != "tensor" or primary.optional or primary.shared:
            errors.append(RuleError("the first role carries the logical tensor: it needs axes "
                                    "and cannot be optional or shared", span=node.roles[0].span))
        elif {a.name for a in primary.axes} != set(_AXES):
            errors.append(RuleError("the first role must store both out and in",
                                    span=node.roles[0].span))
    if not roles:
        errors.append(RuleError(f"scheme {node.name} declares no roles", span=node.span))
    for decl in node.roles:
        if decl.part_of and not node.companion:
            errors.append(RuleError(f"role {decl.name}: `part of` belongs in a companion file",
                                    span=decl.span))
    for name in roles:
        if name not in SUFFIX_ROLES:
            errors.append(RuleError(
                f"role {name!r} is not in the suffix-role vocabulary (convlens.compiler.naming."
                "SUFFIX_ROLES), so stems could not carry it", span=node.span))
    dequant = None
    if node.dequant is not None:
        try:
            dequant = _formula(node.dequant, roles)
        except RuleError as exc:
            errors.append(exc)
    if errors:
        raise errors[0] if len(errors) == 1 else ErrorGroup(errors)
    detects = {d.key: frozenset(d.values) for d in node.detects}
    return Scheme(node.name, roles, detects, dequant, node.path, params,
                  companion=node.companion)


def _role(decl: ast.RoleDecl, params: Mapping[str, int]) -> RoleSpec:
    dtype: str | None = decl.dtype
    if decl.dtype == "float":  # the model's float dtype, whatever it is (biases, some scales)
        pass
    elif decl.dtype not in DTYPE_SIZES:
        raise RuleError(f"role {decl.name}: unknown dtype {decl.dtype!r}", span=decl.span,
                        hint=did_you_mean(decl.dtype, sorted(DTYPE_SIZES)))
    flags = set(decl.flags)
    if decl.axes is None:
        return RoleSpec(decl.name, dtype, "shape", optional="optional" in flags)
    axes = []
    for a in decl.axes:
        if a.name not in _AXES:
            raise RuleError(f"role {decl.name}: axis {a.name!r} is not out or in", span=decl.span)
        if a.kind == "packed":
            if a.codec not in CODECS:
                raise RuleError(f"role {decl.name}: unknown codec {a.codec!r}", span=decl.span,
                                hint=did_you_mean(a.codec or "", sorted(CODECS)))
            bits = _STORAGE_BITS.get(decl.dtype)
            if bits is None or not isinstance(a.factor, int) or bits % a.factor:
                raise RuleError(f"role {decl.name}: {a.factor} values cannot share one "
                                f"{decl.dtype} element", span=decl.span)
            order = a.order or "lo"
            if order not in ("lo", "hi", "awq"):
                raise RuleError(f"role {decl.name}: unknown element order {order!r} (lo, hi, awq)",
                                span=decl.span)
            axes.append(AxisSpec(a.name, "packed", int(a.factor), a.codec, order))
        elif a.kind == "blocked" and isinstance(a.factor, str):
            if a.factor not in params:
                raise RuleError(f"role {decl.name}: block size {a.factor!r} is not a param of the "
                                f"scheme (declare: param {a.factor} 128)", span=decl.span)
            axes.append(AxisSpec(a.name, "blocked", params[a.factor], param=a.factor))
        elif a.kind == "blocked":
            axes.append(AxisSpec(a.name, "blocked", int(a.factor)))
        else:
            axes.append(AxisSpec(a.name))
    if len({a.name for a in axes}) != len(axes):
        raise RuleError(f"role {decl.name} names an axis twice", span=decl.span)
    views = tuple(tuple(Dim(d.axis, d.divisor, d.literal) for d in v) for v in decl.views)
    for v in views:
        for d in v:
            if d.axis is not None and d.axis not in {a.name for a in axes}:
                raise RuleError(f"role {decl.name}: the stored shape uses {d.axis}, which the "
                                "role does not store", span=decl.span)
    return RoleSpec(decl.name, dtype, "tensor", tuple(axes), views,
                    shared="shared" in flags, optional="optional" in flags,
                    activation="activation" in flags, reciprocal="reciprocal" in flags,
                    index="index" in flags, homes=decl.part_of)


def _formula(e: ast.Expr, roles: Mapping[str, RoleSpec]) -> Any:
    if isinstance(e, ast.Int):
        return ("int", e.value)
    if isinstance(e, ast.Ref):
        name = e.path[0]
        if name not in roles:
            raise RuleError(f"dequant uses {name!r}, which is not a role", span=e.span,
                            hint=did_you_mean(name, sorted(roles)))
        return ("role", name)
    if isinstance(e, ast.Call):
        if e.func not in FUNCTIONS:
            raise RuleError(f"dequant: unknown function {e.func!r}", span=e.span,
                            hint=did_you_mean(e.func, sorted(FUNCTIONS))
                            or f"functions: {', '.join(sorted(FUNCTIONS))}")
        return ("call", e.func, _formula(e.arg, roles))
    return (e.op, _formula(e.left, roles), _formula(e.right, roles))


def scheme_files() -> dict[str, Path]:
    root = resources.files("convlens") / "schemes"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".conv")}


@lru_cache(maxsize=1)
def _shipped() -> tuple[Scheme, ...]:
    from convlens.dsl.parser import parse_scheme_file

    return tuple(compile_scheme(parse_scheme_file(path, f"convlens/schemes/{name}.conv"))
                 for name, path in sorted(scheme_files().items()))


@lru_cache(maxsize=1)
def all_schemes() -> tuple[Scheme, ...]:
    """Every shipped scheme, most specific first, and the plain scheme last."""
    out = sorted((s for s in _shipped() if not s.companion), key=lambda s: -len(s.roles))
    return (*out, PLAIN)


@lru_cache(maxsize=1)
def companion_roles() -> Mapping[str, RoleSpec]:
    """Roles of the shipped companion files (KV-cache scales), by name."""
    return {name: spec for s in _shipped() if s.companion for name, spec in s.roles.items()}


def scheme(name: str) -> Scheme:
    for s in all_schemes():
        if s.name == name:
            return s
    raise KeyError(name)


def config_hints(config: Mapping[str, Any]) -> frozenset[str]:
    """``key=value`` pairs from a config's quantization sections (quant_method, quant_algo,
    format, strategy, num_bits, ...) that schemes name in their ``for`` lines.
    ``hf_quant_config`` may be merged in under its own key."""
    found: set[str] = set()

    def walk(value: Any, key: str, depth: int) -> None:
        if depth > 6:
            return
        if isinstance(value, (str, int, bool)):
            found.add(f"{key}={value}")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k), depth + 1)
        elif isinstance(value, list):
            for v in value[:64]:
                walk(v, key, depth + 1)

    for key in ("quantization_config", "compression_config", "hf_quant_config", "quantization"):
        if key in config:
            walk(config[key], key, 0)
    return frozenset(found)
