"""What the label-free health metrics (``ssl_vit.health.HealthCallback``: RankMe, spread, teacher
entropy on a fixed batch of held images) cost a pretraining run: each quickstart recipe's model,
views and batch, its optimiser step timed through the Lightning loop with a health check after
every step and without one, side by side in one process. The callback's default schedule places
checks (check time) / (1% x step time) steps apart, at least ``log_every_n_steps``; the table
gives that interval for the measured times, the overhead it leaves, and the checks a quickstart
run gets (the one before the first step and the one at the end included).

    python benchmarks/health_overhead.py

Writes benchmarks/results/health_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time

import lightning as L
import numpy as np
import torch
import yaml
from common import ROOT, write_result
from PIL import Image
from step_throughput import OnDeviceBatches
from torch.utils.data import DataLoader

from ssl_vit.health import HealthCallback

OBJECTIVES = ("mae", "simmim", "dino", "mocov3", "simclr")


def build(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


class StepClock(L.Callback):
    """Wall time of each optimiser step after ``warmup``, the health check included when it runs."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def seconds_per_step(method: L.LightningModule, batch, steps: int, warmup: int, health: HealthCallback | None):
    clock = StepClock(warmup)
    callbacks = [clock] if health is None else [health, clock]  # in order: the clock stops after the check
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(method, DataLoader(OnDeviceBatches(batch, steps + warmup), batch_size=None))
    return float(np.median(clock.times))


def quickstart_batch(objective: str, rng: np.random.Generator) -> tuple[dict, tuple]:
    """An objective's quickstart recipe and one batch of its views of random 32-px images."""
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart" / f"{objective}.yaml").read_text())
    data = recipe["data"]
    view = build(data["view"])
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(data["batch_size"])]
    views = [view(image) for image in images]
    if isinstance(views[0], list):  # multi-view: one batch tensor per view
        return recipe, ([torch.stack([v[i] for v in views]) for i in range(len(views[0]))], torch.zeros(len(views)))
    return recipe, (torch.stack(views), torch.zeros(len(views)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for objective in args.objectives:
        recipe, batch = quickstart_batch(objective, rng)
        data = recipe["data"]
        held = torch.randn(256, 3, 32, 32)  # the callback's default number of held images

        torch.manual_seed(0)
        plain = seconds_per_step(build(recipe["model"]), batch, args.steps, args.warmup, None)
        health = HealthCallback(every_n_steps=1)
        health.images = held  # given, so it reads no shards
        torch.manual_seed(0)
        checked = seconds_per_step(build(recipe["model"]), batch, args.steps, args.warmup, health)
        epochs, batch_size = recipe["trainer"]["max_epochs"], data["batch_size"]
        total = epochs * (data.get("samples_per_epoch") or 5000) // batch_size
        check = max(checked - plain, 0.0)
        budget = HealthCallback().max_overhead
        log_every = recipe["trainer"].get("log_every_n_steps", 50)
        interval = max(log_every, math.ceil(check / (budget * plain)))
        row = {
            "objective": objective,
            "batch": batch_size,
            "step_s": round(plain, 4),
            "step_with_check_s": round(checked, 4),
            "check_s": round(check, 4),
            "run_steps": total,
            "default_interval": interval,
            "overhead_pct": round(100 * check / (interval * plain), 2),
            "checks_per_run": 3 + (total - log_every) // interval,  # before step 1, at log_every, ..., at the end
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result("health_overhead", "cpu", rows, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
