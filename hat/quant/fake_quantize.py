"""Fake quantization: FakeQuantize (observer scale, straight-through), LSQ (learned scale), PACT (learned clip).

Forward is quantize -> dequantize on the march's integer grid with its rounding (J5: half up). The flags
`fake_quant_enabled` / `observer_enabled` are uint8 buffers, printed as in the reference toolchain, and are
set together by `set_fake_quant_state`.
"""
from __future__ import annotations

import contextlib

import math
from typing import Iterator, Optional, Type

import torch
from torch import nn

from hat import ops
from hat.ops import reference
from hat.integer.arith import round_to_grid
from hat.integer.profile import get_profile, qrange, scale_divisor
from hat.quant.observer import EPS, MinMaxObserver, MovingAverageMinMaxObserver


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a buffer or parameter for one of another shape, keeping a parameter a parameter."""
    if name in module._parameters:
        module._parameters[name].data = value
    else:
        setattr(module, name, value)


class FakeQuantize(nn.Module):
    """Observer-driven fake quant: the observer's range sets the scale; gradients pass straight through."""

    def __init__(self, observer: Type[MinMaxObserver] = MovingAverageMinMaxObserver, dtype: str = "qint8",
                 ch_axis: Optional[int] = None, rounding: Optional[str] = None, march: str = "bayes",
                 **observer_kwargs):
        super().__init__()
        self.profile = get_profile(march)  # the march whose grid and rounding this fake quant emulates
        self.dtype, self.ch_axis = dtype, ch_axis
        self.quant_min, self.quant_max = qrange(dtype)
        self.rounding = rounding or self.profile.rounding
        reference.is_half_up(self.rounding)  # validates the rounding name
        self.activation_post_process = observer(dtype=dtype, ch_axis=ch_axis, **observer_kwargs)
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    @property
    def qscheme(self) -> str:
        return "torch.per_tensor_symmetric" if self.ch_axis is None else "torch.per_channel_symmetric"

    frozen_state: Optional[tuple[bool, bool]] = None  # set by `frozen_for_export`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observe, quantize = self.frozen_state or (self.observer_enabled.item(), self.fake_quant_enabled.item())
        if observe:
            self.observe(x)
        if not quantize:
            return x
        return self.fake_quant(x)

    def forward_folded(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """fake_quant(weight * factor) / factor, `factor` per output channel (axis 0; a batch norm's gamma / std),
        without any weight-sized product: the observer gets the folded range from the weight's per-channel
        min/max, and the grid step becomes scale / factor. Same values up to float rounding, a third of the
        memory traffic of folding the weight and dividing the conv output back."""
        factor = factor.detach()
        if self._observes_current_weight() and self.observer_enabled.item() and self.fake_quant_enabled.item():
            out, lo, hi, scale = ops.fake_quant_folded(weight, factor, scale_divisor(self.dtype),
                                                       EPS, self.quant_min, self.quant_max, self.rounding)
            with torch.no_grad():  # observer state and scale stay float32 whatever the weight's dtype
                self.activation_post_process.update_range(lo.float(), hi.float())
                self._set_scale(scale.float())
            return out
        if self.observer_enabled.item():
            lo, hi = reference.folded_channel_range(weight.detach(), factor)
            if self.ch_axis is None:
                lo, hi = lo.min(), hi.max()
            self.observe_range(lo, hi)
        if not self.fake_quant_enabled.item():
            return weight
        return self._quantize(weight, reference.folded_step(self._train_scale().to(weight.dtype), factor), 0)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.activation_post_process(x)
        self._refresh_scale()

    @torch.no_grad()
    def observe_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Observe a batch given by its (per-channel) min and max instead of its values."""
        self.activation_post_process.update_range(lo.reshape(-1).float(), hi.reshape(-1).float())
        self._refresh_scale()

    def _refresh_scale(self) -> None:
        self._set_scale(self.activation_post_process.calculate_scale())

    def _set_scale(self, scale: torch.Tensor) -> None:
        if scale.shape != self.scale.shape:  # per-channel: the channel count is known from the first batch
            scale = scale.to(self.scale.device)
            _replace(self, "scale", scale)
            _replace(self, "zero_point", torch.zeros(scale.shape, dtype=torch.int32, device=scale.device))
        else:
            self.scale.copy_(scale)

    def _observes_current_weight(self) -> bool:
        """Per-channel (axis 0), scale from this step's range alone (an observer averaging with constant 1): then
        observing and fake-quantizing a folded weight is one fused op."""
        observer = self.activation_post_process
        return (type(self) is FakeQuantize and self.ch_axis == 0 and observer.ch_axis == 0
                and getattr(observer, "averaging_constant", None) == 1.0)

    def current_scale(self) -> torch.Tensor:
        """The scale the fake quant applies now (what convert and QTensors use)."""
        return self.scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x, self._train_scale(), self.ch_axis)

    def _train_scale(self) -> torch.Tensor:
        """The scale as the forward uses it (a learned scale keeps its gradient)."""
        return self.scale

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
        return ops.fake_quant(x, scale, axis, self.quant_min, self.quant_max, self.rounding)

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

    def _train_scale(self) -> torch.Tensor:
        return self.scale.clamp(min=EPS)

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
        per_scale = max(x.numel() // scale.numel(), 1)
        grad_factor = 1.0 / math.sqrt(per_scale * self.quant_max)  # LSQ's g = 1 / sqrt(N * Q_P)
        return ops.lsq_fake_quant(x, scale, axis, self.quant_min, self.quant_max, self.rounding, grad_factor)


class PACTFakeQuantize(FakeQuantize):
    """PACT (Choi et al., 2018), symmetric: clip to [-alpha, alpha] with a learned alpha, then quantize with
    scale = alpha / ((qmax - qmin) / 2). d/dalpha = +1 above alpha, -1 below -alpha (quantizer straight-through)."""

    def __init__(self, observer: Type[MinMaxObserver] = MinMaxObserver, dtype: str = "qint8",
                 rounding: Optional[str] = None, init_alpha: float = 6.0, march: str = "bayes", **observer_kwargs):
        super().__init__(observer, dtype, None, rounding, march, **observer_kwargs)
        self.alpha = nn.Parameter(torch.tensor([init_alpha]))
        self.divisor = scale_divisor(dtype)

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


@contextlib.contextmanager
def frozen_for_export(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in validation state with each fake quant's on/off flags read once into Python constants, so that
    torch.export can trace it (a graph cannot branch on a buffer's value); eval mode. Restores both afterwards."""
    modules = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    saved = [(m.fake_quant_enabled.clone(), m.observer_enabled.clone()) for m in modules]
    was_training = model.training
    set_fake_quant_state(model, "validation")
    model.eval()
    for m in modules:
        m.frozen_state = (bool(m.observer_enabled.item()), bool(m.fake_quant_enabled.item()))
    try:
        yield model
    finally:
        for m, (fake_quant, observe) in zip(modules, saved):
            m.frozen_state = None
            m.fake_quant_enabled.copy_(fake_quant)
            m.observer_enabled.copy_(observe)
        model.train(was_training)


@contextlib.contextmanager
def simulated_dtype(fake_quant: FakeQuantize, dtype: str) -> Iterator[FakeQuantize]:
    """`fake_quant` on `dtype`'s grid over the range it has now (what calibrating it as `dtype` with a min/max
    observer gives), until the block ends: "what if this layer were int16" without recalibrating."""
    saved = (fake_quant.dtype, fake_quant.quant_min, fake_quant.quant_max, fake_quant.scale.detach().clone(),
             getattr(fake_quant, "divisor", None))
    ratio = scale_divisor(fake_quant.dtype) / scale_divisor(dtype)
    fake_quant.dtype, (fake_quant.quant_min, fake_quant.quant_max) = dtype, qrange(dtype)
    with torch.no_grad():
        fake_quant.scale.mul_(ratio)
    if isinstance(fake_quant, PACTFakeQuantize):
        fake_quant.divisor = scale_divisor(dtype)
    try:
        yield fake_quant
    finally:
        fake_quant.dtype, fake_quant.quant_min, fake_quant.quant_max = saved[:3]
        with torch.no_grad():
            fake_quant.scale.copy_(saved[3])
        if saved[4] is not None:
            fake_quant.divisor = saved[4]
