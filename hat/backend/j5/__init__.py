"""The J5 ("bayes") backend: tracing a quantized model into a program, the .hir file, the checker, ONNX QDQ."""
