"""Exporters, the packaged tiny VLM and the onnxruntime evaluation pipeline (installed as ``mqc.models``).

- :mod:`~mqc.models.export`: Hugging Face model -> ``vision.onnx`` / ``embed.onnx`` / ``decoder.onnx`` + manifest
  (Llama, Qwen2, Gemma3 decoders; LLaVA; Qwen2-VL in :mod:`~mqc.models.qwen2_vl`).
- :mod:`~mqc.models.manifest`: the ``mqc-model/1`` directory manifest and its layer hints.
- :mod:`~mqc.models.packaged`: ``resolve("tiny-vlm")`` and other packaged names -> cached model directories.
- :mod:`~mqc.models.assemble`, :mod:`~mqc.models.train_projector`, :mod:`~mqc.models.features`: the tiny VLM.
- :mod:`~mqc.models.pipeline`, :mod:`~mqc.models.prompting`: one onnxruntime pipeline (no torch).
- :mod:`~mqc.models.calibration`, :mod:`~mqc.models.data`: calibration feeds and the offline data sources.
- :mod:`~mqc.models.evaluate`, :mod:`~mqc.models.commands`: ``mqc eval`` and ``mqc export``.
- :mod:`~mqc.models.testing`: tiny random-weight models of every family, for tests (``export_tiny``).
"""

from mqc.models.packaged import register_with_core

register_with_core()
