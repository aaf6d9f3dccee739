"""Pass contracts: each ``ensures`` rejects a model that breaks it and accepts what the real pass leaves; a broken
postcondition is an internal error (exit 1, nothing written); fatal skips are declared by the pass that raises them."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from decoder_helpers import with_random_gammas
from mqc.passes.aifs import AifsPass
from mqc.passes.canonicalize import FuseNormsPass, UpgradeOpsetPass
from mqc.passes.hadamard_rotation import RotateResidualPass
from mqc.passes.ln_to_rmsnorm import LayerNormToRMSNormPass
from mqc.passes.lower_runtime_ops import LowerRuntimeOpsPass
from mqc.passes.norm_folding import FoldNormsPass
from mqc.passes.quantize_linears import QuantizeLinearsPass

from mqc.calibration import random_feeds
from mqc.cli import main
from mqc.ir import add_initializer, load_model
from mqc.pass_manager import CompileContext, MqcPass, PassManager, PostconditionBroken
from mqc.recipes import PASS_MODULES, pass_class

PASSES = Path(__file__).resolve().parents[2] / "passes"


def _norm_graph(decomposed: bool) -> ir.Model:
    """x -> (decomposed RMSNorm, or LayerNormalization) -> MatMul -> y, hidden 8."""
    x = ir.Value(name="x", shape=ir.Shape([1, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="norm")
    gamma = add_initializer(graph, "gamma", np.linspace(0.5, 1.5, 8, dtype=np.float32))
    weight = add_initializer(graph, "w", np.ones((8, 8), np.float32))
    if decomposed:
        two = add_initializer(graph, "two", np.array(2.0, np.float32))
        eps = add_initializer(graph, "eps", np.array(1e-6, np.float32))
        axes = add_initializer(graph, "axes", np.array([-1], np.int64))
        nodes = [ir.node("Pow", [x, two])]
        nodes.append(ir.node("ReduceMean", [nodes[-1].outputs[0], axes], attributes={"keepdims": 1, "noop_with_empty_axes": 0}))
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], eps]))
        nodes.append(ir.node("Sqrt", [nodes[-1].outputs[0]]))
        nodes.append(ir.node("Reciprocal", [nodes[-1].outputs[0]]))
        nodes.append(ir.node("Mul", [x, nodes[-1].outputs[0]]))
        nodes.append(ir.node("Mul", [gamma, nodes[-1].outputs[0]]))
    else:
        nodes = [ir.node("LayerNormalization", [x, gamma], attributes={"axis": -1}, name="ln")]
    nodes.append(ir.node("MatMul", [nodes[-1].outputs[0], weight], name="proj"))
    for node in nodes:
        graph.append(node)
    nodes[-1].outputs[0].name = "y"
    graph.outputs.append(nodes[-1].outputs[0])
    return ir.Model(graph, ir_version=10)


def _run(passes: list[MqcPass], model: ir.Model) -> list:
    return PassManager(passes, CompileContext(lambda: random_feeds(model, 2, seed=5))).run(model)


def test_fuse_norms_ensures_no_decomposed_norm_is_left():
    model = _norm_graph(decomposed=True)
    with pytest.raises(PostconditionBroken, match="pass fuse_norms broke its postcondition: its rules still match"):
        FuseNormsPass().ensures(model)  # before the pass: the decomposed RMSNorm is what it promises to fuse
    (record,) = _run([FuseNormsPass()], model)  # the manager checks ensures after the real pass
    assert record.changed >= 1 and any(node.op_type == "RMSNormalization" for node in model.graph)


def test_upgrade_opset_ensures_the_target_opset():
    model = _norm_graph(decomposed=False)
    model.opset_imports[""] = 17
    with pytest.raises(PostconditionBroken, match="opset 17 is below the target 23"):
        UpgradeOpsetPass().ensures(model)
    _run([UpgradeOpsetPass()], model)
    assert model.opset_imports[""] == 23


def test_ln_to_rmsnorm_ensures_no_layernorm_is_left():
    with pytest.raises(PostconditionBroken, match=r"1 LayerNormalization nodes are left, e\.g\. ln"):
        LayerNormToRMSNormPass().ensures(_norm_graph(decomposed=False))


def test_norm_folding_ensures_folded_gammas_are_ones(tiny_decoder):
    model, ctx = with_random_gammas(tiny_decoder("llama"))
    fold = FoldNormsPass()
    (record,) = PassManager([fold], ctx).run(model)
    assert record.changed == 5
    norm = ctx.model_map(model).norms[0]
    norm.node.replace_input_with(1, add_initializer(model.graph, "unfolded", np.full(64, 2.0, np.float32)))
    with pytest.raises(PostconditionBroken, match=f"norm {norm.name} is recorded as folded but its gamma"):
        fold.ensures(model)


def test_hadamard_rotation_ensures_online_hadamards_feed_their_linears(tiny_decoder):
    model, ctx = with_random_gammas(tiny_decoder("llama"))
    rotate = RotateResidualPass(seed=7)
    PassManager([FoldNormsPass(), rotate], ctx).run(model)
    rotate.ensures(model)  # what the real pass leaves holds
    down = next(lin for lin in ctx.model_map(model).linears if lin.role == "down")
    hadamard = down.input.producer()
    down.node.replace_input_with(0, hadamard.inputs[0])  # bypass the online Hadamard
    with pytest.raises(PostconditionBroken, match=f"{down.name} is recorded with an online Hadamard of size 128"):
        rotate.ensures(model)


def test_quantizer_and_lowering_ensure_every_linear_is_accounted_for(tiny_decoder):
    model = load_model(tiny_decoder("llama"))
    quantize = QuantizeLinearsPass()
    (record,) = _run([quantize], model)
    assert record.changed == 14 and [s["node"] for s in record.skipped] == ["lm_head"]
    with pytest.raises(PostconditionBroken, match="is neither lowered to ai"):
        LowerRuntimeOpsPass().ensures(model)  # QDQ linears the lowering did not see, none recorded as refused
    quantize.record.skipped.clear()  # the float lm_head now has no recorded reason
    with pytest.raises(PostconditionBroken, match=r"1 linears are neither quantized nor recorded as skipped, e\.g\. lm_head"):
        quantize.ensures(model)
    (lowered,) = _run([LowerRuntimeOpsPass()], model)
    assert lowered.changed >= 14


def test_a_broken_postcondition_exits_1_and_writes_nothing(tiny_decoder, tmp_path, monkeypatch):
    """A pass that leaves a folded gamma behind (a fault injected into the real pass) is a compiler bug."""
    fold_run = FoldNormsPass.run

    def run_and_unfold(self, model):
        changed = fold_run(self, model)
        norm = next(n for n in self.ctx.model_map(model).norms if n.name == self.record.layers[0]["folded_norm"])
        norm.node.replace_input_with(1, add_initializer(model.graph, "unfolded", np.full(64, 2.0, np.float32)))
        return changed

    monkeypatch.setattr(FoldNormsPass, "run", run_and_unfold)
    source = tmp_path / "in" / "decoder.onnx"
    source.parent.mkdir()
    ir.save(with_random_gammas(tiny_decoder("llama"))[0], source)  # gammas to fold
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out / "q.onnx"), "--recipe", "quarot",
                                       "--samples", "2"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "internal error: pass norm_folding broke its postcondition: norm" in text
    assert "nothing was written" in text and list(out.iterdir()) == []


def _refusal_codes(path: Path) -> dict[str, set[str]]:
    """Per class of a pass module, the codes its ``self.refuse("code", ...)`` calls raise."""
    codes: dict[str, set[str]] = {}
    for cls in ast.walk(ast.parse(path.read_text())):
        if not isinstance(cls, ast.ClassDef):
            continue
        for call in ast.walk(cls):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "refuse"
                    and call.args and isinstance(call.args[0], ast.Constant)):
                codes.setdefault(cls.name, set()).add(call.args[0].value)
    return codes


def test_every_raised_fatal_skip_is_declared_by_its_pass():
    declared = {pass_class(name).__name__: pass_class(name).fatal_skips for name in PASS_MODULES}
    raised = {cls: codes for path in PASSES.glob("*.py") for cls, codes in _refusal_codes(path).items()}
    assert raised.keys() >= {"RotateResidualPass", "LayerNormToRMSNormPass", "MasPass", "CmcPass"}
    for cls, codes in raised.items():
        assert codes <= set(declared[cls]), f"{cls} raises undeclared fatal skips {codes - set(declared[cls])}"
        assert all(declared[cls][code] for code in codes)


def test_an_undeclared_fatal_skip_is_a_bug():
    with pytest.raises(KeyError, match="does not declare in fatal_skips"):
        RotateResidualPass().refuse("not_a_code", "why")


def test_aifs_ensures_only_the_permutation_reads_the_token_inputs(tiny_decoder):
    model = load_model(tiny_decoder("llama"))
    aifs = AifsPass()
    (record,) = _run([aifs], model)
    assert record.changed >= 1
    embeds = next(v for v in model.graph.inputs if v.name == "inputs_embeds")
    probe = ir.node("ReduceMax", [embeds], name="probe")
    model.graph.append(probe)
    probe.outputs[0].name = "probe"
    model.graph.outputs.append(probe.outputs[0])
    with pytest.raises(PostconditionBroken, match="inputs_embeds is still read unpermuted by ReduceMax probe"):
        aifs.ensures(model)
