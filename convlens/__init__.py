"""convlens: declarative, checked, invertible and quantization-aware checkpoint conversions.

>>> import torch, convlens
>>> conv = convlens.load_rules("mixtral")
>>> hub = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.zeros(4, 2)
...        for e in range(2) for w in ("w1", "w2", "w3")}
>>> mem = conv.apply(hub)
>>> sorted(mem)
['model.layers.0.mlp.experts.down_proj', 'model.layers.0.mlp.experts.gate_up_proj']
>>> sorted(conv.revert(mem)) == sorted(hub)
True
"""

from convlens.api import Conversion, compile_text, load_rules, shipped_rules
from convlens.checkpoint import ConvertReport, convert_checkpoint
from convlens.compiler.plan import Plan
from convlens.compiler.planner import TensorMeta
from convlens.errors import (
    ConversionError,
    ConvlensError,
    ErrorGroup,
    RuleError,
    RuleSyntaxError,
)

__version__ = "0.1.0"

__all__ = [
    "Conversion",
    "ConversionError",
    "ConvertReport",
    "ConvlensError",
    "ErrorGroup",
    "Plan",
    "RuleError",
    "RuleSyntaxError",
    "TensorMeta",
    "compile_text",
    "convert_checkpoint",
    "load_rules",
    "shipped_rules",
]
