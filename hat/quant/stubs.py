"""What a float model holds so it can be quantized: QuantStub (input), DeQuantStub (output), FloatFunctional.

In a float model they are plain ops; prepare_qat swaps them for versions that quantize, dequantize and
observe the output scale of tensor-tensor arithmetic (which needs a scale only a module can learn).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class QuantStub(nn.Module):
    """Marks where float input becomes quantized (the model input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DeQuantStub(nn.Module):
    """Marks where a quantized result becomes float again (the model output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FunctionalMethods:
    """add/sub/mul/add_scalar/mul_scalar/cat/maximum/minimum/matmul as methods that go through the module call, so
    forward hooks (quant.compare, user hooks) see them; subclasses implement `_add`, `_sub`, ...; `forward(op, *args)`."""

    def add(self, x, y):
        return self("add", x, y)

    def sub(self, x, y):
        return self("sub", x, y)

    def mul(self, x, y):
        return self("mul", x, y)

    def add_scalar(self, x, value: float):
        return self("add_scalar", x, value)

    def mul_scalar(self, x, value: float):
        return self("mul_scalar", x, value)

    def cat(self, tensors: Sequence, dim: int = 0):
        return self("cat", list(tensors), dim)

    def maximum(self, x, y):
        return self("maximum", x, y)

    def minimum(self, x, y):
        return self("minimum", x, y)

    def matmul(self, x, y):
        return self("matmul", x, y)

    def forward(self, op: str, *args):
        return getattr(self, f"_{op}")(*args)


class FloatFunctional(FunctionalMethods, nn.Module):
    """Tensor-tensor arithmetic as a module: `self.f = FloatFunctional()`, then `self.f.add(x, y)`."""

    def _add(self, x, y):
        return x + y

    def _sub(self, x, y):
        return x - y

    def _mul(self, x, y):
        return x * y

    def _add_scalar(self, x, value: float):
        return x + value

    def _mul_scalar(self, x, value: float):
        return x * value

    def _cat(self, tensors: Sequence, dim: int = 0):
        return torch.cat(tensors, dim)

    def _maximum(self, x, y):
        return torch.maximum(x, y)

    def _minimum(self, x, y):
        return torch.minimum(x, y)

    def _matmul(self, x, y):
        return torch.matmul(x, y)
