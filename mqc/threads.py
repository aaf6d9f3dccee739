"""Side-by-side work in this process: numpy, BLAS and onnxruntime release the GIL in their heavy steps, so
independent jobs on a thread pool share the CPUs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def map_in_threads(function: Callable[[Item], Result], items: Iterable[Item], threads: int, name: str) -> list[Result]:
    """``function`` of every item, in order, on up to ``threads`` threads (in this thread when one is enough)."""
    items = list(items)
    threads = min(threads, len(items))
    if threads <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        return list(pool.map(function, items))
