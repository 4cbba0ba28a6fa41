"""Custom ops.  ``fp32_linear``: exact fp32 logits for the LM-head projection."""

from .fp32_linear import fp32_linear

__all__ = ["fp32_linear"]
