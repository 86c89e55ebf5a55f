"""What a run shows: picture grids of what the objective does to a fixed set of validation images
(each objective's ``pictures``), loss and k-NN curves, and a 2-D map of the validation features.

Pictures are PNG files in the run's ``pictures/`` folder, and images in the run's logger
(TensorBoard, or Weights & Biases). Plots are drawn with PIL, so no plotting library is needed.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from ssl_vit.data.pipeline import ShardDataset
from ssl_vit.data.shards import resolve_shards
from ssl_vit.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalView
from ssl_vit.encoder import ViTEncoder
from ssl_vit.masking import patch_mask_to_pixels

#: Ten distinguishable colours (Tableau 10) for classes and curves.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def picture_folder(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "pictures"


def save_picture(trainer: L.Trainer, name: str, picture: Image.Image) -> Path:
    """Write ``pictures/<name>-step=N.png`` (whole or not at all) and log it to the run's logger."""
    folder = picture_folder(trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-step={trainer.global_step:08d}.png"
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            array = torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).permute(2, 0, 1)
            logger.experiment.add_image(f"pictures/{name}", array, trainer.global_step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=f"pictures/{name}", images=[picture], step=trainer.global_step)
    return path


def to_display(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Normalised model input (B, 3, H, W) -> displayable [0, 1]."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * std_t + mean_t).clamp(0, 1)


def heatmap_overlay(images: Tensor, maps: Tensor) -> Tensor:
    """Blend per-image maps (B, h, w), each scaled to [0, 1], in red-yellow over displayable images."""
    maps = F.interpolate(maps.unsqueeze(1).float(), size=images.shape[-2:], mode="nearest")
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    heat = (maps - lo) / (hi - lo).clamp_min(1e-12)
    colour = torch.cat([torch.ones_like(heat), heat, torch.zeros_like(heat)], dim=1)  # red -> yellow
    return (0.4 * images.mean(dim=1, keepdim=True) + 0.6 * heat * colour).clamp(0, 1)


def picture_grid(columns: list[Tensor]) -> Image.Image:
    """One row per image, one column per entry of ``columns`` (each (B, 3, H, W) in [0, 1])."""
    b = columns[0].shape[0]
    cells = torch.stack(columns, dim=1).reshape(b * len(columns), *columns[0].shape[1:])
    grid = make_grid(cells.cpu(), nrow=len(columns), padding=2, pad_value=1.0)
    scale = max(1, 96 // columns[0].shape[-1])  # tiny images are enlarged to be seen
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(array)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


@torch.no_grad()
def last_block_attention(encoder: ViTEncoder, images: Tensor) -> Tensor:
    """The CLS token's attention over the patches in the encoder's last block, per head:
    (B, heads, h, w) (DINO's ``get_last_selfattention``); for an encoder without a CLS token
    (I-JEPA's), the attention each patch receives, averaged over all queries."""
    attn = encoder.vit.blocks[-1].attn
    captured: list[Tensor] = []
    # The unfused path passes the softmaxed weights through attn_drop, where a hook can read them.
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        encoder(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    queries = captured[0][:, :, 0] if encoder.has_class_token else captured[0].mean(dim=2)
    weights = queries[:, :, encoder.num_prefix_tokens :]
    h, w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    return weights.reshape(images.shape[0], -1, h, w)


def attention_columns(encoder: ViTEncoder, images: Tensor) -> list[Tensor]:
    """The images, then one column per head of the last block's attention over them."""
    maps = last_block_attention(encoder, images)
    shown = to_display(images)
    return [shown, *(heatmap_overlay(shown, maps[:, head]) for head in range(maps.shape[1]))]


@torch.no_grad()
def patch_pca(encoder: ViTEncoder, images: Tensor) -> Tensor:
    """DINOv2's picture of patch features: the first three principal components of the
    last-block patch tokens of all ``images`` together (one PCA for the batch, so colours compare
    across images), each min-max scaled to [0, 1] and shown as R, G, B; (B, 3, h, w)."""
    patches = encoder(images).patches.float()  # (B, h*w, D)
    b, n, d = patches.shape
    flat = patches.reshape(b * n, d)
    flat = flat - flat.mean(dim=0)
    _, _, components = torch.linalg.svd(flat, full_matrices=False)
    projected = flat @ components[:3].T  # (B*h*w, 3); fewer when D < 3
    projected = F.pad(projected, (0, 3 - projected.shape[1]))
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    projected = (projected - low) / (high - low).clamp_min(1e-6)
    h, w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    return projected.reshape(b, h, w, 3).permute(0, 3, 1, 2)


def pca_columns(encoder: ViTEncoder, images: Tensor) -> list[Tensor]:
    """The images, then the first three principal components of their patch features as RGB."""
    maps = patch_pca(encoder, images)
    return [to_display(images), F.interpolate(maps, size=images.shape[-2:], mode="nearest")]


def reconstruction_columns(images: Tensor, reconstruction: Tensor, pixel_mask: Tensor) -> list[Tensor]:
    """MAE's visualisation: original, masked input (masked pixels grey), reconstruction, and the
    reconstruction pasted into the visible pixels. ``pixel_mask``: (B, 1, H, W), 1 = masked."""
    shown, rebuilt = to_display(images), to_display(reconstruction)
    masked = shown * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = shown * (1 - pixel_mask) + rebuilt * pixel_mask
    return [shown, masked, rebuilt, pasted]


def context_target_columns(images: Tensor, context_idx: Tensor, target_idx: Tensor, patch_size: int) -> list[Tensor]:
    """I-JEPA's blocks: the images, the context the encoder sees (the other patches grey), and
    the target blocks, each in its own colour over the dimmed image. ``context_idx`` (B, Kc) and
    ``target_idx`` (T, B, Kt) are patch indices."""
    shown = to_display(images)
    b, _, height, width = images.shape
    grid = (height // patch_size, width // patch_size)

    def pixels(idx: Tensor) -> Tensor:  # (B, K) patch indices -> (B, 1, H, W) 0/1
        mask = torch.zeros(b, grid[0] * grid[1], device=images.device).scatter_(1, idx, 1.0)
        return patch_mask_to_pixels(mask.view(b, *grid), patch_size)

    context = pixels(context_idx)
    targets = 0.35 * shown
    for i, idx in enumerate(target_idx):
        colour = torch.tensor(PALETTE[i % len(PALETTE)], device=images.device).view(1, 3, 1, 1) / 255
        block = pixels(idx)
        targets = targets * (1 - block) + (0.5 * shown + 0.5 * colour) * block
    return [shown, shown * context + 0.5 * (1 - context), targets]


def line_chart(
    series: dict[str, list[tuple[float, float]]], title: str, size: tuple[int, int] = (480, 320)
) -> Image.Image:
    """Each named series of (step, value) points as a line, with its range on the axes."""
    width, height = size
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    left, right, top, bottom = 56, width - 12, 28, height - 36
    draw.text((left, 8), title, fill="black")
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((left, height // 2), "no data yet", fill="black")
        return picture
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((4, top), f"{y1:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{y0:.3g}", fill="black")
    draw.text((left, bottom + 4), f"step {x0:g}", fill="black")
    draw.text((right - 70, bottom + 4), f"step {x1:g}", fill="black")
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        line = [at(x, y) for x, y in values]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + 8 + 120 * i, bottom + 18), name, fill=colour)
    return picture


def pca_2d(features: Tensor) -> Tensor:
    """The features' projection on their first two principal components: (N, 2)."""
    centred = features.float() - features.float().mean(dim=0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def scatter_plot(points: Tensor, labels: Tensor, title: str, size: int = 420) -> Image.Image:
    """2-D points coloured by class (classes beyond ten reuse the palette)."""
    picture = Image.new("RGB", (size, size + 24), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((8, 6), title, fill="black")
    lo, hi = points.amin(dim=0), points.amax(dim=0)
    span = (hi - lo).clamp_min(1e-12)
    xy = ((points - lo) / span * (size - 24) + 12).tolist()
    for (x, y), label in zip(xy, labels.tolist(), strict=True):
        colour = PALETTE[label % len(PALETTE)] if label >= 0 else (0, 0, 0)
        draw.ellipse((x - 2, y + 22, x + 2, y + 26), fill=colour)
    return picture


def embedding_picture(features: Tensor, labels: Tensor, title: str, max_points: int = 2000) -> Image.Image:
    """PCA of (at most ``max_points``, evenly spaced) features, coloured by class."""
    step = max(1, math.ceil(len(features) / max_points))
    return scatter_plot(pca_2d(features[::step]), labels[::step], title)


def held_images(shards: str, size: int, num_images: int) -> Tensor | None:
    """The first ``num_images`` images of ``shards`` through the evaluation view: the same images
    every time, so a measurement over the run changes only because the model does."""
    urls, _ = resolve_shards(shards)
    dataset = ShardDataset(urls, EvalView(size), shuffle_shards=False)
    images = [image for image, _ in itertools.islice(dataset, num_images)]
    return torch.stack(images) if images else None


class PicturesCallback(L.Callback):
    """Every ``every_n_epochs`` epochs and at the end of a run: the objective's pictures of the
    same ``num_images`` images (the first ones of ``shards``; default: the training shards), and
    the loss curve, in ``pictures/`` and the logger.

    An objective draws by implementing ``pictures(images) -> {name: [column, ...]}`` (columns of
    displayable (B, 3, H, W) images in [0, 1]); MAE and SimMIM draw reconstructions, DINO its
    attention maps.
    """

    def __init__(self, shards: str | None = None, num_images: int = 8, every_n_epochs: int = 0) -> None:
        self.shards = shards
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.images: Tensor | None = None
        self.losses: list[tuple[int, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        size = pl_module.encoder.vit.patch_embed.img_size[0]
        self.images = held_images(self.shards or trainer.datamodule.train_shards, size, self.num_images)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0 and outputs is not None:
            self.losses.append((trainer.global_step, float(outputs["loss"])))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch != trainer.max_epochs:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        save_picture(trainer, "loss", line_chart({"train/loss": self.losses}, f"{type(pl_module).__name__} loss"))
        if self.images is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the same masks each time, the run's RNG untouched
            torch.manual_seed(0)
            pictures = pl_module.pictures(self.images.to(pl_module.device))
        pl_module.train(was_training)
        for name, columns in pictures.items():
            save_picture(trainer, name, picture_grid(columns))

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [tuple(point) for point in state_dict.get("losses", [])]
