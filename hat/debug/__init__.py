"""Quantization debugging: per-layer similarity along the pipeline, sensitivity analysis, model summary.

The command line is tools/debug_quant.py (hat/debug/cli.py); the functions work on any models too.
"""
from hat.debug.sensitivity import SensitivityReport, layer_precision, quantized_layers, sensitivity
from hat.debug.similarity import SimilarityReport, layer_similarity
from hat.debug.summary import ModelSummary, model_summary

__all__ = ["SensitivityReport", "layer_precision", "quantized_layers", "sensitivity", "SimilarityReport",
           "layer_similarity", "ModelSummary", "model_summary"]
