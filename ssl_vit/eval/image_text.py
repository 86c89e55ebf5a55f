"""Image-text evaluation of a CLIP-style model, as open_clip evaluates one: zero-shot
classification from the class names (``open_clip_train/zero_shot.py``) and image <-> text
retrieval recall on captioned shards (``get_clip_metrics`` in ``open_clip_train/train.py``).
Used by the pretraining callback and by ``ssl-vit zeroshot`` alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from ssl_vit.data.pipeline import CaptionTokenizer, View, eval_loader
from ssl_vit.data.shards import resolve_shards
from ssl_vit.eval.report import label_counts


def prompt_templates() -> tuple[Callable[[str], str], ...]:
    """The 80 prompts (OpenAI's ImageNet ensemble, "a bad photo of a {}.", ...) whose text embeddings
    are averaged into one per class: what ``open_clip_train/zero_shot.py`` evaluates with. Read from
    open_clip, which every image-text model here needs for its tokenizer."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(OPENAI_IMAGENET_TEMPLATES)


RECALL_AT = (1, 5, 10)


@runtime_checkable
class ImageTextModel(Protocol):
    """What the image-text protocols need of a model: L2-normalised embeddings of images and of
    token ids, and the tokenizer that makes those ids from text."""

    caption_tokens: CaptionTokenizer

    def embed_images(self, images: Tensor) -> Tensor: ...

    def embed_texts(self, tokens: Tensor) -> Tensor: ...


def class_embeddings(model: ImageTextModel, class_names: Sequence[str], device: torch.device) -> Tensor:
    """One embedding per class: the normalised mean of its prompts' normalised text embeddings
    (open_clip's ``build_zero_shot_classifier``), (classes, D); ten classes' prompts at a time."""
    templates, per_class = prompt_templates(), []
    for start in range(0, len(class_names), 10):
        names = class_names[start : start + 10]
        prompts = [template(name) for name in names for template in templates]
        tokens = torch.stack([model.caption_tokens(prompt)[0] for prompt in prompts]).to(device)
        per_class.append(model.embed_texts(tokens).reshape(len(names), len(templates), -1).mean(dim=1))
    return F.normalize(torch.cat(per_class), dim=-1)


def zero_shot_accuracy(image: Tensor, labels: Tensor, classes: Tensor) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of each image going to the class embedding nearest its own
    (top-5 over all classes when there are fewer, as the probes)."""
    logits, n = image @ classes.T, len(classes)

    def accuracy(k: int) -> float:
        return round(100 * multiclass_accuracy(logits, labels, n, top_k=k, average="micro").item(), 3)

    return {"top1": accuracy(1), "top5": accuracy(min(5, n))}


def retrieval_recall(image: Tensor, text: Tensor) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 (%) of image -> text and text -> image retrieval over N paired embeddings:
    how often a query's own pair ranks among the first k of all N. As in open_clip's
    ``get_clip_metrics``, but a pair's rank counts only the items scoring strictly above it, so a
    caption written the same way for two images (they tie exactly) does not count against either."""
    scores = image @ text.T
    recalls = {}
    for name, s in (("image_to_text", scores), ("text_to_image", scores.T)):
        rank = (s > s.diagonal()[:, None]).sum(dim=1)  # 0 = first
        recalls[name] = {f"R@{k}": round(100 * (rank < k).float().mean().item(), 3) for k in RECALL_AT}
    return recalls


@torch.no_grad()
def _embed(model: ImageTextModel, batches: Iterable[tuple[Tensor, Tensor]], texts: bool) -> tuple[Tensor, Tensor]:
    device = next(model.parameters()).device
    images, others = [], []
    for image, other in batches:
        images.append(model.embed_images(image.to(device)).float().cpu())
        others.append(model.embed_texts(other.to(device)).float().cpu() if texts else other)
    if not images:
        return torch.empty(0), torch.empty(0)
    return torch.cat(images), torch.cat(others)


@torch.no_grad()
def evaluate_image_text(
    model: ImageTextModel,
    shards: str,
    view: View,
    class_names: Sequence[str] | None,
    batch_size: int = 256,
    num_workers: int = 2,
) -> tuple[dict[str, dict], dict[str, Any]]:
    """``zeroshot`` (when ``class_names`` name the shards' labels) and ``retrieval`` (when the
    shards have captions; the number of pairs goes with it) of ``model`` on ``shards``, in eval
    mode, through ``view``; and what the zero-shot accuracy counts (``report.label_counts``; {}
    without it)."""
    urls, index = resolve_shards(shards)
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    counts: dict[str, Any] = {}
    try:
        if class_names and len(class_names) > 1:  # zero-shot among one class scores 100 whatever the model
            labelled = eval_loader(urls, view, batch_size, num_workers)
            image, labels = _embed(model, labelled, texts=False)
            if len(image):
                classes = class_embeddings(model, class_names, next(model.parameters()).device).float().cpu()
                results["zeroshot"] = zero_shot_accuracy(image, labels.long(), classes)
                counts = label_counts(labels, len(class_names))
        if index is None or index.captions != 0:  # an index from before captions were counted: try
            pairs = eval_loader(urls, view, batch_size, num_workers, captions=model.caption_tokens)
            image, text = _embed(model, pairs, texts=True)
            if len(image) > 1:
                results["retrieval"] = {**retrieval_recall(image, text), "pairs": len(image)}
    finally:
        model.train(was_training)
    return results, counts


def no_zero_shot(shards: str) -> str:
    """The line that says why the results of ``evaluate_image_text`` on ``shards`` have no zero-shot."""
    return (
        f"zero-shot is skipped: {shards} has no class labels (or one class); give --val_shards a folder of two or "
        "more class folders for it"
    )


def no_retrieval(shards: str) -> str:
    """The line that says why the results of ``evaluate_image_text`` on ``shards`` have no retrieval."""
    return f"retrieval is skipped: fewer than two images of {shards} have a caption (photo.txt beside photo.jpg)"
