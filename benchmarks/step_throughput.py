"""Pretraining step throughput (images/s, each image with all its views) of every objective, on
synthetic input already on the device so the model alone is measured, through the same Lightning
loop a run uses. For MAE, SimCLR and DINO the same objective built from lightly's pieces (lightly's
documented examples) runs on the same timm encoder, batch and machine in the same run, and the
ratio is reported (lightly 1.6 has no MoCo v3 or SimMIM pieces). ``--compile`` adds a column with
every transformer block compiled (``ssl-vit pretrain --compile``).

Each step's model FLOPs are counted once with torch's FlopCounterMode (forward and backward);
achieved FLOP/s = FLOPs per step x steps per second, and on a GPU whose bf16 dense peak is known
the model FLOP utilisation (MFU) = achieved / peak.

    pip install -e ".[bench]"                      # lightly, for the comparison
    python benchmarks/step_throughput.py           # tiny quickstart-size ViTs (CPU)
    python benchmarks/step_throughput.py --model vit_base_patch16_224 --batch 128 --compile   # on a GPU

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
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.encoder import compile_blocks
from ssl_vit.methods import DINO, MAE, MoCoV3, SimCLR, SimMIM


class OnDeviceBatches(Dataset):
    """The same pre-made batch every step (already on the device, so no loading is timed)."""

    def __init__(self, batch, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        return self.batch


# bf16 dense tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


class StepTimer(L.Callback):
    """Times the steps after ``warmup`` and counts one warm-up step's FLOPs (forward + backward)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0
        self.flops, self._counter = 0, None

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == 1:  # after the first step, which may compile
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self._sync()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
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


class LightlyMAE(L.LightningModule):
    """MAE from lightly's pieces (its documented example), on our encoder's timm ViT."""

    def __init__(self, vit: torch.nn.Module, decoder_dim: int, decoder_depth: int, decoder_heads: int) -> None:
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__()
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            patch_size=self.patch_size,
            embed_dim=vit.embed_dim,
            decoder_embed_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_heads,
        )

    def training_step(self, batch, batch_idx):
        from lightly.models import utils

        images, _ = batch
        b, n = images.shape[0], self.backbone.sequence_length
        idx_keep, idx_mask = utils.random_token_mask(size=(b, n), mask_ratio=0.75, device=images.device)
        encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        masked = utils.repeat_token(self.decoder.mask_token, (b, n))
        masked = utils.set_at_index(masked, idx_keep, self.decoder.embed(encoded).type_as(masked))
        pred = self.decoder.predict(utils.get_at_index(self.decoder.decode(masked), idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return torch.nn.functional.mse_loss(pred, target)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def measure(module: L.LightningModule, batch, steps: int, warmup: int, precision: str) -> tuple[float, int]:
    """(images per second, model FLOPs per step)."""
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
    return len(batch[1]) / (sum(timer.times) / len(timer.times)), timer.flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (the quickstart ViT, 32 px) or a timm ViT name (224 px)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure with every block compiled")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    precision = "bf16-mixed" if cuda else "32-true"
    if args.model == "tiny":
        encoder = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4)
        size, local, heads = 32, 16, dict(hidden_dim=512, out_dim=128)
        dino_head = dict(hidden_dim=256, bottleneck_dim=64, out_dim=1024)
        masked, decoder = {**encoder, "patch_size": 4}, dict(decoder_dim=64, decoder_depth=1, decoder_heads=4)
    else:  # the papers' heads and MAE decoder
        encoder = dict(name=args.model, img_size=224)
        size, local, heads = 224, 96, dict(hidden_dim=4096, out_dim=256)
        dino_head = dict(hidden_dim=2048, bottleneck_dim=256, out_dim=65536)
        masked, decoder = encoder, dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)
    b, g = args.batch, torch.Generator().manual_seed(0)
    images = lambda s: torch.randn(b, 3, s, s, generator=g)  # noqa: E731
    labels = torch.zeros(b, dtype=torch.long)
    two, multicrop = [images(size), images(size)], [images(size), images(size)] + [images(local) for _ in range(2)]
    runs = {
        "MAE": (lambda: MAE(masked, **decoder), (images(size), labels)),
        "SimMIM": (lambda: SimMIM(masked, mask_patch_size=8 if args.model == "tiny" else 32), (images(size), labels)),
        "MoCoV3": (lambda: MoCoV3(encoder, **heads), (two, labels)),
        "SimCLR": (lambda: SimCLR(encoder, **heads), (two, labels)),
        "DINO": (lambda: DINO(encoder, **dino_head), (multicrop, labels)),
    }
    lightly = {
        "MAE": lambda: LightlyMAE(MAE(masked, **decoder).encoder.vit, **decoder),
        "SimCLR": lambda: LightlySimCLR(SimCLR(encoder, **heads).encoder, **heads),
        "DINO": lambda: LightlyDINO(DINO(encoder, **dino_head).encoder, **dino_head),
    }
    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), None)
    rows = []
    for name, (build, batch) in runs.items():
        torch.manual_seed(0)
        ours, flops = measure(build(), batch, args.steps, args.warmup, precision)
        achieved = flops * ours / b
        row = {
            "objective": name,
            "batch": b,
            "ssl_vit_img_per_s": round(ours, 1),
            "model_gflop_per_img": round(flops / b / 1e9, 3),
            "achieved_tflop_per_s": round(achieved / 1e12, 3),
            "mfu": round(achieved / peak, 3) if peak else None,
        }
        if args.compile:
            torch.manual_seed(0)
            compiled = build()
            compile_blocks(compiled)
            row["ssl_vit_compiled_img_per_s"] = round(
                measure(compiled, batch, args.steps, args.warmup, precision)[0], 1
            )
            row["mfu_compiled"] = round(flops * row["ssl_vit_compiled_img_per_s"] / b / peak, 3) if peak else None
        if name in lightly:
            try:
                torch.manual_seed(0)
                theirs = measure(lightly[name](), batch, args.steps, args.warmup, precision)[0]
                row["lightly_img_per_s"] = round(theirs, 1)
                row["ratio_ssl_vit_over_lightly"] = round(ours / theirs, 2)
                if args.compile:
                    row["ratio_compiled_over_lightly"] = round(row["ssl_vit_compiled_img_per_s"] / theirs, 2)
            except ImportError:
                row["lightly_img_per_s"] = None  # pip install -e ".[bench]"
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = "cuda" if cuda else "cpu"
    extra = dict(model=args.model, precision=precision, steps=args.steps, peak_bf16_flop_per_s=peak)
    out = write_result("step_throughput", device, rows, **extra)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
