"""What a run shows: picture grids of what the objective does to a fixed set of validation images
(each objective's ``pictures``), loss and k-NN curves, and a 2-D map of the validation features.

Pictures are PNG files in the run's ``pictures/`` folder, and images in the run's logger
(TensorBoard, or Weights & Biases). Everything is drawn with matplotlib's object API on the Agg
canvas (no pyplot): no window opens, and no figure outlives the call that draws it.
"""

from __future__ import annotations

import itertools
import logging
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, PngImagePlugin
from torch import Tensor
from torchvision.utils import make_grid

from ssl_vit.data.pipeline import ShardDataset
from ssl_vit.data.shards import resolve_shards
from ssl_vit.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalView
from ssl_vit.encoder import ViTEncoder
from ssl_vit.masking import patch_mask_to_pixels
from ssl_vit.periodic import Periodic
from ssl_vit.replace import file_in_one_step

log = logging.getLogger(__name__)

#: The PNG text entry that marks a picture as drawn by a run: a file of the same name without it
#: is someone else's, and a run does not replace it.
DRAWN_BY = ("Software", "ssl-vit")

#: Ten distinguishable colours (Tableau 10, RGB in [0, 1]), for I-JEPA's target blocks.
PALETTE = matplotlib.colormaps["tab10"].colors

#: Plots are small: 100 dpi keeps a chart at 640 x 400 pixels and cheap to draw during training.
DPI = 100
#: Font sizes (points) of a picture grid's title and column headers.
TITLE_POINTS, HEADER_POINTS = 9, 8


