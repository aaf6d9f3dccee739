"""The calibration service (issue 16): one session per graph revision, never a stale one; taps merged; feeds read
once; GPTQ's Hessian runs grouped by a Gram byte budget."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from mqc.passes.gptq_weights import GptqWeightsPass
from untrusted import linear_model

from mqc.calibration import SampleTreeSum, random_feeds
from mqc.calibration_service import FeedCache
from mqc.ir import load_model
from mqc.pass_manager import CompileContext, MqcPass, PassManager


@pytest.fixture()
def model() -> ir.Model:
    return ir.serde.deserialize_model(linear_model())


def _feeds(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 4, 64)).astype(np.float32)} for _ in range(count)]


def _double_weight(model: ir.Model) -> None:
    weight = model.graph.initializers["W"]
    weight.const_value = ir.tensor(weight.const_value.numpy() * 2.0, name="W")


class _DoubleWeight(MqcPass):
    name = "double_weight"

    def run(self, model: ir.Model) -> bool:
        _double_weight(model)
        return True


def test_requests_on_one_revision_share_one_session_with_the_union_of_taps(model):
    feeds = _feeds()
    ctx = CompileContext(lambda: feeds)
    ctx.calibrate(model, ["h"])
    ctx.calibrate(model, ["h"])
    assert ctx.calibration.sessions_built == 1
    both = ctx.calibrate(model, ["y"])  # a new tap: one new session with both
    again = ctx.calibrate(model, ["h", "y"])
    assert ctx.calibration.sessions_built == 2
    assert both["y"].combined().absmax == again["y"].combined().absmax
    assert [o.name for o in model.graph.outputs] == ["y"]  # the taps are outputs of the session only


def test_a_modified_graph_gets_a_new_session_and_new_values(model):
    feeds = _feeds()
    ctx = CompileContext(lambda: feeds)
    before = ctx.calibrate(model, ["h"])["h"].combined().absmax
    revision = ctx.calibration.revision
    PassManager([_DoubleWeight()], ctx).run(model)
    assert ctx.calibration.revision == revision + 1
    after = ctx.calibrate(model, ["h"])["h"].combined().absmax
    assert after == pytest.approx(2 * before, rel=1e-6)  # a reused session would give ``before`` again
    assert ctx.calibration.sessions_built == 2


def test_a_graph_rewritten_without_a_bump_is_not_served_by_the_old_session(model):
    feeds = _feeds()
    ctx = CompileContext(lambda: feeds)
    before = ctx.calibrate(model, ["h"])["h"].combined().absmax
    _double_weight(model)  # no ctx.invalidate(): the structural signature catches it
    assert ctx.calibrate(model, ["h"])["h"].combined().absmax == pytest.approx(2 * before, rel=1e-6)
    rewired = model.graph.node(1)
    rewired.replace_input_with(0, model.graph.inputs[0])  # Relu(x) instead of Relu(h): same nodes, new wiring
    expected = max(float(np.max(np.maximum(f["x"], 0))) for f in feeds)
    assert ctx.calibrate(model, ["y"])["y"].combined().absmax == pytest.approx(expected)
    assert ctx.calibration.sessions_built == 3


def test_capture_shares_the_calibration_session(model):
    feeds = _feeds()
    ctx = CompileContext(lambda: feeds)
    stats = ctx.calibrate(model, ["h"])
    values = [outputs[0] for _, outputs in ctx.capture(model, ["h"])]
    assert ctx.calibration.sessions_built == 1
    assert max(float(np.abs(v).max()) for v in values) == stats["h"].combined().absmax


def test_feeds_are_read_once_when_small_and_streamed_when_large():
    reads = []

    def source():
        reads.append(1)
        return iter(_feeds())

    small = FeedCache(source)
    assert [len(list(small())) for _ in range(3)] == [3, 3, 3] and len(reads) == 1
    reads.clear()
    large = FeedCache(source, budget=2 * 4 * 64 * 4)  # two samples' worth
    assert [len(list(large())) for _ in range(3)] == [3, 3, 3] and len(reads) == 3
    reads.clear()
    partial = FeedCache(source)
    next(iter(partial()))  # a consumer that stops early (verify_feeds) keeps nothing
    assert len(list(partial())) == 3 and len(list(partial())) == 3 and len(reads) == 2


def test_gptq_hessian_runs_follow_the_gram_budget_and_give_the_same_weights(tiny_decoder):
    path = tiny_decoder("llama")  # 2 layers, hidden 64, MLP 128: 4 inputs per layer, 2 modalities
    one_layer = SampleTreeSum.most_held(2) * 2 * 8 * (3 * 64 * 64 + 128 * 128)  # as summed over 2 samples
    results = {}
    for budget in (one_layer, 2 * one_layer):
        model = load_model(path)
        feeds = random_feeds(model, 2, seed=1)
        ctx = CompileContext(lambda f=feeds: f, gram_budget=budget)
        runs: list[list[str]] = []
        calibrate = ctx.calibrate

        def counted(m, taps, gram_taps=(), label="", c=calibrate, r=runs):
            r.append(list(taps))
            return c(m, taps, gram_taps=gram_taps, label=label)

        ctx.calibrate = counted
        (record,) = PassManager([GptqWeightsPass(weight_bits=4)], ctx).run(model)
        weights = {name: v.const_value.numpy().tobytes() for name, v in model.graph.initializers.items()
                   if name.endswith("weight_q")}
        results[budget] = (len(runs), record.layers, weights)
    assert results[one_layer][0] == 2 and results[2 * one_layer][0] == 1
    assert results[one_layer][1] == results[2 * one_layer][1]
    assert results[one_layer][2] == results[2 * one_layer][2] and len(results[one_layer][2]) == 14


def test_an_equal_hessian_reuses_its_factor_and_a_new_one_does_not():
    from mqc.gptq import factor_hessian, gptq_quantize, gptq_quantize_readers

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 32))
    h = x.T @ x
    first = factor_hessian(h)
    assert factor_hessian(h.copy()) is first
    assert factor_hessian(h, act_order=False) is not first
    other = factor_hessian(h + np.eye(32))
    assert other is not first and not np.array_equal(other.u, first.u)
    weights = [rng.standard_normal((32, n)).astype(np.float32) for n in (8, 5)]
    together = gptq_quantize_readers(weights, h, 4)
    alone = [gptq_quantize(w, h, 4) for w in weights]
    for a, b in zip(together, alone, strict=True):
        assert np.array_equal(a.quantized.q, b.quantized.q) and a.rel_error == b.rel_error
