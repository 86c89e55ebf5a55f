"""The GPU check: its smoke run on any machine, and what only a CUDA device can show (skipped
without one): bf16 training of every objective, compiled against eager, the on-device
augmentation against torchvision's kernels on CUDA, and one NCCL DDP step."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ssl_vit.methods
from ssl_vit.data.photometric import BatchedPhotometric
from ssl_vit.data.views import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.encoder import compile_blocks
from ssl_vit.methods import DINOv2, DINOv3
from tests.conftest import OBJECTIVES, TINY_ENCODER, _RandomViews
from tests.test_views import torchvision_photometric

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DINO_HEAD = dict(out_dim=32, hidden_dim=24, bottleneck_dim=16)
EVERY_OBJECTIVE = {
    **OBJECTIVES,
    "dinov2": (lambda **kw: DINOv2(TINY_ENCODER, **DINO_HEAD, **kw), "multicrop"),
    # in its Gram phase from the first step
    "dinov3": (lambda **kw: DINOv3(TINY_ENCODER, gram_start=0.0, gram_ramp=0.0, **DINO_HEAD, **kw), "multicrop"),
    "clip": (lambda **kw: tiny_clip(**kw), "captioned"),
}


def tiny_clip(**kwargs) -> L.LightningModule:
    pytest.importorskip("open_clip")  # the `clip` extra, which the lent GPU machine may lack
    from ssl_vit.methods import CLIP
    from tests.test_clip import TINY_TEXT

    return CLIP(TINY_ENCODER, **TINY_TEXT, **kwargs)


# A steady teacher temperature and Sinkhorn-Knopp centering (the quickstart's): with the default
# warming temperature and mean centering, DINO's cross-entropy rises while the teacher sharpens,
# however well the student fits (seen on a CPU in bf16), so falling would test nothing.
STEADY_TEACHER = dict(
    warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, centering="sinkhorn_knopp"
)


def test_gpu_check_smoke_run_measures_every_objective(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    record = json.loads(out.read_text())
    rows = {row["objective"]: row for row in record["rows"]}
    # every objective ssl_vit.methods registers (distillation, which needs a trained teacher, aside)
    registered = set(ssl_vit.methods.__all__) - {"SSLMethod", "Distill", "DINOv3Distill"}
    assert set(rows) == registered, f"add {registered - set(rows)} to OBJECTIVES and builders() in gpu_check.py"
    for name, row in rows.items():
        numbers = [row["gflop_per_img"], row["eager"]["img_per_s"], row["compiled"]["img_per_s"]]
        if "img_per_s" in row["lightly"]:  # lightly installed, and step_throughput.py builds this objective
            numbers += [row["lightly"]["img_per_s"], row["ratio_eager_over_lightly"]]
        assert all(math.isfinite(x) and x > 0 for x in numbers), (name, row)
    for name in ("SimCLR", "SimCLR_augment_on_device", "DINO", "DINO_augment_on_device"):
        run = record["end_to_end"][name]
        assert math.isfinite(run["end_to_end_img_per_s"]) and math.isfinite(run["data_stall"]), (name, run)
    assert set(record["part_seconds"]) == {"attention", "steps", "end_to_end", "total"}
    # --out naming a file of the user's: refused before any measurement, the file as it was
    (tmp_path / "notes.json").write_text('{"my": "notes"}')
    refused = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path / "notes.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1 and "is not a gpu_check results file" in refused.stderr, refused.stderr[-2000:]
    assert (tmp_path / "notes.json").read_text() == '{"my": "notes"}'


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train_on_fixed_images(
    method: L.LightningModule, view: str, steps: int, callbacks: tuple[L.Callback, ...] = (), **trainer_args
) -> list[float]:
    """``steps`` bf16 steps on the GPU, all on the same 16 images; the losses."""
    L.seed_everything(0)
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, *callbacks],
        **trainer_args,
    )
    images = fixed_captioned_images(16) if view == "captioned" else _RandomViews(view, num_images=16)
    trainer.fit(method, DataLoader(images, batch_size=16))
    return recorder.losses


def fixed_captioned_images(n: int) -> TensorDataset:
    from tests.test_clip import tokens

    return TensorDataset(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), tokens(n))


@needs_cuda
@pytest.mark.parametrize("objective", EVERY_OBJECTIVE)
def test_bf16_losses_are_finite_and_fall_on_fixed_images(objective: str):
    build, view = EVERY_OBJECTIVE[objective]
    # A high lr without warm-up: 30 steps on one batch fit it, masks drawn afresh each step.
    teacher = STEADY_TEACHER if objective in ("dino", "dinov2", "dinov3") else {}
    losses = train_on_fixed_images(build(base_lr=5e-3, warmup_epochs=0, **teacher), view, steps=30)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


@needs_cuda
@pytest.mark.parametrize("objective", EVERY_OBJECTIVE)
def test_compiled_blocks_train_as_eager_ones_to_bf16_tolerance(objective: str):
    build, view = EVERY_OBJECTIVE[objective]
    torch.manual_seed(0)
    eager = build()
    compiled = build()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    eager_losses = train_on_fixed_images(eager, view, steps=3)
    compiled_losses = train_on_fixed_images(compiled, view, steps=3)
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=2e-2, atol=2e-2)


@needs_cuda
def test_on_device_augmentation_on_cuda_matches_torchvision_and_the_cpu():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 24, 24), dtype=torch.uint8, device="cuda")
    images[:4] = images[:4, :1]  # some grey images: hue and saturation are undefined there
    augment = BatchedPhotometric(24, blur_p=0.5, solarize_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    params = augment.draw(len(images), images.device)
    # TF32 convolutions (cuDNN's default) would blur with 10-bit mantissas on one side or both.
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        got = augment.apply(images, params)
        for i in range(len(images)):
            expected = torchvision_photometric(images[i], params, i, augment.kernel_size)
            torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=1e-4, msg=f"sample {i}")
    on_cpu = dataclasses.replace(params, **{f.name: getattr(params, f.name).cpu() for f in dataclasses.fields(params)})
    torch.testing.assert_close(got.cpu(), augment.apply(images.cpu(), on_cpu), atol=1e-4, rtol=1e-4)
    draws = augment.draw(20000, "cuda")
    assert abs(draws.jitter.float().mean() - 0.8) < 0.02 and abs(draws.blur.float().mean() - 0.5) < 0.02


class ProcessGroupBackend(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        self.backend = torch.distributed.get_backend()


@needs_cuda
def test_one_gpu_nccl_ddp_step():
    from lightning.pytorch.strategies import DDPStrategy

    build, view = OBJECTIVES["simclr"]
    backend = ProcessGroupBackend()
    losses = train_on_fixed_images(
        build(), view, steps=2, strategy=DDPStrategy(process_group_backend="nccl"), callbacks=(backend,)
    )
    assert backend.backend == "nccl"
    assert all(math.isfinite(loss) for loss in losses), losses
