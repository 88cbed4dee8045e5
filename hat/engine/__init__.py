"""Training engine: Trainer, callbacks, optimizers and schedules, stages."""
from hat.engine.trainer import Callback, Trainer, evaluate

__all__ = ["Callback", "Trainer", "evaluate"]
