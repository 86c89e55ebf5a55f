"""The rules that fit a paper's schedule to a run (``scale_to_run``): they give the papers' numbers
back at the papers' scale, and the quickstart's documented values at its scale."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ssl_vit.schedules import (
    EMA_MAX_WINDOW_RUN_FRACTION,
    EMA_MIN_WINDOW_STEPS,
    PaperRun,
    scaled_ema_momentum,
    scaled_epochs,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
IMAGENET = 1281167
DINO_RUN = PaperRun(epochs=100, steps_per_epoch=IMAGENET // 1024)  # the official loaders drop the last batch


def test_schedule_lengths_shrink_with_a_shorter_run_and_never_stretch():
    assert scaled_epochs(10, 100, DINO_RUN) == 10
    assert scaled_epochs(10, 800, DINO_RUN) == 10
    assert scaled_epochs(10, 8, DINO_RUN) == pytest.approx(0.8)
    assert scaled_epochs(30, 50, DINO_RUN) == pytest.approx(15)


def test_ema_momentum_follows_the_ema_scaling_rule():
    # At the paper's steps per epoch and length: the paper's momentum, exactly.
    assert scaled_ema_momentum(0.996, IMAGENET // 1024, 100 * 1251, DINO_RUN) == 0.996
    # Busbridge et al. (2023): batch x kappa -> momentum ** kappa. A quarter of the batch on
    # ImageNet is 4x the steps per epoch: 0.996 ** (1/4), the window 4x as many steps.
    quarter = scaled_ema_momentum(0.996, 4 * (IMAGENET // 1024), 100 * 5004, DINO_RUN)
    assert quarter == pytest.approx(0.996**0.25, abs=1e-12)
    assert 1 / (1 - quarter) == pytest.approx(4 / (1 - 0.996), rel=2e-3)
    # A smaller dataset at the paper's batch: the window stays the same fraction of an epoch.
    spe = 2000
    m = scaled_ema_momentum(0.996, spe, 100 * spe, DINO_RUN)
    assert (1 - m) * spe == pytest.approx((1 - 0.996) * (IMAGENET // 1024), rel=2e-3)


def test_ema_window_bounds():
    # Tiny dataset: the rule's window would be under a step; the floor keeps it at 10 steps.
    assert scaled_ema_momentum(0.996, 4, 10_000, DINO_RUN) == pytest.approx(1 - 1 / EMA_MIN_WINDOW_STEPS)
    # A short run on a large dataset: the window is capped at 5% of the run (400 steps -> 20).
    capped = scaled_ema_momentum(0.996, IMAGENET // 256, 400, DINO_RUN)
    assert 1 / (1 - capped) == pytest.approx(EMA_MAX_WINDOW_RUN_FRACTION * 400)


def recipe_method(path: Path, encoder: dict | None = None, samples: int = 5000, **trainer_overrides):
    """The recipe's objective with a stand-in trainer that has the recipe's run shape (steps per
    epoch from the data size, by default the embedded shapes' train split, global batch and
    accumulation; total steps from max_steps or the epochs, whichever ends first, as Lightning's);
    ``encoder`` fields replace the recipe's (a smaller ViT where only the schedules matter)."""
    recipe = yaml.safe_load(path.read_text())
    module, _, name = recipe["model"]["class_path"].rpartition(".")
    init_args = recipe["model"]["init_args"]
    init_args["encoder"] = {**init_args["encoder"], **(encoder or {})}
    method = getattr(importlib.import_module(module), name)(**init_args)
    trainer = {**recipe["trainer"], **trainer_overrides}
    data = recipe["data"]
    world = trainer.get("devices", 1) * trainer.get("num_nodes", 1)
    accumulate = trainer.get("accumulate_grad_batches", 1)
    samples = data.get("samples_per_epoch") or samples
    batches = samples // (data["batch_size"] * world)  # every epoch drops its last partial batch, as in the pipeline
    limits = [trainer.get("max_steps", -1), math.ceil(batches / accumulate) * trainer.get("max_epochs", -1)]
    method._trainer = SimpleNamespace(
        num_training_batches=batches,
        accumulate_grad_batches=accumulate,
        world_size=world,
        estimated_stepping_batches=min(limit for limit in limits if limit >= 0),
    )
    return method


@pytest.mark.parametrize("max_epochs", [100, 800])
def test_dino_imagenet_recipe_resolves_to_the_paper(max_epochs):
    dino = recipe_method(RECIPES / "imagenet/dino_vit_s16.yaml", max_epochs=max_epochs)
    assert dino.run_epochs(dino.warmup_epochs) == 10
    assert dino.run_epochs(dino.hparams.warmup_teacher_temp_epochs) == 30
    assert dino.run_momentum(dino.hparams.teacher_momentum) == 0.996


@pytest.mark.parametrize(
    "recipe, warmup, start_momentum",
    [
        ("mae_vit_b16", 40, None),
        ("simmim_vit_b16", 10, None),
        ("mocov3_vit_b16", 40, 0.99),
        ("simclr_vit_b16", 40, None),
        ("ijepa_vit_b16", 40, 0.996),  # ViT-H/14's schedule too (building it takes 20 s)
    ],
)
def test_imagenet_recipes_resolve_to_the_papers(recipe, warmup, start_momentum):
    method = recipe_method(RECIPES / f"imagenet/{recipe}.yaml")
    assert method.run_epochs(method.warmup_epochs) == warmup
    if start_momentum is not None:
        assert method.ema_momentum(0) == pytest.approx(start_momentum)


@pytest.mark.parametrize("recipe, global_batch", [("dinov2_vit_s16", 1024), ("dinov2_vit_l16", 2048)])
def test_dinov2_imagenet_recipes_resolve_to_the_official_config(recipe, global_batch):
    # ssl_default_config.yaml: an epoch is 1,250 iterations; 10 warm-up epochs; the teacher's
    # temperature warms up over 30 and its momentum starts at 0.992; lr 0.004 x sqrt(batch / 1024).
    # The schedules do not depend on the ViT's size, so a ViT-S stands in for ViT-L (faster to build).
    dinov2 = recipe_method(RECIPES / f"imagenet/{recipe}.yaml", encoder={"name": "vit_small_patch16_224"})
    per_device = global_batch // dinov2.trainer.world_size
    assert dinov2.global_batch_size(per_device) == global_batch
    assert dinov2.steps_per_epoch() == 1250
    assert dinov2.run_epochs(dinov2.warmup_epochs) == 10
    assert dinov2.run_epochs(dinov2.hparams.warmup_teacher_temp_epochs) == 30
    assert dinov2.run_momentum(dinov2.hparams.teacher_momentum) == 0.992
    peak = dinov2.learning_rate(10 * 1250, per_device)
    assert peak == pytest.approx(0.004 * math.sqrt(global_batch / 1024))


def test_quickstart_recipes_resolve_to_their_documented_values():
    dino = recipe_method(RECIPES / "quickstart/dino.yaml")  # 8 epochs x 39 steps
    assert dino.run_epochs(dino.warmup_epochs) == pytest.approx(0.8)
    assert dino.run_momentum(dino.hparams.teacher_momentum) == pytest.approx(0.9)
    moco = recipe_method(RECIPES / "quickstart/mocov3.yaml")
    assert moco.run_momentum(moco.hparams.momentum) == pytest.approx(0.99 ** ((IMAGENET // 4096) / 39))
    assert moco.run_epochs(moco.warmup_epochs) == pytest.approx(40 * 8 / 300)
    mae = recipe_method(RECIPES / "quickstart/mae.yaml")  # lightly's constant lr: no warm-up, peak = floor
    assert (mae.run_epochs(mae.warmup_epochs), mae.base_lr * mae.lr_batch_scale(128)) == (0, mae.min_lr)
    simmim = recipe_method(RECIPES / "quickstart/simmim.yaml")  # the same constant 1.5e-4 at batch 128
    assert simmim.run_epochs(simmim.warmup_epochs) == 0
    last = simmim.trainer.estimated_stepping_batches - 1
    assert simmim.learning_rate(0, 128) == simmim.learning_rate(last, 128) == pytest.approx(1.5e-4)
    ijepa = recipe_method(RECIPES / "quickstart/ijepa.yaml")  # 16 epochs x 39 steps; 625 steps per paper epoch
    assert ijepa.run_epochs(ijepa.warmup_epochs) == pytest.approx(40 * 16 / 300)
    # I-JEPA's target momentum is the paper's at any length: the scaled one (0.9 here) collapsed it.
    assert ijepa.ema_momentum(0) == 0.996
    assert ijepa.lr_batch_scale(128) == pytest.approx(0.25)  # sqrt(128 / 2048)


def test_scale_to_run_off_keeps_the_recipe_values():
    dino = recipe_method(RECIPES / "quickstart/dino.yaml")
    dino.scale_to_run = False
    assert dino.run_epochs(dino.warmup_epochs) == 10
    assert dino.run_momentum(dino.hparams.teacher_momentum) == 0.996


@pytest.mark.parametrize("recipe", ["simclr", "dino", "mae", "ijepa"])
def test_a_quickstart_does_the_same_steps_on_any_folder(recipe):
    """The quickstarts' budget is in steps: a folder of 1,000 images gets the shapes' 312 (624)
    steps, with the same warm-up and lr in steps, not 8 epochs of 7 steps (a new user's first run
    on a folder of 420 images trained 16 steps and ended below its random initialisation)."""
    shapes, folder = (recipe_method(RECIPES / f"quickstart/{recipe}.yaml", samples=n) for n in (5000, 1000))
    assert folder.trainer.estimated_stepping_batches == shapes.trainer.estimated_stepping_batches >= 312
    total = shapes.trainer.estimated_stepping_batches
    for step in (0, 20, 41, 42, total // 2, total - 1):
        assert folder.learning_rate(step, 128) == pytest.approx(shapes.learning_rate(step, 128))
