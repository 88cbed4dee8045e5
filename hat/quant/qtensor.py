"""QTensor: a quantized activation = data + symmetric per-tensor scale + dtype (qint8, qint16, qint32).

Two modes share one set of rules:
- QAT: `data` is float, the real values on the grid (q * scale), and carries gradients;
- quantized: `data` holds the integers q (torch int8/int16/int32).
Ops whose result stays on the input's grid (relu, max pool, reshape, slicing, cat of equal scales, `x + 1e-4`,
`-x`, `1 - x`, `x * 2`) work directly and identically in both modes. Ops that need a new output scale (adding two
QTensors, ...) need a module that observes that scale: FloatFunctional, which prepare_qat_fx inserts for you.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from hat.backend.j5.arith import multiplier_and_shift, requantize, round_half_up
from hat.quant.march import current_profile

TORCH_DTYPES = {"qint8": torch.int8, "qint16": torch.int16, "qint32": torch.int32}
_HANDLERS: dict[Callable, Callable] = {}


def along_axis(values: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """Shape per-channel `values` ([C]) to broadcast along `axis` of `like`."""
    shape = [1] * like.ndim
    shape[axis] = -1
    return values.reshape(shape)


class QuantizationError(RuntimeError):
    """A model does something quantized arithmetic cannot express; the message says what to change."""


class QTensor:
    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: str, producer: str = "", axis: int = 1):
        current_profile().qrange(dtype)  # validates the dtype
        if scale.numel() > 1 and dtype != "qint32":
            raise QuantizationError("only a high-precision (qint32) QTensor has a per-channel scale")
        self.data, self.dtype, self.producer = data, dtype, producer
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
        if not self.is_quantized:
            return self.data
        scale = along_axis(self.scale, self.data, self.axis) if self.scale.numel() > 1 else self.scale
        return (self.data.double() * scale.double()).float()  # float64 keeps int32 values exact

    def int_repr(self) -> torch.Tensor:
        return self.data if self.is_quantized else round_half_up(self.data.detach() / self.scale.detach()).long()

    def with_data(self, data: torch.Tensor) -> "QTensor":
        return QTensor(data, self.scale, self.dtype, self.producer)

    def clamp_to_range(self, data: torch.Tensor) -> torch.Tensor:
        qmin, qmax = current_profile().qrange(self.dtype)
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

    def __repr__(self) -> str:
        mode = "quantized" if self.is_quantized else "qat"
        return f"QTensor({mode}, dtype={self.dtype}, scale={self.scale.detach().tolist()}, data={self.data})"

    # --- python operators: constants keep the grid; two QTensors need a FloatFunctional ------------------------
    def __add__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)):
            return self._plain_op().with_data(self.clamp_to_range(self._wide() + self._const_steps(other)))
        raise _needs_float_functional("+", "add")

    __radd__ = __add__

    def __sub__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)):
            return self + (-other)
        raise _needs_float_functional("-", "add (with -1 * y)")

    def __rsub__(self, other: Any) -> "QTensor":
        return (-self) + other

    def __neg__(self) -> "QTensor":
        return self._plain_op().with_data(self.clamp_to_range(-self._wide()))

    def __mul__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)):
            if other == 0:
                return self.with_data(torch.zeros_like(self.data))
            base = -self if other < 0 else self._plain_op()
            data = base.data if self.is_quantized else base.data * abs(other)
            return QTensor(data, self.scale * abs(other), self.dtype, self.producer)
        raise _needs_float_functional("*", "mul")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> "QTensor":
        if isinstance(other, (int, float)) and other != 0:
            return self * (1.0 / other)
        raise QuantizationError("dividing a QTensor is only defined by a non-zero Python number")

    def __getitem__(self, index: Any) -> "QTensor":
        return self._plain_op().with_data(self.data[index])

    def _const_steps(self, value: float) -> torch.Tensor:
        qmin, qmax = current_profile().qrange(self.dtype)
        steps = round_half_up(torch.as_tensor(value, dtype=torch.float64) / self.scale.detach().double())
        steps = steps.clamp(qmin - qmax, qmax - qmin)  # anything beyond saturates anyway; never wraps in int32
        return steps.to(torch.int32) if self.is_quantized else steps.float() * self.step

    def _wide(self) -> torch.Tensor:
        """Integer data widened to int32 so arithmetic saturates instead of wrapping."""
        return self.data.to(torch.int32) if self.is_quantized else self.data

    def _plain_op(self) -> "QTensor":
        if self.dtype == "qint32":
            raise QuantizationError(
                f"module '{self.producer or '?'}' has a high-precision (qint32) output, but an op uses it; only a "
                f"DeQuantStub at the model output may consume it. Give '{self.producer or 'that module'}' an "
                f"int8/int16 qconfig (get_default_qat_qconfig) instead of get_default_qat_out_qconfig")
        return self

    # --- torch functions ----------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is None:
            name = getattr(func, "__name__", str(func))
            raise QuantizationError(
                f"{name} is not supported on a QTensor. Supported: {', '.join(supported_ops())}. Either "
                f"compute it in float (DeQuantStub before, QuantStub after) or use a FloatFunctional method")
        return handler(*args, **(kwargs or {}))

    def __getattr__(self, name: str):
        method = getattr(torch.Tensor, name, None)
        if method in _HANDLERS:
            return lambda *args, **kwargs: _HANDLERS[method](self, *args, **kwargs)
        if method is not None and not name.startswith("_"):
            raise QuantizationError(f"Tensor.{name} is not supported on a QTensor (from '{self.producer or '?'}'). "
                                    f"Supported: {', '.join(supported_ops())}. Compute it in float (DeQuantStub "
                                    f"before, QuantStub after) or use a FloatFunctional method")
        raise AttributeError(f"QTensor has no attribute '{name}'")


def _needs_float_functional(symbol: str, method: str) -> QuantizationError:
    return QuantizationError(
        f"'{symbol}' between a QTensor and a tensor needs an output scale, which only a module can learn: use "
        f"self.f = FloatFunctional() in __init__ and self.f.{method}(x, y) in forward, or prepare the model with "
        f"prepare_qat_fx, which rewrites it for you")


def supported_ops() -> list[str]:
    return sorted({getattr(f, "__name__", str(f)) for f in _HANDLERS})


def _register(*funcs: Callable):
    def add(handler: Callable) -> Callable:
        for func in funcs:
            _HANDLERS[func] = handler
        return handler

    return add


def _same_grid(fn: Callable) -> Callable:
    """An op that maps grid values to grid values (and ints to ints): apply it to `data` in either mode."""

    def handler(x: QTensor, *args, **kwargs) -> QTensor:
        kwargs.pop("inplace", None)
        return x._plain_op().with_data(fn(x.data, *args, **kwargs))

    return handler


_SAME_GRID_METHODS = ("flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous")
for _name in _SAME_GRID_METHODS:  # torch.reshape(t, shape) and t.reshape(*shape) both end as data.reshape(...)
    _funcs = [getattr(torch.Tensor, _name)] + ([getattr(torch, _name)] if hasattr(torch, _name) else [])
    _register(*_funcs)(_same_grid(lambda d, *a, _name=_name, **k: getattr(d, _name)(*a, **k)))
_register(F.relu, torch.relu, torch.Tensor.relu)(_same_grid(lambda d: d.clamp(min=0)))
_register(F.max_pool2d, torch.max_pool2d)(_same_grid(F.max_pool2d))
_register(F.dropout)(_same_grid(lambda d, p=0.5, training=False: d))  # dropout would leave the grid: off


@_register(F.hardtanh, F.relu6)
def _clip(x: QTensor, min_val: float = 0.0, max_val: float = 6.0, inplace: bool = False) -> QTensor:
    x = x._plain_op()
    low, high = x._const_steps(min_val), x._const_steps(max_val)
    return x.with_data(x.clamp_to_range(torch.minimum(torch.maximum(x._wide(), low), high)))


@_register(F.interpolate)
def _interpolate(x: QTensor, size=None, scale_factor=None, mode: str = "nearest", **kwargs) -> QTensor:
    if mode != "nearest":
        raise QuantizationError(f"interpolate(mode='{mode}') on a QTensor needs requantization; use mode='nearest'")
    data = x._plain_op().data
    out = F.interpolate(data.float() if x.is_quantized else data, size=size, scale_factor=scale_factor, mode=mode)
    return x.with_data(out.to(data.dtype))


@_register(torch.cat, torch.concat)
def _cat(tensors, dim: int = 0) -> QTensor:
    first = tensors[0]
    if not all(isinstance(t, QTensor) for t in tensors) or any(
            t.dtype != first.dtype or not torch.equal(t.scale.detach(), first.scale.detach()) for t in tensors):
        raise _needs_float_functional("torch.cat", "cat")
    return first._plain_op().with_data(torch.cat([t.data for t in tensors], dim))


@_register(F.adaptive_avg_pool2d)
def _global_average(x: QTensor, output_size) -> QTensor:
    if output_size not in (1, (1, 1), [1, 1]):
        raise QuantizationError(f"adaptive_avg_pool2d on a QTensor supports output size 1 (global), got {output_size}")
    area = x.shape[-1] * x.shape[-2]
    sums = lambda d: d.sum(dim=(-2, -1), keepdim=True)  # noqa: E731
    return _requantized_mean(x, sums, area)


@_register(F.avg_pool2d)
def _average(x: QTensor, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None) -> QTensor:
    if ceil_mode or (padding and not count_include_pad):
        raise QuantizationError("avg_pool2d on a QTensor needs windows of one size: ceil_mode=False, and "
                                "count_include_pad=True when padding")
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    area = divisor_override or k[0] * k[1]
    sums = lambda d: F.avg_pool2d(d, k, stride, padding, ceil_mode, True, divisor_override=1)  # noqa: E731
    return _requantized_mean(x, sums, area)


def _requantized_mean(x: QTensor, window_sum: Callable, area: int) -> QTensor:
    """Window sums (int32 on the device) times 1/area via the J5 multiplier and shift, on the input's scale.

    QAT applies the same effective ratio m / 2^n and rounding, so both modes agree."""
    x = x._plain_op()
    ratio = torch.tensor(1.0 / area, dtype=torch.float64)
    if x.is_quantized:
        sums = torch.round(window_sum(x.data.double())).long()  # exact: integer sums in float64
        return x.with_data(requantize(sums, ratio, x.dtype).to(TORCH_DTYPES[x.dtype]))
    multiplier, shift = multiplier_and_shift(ratio)
    effective = float(multiplier) / 2.0 ** int(shift)
    steps = _ste_round(window_sum(x.data) / x.step) * effective  # integer sums first, as on the device
    return x.with_data(_ste_round(steps) * x.step)


def _ste_round(v: torch.Tensor) -> torch.Tensor:
    """Round half up forward, identity backward."""
    return v + (round_half_up(v) - v).detach()


class NamedQuantModule(torch.nn.Module):
    """Base of the QAT and quantized modules: knows its name in the model, for messages about its inputs."""

    hat_name = ""

    def _qinputs(self, *xs) -> list[QTensor]:
        return [as_qtensor(x, self.hat_name)._plain_op() for x in xs]


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: str, producer: str = "") -> QTensor:
    """Float -> quantized-mode QTensor with the march's rounding and saturation."""
    qmin, qmax = current_profile().qrange(dtype)
    q = round_half_up(x / scale).clamp(qmin, qmax).to(TORCH_DTYPES[dtype])
    return QTensor(q, scale, dtype, producer)


def dequantize(x: Any) -> Any:
    return x.dequantize() if isinstance(x, QTensor) else x


def as_qtensor(x: Any, module: str) -> QTensor:
    if not isinstance(x, QTensor):
        raise QuantizationError(f"module '{module}' received a float tensor: its input is not quantized. Put a "
                                f"QuantStub in front of it (the model input) or give the module before it a qconfig")
    return x

