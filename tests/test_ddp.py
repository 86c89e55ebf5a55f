"""Every objective under Lightning DDP on a real 2-process gloo group, reading real shards: the
ranks read disjoint shards, end with identical parameters, and each optimiser step's gradients
equal those of one process on the two ranks' batches concatenated (so gathered negatives, the
DINO centre, the lr scaled by the global batch and the EMA teachers all carry the right scales);
for I-JEPA, whose masks are per rank, the mean of each rank's own gradient.

torch's SyncBatchNorm needs a GPU, so on this CPU test the projection heads' BatchNorm layers are
replaced (in both runs) by ``GatheredBatchNorm``, which computes SyncBatchNorm's statistics over
every rank's samples; the recipes set ``trainer.sync_batchnorm`` on GPUs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from timm.models import save_for_hf
from torch import nn
from torch.utils.data import DataLoader

from ssl_vit.data import MAEView, MultiCropViews, ShardDataModule, TwoViews, write_shards
from ssl_vit.distributed import gather_with_grad
from ssl_vit.masking import ContextTargetMasks, PatchMask
from ssl_vit.methods import DINOv2, DINOv3, Distill, ijepa, mae, simmim
from tests.conftest import OBJECTIVES, TINY_ENCODER, png_bytes, random_images

WORLD = 2
VIEWS = {"single": lambda: MAEView(32), "two": lambda: TwoViews(32), "multicrop": lambda: MultiCropViews(32, 16, 2)}
# Where each objective draws its masks, and the tuple type they come as (recorded as lists).
MASK_FUNCTIONS = [
    (mae, "random_patch_mask", PatchMask),
    (simmim, "block_patch_mask", None),
    (ijepa, "ijepa_multiblock_masks", ContextTargetMasks),
]
# I-JEPA's context is cut to the smallest one of the rank's batch, so one process on the global
# batch draws other masks: its reference is each rank's own batch in one process instead.
PER_RANK_MASKS = {"ijepa"}


class GatheredBatchNorm(nn.BatchNorm1d):
    """SyncBatchNorm's training-mode arithmetic on CPU: statistics over every rank's samples (and,
    for a CNN's maps, positions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        everyone = gather_with_grad(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, var = everyone.mean(dims).view(shape), everyone.var(dims, unbiased=False).view(shape)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def gather_batchnorm(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            parent, _, attr = name.rpartition(".")
            replacement = GatheredBatchNorm(module.num_features, module.eps, affine=module.affine)
            replacement.load_state_dict(module.state_dict())
            replacement.requires_grad_(any(p.requires_grad for p in module.parameters()))  # frozen in EMA copies
            setattr(model.get_submodule(parent), attr, replacement)
    return model


class Recorder(L.Callback):
    """The batches each step read, and the (all-reduced) gradients and learning rate the
    optimiser steps with."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = pl_module.named_parameters()
        self.grads.append({n: p.grad.clone() for n, p in params if p.grad is not None})
        self.lrs.append(optimizer.param_groups[0]["lr"])


def fit(factory: Callable[..., L.LightningModule], data: Any, devices: int) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    method = gather_batchnorm(factory(warmup_epochs=1))
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
        max_epochs=1,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs = {"datamodule": data} if isinstance(data, L.LightningDataModule) else {"train_dataloaders": data}
    trainer.fit(method, **kwargs)
    return {"batches": recorder.batches, "grads": recorder.grads, "lrs": recorder.lrs, "state": method.state_dict()}


def record_masks(masks: list[Any]) -> None:
    """Keep every mask the objectives draw (a PatchMask as a list, which loads with weights_only), to
    replay the ranks' masks in the one-process run."""

    def recording(draw):
        def draw_and_record(*args, **kwargs):
            mask = draw(*args, **kwargs)
            masks.append(list(mask) if isinstance(mask, tuple) else mask)
            return mask

        return draw_and_record

    for module, attr, _ in MASK_FUNCTIONS:
        setattr(module, attr, recording(getattr(module, attr)))


def join_group(rank: int, port: int) -> None:
    """What torchrun sets for each process: Lightning then takes the processes as launched."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, shards: str, out_dir: str) -> None:
    join_group(rank, port)
    for name, (_, view) in OBJECTIVES.items():
        masks: list[Any] = []
        record_masks(masks)
        data = ShardDataModule(
            shards, VIEWS[view](), batch_size=4, num_workers=0, shuffle_buffer=0, samples_per_epoch=16
        )
        torch.save({**fit(OBJECTIVES[name][0], data, devices=WORLD), "masks": masks}, f"{out_dir}/{name}-rank{rank}.pt")


def concat(parts: list[Any]) -> Any:
    """Concatenate the ranks' batches (or masks) along the batch dimension, structure kept."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return type(first)(concat(list(p)) for p in zip(*parts, strict=True))


def replay_masks(masks: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for module, attr, kind in MASK_FUNCTIONS:

        def next_mask(*args, kind=kind, **kwargs):
            mask = masks.pop(0)
            return kind(*mask) if kind else mask

        monkeypatch.setattr(module, attr, next_mask)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("ddp")
    samples = (("png", png_bytes(img), i) for i, img in enumerate(random_images(40)))
    write_shards(samples, root / "shards", classes=[str(i) for i in range(40)], source="test", samples_per_shard=5)
    mp.spawn(_rank_main, args=(free_port(), str(root / "shards"), str(root)), nprocs=WORLD, join=True)
    load = lambda name, r: torch.load(root / f"{name}-rank{r}.pt", weights_only=True)  # noqa: E731
    return {name: [load(name, r) for r in range(WORLD)] for name in OBJECTIVES}


def assert_disjoint_shards_in_lockstep(ranks: list[dict[str, Any]]) -> None:
    labels = [{int(y) for _, batch_labels in r["batches"] for y in batch_labels} for r in ranks]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2  # equal batch counts: no hang
    assert labels[0] and labels[1] and not labels[0] & labels[1], labels  # disjoint shards
    for key, value in ranks[0]["state"].items():  # DDP kept the ranks in lockstep
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=key)


def assert_same_gradients(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], step: int) -> None:
    assert want.keys() == got.keys()
    # Float summation order differs; gradients that are zero up to rounding (a norm bias before
    # BatchNorm) differ by rounding, so the tolerance is set by the step's largest gradient.
    atol = 1e-4 * max(g.abs().max().item() for g in want.values())
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-3, atol=atol, msg=lambda m, where=f"step {step}, {key}": f"{where}: {m}"
        )


