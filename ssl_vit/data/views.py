"""Per-objective view transforms (torchvision.transforms.v2), applied in the loader workers.

A view maps one PIL image to what the objective's ``training_step`` takes: one tensor, or a list
of tensors for multi-view objectives. Its ``sizes`` are the crop sizes it makes, which the recipe
check compares with the encoder's patch size; its ``decode_side`` is the short side an image needs
for its smallest crop to be taken from at least as many pixels as it outputs, so the pipeline may
decode JPEGs at reduced size down to it.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from ssl_vit.data.photometric import (
    BLUR_SIGMA,
    GRAYSCALE_P,
    JITTER,
    JITTER_P,
    SOLARIZE_THRESHOLD,
    BatchedPhotometric,
    blur_kernel_size,
)
from ssl_vit.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The evaluation crop's share of the resized image (224 of 256), as timm's ``crop_pct``.
EVAL_CROP_PCT = 224 / 256


def crop_decode_side(size: int, scale: tuple[float, float], min_ratio: float = 3 / 4) -> int:
    """The short side an image needs so that RandomResizedCrop's smallest crop (area fraction
    ``scale[0]``, aspect ratio down to ``min_ratio``) is still ``size`` pixels on its short side."""
    return math.ceil(size / math.sqrt(scale[0] * min_ratio))


def to_normalized_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class MAEView(v2.Compose):
    """One RandomResizedCrop and a horizontal flip, nothing else: MAE's pretraining view (scale
    0.2-1, bicubic). I-JEPA uses it with ``scale: [0.3, 1.0]``, ``interpolation: bilinear`` and
    ``horizontal_flip: false`` (``make_transforms`` as its ImageNet configs set it)."""

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        interpolation: Literal["bicubic", "bilinear"] = "bicubic",
        horizontal_flip: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(
            [
                v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode(interpolation)),
                *([v2.RandomHorizontalFlip()] if horizontal_flip else []),
                *to_normalized_tensor(mean, std),
            ]
        )
        self.sizes = (size,)
        self.decode_side = crop_decode_side(size, scale)


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
        self.decode_side = crop_decode_side(size, scale)


def augmented_crop(
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
    photometric: bool = True,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
    blur_kernel: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    flip: bool = True,
) -> v2.Compose:
    """One BYOL-style crop: RandomResizedCrop (``interpolation``: bicubic as DINO's, bilinear as
    MoCo v3's), flip (unless ``flip`` is false), colour jitter 0.4/0.4/0.2/0.1 with p = 0.8,
    grayscale p = 0.2, Gaussian blur (sigma 0.1-2) with ``blur_p``, solarisation with
    ``solarize_p``. The blur kernel is ``blur_kernel`` pixels, or without it about 10% of the crop
    (23 px at 224), as in BYOL. Without ``photometric``, only the crop and flip, as a uint8 tensor
    for ``BatchedPhotometric``."""
    geometric = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation),
        *([v2.RandomHorizontalFlip()] if flip else []),
    ]
    distortions = photometric_distortions(size, blur_p, solarize_p, photometric, blur_kernel, mean, std)
    return v2.Compose([*geometric, *distortions.transforms])


def photometric_distortions(
    size: int,
    blur_p: float,
    solarize_p: float,
    photometric: bool = True,
    blur_kernel: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """What ``augmented_crop`` does after the crop and flip: the distortions and normalisation, or
    without ``photometric`` only the conversion to a uint8 tensor for ``BatchedPhotometric``."""
    if not photometric:
        return v2.Compose([v2.ToImage()])
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P),
            v2.RandomGrayscale(p=GRAYSCALE_P),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size, blur_kernel), sigma=BLUR_SIGMA)], p=blur_p),
            v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p),
            *to_normalized_tensor(mean, std),
        ]
    )


@dataclass(frozen=True)
class CropSpec:
    """One crop position of a multi-view recipe."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    interpolation: InterpolationMode = InterpolationMode.BICUBIC
    blur_kernel: int | None = None  # pixels; None: about 10% of the crop
    flip: bool = True


class AugmentedCrops:
    """Views made of one BYOL-style augmented crop per ``CropSpec``; returns the crops in order.

    With ``augment_on_device``, the loader workers only crop, flip and convert to uint8, and
    ``on_device`` (called by the data module once the batch is on the GPU) applies each crop
    position's colour jitter, grayscale, blur and solarisation to the whole batch, a separate draw
    per sample: the per-image photometric work is what keeps multi-crop recipes CPU-bound."""

    def __init__(self, specs: list[CropSpec], augment_on_device: bool = False) -> None:
        self.crops = [
            augmented_crop(
                s.size,
                s.scale,
                s.blur_p,
                s.solarize_p,
                not augment_on_device,
                s.interpolation,
                s.blur_kernel,
                flip=s.flip,
            )
            for s in specs
        ]
        self.photometric = (
            [
                BatchedPhotometric(s.size, s.blur_p, s.solarize_p, IMAGENET_MEAN, IMAGENET_STD, s.blur_kernel)
                for s in specs
            ]
            if augment_on_device
            else None
        )
        self.sizes = tuple(dict.fromkeys(s.size for s in specs))
        self.decode_side = max(crop_decode_side(s.size, s.scale) for s in specs)

    def __call__(self, image: Image.Image) -> list[Tensor]:
        return [crop(image) for crop in self.crops]

    def on_device(self, crops: list[Tensor]) -> list[Tensor]:
        if self.photometric is None:
            return crops
        # crops past the specs' (DINOv3's Gram teacher crops) leave the loader finished
        distorted = [augment(batch) for augment, batch in zip(self.photometric, crops, strict=False)]
        return distorted + crops[len(distorted) :]


class TwoViews(AugmentedCrops):
    """MoCo v3 / BYOL's two asymmetric views: blur p = 1.0 / 0.1, solarisation p = 0 / 0.2,
    RandomResizedCrop scale (0.08, 1), bilinear as in MoCo v3's ``main_moco.py``. Returns ``[view1, view2]``."""

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0), augment_on_device: bool = False):
        bilinear = InterpolationMode.BILINEAR
        super().__init__(
            [CropSpec(size, scale, 1.0, 0.0, bilinear), CropSpec(size, scale, 0.1, 0.2, bilinear)], augment_on_device
        )


