"""``mqc eval``: the figures every recipe is judged by, for a float model and its compiled versions.

Per model directory, through the one onnxruntime pipeline (:mod:`mqc.models.pipeline`):

- ``vqa_accuracy``: easy-vqa accuracy with greedy decoding, split by question type; the answer is the first word
  generated, compared with the reference exactly. Text-only models skip it. ``split="test"``: the fixed
  1,000-question set of :func:`mqc.models.data.vqa_test_set` (the reported figures); ``split="val"``: the
  validation questions of :func:`mqc.models.data.vqa_val_set` (for choosing settings). ``offset`` and ``limit``
  take questions ``offset`` to ``offset + limit`` of the split.
- ``perplexity``: on the first ``ppl_tokens`` tokens of Python's ``pydoc_data.topics`` text (``split="test"``) or
  of :func:`mqc.models.data.validation_text` (``split="val"``), in independent windows of ``ppl_window`` tokens
  (no overlap, no BOS; every token but each window's first is scored).
- Against the float model (compiled models only): ``top1_agreement`` of the next-token argmax and ``kl`` =
  mean KL(float || compiled) in nats, over every scored text position and over the first answer token of every
  VQA question (also reported apart, ``*_text`` and ``*_vqa``).
- ``size_mb``: bytes of the graphs and their external data on disk, in MB (10^6 bytes).
- ``prefill_ms``: one VQA prompt at batch 1, vision + embed + decoder prefill (median of ``latency_runs``);
  ``decode_ms_per_token``: median decoder step with the KV cache after that prefill. On the providers asked for;
  the models take turns run by run, so a shared machine's load falls on each alike.

Models run in lockstep on the same inputs so float logits never have to be stored.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mqc.models import manifest as mf
from mqc.models.data import (
    perplexity_text,
    prior_baseline,
    question_type,
    validation_text,
    vqa_eval_set,
    vqa_test_set,
)
from mqc.models.pipeline import Pipeline, log_softmax
from mqc.models.prompting import normalize_answer

from mqc.outputs import write_text_atomically


def model_size_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes on disk per component: the graph file plus its external-data files."""
    import onnx

    model_dir = Path(model_dir)
    man = mf.load(model_dir)
    sizes = {}
    for comp, fname in man["components"].items():
        path = model_dir / fname
        total = path.stat().st_size
        proto = onnx.load(str(path), load_external_data=False)
        locations = set()
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    locations.add(e.value)
        total += sum((model_dir / loc).stat().st_size for loc in locations if (model_dir / loc).exists())
        sizes[comp] = total
    return sizes


class _Stats:
    """Running top-1 agreement and KL(float || other) over positions."""

    def __init__(self):
        self.n = 0
        self.agree = 0
        self.kl = 0.0

    def add(self, ref_logits: np.ndarray, logits: np.ndarray) -> None:
        ref = ref_logits.reshape(-1, ref_logits.shape[-1])
        oth = logits.reshape(-1, logits.shape[-1])
        lp = log_softmax(ref)
        lq = log_softmax(oth)
        self.kl += float((np.exp(lp) * (lp - lq)).sum())
        self.agree += int((ref.argmax(-1) == oth.argmax(-1)).sum())
        self.n += ref.shape[0]

    def result(self) -> dict:
        return {"top1_agreement": self.agree / self.n if self.n else None, "kl": self.kl / self.n if self.n else None,
                "positions": self.n}

    def merged(self, other: _Stats) -> dict:
        m = _Stats()
        m.n, m.agree, m.kl = self.n + other.n, self.agree + other.agree, self.kl + other.kl
        return m.result()


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    lp = log_softmax(logits[:, :-1])
    tgt = ids[:, 1:]
    picked = np.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
    return float(-picked.sum()), int(tgt.size)


def _latency(pipes: Sequence[Pipeline], item, runs: int, decode_steps: int = 16, tick=lambda: None) -> list[dict]:
    """Per model: prefill (vision + embed + decoder, batch 1) and per-token decode latency, medians in ms.

    The models take turns run by run (float, compiled, float, ...), so the load of a shared machine falls on each
    alike; the first round warms up and is not counted."""
    prefill: list[list[float]] = [[] for _ in pipes]
    decode: list[list[float]] = [[] for _ in pipes]
    for r in range(runs + 1):
        for m, pipe in enumerate(pipes):
            seconds, steps = _one_run(pipe, item, decode_steps if r > 0 else 2)
            if r > 0:
                prefill[m].append(seconds)
                decode[m].append(statistics.median(steps))
        tick()
    q = item.question if item is not None else "What is Python?"
    return [{"prefill_ms": 1000 * statistics.median(p), "decode_ms_per_token": 1000 * statistics.median(d),
             "prefill_tokens": len(pipe.prompt(q, pipe.vision is not None).ids)}
            for pipe, p, d in zip(pipes, prefill, decode, strict=True)]


