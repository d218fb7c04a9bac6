"""The public facade: load a conversion, apply or revert it on a state dict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from convlens.compiler import plan as P
from convlens.compiler.checks import check_names
from convlens.compiler.planner import HasMeta, TensorMeta, plan
from convlens.compiler.program import Program, compile_conversion
from convlens.dsl import ast
from convlens.dsl.parser import parse, parse_file
from convlens.errors import ConversionError, RuleError, Span, did_you_mean
from convlens.runtime.report import RunReport

# torch is imported where tensors are touched: planning and a checkpoint's byte copies need
# none of its ~200 MB (issue 4's memory bound)
if TYPE_CHECKING:
    import torch

Direction = Literal["apply", "revert"]


def shipped_rules() -> dict[str, Path]:
    """Name -> path of every conversion shipped in ``convlens/rules``."""
    root = resources.files("convlens") / "rules"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".conv")}


def _include_loader(base: Path | None) -> Any:
    def load(name: str, span: Span) -> ast.Conversion:
        if base is not None and (base / f"{name}.conv").is_file():
            return parse_file(base / f"{name}.conv", display_path(base / f"{name}.conv"))
        shipped = shipped_rules()
        if name in shipped:
            return parse_file(shipped[name], display_path(shipped[name]))
        raise RuleError(f"include {name!r}: no such conversion", span=span,
                        hint=did_you_mean(name, sorted(shipped)))
    return load


def compile_text(text: str, path: str = "<string>") -> Program:
    return compile_conversion(parse(text, path), _include_loader(None))


def display_path(path: Path) -> str:
    """How messages name a rule file: shipped files as ``convlens/rules/NAME.conv``."""
    shipped = Path(str(resources.files("convlens") / "rules")).resolve()
    try:
        return str(Path("convlens/rules") / path.resolve().relative_to(shipped))
    except ValueError:
        return str(path)


@lru_cache(maxsize=1024)  # every shipped file (dozens) plus the user's
def _compile_path(path: str, mtime: float, display: str) -> Program:
    p = Path(path)
    return compile_conversion(parse_file(p, display), _include_loader(p.parent))


def load_rules(name_or_path: str | Path) -> Conversion:
    """A conversion by shipped name (``"mixtral"``) or from a ``.conv`` file.

    >>> conv = load_rules("mixtral")
    >>> conv.name, "mixtral" in conv.model_types
    ('mixtral', True)
    """
    p = Path(name_or_path)
    if not p.is_file():
        shipped = shipped_rules()
        name = str(name_or_path)
        if name not in shipped:
            if str(name_or_path).endswith(".conv") or p.parent != Path("."):
                raise ConversionError(f"no rule file {str(name_or_path)!r}")
            raise ConversionError(f"no shipped conversion named {name!r}",
                                  hint=did_you_mean(name, sorted(shipped))
                                  or f"shipped: {', '.join(sorted(shipped))}")
        p = shipped[name]
    return Conversion(_compile_path(str(p.resolve()), p.stat().st_mtime, display_path(p)))


def config_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict: a mapping, a transformers config (``to_dict``) or None."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        value = to_dict()
        if isinstance(value, dict):
            return value
    raise TypeError(f"config must be a mapping or have to_dict(), not {type(config).__name__}")


def metas_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, TensorMeta]:
    import torch

    from convlens.runtime.dtypes import dtype_name

    out = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{key!r} is a {type(t).__name__}, not a tensor", key=key)
        out[key] = TensorMeta(tuple(t.shape), dtype_name(t.dtype))
    return out


class Conversion:
    """A compiled conversion and its derived inverse.

    ``apply`` runs the rules as written (hub layout -> in-memory layout for the shipped files),
    ``revert`` runs the derived inverse. Both check, before touching data, that the result maps
    back to the input key for key, so a state dict that is already converted is reported instead
    of being converted twice.
    """

    def __init__(self, program: Program) -> None:
        self.program = program
        self.inverse_program = program.inverse()

    @property
    def name(self) -> str:
        return self.program.name

    @property
    def model_types(self) -> tuple[str, ...]:
        return self.program.model_types

    @property
    def architectures(self) -> tuple[str, ...]:
        return self.program.architectures

    def _programs(self, direction: Direction) -> tuple[Program, Program]:
        if direction == "apply":
            return self.program, self.inverse_program
        if direction == "revert":
            return self.inverse_program, self.program
        raise ValueError(f"direction is 'apply' or 'revert', not {direction!r}")

    def plan(self, metas: Mapping[str, HasMeta], config: Any = None, *,
             direction: Direction = "apply", strict: bool = False,
             check: bool = True, policies: Iterable[str] = ()) -> P.Plan:
        """The plan for tensors described by ``metas`` (anything with ``shape`` and ``dtype``:
        TensorMeta, a safetensors header entry), validated whole. ``policies``: the lossy steps
        allowed (``max``, ``rescale``, ``requantize``); none by default."""
        forward, backward = self._programs(direction)
        cfg = config_dict(config)
        result = plan(forward, metas, cfg, strict=strict, policies=frozenset(policies))
        total = forward.catch_all()
        if total is not None and result.passthrough:
            shown = ", ".join(repr(k) for k in result.passthrough[:3])
            raise ConversionError(
                f"{self.name} converts checkpoints whose every key its rules match (the way back "
                f"gives every key the form {total.src.patterns[0].text!r}), but "
                f"{len(result.passthrough)} key(s) match no rule: {shown}"
                + (" ..." if len(result.passthrough) > 3 else ""), key=result.passthrough[0],
                rule=total.ref.label, span=total.span)
        if check:
            check_names(forward, backward, metas, result, cfg)
        return result

    def _run(self, state_dict: Mapping[str, torch.Tensor], config: Any, direction: Direction,
             strict: bool, policies: Iterable[str], report: RunReport | None, copy: bool
             ) -> dict[str, torch.Tensor]:
        p = self.plan(metas_of(state_dict), config, direction=direction, strict=strict,
                      policies=policies)
        from convlens.runtime.execute import execute

        return execute(p, state_dict, report, copy=copy)

    def apply(self, state_dict: Mapping[str, torch.Tensor], config: Any = None, *,
              strict: bool = False, policies: Iterable[str] = (),
              report: RunReport | None = None, copy: bool = False) -> dict[str, torch.Tensor]:
        """Forward conversion of an in-memory state dict.

        Outputs are views of the inputs where possible (a scale duplicated to several experts
        is one tensor); ``copy=True`` gives each output its own contiguous memory, as
        ``safetensors.torch.save_file`` requires. ``strict``: keys no rule matches are an
        error. ``policies``: lossy steps allowed; each one taken is appended to
        ``report.lossy`` with its measured error."""
        return self._run(state_dict, config, "apply", strict, policies, report, copy)

    def revert(self, state_dict: Mapping[str, torch.Tensor], config: Any = None, *,
               strict: bool = False, policies: Iterable[str] = (),
               report: RunReport | None = None, copy: bool = False) -> dict[str, torch.Tensor]:
        """Inverse conversion of an in-memory state dict; arguments as for :meth:`apply`."""
        return self._run(state_dict, config, "revert", strict, policies, report, copy)

    def __repr__(self) -> str:
        return f"<Conversion {self.name} ({len(self.program.rules)} rules)>"
