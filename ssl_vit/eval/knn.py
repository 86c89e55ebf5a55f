"""Weighted k-NN classification, DINO's protocol (``eval_knn.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (%) of a k-NN vote for every k in ``ks``, in one pass.

    Features are L2-normalised; each test sample's k most cosine-similar training samples vote
    for their class with weight exp(similarity / temperature). Test samples are processed in
    chunks against the whole training bank, so memory is O(chunk_size x N_train). As in DINO,
    top-5 counts the first min(5, k) predictions; equal votes rank the lower class index first.
    """
    device = train_features.device
    bank = F.normalize(train_features.float(), dim=1)
    bank_labels = train_labels.to(device)
    max_k = min(max(ks), bank.shape[0])
    # sync_on_compute=False: one process evaluates (rank 0 of a run); a sync would wait for ranks that never come
    metrics = {
        (k, top): MulticlassAccuracy(
            num_classes, top_k=min(top, k, num_classes), average="micro", sync_on_compute=False
        ).to(device)
        for k in ks
        for top in (1, 5)
    }
    class_idx = torch.arange(num_classes, device=device, dtype=torch.float32)
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        targets = test_labels[start : start + chunk_size].to(device)
        similarity, neighbours = (queries @ bank.T).topk(max_k, dim=1)  # sorted, most similar first
        weights = (similarity / temperature).exp()
        neighbour_labels = bank_labels[neighbours]
        for k in ks:
            votes = torch.zeros(queries.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            ranking = votes.sort(dim=1, descending=True, stable=True).indices
            scores = torch.empty_like(votes).scatter_(1, ranking, -class_idx.expand_as(votes))  # -rank: no ties
            for top in (1, 5):
                metrics[k, top].update(scores, targets)
    return {k: {f"top{t}": round(100 * metrics[k, t].compute().item(), 3) for t in (1, 5)} for k in ks}