def picture_folder(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "pictures"


def render(figure: Figure) -> Image.Image:
    """The figure drawn on the Agg canvas, as an RGB image."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def drawn_by_a_run(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.text.get(DRAWN_BY[0]) == DRAWN_BY[1]
    except (OSError, ValueError):  # not an image at all
        return False


def save_picture(trainer: L.Trainer, name: str, picture: Figure | Image.Image) -> Path | None:
    """Write ``pictures/<name>-step=N.png`` (whole or not at all) and log it to the run's logger.
    A file of that name that no run drew is left as it is, and the picture is not written there."""
    if isinstance(picture, Figure):
        picture = render(picture)
    folder = picture_folder(trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-step={trainer.global_step:08d}.png"
    written = not path.exists() or drawn_by_a_run(path)
    if written:
        mark = PngImagePlugin.PngInfo()
        mark.add_text(*DRAWN_BY)
        with file_in_one_step(path) as tmp:
            picture.save(tmp, format="PNG", pnginfo=mark)
    else:
        log.warning("%s is not a picture a run drew: it is left as it is, and this %s picture is not saved", path, name)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            array = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
            logger.experiment.add_image(f"pictures/{name}", array, trainer.global_step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=f"pictures/{name}", images=[picture], step=trainer.global_step)
    return path if written else None


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


class Columns(list):
    """A picture's columns of displayable (B, 3, H, W) images in [0, 1], with the picture's title and
    a header per column; a plain list of columns (an objective's own picture) is drawn too."""

    def __init__(self, columns: Sequence[Tensor], title: str, headers: Sequence[str]) -> None:
        super().__init__(columns)
        if len(headers) != len(columns):
            raise ValueError(f"{len(columns)} columns but {len(headers)} headers")
        self.title = title
        self.headers = list(headers)


def grid_heading(title: str, headers: Sequence[str], centres: Sequence[float], width: int) -> Figure:
    """A white strip ``width`` pixels wide: the title, and under it each column's header centred
    on its column (``centres``, in pixels from the left). Its texts are the title, then the headers."""
    # A narrow grid (two columns) wraps its title rather than cut it; about 7 pixels a character.
    title = "\n".join(textwrap.wrap(title, width=max(20, width // 7)))
    line_height = 1.3 / 72 * DPI  # pixels per point of text
    title_height = (title.count("\n") + 1) * TITLE_POINTS * line_height
    header_height = max(header.count("\n") + 1 for header in headers) * HEADER_POINTS * line_height
    height = round(title_height + header_height + 12)
    # Agg rounds the canvas size down: half a pixel more keeps inches * DPI from losing a pixel.
    figure = Figure(figsize=((width + 0.5) / DPI, (height + 0.5) / DPI), dpi=DPI)
    figure.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=TITLE_POINTS)
    for centre, header in zip(centres, headers, strict=True):
        figure.text(centre / width, 2 / height, header, ha="center", va="bottom", fontsize=HEADER_POINTS)
    return figure


def picture_grid(columns: Sequence[Tensor], title: str = "") -> Image.Image:
    """One row per image, one column per entry of ``columns`` (each (B, 3, H, W) in [0, 1]), under
    the title and the column headers of a :class:`Columns` (else ``title`` and "column i")."""
    headers = getattr(columns, "headers", [f"column {i + 1}" for i in range(len(columns))])
    title = getattr(columns, "title", title)
    b, _, _, width = columns[0].shape
    padding, margin = 2, 8  # pixels: between the cells; around the grid
    cells = torch.stack(list(columns), dim=1).reshape(b * len(columns), *columns[0].shape[1:])
    grid = make_grid(cells.cpu().float(), nrow=len(columns), padding=padding, pad_value=1.0)
    scale = max(1, 96 // width)  # tiny images are enlarged to be seen
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    pixels = np.pad(pixels, ((0, margin), (margin, margin), (0, 0)), constant_values=255)
    # Only the text is drawn by matplotlib: pasting the grid through a figure resamples it, which
    # costs seconds for a ViT-B's 8 x 13 attention grid on the 2-core machines that train.
    centres = [margin + scale * (padding + (width + padding) * i + width / 2) for i in range(len(columns))]
    heading = render(grid_heading(title, headers, centres, pixels.shape[1]))
    return Image.fromarray(np.concatenate([np.asarray(heading), pixels]))


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


def attention_columns(encoder: ViTEncoder, images: Tensor) -> Columns:
    """The images, then one column per head of the last block's attention over them."""
    maps = last_block_attention(encoder, images)
    shown = to_display(images)
    columns = [shown, *(heatmap_overlay(shown, maps[:, head]) for head in range(maps.shape[1]))]
    query = "the CLS token's attention" if encoder.has_class_token else "the attention each patch receives"
    legend = "yellow\N{NO-BREAK SPACE}=\N{NO-BREAK SPACE}most"  # kept on one line when the title wraps
    title = f"{query} in the last block (block {len(encoder.vit.blocks)}), per head: {legend}"
    return Columns(columns, title, ["image", *(f"head {head + 1}" for head in range(maps.shape[1]))])


@torch.no_grad()
def patch_pca(encoder: ViTEncoder, images: Tensor) -> Tensor:
    """DINOv2's picture of patch features: the first three principal components of the
    last-block patch tokens of all ``images`` together (one PCA for the batch, so colours compare
    across images), each min-max scaled to [0, 1] and shown as R, G, B; (B, 3, h, w)."""
    h, w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    return pca_colours(encoder(images).patches.float(), (h, w))[0]


def pca_colours(tokens: Tensor, grid: tuple[int, int], *others: Tensor) -> list[Tensor]:
    """(B, h*w, D) ``tokens`` as (B, 3, h, w) colours: their first three principal components,
    min-max scaled to [0, 1] over the batch; and ``others`` (tokens of the same shape) on the same
    components and scale, so that equal colours mean equal features."""
    b, n, d = tokens.shape
    flat = tokens.reshape(b * n, d)
    mean = flat.mean(dim=0)
    _, _, components = torch.linalg.svd(flat - mean, full_matrices=False)

    def project(x: Tensor) -> Tensor:  # (B*h*w, 3), zero-padded when there are fewer components
        projected = (x.reshape(b * n, d) - mean) @ components[:3].T
        return F.pad(projected, (0, 3 - projected.shape[1]))

    reference = project(tokens)
    low, high = reference.min(dim=0).values, reference.max(dim=0).values
    scaled = [((project(x) - low) / (high - low).clamp_min(1e-6)).clamp(0, 1) for x in (tokens, *others)]
    return [x.reshape(b, *grid, 3).permute(0, 3, 1, 2) for x in scaled]


def pca_columns(encoder: ViTEncoder, images: Tensor) -> Columns:
    """The images, then the first three principal components of their patch features as RGB."""
    maps = patch_pca(encoder, images)
    columns = [to_display(images), F.interpolate(maps, size=images.shape[-2:], mode="nearest")]
    title = f"patch features of the last block (block {len(encoder.vit.blocks)}): one PCA over all rows"
    return Columns(columns, title, ["image", "principal\ncomponents\n1, 2, 3 = R, G, B"])


def reconstruction_columns(images: Tensor, reconstruction: Tensor, pixel_mask: Tensor) -> Columns:
    """MAE's visualisation: original, masked input (masked pixels grey), reconstruction, and the
    reconstruction pasted into the visible pixels. ``pixel_mask``: (B, 1, H, W), 1 = masked."""
    shown, rebuilt = to_display(images), to_display(reconstruction)
    masked = shown * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = shown * (1 - pixel_mask) + rebuilt * pixel_mask
    title = f"reconstruction of the masked patches ({pixel_mask.float().mean().item():.0%} masked, grey)"
    headers = ["original", "masked input", "reconstruction", "reconstruction\n+ visible pixels"]
    return Columns([shown, masked, rebuilt, pasted], title, headers)


def context_target_columns(images: Tensor, context_idx: Tensor, target_idx: Tensor, patch_size: int) -> Columns:
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
        colour = torch.tensor(PALETTE[i % len(PALETTE)], device=images.device).view(1, 3, 1, 1)
        block = pixels(idx)
        targets = targets * (1 - block) + (0.5 * shown + 0.5 * colour) * block
    title = f"I-JEPA's blocks: the context the encoder sees, the {len(target_idx)} targets it predicts"
    headers = ["image", "context\n(the rest grey)", "targets\n(a colour each)"]
    return Columns([shown, shown * context + 0.5 * (1 - context), targets], title, headers)


#: A series whose name ends with "%" is a percentage: its axis spans at least 10 points, in [0, 100].
PERCENT_MIN_SPAN = 10.0
#: Otherwise the y-axis spans at least this fraction of the largest |value|: a loss going from 5.0
#: to 4.9 takes a fifth of the axis, not all of it, and a flat curve stays flat.
RELATIVE_MIN_SPAN = 0.1


def honest_limits(
    values: Sequence[float], min_span: float, bounds: tuple[float, float] | None = None
) -> tuple[float, float]:
    """y-axis limits around ``values`` that span at least ``min_span`` (centred on the data, plus a
    5% margin), moved inside ``bounds`` where given, so a small change looks small."""
    low, high = min(values), max(values)
    span = max(high - low, min_span, 1e-12)
    centre = (low + high) / 2
    low, high = centre - 0.55 * span, centre + 0.55 * span
    if bounds is not None:  # slide the window inside the bounds, then cut what still sticks out
        shift = max(0.0, bounds[0] - low) - max(0.0, high - bounds[1])
        low, high = max(bounds[0], low + shift), min(bounds[1], high + shift)
    return low, high


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    y_label: str = "",
    min_span: float | None = None,
    y_bounds: tuple[float, float] | None = None,
) -> Figure:
    """Each named series of (step, value) points as a line, with a legend, under ``title``. The
    y-axis spans at least ``min_span`` (default: 10 points for a series named "... %", which also
    bounds it to [0, 100], else a tenth of the largest |value|), inside ``y_bounds``."""
    figure = Figure(figsize=(6.4, 4.0), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("step")
    percent = any(name.rstrip().endswith("%") for name in series)
    axes.set_ylabel(y_label or ("%" if percent else "value"))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    values = [y for points in series.values() for _, y in points]
    if not values:
        axes.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes.transAxes)
        return figure
    for name, points in series.items():
        if points:
            steps, ys = zip(*points, strict=True)
            axes.plot(steps, ys, marker="o", markersize=3, linewidth=1.5, label=name)
    axes.legend(loc="best", fontsize=8)
    steps = [x for points in series.values() for x, _ in points]
    if min(steps) == max(steps):  # one step so far: tick it alone, not fractions of a step around it
        axes.set_xticks([steps[0]])
    if percent:
        min_span, y_bounds = min_span or PERCENT_MIN_SPAN, y_bounds or (0.0, 100.0)
    else:
        min_span = min_span if min_span is not None else RELATIVE_MIN_SPAN * max(abs(y) for y in values)
    axes.set_ylim(honest_limits(values, min_span, y_bounds))
    return figure


def pca_2d(features: Tensor) -> tuple[Tensor, list[float]]:
    """The features' projection on their first two principal components, (N, 2), and the fraction
    of the variance each explains."""
    centred = features.float() - features.float().mean(dim=0)
    _, singular, v = torch.linalg.svd(centred, full_matrices=False)
    variance = singular**2 / (singular**2).sum().clamp_min(1e-12)
    points, variance = centred @ v[:2].T, variance[:2].tolist()
    # A single image (or one feature) has fewer than two components: the missing ones are 0.
    points = torch.nn.functional.pad(points, (0, 2 - points.shape[1]))
    return points, variance + [0.0] * (2 - len(variance))


def shard_class_names(shards: str) -> list[str] | None:
    """The class names in the index of ``shards`` (a folder written by ``ssl-vit shards``), if any."""
    _, index = resolve_shards(shards)
    return list(index.classes) if index is not None and index.classes else None


#: Above this many classes a legend would hide the points: the title says the count instead.
MAX_LEGEND_CLASSES = 20


def embedding_picture(
    features: Tensor,
    labels: Tensor,
    title: str,
    class_names: Sequence[str] | None = None,
    max_points: int = 2000,
) -> Figure:
    """PCA of (at most ``max_points``, evenly spaced) features, coloured by class, with a legend of
    the class names (``class_names[label]``, else the label; -1 = unlabelled)."""
    step = max(1, math.ceil(len(features) / max_points))
    points, variance = pca_2d(features[::step])
    labels = labels[::step]
    figure = Figure(figsize=(6.4, 5.2), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    classes = sorted(labels.unique().tolist())
    colours = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"].colors
    for i, label in enumerate(classes):
        chosen = labels == label
        if label < 0:
            name, colour = "unlabelled", "black"
        else:
            name = class_names[label] if class_names is not None and label < len(class_names) else f"class {label}"
            colour = colours[i % len(colours)]
        axes.scatter(*points[chosen].T.tolist(), s=8, color=colour, label=name, alpha=0.8, linewidths=0)
    if len(classes) <= MAX_LEGEND_CLASSES:
        axes.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, markerscale=2)
    else:
        title = f"{title} ({len(classes)} classes, colours reused)"
    axes.set_title(title)
    axes.set_xlabel(f"principal component 1 ({variance[0]:.0%} of variance)")
    axes.set_ylabel(f"principal component 2 ({variance[1]:.0%} of variance)")
    axes.grid(alpha=0.3)
    return figure


def held_images(shards: str, size: int, num_images: int) -> Tensor | None:
    """The first ``num_images`` images of ``shards`` through the evaluation view: the same images
    every time, so a measurement over the run changes only because the model does."""
    urls, _ = resolve_shards(shards)
    dataset = ShardDataset(urls, EvalView(size), shuffle_shards=False)
    images = [image for image, _ in itertools.islice(dataset, num_images)]
    return torch.stack(images) if images else None


class PicturesCallback(Periodic):
    """Every ``every_n_steps`` steps or ``every_n_epochs`` epochs (:class:`~ssl_vit.periodic.Periodic`)
    and at the end of a run: the objective's pictures of the same ``num_images`` images (the first
    ones of ``shards``; default: the run's evaluation data, ``ShardDataModule.evaluation_data``),
    and the loss curve, in ``pictures/`` and the logger.

    An objective draws by implementing ``pictures(images) -> {name: [column, ...]}`` (columns of
    displayable (B, 3, H, W) images in [0, 1]); MAE and SimMIM draw reconstructions, DINO its
    attention maps.
    """

    def __init__(
        self, shards: str | None = None, num_images: int = 8, every_n_steps: int = 0, every_n_epochs: int = 0
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.shards = shards
        self.num_images = num_images
        self.images: Tensor | None = None
        self.losses: list[tuple[int, float]] = []
        # drawn too, so that a run shorter than the log interval has a curve
        self.latest: tuple[int, Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        size = pl_module.evaluated_encoder.image_size
        self.images = held_images(self.shards or trainer.datamodule.evaluation_data()[1], size, self.num_images)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        if outputs is not None:
            self.latest = (trainer.global_step, outputs["loss"].detach())
            if trainer.global_step % trainer.log_every_n_steps == 0 or trainer.global_step == 1:
                self.losses.append((trainer.global_step, float(outputs["loss"])))
        super().on_train_batch_end(trainer, pl_module, outputs, *args)

    def periodic(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.latest is not None and (not self.losses or self.losses[-1][0] < self.latest[0]):
            self.losses.append((self.latest[0], float(self.latest[1])))
        title = f"{type(pl_module).__name__} training loss"
        save_picture(trainer, "loss", line_chart({"train/loss": self.losses}, title, y_label="loss"))
        if self.images is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the same masks each time, the run's RNG untouched
            torch.manual_seed(0)
            pictures = pl_module.pictures(self.images.to(pl_module.device))
        pl_module.train(was_training)
        for name, columns in pictures.items():
            save_picture(trainer, name, picture_grid(columns, title=name))

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [tuple(point) for point in state_dict.get("losses", [])]
