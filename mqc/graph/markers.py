"""Marks one pass leaves on the graph for another to find (passes never import each other).

Marks are node metadata properties, saved with the model, so a later compile of an already compiled graph sees
them too: MAS marks its smoothing Mul and each smoothed linear (read by ``cmc``), cmc its float compensation MatMuls
and AIFS its token sort (read by the quantizers). One hand-over lives in ``model.meta`` instead (in memory only):
the statistics cmc leaves for the linear quantizer after it.
"""

from __future__ import annotations

import onnx_ir as ir

#: On MAS's smoothing ``Mul`` (value ``"smooth"``) and on each MAS linear's MatMul (value: the linear's name).
MAS_SMOOTH_KEY = "mqc.mas"
MAS_LINEAR_KEY = "mqc.mas_linear"
#: On cmc's float compensation MatMuls (value ``"compensation"``): linear quantizers leave them in float.
CMC_KEY = "mqc.cmc"
#: On the two MatMuls of a low-rank branch that compensates a quantized weight's error (``gptq_weights``'s
#: ``error_rank``; value: the compensated linear's name): they stay in float and are not linears of the model map.
LOWRANK_KEY = "mqc.lowrank"
#: On the AIFS token-sort node.
AIFS_KEY = "mqc.aifs"
#: ``model.meta`` key (in memory, never saved): the statistics ``cmc`` took of the graph before lowering the MAS
#: linears, for the linear quantizer that follows it (``statistics="before_cmc"``), keyed by value name.
STATISTICS_BEFORE_CMC = "mqc.statistics_before_cmc"


def mark_cmc(node: ir.Node) -> None:
    node.metadata_props[CMC_KEY] = "compensation"


def mark_aifs(node: ir.Node) -> None:
    node.metadata_props[AIFS_KEY] = "sort"


def aifs_applied(graph: ir.Graph) -> bool:
    """Whether AIFS permuted this graph's tokens (its sort node carries the mark)."""
    return any(node.metadata_props.get(AIFS_KEY) == "sort" for node in graph)
