"""Validation metrics a config chooses (`evaluator: {type: ...}`); importing this package registers them."""
from hat.evaluation.base import Evaluator
from hat.evaluation.classification import Accuracy
from hat.evaluation.coco import COCOEvaluator
from hat.evaluation.segmentation import MeanIoU

__all__ = ["Accuracy", "COCOEvaluator", "Evaluator", "MeanIoU"]
