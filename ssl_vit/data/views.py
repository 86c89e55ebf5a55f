"""Per-objective view transforms (torchvision.transforms.v2), applied in the loader workers.

A view maps one PIL image to what the objective's ``training_step`` takes: one tensor, or a list
of tensors for multi-view objectives. Its ``sizes`` are the crop sizes it makes, which the recipe
check compares with the encoder's patch size.
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
        self.sizes = (size,)


class SimMIMView(v2.Compose):
    """SimMIM's pretraining view: RandomResizedCrop (scale 0.67-1, ratio 3/4-4/3) and a flip. The
    block mask itself is drawn on the device by the objective, one per sample."""

    def __init__(
        self,
        size: int = 192,
        scale: tuple[float, float] = (0.67, 1.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(
            [
                v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3)),
                v2.RandomHorizontalFlip(),
                *to_normalized_tensor(mean, std),
            ]
        )
        self.sizes = (size,)


def augmented_crop(
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """One BYOL-style crop: RandomResizedCrop (bicubic), flip, colour jitter 0.4/0.4/0.2/0.1 with
    p = 0.8, grayscale p = 0.2, Gaussian blur (sigma 0.1-2) with ``blur_p``, solarisation with
    ``solarize_p``. The blur kernel spans about 10% of the crop (23 px at 224), as in BYOL."""
    kernel = 2 * round(0.05 * size) + 1
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),
            *to_normalized_tensor(mean, std),
        ]
    )


class TwoViews:
    """MoCo v3 / BYOL's two asymmetric views: blur p = 1.0 / 0.1, solarisation p = 0 / 0.2,
    RandomResizedCrop scale (0.08, 1). Returns ``[view1, view2]``."""

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> None:
        self.crops = [augmented_crop(size, scale, 1.0, 0.0), augmented_crop(size, scale, 0.1, 0.2)]
        self.sizes = (size,)

    def __call__(self, image):
        return [crop(image) for crop in self.crops]


class MultiCropViews:
    """DINO's multi-crop: 2 global crops (scale 0.4-1; blur p 1.0 and 0.1, solarisation p 0 and
    0.2) and ``num_local`` local crops (scale 0.05-0.4; blur p 0.5). Returns the global crops first.
    The loader stacks each crop position into its own batch tensor; the objective runs the encoder
    once per resolution."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        self.global_crops = [
            augmented_crop(global_size, global_scale, 1.0, 0.0),
            augmented_crop(global_size, global_scale, 0.1, 0.2),
        ]
        self.local_crop = augmented_crop(local_size, local_scale, 0.5, 0.0)
        self.num_local = num_local
        self.sizes = (global_size, local_size) if num_local else (global_size,)

    def __call__(self, image):
        return [crop(image) for crop in self.global_crops] + [self.local_crop(image) for _ in range(self.num_local)]


class EvalView(v2.Compose):
    """Resize the short side to ``size * 256/224`` (bicubic), then centre-crop ``size``: the
    evaluation view of DINO / MAE (256 -> 224 at ImageNet scale), scaled down for small images."""

    def __init__(
        self,
        size: int = 224,
        resize_ratio: float = 256 / 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__(
            [
                v2.Resize(round(size * resize_ratio), interpolation=InterpolationMode.BICUBIC),
                v2.CenterCrop(size),
                *to_normalized_tensor(mean, std),
            ]
        )
