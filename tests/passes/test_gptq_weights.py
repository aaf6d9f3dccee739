"""GptqWeightsPass and the quarot recipe: GPTQ W4 + static A8 after folding and rotation, closer to float than RTN."""

from __future__ import annotations

import numpy as np
import onnx
from mqc.passes.gptq_weights import GptqWeightsPass

import mqc
from mqc.calibration import random_feeds
from mqc.ir import load_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.quantizer import sqnr_db


def _logits(path, feeds):
    session = mqc.open_session(path)
    return np.concatenate([session.run(["logits"], feed)[0] for feed in feeds])


def test_quarot_recipe_verifies_and_beats_w4a8_rtn(tiny_decoder, tmp_path):
    source = tiny_decoder("llama")
    feeds = random_feeds(load_model(source), 3, seed=123)
    ref = _logits(source, feeds)
    sqnr = {}
    for recipe in ("w4a8-rtn", "quarot"):
        report = mqc.compile(source, tmp_path / f"{recipe}.onnx", recipe, verify=True)
        sqnr[recipe] = sqnr_db(ref, _logits(tmp_path / f"{recipe}.onnx", feeds))
    records = {p.name: p for p in report.passes}
    assert records["hadamard_rotation"].verify["max_rel"] < 1e-4 and records["norm_folding"].verify is not None
    gptq = records["gptq_weights"]
    assert gptq.changed == 14 and gptq.skipped[0]["reason"].startswith("role lm_head")
    rows = gptq.layers
    assert all(row["weight_method"] == "gptq" and np.isfinite(row["sqnr_db"]) for row in rows)
    assert np.mean([r["gptq_rel_error"] for r in rows]) < np.mean([r["rtn_rel_error"] for r in rows])
    assert sqnr["quarot"] > sqnr["w4a8-rtn"], sqnr
    weights = [t for t in onnx.load(str(tmp_path / "quarot.onnx")).graph.initializer if t.name.endswith(".weight_q")]
    assert len(weights) == 14 and {t.data_type for t in weights} == {onnx.TensorProto.INT4}


def test_hessians_are_collected_one_layer_group_at_a_time(tiny_decoder):
    model = load_model(tiny_decoder("llama"))
    ctx = CompileContext(lambda: random_feeds(model, 2, seed=1))
    calls = []
    calibrate = ctx.calibrate

    def spy(model, taps, gram_taps=(), label=""):
        calls.append((list(taps), list(gram_taps)))
        return calibrate(model, taps, gram_taps=gram_taps, label=label)

    ctx.calibrate = spy
    (record,) = PassManager([GptqWeightsPass(weight_bits=8, layers_per_group=1)], ctx).run(model)
    assert len(calls) == 2 and all(len(taps) == 4 and taps == grams for taps, grams in calls)
    assert record.changed == 14
    assert all(row["gptq_rel_error"] < 0.02 for row in record.layers)  # W8


def _last_layer_output_error(model_path, tmp_path, hessians: str, seed: int) -> tuple[float, list[dict]]:
    """Relative error of the last decoder layer's down_proj output after rotation + GPTQ W4A8 (``hessians``)."""
    from mqc.passes.canonicalize import FuseNormsPass, UpgradeOpsetPass
    from mqc.passes.hadamard_rotation import RotateResidualPass
    from mqc.passes.norm_folding import FoldNormsPass

    from mqc.ir import save_model
    from mqc.model_map import build_model_map

    model = load_model(model_path)
    feeds = random_feeds(model, 4, seed=seed)
    ctx = CompileContext(lambda: iter(feeds))
    PassManager([UpgradeOpsetPass(), FuseNormsPass(), FoldNormsPass(), RotateResidualPass(online_down=True)], ctx).run(model)
    last = max((lin for lin in build_model_map(model).linears if lin.role == "down"), key=lambda lin: lin.layer)
    out_name = last.node.outputs[0].name
    save_model(model, tmp_path / f"rotated-{hessians}-{seed}.onnx")
    (record,) = PassManager([GptqWeightsPass(weight_bits=4, hessians=hessians)], ctx).run(model)
    save_model(model, tmp_path / f"{hessians}-{seed}.onnx")
    errors = []
    for feed in feeds:
        ref = _value(tmp_path / f"rotated-{hessians}-{seed}.onnx", out_name, feed)
        got = _value(tmp_path / f"{hessians}-{seed}.onnx", out_name, feed)
        errors.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return float(np.mean(errors)), record.layers


