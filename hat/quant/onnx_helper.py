"""ONNX export of each stage's model (FAQ 2.3 Q3), as the reference toolchain's onnx_helper names it:

    export_to_onnx(float_or_qat_model, example_inputs, "model.onnx")      # QAT: fake quant as Q/DQ pairs
    export_quantized_onnx(quantized_model, example_inputs, "model.onnx")  # the integer program in QDQ form

Both write a checked ONNX file (opset 21, any batch size) that onnxruntime runs; they need `onnx` and `onnxscript`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from hat.errors import OnnxExportError
from hat.ops.onnx import OPSET
from hat.quant.fake_quantize import frozen_for_export



def export_to_onnx(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
                   path: Union[str, os.PathLike]) -> Path:
    """A float or QAT model (eval mode; QAT in validation state, each fake quant a QuantizeLinear ->
    DequantizeLinear pair) -> ONNX at `path`. The model is left as it was."""
    from hat.ops.onnx import onnx_translations  # loads the custom ops' ONNX forms

    inputs = _as_tuple(example_inputs)
    batch = torch.export.Dim("batch", min=1)
    with frozen_for_export(model), _quiet():
        with torch.no_grad():
            result = model(*inputs)
        names = list(result) if isinstance(result, dict) else None  # a dict's keys name the ONNX outputs, in order
        try:
            program = torch.onnx.export(model, inputs, dynamo=True, custom_translation_table=onnx_translations(),
                                        opset_version=OPSET, dynamic_shapes=tuple({0: batch} for _ in inputs),
                                        output_names=names, verbose=False)
        except Exception as exc:  # torch.export's many error types: all mean the forward could not be traced
            reason = " ".join(str(exc).split())[:400]
            raise OnnxExportError(f"{type(model).__name__} could not be exported to ONNX: {reason}. The forward must "
                                  f"be traceable for any batch size: no Python branch on tensor values, no loss or "
                                  f"target inside it (call the model with inputs only)") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    _check(path)
    return path


def export_quantized_onnx(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
                          path: Union[str, os.PathLike], march: str = "bayes") -> Path:
    """A quantized model (hat.quant.convert) -> its integer program (backend.compile: the model must be
    deployable) -> ONNX in QuantizeLinear/DequantizeLinear form at `path`."""
    import onnx

    from hat import backend  # the one call of quant into the layer above: compile, then translate the program
    from hat.backend.j5.onnx_qdq import program_to_onnx

    program = backend.compile(model, _as_tuple(example_inputs), march=march)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(program_to_onnx(program, model), str(path))
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs each of its passes at INFO: keep the user's log to what matters."""
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
