"""CLIP (Radford et al., 2021) as open_clip trains it (``src/open_clip/model.py``, ``loss.py``,
``src/open_clip_train/train.py``, ``params.py``): the shared timm ViT as the image tower,
open_clip's text transformer as the text tower, both projected to one width and L2-normalised,
and a symmetric cross-entropy over the image-text pairs of the global batch at a learned
temperature.

A batch is ``(images, tokens)``: the images and their captions as open_clip's BPE token ids,
``(B, context_length)`` (``open_clip.tokenizer.SimpleTokenizer``, whose vocabulary ships inside
the ``open-clip-torch`` wheel: nothing is downloaded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from ssl_vit.encoder import EncoderConfig
from ssl_vit.errors import UserError
from ssl_vit.losses import clip_loss
from ssl_vit.methods.base import SSLMethod
from ssl_vit.schedules import PaperRun

try:
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import TextTransformer
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
except ImportError as err:  # the `clip` extra
    raise UserError(f"CLIP's text tower is open_clip's ({err}): pip install 'ssl-vit[clip]'") from err

#: open_clip's ViT-B/32 on LAION-400M: 32 epochs at a global batch of 32,768.
LAION_STEPS_PER_EPOCH = 400_000_000 // 32_768


class CaptionTokens:
    """A caption -> its ``context_length`` token ids as open_clip tokenises it (``SimpleTokenizer``:
    cleaned, lower-cased BPE between start- and end-of-text tokens, zero-padded; a longer caption
    is cut so that the end-of-text token stays last), and whether it was cut. Plain and
    picklable: the loader workers run it (``ShardDataset``'s ``captions``)."""

    def __init__(self, context_length: int) -> None:
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length

    def __call__(self, caption: str) -> tuple[Tensor, bool]:
        # SimpleTokenizer.__call__'s truncation, on one encoding that also tells whether it cut
        words = self.tokenizer.encode(caption)
        cut = len(words) + 2 > self.context_length  # + start and end of text
        kept = [self.tokenizer.sot_token_id, *words][: self.context_length - 1]
        ids = [*kept, self.tokenizer.eot_token_id]
        tokens = torch.zeros(self.context_length, dtype=torch.long)
        tokens[: len(ids)] = torch.tensor(ids)
        return tokens, cut


class CLIP(SSLMethod):
    """CLIP pretraining: the ViT's pooled embedding (timm's ``forward_head(pre_logits=True)``: the
    CLS token after the final norm, as open_clip's ViTs pool) times a projection matrix, and
    open_clip's ``TextTransformer`` (causal attention, the end-of-text token's embedding,
    projected), both L2-normalised; logits = exp(logit_scale) x cosine similarity.

    Args:
        embed_dim: the shared width both towers project to (512 for ViT-B).
        context_length, vocab_size, text_width, text_heads, text_layers: the text tower
            (open_clip's ViT-B text config: 77 tokens, 49,408 BPE tokens, 512 wide, 8 heads, 12 layers).
        init_logit_scale: log(1 / temperature) at the start, ln(1 / 0.07) as in open_clip; the
            scale is learned and clamped to ``max_logit_scale`` (ln 100) after every optimiser step.
        base_lr, weight_decay, warmup_epochs, min_lr, betas: open_clip's ``params.py`` defaults
            for ViTs (lr 5e-4 at any batch, AdamW betas 0.9 / 0.98, eps 1e-6), weight decay 0.2 and
            its 10,000 warm-up steps as epochs of the paper run, cosine to 0.
    """

    paper_run = PaperRun(epochs=32, steps_per_epoch=LAION_STEPS_PER_EPOCH)
    lr_batch_rule: ClassVar = "none"  # open_clip's --lr is the lr, whatever the batch
    adam_eps: ClassVar[float] = 1e-6

    def __init__(
        self,
        encoder: EncoderConfig,
        embed_dim: int = 512,
        context_length: int = 77,
        vocab_size: int = 49408,
        text_width: int = 512,
        text_heads: int = 8,
        text_layers: int = 12,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        base_lr: float = 5e-4,
        weight_decay: float = 0.2,
        warmup_epochs: float = 10_000 / LAION_STEPS_PER_EPOCH,
        min_lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        init_from: str | None = None,
        scale_to_run: bool = True,
    ) -> None:
        super().__init__(
            encoder, base_lr, weight_decay, warmup_epochs, min_lr, betas, init_from=init_from, scale_to_run=scale_to_run
        )
        width = self.encoder.embed_dim
        # open_clip's VisionTransformer.proj: a (width, embed_dim) matrix drawn at width^-0.5
        self.image_projection = nn.Parameter(width**-0.5 * torch.randn(width, embed_dim))
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=text_width,
            heads=text_heads,
            layers=text_layers,
            output_dim=embed_dim,
        )
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        self.caption_tokens = CaptionTokens(context_length)  # what the data module reads captions with

    def embed_images(self, images: Tensor) -> Tensor:
        pooled = self.encoder.vit.forward_head(self.encoder(images).tokens, pre_logits=True)
        return F.normalize(pooled @ self.image_projection, dim=-1)

    def embed_texts(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, tokens = batch
        image, text = self.embed_images(images), self.embed_texts(tokens)
        loss = clip_loss(image, text, self.logit_scale.exp())
        self.watch_collapse(image)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.logit_scale.exp())
        return loss

    @torch.no_grad()
    def zero_shot(self, pooled: Tensor, labels: Tensor, class_names: Sequence[str]) -> dict[str, float]:
        """Zero-shot classification as open_clip evaluates it (``zero_shot_classifier.py``
        ``build_zero_shot_classifier`` with ``zero_shot_metadata.py``'s 7 ``SIMPLE_IMAGENET_TEMPLATES``):
        each class is the normalised mean of its prompts' normalised text embeddings, each image
        goes to the class nearest its own embedding. ``pooled``: the image tower's pooled features,
        as the evaluator extracted them. Top-1 / top-5 accuracy, %."""
        prompts = [template(name) for name in class_names for template in SIMPLE_IMAGENET_TEMPLATES]
        tokens = torch.stack([self.caption_tokens(prompt)[0] for prompt in prompts]).to(self.device)
        per_prompt = self.embed_texts(tokens).reshape(len(class_names), len(SIMPLE_IMAGENET_TEMPLATES), -1)
        classes = F.normalize(per_prompt.mean(dim=1), dim=-1)
        logits = F.normalize(pooled.to(self.device) @ self.image_projection, dim=-1) @ classes.T
        labels, n = labels.to(self.device), len(class_names)

        def accuracy(k: int) -> float:
            return round(100 * multiclass_accuracy(logits, labels, n, top_k=k, average="micro").item(), 3)

        return {"top1": accuracy(1), "top5": accuracy(min(5, n))}  # top-5 over all classes when fewer, as the probes

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        # open_clip_train/train.py: clamp to [0, ln 100] after each optimiser step
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """open_clip's ``exclude``: no decay for 1-D parameters (norms, biases, its 1-D class
        embedding, which is timm's (1, 1, D) CLS token here) and the logit scale; the token and
        position embeddings and projections decay."""
        return super().decays(name, param) and name != "encoder.vit.cls_token"
