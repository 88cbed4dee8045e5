"""Fake quantization: FakeQuantize (observer scale, straight-through), LSQ (learned scale), PACT (learned clip).

Forward is quantize -> dequantize on the march's integer grid with its rounding (J5: half up). The flags
`fake_quant_enabled` / `observer_enabled` are uint8 buffers, printed as in the reference toolchain, and are
set together by `set_fake_quant_state`.
"""
from __future__ import annotations

import math
from typing import Optional, Type

import torch
from torch import nn

from hat.backend.j5.arith import round_to_grid
from hat.quant.march import current_profile
from hat.quant.observer import EPS, MinMaxObserver, MovingAverageMinMaxObserver
from hat.quant.qtensor import along_axis


def _channel_view(t: torch.Tensor, x: torch.Tensor, ch_axis: Optional[int]) -> torch.Tensor:
    """Broadcast a per-channel [C] tensor along `ch_axis` of x; per-tensor values pass through."""
    return t if ch_axis is None or t.numel() == 1 else along_axis(t, x, ch_axis)


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a buffer or parameter for one of another shape, keeping a parameter a parameter."""
    if name in module._parameters:
        module._parameters[name].data = value
    else:
        setattr(module, name, value)


class _SteFakeQuant(torch.autograd.Function):
    """Straight-through estimator: gradient 1 where the rounded value lies inside [qmin, qmax], else 0."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, rounding):
        q = x / scale
        q = q.add_(0.5).floor_() if rounding == "half_up" else round_to_grid(q, rounding)  # in place: fewer passes
        clamped = q.clamp(qmin, qmax)
        ctx.save_for_backward(clamped == q)  # inside the range
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _LsqFakeQuant(torch.autograd.Function):
    """LSQ (Esser et al., 2020): d/dx = 1 inside the range; d/ds = (round(v) - v) inside, qmin or qmax outside,
    with v = x / s, summed per scale and multiplied by the gradient scale g = 1 / sqrt(N * qmax)."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, rounding, grad_factor, ch_axis):
        v = x / scale
        q = round_to_grid(v.clamp(qmin, qmax), rounding)
        ctx.save_for_backward(v, q)
        ctx.qmin, ctx.qmax, ctx.grad_factor, ctx.ch_axis = qmin, qmax, grad_factor, ch_axis
        ctx.scale_shape = scale.shape
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        v, q = ctx.saved_tensors
        below, above = v < ctx.qmin, v > ctx.qmax
        inside = ~(below | above)
        ds = torch.where(inside, q - v, torch.where(below, float(ctx.qmin), float(ctx.qmax))) * grad
        if ctx.ch_axis is None:
            ds = ds.sum().reshape(1)
        else:
            ds = ds.transpose(0, ctx.ch_axis).reshape(ds.shape[ctx.ch_axis], -1).sum(1)
        return grad * inside, (ds * ctx.grad_factor).view(ctx.scale_shape), None, None, None, None, None


class FakeQuantize(nn.Module):
    """Observer-driven fake quant: the observer's range sets the scale; gradients pass straight through."""

    def __init__(self, observer: Type[MinMaxObserver] = MovingAverageMinMaxObserver, dtype: str = "qint8",
                 ch_axis: Optional[int] = None, rounding: Optional[str] = None, **observer_kwargs):
        super().__init__()
        profile = current_profile()
        self.dtype, self.ch_axis = dtype, ch_axis
        self.quant_min, self.quant_max = profile.qrange(dtype)
        self.rounding = rounding or profile.rounding
        round_to_grid(torch.zeros(1), self.rounding)  # validates the rounding name
        self.activation_post_process = observer(dtype=dtype, ch_axis=ch_axis, **observer_kwargs)
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    @property
    def qscheme(self) -> str:
        return "torch.per_tensor_symmetric" if self.ch_axis is None else "torch.per_channel_symmetric"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0]:
            self.observe(x)
        if not self.fake_quant_enabled[0]:
            return x
        return self.fake_quant(x)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.activation_post_process(x.detach())
        scale = self.activation_post_process.calculate_scale().to(self.scale.device)
        if scale.shape != self.scale.shape:  # per-channel: the channel count is known from the first batch
            _replace(self, "scale", scale)
            _replace(self, "zero_point", torch.zeros(scale.shape, dtype=torch.int32, device=scale.device))
        else:
            self.scale.copy_(scale)

    def current_scale(self) -> torch.Tensor:
        """The scale the fake quant applies now (what convert and QTensors use)."""
        return self.scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        scale = _channel_view(self.scale, x, self.ch_axis).to(x.dtype)
        return _SteFakeQuant.apply(x, scale, self.quant_min, self.quant_max, self.rounding)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):  # per-channel sizes are only known once observed
            if prefix + name in state_dict:
                _replace(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled},\n"
                f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, "
                f"qscheme={self.qscheme}, ch_axis={-1 if self.ch_axis is None else self.ch_axis},\n"
                f"scale={self.scale}, zero_point={self.zero_point}")


