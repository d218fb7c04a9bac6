"""Integrations: a quant-aware drop-in for transformers' save-side revert, and the one-call
helper for quantizer exports. transformers is optional: nothing here imports it."""
