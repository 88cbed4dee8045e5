"""HAT: config-driven training of models that run as integer programs on a J5-class ("bayes") accelerator.

Importing `hat` registers every model, dataset, optimizer, schedule and stage, so configs can name them.
"""
from hat import data, models  # noqa: F401  (registration)
from hat.engine import int_infer, optim, quant_stages, stages  # noqa: F401  (registration)

__version__ = "0.1.0"
