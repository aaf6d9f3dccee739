"""Marks one pass leaves on the graph for another to find (passes never import each other).

Marks are node metadata properties, saved with the model, so a later compile of an already compiled graph sees
them too: MAS marks its smoothing Mul and each smoothed linear (read by ``cmc``), AIFS its token sort (read by the
quantizers, which must run before it).
"""

from __future__ import annotations

import onnx_ir as ir

#: On MAS's smoothing ``Mul`` (value ``"smooth"``) and on each MAS linear's MatMul (value: the linear's name).
MAS_SMOOTH_KEY = "mqc.mas"
MAS_LINEAR_KEY = "mqc.mas_linear"
#: On the AIFS token-sort node.
AIFS_KEY = "mqc.aifs"


def mark_aifs(node: ir.Node) -> None:
    node.metadata_props[AIFS_KEY] = "sort"


def aifs_applied(graph: ir.Graph) -> bool:
    """Whether AIFS permuted this graph's tokens (its sort node carries the mark)."""
    return any(node.metadata_props.get(AIFS_KEY) == "sort" for node in graph)
