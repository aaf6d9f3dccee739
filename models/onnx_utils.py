"""Post-processing of exported graphs so they meet the model-directory contract.

The dynamo exporter writes a linear ``y = x @ W.T`` as ``MatMul(x, Transpose(W))``. Its built-in optimizer folds that
transpose into a fresh initializer named ``val_123``, which loses the Hugging Face module path the compiler's model
map reads. Instead we export unoptimized and apply, in order:

1. ``fold_weight_transposes``: every ``Transpose(perm=[1, 0])`` of a 2-D initializer becomes a transposed
   initializer that keeps the original name (``model.layers.0.self_attn.q_proj.weight``, now laid out
   ``[in, out]`` as MatMul's right operand). When the original is also read untransposed elsewhere, the folded copy
   is named ``<name>.T`` instead.
2. onnxscript's optimizer (:func:`onnxscript_optimize`: the same passes, each rewrite rule tried only where its
   root op is): constant folding of shape arithmetic and dead-code removal. Weights are no longer behind
   transposes, so it has nothing to rename.
3. ``add_unused_input``: graph inputs the exporter dropped because the float graph ignores them (``modality_ids``).
4. ``finalize``: IR version 10 (onnxruntime 1.31 reads at most 13), then save, with external data above 1.5 GB.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: The IR version written on every saved graph.
IR_VERSION = 10
#: Above this many bytes of initializers a graph is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000


def fold_weight_transposes(model: ir.Model) -> int:
    """Replace ``Transpose(initializer, perm=[1,0])`` by a transposed initializer; return how many were folded."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        perm = node.attributes.get("perm")
        if src.shape is None or len(src.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        array = np.ascontiguousarray(src.const_value.numpy().T)
        other_uses = [u for u in src.uses() if u.node is not node]
        name = src.name if not other_uses else f"{src.name}.T"
        if not other_uses:
            graph.initializers.pop(src.name)
        new_value = ir.Value(name=name, shape=ir.Shape(array.shape), type=src.type,
                             const_value=ir.tensor(array, name=name))
        graph.register_initializer(new_value)
        out = node.outputs[0]
        out.replace_all_uses_with(new_value)
        if out.is_graph_output():
            continue
        graph.remove(node, safe=True)
        folded += 1
    return folded


def add_unused_input(model: ir.Model, name: str, dtype: ir.DataType, dims: list[str | int], index: int) -> bool:
    """Add a graph input nothing reads (onnxruntime accepts those); False when it already exists."""
    if any(v.name == name for v in model.graph.inputs):
        return False
    value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))
    model.graph.inputs.insert(min(index, len(model.graph.inputs)), value)
    return True


def rename_dims(model: ir.Model, names: dict[str, dict[int, str]]) -> None:
    """Give the dynamic axes of inputs and outputs readable names: ``{value name: {axis: dim name}}``."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        axes = names.get(value.name)
        if not axes or value.shape is None:
            continue
        dims = list(value.shape.dims)
        for axis, dim_name in axes.items():
            if not isinstance(dims[axis], int):
                dims[axis] = ir.SymbolicDim(dim_name)
        value.shape = ir.Shape(dims)


def optimize(model: ir.Model) -> ir.Model:
    """Fold weight transposes, then constant-fold and clean with the onnxscript optimizer (no fusions)."""
    folded = fold_weight_transposes(model)
    logger.debug("folded %d weight transposes", folded)
    onnxscript_optimize(model, num_iterations=2)
    # The optimizer may fold a transpose we could not see (behind a Cast); run the fold once more.
    fold_weight_transposes(model)
    return model


def onnxscript_optimize(model: ir.Model, num_iterations: int) -> None:
    """``onnxscript.optimizer.optimize(model, num_iterations)``, in place, with each rewrite rule tried only on
    nodes of its pattern's root op.

    The same passes in the same order as onnxscript's ``optimize_ir`` (a test compares the graphs). The guard is
    the first check the rule's own matcher makes, so no match changes; it matters for ``SlicesSplit``, whose
    two-output pattern indexes the whole graph for every node it is tried on (the decoder's optimize: 75.9 s
    stock, 13.2 s guarded).
    """
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    rules = [_tried_on_root_op_only(rule) for rule in rewriter._DEFAULT_REWRITE_RULES]
    loop = ir.passes.PassManager(
        [
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            ),
            rewriter.RewritePass(rules),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ],
        steps=num_iterations,
        early_stop=True,
    )
    ir.passes.Sequential(
        common.InlinePass(),
        loop,
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _tried_on_root_op_only(rule):
    """A copy of ``rule`` whose ``try_rewrite`` returns at once on a node its pattern's root op cannot match."""
    import copy

    root = rule._target_pattern.output_nodes[0]
    guarded = copy.copy(rule)

    def try_rewrite(model, graph_or_function, node, **kwargs):
        if not (root.op.matches(node.op_type) and root.domain.matches(node.domain)):
            return None
        return rule.try_rewrite(model, graph_or_function, node, **kwargs)

    guarded.try_rewrite = try_rewrite
    return guarded


def total_initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def finalize(model: ir.Model, path: Path, external_data: bool | None = None) -> Path:
    """Save ``model`` at ``path`` with IR version 10; external data when large (or when asked)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = IR_VERSION
    if external_data is None:
        external_data = total_initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    if (path.parent / data_name).exists():
        (path.parent / data_name).unlink()
    if external_data:
        ir.save(model, path, external_data=data_name)
    else:
        proto = ir.serde.serialize_model(model)
        proto.ir_version = IR_VERSION
        onnx.save(proto, str(path))
    return path


def load(path: Path, load_external_data: bool = True) -> ir.Model:
    return ir.load(str(path)) if load_external_data else ir.serde.deserialize_model(
        onnx.load(str(path), load_external_data=False))
