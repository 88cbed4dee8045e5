"""The operator table: each nonlinear element-wise op defined once, as data that prepare, fx, QAT, convert, the
checker and ONNX export read.

An entry says what the op computes (`fn`, in float; QAT runs it and fake-quantizes the output, convert tabulates it
in float64 into the integer look-up tables of hat/integer/lut.py), which torch modules, functions and Tensor
methods are this op (with their arguments), whether it is odd (tables then cover x >= 0 and mirror), its ONNX
operator, and the input range its tables need when the quantized input range is wider than f can use.
Adding an element-wise op = one entry here (+ its row in the parametrized test).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


OnnxForm = Callable[[Any, str, dict], str]  # (graph builder with .op/.const, float input name, arguments) -> output


@dataclass(frozen=True)
class Elementwise:
    """One nonlinear element-wise op y = f(x; arguments)."""

    name: str
    fn: Callable[..., torch.Tensor]  # fn(x, **arguments): float32 in QAT, float64 when tables are built
    modules: tuple[type, ...] = ()  # nn modules that are this op
    functions: tuple[Callable, ...] = ()  # torch functions / Tensor methods that are this op (x first)
    arguments: dict[str, Any] = field(default_factory=dict)  # name -> default (module attributes, function kwargs)
    odd: bool = False  # f(-x) = -f(x): tables cover x >= 0
    onnx: Optional[OnnxForm] = None  # f in float ONNX operators (between DequantizeLinear and QuantizeLinear)

    def __call__(self, x: torch.Tensor, **arguments: Any) -> torch.Tensor:
        return self.fn(x, **{**self.arguments, **arguments})

    def module_arguments(self, module: nn.Module) -> dict[str, Any]:
        """The entry's arguments as an nn module of this op holds them (e.g. LeakyReLU's negative_slope)."""
        return {name: getattr(module, name) for name in self.arguments if hasattr(module, name)}


def _onnx(op_type: str, **attributes: Callable[[dict], Any]) -> OnnxForm:
    """One ONNX operator on x, its attributes computed from the entry's arguments."""
    return lambda g, x, args: g.op(op_type, [x], **{k: f(args) for k, f in attributes.items()})


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(x)  # 1/0 = inf: saturated by the table


def _pow(x: torch.Tensor, exponent: float = 2.0) -> torch.Tensor:
    return torch.pow(x, exponent)


def _softplus(x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    return F.softplus(x, beta, threshold)


OPS: tuple[Elementwise, ...] = (
    Elementwise("sigmoid", torch.sigmoid, (nn.Sigmoid,), (torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid),
                onnx=_onnx("Sigmoid")),
    Elementwise("tanh", torch.tanh, (nn.Tanh,), (torch.tanh, F.tanh, torch.Tensor.tanh), odd=True,
                onnx=_onnx("Tanh")),
    Elementwise("silu", F.silu, (nn.SiLU,), (F.silu,), onnx=lambda g, x, a: g.op("Mul", [x, g.op("Sigmoid", [x])])),
    Elementwise("hardswish", F.hardswish, (nn.Hardswish,), (F.hardswish,), onnx=_onnx("HardSwish")),
    Elementwise("hardsigmoid", F.hardsigmoid, (nn.Hardsigmoid,), (F.hardsigmoid,),
                onnx=_onnx("HardSigmoid", alpha=lambda a: 1 / 6, beta=lambda a: 0.5)),
    Elementwise("gelu", F.gelu, onnx=_onnx("Gelu")),  # nn.GELU / F.gelu: here or gelu_tanh by `approximate`
    Elementwise("gelu_tanh", _gelu_tanh, onnx=_onnx("Gelu", approximate=lambda a: "tanh")),
    Elementwise("exp", torch.exp, (), (torch.exp, torch.Tensor.exp), onnx=_onnx("Exp")),
    Elementwise("log", torch.log, (), (torch.log, torch.Tensor.log), onnx=_onnx("Log")),
    Elementwise("reciprocal", _reciprocal, (), (torch.reciprocal, torch.Tensor.reciprocal), odd=True,
                onnx=_onnx("Reciprocal")),
    Elementwise("sqrt", torch.sqrt, (), (torch.sqrt, torch.Tensor.sqrt), onnx=_onnx("Sqrt")),
    Elementwise("rsqrt", torch.rsqrt, (), (torch.rsqrt, torch.Tensor.rsqrt),
                onnx=lambda g, x, a: g.op("Reciprocal", [g.op("Sqrt", [x])])),
    Elementwise("pow", _pow, arguments={"exponent": 2.0},
                onnx=lambda g, x, a: g.op("Pow", [x, g.const(float(a["exponent"]), "float32")])),
    Elementwise("leaky_relu", F.leaky_relu, (nn.LeakyReLU,), (F.leaky_relu,), arguments={"negative_slope": 0.01},
                onnx=_onnx("LeakyRelu", alpha=lambda a: float(a["negative_slope"]))),
    Elementwise("elu", F.elu, (nn.ELU,), (F.elu,), arguments={"alpha": 1.0},
                onnx=_onnx("Elu", alpha=lambda a: float(a["alpha"]))),
    Elementwise("softplus", _softplus, (nn.Softplus,), (F.softplus,), arguments={"beta": 1.0, "threshold": 20.0},
                onnx=lambda g, x, a: g.op("Div", [g.op("Softplus", [g.op("Mul", [x, g.const(float(a["beta"]),
                                                                                              "float32")])]),
                                                  g.const(float(a["beta"]), "float32")])),
    Elementwise("mish", F.mish, (nn.Mish,), (F.mish,), onnx=_onnx("Mish")),
)
BY_NAME: dict[str, Elementwise] = {op.name: op for op in OPS}


def gelu_entry(approximate: str = "none") -> Elementwise:
    """nn.GELU / F.gelu: the erf form or the tanh form."""
    return BY_NAME["gelu_tanh" if approximate == "tanh" else "gelu"]


def reference(op: Elementwise, x: torch.Tensor, **arguments: Any) -> torch.Tensor:
    """f in float64, the ground truth tables are measured against."""
    return op(x.double(), **arguments)

