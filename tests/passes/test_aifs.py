"""AIFS (spec §2.4): image tokens first inside the decoder, logits and decode steps unchanged."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from mqc.passes.aifs import PERMUTATION, PERMUTED_MODALITY, AifsPass

import mqc
from mqc.calibration import random_feeds
from mqc.errors import RecipeError
from mqc.ir import load_model, save_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.recipes import Recipe


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tiny_decoder, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(original decoder, the AIFS decoder with the permutation and permuted modality ids as extra outputs, record)."""
    source = tiny_decoder(request.param)
    model = load_model(source)
    feeds = random_feeds(model, 2)
    record = PassManager([AifsPass()], CompileContext(lambda: feeds, verify=True)).run(model)[0]
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    graph.outputs.extend([values[PERMUTATION], values[PERMUTED_MODALITY]])
    out = tmp_path_factory.mktemp("aifs") / f"{request.param}_aifs.onnx"
    save_model(model, out)
    return source, out, record


def _feed(source: Path, layouts: list[list[int]], left_pad: list[int] | None = None, seed: int = 0) -> dict:
    model = onnx.load(str(source), load_external_data=False)
    hidden = next(i for i in model.graph.input if i.name == "inputs_embeds").type.tensor_type.shape.dim[2].dim_value
    batch, seq = len(layouts), len(layouts[0])
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    modality = np.array(layouts, dtype=np.int64)
    embeds[modality == 1, :1] *= 30.0  # an image-token outlier channel, as test_msq does
    mask = np.ones((batch, seq), np.int64)
    for row, pad in enumerate(left_pad or []):
        mask[row, :pad] = 0
    feed = {"inputs_embeds": embeds, "attention_mask": mask,
            "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
            "modality_ids": modality}
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values"):
            dims = inp.type.tensor_type.shape.dim
            feed[inp.name] = np.zeros((batch, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
    return feed


INTERLEAVED = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0]  # text, image, text, image, text
OTHER = [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def _run(path: Path, feed: dict) -> dict[str, np.ndarray]:
    session = mqc.open_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


def _assert_close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * float(np.abs(a).max()))


def test_logits_equal_on_interleaved_and_batched_layouts(pair):
    source, aifs, record = pair
    assert record.verify["compared"] == ["logits"] and all(n.startswith("present.") for n in record.verify["excluded"])
    for layouts, pad in (([INTERLEAVED], None), ([INTERLEAVED, OTHER], None), ([OTHER, INTERLEAVED], [3, 0])):
        feed = _feed(source, layouts, pad)
        ref, got = _run(source, feed), _run(aifs, feed)
        _assert_close(ref["logits"], got["logits"])
        perm = got[PERMUTATION]
        for row in range(len(layouts)):  # the cache holds the same rows, in the permuted order
            _assert_close(ref["present.0.key"][row][:, perm[row]], got["present.0.key"][row])
        assert not np.array_equal(perm[0], np.arange(len(INTERLEAVED)))


def test_image_tokens_lead_every_row(pair):
    source, aifs, _ = pair
    feed = _feed(source, [INTERLEAVED, OTHER], [3, 0])
    got = _run(aifs, feed)
    modality, perm = got[PERMUTED_MODALITY], got[PERMUTATION]
    for row in range(2):
        pads = int((feed["attention_mask"][row] == 0).sum())
        body = modality[row, pads:]
        images = int(feed["modality_ids"][row, pads:].sum()) if pads else int(feed["modality_ids"][row].sum())
        assert (body[:images] == 1).all() and (body[images:] == 0).all(), body  # one image block, then text
        np.testing.assert_array_equal(modality[row], feed["modality_ids"][row][perm[row]])
        for block in (perm[row][pads:][:images], perm[row][pads:][images:]):  # original order inside each block
            assert (np.diff(block) > 0).all()


def test_decode_step_from_own_cache_matches(pair):
    source, aifs, _ = pair
    feed = _feed(source, [INTERLEAVED, OTHER])
    seq = len(INTERLEAVED)
    step = np.random.default_rng(7).standard_normal((2, 1, feed["inputs_embeds"].shape[-1])).astype(np.float32)
    logits = []
    for path in (source, aifs):
        prefill = _run(path, feed)
        decode = {"inputs_embeds": step, "attention_mask": np.ones((2, seq + 1), np.int64),
                  "position_ids": np.full((2, 1), seq, np.int64), "modality_ids": np.zeros((2, 1), np.int64)}
        decode.update({k.replace("present.", "past_key_values."): v for k, v in prefill.items() if k.startswith("present.")})
        logits.append(_run(path, decode)["logits"])
    _assert_close(logits[0], logits[1])


def test_composes_with_msq_after_quantization(pair, tmp_path):
    source, _, _ = pair
    feeds = [_feed(source, [INTERLEAVED], seed=s) for s in range(2)]
    base = [{"pass": "upgrade_opset"}, {"pass": "fuse_norms"},
            {"pass": "quantize_linears", "weight_bits": 8, "act_scales": "per_modality"}]
    mqc.compile(source, tmp_path / "msq.onnx", Recipe("msq", "", base), feeds=lambda: feeds)
    report = mqc.compile(source, tmp_path / "msq_aifs.onnx", Recipe("msq-aifs", "", [*base, {"pass": "aifs"}]),
                         feeds=lambda: feeds)
    assert any("MSQ composes" in note for note in report.passes[-1].notes)
    graph = onnx.load(str(tmp_path / "msq_aifs.onnx")).graph
    unsq = next(n for n in graph.node if n.name == "mqc_msq/is_image_unsqueeze")
    assert unsq.input[0] == PERMUTED_MODALITY  # per-token scales follow the permuted tokens
    feed = _feed(source, [OTHER, INTERLEAVED], seed=5)
    ref, got = _run(tmp_path / "msq.onnx", feed)["logits"], _run(tmp_path / "msq_aifs.onnx", feed)["logits"]
    _assert_close(ref, got, 1e-4)
    with pytest.raises(RecipeError, match="AIFS"):
        mqc.compile(source, tmp_path / "bad.onnx", Recipe("bad", "", [*base[:2], {"pass": "aifs"}, base[2]]),
                    feeds=lambda: feeds)
