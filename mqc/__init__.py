"""mqc: a compiler that statically quantizes multimodal LLM ONNX graphs for onnxruntime (MQuant, MASQuant)."""

from mqc.compiler import compile
from mqc.session import open_session

__all__ = ["compile", "open_session"]
