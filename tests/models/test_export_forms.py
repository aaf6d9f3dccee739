"""Recipes on the graphs users export themselves (torch.onnx dynamo / TorchScript) against the ``mqc export`` graph
of the same weights: same passes applied, same rotation, logits within 1 dB SQNR."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from mqc.models.export_forms import (
    OPTIMUM_VENV,
    ExportForm,
    embedding_table,
    export_form,
    export_reference,
    optimum_cli,
    prefill_feed,
    token_windows,
)

import mqc
from mqc.cli import main
from mqc.errors import RecipeNotApplied
from mqc.quantizer import sqnr_db
from mqc.recipes import builtin_recipes
from mqc.report import read_report

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
#: AIFS reorders image tokens and sink_scales splits MSQ's per-modality scales at ``position_ids``: on a graph without
#: ``modality_ids``/``position_ids`` they have nothing to do, so their records differ from the reference's by design
#: and are left out of the comparison; so is fuse_norms, whose work is what differs between exporters (norm_folding's
#: count shows every norm was found).
COMPARED_PASSES = ("norm_folding", "hadamard_rotation", "rms_split", "gptq_weights", "quantize_linears", "smoothquant")


@pytest.fixture(scope="session")
def form_graph(export_cache) -> Callable[[ExportForm], Path]:
    """One export per form, shared by the xdist workers and later runs (tests/conftest.py's export cache)."""

    def get(form: ExportForm) -> Path:
        if form.exporter == "genai":
            pytest.importorskip("onnxruntime_genai", reason="the genai extra (onnxruntime-genai) is not installed")
        if form.exporter == "optimum" and optimum_cli() is None:
            pytest.skip(f"no Optimum environment at {OPTIMUM_VENV}: `make setup` builds it")
        return export_cache.get(f"form-{form.name}", lambda folder: export_form(form, folder))

    return get


@pytest.fixture(scope="session")
def reference_graph(export_cache) -> Callable[[str, bool], Path]:
    def get(family: str, tied: bool) -> Path:
        return export_cache.get(f"form-reference-{family}-{'tied' if tied else 'untied'}",
                                lambda folder: export_reference(family, tied, folder))

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
    ExportForm("llama", "dynamo", tied=True, inputs="input_ids", kv_cache=True),
    ExportForm("qwen2", "dynamo", tied=False, inputs="input_ids", kv_cache=True),
    ExportForm("llama", "optimum", tied=True, inputs="input_ids", kv_cache=True),
    ExportForm("qwen2", "optimum", tied=False, inputs="input_ids", kv_cache=True),
]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_form_computes_what_the_mqc_export_graph_computes(form, form_graph, reference_graph):
    source, reference = form_graph(form), reference_graph(form.family, form.tied)
    table = embedding_table(form.family, form.tied)
    feed = prefill_feed(source, WINDOWS[0], table, HEAD_DIM)
    got = mqc.open_session(source).run(["logits"], feed)[0]
    want = mqc.open_session(reference).run(["logits"], prefill_feed(reference, WINDOWS[0], table, HEAD_DIM))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _steps(name: str) -> str:
    return json.dumps(RECIPES[name].passes, sort_keys=True)


RECIPES = builtin_recipes()
#: MASQuant smooths per modality: a text-only graph has no ``modality_ids``, so these recipes must refuse it.
NEEDS_MODALITIES = sorted(name for name, recipe in RECIPES.items() if any(s["pass"] == "mas" for s in recipe.passes))
#: The vision-tower recipes convert LayerNorm to RMSNorm: they apply to towers, and refuse RMSNorm decoders.
TOWER_RECIPES = sorted(name for name, recipe in RECIPES.items()
                       if any(s["pass"] == "ln_to_rmsnorm" for s in recipe.passes))
#: Sink scales give position 0 its own static scale; on a graph without ``modality_ids`` they first put the
#: per-tensor QDQ points in MSQ's form with an all-text modality (passes/sink_scales.py rule 7), so they run on
#: every form like the other decoder recipes.
SINK_RECIPES = sorted(name for name, recipe in RECIPES.items() if any(s["pass"] == "sink_scales" for s in recipe.passes))
DECODER_RECIPES = sorted(set(RECIPES) - set(NEEDS_MODALITIES) - set(TOWER_RECIPES))
#: A single graph compiles with the recipe's own steps (components are for model folders): recipes with the same
#: steps compile alike, so one of each set (the shortest name) runs on every form and the others on one form.
TWINS = {name: min((other for other in DECODER_RECIPES if _steps(other) == _steps(name)), key=lambda n: (len(n), n))
         for name in DECODER_RECIPES}
