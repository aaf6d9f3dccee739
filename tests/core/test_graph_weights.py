"""The chunked float64 products that rotate and fold vocabulary-sized weights: the bits of the one-shot product."""

from __future__ import annotations

import numpy as np
import pytest

from mqc.graph.weights import widened_product


@pytest.mark.parametrize("split", ["columns", "rows"])
def test_widened_product_in_chunks_equals_the_one_shot_product(split: str) -> None:
    rng = np.random.default_rng(0)
    left = rng.standard_normal((300, 96)).astype(np.float32) if split == "rows" else rng.standard_normal((96, 96))
    right = rng.standard_normal((96, 96)) if split == "rows" else rng.standard_normal((96, 700)).astype(np.float32)
    one_shot = (left.astype(np.float64) @ right.astype(np.float64)).astype(np.float32)
    chunked = widened_product(left, right, np.dtype(np.float32), split=split, chunk_bytes=8 * 96 * 50)  # 6+ chunks
    assert chunked.dtype == np.float32
    np.testing.assert_array_equal(chunked, one_shot)
    with pytest.raises(ValueError, match="split"):
        widened_product(left, right, np.dtype(np.float32), split="diagonal")
