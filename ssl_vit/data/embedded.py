"""The embedded default dataset, "shapes": ten classes of shapes and textures, generated
deterministically from a seed, so the quickstart and the tests need no download.

Every image gets random foreground and background colours, background noise, position, scale,
rotation and sometimes a distractor stroke, so raw pixels are a weak baseline: a representation
must capture shape, not colour or position, to classify it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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


def shapes_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of class ``label`` drawn with randomness from ``rng``."""
    s = size * _SUPERSAMPLE
    fg, bg = _contrasting_colours(rng)
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    name = CLASSES[label]
    if name in ("stripes", "checkerboard", "dots"):
        img = _texture(name, rng, s, fg, bg)
    else:
        radius = s * rng.uniform(0.18, 0.4)
        cx, cy = rng.uniform(radius * 0.7, s - radius * 0.7, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        if name == "disk":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fg)
        elif name == "ring":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=fg, width=int(radius * 0.3))
        elif name == "square":
            draw.polygon(_regular_polygon(cx, cy, radius, 4, angle), fill=fg)
        elif name == "frame":
            draw.polygon(_regular_polygon(cx, cy, radius, 4, angle), outline=fg, width=int(radius * 0.3))
        elif name == "triangle":
            draw.polygon(_regular_polygon(cx, cy, radius, 3, angle), fill=fg)
        elif name == "star":
            draw.polygon(_star(cx, cy, radius, angle), fill=fg)
        elif name == "plus":
            for a in (angle, angle + math.pi / 2):
                dx, dy = radius * math.cos(a), radius * math.sin(a)
                draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=int(radius * 0.45))
    if rng.random() < 0.5:  # a distractor stroke in a third colour
        x0, y0, x1, y1 = rng.uniform(0, s, size=4)
        draw = ImageDraw.Draw(img)
        draw.line([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=s // 24)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    noise = rng.normal(0, rng.uniform(0, 20), size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def shapes_samples(split: str, seed: int = 0, size: int = 32) -> Iterator[tuple[Image.Image, int]]:
    """All (image, label) pairs of a split, classes interleaved; image i depends only on
    (seed, split, i), so any subset can be regenerated."""
    per_class = SPLITS[split]
    split_id = list(SPLITS).index(split)
    for i in range(per_class * len(CLASSES)):
        label = i % len(CLASSES)
        yield shapes_image(label, np.random.default_rng([seed, split_id, i]), size), label


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