COMPILED_ON_EVERY_FORM = sorted(set(TWINS.values()))
#: Run by `make test-quick` too; the other recipes' matrix is `slow`.
QUICK_RECIPES = {"mquant", "quarot", "w8a8"}


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=() if r in QUICK_RECIPES else pytest.mark.slow)
                                    for r in COMPILED_ON_EVERY_FORM])
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_recipe_on_form_matches_the_mqc_export_graph(form, recipe, form_graph, compiled_reference, tmp_path):
    reference = compiled_reference(recipe, form.family, form.tied)
    compiled = _Compiled(form_graph(form), recipe, form.family, form.tied, tmp_path / "q.onnx")
    assert compiled.records() == reference.records()
    if recipe in SINK_RECIPES:  # rule 7 on a graph without modality_ids: position 0 got its own static scale
        sink = next(p for p in compiled.report.passes if p.name == "sink_scales")
        assert sink.changed > 0 and "no modality_ids" in sink.notes[0], sink.notes
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


@pytest.mark.parametrize("recipe", sorted(set(TWINS) - set(COMPILED_ON_EVERY_FORM)))
def test_recipe_with_a_twins_steps_compiles_as_its_twin(recipe, form_graph, tmp_path):
    form = FORMS[0]
    twin = TWINS[recipe]
    compiled = _Compiled(form_graph(form), recipe, form.family, form.tied, tmp_path / "q.onnx")
    by_twin = _Compiled(form_graph(form), twin, form.family, form.tied, tmp_path / "t.onnx")
    assert compiled.records() == by_twin.records() and compiled.sqnr == by_twin.sqnr


def test_every_builtin_recipe_is_in_the_corpus_matrix():
    assert set(NEEDS_MODALITIES) | set(TOWER_RECIPES) | set(TWINS) == set(RECIPES)
    assert {"mquant", "mquant-sink"} <= set(SINK_RECIPES) and "mquant" in COMPILED_ON_EVERY_FORM
    assert {"masquant", "masquant-rot-g64"} <= set(NEEDS_MODALITIES) and set(TOWER_RECIPES) == {
        "mquant-vision", "vision-w8a8-rot"}


def _refusal(source: Path, recipe: str, family: str, tied: bool, out: Path) -> str:
    table = embedding_table(family, tied)
    calibration = [prefill_feed(source, w, table, HEAD_DIM) for w in CALIBRATION[:2]]
    with pytest.raises(RecipeNotApplied) as refused:
        mqc.compile(source, out, recipe, feeds=lambda: calibration, num_samples=len(calibration))
    assert not out.exists() and list(out.parent.iterdir()) == []
    return " ".join(str(refused.value).split())


