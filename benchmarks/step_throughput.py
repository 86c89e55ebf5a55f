"""Pretraining step throughput (images/s, each image with all its views) of every objective, on
synthetic input already on the device so the model alone is measured, through the same Lightning
loop a run uses. For SimCLR and DINO the same objective built from lightly's heads and losses
(lightly's documented way) runs on the same timm encoder, batch and machine in the same run, and
the ratio is reported.

    pip install -e ".[bench]"                      # lightly, for the comparison
    python benchmarks/step_throughput.py           # tiny quickstart-size ViTs (CPU)
    python benchmarks/step_throughput.py --model vit_small_patch16_224 --batch 128   # on a GPU

Writes benchmarks/results/step_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import lightning as L
import torch
from common import write_result
from torch.utils.data import DataLoader, Dataset

from ssl_vit.methods import DINO, MAE, MoCoV3, SimCLR, SimMIM


class OnDeviceBatches(Dataset):
    """The same pre-made batch every step (already on the device, so no loading is timed)."""

    def __init__(self, batch, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        return self.batch


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, *args) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self._sync()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


class LightlySimCLR(L.LightningModule):
    """SimCLR from lightly's pieces (its documented example), on our encoder."""

    def __init__(self, encoder: torch.nn.Module, hidden_dim: int, out_dim: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.encoder = encoder
        self.projector = SimCLRProjectionHead(encoder.embed_dim, hidden_dim, out_dim, num_layers=3)
        self.loss = NTXentLoss(temperature=0.1)

    def training_step(self, batch, batch_idx):
        (x1, x2), _ = batch
        return self.loss(self.projector(self.encoder(x1).cls), self.projector(self.encoder(x2).cls))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class LightlyDINO(L.LightningModule):
    """DINO from lightly's pieces (its documented example: the backbone runs once per crop), on our encoder."""

    def __init__(self, encoder: torch.nn.Module, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.student_backbone = encoder
        self.student_head = DINOProjectionHead(
            encoder.embed_dim, hidden_dim, bottleneck_dim, out_dim, freeze_last_layer=1
        )
        self.teacher_backbone = copy.deepcopy(encoder)
        self.teacher_head = DINOProjectionHead(encoder.embed_dim, hidden_dim, bottleneck_dim, out_dim)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.loss = DINOLoss(output_dim=out_dim, warmup_teacher_temp_epochs=3)

    def training_step(self, batch, batch_idx):
        from lightly.models.utils import update_momentum

        update_momentum(self.student_backbone, self.teacher_backbone, m=0.996)
        update_momentum(self.student_head, self.teacher_head, m=0.996)
        crops, _ = batch
        teacher = [self.teacher_head(self.teacher_backbone(c).cls) for c in crops[:2]]
        student = [self.student_head(self.student_backbone(c).cls) for c in crops]
        return self.loss(teacher, student, epoch=self.current_epoch)

    def on_after_backward(self):
        self.student_head.cancel_last_layer_gradients(current_epoch=self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def measure(module: L.LightningModule, batch, steps: int, warmup: int, precision: str) -> float:
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator="auto",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
    trainer.fit(module, DataLoader(OnDeviceBatches(on_device, steps + warmup), batch_size=None))
    return len(batch[1]) / (sum(timer.times) / len(timer.times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (the quickstart ViT, 32 px) or a timm ViT name (224 px)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    precision = "bf16-mixed" if cuda else "32-true"
    if args.model == "tiny":
        encoder = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4)
        size, local, heads = 32, 16, dict(hidden_dim=512, out_dim=128)
        dino_head = dict(hidden_dim=256, bottleneck_dim=64, out_dim=1024)
        masked = {**encoder, "patch_size": 4}
    else:
        encoder = dict(name=args.model, img_size=224)
        size, local, heads = 224, 96, dict(hidden_dim=4096, out_dim=256)
        dino_head = dict(hidden_dim=2048, bottleneck_dim=256, out_dim=65536)
        masked = encoder
    b, g = args.batch, torch.Generator().manual_seed(0)
    images = lambda s: torch.randn(b, 3, s, s, generator=g)  # noqa: E731
    labels = torch.zeros(b, dtype=torch.long)
    two, multicrop = [images(size), images(size)], [images(size), images(size)] + [images(local) for _ in range(2)]
    runs = {
        "MAE": (lambda: MAE(masked, decoder_dim=64, decoder_depth=1, decoder_heads=4), (images(size), labels)),
        "SimMIM": (lambda: SimMIM(masked, mask_patch_size=8 if args.model == "tiny" else 32), (images(size), labels)),
        "MoCoV3": (lambda: MoCoV3(encoder, **heads), (two, labels)),
        "SimCLR": (lambda: SimCLR(encoder, **heads), (two, labels)),
        "DINO": (lambda: DINO(encoder, **dino_head), (multicrop, labels)),
    }
    lightly = {
        "SimCLR": lambda: LightlySimCLR(SimCLR(encoder, **heads).encoder, **heads),
        "DINO": lambda: LightlyDINO(DINO(encoder, **dino_head).encoder, **dino_head),
    }
    rows = []
    for name, (build, batch) in runs.items():
        torch.manual_seed(0)
        row = {
            "objective": name,
            "batch": b,
            "ssl_vit_img_per_s": round(measure(build(), batch, args.steps, args.warmup, precision), 1),
        }
        if name in lightly:
            try:
                torch.manual_seed(0)
                theirs = measure(lightly[name](), batch, args.steps, args.warmup, precision)
                row["lightly_img_per_s"] = round(theirs, 1)
                row["ratio_ssl_vit_over_lightly"] = round(row["ssl_vit_img_per_s"] / theirs, 2)
            except ImportError:
                row["lightly_img_per_s"] = None  # pip install -e ".[bench]"
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = "cuda" if cuda else "cpu"
    out = write_result("step_throughput", device, rows, model=args.model, precision=precision, steps=args.steps)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
