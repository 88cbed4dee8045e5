"""Model zoo: one file per family; importing this package registers every model."""
from hat.models import (classifier, convnet, detector, fcos, fpn, mobilenet, resnet, torchvision_models,  # noqa: F401
                        unet)  # (registration)
from hat.models.classifier import Classifier
from hat.models.zoo import create_model, list_models

__all__ = ["Classifier", "create_model", "list_models"]
