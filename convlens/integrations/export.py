"""One call for quantizer exports (NVIDIA ModelOpt's use case).

A quantizer holds the model's quantized state dict with in-memory names (experts stacked into
3-D ``gate_up_proj`` with ``gate_up_proj_weight_scale``, ``[E]`` ``weight_scale_2`` ...) and
must publish the hub layout that inference engines load, with the module lists of its
quantization config renamed the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from convlens.configs import map_quantization_configs
from convlens.integrations.transformers import _config_of, conversion_for
from convlens.runtime.execute import execute
from convlens.runtime.report import RunReport


def revert_quantized_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_or_config: Any,
    quant_config: Mapping[str, Any] | None = None, *, rules: str | None = None,
    policies: Iterable[str] = (), report: RunReport | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The hub-named state dict and the quantization config with its module names mapped.

    ``quant_config`` is either ModelOpt's ``hf_quant_config.json`` content (with a
    ``quantization`` section) or a ``quantization_config`` dict (compressed-tensors style);
    the same kind comes back. Fails with a ConversionError (never falls back to in-memory
    names) when no conversion serves the model or a tensor cannot be placed.
    """
    conversion = conversion_for(model_or_config, rules)
    config = _config_of(model_or_config)
    from convlens.api import metas_of

    plan = conversion.plan(metas_of(state_dict), config, direction="revert", policies=policies)
    out = execute(plan, state_dict, report, copy=True)
    if quant_config is None:
        return out, None
    quant = copy.deepcopy(dict(quant_config))
    if "quantization" in quant:  # hf_quant_config.json
        _, mapped, _ = map_quantization_configs(plan.key_map(), None, quant)
        return out, mapped
    new_config, _, _ = map_quantization_configs(plan.key_map(), {"quantization_config": quant},
                                                None)
    assert new_config is not None
    return out, new_config["quantization_config"]
