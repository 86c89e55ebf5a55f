"""BYOL's photometric augmentation (colour jitter, grayscale, Gaussian blur, solarisation) of a
whole batch at once on the device, every sample with its own random draw.

torchvision's transforms draw one set of parameters per call, so on a batch every image would get
the same jitter; per-image calls in the loader workers are what makes the two-view and multi-crop
recipes CPU-bound (see ``benchmarks/loader_throughput.py``). Here the workers only decode, crop
and flip, and this runs on the batch after it reaches the GPU. Each operation follows
torchvision's tensor kernel; ``tests/test_views.py`` checks every sample against torchvision
called with that sample's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

#: BYOL / MoCo v3 / DINO colour jitter strengths (brightness, contrast, saturation, hue) and probabilities.
JITTER = (0.4, 0.4, 0.2, 0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # of 255


def blur_kernel_size(size: int, fixed: int | None = None) -> int:
    """The blur kernel's side: ``fixed`` pixels at every crop size (DINOv2's code: 9), or, without
    it, about 10% of the crop as BYOL and SimCLR set it (23 px at 224)."""
    return fixed if fixed is not None else 2 * round(0.05 * size) + 1


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma of (B, 3, H, W) images in [0, 1], as (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    return (ratio * x + (1 - ratio) * other).clamp(0, 1)


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate each image's hue by ``shift`` turns (B, 1, 1, 1): RGB -> HSV, h + shift, -> RGB."""
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    flat = delta == 0
    safe = torch.where(flat, torch.ones_like(delta), delta)
    r, g, b = x.unbind(1)
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(flat, torch.zeros_like(h), h) / 6
    s = torch.where(maxc == 0, torch.zeros_like(delta), delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc))
    h = (h + shift.squeeze(1)) % 1.0
    # HSV -> RGB in closed form: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h.unsqueeze(1)) % 6
    return maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Blur each image with its own ``sigma`` (B,): a separable Gaussian with reflected borders."""
    n, c, h, w = x.shape
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    kernels = torch.softmax(-(offsets**2) / (2 * sigma[:, None] ** 2), dim=1)  # (B, K), each sums to 1
    kernels = kernels.repeat_interleave(c, dim=0)  # one per (image, channel)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernels[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernels[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


@dataclass
class PhotometricParams:
    """One batch's draw: which samples get each operation, with what strength, in what order."""

    jitter: Tensor  # (B,) bool
    order: Tensor  # (B, 4) a permutation of brightness, contrast, saturation, hue per sample
    factors: Tensor  # (B, 4) brightness, contrast, saturation factors and hue shift
    grayscale: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,)
    solarize: Tensor  # (B,) bool


class BatchedPhotometric:
    """One crop position's photometric augmentation on a uint8 (B, 3, H, W) batch, ending in
    normalisation: colour jitter (``JITTER`` with p = ``JITTER_P``, the four operations in a
    random order per sample), grayscale (p = ``GRAYSCALE_P``), Gaussian blur (sigma in
    ``BLUR_SIGMA``, p = ``blur_p``, kernel by :func:`blur_kernel_size`), solarisation (p =
    ``solarize_p``)."""

    def __init__(
        self,
        size: int,
        blur_p: float,
        solarize_p: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        blur_kernel: int | None = None,
    ) -> None:
        self.kernel_size = blur_kernel_size(size, blur_kernel)
        self.blur_p = blur_p
        self.solarize_p = solarize_p
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def draw(self, n: int, device: torch.device) -> PhotometricParams:
        b, c, s, h = JITTER
        low = torch.tensor([1 - b, 1 - c, 1 - s, -h], device=device)
        high = torch.tensor([1 + b, 1 + c, 1 + s, h], device=device)
        return PhotometricParams(
            jitter=torch.rand(n, device=device) < JITTER_P,
            order=torch.rand(n, 4, device=device).argsort(dim=1),
            factors=low + (high - low) * torch.rand(n, 4, device=device),
            grayscale=torch.rand(n, device=device) < GRAYSCALE_P,
            blur=torch.rand(n, device=device) < self.blur_p,
            sigma=BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(n, device=device),
            solarize=torch.rand(n, device=device) < self.solarize_p,
        )

    def apply(self, images: Tensor, p: PhotometricParams) -> Tensor:
        x = images.float() / 255
        # Every operation runs on the whole batch with per-sample factors, and a sample not due for
        # it keeps its input: no data-dependent indexing, so no host-device synchronisation.
        for position in range(4):
            for op in range(4):
                due = (p.jitter & (p.order[:, position] == op)).view(-1, 1, 1, 1)
                x = torch.where(due, self._jitter(x, op, p.factors[:, op].view(-1, 1, 1, 1)), x)
        x = torch.where(p.grayscale.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        x = torch.where(p.blur.view(-1, 1, 1, 1), gaussian_blur(x, self.kernel_size, p.sigma), x)
        threshold = SOLARIZE_THRESHOLD / 255
        x = torch.where(p.solarize.view(-1, 1, 1, 1) & (x >= threshold), 1 - x, x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: Tensor) -> Tensor:
        return self.apply(images, self.draw(len(images), images.device))

    @staticmethod
    def _jitter(x: Tensor, op: int, factor: Tensor) -> Tensor:
        if op == 0:  # brightness
            return (x * factor).clamp(0, 1)
        if op == 1:  # contrast: towards the image's mean luma
            return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)
        if op == 2:  # saturation: towards the image's luma
            return blend(x, grayscale(x), factor)
        return shift_hue(x, factor)
