"""Offline data: easy-vqa (train for calibration and training, a fixed 1,000-question test set for evaluation)
and two English texts that ship with Python, kept apart so calibration never sees the perplexity text.

- Perplexity text: ``pydoc_data/topics.py`` (the language reference sections behind ``help('topic')``).
- Calibration text: the docstrings of a fixed list of standard-library modules (their own prose, not the topics).

The easy-vqa test split has 9,673 questions over 1,000 images. The evaluation set is one question per test
image, drawn with a fixed seed (1,000 questions, every image once, answer mix close to the full split's).

A validation split, for choosing hyper-parameters without reading the test set (``vqa_val_set``): questions of the
TRAIN split on the 200 images the projector is never trained on (``image_id % 20 == 0``,
``models/train_projector.py``), minus every image that calibration can draw (the first ``CALIBRATION_RESERVE``
items of the calibration order, ``models/calibration.py``): 1,509 questions on 159 images, in a fixed shuffled
order. Its perplexity text (``validation_text``) is the docstrings of other standard-library modules than the
calibration text's, and not the reported perplexity text.
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

#: Train images with ``image_id % PROJECTOR_HOLDOUT_MOD == 0`` are never used to train the projector
#: (``HOLDOUT_MOD`` of ``models/train_projector.py``).
PROJECTOR_HOLDOUT_MOD = 20
#: Calibration draws at most this many train items, always a prefix of one seeded order (``CALIBRATION_SEED``).
CALIBRATION_RESERVE = 1024
CALIBRATION_SEED = 0
#: The validation questions are shuffled once with this seed, so any prefix mixes question types and images.
VAL_SEED = 4321

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

#: Standard-library modules whose docstrings form the validation perplexity text (none is a calibration module).
VALIDATION_MODULES = (
    "abc", "ast", "cmd", "codecs", "codeop", "colorsys", "compileall", "contextvars", "dis", "doctest", "filecmp",
    "fileinput", "fnmatch", "ftplib", "genericpath", "getopt", "getpass", "graphlib", "html.parser",
    "keyword", "linecache", "locale", "lzma", "mimetypes", "modulefinder", "pdb", "pkgutil", "platform",
    "poplib", "posixpath", "pstats", "pyclbr", "quopri", "reprlib", "rlcompleter",
    "runpy", "selectors", "site", "stat", "stringprep", "symtable", "sysconfig", "tabnanny",
    "token", "tomllib", "trace", "traceback", "tracemalloc", "types", "wave", "webbrowser", "xml.dom.minidom",
    "zipapp", "zipimport",
)


@lru_cache(maxsize=1)
def perplexity_text() -> str:
    """English documentation prose from Python's ``pydoc_data.topics`` (sorted by topic, joined)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


@lru_cache(maxsize=1)
def calibration_text() -> str:
    """Docstrings of standard-library modules, classes and functions (distinct from the perplexity text)."""
    return _docstrings(CALIBRATION_MODULES)


@lru_cache(maxsize=1)
def validation_text() -> str:
    """Docstrings of ``VALIDATION_MODULES``: a perplexity text for choosing settings, never the reported one."""
    return _docstrings(VALIDATION_MODULES)


def _docstrings(modules: tuple[str, ...]) -> str:
    import importlib
    import warnings

    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
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


def calibration_train_items(num: int) -> list[VQAItem]:
    """The first ``num`` train items of the calibration order (seed ``CALIBRATION_SEED``), at most
    ``CALIBRATION_RESERVE``: the validation split excludes every image this can return."""
    if num > CALIBRATION_RESERVE:
        raise ValueError(f"calibration draws at most {CALIBRATION_RESERVE} train items (asked {num}); more would "
                         "reach the images of the validation split")
    items = vqa_split("train")
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(items))
    return [items[i] for i in order[:num]]


@lru_cache(maxsize=1)
def vqa_val_set() -> tuple[VQAItem, ...]:
    """The validation questions (module docstring): train questions on projector-held-out images that calibration
    never draws, shuffled with ``VAL_SEED``."""
    calibration_images = {it.image_id for it in calibration_train_items(CALIBRATION_RESERVE)}
    items = [it for it in vqa_split("train")
             if it.image_id % PROJECTOR_HOLDOUT_MOD == 0 and it.image_id not in calibration_images]
    order = np.random.default_rng(VAL_SEED).permutation(len(items))
    return tuple(items[i] for i in order)


def vqa_eval_set(split: str) -> tuple[VQAItem, ...]:
    """The questions ``mqc eval --split`` scores: ``test`` (the reported set) or ``val`` (for choosing settings)."""
    if split == "test":
        return vqa_test_set()
    if split == "val":
        return vqa_val_set()
    raise ValueError(f"unknown split {split!r}: choose val or test")


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
    """Answer-prior baselines fitted on the train split (less any scored question), scored on ``test`` (default:
    the evaluation set).

    ``per_question``: the most frequent train answer for each exact question text (unseen texts fall back to the
    per-first-two-words prior); ``per_first_two_words``; ``always_yes``.
    """
    from collections import Counter, defaultdict

    test = test if test is not None else vqa_test_set()
    scored = set(test)  # validation questions come from the train split: never fit on what is scored
    by_q: dict[str, Counter] = defaultdict(Counter)
    by_w: dict[str, Counter] = defaultdict(Counter)
    for it in (it for it in vqa_split("train") if it not in scored):
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