#: Each refused recipe meets a different form (cycling through them), so every form is refused by some recipe.
@pytest.mark.parametrize(("recipe", "form"), [(r, FORMS[i % len(FORMS)]) for i, r in enumerate(NEEDS_MODALITIES)],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_masquant_recipe_refuses_a_text_only_form_with_its_reason(recipe, form, form_graph, tmp_path):
    reason = _refusal(form_graph(form), recipe, form.family, form.tied, tmp_path / "q.onnx")
    assert "pass mas cannot do its work on this model: the graph has no modality_ids input" in reason
    assert "--allow-partial" in reason


@pytest.mark.parametrize(("recipe", "form"), [(r, FORMS[-1 - i]) for i, r in enumerate(TOWER_RECIPES)],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_tower_recipe_refuses_a_decoder_form_with_its_reason(recipe, form, form_graph, tmp_path):
    reason = _refusal(form_graph(form), recipe, form.family, form.tied, tmp_path / "q.onnx")
    assert "pass ln_to_rmsnorm cannot do its work on this model: no LayerNormalization" in reason


def test_masquant_on_a_text_only_form_exits_2_from_the_command_line(form_graph, tmp_path):
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["compile", str(form_graph(FORMS[0])), "-o", str(out), "--recipe", "masquant",
                                       "--samples", "2"])
    assert result.exit_code == 2, result.output
    assert "no modality_ids input" in " ".join(result.output.split()) and not out.exists()


@pytest.mark.parametrize("recipe", TOWER_RECIPES)
def test_opset14_vision_tower_with_decomposed_layernorm_is_rotated(recipe, export_cache, tmp_path):
    from mqc.models.export_forms import export_vision_opset14

    source = export_cache.get("form-tower-dinov2-opset14", export_vision_opset14)
    assert not any(n.op_type == "LayerNormalization" for n in onnx.load(str(source)).graph.node)
    rng = np.random.default_rng(0)
    images = [{"pixel_values": rng.standard_normal((1, 3, 28, 28)).astype(np.float32)} for _ in range(9)]
    report = mqc.compile(source, tmp_path / "q.onnx", recipe, feeds=lambda: images, num_samples=9, verify=True)
    records = {p.name: p for p in report.passes}
    assert records["fuse_norms"].changed == 5
    for name in ("ln_to_rmsnorm", "hadamard_rotation"):
        assert records[name].changed > 0 and not records[name].skipped, (name, records[name].skipped)
    assert all(p.verify is None or p.verify["max_rel"] < 1e-4 for p in report.passes)
    assert report.quality["output"] == "last_hidden_state" and report.quality["sqnr_db"] > 15


def test_post_ln_encoder_is_refused_by_the_rotation_with_its_reason(tmp_path):
    from mqc.models.export_forms import export_post_ln_encoder

    source = export_post_ln_encoder(tmp_path / "bert")
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    for recipe in ("mquant", "mquant-vision"):
        result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out), "--recipe", recipe, "--samples", "2"])
        text = " ".join(result.output.split())
        assert result.exit_code == 2, text
        assert "is applied after the residual add" in text and "post-LN" in text and "cannot be folded" in text
        assert list(out.parent.iterdir()) == []
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out), "--recipe", "mquant", "--samples", "2",
                                       "--allow-partial"])
    assert result.exit_code == 0 and result.output.startswith("partial (--allow-partial): did not apply: "
                                                              "bert-post-ln.onnx: hadamard_rotation: LayerNorm"), result.output


HALF_FORMS = [ExportForm("llama", "torchscript", tied=True, inputs="input_ids", dtype="float16"),
              pytest.param(ExportForm("llama", "dynamo", tied=True, inputs="input_ids", dtype="bfloat16"),
                           marks=pytest.mark.slow),  # TorchScript cannot export bfloat16; dynamo takes ~10 s
              ExportForm("llama", "optimum", tied=True, inputs="input_ids", dtype="float16", kv_cache=True)]


@pytest.mark.parametrize("form", HALF_FORMS, ids=lambda f: f.name)
def test_half_precision_form_compiles_as_its_float32_graph(form, form_graph, compiled_reference, tmp_path):
    """The half model is widened on load: same records as the float32 mqc export graph of the (unrounded) weights,
    and a quality gate within 1 dB of it (rounding the weights to half costs far less than W4A8)."""
    reference = compiled_reference("mquant", form.family, form.tied)
    source = form_graph(form)
    table = embedding_table(form.family, form.tied)
    calibration = [prefill_feed(source, w, table, HEAD_DIM) for w in CALIBRATION]
    out = tmp_path / "q.onnx"
    report = mqc.compile(source, out, "mquant", feeds=lambda: calibration, num_samples=len(calibration),
                         gate_feeds=lambda: [prefill_feed(source, w, table, HEAD_DIM) for w in EVALUATION])
    assert f"{form.dtype} model widened to float32 on load" in report.model_summary["half_precision"]
    records = {p.name: (p.changed, sorted(_without_names(s["reason"]) for s in p.skipped))
               for p in report.passes if p.name in COMPARED_PASSES}
    assert records == reference.records()
    assert abs(report.quality["sqnr_db"] - reference.sqnr) <= 1.0, (report.quality, reference.sqnr)
    logits = onnx.load(str(out)).graph.output[0]
    assert logits.type.tensor_type.elem_type == (onnx.TensorProto.FLOAT16 if form.dtype == "float16"
                                                 else onnx.TensorProto.FLOAT)


