"""Linear probe, MAE's protocol (``main_linprobe.py``): frozen features -> BatchNorm1d without
affine parameters -> Linear, trained with SGD or LARS (momentum 0.9, no weight decay),
lr = base_lr x batch / 256, per-step linear warm-up then cosine decay."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from timm.optim import Lars
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_vit.eval.features import FeatureSet
from ssl_vit.schedules import warmup_cosine

ProbeOptimizer = Literal["sgd", "lars"]


def lars(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """LARS as in MAE's ``util/lars.py`` at momentum 0.9 and no weight decay: each weight matrix's
    step is its gradient rescaled by 0.001 x ||w|| / ||gradient||; biases and norms take plain
    momentum SGD (timm's Lars, adapting only the first group)."""
    params = list(params)
    matrices, others = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    return Lars([{"params": matrices, "always_adapt": True}, {"params": others}], lr=lr, momentum=0.9)


class LinearProbeHead(nn.Sequential):
    def __init__(self, dim: int, num_classes: int) -> None:
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def train_linear_probe(
    epoch_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    dim: int,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    warmup_epochs: float = 10,
    optimizer: ProbeOptimizer = "sgd",
    device: torch.device | str = "cpu",
) -> LinearProbeHead:
    """Train a probe head on the (features, labels) batches that ``epoch_batches(epoch)`` yields."""
    head = LinearProbeHead(dim, num_classes).to(device)
    peak_lr = base_lr * batch_size / 256
    if optimizer == "lars":
        opt = lars(head.parameters(), peak_lr)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=0.9, weight_decay=0.0)
    return train_probe_head(head, opt, epoch_batches, steps_per_epoch, epochs, peak_lr, warmup_epochs)


def train_probe_head(
    head: nn.Module,
    opt: torch.optim.Optimizer,
    epoch_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    epochs: int,
    peak_lr: float,
    warmup_epochs: float,
    final_weight_decay: float | None = None,
    max_grad_norm: float | None = None,
) -> nn.Module:
    """The loop every probe shares: cross-entropy on the batches ``epoch_batches(epoch)`` yields,
    lr set every step (linear warm-up over ``warmup_epochs``, then cosine to 0); with
    ``final_weight_decay``, the decayed groups' weight decay goes down a cosine to it; with
    ``max_grad_norm``, the gradient's norm is clipped to it."""
    device = next(head.parameters()).device
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    decayed = [(group, group["weight_decay"]) for group in opt.param_groups if group.get("weight_decay")]
    step = 0
    head.train()
    for epoch in range(epochs):
        for features, labels in epoch_batches(epoch):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, total, warmup, peak_lr, 0.0)
            if final_weight_decay is not None:
                for group, weight_decay in decayed:
                    group["weight_decay"] = warmup_cosine(step, total, 0, weight_decay, final_weight_decay)
            loss = nn.functional.cross_entropy(head(features.to(device)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(head.parameters(), max_grad_norm)
            opt.step()
            step += 1
    if step != total:  # an accuracy of a head trained on fewer batches than counted is not the protocol's
        raise RuntimeError(f"the probe trained {step} steps of the {total} its schedule counts")
    return head.eval()


def cached_feature_batches(
    train: FeatureSet, batch_size: int, seed: int = 0
) -> Callable[[int], Iterable[tuple[Tensor, Tensor]]]:
    """The fast path: shuffled mini-batches of cached features, a fixed permutation per (seed, epoch).
    The last incomplete batch is dropped (BatchNorm needs more than one sample)."""

    def batches(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield train.features[idx], train.labels[idx]

    return batches


def feature_chunks(features: FeatureSet, size: int = 1024) -> Iterable[tuple[Tensor, Tensor]]:
    """Cached features in order, ``size`` samples at a time."""
    for start in range(0, len(features.labels), size):
        yield features.features[start : start + size], features.labels[start : start + size]


@torch.no_grad()
def probe_accuracy(head: nn.Module, val_batches: Iterable[tuple[Tensor, Tensor]], num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of a probe head over (features, labels) batches."""
    device = next(head.parameters()).device
    # sync_on_compute=False: one process evaluates (rank 0 of a run); a sync would wait for ranks that never come
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", sync_on_compute=False).to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", sync_on_compute=False)
    top5 = top5.to(device)
    for features, labels in val_batches:
        logits = head(features.to(device))
        top1.update(logits, labels.to(device))
        top5.update(logits, labels.to(device))
    return {"top1": round(100 * top1.compute().item(), 3), "top5": round(100 * top5.compute().item(), 3)}
