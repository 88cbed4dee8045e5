"""FAQ 2.3 Q4 ("why is there NaN in QAT?"): detect non-finite inputs, losses, gradients and weights, and say
what usually causes them, most likely first."""
from __future__ import annotations

import torch
from torch import nn

from hat.errors import HatError

LIKELY_CAUSES = (
    "1) the input data holds NaN/Inf: check the dataset and its transforms;",
    "2) the float model had not converged: train the float stage longer before calibration/QAT;",
    "3) calibration was skipped: run --stage calibration before --stage qat, so ranges start sensible;",
    "4) the learning rate is too high: lower optimizer.lr (or stages.qat.optimizer.lr) or set "
    "trainer.clip_grad_norm;",
    "5) OneCycle or an adaptive optimizer in QAT: use SGD (set stages.qat.optimizer, or let the SGD fallback apply)",
)
MODES = ("stop", "skip")


class NonFiniteError(HatError):
    """Training met NaN/Inf and was configured to stop (trainer.on_nonfinite=stop)."""


def non_finite_message(what: str, epoch: int, step: int) -> str:
    return (f"non-finite {what} at epoch {epoch + 1}, step {step + 1}. Likely causes, most likely first: "
            + " ".join(LIKELY_CAUSES) + ". To skip such steps instead of stopping, set trainer.on_nonfinite=skip")


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def non_finite_weights(model: nn.Module) -> list[str]:
    """Names of floating-point parameters and buffers holding NaN/Inf."""
    return [name for name, value in model.state_dict().items()
            if value.is_floating_point() and not is_finite(value)]
