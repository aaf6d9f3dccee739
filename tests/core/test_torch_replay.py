"""GraphSlice: a decoder layer of the graph replayed in torch equals onnxruntime; unsupported ops are refused."""

import numpy as np
import onnx_ir as ir
import torch
from mqc.passes.canonicalize import FuseNormsPass

from mqc.calibration import capture, random_feeds
from mqc.ir import load_model
from mqc.model_map import residual_add_after
from mqc.pass_manager import CompileContext, PassManager
from mqc.torch_replay import GraphSlice


def _layer_slice(model: ir.Model, ctx: CompileContext, layer: int) -> GraphSlice:
    linears = {(lin.layer, lin.role): lin for lin in ctx.model_map(model).linears}
    _, stream = residual_add_after(linears[(layer, "o")])
    add, _ = residual_add_after(linears[(layer, "down")])
    return GraphSlice(model.graph, stream, add.outputs[0])


def test_a_decoder_layer_replays_in_torch_as_onnxruntime_runs_it(tiny_decoder):
    model = load_model(tiny_decoder("qwen2"))
    feeds = random_feeds(model, 2, seed=3)
    ctx = CompileContext(lambda: feeds)
    PassManager([FuseNormsPass()], ctx).run(model)
    layer = _layer_slice(model, ctx, 1)
    assert layer.check() is None
    assert {n.op_type for n in layer.nodes} >= {"RMSNormalization", "MatMul", "Softmax", "Add"}
    assert "Shape" not in {n.op_type for n in layer.nodes}  # shape arithmetic is an external, not replayed
    inputs = {v.name for v in model.graph.inputs}
    taps = [n for n in [layer.input.name, layer.output.name, *layer.externals] if n not in inputs]
    for feed, outputs in capture(model, taps, feeds):
        values = {**{n: feed[n] for n in layer.externals if n in inputs}, **dict(zip(taps, outputs, strict=True))}
        externals = {n: torch.from_numpy(np.array(values[n])) for n in layer.externals}
        got = layer.run(torch.from_numpy(values[layer.input.name]), externals).numpy()
        want = values[layer.output.name]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        calls: list[str] = []

        def zero_matmul(node: ir.Node, x: torch.Tensor, w: torch.Tensor, calls: list[str] = calls) -> torch.Tensor:
            calls.append(node.name)
            return torch.zeros(*x.shape[:-1], w.shape[-1])

        hooked = layer.run(torch.from_numpy(values[layer.input.name]), externals, zero_matmul)
        assert len(calls) == 9 and not np.allclose(hooked.numpy(), want)  # 7 linears and the 2 attention MatMuls


def test_a_slice_with_an_op_torch_cannot_replay_says_which():
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    top = ir.node("TopK", [x, ir.Value(name="k")], attributes={"axis": -1}, num_outputs=2)
    add = ir.node("Add", [top.outputs[0], top.outputs[0]])
    graph = ir.Graph([x], [add.outputs[0]], nodes=[top, add])
    assert GraphSlice(graph, x, add.outputs[0]).check() == "no torch form for TopK"
    assert "does not depend" in GraphSlice(graph, add.outputs[0], x).check()