@pytest.mark.parametrize("name", [name for name in OBJECTIVES if name not in PER_RANK_MASKS])
def test_ddp_matches_one_process_on_the_global_batch(name, ddp_runs, monkeypatch):
    ranks = ddp_runs[name]
    assert_disjoint_shards_in_lockstep(ranks)
    steps = list(zip(*(r["batches"] for r in ranks), strict=True))
    global_batches = [concat(list(parts)) for parts in steps]
    if ranks[0]["masks"]:  # each rank draws its own masks (the official codes seed rank r with seed + r)
        first = [r["masks"][0][-1] if isinstance(r["masks"][0], list) else r["masks"][0] for r in ranks]
        assert not torch.equal(*first)
    masks = [concat(list(parts)) for parts in zip(*(r["masks"] for r in ranks), strict=True)]
    replay_masks(masks, monkeypatch)
    one = fit(OBJECTIVES[name][0], DataLoader(global_batches, batch_size=None), devices=1)

    assert one["lrs"] == ranks[0]["lrs"]  # lr scaled by the global batch, 4 x 2 ranks = 8 x 1
    assert len(one["grads"]) == len(ranks[0]["grads"]) == 2
    for step, (want, got) in enumerate(zip(one["grads"], ranks[0]["grads"], strict=True)):
        assert_same_gradients(want, got, step)


@pytest.mark.parametrize("name", sorted(PER_RANK_MASKS))
def test_ddp_gradient_is_the_mean_of_each_ranks_own_gradient(name, ddp_runs, monkeypatch):
    """Ranks draw their own block sizes and cut their contexts to their own smallest: the first
    step's all-reduced gradient must be the mean of what each rank's batch and masks give alone."""
    ranks = ddp_runs[name]
    assert_disjoint_shards_in_lockstep(ranks)
    assert not torch.equal(ranks[0]["masks"][0][-1], ranks[1]["masks"][0][-1])  # each rank its own masks
    alone = []
    for rank in ranks:
        replay_masks(rank["masks"][:1], monkeypatch)
        alone.append(fit(OBJECTIVES[name][0], DataLoader(rank["batches"][:1], batch_size=None), devices=1)["grads"][0])
    mean = {key: (alone[0][key] + alone[1][key]) / 2 for key in alone[0]}
    assert_same_gradients(mean, ranks[0]["grads"][0], step=0)


#: DINOv2, and DINOv3 with its Gram phase (Gram teacher and term) from the second of the two steps.
DINO_FAMILY = {"dinov2": (DINOv2, {}), "dinov3": (DINOv3, {"gram_start": 0.5})}


