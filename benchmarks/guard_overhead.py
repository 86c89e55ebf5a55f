"""What the bad-numbers guard (``ssl_vit.guards.NonFiniteGuard``) costs a pretraining run: each
quickstart recipe's model, views and batch, its optimiser step timed through the Lightning loop
with the guard at its defaults (checks and a restore point every step), and the time spent in the
guard's own hooks within those steps, and the restore point's copy alone. (The guard's share is
measured inside the run rather than as the difference of two runs, which other load on the
machine would swamp.) Also the memory a restore point holds (parameters, buffers, optimiser state).

    python benchmarks/guard_overhead.py [--objectives mae dino ...]

Writes benchmarks/results/guard_overhead_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import numpy as np
import torch
from common import write_result
from health_overhead import OBJECTIVES, StepClock, build, quickstart_batch
from step_throughput import OnDeviceBatches
from torch.utils.data import DataLoader

from ssl_vit.guards import NonFiniteGuard, RestorePoint


class TimedGuard(NonFiniteGuard):
    """The guard, with the seconds its hooks take in each step."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_seconds: list[float] = []
        self._step_hooks = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._step_hooks = 0.0

    def on_before_backward(self, *args) -> None:
        start = time.perf_counter()
        super().on_before_backward(*args)
        self._step_hooks += time.perf_counter() - start

    def on_before_optimizer_step(self, *args) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(*args)
        self._step_hooks += time.perf_counter() - start

    def on_train_batch_end(self, trainer, *args) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(trainer, *args)
        self._step_hooks += time.perf_counter() - start
        self.hook_seconds.append(self._step_hooks)


def seconds_per_step(
    method: L.LightningModule, batch, steps: int, warmup: int, guard: TimedGuard
) -> tuple[float, L.Trainer]:
    clock = StepClock(warmup)
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, clock],  # in order: the clock stops after the guard
    )
    trainer.fit(method, DataLoader(OnDeviceBatches(batch, steps + warmup), batch_size=None))
    return float(np.median(clock.times)), trainer


def copy_seconds(trainer: L.Trainer, point: RestorePoint, repeats: int = 5) -> float:
    """A restore point's copy alone, taken again after the run."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        RestorePoint.take(trainer, point.position)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def restore_point_bytes(point: RestorePoint) -> int:
    tensors = [*point.state_dict.values()]
    tensors += [v for state in point.optimizer_states for s in state["state"].values() for v in s.values()]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


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
        guard = TimedGuard()
        torch.manual_seed(0)
        step, trainer = seconds_per_step(build(recipe["model"]), batch, args.steps, args.warmup, guard)
        hooks = float(np.median(guard.hook_seconds[args.warmup :]))
        copy = copy_seconds(trainer, guard.restore_point)
        row = {
            "objective": objective,
            "batch": data["batch_size"],
            "step_s": round(step, 4),
            "guard_s": round(hooks, 5),
            "restore_point_copy_s": round(copy, 5),
            "guard_pct": round(100 * hooks / step, 2),
            "restore_point_mb": round(restore_point_bytes(guard.restore_point) / 2**20, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result("guard_overhead", "cpu", rows, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
