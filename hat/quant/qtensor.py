"""QTensor: a quantized activation = data + symmetric per-tensor scale + dtype (qint8, qint16, qint32).

Two modes share one set of rules:
- QAT: `data` is float, the real values on the grid (q * scale), and carries gradients;
- quantized: `data` holds the integers q (torch int8/int16/int32).
Ops whose result stays on the input's grid (relu, max pool, reshape, slicing, cat of equal scales, `x + 1e-4`,
`-x`, `1 - x`, `x * 2`) work directly and identically in both modes. Ops that need a new output scale (adding two
QTensors, ...) need a module that observes that scale: FloatFunctional, which prepare_qat_fx inserts for you.
"""
from __future__ import annotations

import contextlib
import logging

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from hat.integer import fast, kernels, recording
from hat.integer.arith import round_half_up
from hat.integer.profile import TORCH_DTYPES, Profile, qrange
from hat.errors import HatError
from hat.quant import optable

_HANDLERS: dict[Callable, Callable] = {}


class QuantizationError(HatError, RuntimeError):
    """A model does something quantized arithmetic cannot express; the message says what to change."""


class QTensor:
    """`profile`: the march whose arithmetic made it (the QuantStub's qconfig), which every op on it follows."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: str, producer: str = "", axis: int = 1, *,
                 profile: Profile):
        qrange(dtype)  # validates the dtype
        if scale.numel() > 1 and dtype != "qint32":
            raise QuantizationError("only a high-precision (qint32) QTensor has a per-channel scale")
        self.data, self.dtype, self.producer, self.profile = data, dtype, producer, profile
        self.scale = scale if scale.dim() == 1 else scale.reshape(-1)
        self.axis = axis  # the channel axis of a per-channel scale

    # --- what it is -----------------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return not self.data.is_floating_point()

    @property
    def step(self) -> torch.Tensor | int:
        """One grid step in `data` units: the scale in QAT mode, 1 in quantized mode."""
        return 1 if self.is_quantized else self.scale.detach()

    def dequantize(self) -> torch.Tensor:
        return kernels.dequantize(self.data, scale=self.scale, axis=self.axis) if self.is_quantized else self.data

    def int_repr(self) -> torch.Tensor:
        return self.data if self.is_quantized else round_half_up(self.data.detach() / self.scale.detach()).long()

    def with_data(self, data: torch.Tensor) -> "QTensor":
        return QTensor(data, self.scale, self.dtype, self.producer, profile=self.profile)

    def clamp_to_range(self, data: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.dtype)
        if self.is_quantized:
            return data.clamp(qmin, qmax).to(TORCH_DTYPES[self.dtype])
        return torch.minimum(torch.maximum(data, qmin * self.step), qmax * self.step)

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    device = property(lambda self: self.data.device)

    def size(self, *dim: int):
        return self.data.size(*dim)

    def dim(self) -> int:
        return self.data.dim()

    def __len__(self) -> int:
        return len(self.data)

    # x.new_zeros(shape) and co. read only the device: a plain float tensor (a mask built from shapes), not data
    def new_zeros(self, *size: Any, **options: Any) -> torch.Tensor:
        return torch.zeros(*size, **self._new_options(options))

    def new_ones(self, *size: Any, **options: Any) -> torch.Tensor:
        return torch.ones(*size, **self._new_options(options))

    def new_full(self, size: Any, fill_value: Any, **options: Any) -> torch.Tensor:
        return torch.full(size, fill_value, **self._new_options(options))

    def new_empty(self, *size: Any, **options: Any) -> torch.Tensor:
        return torch.empty(*size, **self._new_options(options))

    def _new_options(self, options: dict) -> dict:
        return {"dtype": torch.float32, "device": self.device, **{k: v for k, v in options.items() if v is not None}}

    def __bool__(self) -> bool:
        raise QuantizationError(f"control flow (if/while/assert) on the value of a QTensor from "
                                f"'{self.producer or '?'}': a compiled model has one path (FAQ 2.4 Q10); remove the "
                                f"data-dependent branch")

    def __repr__(self) -> str:
        mode = "quantized" if self.is_quantized else "qat"
        return f"QTensor({mode}, dtype={self.dtype}, scale={self.scale.detach().tolist()}, data={self.data})"

    # --- python operators: constants keep the grid; two QTensors need a FloatFunctional ------------------------
    def __add__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)):
            steps = self._plain_op()._const_steps(other)
            if self.is_quantized:
                return apply("add_steps", [self], {"steps": int(steps)}, self.scale, self.dtype, self.producer)
            _warn_if_saturating(self, self.data + steps, other)
            return self.with_data(self.clamp_to_range(self.data + steps))
        raise _needs_float_functional("+", "add")

    __radd__ = __add__

    def __sub__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)):
            return self + (-other)
        raise _needs_float_functional("-", "add (with -1 * y)")

    def __rsub__(self, other: Any) -> "QTensor":
        return (-self) + other

    def __neg__(self) -> "QTensor":
        if self._plain_op().is_quantized:
            return apply("add_steps", [self], {"steps": 0, "negate": True}, self.scale, self.dtype, self.producer)
        return self.with_data(self.clamp_to_range(-self.data))

    def __mul__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)):
            if other == 0:
                return self._plain_op()._on_grid("clip", {"low": 0, "high": 0}, lambda d: torch.zeros_like(d))
            base = -self if other < 0 else self._plain_op()
            if self.is_quantized:  # the integers stay, the scale grows
                return apply("identity", [base], {}, self.scale * abs(other), self.dtype, self.producer)
            return QTensor(base.data * abs(other), self.scale * abs(other), self.dtype, self.producer,
                           profile=self.profile)
        raise _needs_float_functional("*", "mul")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)) and other != 0:
            return self * (1.0 / other)
        if isinstance(other, (int, float)):
            raise QuantizationError("dividing a QTensor by zero")
        raise QuantizationError(
            "'/' by a tensor needs a reciprocal table and an output scale, which only modules can learn: prepare the "
            "model with prepare_qat_fx, which rewrites x / y into x * reciprocal(y), or hold self.reciprocal = "
            "hat.quant.ElementwiseOp('reciprocal') and self.f = FloatFunctional() in __init__ and compute "
            "self.f.mul(x, self.reciprocal(y)) in forward (a QTensor divides directly only by a non-zero Python "
            "number)")

    def __getitem__(self, index: Any) -> "QTensor":
        try:
            items = kernels.encode_index(index)
        except TypeError as exc:
            raise QuantizationError(f"indexing a QTensor (from '{self.producer or '?'}') with a {exc}: only ints, "
                                    f"slices, None and ... are supported (x[:, 1:3], x[0]); gather in float before "
                                    f"the QuantStub instead") from None
        return self._plain_op()._on_grid("index", {"items": items}, lambda d: d[index])

    def _on_grid(self, op: str, params: dict, qat: Callable[[torch.Tensor], torch.Tensor]) -> "QTensor":
        """An op that keeps the grid: kernel `op` on integers, `qat` on the QAT-mode data."""
        if self.is_quantized:
            return apply(op, [self], params, self.scale, self.dtype, self.producer)
        return self.with_data(qat(self.data))

    def _const_steps(self, value: float) -> torch.Tensor:
        qmin, qmax = qrange(self.dtype)
        steps = round_half_up(torch.as_tensor(value, dtype=torch.float64) / self.scale.detach().double())
        steps = steps.clamp(qmin - qmax, qmax - qmin)  # anything beyond saturates anyway; never wraps in int32
        return steps.to(torch.int32) if self.is_quantized else steps.float() * self.step

    def _plain_op(self, consumer: str = "") -> "QTensor":
        if self.dtype == "qint32":
            consumer = consumer or (recording.active().module if recording.active() else "")
            by = f"module '{consumer}'" if consumer else "an op"
            raise QuantizationError(
                f"module '{self.producer or '?'}' has a high-precision (qint32) output, but {by} uses it (FAQ 2.4 "
                f"Q9); only a DeQuantStub at the model output may consume it. Give '{self.producer or 'that module'}' "
                f"an int8/int16 qconfig (get_default_qat_qconfig) instead of get_default_qat_out_qconfig")
        return self

    # --- torch functions ----------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is None and func in _MODULE_FUNCTIONS:
            raise _needs_module(*_MODULE_FUNCTIONS[func])
        if handler is None:
            name = getattr(func, "__name__", str(func))
            producer = next((a.producer for a in args if isinstance(a, QTensor) and a.producer), "?")
            raise QuantizationError(
                f"{name} is not supported on a QTensor (it gets the output of module '{producer}'). Supported: "
                f"{', '.join(supported_ops())}. Either compute it in float (DeQuantStub before, QuantStub after) "
                f"or use a FloatFunctional method")
        return handler(*args, **(kwargs or {}))

    def __getattr__(self, name: str):
        method = getattr(torch.Tensor, name, None)
        if method in _HANDLERS:
            return lambda *args, **kwargs: _HANDLERS[method](self, *args, **kwargs)
        if method in _MODULE_FUNCTIONS:
            raise _needs_module(*_MODULE_FUNCTIONS[method])
        if method is not None and not name.startswith("_"):
            raise QuantizationError(f"Tensor.{name} is not supported on a QTensor (from '{self.producer or '?'}'). "
                                    f"Supported: {', '.join(supported_ops())}. Compute it in float (DeQuantStub "
                                    f"before, QuantStub after) or use a FloatFunctional method")
        raise AttributeError(f"QTensor has no attribute '{name}'")


def _warn_if_saturating(x: QTensor, shifted: torch.Tensor, value: float) -> None:
    """x + c keeps x's scale (as on the device): say so once per producer when that clips the sum."""
    qmax = qrange(x.dtype)[1]
    if x.producer in _SATURATION_WARNED or x.is_quantized:
        return
    clipped = float((shifted.detach().abs() > (qmax + 0.5) * x.step).float().mean())
    if clipped > 0.01:
        _SATURATION_WARNED.add(x.producer)
        logging.getLogger("hat").warning(
            "x + %g on the output of '%s' keeps its scale, so %.0f%% of the sums saturate at +-%.4g: use "
            "FloatFunctional.add_scalar (an observed scale; prepare_qat_fx does it for you)", value,
            x.producer or "?", 100 * clipped, qmax * float(x.scale))