def _dinov2_rank_main(rank: int, port: int, shards: str, out_dir: str, name: str) -> None:
    join_group(rank, port)
    L.seed_everything(rank, verbose=False)  # each rank draws its own iBOT masks
    cls, kwargs = DINO_FAMILY[name]
    method = cls(TINY_ENCODER, out_dim=32, hidden_dim=24, bottleneck_dim=16, centering="mean", **kwargs)
    data = ShardDataModule(
        shards, VIEWS["multicrop"](), batch_size=4, num_workers=0, shuffle_buffer=0, samples_per_epoch=16
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(method, datamodule=data)
    torch.save(method.state_dict(), f"{out_dir}/{name}-rank{rank}.pt")


@pytest.mark.parametrize("name", DINO_FAMILY)
def test_dinov2_ranks_stay_in_lockstep_with_global_centres(tmp_path, name):
    """Ranks see different images and draw different masks; after DDP steps their students,
    EMA teachers (and DINOv3's Gram teacher) and both centres (the CLS one and iBOT's patch one,
    each averaged over ranks) must still be identical, and the centres must have moved."""
    samples = (("png", png_bytes(img), i) for i, img in enumerate(random_images(40)))
    write_shards(samples, tmp_path / "shards", classes=[str(i) for i in range(40)], source="test", samples_per_shard=5)
    args = (free_port(), str(tmp_path / "shards"), str(tmp_path), name)
    mp.spawn(_dinov2_rank_main, args=args, nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], value, rtol=0, atol=0, msg=key)
    assert ranks[0]["center"].abs().sum() > 0 and ranks[0]["patch_center"].abs().sum() > 0
    if name == "dinov3":  # the Gram teacher is the EMA teacher of step 1, which has moved on since
        gram = {k.removeprefix("gram_teacher."): v for k, v in ranks[0].items() if k.startswith("gram_teacher.")}
        assert any(not torch.equal(v, ranks[0][f"teacher_encoder.{k}"]) for k, v in gram.items())


def distill_onto(teacher: str) -> Callable[..., L.LightningModule]:
    """Distillation of ``teacher`` into timm's test ResNet, whose BatchNorm layers see the rank's batch."""
    return lambda **kw: Distill(teacher, {"name": "test_resnet"}, **kw)


def _distill_rank_main(rank: int, port: int, shards: str, teacher: str, out_dir: str) -> None:
    join_group(rank, port)
    data = ShardDataModule(shards, MAEView(32), batch_size=4, num_workers=0, shuffle_buffer=0, samples_per_epoch=16)
    torch.save(fit(distill_onto(teacher), data, devices=WORLD), f"{out_dir}/distill-rank{rank}.pt")


@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode at the start of training")  # the teacher, as meant
def test_distillation_under_ddp_matches_one_process_on_the_global_batch(tmp_path):
    """A CNN student's distillation steps under a 2-process group: disjoint shards, ranks in
    lockstep, and each step's gradients (the projections' included) those of one process on the
    two ranks' batches, BatchNorm statistics taken over both (``trainer.sync_batchnorm``)."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    save_for_hf(vit, str(tmp_path / "teacher"), model_args=args, safe_serialization=True)
    samples = (("png", png_bytes(img), i) for i, img in enumerate(random_images(40)))
    write_shards(samples, tmp_path / "shards", classes=[str(i) for i in range(40)], source="test", samples_per_shard=5)
    spawn_args = (free_port(), str(tmp_path / "shards"), str(tmp_path / "teacher"), str(tmp_path))
    mp.spawn(_distill_rank_main, args=spawn_args, nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"distill-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert_disjoint_shards_in_lockstep(ranks)

    global_batches = [concat(list(parts)) for parts in zip(*(r["batches"] for r in ranks), strict=True)]
    one = fit(distill_onto(str(tmp_path / "teacher")), DataLoader(global_batches, batch_size=None), devices=1)

    assert one["lrs"] == ranks[0]["lrs"]
    assert {"global_proj.weight", "dense_proj.weight", "encoder.model.conv1.0.weight"} <= set(one["grads"][0])
    assert not any(key.startswith("teacher.") for key in one["grads"][0])
    for step, (want, got) in enumerate(zip(one["grads"], ranks[0]["grads"], strict=True)):
        assert_same_gradients(want, got, step)


def test_a_quickstart_on_two_processes_evaluates_and_ends_with_its_summary(tmp_path):
    """A user's quickstart scaled to 2 processes, through the command line: its evaluation runs on
    rank 0 alone (its metrics synced across ranks, waiting for ranks that never came: the run
    hung before its first step), and rank 0 writes the summary once the others have ended
    (Trainer.log_dir's broadcast crashed it there)."""
    for name, images in (("a", random_images(24, size=32, seed=1)), ("b", random_images(24, size=32, seed=2))):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i, image in enumerate(images):
            (tmp_path / "photos" / name / f"{i}.png").write_bytes(png_bytes(image))
    scaled = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.max_steps=2"]
    recipe = str(Path(__file__).parents[1] / "recipes/quickstart/simclr.yaml")
    command = [sys.executable, "-m", "ssl_vit.cli", "pretrain", "--config", recipe, "--data.train_shards=photos"]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        [*command, *scaled, "--data.batch_size=8", "--data.num_workers=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # a run that hangs (as it did) fails here
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/photos/simclr/summary.json").read_text())
    assert summary["steps"] == 2 and summary["knn_k20_top1"] is not None and summary["evaluation_images"] > 0
