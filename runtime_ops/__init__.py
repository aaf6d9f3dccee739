"""Custom onnxruntime operator library (CPU and CUDA) and its loader."""
