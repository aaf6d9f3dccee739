"""Layer-streamed compile (mqc.streaming): byte identity with the whole-model compile, refusals, bounded caching,
and the synthetic decoder builder it is benchmarked on."""

from __future__ import annotations

import filecmp
import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from mqc.models.synthetic import SHAPES, DecoderShape, build_decoder

from mqc.calibration import random_feeds
from mqc.cli import main
from mqc.compiler import compile_file
from mqc.ir import load_model
from mqc.recipes import Recipe, load_recipe
from mqc.streaming import (
    BY_REFERENCE_BYTES,
    ActivationCache,
    BlockPartition,
    StreamedCompile,
    StreamedContext,
    StreamingError,
    streaming_plan,
)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def synthetic_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_decoder("tiny", tmp_path_factory.mktemp("synthetic") / "decoder.onnx")


#: Weights from 64 KiB up (spilled), and an MLP width with no Hadamard size (352, padded to 384 like 7B's 18,944).
SPILLED_SHAPE = DecoderShape(layers=2, hidden=128, mlp=352, heads=4, kv_heads=2, vocab=256, qkv_bias=True,
                             rope_theta=10000.0)


@pytest.fixture(scope="module")
def spilled_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_decoder(SPILLED_SHAPE, tmp_path_factory.mktemp("spilled") / "decoder.onnx")


@pytest.mark.parametrize("model", ["tiny-llama", "synthetic"])
def test_float_streamed_w8a8_is_byte_identical_to_the_whole_model_compile(tiny_decoder, synthetic_decoder, tmp_path,
                                                                          model):
    """Inline weights (the exported tiny llama, with its KV cache) and external data (the synthetic decoder)."""
    source = tiny_decoder("llama") if model == "tiny-llama" else synthetic_decoder
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir()
    streamed.mkdir()
    compile_file(source, whole / "model.onnx", "w8a8", num_samples=4, stream=False)
    report = compile_file(source, streamed / "model.onnx", "w8a8", num_samples=4, stream=True)
    assert _files(whole) == _files(streamed) == sorted(["model.onnx", *[p.name for p in whole.glob("*.data")]])
    for name in _files(whole):
        assert filecmp.cmp(whole / name, streamed / name, shallow=False), name
    quantized = next(p for p in report.passes if p.name == "quantize_linears")
    assert len(quantized.layers) == (14 if model == "tiny-llama" else 21) and quantized.variant.startswith("one static")


def test_quantized_inputs_mode_differs_and_is_labelled(tiny_decoder, tmp_path):
    source = tiny_decoder("llama")
    floats = compile_file(source, tmp_path / "float.onnx", "w8a8", num_samples=4, stream=True)
    sequential = compile_file(source, tmp_path / "seq.onnx", "w8a8", num_samples=4, stream=True,
                              stream_inputs="quantized")
    record = next(p for p in sequential.passes if p.name == "quantize_linears")
    assert "layer-streamed" in record.variant
    layer0 = [r["act_scale"] for r in next(p for p in floats.passes if p.name == "quantize_linears").layers]
    layer1 = [r["act_scale"] for r in record.layers]
    assert layer0[0] == layer1[0]  # block 0 reads the model's own inputs in both modes
    assert layer0 != layer1  # later blocks read quantized activations
    assert sequential.quality["sqnr_db"] > 20


def test_stream_refuses_a_recipe_that_needs_the_whole_model(synthetic_decoder, tmp_path):
    result = CliRunner().invoke(main, ["compile", str(synthetic_decoder), "-o", str(tmp_path / "q.onnx"),
                                       "--recipe", "mquant", "--stream", "--samples", "2"])
    assert result.exit_code == 2
    assert "passes rms_split, aifs, sink_scales of the recipe cannot run layer by layer" in result.output
    assert not any(tmp_path.iterdir())


def test_streaming_plan_cuts_quarot_into_its_stages_and_refuses_other_orders():
    plan = streaming_plan(load_recipe("quarot").instantiate())
    assert [[p.name for p in stage] for stage in plan] == [["upgrade_opset", "fuse_norms"],
                                                          ["norm_folding", "hadamard_rotation"], ["gptq_weights"]]
    swapped = Recipe("late-rotation", "a rotation after quantization", [
        {"pass": "norm_folding"}, {"pass": "quantize_linears"}, {"pass": "hadamard_rotation"}])
    with pytest.raises(StreamingError, match="hadamard_rotation comes after a later stage"):
        streaming_plan(swapped.instantiate())
    vision = Recipe("vision-rotation", "a vision tower's rotation", [
        {"pass": "hadamard_rotation", "tower": "vision"}, {"pass": "quantize_linears"}])
    with pytest.raises(StreamingError, match="tower='vision'"):
        streaming_plan(vision.instantiate())


@pytest.mark.parametrize("model", ["tiny-llama", "synthetic", "spilled"])
def test_float_streamed_quarot_is_byte_identical_to_the_whole_model_compile(tiny_decoder, synthetic_decoder,
                                                                            spilled_decoder, tmp_path, model):
    """The rotation passes run once on the lazily loaded graph, their weights spilled one by one; the compiled
    bytes are those of the whole-model compile (KV cache with per-head V/O Hadamards; external data; weights
    spilled and read back from the spill file, a zero-padded online Hadamard)."""
    source = {"tiny-llama": tiny_decoder("llama"), "synthetic": synthetic_decoder, "spilled": spilled_decoder}[model]
    for mode in ("whole", "streamed"):
        (tmp_path / mode).mkdir()
        compile_file(source, tmp_path / mode / "model.onnx", "quarot", num_samples=4, stream=mode == "streamed")
    assert _files(tmp_path / "whole") == _files(tmp_path / "streamed")
    for name in _files(tmp_path / "whole"):
        assert filecmp.cmp(tmp_path / "whole" / name, tmp_path / "streamed" / name, shallow=False), name
    assert not list(tmp_path.glob("*/.mqc-stream-*"))  # the spill folder is gone


