"""Predictions drawn on their images (boxes with class and score, per-pixel classes as colored masks): what
tools/predict.py --draw writes and what TensorBoard shows after each validation of a detector or segmentor."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from hat.errors import UsageError

SCORE_THRESHOLD = 0.3  # boxes drawn: a preview, not the evaluation (which ranks every detection)


def can_draw(predictions: Any) -> bool:
    """Whether predictions are boxes (a list of dicts) or per-pixel classes ([N, H, W] integers)."""
    if isinstance(predictions, list):
        return bool(predictions) and isinstance(predictions[0], dict) and "boxes" in predictions[0]
    return isinstance(predictions, torch.Tensor) and predictions.dim() == 3 and not predictions.is_floating_point()


def draw(images: torch.Tensor, predictions: Any, class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """uint8 [N, 3, H, W]: each standardized image rescaled to 0..255 with its predicted boxes (scores >= 0.3) or
    its per-pixel classes (class 0, background, left clear) drawn on it."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    if not can_draw(predictions):
        raise ValueError("only detection boxes or segmentation maps can be drawn (the model's postprocess gives "
                         "neither: a classifier?)")
    drawn = []
    for image, prediction in zip(images.detach().float().cpu(), _per_image(predictions)):
        low, high = image.min(), image.max()
        canvas = ((image - low) / (high - low).clamp(min=1e-6) * 255).round().to(torch.uint8)
        canvas = canvas.expand(3, -1, -1) if canvas.shape[0] == 1 else canvas[:3]
        if isinstance(prediction, dict):
            keep = prediction["scores"].cpu() >= SCORE_THRESHOLD
            labels = [f"{_name(class_names, int(c))} {float(s):.2f}" for c, s in
                      zip(prediction["labels"][keep], prediction["scores"][keep])]
            if keep.any():
                canvas = draw_bounding_boxes(canvas, prediction["boxes"].cpu()[keep], labels, colors="yellow")
        else:
            classes = prediction.cpu()
            present = [c for c in classes.unique().tolist() if c != 0]
            if present:
                masks = torch.stack([classes == c for c in present])
                if masks.shape[-2:] != canvas.shape[-2:]:
                    masks = nn.functional.interpolate(masks[None].float(), size=canvas.shape[-2:])[0].bool()
                canvas = draw_segmentation_masks(canvas, masks, alpha=0.5, colors=[_color(c) for c in present])
        drawn.append(canvas)
    return torch.stack(drawn)


def preview(model: nn.Module, images: torch.Tensor, class_names: Optional[Sequence[str]] = None,
            context: Callable[[], ContextManager] = lambda: torch.no_grad()) -> Optional[torch.Tensor]:
    """`images` run through the model (eval mode, inside `context`), post-processed and drawn; None when the model's
    predictions cannot be drawn (classifiers)."""
    postprocess = getattr(model, "postprocess", None)
    if postprocess is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with context(), torch.no_grad():
            device = next(model.parameters()).device
            predictions = postprocess(model(images.to(device)))
    finally:
        model.train(was_training)
    return draw(images, predictions, class_names) if can_draw(predictions) else None


def _per_image(predictions: Any) -> list:
    return list(predictions) if isinstance(predictions, list) else list(predictions.unbind(0))


def _name(class_names: Optional[Sequence[str]], label: int) -> str:
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)


def _color(label: int) -> tuple[int, int, int]:
    """A fixed, distinct color per class."""
    return ((label * 97) % 256, (label * 181 + 80) % 256, (label * 53 + 160) % 256)


@torch.no_grad()
def draw_to_folder(run: Callable, postprocess: Optional[Callable], loader, count: int, folder: Path) -> list[Path]:
    """The first `count` images of `loader` with the predictions of `run` (a model in eval mode or an integer
    program) post-processed by `postprocess`, as PNG files 000000.png, ... in `folder`."""
    from PIL import Image

    if postprocess is None:
        raise UsageError("--draw: this model has no post-processing to draw (boxes or masks); classifiers are "
                         "evaluated, not drawn")
    names = getattr(loader.dataset, "class_names", None)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for images, _ in loader:
        images = images[: count - len(written)]
        for image in draw(images, postprocess(run(images)), names):
            path = folder / f"{len(written):06d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
            written.append(path)
        if len(written) >= count:
            break
    return written