def _value(path, name, feed):
    model = onnx.load(str(path))
    if name not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    tapped = path.with_suffix(".tap.onnx")
    onnx.save(model, str(tapped))
    session = mqc.open_session(tapped)
    names = {i.name for i in session.get_inputs()}
    return session.run([name], {k: v for k, v in feed.items() if k in names})[0]


def test_sequential_hessians_differ_and_lower_the_last_layer_error(tiny_decoder, tmp_path):
    """Averaged over three calibration sets (one set's margin is about 1 %, and of either sign)."""
    source = tiny_decoder("llama")
    errors: dict[str, list[float]] = {"float": [], "sequential": []}
    for seed in (1, 2, 3):
        float_error, float_rows = _last_layer_output_error(source, tmp_path, "float", seed)
        seq_error, seq_rows = _last_layer_output_error(source, tmp_path, "sequential", seed)
        errors["float"].append(float_error)
        errors["sequential"].append(seq_error)
        by_name = {row["name"]: row for row in float_rows}
        # layer 0 reads the float embeddings either way; later layers read the quantized layers' outputs
        assert all(by_name[r["name"]]["gptq_rel_error"] == r["gptq_rel_error"] for r in seq_rows if r["layer"] == 0)
        assert any(by_name[r["name"]]["gptq_rel_error"] != r["gptq_rel_error"] for r in seq_rows if r["layer"])
    assert np.mean(errors["sequential"]) < np.mean(errors["float"]), errors


def test_variant_names_the_hessian_source():
    assert "sequential" in GptqWeightsPass(hessians="sequential").variant()
    assert "released code is sequential" in GptqWeightsPass(hessians="float").variant()


def test_variant_labels_per_group_weights_as_an_extension():
    assert "per group of 64 input rows (an extension" in GptqWeightsPass(group_size=64).variant()
    assert "per group" not in GptqWeightsPass().variant()


def test_gptq_jobs_are_one_per_input_value_and_give_what_a_worker_gives(tiny_decoder):
    """The executor gets one job per value (all its readers: q/k/v, gate/up), a picklable call of a module-level
    function; what the pass used equals the job rerun after a pickle round trip (what a Ray worker runs) and
    ``WeightRounding.round_readers`` called in this process."""
    import pickle

    from mqc.passes.gptq_weights import gptq_readers

    from mqc.distributed import LocalExecutor

    class RecordingExecutor(LocalExecutor):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple] = []

        def map(self, function, jobs, job_bytes=None):
            outcomes = super().map(function, jobs, job_bytes)
            self.calls.append((function, list(jobs), outcomes))
            return outcomes

    model = load_model(tiny_decoder("llama"))
    executor = RecordingExecutor()
    ctx = CompileContext(lambda: random_feeds(model, 2, seed=1), executor=executor)
    (record,) = PassManager([GptqWeightsPass(weight_bits=4)], ctx).run(model)
    ((function, jobs, outcomes),) = executor.calls
    assert function is gptq_readers and record.changed == 14
    assert sorted(len(weights) for _, weights, *_ in jobs) == [1, 1, 1, 1, 2, 2, 3, 3]  # o, down; gate+up; qkv
    for job, used in zip(jobs, outcomes, strict=True):
        shipped_function, shipped_job = pickle.loads(pickle.dumps((function, job)))
        alone = [(*rounded, None) for rounded in job[0].round_readers(*job[1:4])]
        for again in (shipped_function(*shipped_job), alone):
            for (qweight, figures, factors), (used_q, used_figures, _) in zip(again, used, strict=True):
                assert factors is None  # error_rank 0
                assert np.array_equal(qweight.q, used_q.q) and np.array_equal(qweight.scale, used_q.scale)
                assert {**figures, "weight_method": "gptq"} == {**used_figures, "weight_method": "gptq"}
    assert all({"gptq_rel_error", "rtn_rel_error", "hessian_rows"} <= set(row) for row in record.layers)


