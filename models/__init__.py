"""Exporters, the packaged tiny VLM and the onnxruntime evaluation pipeline."""