_SATURATION_WARNED: set[str] = set()


def _needs_float_functional(symbol: str, method: str) -> QuantizationError:
    return QuantizationError(
        f"'{symbol}' between a QTensor and a tensor needs an output scale, which only a module can learn: use "
        f"self.f = FloatFunctional() in __init__ and self.f.{method}(x, y) in forward, or prepare the model with "
        f"prepare_qat_fx, which rewrites it for you")


def _needs_module(name: str, module: str) -> QuantizationError:
    return QuantizationError(
        f"{name} on a QTensor needs an output scale (and tables) that only a module can learn: hold {module} in "
        f"__init__ and call it in forward (prepare_qat gives it an output fake quant), or prepare the model with "
        f"prepare_qat_fx, which rewrites the call for you")


def _module_of(op: optable.Elementwise) -> str:
    return f"nn.{op.modules[0].__name__}()" if op.modules else f"hat.quant.ElementwiseOp('{op.name}')"


# torch functions that are a module op: the error names the module to hold instead
_MODULE_FUNCTIONS = {**{f: (op.name, _module_of(op)) for op in optable.OPS for f in op.functions},
                     **{f: ("softmax", "nn.Softmax(dim=...)") for f in (F.softmax, torch.softmax, torch.Tensor.softmax)},
                     **{f: ("log_softmax", "nn.LogSoftmax(dim=...)")
                        for f in (F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax)},
                     **{f: ("prelu", "nn.PReLU()") for f in (F.prelu, torch.prelu, torch.Tensor.prelu)}}


