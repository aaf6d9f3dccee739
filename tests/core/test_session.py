"""Session options mqc applies to every onnxruntime session it opens."""

from __future__ import annotations

import pytest

from mqc.errors import InputModelError
from mqc.session import THREADS_ENV, open_session


def test_thread_count_comes_from_the_environment(llama_decoder, monkeypatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    assert open_session(llama_decoder).get_session_options().intra_op_num_threads == 3
    assert open_session(llama_decoder, intra_op_threads=2).get_session_options().intra_op_num_threads == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(InputModelError, match=THREADS_ENV):
            open_session(llama_decoder)
