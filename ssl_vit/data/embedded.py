"""The embedded datasets, generated deterministically from a seed, so the quickstart, the tests
and the quality benchmark need no download.

- ``shapes`` (the default): ten classes of flat-coloured shapes and regular textures. Every image
  gets random foreground and background colours, background noise, position, scale, rotation and
  sometimes a distractor stroke, so raw pixels are a weak baseline: a representation must capture
  shape, not colour or position, to classify it.
- ``glyphs``: the digits 0-9 in Pillow's bundled font over coloured 1/f noise (the power spectrum
  of natural images) with a smaller letter as clutter. Different content and statistics from
  ``shapes``: thin strokes, textured backgrounds, no regular patterns. Recipes are never tuned on
  it; it is the second dataset that checks that they are not tuned to ``shapes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASSES = (
    "disk",
    "square",
    "triangle",
    "plus",
    "ring",
    "star",
    "stripes",
    "checkerboard",
    "dots",
    "frame",
)
SPLITS = {"train": 500, "val": 100}  # images per class
_SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges


def shapes_image(label: int, rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, Image.Image, str]:
    """One image of class ``label`` drawn with randomness from ``rng``, its label map (``label +
    1`` on the shape's pixels, on every pixel for the textures, which fill the image; 0, the
    background, elsewhere and under the distractor stroke) and its caption, made from what was
    drawn: "a small red ring on a blue background, top left, crossed by a green stroke"."""
    s = size * _SUPERSAMPLE
    fg, bg = _contrasting_colours(rng)
    img = Image.new("RGB", (s, s), bg)
    mask = Image.new("L", (s, s), 0)
    draws = (ImageDraw.Draw(img), ImageDraw.Draw(mask))
    fills = (fg, label + 1)
    name = CLASSES[label]
    if name in ("stripes", "checkerboard", "dots"):
        img = _texture(name, rng, s, fg, bg)
        mask = Image.new("L", (s, s), label + 1)
        caption = f"{colour_name(fg)} {name} on {colour_name(bg)}"
    else:
        radius = s * rng.uniform(0.18, 0.4)
        cx, cy = rng.uniform(radius * 0.7, s - radius * 0.7, size=2)
        size_word = "small" if radius < 0.29 * s else "large"
        caption = f"a {size_word} {colour_name(fg)} {name} on {_a(colour_name(bg))} background, {_place(cx, cy, s)}"
        angle = rng.uniform(0, 2 * math.pi)
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        for draw, fill in zip(draws, fills, strict=True):  # the same geometry on the image and the map
            if name == "disk":
                draw.ellipse(box, fill=fill)
            elif name == "ring":
                draw.ellipse(box, outline=fill, width=int(radius * 0.3))
            elif name == "square":
                draw.polygon(_regular_polygon(cx, cy, radius, 4, angle), fill=fill)
            elif name == "frame":
                draw.polygon(_regular_polygon(cx, cy, radius, 4, angle), outline=fill, width=int(radius * 0.3))
            elif name == "triangle":
                draw.polygon(_regular_polygon(cx, cy, radius, 3, angle), fill=fill)
            elif name == "star":
                draw.polygon(_star(cx, cy, radius, angle), fill=fill)
            elif name == "plus":
                for a in (angle, angle + math.pi / 2):
                    dx, dy = radius * math.cos(a), radius * math.sin(a)
                    draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fill, width=int(radius * 0.45))
    if rng.random() < 0.5:  # a distractor stroke in a third colour
        x0, y0, x1, y1 = rng.uniform(0, s, size=4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        ImageDraw.Draw(img).line([x0, y0, x1, y1], fill=colour, width=s // 24)
        ImageDraw.Draw(mask).line([x0, y0, x1, y1], fill=0, width=s // 24)
        caption += f", crossed by {_a(colour_name(colour))} stroke"
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    sigma = rng.uniform(0, 20)
    noise = rng.normal(0, sigma, size=(size, size, 3))
    image = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    return image, _majority_downsample(mask, _SUPERSAMPLE), caption + (", noisy" if sigma > 10 else "")


GLYPH_CLASSES = tuple("0123456789")
_CLUTTER = "ABCDEFGHKLMNPRSTUVWXYZ"


def glyphs_image(label: int, rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, Image.Image, str]:
    """One image of digit ``label`` drawn with randomness from ``rng``, its label map (``label + 1``
    on the digit's pixels, 0, the background with the clutter letter, elsewhere) and its caption:
    "the digit 7 in red over a letter K on blue noise"."""
    s = size * _SUPERSAMPLE
    fg, bg = _contrasting_colours(rng)
    img = Image.fromarray(_pink_noise(rng, s, bg))
    clutter = _CLUTTER[rng.integers(len(_CLUTTER))]
    clutter_colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    for text, height, colour, reach in (
        (clutter, rng.uniform(0.25, 0.4), clutter_colour, 0.5),  # anywhere, partly off the image
        (GLYPH_CLASSES[label], rng.uniform(0.5, 0.8), fg, 0.25),
    ):
        font = ImageFont.load_default(size=int(s * height))
        layer = Image.new("L", (s, s), 0)
        ImageDraw.Draw(layer).text(
            (s / 2, s / 2), text, fill=255, font=font, anchor="mm", stroke_width=int(s * rng.uniform(0, 0.03))
        )
        layer = layer.rotate(rng.uniform(-30, 30), resample=Image.Resampling.BICUBIC)
        dx, dy = rng.uniform(-reach, reach, size=2) * s * (1 - height)
        layer = layer.transform(layer.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy))
        img.paste(Image.new("RGB", (s, s), colour), mask=layer)
    mask = Image.fromarray(np.where(np.asarray(layer) >= 128, label + 1, 0).astype(np.uint8))  # the digit's layer
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    noise = rng.normal(0, rng.uniform(0, 12), size=(size, size, 3))
    image = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    caption = (
        f"the digit {GLYPH_CLASSES[label]} in {colour_name(fg)} over a letter {clutter} on {colour_name(bg)} noise"
    )
    return image, _majority_downsample(mask, _SUPERSAMPLE), caption


DATASETS = {"shapes": (CLASSES, shapes_image), "glyphs": (GLYPH_CLASSES, glyphs_image)}


class EmbeddedSample(NamedTuple):
    image: Image.Image
    label_map: Image.Image
    label: int
    caption: str


def embedded_samples(split: str, seed: int = 0, size: int = 32, dataset: str = "shapes") -> Iterator[EmbeddedSample]:
    """All samples of a split of an embedded dataset, classes interleaved; sample i depends only
    on (seed, split, i), so any subset can be regenerated."""
    classes, draw = DATASETS[dataset]
    per_class = SPLITS[split]
    split_id = list(SPLITS).index(split)
    for i in range(per_class * len(classes)):
        label = i % len(classes)
        image, label_map, caption = draw(label, np.random.default_rng([seed, split_id, i]), size)
        yield EmbeddedSample(image, label_map, label, caption)


#: Colour names for captions, at their sRGB values.
COLOUR_NAMES = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 40, 200),
    "orange": (245, 140, 20),
    "purple": (120, 40, 160),
    "brown": (130, 80, 30),
    "pink": (250, 160, 190),
    "dark green": (20, 80, 30),
    "navy": (20, 30, 100),
}


def colour_name(rgb: tuple[int, ...]) -> str:
    """The name in ``COLOUR_NAMES`` nearest to an RGB colour."""
    return min(COLOUR_NAMES, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOUR_NAMES[name], rgb, strict=True)))


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _place(cx: float, cy: float, s: int) -> str:
    """Where a shape's centre is: "centre", or "top left" and the like."""
    if abs(cx - s / 2) < 0.15 * s and abs(cy - s / 2) < 0.15 * s:
        return "centre"
    return f"{'top' if cy < s / 2 else 'bottom'} {'left' if cx < s / 2 else 'right'}"


def mask_classes(dataset: str) -> list[str]:
    """The names of an embedded dataset's label-map values: 0 is the background, c + 1 class c."""
    return ["background", *DATASETS[dataset][0]]


def _majority_downsample(mask: Image.Image, factor: int) -> Image.Image:
    """A label map drawn ``factor`` times larger, reduced to the image's size: each pixel takes
    the most frequent label of its factor x factor block (the image's anti-aliased edges average
    the same block)."""
    labels = np.asarray(mask)
    h, w = labels.shape[0] // factor, labels.shape[1] // factor
    blocks = labels.reshape(h, factor, w, factor).transpose(0, 2, 1, 3).reshape(h, w, -1)
    counts = np.stack([(blocks == v).sum(-1) for v in range(int(labels.max()) + 1)], axis=-1)
    return Image.fromarray(counts.argmax(-1).astype(np.uint8))


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        if np.abs(fg - bg).sum() > 180:
            return tuple(int(c) for c in fg), tuple(int(c) for c in bg)


def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        rk = r if k % 2 == 0 else r * 0.42
        a = angle + math.pi * k / 5
        points.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
    return points


def _texture(name: str, rng: np.random.Generator, s: int, fg: tuple, bg: tuple) -> Image.Image:
    period = s * rng.uniform(0.12, 0.25)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
    v = -xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, period)
    if name == "stripes":
        on = (u % period) < period / 2
    elif name == "checkerboard":
        on = ((u // period) + (v // period)) % 2 == 0
    else:  # dots on a rotated lattice
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        on = du**2 + dv**2 < (period * 0.28) ** 2
    pixels = np.where(on[..., None], np.array(fg), np.array(bg)).astype(np.uint8)
    return Image.fromarray(pixels)


def _pink_noise(rng: np.random.Generator, s: int, mean: tuple[int, ...]) -> np.ndarray:
    """An (s, s, 3) uint8 image of 1/f noise around colour ``mean``: amplitude falling as
    1 / frequency, as in natural images, with a random contrast per channel."""
    fy, fx = np.meshgrid(np.fft.fftfreq(s), np.fft.fftfreq(s), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / s)
    spectrum = amplitude[..., None] * np.exp(2j * np.pi * rng.random((s, s, 3)))
    field = np.fft.ifft2(spectrum, axes=(0, 1)).real
    field = (field - field.mean(axis=(0, 1))) / field.std(axis=(0, 1))
    pixels = np.array(mean, dtype=np.float64) + field * rng.uniform(10, 40, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)