def _one_run(pipe: Pipeline, item, decode_steps: int) -> tuple[float, list[float]]:
    """One prefill of ``item``'s prompt and ``decode_steps`` greedy steps with the KV cache: (prefill s, step s)."""
    has_image = pipe.vision is not None
    q = item.question if item is not None else "What is Python?"
    prompts = [pipe.prompt(q, has_image)]
    pixels = pipe.pixel_values([item.image_path]) if has_image else None
    t = time.perf_counter()
    emb = pipe.image_embeds(pixels) if has_image else None
    feeds = pipe.prefill_feeds(prompts, emb)
    logits, past = pipe.run_decoder(feeds)
    prefill = time.perf_counter() - t
    mask = feeds["attention_mask"]
    pos = feeds["position_ids"][..., -1:]
    nxt = logits[:, -1].argmax(-1)
    steps = []
    for _ in range(decode_steps):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos + 1
        t = time.perf_counter()
        sf = {"inputs_embeds": pipe.embed_ids(nxt[:, None]).astype(np.float32), "attention_mask": mask,
              "position_ids": pos, "modality_ids": np.zeros((1, 1), np.int64), **past}
        logits, past = pipe.run_decoder({k: v for k, v in sf.items() if k in pipe._decoder_inputs})
        steps.append(time.perf_counter() - t)
        nxt = logits[:, -1].argmax(-1)
    return prefill, steps


def modality_gap(pipe: Pipeline, items, max_images: int = 32) -> dict:
    """Scale of the decoder's input per modality: per-token RMS and max |x| of image vs text embeddings."""
    items = list(items)[:max_images]
    if pipe.vision is None or not items:
        return {}
    img = pipe.image_embeds(pipe.pixel_values([it.image_path for it in items]))
    ids = np.concatenate([pipe.prompt(it.question, with_image=False).ids for it in items])
    txt = pipe.embed_ids(ids[None])[0]

    def stats(x):
        rms = np.sqrt((x.astype(np.float64) ** 2).mean(-1)).reshape(-1)
        return {"rms_median": float(np.median(rms)), "abs_max": float(np.abs(x).max())}

    i, t = stats(img), stats(txt)
    return {"image": i, "text": t, "rms_ratio": i["rms_median"] / t["rms_median"]}