class MultiCropViews(AugmentedCrops):
    """DINO's multi-crop: 2 global crops (scale 0.4-1; blur p 1.0 and 0.1, solarisation p 0 and
    0.2) and ``num_local`` local crops (scale 0.05-0.4; blur p 0.5). Returns the global crops first.
    The loader stacks each crop position into its own batch tensor; the objective runs the encoder
    once per resolution.

    ``global_blur_p`` and ``blur_kernel_size`` are there for DINOv2, whose code inverts its blur
    probabilities (its released checkpoints trained with (0.0, 0.9): dinov2 PR #411, dinov3 #286)
    and blurs with a 9-px kernel at every crop size (``dinov2/data/transforms.py``). Without
    ``blur_kernel_size`` the kernel spans about 10% of each crop, which at 224 px holds DINO's
    whole blur (its code blurs with PIL's unbounded Gaussian).

    ``horizontal_flip: false`` turns the flips off, as DINOv3's configs do (``horizontal_flips``).

    ``gram_size`` adds DINOv3's Gram teacher crops (``gram_teacher_crops_size`` with
    ``gram_teacher_no_distortions``, ``dinov3/data/augmentations.py``), last: each global crop is
    cut at ``gram_size`` px, resized to ``global_size`` for the student and distorted, and kept
    undistorted at ``gram_size`` for the Gram teacher."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        augment_on_device: bool = False,
        global_blur_p: tuple[float, float] = (1.0, 0.1),
        blur_kernel_size: int | None = None,
        gram_size: int | None = None,
        horizontal_flip: bool = True,
    ) -> None:
        solarize_p = (0.0, 0.2)
        k, flip = blur_kernel_size, horizontal_flip
        global_crops = [
            CropSpec(global_size, global_scale, global_blur_p[i], solarize_p[i], blur_kernel=k, flip=flip)
            for i in range(2)
        ]
        local_crops = [CropSpec(local_size, local_scale, 0.5, 0.0, blur_kernel=k, flip=flip)] * num_local
        super().__init__(global_crops + local_crops, augment_on_device)
        self.gram_size = gram_size
        if gram_size is None:
            return
        if gram_size <= global_size:
            raise UserError(
                f"data.view gram_size {gram_size} must exceed global_size {global_size} (DINOv3: 512 for 256); "
                "leave it out and the Gram teacher sees the global crops"
            )
        bicubic = InterpolationMode.BICUBIC
        self.gram_crop = v2.Compose(
            [
                v2.RandomResizedCrop(gram_size, global_scale, interpolation=bicubic),
                *([v2.RandomHorizontalFlip()] if flip else []),
            ]
        )
        self.student_global = [
            v2.Compose(
                [
                    v2.Resize(global_size, interpolation=bicubic),
                    photometric_distortions(s.size, s.blur_p, s.solarize_p, not augment_on_device, k),
                ]
            )
            for s in global_crops
        ]
        self.gram_finish = v2.Compose(to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD))
        self.sizes = (*self.sizes, gram_size)
        self.decode_side = max(self.decode_side, crop_decode_side(gram_size, global_scale))

    def __call__(self, image: Image.Image) -> list[Tensor]:
        if self.gram_size is None:
            return super().__call__(image)
        cut = [self.gram_crop(image) for _ in range(2)]
        student = [finish(crop) for finish, crop in zip(self.student_global, cut, strict=True)]
        local = [crop(image) for crop in self.crops[2:]]
        return [*student, *local, *(self.gram_finish(crop) for crop in cut)]


class MixedResolutionViews:
    """DINOv3's high-resolution adaptation: several multi-crop views (each its own global, local
    and Gram crop sizes), one of them per batch, drawn with probabilities ``ratios``
    (``global_local_crop_pairs_ratios``; ``CombinedDataLoader`` in ``dinov3/data/meta_loaders.py``
    picks one loader per iteration with a seeded generator). The pipeline calls ``start_batch``
    with the batch's key, which is the same on every rank, so all ranks draw the same sizes for a
    step, as the official ``GLOBAL_HOMOGENEOUS`` mode does."""

    def __init__(self, views: list[MultiCropViews], ratios: list[float]) -> None:
        if len(views) != len(ratios) or not views:
            raise UserError(
                f"data.view has {len(views)} views and {len(ratios)} ratios; give one ratio per view "
                "(DINOv3: 5 views, ratios [0.3, 0.3, 0.3, 0.05, 0.05])"
            )
        if any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise UserError(f"data.view ratios {list(ratios)} must be non-negative and sum to 1")
        by_sizes = {view.sizes: view for view in views}
        if len(by_sizes) < len(views):
            raise UserError(
                "two of data.view's views make crops of the same sizes; give each crop-size set once, with the "
                "sum of their ratios"
            )
        self.views = list(views)
        self.ratios = list(ratios)
        self._by_sizes = by_sizes
        self.sizes = tuple(dict.fromkeys(size for view in views for size in view.sizes))
        self.decode_side = max(view.decode_side for view in views)
        self.current = self.views[0]

    def start_batch(self, key: str) -> None:
        """Pick this batch's view from ``key`` alone (not from the generators the crops draw from)."""
        draw = random.Random(key).random()
        cumulative = itertools.accumulate(self.ratios)
        index = next((i for i, bound in enumerate(cumulative) if draw < bound), len(self.views) - 1)
        self.current = self.views[index]

    def __call__(self, image: Image.Image) -> list[Tensor]:
        return self.current(image)

    def on_device(self, crops: list[Tensor]) -> list[Tensor]:
        # In the training process, the batch's crop sizes tell which view made it.
        sizes = tuple(dict.fromkeys(crop.shape[-1] for crop in crops))
        return self._by_sizes[sizes].on_device(crops)


class EvalView(v2.Compose):
    """Resize the short side to ``floor(size / crop_pct)`` (bicubic), then centre-crop ``size``: the
    evaluation view of DINO / MAE (256 -> 224 at ImageNet scale), scaled to other sizes as MAE's
    ``int(input_size / crop_pct)`` and timm's eval transform do, so that timm, given an export's
    ``pretrained_cfg``, prepares an image exactly as the evaluation did. It asks for no reduced
    JPEG decode (no ``decode_side``): libjpeg's scaled decode gives other pixels than the full
    decode a deployment makes, and an export's measured accuracy is to be the deployed model's."""

    def __init__(
        self,
        size: int = 224,
        crop_pct: float = EVAL_CROP_PCT,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> None:
        side = math.floor(size / crop_pct)
        super().__init__(
            [
                v2.Resize(side, interpolation=InterpolationMode(interpolation)),
                v2.CenterCrop(size),
                *to_normalized_tensor(mean, std),
            ]
        )
