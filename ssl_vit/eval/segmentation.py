"""Dense linear probe, DINOv2's "linear" semantic-segmentation protocol: the frozen encoder's
last-block patch tokens -> BatchNorm -> a 1x1 convolution to class logits per patch -> bilinear
upsampling to the label map's pixels, trained with per-pixel cross-entropy; scored by mean IoU
over classes, as mmsegmentation computes it for ADE20k and VOC. It measures what a patch token
knows about its own place in the image, which image-level probes cannot see."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from ssl_vit.data.pipeline import IGNORE_PIXEL
from ssl_vit.errors import UserError
from ssl_vit.eval.linear import train_probe_head


def check_mask_classes(masks: Tensor, num_classes: int) -> None:
    """Every labelled pixel must name one of the ``num_classes`` classes (255 = ignore aside)."""
    high = int(masks.max()) if masks.numel() else -1
    if high >= num_classes:
        raise UserError(
            f"a label map has class index {high}, but the shards name {num_classes} mask classes "
            f"(0-{num_classes - 1}); fix the label maps (255 marks pixels to ignore) or rewrite the shards"
        )


class LinearSegmentationHead(nn.Module):
    """DINOv2's linear decode head (mmsegmentation's ``BNHead`` on one layer): BatchNorm over the
    channels of the (h, w) grid of patch tokens, a 1x1 convolution (weights normal std 0.01, as
    mmsegmentation initialises ``conv_seg``), logits resized bilinearly to ``out_size``."""

    def __init__(self, dim: int, num_classes: int, grid: tuple[int, int], out_size: tuple[int, int]) -> None:
        super().__init__()
        self.grid, self.out_size = grid, out_size
        self.norm = nn.BatchNorm2d(dim)
        self.classify = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classify.weight, std=0.01)
        nn.init.zeros_(self.classify.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, h*w, D) patch tokens -> (B, classes, H, W) logits."""
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)
        logits = self.classify(self.norm(x))
        return F.interpolate(logits, size=self.out_size, mode="bilinear", align_corners=False)


def train_segmentation_probe(
    epoch_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    dim: int,
    num_classes: int,
    grid: tuple[int, int],
    out_size: tuple[int, int],
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    device: torch.device | str = "cpu",
) -> LinearSegmentationHead:
    """DINOv2's linear segmentation optimisation (its ADE20k ``linear`` config): AdamW, lr 1e-3,
    weight decay 1e-4; here over ``epochs`` passes with the shared probe schedule (one epoch of
    linear warm-up, cosine to 0) in place of mmsegmentation's 1,500-iteration warm-up and
    linear (poly, power 1) decay over 40k iterations."""
    head = LinearSegmentationHead(dim, num_classes, grid, out_size).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    return train_probe_head(head, opt, epoch_batches, steps_per_epoch, epochs, lr, warmup_epochs=1)


@torch.no_grad()
def segmentation_scores(
    head: nn.Module, val_batches: Iterable[tuple[Tensor, Tensor]], num_classes: int
) -> dict[str, float]:
    """Mean IoU and pixel accuracy (%) over every labelled pixel of the val batches (and their
    number of images), from one
    confusion matrix: IoU_c = TP / (TP + FP + FN) per class, averaged over the classes that occur
    in the labels or the predictions (mmsegmentation's nan-mean); ignored pixels count nowhere."""
    device = next(head.parameters()).device
    # sync_on_compute=False: one process evaluates (rank 0 of a run); a sync would wait for ranks that never come
    confusion = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_PIXEL, sync_on_compute=False).to(device)
    images = 0
    for tokens, masks in val_batches:
        check_mask_classes(masks, num_classes)
        confusion.update(head(tokens.to(device)).argmax(dim=1), masks.to(device))
        images += len(masks)
    matrix = confusion.compute().double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    return {
        "miou": round(100 * iou.mean().item(), 3),
        "pixel_acc": round(100 * (tp.sum() / matrix.sum()).item(), 3),
        "images": images,  # what the scores count
    }
