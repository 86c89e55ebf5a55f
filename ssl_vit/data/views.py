"""Per-objective view transforms (torchvision.transforms.v2), applied in the loader workers.

A view maps one PIL image to what the objective's ``training_step`` takes: one tensor, or a list
of tensors for multi-view objectives.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_normalized_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class MAEView(v2.Compose):
    """MAE's pretraining view: RandomResizedCrop (scale 0.2-1, bicubic) and a horizontal flip."""

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(
            [
                v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip(),
                *to_normalized_tensor(mean, std),
            ]
        )
