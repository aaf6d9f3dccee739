"""mqc: quantization compiler for multimodal LLM ONNX graphs."""