class _CheckedSpill(StreamedCompile):
    """A streamed compile that checks, at every weight a rotation pass writes, that nothing large is held in memory
    and that the mapped tensors replaced before are unmapped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[str] = []
        self.replaced: list[ir.ExternalTensor] = []

    def _spill_written(self, value, replaced) -> None:
        super()._spill_written(value, replaced)
        self.written.append(value.name)
        held = [v.name for v in self.model.graph.initializers.values()
                if not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= BY_REFERENCE_BYTES]
        assert not held, f"in memory after {value.name} was written: {held}"
        assert all(tensor.raw is None for tensor in self.replaced), "a replaced weight is still mapped"
        if isinstance(replaced, ir.ExternalTensor):
            self.replaced.append(replaced)


def test_rotation_passes_spill_each_weight_as_soon_as_it_is_written(spilled_decoder):
    model = load_model(spilled_decoder)
    samples = random_feeds(model, 2)
    runner = _CheckedSpill(model, load_recipe("quarot").instantiate(), StreamedContext(lambda: samples))
    try:
        runner.run()
        rotated = {v.name for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)
                   and Path(v.const_value.base_dir) == runner.folder}
        assert len(runner.replaced) >= 2 * 7 + 1  # every linear of the 2 layers and the lm_head, at least once
        assert all(tensor.raw is None for tensor in runner.replaced)  # unmapped
        assert "mqc.H384.signs" in runner.written  # the online Hadamard's signs (352 padded to 384)
        for value in model.graph.initializers.values():  # everything large lives in a file, not in memory
            assert isinstance(value.const_value, ir.ExternalTensor) or value.const_value.nbytes < BY_REFERENCE_BYTES
        assert rotated  # the rotated (then quantized) weights are mapped from the spill file
    finally:
        runner.close()


def test_partition_cuts_prelude_layers_and_head(synthetic_decoder):
    blocks = BlockPartition(load_model(synthetic_decoder)).blocks
    assert [b.index for b in blocks] == [-1, 0, 1, 2, 3]
    assert {v.name for v in blocks[1].inputs} >= {"inputs_embeds"}
    assert [v.name for v in blocks[-1].outputs] == ["logits"]
    for earlier, later in itertools.pairwise(blocks[1:]):  # each layer hands on its stream value
        assert any(value in later.inputs for value in earlier.outputs)


def test_activation_cache_spills_beyond_its_budget():
    cache = ActivationCache([{"x": np.zeros(4, np.float32)}], budget=64)
    cache.put(0, "big", np.arange(100, dtype=np.float32))
    assert isinstance(cache.samples[0]["big"], np.memmap)
    np.testing.assert_array_equal(cache.samples[0]["big"], np.arange(100, dtype=np.float32))
    cache.close()


def test_synthetic_decoder_runs_in_onnxruntime_and_keeps_weights_external(synthetic_decoder):
    import onnxruntime as ort

    header = onnx.load(str(synthetic_decoder), load_external_data=False)
    external = [t.name for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    shape = SHAPES["tiny"]
    assert len(external) == shape.layers * 12 + 2  # 7 linears, 3 biases, 2 norms per layer; final norm, lm_head
    session = ort.InferenceSession(str(synthetic_decoder))
    feed = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, 5, shape.hidden)).astype(np.float32),
            "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.arange(5, dtype=np.int64)[None]}
    (logits,) = session.run(None, feed)
    assert logits.shape == (1, 5, shape.vocab) and np.isfinite(logits).all() and logits.std() > 0.1
    # causal: the first token's logits do not depend on later tokens
    feed["inputs_embeds"][:, 3:] += 1.0
    (moved,) = session.run(None, feed)
    np.testing.assert_allclose(moved[:, 0], logits[:, 0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(moved[:, 4], logits[:, 4])


def _gptq_recipe(folder: Path, hessians: str) -> Path:
    path = folder / f"gptq-{hessians}.json"
    path.write_text(json.dumps({
        "name": f"w4a8-gptq-{hessians}", "description": "GPTQ int4 weights without rotation (streaming test).",
        "passes": [{"pass": "upgrade_opset"}, {"pass": "fuse_norms"},
                   {"pass": "gptq_weights", "weight_bits": 4, "act_bits": 8, "act_order": True, "hessians": hessians}]}))
    return path


def test_streamed_gptq_matches_the_whole_model_compile(tiny_decoder, tmp_path):
    recipe = _gptq_recipe(tmp_path, "float")
    for mode in ("whole", "streamed"):
        (tmp_path / mode).mkdir()
        compile_file(tiny_decoder("llama"), tmp_path / mode / "model.onnx", str(recipe), num_samples=4,
                     stream=mode == "streamed")
    for name in _files(tmp_path / "whole"):
        assert filecmp.cmp(tmp_path / "whole" / name, tmp_path / "streamed" / name, shallow=False), name


def test_sequential_gptq_hessians_need_quantized_block_inputs(tiny_decoder, tmp_path):
    recipe = _gptq_recipe(tmp_path, "sequential")
    with pytest.raises(StreamingError, match="--stream-inputs quantized"):
        compile_file(tiny_decoder("llama"), tmp_path / "model.onnx", str(recipe), num_samples=2, stream=True)
    report = compile_file(tiny_decoder("llama"), tmp_path / "model.onnx", str(recipe), num_samples=2, stream=True,
                          stream_inputs="quantized")
    assert "layer-streamed" in next(p for p in report.passes if p.name == "gptq_weights").variant