def _past_names(session) -> list[str]:
    return [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]


def _step_feed(session, ids: np.ndarray, seen: int, cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One call's feed: ``ids`` after ``seen`` cached tokens, with ``position_ids`` where the graph takes them
    (Optimum's form does, the dynamo form derives positions from the mask)."""
    feed = {"input_ids": ids[None], "attention_mask": np.ones((1, seen + len(ids)), np.int64), **cache}
    if any(i.name == "position_ids" for i in session.get_inputs()):
        feed["position_ids"] = np.arange(seen, seen + len(ids), dtype=np.int64)[None]
    return feed


def _decode(session, ids: np.ndarray, prefill: int, kv_heads: int) -> np.ndarray:
    """Logits of ``ids[prefill:]`` computed one token at a time through the graph's own KV cache."""
    names = _past_names(session)
    cache = {name: np.zeros((1, kv_heads, 0, HEAD_DIM), np.float32) for name in names}
    steps = [ids[:prefill], *[ids[i:i + 1] for i in range(prefill, len(ids))]]
    logits, seen = [], 0
    for step in steps:
        outputs = session.run(None, _step_feed(session, step, seen, cache))
        seen += len(step)
        cache = {name: out for name, out in zip(names, outputs[1:], strict=True)}
        logits.append(outputs[0][0, -len(step):])
    return np.concatenate(logits)[prefill:]


@pytest.mark.parametrize("form", [f for f in FORMS if f.kv_cache], ids=lambda f: f.name)
def test_compiled_with_past_form_decodes_through_its_cache_as_it_prefills(form, form_graph, tmp_path):
    """The rotation rewrites what the cache holds (V·H per head): token-by-token decoding through the compiled
    graph's own present -> past loop gives the logits its one-shot prefill gives."""
    compiled = _Compiled(form_graph(form), "mquant", form.family, form.tied, tmp_path / "q.onnx")
    assert compiled.records()["hadamard_rotation"][0] > 0
    session = mqc.open_session(tmp_path / "q.onnx")
    kv_heads = next(i for i in session.get_inputs() if i.name.startswith("past_key_values")).shape[1]
    ids = EVALUATION[0]
    empty = {name: np.zeros((1, kv_heads, 0, HEAD_DIM), np.float32) for name in _past_names(session)}
    full = session.run(["logits"], _step_feed(session, ids, 0, empty))[0][0, 24:]
    assert sqnr_db(full, _decode(session, ids, 24, kv_heads)) > 40


@pytest.mark.slow
def test_linears_inside_if_branches_are_reported_float_and_the_rest_is_quantized(export_cache, tmp_path):
    from mqc.models.export_forms import export_branching_heads

    source = export_cache.get("form-llama-branching-heads", export_branching_heads)
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out), "--recipe", "w8a8", "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "14 layers quantized" in result.output and "2 MatMul/Gemm inside If/Loop bodies left in float" in result.output
    report = read_report(str(out))
    branches = next(n for n in onnx.load(str(source)).graph.node if n.op_type == "If")
    assert sorted(report.model_summary["left_float_in_subgraphs"]) == sorted(
        node.name for attribute in branches.attribute for node in attribute.g.node if node.op_type == "MatMul")
    float_session, compiled_session = mqc.open_session(source), mqc.open_session(out)
    for use_draft in (False, True):  # both heads still run (in float) behind the quantized body
        feed = {"input_ids": EVALUATION[0][None], "attention_mask": np.ones((1, len(EVALUATION[0])), np.int64),
                "use_draft": np.array(use_draft)}
        assert sqnr_db(float_session.run(None, feed)[0], compiled_session.run(None, feed)[0]) > 15
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out.with_name("r.onnx")), "--recipe",
                                       "mquant", "--samples", "4"])  # the final norm's readers are in the branches
    assert result.exit_code == 2 and "body.norm" in result.output and not out.with_name("r.onnx").exists()


def _images(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"pixel_values": rng.standard_normal((1, 3, 28, 28)).astype(np.float32)} for _ in range(count)]


