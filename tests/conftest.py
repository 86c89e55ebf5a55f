from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssl_vit.data import write_shards
from ssl_vit.methods import DINO, IJEPA, MAE, MoCoV3, SimCLR, SimMIM

TINY_ENCODER = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def random_images(n: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def numbered_shards(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """40 random PNGs in 8 shards of 5; each sample's label is its index."""
    images = random_images(40)
    samples = (("png", png_bytes(img), i) for i, img in enumerate(images))
    write_shards(samples, tmp_path / "shards", classes=[str(i) for i in range(40)], source="test", samples_per_shard=5)
    return tmp_path / "shards", images


VIEWS = {  # image tensor -> what each family of objectives takes as one sample's views
    "single": lambda x: x,
    "two": lambda x: [x, x.flip(-1)],
    "multicrop": lambda x: [x, x.flip(-1), x[:, :16, :16], x[:, 16:, 16:]],
}


class _RandomViews(Dataset):
    def __init__(self, view: str, num_images: int = 8) -> None:
        self.images, self.view = torch.randn(num_images, 3, 32, 32), VIEWS[view]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.view(self.images[i]), 0


def fit_briefly(
    method: L.LightningModule,
    view: str = "single",
    steps: int = 2,
    num_images: int = 8,
    batch_size: int = 4,
    ckpt_path: str | Path | None = None,
    **trainer_args,
) -> L.Trainer:
    """A couple of optimiser steps on random images: enough to make a real Lightning checkpoint
    (or, from ``ckpt_path``, to resume one)."""
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        **{"logger": False, "enable_progress_bar": False, **trainer_args},
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(method, DataLoader(_RandomViews(view, num_images), batch_size=batch_size), ckpt_path=ckpt_path)
    return trainer


# One (factory, views) per objective: each new objective adds its tiny configuration here.
OBJECTIVES = {
    "mae": (lambda **kw: MAE(TINY_ENCODER, decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw), "single"),
    "simmim": (lambda **kw: SimMIM(TINY_ENCODER, mask_patch_size=8, **kw), "single"),
    "dino": (lambda **kw: DINO(TINY_ENCODER, out_dim=64, hidden_dim=32, bottleneck_dim=16, **kw), "multicrop"),
    "mocov3": (lambda **kw: MoCoV3(TINY_ENCODER, hidden_dim=32, out_dim=16, **kw), "two"),
    "simclr": (lambda **kw: SimCLR(TINY_ENCODER, hidden_dim=32, out_dim=16, **kw), "two"),
    # min_keep 4 (the collator's own default): the 8 x 8 grid's 3 x 3 target blocks hold 9 patches
    "ijepa": (
        lambda **kw: IJEPA(TINY_ENCODER, **{"predictor_dim": 32, "predictor_depth": 1, "min_keep": 4, **kw}),
        "single",
    ),
}
