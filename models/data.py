"""Offline data: easy-vqa (train for calibration and training, a fixed 1,000-question test set for evaluation)
and two English texts that ship with Python, kept apart so calibration never sees the perplexity text.

- Perplexity text: ``pydoc_data/topics.py`` (the language reference sections behind ``help('topic')``).
- Calibration text: the docstrings of a fixed list of standard-library modules (their own prose, not the topics).

The easy-vqa test split has 9,673 questions over 1,000 images. The evaluation set is one question per test
image, drawn with a fixed seed (1,000 questions, every image once, answer mix close to the full split's).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

#: The easy-vqa evaluation set: one question per test image, drawn with this seed.
TEST_SEED = 1234

#: Standard-library modules whose docstrings form the calibration text (never the perplexity text).
CALIBRATION_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "http.client", "imaplib", "inspect",
    "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing", "netrc", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shelve",
    "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile",
)


@lru_cache(maxsize=1)
def perplexity_text() -> str:
    """English documentation prose from Python's ``pydoc_data.topics`` (sorted by topic, joined)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


@lru_cache(maxsize=1)
def calibration_text() -> str:
    """Docstrings of standard-library modules, classes and functions (distinct from the perplexity text)."""
    import importlib
    import warnings

    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CALIBRATION_MODULES:
            parts.extend(_module_docs(importlib.import_module, name))
    return "\n\n".join(parts)


def _module_docs(importer, name: str) -> list[str]:
    """The module's docstring and the long docstrings of the classes and functions it defines."""
    try:
        mod = importer(name)
    except Exception:  # pragma: no cover - a module missing from a stripped Python
        return []
    parts = [d] if (d := inspect.getdoc(mod)) else []
    for attr in sorted(vars(mod)):
        obj = getattr(mod, attr)
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", "") == mod.__name__ and (d := inspect.getdoc(obj)) and len(d) > 200:
            parts.append(d)
    return parts


# --------------------------------------------------------------------------------------------------------------
# easy-vqa
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    image_id: int
    image_path: str


def _easy_vqa_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("easy-vqa is not installed (pip install easy-vqa)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@lru_cache(maxsize=2)
def _split(split: str) -> tuple[VQAItem, ...]:
    root = _easy_vqa_root() / split
    qs = json.loads((root / "questions.json").read_text())
    return tuple(VQAItem(q, a, int(i), str(root / "images" / f"{int(i)}.png")) for q, a, i in qs)


def vqa_split(split: str) -> tuple[VQAItem, ...]:
    """All questions of ``split`` ("train": 38,575; "test": 9,673), in file order."""
    if split not in ("train", "test"):
        raise ValueError(split)
    return _split(split)


@lru_cache(maxsize=1)
def vqa_test_set() -> tuple[VQAItem, ...]:
    """The 1,000-question evaluation set: one question per test image (seed ``TEST_SEED``), by image id."""
    items = vqa_split("test")
    by_image: dict[int, list[VQAItem]] = {}
    for it in items:
        by_image.setdefault(it.image_id, []).append(it)
    rng = np.random.default_rng(TEST_SEED)
    return tuple(by_image[i][int(rng.integers(len(by_image[i])))] for i in sorted(by_image))


def answers() -> list[str]:
    return [a.strip() for a in (_easy_vqa_root() / "answers.txt").read_text().splitlines() if a.strip()]


def question_type(question: str) -> str:
    """Coarse type used in reports: shape, color or yes/no."""
    q = question.lower()
    if q.startswith(("what shape", "what is the shape")) or (q.startswith("what is the") and q.endswith("shape?")
                                                             and "color" not in q):
        return "shape"
    if q.startswith("what") and ("color" in q or "colour" in q):
        return "color"
    if q.startswith("what"):
        return "shape"
    return "yes/no"


def prior_baseline(test: tuple[VQAItem, ...] | None = None) -> dict:
    """Answer-prior baselines fitted on the train split, scored on ``test`` (default: the evaluation set).

    ``per_question``: the most frequent train answer for each exact question text (unseen texts fall back to the
    per-first-two-words prior); ``per_first_two_words``; ``always_yes``.
    """
    from collections import Counter, defaultdict

    test = test if test is not None else vqa_test_set()
    by_q: dict[str, Counter] = defaultdict(Counter)
    by_w: dict[str, Counter] = defaultdict(Counter)
    for it in vqa_split("train"):
        by_q[it.question][it.answer] += 1
        by_w[" ".join(it.question.split()[:2])][it.answer] += 1

    def pred_w(q):
        c = by_w.get(" ".join(q.split()[:2]))
        return c.most_common(1)[0][0] if c else "yes"

    def pred_q(q):
        c = by_q.get(q)
        return c.most_common(1)[0][0] if c else pred_w(q)

    n = len(test)
    return {
        "per_question": sum(pred_q(t.question) == t.answer for t in test) / n,
        "per_first_two_words": sum(pred_w(t.question) == t.answer for t in test) / n,
        "always_yes": sum(t.answer == "yes" for t in test) / n,
        "num_questions": n,
    }
