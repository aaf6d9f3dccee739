"""Recipes on the graphs users export themselves (torch.onnx dynamo / TorchScript) against the ``mqc export`` graph
of the same weights: same passes applied, same rotation, logits within 1 dB SQNR."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from mqc.models.export_forms import (
    ExportForm,
    embedding_table,
    export_form,
    export_reference,
    prefill_feed,
    token_windows,
)

import mqc
from mqc.quantizer import sqnr_db

HEAD_DIM = 16
#: The module path above ``layers.N`` depends on the wrapper the graph was exported from (``m.model.`` / ``model.``).
MODULE_PREFIX = re.compile(r"\S*?layers\.")
#: Families whose rotation applies (Gemma3's is refused on every form, its own mqc export graph included).
ROTATED_FAMILIES = {"llama", "qwen2"}
#: Node names are the exporter's own (``node_add_1074``, ``/model/layers.0/Add``).
CONSUMER_NAME = re.compile(r"(consumer: \w+) \S+")


def _without_names(reason: str) -> str:
    return CONSUMER_NAME.sub(r"\1", MODULE_PREFIX.sub("layers.", reason))
WINDOWS = token_windows(10, 32, 512, seed=3)
CALIBRATION, EVALUATION = WINDOWS[:8], WINDOWS[8:]
#: AIFS reorders image tokens: on a graph without ``inputs_embeds``/``modality_ids`` it has nothing to do, so its
#: record differs from the reference's by design and is left out of the comparison; so is fuse_norms, whose work
#: is what differs between exporters (norm_folding's count shows every norm was found).
COMPARED_PASSES = ("norm_folding", "hadamard_rotation", "rms_split", "gptq_weights", "quantize_linears")


@pytest.fixture(scope="session")
def form_graph(tmp_path_factory: pytest.TempPathFactory) -> Callable[[ExportForm], Path]:
    root = tmp_path_factory.mktemp("export_forms")
    built: dict[ExportForm, Path] = {}

    def get(form: ExportForm) -> Path:
        if form.exporter == "genai":
            pytest.importorskip("onnxruntime_genai", reason="the genai extra (onnxruntime-genai) is not installed")
        if form not in built:
            built[form] = export_form(form, root / form.name)
        return built[form]

    return get


@pytest.fixture(scope="session")
def reference_graph(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Path]:
    root = tmp_path_factory.mktemp("export_reference")
    built: dict[tuple[str, bool], Path] = {}

    def get(family: str, tied: bool) -> Path:
        if (family, tied) not in built:
            built[family, tied] = export_reference(family, tied, root / f"{family}-{tied}")
        return built[family, tied]

    return get


class _Compiled:
    """A recipe compiled on one graph with the shared token windows, and its held-out logits SQNR."""

    def __init__(self, source: Path, recipe: str, family: str, tied: bool, out: Path) -> None:
        table = embedding_table(family, tied)
        calibration = [prefill_feed(source, w, table, HEAD_DIM) for w in CALIBRATION]
        # allow_partial: Gemma3's refused rotation is then recorded (not_applied) instead of stopping the compile
        self.report = mqc.compile(source, out, recipe, feeds=lambda: calibration, num_samples=len(calibration),
                                  allow_partial=True)
        float_session, compiled_session = mqc.open_session(source), mqc.open_session(out)
        scores = []
        for window in EVALUATION:
            feed = prefill_feed(source, window, table, HEAD_DIM)
            ref = float_session.run(["logits"], feed)[0]
            scores.append(sqnr_db(ref, compiled_session.run(["logits"], feed)[0]))
        self.sqnr = float(np.mean(scores))

    def records(self) -> dict[str, tuple[int, list[str]]]:
        """Per compared pass: how many things it changed and the reasons of its skips (names differ by exporter)."""
        return {p.name: (p.changed, sorted(_without_names(s["reason"]) for s in p.skipped))
                for p in self.report.passes if p.name in COMPARED_PASSES}


@pytest.fixture(scope="session")
def compiled_reference(reference_graph, tmp_path_factory) -> Callable[[str, str, bool], _Compiled]:
    root = tmp_path_factory.mktemp("compiled_reference")
    built: dict[tuple[str, str, bool], _Compiled] = {}

    def get(recipe: str, family: str, tied: bool) -> _Compiled:
        key = (recipe, family, tied)
        if key not in built:
            built[key] = _Compiled(reference_graph(family, tied), recipe, family, tied, root / f"{recipe}-{family}-{tied}.onnx")
        return built[key]

    return get


FORMS = [
    ExportForm("llama", "dynamo", tied=True, inputs="input_ids"),
    ExportForm("llama", "torchscript", tied=True, inputs="input_ids"),
    ExportForm("llama", "dynamo", tied=False, inputs="inputs_embeds"),
    ExportForm("llama", "torchscript", tied=False, inputs="inputs_embeds"),
    ExportForm("qwen2", "dynamo", tied=True, inputs="input_ids"),
    ExportForm("qwen2", "torchscript", tied=False, inputs="input_ids"),
    ExportForm("gemma3", "dynamo", tied=True, inputs="input_ids"),
    ExportForm("gemma3", "torchscript", tied=True, inputs="input_ids"),
    ExportForm("llama", "genai", tied=True, inputs="input_ids"),
    ExportForm("qwen2", "genai", tied=False, inputs="input_ids"),
]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_form_computes_what_the_mqc_export_graph_computes(form, form_graph, reference_graph):
    source, reference = form_graph(form), reference_graph(form.family, form.tied)
    table = embedding_table(form.family, form.tied)
    feed = prefill_feed(source, WINDOWS[0], table, HEAD_DIM)
    got = mqc.open_session(source).run(["logits"], feed)[0]
    want = mqc.open_session(reference).run(["logits"], prefill_feed(reference, WINDOWS[0], table, HEAD_DIM))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", ["mquant", "quarot", "w8a8"])
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_recipe_on_form_matches_the_mqc_export_graph(form, recipe, form_graph, compiled_reference, tmp_path):
    reference = compiled_reference(recipe, form.family, form.tied)
    compiled = _Compiled(form_graph(form), recipe, form.family, form.tied, tmp_path / "q.onnx")
    assert compiled.records() == reference.records()
    if "hadamard_rotation" in reference.records():
        changed, skips = compiled.records()["hadamard_rotation"]
        if form.family in ROTATED_FAMILIES:
            assert changed > 0 and not skips, "the rotation applied"
        else:  # Gemma3's q_norm/k_norm gammas and post-norms: refused on the mqc export graph alike
            rotation = next(p for p in compiled.report.passes if p.name == "hadamard_rotation")
            assert changed == 0 and rotation.not_applied
    assert abs(compiled.sqnr - reference.sqnr) <= 1.0, (compiled.sqnr, reference.sqnr)
    gate, reference_gate = compiled.report.quality, reference.report.quality
    assert abs(gate["sqnr_db"] - reference_gate["sqnr_db"]) <= 1.0 and abs(gate["kl"] - reference_gate["kl"]) <= 0.1


def test_opset14_vision_tower_with_decomposed_layernorm_is_rotated(tmp_path):
    from mqc.models.export_forms import export_vision_opset14

    source = export_vision_opset14(tmp_path)
    assert not any(n.op_type == "LayerNormalization" for n in onnx.load(str(source)).graph.node)
    rng = np.random.default_rng(0)
    images = [{"pixel_values": rng.standard_normal((1, 3, 28, 28)).astype(np.float32)} for _ in range(9)]
    report = mqc.compile(source, tmp_path / "q.onnx", "mquant-vision", feeds=lambda: images, num_samples=9, verify=True)
    records = {p.name: p for p in report.passes}
    assert records["fuse_norms"].changed == 5
    for name in ("ln_to_rmsnorm", "hadamard_rotation"):
        assert records[name].changed > 0 and not records[name].skipped, (name, records[name].skipped)
    assert all(p.verify is None or p.verify["max_rel"] < 1e-4 for p in report.passes)
    assert report.quality["output"] == "last_hidden_state" and report.quality["sqnr_db"] > 15
