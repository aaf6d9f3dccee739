"""``quantize_linears``: static QDQ quantization of every linear with round-to-nearest weights.

The rules (activation scales, weight layouts, MSQ, the refusals) are those of the shared linear quantizer,
:mod:`mqc.linear_quant`.
"""

from __future__ import annotations

from mqc.linear_quant import LinearQuantPass


class QuantizeLinearsPass(LinearQuantPass):
    """Static W{4,8}A8 QDQ quantization of every linear layer with one activation scale per input value."""

    name = "quantize_linears"
