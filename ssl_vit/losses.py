"""Objective losses, written once and reused by any method that needs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.distributed import gather_no_grad, gather_with_grad, max_over_ranks, sum_over_ranks, world


def normalized_patch_targets(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean over its pixels, divided by
    sqrt(unbiased variance + eps)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE's loss: per-patch mean squared error, averaged over masked patches only.

    pred, target: (B, N, P); mask: (B, N), 1 = masked.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def masked_pixel_l1(pred: Tensor, images: Tensor, pixel_mask: Tensor) -> Tensor:
    """SimMIM's loss: L1 between reconstructed and input pixels, on masked pixels only, averaged
    over masked pixels and channels. pred, images: (B, C, H, W); pixel_mask: (B, 1, H, W), 1 = masked."""
    per_pixel = (pred - images).abs() * pixel_mask
    return per_pixel.sum() / (pixel_mask.sum() + 1e-5) / images.shape[1]


def dino_teacher_probs(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """DINO's teacher targets: the centred teacher output sharpened by its temperature, softmaxed."""
    return F.softmax((teacher_out - center) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp_teacher_probs(teacher_out: Tensor, teacher_temp: float, iterations: int = 3) -> Tensor:
    """DINOv2's (and SwAV's) teacher targets: exp(teacher_out / temperature) over the global batch,
    alternately rescaled so that every one of the K prototypes gets an equal share of the batch
    and every sample a total of 1. Where DINO's centre subtracts a running mean of past batches'
    logits, this balances each batch's own probabilities, whatever the teacher's drift.

    teacher_out: (B, K), this rank's samples; the sums run over every rank's.
    """
    logits = teacher_out.float() / teacher_temp
    # exp of the logits less their global maximum: the same assignment, without overflow
    q = torch.exp(logits - max_over_ranks(logits.max())).t()  # (K, B)
    # samples over every rank: iBOT's masked patches differ in number from rank to rank
    k, total = q.shape[0], sum_over_ranks(logits.new_tensor(q.shape[1]))
    q /= sum_over_ranks(q.sum())
    for _ in range(iterations):
        q /= sum_over_ranks(q.sum(dim=1, keepdim=True)) * k  # each prototype: 1/K of the mass
        q /= q.sum(dim=0, keepdim=True) * total  # each sample: 1/B
    return (q * total).t()


def dino_loss(student_out: Tensor, teacher_probs: Tensor, num_crops: int, student_temp: float = 0.1) -> Tensor:
    """DINO's cross-entropy between the teacher's target distribution for each global crop and the
    student log-softmax of every other crop, averaged over those (teacher, student) pairs.

    student_out: (num_crops * B, K), crops stacked in order (2 global first);
    teacher_probs: (2 * B, K) targets for the 2 global crops (:func:`dino_teacher_probs` or
    :func:`sinkhorn_knopp_teacher_probs`).
    """
    student = (student_out / student_temp).chunk(num_crops)
    teacher = teacher_probs.detach().chunk(2)
    total, pairs = 0.0, 0
    for t_idx, t in enumerate(teacher):
        for s_idx, s in enumerate(student):
            if s_idx == t_idx:  # the same view
                continue
            total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def ibot_patch_loss(student_out: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float = 0.1) -> Tensor:
    """iBOT's masked-patch loss as DINOv2 computes it (``iBOTPatchLoss.forward_masked``): for the
    M masked patches of a batch of C global crops, given in ``masks``' (C, N) row-major order,
    the cross-entropy between the teacher's targets and the student's softmax(s / student_temp),
    averaged over each crop's masked patches, summed over crops and divided by C (unmasked crops
    count in C)."""
    per_patch = -(teacher_probs * F.log_softmax(student_out.float() / student_temp, dim=-1)).sum(dim=-1)
    counts = masks.sum(dim=1, keepdim=True).clamp_min(1).expand_as(masks)[masks]  # each patch's crop's count
    return (per_patch / counts).sum() / masks.shape[0]


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko entropy estimator DINOv2 spreads its CLS features with
    (``KoLeoLoss``): L2-normalise, find each row's nearest other row, -mean log(distance + eps).
    Computed in float32 on the local batch."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-1)
        nearest = similarity.argmax(dim=1)
    distance = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distance + eps).mean()