def supported_ops() -> list[str]:
    return sorted({getattr(f, "__name__", str(f)) for f in _HANDLERS})


def _register(*funcs: Callable):
    def add(handler: Callable) -> Callable:
        for func in funcs:
            _HANDLERS[func] = handler
        return handler

    return add


class NamedQuantModule(torch.nn.Module):
    """Base of the QAT and quantized modules: knows its name in the model, for messages about its inputs."""

    hat_name = ""

    def _qinputs(self, *xs) -> list[QTensor]:
        return [as_qtensor(x, self.hat_name)._plain_op(self.hat_name) for x in xs]


def apply(op: str, inputs: Sequence[Any], params: dict, scale: torch.Tensor, dtype: str, producer: str = "",
          axis: int = 1, profile: Profile | None = None, execute: Optional[Callable] = None) -> QTensor:
    """Run integer kernel `op` (hat.integer.kernels) on the inputs' data: every quantized-mode op goes through
    here, so a tracer (backend.compile) records exactly what ran, with the parameters it ran with. `execute`, when
    given, is the op's fast executor for these params (hat.integer.fast.prepare; bit-exact with the kernel). The
    output follows `profile`, by default its first QTensor input's."""
    profile = profile or next(x.profile for x in inputs if isinstance(x, QTensor))
    tracer = recording.active()
    run = execute or fast.prepare(op, params)
    with tracer.kernel() if tracer else contextlib.nullcontext():
        data = run(*(x.data if isinstance(x, QTensor) else x for x in inputs))
    out = QTensor(data, scale, dtype, producer, axis, profile=profile)
    if tracer:
        tracer.record(op, inputs, out, params)
    return out


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: str, producer: str = "", *, profile: Profile) -> QTensor:
    """Float -> quantized-mode QTensor of march `profile`, with its rounding and saturation."""
    return apply("quantize", [x], {"scale": scale, "dtype": dtype}, scale, dtype, producer, profile=profile)


def dequantize_output(x: Any, stub: str = "") -> Any:
    """What a DeQuantStub does: float from a QTensor (recorded as the program's `dequantize`), else unchanged.
    The float result remembers the stub, so a quantized module fed with it can say which stub it was."""
    if not isinstance(x, QTensor):
        return x
    if not x.is_quantized:
        out = x.dequantize()
        out.hat_dequantized_by = stub
        return out
    tracer = recording.active()
    params = {"scale": x.scale, "axis": x.axis}
    with tracer.kernel() if tracer else contextlib.nullcontext():
        out = kernels.dequantize(x.data, **params)
    if tracer:
        tracer.record("dequantize", [x], out, params)
    out.hat_dequantized_by = stub
    return out


def dequantize(x: Any) -> Any:
    return x.dequantize() if isinstance(x, QTensor) else x


def as_qtensor(x: Any, module: str) -> QTensor:
    stub = getattr(x, "hat_dequantized_by", None)
    if stub is not None:
        raise QuantizationError(f"module '{module}' receives the float output of DeQuantStub '{stub}' (a conv + "
                                f"dequant + conv structure, FAQ 2.4 Q9): a DeQuantStub belongs at the model output "
                                f"only; remove it, or put a QuantStub between '{stub}' and '{module}'")
    if not isinstance(x, QTensor):
        raise QuantizationError(f"module '{module}' received a float tensor: its input is not quantized. Put a "
                                f"QuantStub in front of it (the model input) or give the module before it a qconfig")
    return x

