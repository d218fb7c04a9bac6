"""Drop-ins for transformers' conversion functions, quant-aware.

``revert_weight_conversion(model, state_dict)`` has transformers' signature and returns the hub
layout of an in-memory state dict, scale siblings included (a 0-d ``weight_scale_2`` next to a
fused ``gate_up_proj``, ``[E]`` per-expert scales, FP8 block scales), where transformers' own
revert raises or writes junk names. ``apply(model_or_config, state_dict)`` is the load side.

The conversion is chosen like transformers chooses its mapping: by the model's class name
first, then by ``config.model_type`` (and nested sub-model configs). transformers itself is not
imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from convlens.api import Conversion, config_dict, load_rules, shipped_rules
from convlens.checkpoint import select_rules
from convlens.errors import ConversionError
from convlens.runtime.report import RunReport


def _config_of(model_or_config: Any) -> dict[str, Any]:
    config = getattr(model_or_config, "config", model_or_config)
    return config_dict(config)


def conversion_for(model_or_config: Any, rules: str | None = None) -> Conversion:
    """The conversion for a transformers model (class name first) or a config."""
    if rules is not None:
        return load_rules(rules)
    config = _config_of(model_or_config)
    name = type(model_or_config).__name__
    if hasattr(model_or_config, "config"):
        for rule in sorted(shipped_rules()):
            conv = load_rules(rule)
            if name in conv.architectures:
                return conv
    return select_rules(config)[0]


def revert_weight_conversion(model: Any, state_dict: Mapping[str, torch.Tensor], *,
                             rules: str | None = None, policies: Iterable[str] = (),
                             report: RunReport | None = None) -> dict[str, torch.Tensor]:
    """transformers' ``revert_weight_conversion(model, state_dict)``, quant-aware: the hub
    layout of an in-memory state dict, every scale with its weight, tensors ready to save."""
    conversion = conversion_for(model, rules)
    return conversion.revert(state_dict, _config_of(model), policies=policies, report=report,
                             copy=True)


def apply(model_or_config: Any, state_dict: Mapping[str, torch.Tensor], *,
          rules: str | None = None, policies: Iterable[str] = (),
          report: RunReport | None = None) -> dict[str, torch.Tensor]:
    """The load side: a hub-layout state dict in the layout the model keeps in memory."""
    conversion = conversion_for(model_or_config, rules)
    if conversion is None:  # pragma: no cover - conversion_for raises
        raise ConversionError("no conversion")
    return conversion.apply(state_dict, _config_of(model_or_config), policies=policies,
                            report=report)
