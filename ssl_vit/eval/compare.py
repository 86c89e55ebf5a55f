"""Two encoders side by side, as a distillation run ends with its teacher and student: parameters,
GFLOPs per image, CPU latency and throughput, measured in this process on copies of both, and the
accuracies of the run's evaluation protocols."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.eval.encoders import FrozenEncoder
from ssl_vit.eval.evaluator import Results

#: The accuracy columns of the comparison, each a headline number of one protocol.
ACCURACY_COLUMNS = {
    "knn_k20_top1": "k-NN k=20 top-1 %",
    "probe_top1": "linear top-1 %",
    "attentive_top1": "attentive top-1 %",
    "seg_miou": "dense mIoU %",
}
SPEED_COLUMNS = {
    "parameters": "parameters",
    "gflops_per_image": "GFLOPs / image",
    "cpu_latency_ms_batch1": "CPU ms, batch 1",
    "cpu_images_per_s_batch64": "CPU img/s, batch 64",
}


def headline_accuracy(results: Results | None) -> dict[str, float | None]:
    """The top-1 of k-NN (k=20; None with fewer training images), of the linear and attentive probes, and the dense
    probe's mIoU, as ``run_summary`` reports a pretraining run's; None for what did not run."""
    results = results or {}
    knn = results.get("knn", {})
    knn_acc = knn.get("k=20", {})
    return {
        "knn_k20_top1": knn_acc.get("top1"),
        "probe_top1": results.get("probe", {}).get("top1"),
        "attentive_top1": results.get("attentive", {}).get("top1"),
        "seg_miou": results.get("segmentation", {}).get("miou"),
    }


def _median_seconds(runs: dict[str, Callable[[], Any]], min_runs: int, min_seconds: float = 0.25) -> dict[str, float]:
    """The median wall time of each of ``runs`` after one warm-up call, timed in turns (one call
    of each per round, so that all see the same load on a shared CPU), over at least ``min_runs``
    rounds and ``min_seconds`` per run in all (at most 100 rounds)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    rounds = 0
    while rounds < 100 and (rounds < min_runs or min(map(sum, times.values())) < min_seconds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(seconds) for name, seconds in times.items()}


#: The batch the throughput is measured at.
THROUGHPUT_BATCH = 64


#: CPU threads the timings use: one, the per-core measure of CPU inference, and a stable one on a
#: shared machine, where a thread pool waiting for a descheduled thread at every operation times
#: the scheduler (on the 2-core test machine under load: 290 ms instead of 2 ms for one image).
CPU_THREADS = 1


@torch.no_grad()
def measure_costs(encoders: dict[str, FrozenEncoder], image_size: int) -> dict[str, dict[str, float]]:
    """For each encoder: parameters, GFLOPs per image (torch's ``FlopCounterMode``: 2 per
    multiply-add of matrix products and convolutions), and on this CPU with ``CPU_THREADS``
    threads, on copies in eval mode timed in turns: the median latency of one image (ms) and the
    throughput at batch 64 (images/s), of ``pooled_and_map`` (what a model computes for its
    embedding and feature map)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        return _measure_costs(encoders, image_size)
    finally:
        torch.set_num_threads(threads)


def _measure_costs(encoders: dict[str, FrozenEncoder], image_size: int) -> dict[str, dict[str, float]]:
    models = {name: copy.deepcopy(encoder).cpu().eval() for name, encoder in encoders.items()}
    images = torch.randn(THROUGHPUT_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    costs = {}
    for name, model in models.items():
        with FlopCounterMode(display=False) as counter:
            model.pooled_and_map(images[:1])
        costs[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflops_per_image": counter.get_total_flops() / 1e9,
        }
    one = _median_seconds({name: partial(model.pooled_and_map, images[:1]) for name, model in models.items()}, 10)
    batch = _median_seconds({name: partial(model.pooled_and_map, images) for name, model in models.items()}, 3)
    for name in models:
        costs[name]["cpu_latency_ms_batch1"] = one[name] * 1e3
        costs[name]["cpu_images_per_s_batch64"] = THROUGHPUT_BATCH / batch[name]
    return costs


def print_comparison(summary: dict[str, Any]) -> None:
    """The comparison as one table: a row per measure, a column per model, and the student's
    cost as a multiple of the teacher's."""
    models = summary["models"]
    table = Table(title=summary["title"], caption=summary.get("caption"))
    table.add_column("")
    for name in models:
        table.add_column(name, justify="right")
    table.add_column("student / teacher", justify="right")
    table.add_row("model", *(row["model"] for row in models.values()), "")
    formats = {**dict.fromkeys(SPEED_COLUMNS, "{:.4g}"), "parameters": "{:,}"}
    for key, label in {**SPEED_COLUMNS, **ACCURACY_COLUMNS}.items():
        if all(row.get(key) is None for row in models.values()):
            continue
        ratio = _cell(summary["student_over_teacher"].get(key), "{:.2f}x")
        table.add_row(label, *(_cell(row.get(key), formats.get(key, "{:.1f}")) for row in models.values()), ratio)
    console = Console()
    if not console.is_terminal:  # a log or a job's output: whole, not fitted to 80 columns with the names cut
        console = Console(width=max(console.width, Console(width=1000).measure(table).maximum))
    console.print(table)


def cost_ratios(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """The student's parameters, GFLOPs, latency and throughput as multiples of the teacher's."""
    return {k: student[k] / teacher[k] for k in SPEED_COLUMNS if student.get(k) and teacher.get(k)}


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)