#: Towers the vision recipes refuse, and the part of the reason that names why (the message names the node).
REFUSED_TOWERS = {
    # LLaVA reads the second-to-last hidden state: the residual stream itself, without a norm, into the projector
    "llava-clip": ("export_llava_style_tower", {}, "the stream is read without a norm"),
    # the patch Reshape gets a constant target (graph_forms), but the position table's interpolation is still
    # shaped from the batch-dependent embeddings, so its Reshape's channel axis cannot be followed
    "dinov2-dynamic-batch": ("export_vision_opset14", {"dynamic_batch": True},
                             "Reshape /m/embeddings/Reshape_2 does not keep the channel axis whole"),
}


@pytest.mark.parametrize("tower", sorted(REFUSED_TOWERS))
def test_vision_recipes_refuse_these_towers_naming_the_node_and_w8a8_compiles_them(tower, export_cache, tmp_path):
    from mqc.models import export_forms

    builder, options, reason = REFUSED_TOWERS[tower]
    source = export_cache.get(f"form-tower-{tower}", lambda folder: getattr(export_forms, builder)(folder, **options))
    images = _images(9)
    for recipe in TOWER_RECIPES:
        with pytest.raises(RecipeNotApplied, match="pass ln_to_rmsnorm cannot do its work") as refused:
            mqc.compile(source, tmp_path / f"{recipe}.onnx", recipe, feeds=lambda: images, num_samples=9)
        assert reason in " ".join(str(refused.value).split())
    report = mqc.compile(source, tmp_path / "w8a8.onnx", "w8a8", feeds=lambda: images[:8],
                         gate_feeds=lambda: images[8:])
    assert report.quality["sqnr_db"] > 25
    assert not any(p.name.startswith(tuple(TOWER_RECIPES)) for p in tmp_path.iterdir())  # refused: nothing written


@pytest.fixture(scope="module")
def qwen2_vl_towers(export_cache) -> tuple[Path, Path]:
    """Qwen2-VL's vision tower as a user's TorchScript export writes it, and ``mqc export``'s of the same weights."""
    from mqc.models import export_forms

    return (export_cache.get("form-tower-qwen2-vl-torchscript", export_forms.export_qwen2_vl_tower),
            export_cache.get("form-tower-qwen2-vl-reference", export_forms.export_qwen2_vl_tower_reference))


@pytest.mark.parametrize("recipe", [*TOWER_RECIPES, "w8a8"])
def test_qwen2_vl_tower_as_users_export_it_compiles_as_the_mqc_export_tower(recipe, qwen2_vl_towers, tmp_path):
    """The user's graph takes the processor's flattened patches, mqc's the image: fed the same images, the recipe
    does the same on both (records, rotation applied, output SQNR within 1 dB)."""
    from mqc.models.export_forms import QWEN2_VL_IMAGE, build_qwen2_vl, qwen2_vl_patches

    user, reference = qwen2_vl_towers
    vision_config = build_qwen2_vl().model.visual.config
    rng = np.random.default_rng(5)
    images = [rng.standard_normal((3, *QWEN2_VL_IMAGE)).astype(np.float32) for _ in range(10)]
    feeds = {user: [{"pixel_values": qwen2_vl_patches(image, vision_config)} for image in images],
             reference: [{"pixel_values": image[None]} for image in images]}
    reports = {}
    for source, samples in feeds.items():
        reports[source] = mqc.compile(source, tmp_path / f"{source.stem}.onnx", recipe, feeds=lambda s=samples: s[:8],
                                      num_samples=8, gate_feeds=lambda s=samples: s[8:], verify=True)
    records = {source: {p.name: (p.changed, sorted(_without_names(s["reason"]) for s in p.skipped))
                        for p in report.passes} for source, report in reports.items()}
    assert records[user] == records[reference]
    if recipe in TOWER_RECIPES:
        assert records[user]["ln_to_rmsnorm"] == (5, []) and records[user]["hadamard_rotation"][0] > 0
        assert not records[user]["hadamard_rotation"][1]
    assert all(p.verify is None or p.verify["max_rel"] < 1e-4 for p in reports[user].passes)
    gate, reference_gate = reports[user].quality, reports[reference].quality
    assert gate["output"] == "image_embeds" and gate["sqnr_db"] > 12
    assert abs(gate["sqnr_db"] - reference_gate["sqnr_db"]) <= 1.0, (gate, reference_gate)