def gram_loss(
    student_patches: Tensor, teacher_patches: Tensor, image_level: bool = True, remove_neg: bool = False
) -> Tensor:
    """DINOv3's Gram anchoring (``dinov3/loss/gram_loss.py``): the mean squared difference between
    the Gram matrices of the L2-normalised patch features (B, N, D) of the student and of the Gram
    teacher; one N x N matrix per image (``image_level``, as DINOv3's configs set it) or one over all
    the batch's patches. ``remove_neg`` zeroes negative similarities in both. In float32."""
    student, teacher = F.normalize(student_patches.float(), dim=-1), F.normalize(teacher_patches.float(), dim=-1)
    if not image_level:
        student, teacher = student.flatten(0, -2), teacher.flatten(0, -2)
    student_sim, teacher_sim = student @ student.transpose(-1, -2), teacher @ teacher.transpose(-1, -2)
    if remove_neg:
        student_sim, teacher_sim = student_sim.clamp_min(0), teacher_sim.clamp_min(0)
    return F.mse_loss(student_sim, teacher_sim)


def info_nce(query: Tensor, key: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo v3's contrastive loss: each query against the keys of the whole global batch (gathered
    from every rank, without gradients), its own key the positive; scaled by 2 x temperature."""
    q = F.normalize(query, dim=1)
    k = gather_no_grad(F.normalize(key, dim=1))
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, _global_index(q.shape[0], q.device)) * (2 * temperature)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent over the 2N views of the global batch: each view's positive is the other
    view of its image, its negatives the other 2N - 2 views (gathered from every rank with
    gradients); averaged over this rank's 2n anchors."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = torch.cat([gather_with_grad(z[:n]), gather_with_grad(z[n:])])  # (2N, d): all z1, all z2
    total = candidates.shape[0] // 2
    logits = z @ candidates.T / temperature
    idx = _global_index(n, z.device)
    own = torch.cat([idx, idx + total])
    positive = torch.cat([idx + total, idx])
    logits[torch.arange(2 * n, device=z.device), own] = float("-inf")
    return F.cross_entropy(logits, positive)


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy as open_clip computes it with ``--gather-with-grad
    --local-loss`` (``open_clip/loss.py`` ``ClipLoss``): this rank's images scored against the
    texts of the whole global batch and its texts against all images (gathered from every rank
    with gradients), each pair's own partner the positive; the mean of the two losses.

    image, text: (n, d) L2-normalised embeddings of this rank's pairs; logit_scale: exp of the
    learned log-scale (1 / temperature)."""
    labels = _global_index(image.shape[0], image.device)
    per_image = logit_scale * image @ gather_with_grad(text).T
    per_text = logit_scale * text @ gather_with_grad(image).T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def _global_index(n: int, device: torch.device) -> Tensor:
    """Indices of this rank's n samples in a batch gathered from every rank."""
    return torch.arange(n, device=device) + world()[0] * n


def feature_distillation_loss(student: Tensor, teacher: Tensor, beta: float = 2.0) -> Tensor:
    """Feature distillation (Wei et al., 2022, "Contrastive Learning Rivals Masked Image Modeling in
    Fine-tuning via Feature Distillation"; SwinTransformer/Feature-Distillation
    ``models/feature_distillation.py`` L127-128, L162-165): the teacher's features whitened per
    token by a LayerNorm without affine parameters (eps 1e-5), then smooth-L1 with ``beta`` 2 to
    the student's projected features, averaged over every token and channel.

    student, teacher: (..., D), the student already mapped to the teacher's width."""
    target = F.layer_norm(teacher.float(), teacher.shape[-1:])
    return F.smooth_l1_loss(student.float(), target, beta=beta)