class LSQFakeQuantize(FakeQuantize):
    """Learned step size: the scale is a Parameter, initialised by the observer (calibration), then trained."""

    def __init__(self, observer: Type[MinMaxObserver] = MinMaxObserver, dtype: str = "qint8",
                 ch_axis: Optional[int] = None, rounding: Optional[str] = None, **observer_kwargs):
        super().__init__(observer, dtype, ch_axis, rounding, **observer_kwargs)
        del self.scale
        self.scale = nn.Parameter(torch.tensor([1.0]))

    def current_scale(self) -> torch.Tensor:
        return self.scale.detach().clamp(min=EPS)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        per_scale = x.numel() // self.scale.numel()
        grad_factor = 1.0 / math.sqrt(per_scale * self.quant_max)
        scale = _channel_view(self.scale.clamp(min=EPS), x, self.ch_axis).to(x.dtype)
        return _LsqFakeQuant.apply(x, scale, self.quant_min, self.quant_max, self.rounding, grad_factor,
                                   self.ch_axis if self.scale.numel() > 1 else None)


class PACTFakeQuantize(FakeQuantize):
    """PACT (Choi et al., 2018), symmetric: clip to [-alpha, alpha] with a learned alpha, then quantize with
    scale = alpha / ((qmax - qmin) / 2). d/dalpha = +1 above alpha, -1 below -alpha (quantizer straight-through)."""

    def __init__(self, observer: Type[MinMaxObserver] = MinMaxObserver, dtype: str = "qint8",
                 rounding: Optional[str] = None, init_alpha: float = 6.0, **observer_kwargs):
        super().__init__(observer, dtype, None, rounding, **observer_kwargs)
        self.alpha = nn.Parameter(torch.tensor([init_alpha]))
        self.divisor = current_profile().scale_divisor(dtype)

    def observe(self, x: torch.Tensor) -> None:
        self.activation_post_process(x.detach())
        amax = self.activation_post_process.calculate_scale() * self.divisor
        with torch.no_grad():
            self.alpha.copy_(amax.to(self.alpha.device))
            self.scale.copy_(self.alpha / self.divisor)

    def current_scale(self) -> torch.Tensor:
        return (self.alpha.detach() / self.divisor).clamp(min=EPS)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.to(x.dtype)
        clipped = torch.minimum(torch.maximum(x, -alpha), alpha)
        scale = (self.alpha.detach() / self.divisor).clamp(min=EPS)
        self.scale.copy_(scale)
        q = round_to_grid(clipped.detach() / scale, self.rounding).clamp(self.quant_min, self.quant_max) * scale
        return clipped + (q.to(x.dtype) - clipped).detach()


FAKE_QUANT_STATES = {"calibration": (0, 1), "qat": (1, None), "validation": (1, 0)}


def set_fake_quant_state(model: nn.Module, state: str) -> None:
    """calibration: observe only (float forward); qat: fake quant on, observers on for FakeQuantize and off
    for LSQ/PACT (their ranges are learned); validation: fake quant on, observers frozen."""
    if state not in FAKE_QUANT_STATES:
        raise ValueError(f"fake quant state must be one of {', '.join(FAKE_QUANT_STATES)}, got '{state}'")
    fake_quant, observe = FAKE_QUANT_STATES[state]
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            learned = isinstance(module, (LSQFakeQuantize, PACTFakeQuantize))
            module.fake_quant_enabled.fill_(fake_quant)
            module.observer_enabled.fill_(observe if observe is not None else int(not learned))