def test_int8_roles_round_those_linears_to_int8_against_the_shared_hessian(tiny_decoder):
    """``int8_roles=("v",)``: v_proj is GPTQ-rounded at int8 in its own job (q/k stay int4 against the same
    Hessian, with the same bits as without the budget), recorded as W8, labelled, and summed up by explain."""
    from mqc.explain import weight_widths

    model_path = tiny_decoder("llama")
    records = {}
    for roles in ((), ("v",)):
        model = load_model(model_path)
        ctx = CompileContext(lambda model=model: random_feeds(model, 2, seed=1))
        (records[roles],) = PassManager([GptqWeightsPass(weight_bits=4, int8_roles=roles)], ctx).run(model)
        records[roles].model = model
    plain, mixed = ({row["name"]: row for row in records[r].layers} for r in ((), ("v",)))
    assert {row["w_bits"] for name, row in mixed.items() if name.endswith("v_proj")} == {8}
    assert {row["w_bits"] for name, row in mixed.items() if not name.endswith("v_proj")} == {4}
    for name, row in mixed.items():
        if name.endswith("v_proj"):
            assert row["gptq_rel_error"] < plain[name]["gptq_rel_error"] / 4
        else:
            assert row["gptq_rel_error"] == plain[name]["gptq_rel_error"]
    dtypes = {t.name: t.dtype for t in records[("v",)].model.graph.initializers.values()
              if t.name.endswith(".weight_q")}
    assert {d.name for n, d in dtypes.items() if "v_proj" in n} == {"INT8"}
    assert "int8 weights for the v linears" in GptqWeightsPass(int8_roles=("v",)).variant()
    summary = weight_widths(records[("v",)].layers)
    assert summary is not None and "at int8" in summary and weight_widths(records[()].layers) is None


def test_error_rank_adds_a_float_branch_that_brings_the_output_closer_to_float(tiny_decoder, tmp_path):
    """``error_rank``: the same GPTQ weights plus a marked float x·L1·L2 branch per linear; the compiled logits get
    closer to float, the branches are not linears of the model map, and the figures and the label say so."""
    from mqc.graph.markers import LOWRANK_KEY
    from mqc.model_map import build_model_map

    source = tiny_decoder("llama")
    feeds = random_feeds(load_model(source), 3, seed=123)
    ref = _logits(source, feeds)
    sqnr, weights = {}, {}
    for rank in (0, 8):
        model = load_model(source)
        ctx = CompileContext(lambda model=model: random_feeds(model, 2, seed=1))
        (record,) = PassManager([GptqWeightsPass(weight_bits=4, error_rank=rank)], ctx).run(model)
        path = tmp_path / f"r{rank}.onnx"
        mqc.ir.save_model(model, path)
        sqnr[rank] = sqnr_db(ref, _logits(path, feeds))
        weights[rank] = {t.name: t.const_value.numpy().tobytes() for t in model.graph.initializers.values()
                         if t.name.endswith(".weight_q")}
        if rank:
            branches = [n for n in model.graph if LOWRANK_KEY in n.metadata_props]
            assert len(branches) == 2 * record.changed == 28
            assert [lin.role for lin in build_model_map(model).linears] == ["lm_head"]  # no branch
            rows = record.layers
            assert {row["error_rank"] for row in rows} == {8}
            assert all(0 < row["error_retained"] < 1 for row in rows)
    assert weights[8] == weights[0]
    assert sqnr[8] > sqnr[0] + 0.5, sqnr
    assert "float rank-8 branch per linear" in GptqWeightsPass(error_rank=8).variant()


def test_error_branch_of_a_linear_whose_output_is_the_graph_output_reaches_it(tmp_path):
    """A bias-less linear writing a graph output: the compensated value becomes that output, under its name."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "proj.weight"], ["y"], name="proj")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])],
                              [numpy_helper.from_array(weight, "proj.weight")])
    source = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), source)
    feeds = [{"x": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(4)]
    ref = np.concatenate([f["x"] @ weight for f in feeds])
    sqnr = {}
    for rank in (0, 8):
        model = load_model(source)
        PassManager([GptqWeightsPass(weight_bits=4, error_rank=rank)], CompileContext(lambda: feeds)).run(model)
        assert [v.name for v in model.graph.outputs] == ["y"]
        path = mqc.ir.save_model(model, tmp_path / f"r{rank}.onnx")
        session = mqc.open_session(path)
        sqnr[rank] = sqnr_db(ref, np.concatenate([session.run(["y"], f)[0] for f in feeds]))
    assert sqnr[8] > sqnr[0] + 0.5, sqnr