def evaluate(
    float_dir: Path,
    compiled_dirs: Sequence[Path] = (),
    limit: int | None = None,
    providers: Sequence[str] | None = None,
    json_out: Path | None = None,
    progress: bool = True,
    batch_size: int = 8,
    ppl_tokens: int = 4096,
    ppl_window: int = 512,
    latency_runs: int = 5,
    threads: int | None = None,
    max_new_tokens: int = 4,
    split: str = "test",
    offset: int = 0,
) -> dict:
    """Evaluate ``float_dir`` and each of ``compiled_dirs``; return (and optionally write) the result dict."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    dirs = [Path(float_dir), *[Path(d) for d in compiled_dirs]]
    pipes = [Pipeline(d, providers=providers, threads=threads) for d in dirs]
    ref = pipes[0]
    for p in pipes[1:]:
        if p.manifest["vocab_size"] != ref.manifest["vocab_size"]:
            raise ValueError(f"{p.dir}: vocabulary differs from the float model's")
    has_vision = ref.vision is not None
    questions = vqa_eval_set(split)
    if not 0 <= offset < len(questions):
        raise ValueError(f"--offset {offset} is outside the {split} split's {len(questions)} questions")
    test = list(questions[offset : None if limit is None else offset + limit])
    if not has_vision:
        test = []

    text_ids = ref.encode(validation_text() if split == "val" else perplexity_text())[:ppl_tokens]
    n_windows = max(1, len(text_ids) // ppl_window)
    windows = [text_ids[i * ppl_window : (i + 1) * ppl_window] for i in range(n_windows)]

    per = [{"correct": 0, "by_type": {}, "answers": [], "nll": 0.0, "ntok": 0, "vqa_seconds": 0.0} for _ in pipes]
    text_stats = [_Stats() for _ in pipes]
    vqa_stats = [_Stats() for _ in pipes]

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        if test:
            task = bar.add_task(f"easy-vqa x{len(pipes)} model(s)", total=len(test))
            for k in range(0, len(test), batch_size):
                chunk = test[k : k + batch_size]
                pixels = ref.pixel_values([it.image_path for it in chunk])
                qs = [it.question for it in chunk]
                first = None
                for m, pipe in enumerate(pipes):
                    t = time.perf_counter()
                    gen = pipe.generate(qs, pixel_values=pixels, max_new_tokens=max_new_tokens)
                    per[m]["vqa_seconds"] += time.perf_counter() - t
                    for it, text in zip(chunk, gen.texts, strict=True):
                        ans = normalize_answer(text)
                        ok = ans == it.answer
                        per[m]["correct"] += ok
                        bt = per[m]["by_type"].setdefault(question_type(it.question), [0, 0])
                        bt[0] += ok
                        bt[1] += 1
                        per[m]["answers"].append(ans)
                    if m == 0:
                        first = gen.first_logits
                    else:
                        vqa_stats[m].add(first, gen.first_logits)
                bar.advance(task, len(chunk))
        task = bar.add_task(f"perplexity x{len(pipes)} model(s)", total=len(windows))
        for w in windows:
            ids = w[None]
            base = None
            for m, pipe in enumerate(pipes):
                logits = pipe.text_logits(ids)
                nll, n = _nll(logits, ids)
                per[m]["nll"] += nll
                per[m]["ntok"] += n
                if m == 0:
                    base = logits
                else:
                    text_stats[m].add(base[0, :-1], logits[0, :-1])
            bar.advance(task)
        task = bar.add_task(f"latency x{len(pipes)} model(s), interleaved", total=latency_runs + 1)
        lat = _latency(pipes, test[0] if test else (vqa_test_set()[0] if has_vision else None), latency_runs,
                       tick=lambda: bar.advance(task))

    models = []
    for m, (d, pipe) in enumerate(zip(dirs, pipes, strict=True)):
        sizes = model_size_bytes(d)
        entry = {
            "role": "float" if m == 0 else "compiled",
            "name": pipe.manifest.get("name", d.name),
            "dir": str(d),
            "recipe": (pipe.manifest.get("compiled") or {}).get("recipe"),
            "format": (pipe.manifest.get("compiled") or {}).get("format"),
            "vqa_accuracy": per[m]["correct"] / len(test) if test else None,
            "vqa_by_type": {k: v[0] / v[1] for k, v in sorted(per[m]["by_type"].items())},
            "vqa_questions": len(test),
            "vqa_seconds": round(per[m]["vqa_seconds"], 2),
            "perplexity": float(np.exp(per[m]["nll"] / per[m]["ntok"])),
            "ppl_tokens_scored": per[m]["ntok"],
            "size_mb": sum(sizes.values()) / 1e6,
            "size_mb_by_component": {k: v / 1e6 for k, v in sizes.items()},
            **lat[m],
        }
        if m > 0:
            entry.update({
                **{f"{k}": v for k, v in text_stats[m].merged(vqa_stats[m]).items()},
                **{f"{k}_text": v for k, v in text_stats[m].result().items()},
                **{f"{k}_vqa": v for k, v in vqa_stats[m].result().items()},
            })
            if test:
                entry["vqa_answer_agreement"] = float(np.mean(
                    [a == b for a, b in zip(per[0]["answers"], per[m]["answers"], strict=True)]))
        if m == 0 and has_vision:
            entry["modality_gap"] = modality_gap(pipe, test or vqa_test_set())
        models.append(entry)
    result = {
        "format": "mqc-eval/1",
        "models": models,
        "prior_baseline": prior_baseline(tuple(test)) if test else None,
        "settings": {
            "split": split, "offset": offset, "limit": limit,
            "vqa_set": ("easy-vqa test, one question per image (seed 1234)" if split == "test" else
                        "easy-vqa validation: train questions on projector-held-out images calibration never draws"),
            "ppl_text": "pydoc_data.topics" if split == "test" else "validation_text (standard-library docstrings)", "ppl_tokens": int(sum(len(w) for w in windows)),
            "ppl_window": ppl_window, "providers": list(pipes[0].decoder.get_providers()),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "latency_runs": latency_runs,
            "threads": threads,
        },
    }
    if json_out:
        write_text_atomically(Path(json_out), json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict):
    """A ``rich.table.Table`` of the result (print it with a rich console; ``str()`` gives plain text)."""
    from rich.table import Table

    prior = result.get("prior_baseline")
    title = "mqc eval"
    if prior:
        title += (f"  (easy-vqa n={prior['num_questions']}; answer-prior baseline {100 * prior['per_question']:.1f}%"
                  f", always-yes {100 * prior['always_yes']:.1f}%)")
    table = Table(title=title)
    for col in ("model", "kind", "VQA acc %", "PPL", "top-1 agr %", "KL", "size MB", "prefill ms", "decode ms/tok"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right", no_wrap=col == "model")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for m in result["models"]:
        kind = "float" if m["role"] == "float" else " ".join(x for x in (m.get("recipe"), m.get("format")) if x)
        acc = None if m["vqa_accuracy"] is None else 100 * m["vqa_accuracy"]
        agr = m.get("top1_agreement")
        table.add_row(Path(m["dir"]).name, kind or "compiled", f(acc, ".1f"), f(m["perplexity"], ".2f"),
                      f(None if agr is None else 100 * agr, ".1f"), f(m.get("kl"), ".4f"), f(m["size_mb"], ".1f"),
                      f(m["prefill_ms"], ".1f"), f(m["decode_ms_per_token"], ".1f"))
    return table


def table_text(result: dict, width: int = 120) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(format_table(result))
    return console.export_text()
