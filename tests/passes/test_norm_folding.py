"""FoldNormsPass: RMSNorm gammas folded into reader linears, outputs unchanged; refusals carry reasons."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from decoder_helpers import with_random_gammas
from mqc.passes.norm_folding import FoldNormsPass

from mqc.ir import add_initializer, constant_array
from mqc.pass_manager import CompileContext, PassManager


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fold_preserves_outputs_and_makes_norms_affine_free(tiny_decoder, family):
    model, ctx = with_random_gammas(tiny_decoder(family))
    before = ctx.run_outputs(model)
    (record,) = PassManager([FoldNormsPass()], ctx).run(model)  # verify=True: raises on drift > 1e-4
    assert record.verify["max_rel"] < 1e-5
    assert record.matched == 5 and record.changed == 5 and not record.skipped
    assert len(record.layers) == 11 and record.layers[-1]["name"] == "lm_head"  # 2 x (q, k, v, gate, up) + lm_head
    assert record.layers[-1]["folded_norm"] == "model.norm"
    for norm in ctx.model_map(model).norms:
        assert np.all(constant_array(norm.scale) == 1.0)
    after = ctx.run_outputs(model)
    for a, b in zip(before[0], after[0], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_refusals_are_recorded(tiny_decoder):
    model, ctx = with_random_gammas(tiny_decoder("llama"))
    norms = ctx.model_map(model).norms
    # 1. a non-linear consumer of the first norm's output
    relu = ir.node("Relu", [norms[0].node.outputs[0]], name="probe_relu")
    model.graph.append(relu)
    relu.outputs[0].name = "probe"
    model.graph.outputs.append(relu.outputs[0])
    # 2. a gamma that is a graph input, not a constant
    gamma_in = ir.Value(name="gamma_in", shape=ir.Shape([64]), type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(gamma_in)
    norms[1].node.replace_input_with(1, gamma_in)
    ctx.invalidate()
    (record,) = PassManager([FoldNormsPass()], CompileContext(lambda: [])).run(model)
    reasons = {s["node"]: s["reason"] for s in record.skipped}
    assert reasons[norms[0].name].startswith("norm output has a non-linear consumer: Relu")
    assert reasons[norms[1].name] == "gamma is not a constant"
    assert record.changed == 3


def test_layernorm_is_refused_and_tied_weight_is_copied():
    x = ir.Value(name="x", shape=ir.Shape([2, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    ids = ir.Value(name="ids", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph([x, ids], [], nodes=[], opset_imports={"": 23}, name="g")
    rng = np.random.default_rng(0)
    gamma = add_initializer(graph, "rms.weight", (1 + rng.standard_normal(8)).astype(np.float32))
    ln_gamma = add_initializer(graph, "ln.weight", np.ones(8, np.float32))
    ln_beta = add_initializer(graph, "ln.bias", np.zeros(8, np.float32))
    table = add_initializer(graph, "lm_head.weight", rng.standard_normal((8, 8)).astype(np.float32))
    fc = add_initializer(graph, "encoder.fc1.weight", rng.standard_normal((8, 4)).astype(np.float32))
    rms = ir.node("RMSNormalization", [x, gamma], name="rms")
    head = ir.node("MatMul", [rms.outputs[0], table], name="lm_head")
    tied = ir.node("Gather", [table, ids], name="embed")
    ln = ir.node("LayerNormalization", [x, ln_gamma, ln_beta], name="ln")
    fc1 = ir.node("MatMul", [ln.outputs[0], fc], name="fc1")
    for node in (rms, head, tied, ln, fc1):
        graph.append(node)
    graph.outputs.extend([head.outputs[0], tied.outputs[0], fc1.outputs[0]])
    for i, v in enumerate(graph.outputs):
        v.name = f"out{i}"
    model = ir.Model(graph, ir_version=10)
    feed = {"x": rng.standard_normal((2, 8)).astype(np.float32), "ids": np.array([0, 3, 7])}
    ctx = CompileContext(lambda: [feed], verify=True)
    before = ctx.run_outputs(model)
    (record,) = PassManager([FoldNormsPass()], ctx).run(model)
    assert {"node": "ln", "reason": "LayerNorm: needs ln_to_rmsnorm first"} in record.skipped
    assert record.changed == 1 and any("untied" in note for note in record.notes)
    after = ctx.run_outputs(model)
    np.testing.assert_array_equal(after[0][1], before[0][1])  # the embedding still reads the original table
    np.testing.assert_allclose(after[0][0], before[0][0], rtol=1e-5, atol=1e-5)
