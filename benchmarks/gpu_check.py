"""The prepared GPU check (issue 40): one command, one JSON, under 9 minutes on an H100.

For every objective at ViT-S/16 and ViT-B/16, 224 px, bf16 mixed precision, on synthetic input
already on the device (``step_throughput.measure``: Lightning's loop, CUDA-synchronised step
timing, FLOPs of one step counted with FlopCounterMode, forward and backward), eager and with
every block compiled: images/s, peak memory, MFU against the device's dense bf16 peak, dynamo's
compile counts, and lightly's same objective on the same encoder and batch as a ratio where
step_throughput has a lightly builder and lightly is installed. Then whether scaled-dot-product
attention accepts the flash kernel at the encoders' shapes, and a short end-to-end
``ssl-vit pretrain`` on JPEG shards written on the spot with 16 loader workers, for SimCLR (two
views) and DINO (multi-crop), each with and without ``augment_on_device``: data stall =
1 - end-to-end images/s / step-alone images/s (the eager ViT-S/16 rate measured above).

Every part has a time budget; what would overrun it is recorded as ``"skipped": "time"``, and the
JSON is rewritten after every measurement, so a run cut short still leaves its results. Without
webdataset (which ssl_vit imports), lightly or open_clip (CLIP's text tower), the parts that need
them record ``"skipped": "not installed: ..."``. DINOv3 runs in its Gram phase and CLIP with
open_clip's ViT-B text tower, on the same image encoders.

    PYTHONPATH=. python benchmarks/gpu_check.py                 # on a GPU: benchmarks/results/gpu_check_cuda.json
    python benchmarks/gpu_check.py --smoke --out /tmp/check.json  # the same code paths on a CPU in seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from common import ROOT, check_out, write_result
from PIL import Image

CUDA = torch.cuda.is_available()

# Dense bf16 tensor-core peaks (FLOP/s, without the 2:4 sparsity NVIDIA's headline figures assume),
# from NVIDIA's data sheets; H100 and H200 are the SXM parts. The first name contained in the
# device's name wins, so the more specific names come first.
PEAK_BF16_DENSE = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)

# The papers' heads and MAE decoder at ViT size (as step_throughput.py uses them); tiny ones for --smoke.
FULL_HEADS = dict(
    size=224,
    local=96,
    heads=dict(hidden_dim=4096, out_dim=256),
    dino_head=dict(hidden_dim=2048, bottleneck_dim=256, out_dim=65536),
    decoder=dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
    simmim=dict(mask_patch_size=32),
    ijepa={},
    clip={},  # open_clip's ViT-B text tower: 77 tokens, 512 wide, 12 layers
)
SMOKE = dict(
    size=32,
    local=16,
    heads=dict(hidden_dim=32, out_dim=16),
    dino_head=dict(hidden_dim=32, bottleneck_dim=16, out_dim=64),
    decoder=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    simmim=dict(mask_patch_size=8),
    ijepa=dict(predictor_dim=32, predictor_depth=1, min_keep=4),  # 3 x 3 target blocks on the 8 x 8 grid
    clip=dict(embed_dim=16, context_length=12, vocab_size=50, text_width=32, text_heads=2, text_layers=1),
)
MODELS = {  # name -> (encoder config, heads)
    "vit_s16": (dict(name="vit_small_patch16_224", img_size=224), FULL_HEADS),
    "vit_b16": (dict(name="vit_base_patch16_224", img_size=224), FULL_HEADS),
}
SMOKE_MODELS = {
    "tiny": (dict(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2), SMOKE)
}
OBJECTIVES = ("MAE", "SimMIM", "DINO", "DINOv2", "DINOv3", "MoCoV3", "SimCLR", "IJEPA", "CLIP")
VIEWS = {  # else multicrop
    "MAE": "single",
    "SimMIM": "single",
    "IJEPA": "single",
    "MoCoV3": "two",
    "SimCLR": "two",
    "CLIP": "captioned",
}
#: Packages an objective needs beyond ssl-vit's own (the `clip` extra): its row says when they are missing.
REQUIRES = {"CLIP": "open_clip"}


class Clock:
    """The run's time budget: each part ends by its own deadline, and what would start too late is skipped."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self, deadline: float | None = None) -> float:
        return min(self.end, deadline or self.end) - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Report:
    """The one JSON, rewritten after every measurement."""

    def __init__(self, out: Path | None, device: str, **settings: Any) -> None:
        self.out, self.device, self.settings = out, device, settings
        self.rows: list[dict[str, Any]] = []
        self.parts: dict[str, Any] = {}

    def write(self) -> Path:
        return write_result("gpu_check", self.device, self.rows, out=self.out, **self.settings, **self.parts)


def missing_packages(*names: str) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def peak_bf16_dense() -> float | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_DENSE if key in name), None)


def attention_kernels(encoders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Which fused attention kernels are enabled, and whether the flash and memory-efficient
    kernels accept each encoder's attention shape in the training dtype (flash refuses fp32 and
    some head sizes)."""
    import timm

    dtype = torch.bfloat16 if CUDA else torch.float32
    device = "cuda" if CUDA else "cpu"
    result: dict[str, Any] = {
        "timm_fused_attn": timm.layers.use_fused_attn(),
        "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient_sdp_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
    }
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, config in encoders.items():
        vit = timm.create_model(**{k: v for k, v in config.items() if k != "name"}, model_name=config["name"])
        heads, dim = vit.blocks[0].attn.num_heads, vit.embed_dim
        tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
        q = torch.randn(2, heads, tokens, dim // heads, device=device, dtype=dtype, requires_grad=True)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
                result[f"{name}_{backend.name.lower()}"] = "accepted"
            except RuntimeError as err:  # no kernel of this backend for these shapes, dtype or device
                result[f"{name}_{backend.name.lower()}"] = f"refused: {str(err).splitlines()[0][:160]}"
    return result


def builders(encoder: dict[str, Any], h: dict[str, Any]) -> dict[str, Callable[[], L.LightningModule]]:
    from ssl_vit.methods import CLIP, DINO, IJEPA, MAE, DINOv2, DINOv3, MoCoV3, SimCLR, SimMIM

    return {
        "MAE": lambda: MAE(encoder, **h["decoder"]),
        "SimMIM": lambda: SimMIM(encoder, **h["simmim"]),
        "DINO": lambda: DINO(encoder, **h["dino_head"]),
        "DINOv2": lambda: DINOv2(encoder, **h["dino_head"]),
        # in its Gram phase from the first step, so the Gram teacher's pass and loss are timed too
        "DINOv3": lambda: DINOv3(encoder, gram_start=0.0, gram_ramp=0.0, **h["dino_head"]),
        "MoCoV3": lambda: MoCoV3(encoder, **h["heads"]),
        "SimCLR": lambda: SimCLR(encoder, **h["heads"]),
        "IJEPA": lambda: IJEPA(encoder, **h["ijepa"]),
        "CLIP": lambda: CLIP(encoder, **h["clip"]),
    }


def lightly_builders(encoder: dict[str, Any], h: dict[str, Any]) -> dict[str, Callable[[], L.LightningModule]]:
    """step_throughput.py's lightly objectives (its documented examples) on the same encoders."""
    from step_throughput import LightlyDINO, LightlyMAE, LightlySimCLR

    from ssl_vit.methods import DINO, MAE, SimCLR

    return {
        "MAE": lambda: LightlyMAE(MAE(encoder, **h["decoder"]).encoder.vit, **h["decoder"]),
        "SimCLR": lambda: LightlySimCLR(SimCLR(encoder, **h["heads"]).encoder, **h["heads"]),
        "DINO": lambda: LightlyDINO(DINO(encoder, **h["dino_head"]).encoder, **h["dino_head"]),
    }


def synthetic_batch(view: str, batch: int, h: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    """Random images as the objective's view makes them, with labels, or with caption tokens
    (``captioned``: words, then the end-of-text token, the vocabulary's last, where CLIP pools)."""
    g = torch.Generator().manual_seed(0)
    size, local = h["size"], h["local"]
    images = lambda side: torch.randn(batch, 3, side, side, generator=g)  # noqa: E731
    if view == "captioned":
        context, vocab = h["clip"].get("context_length", 77), h["clip"].get("vocab_size", 49408)
        tokens = torch.randint(1, vocab - 1, (batch, context), generator=g)
        tokens[torch.arange(batch), torch.randint(2, context, (batch,), generator=g)] = vocab - 1
        return images(size), tokens
    views = {
        "single": lambda: images(size),
        "two": lambda: [images(size), images(size)],
        "multicrop": lambda: [images(size), images(size), images(local), images(local)],
    }[view]()
    return views, torch.zeros(batch, dtype=torch.long)


def timed_run(
    build: Callable[[], L.LightningModule], batch: Any, args: argparse.Namespace, compile_kwargs: dict | None
) -> dict[str, Any]:
    """One measurement: images/s and FLOPs per step (step_throughput.measure), peak memory, and
    with ``compile_kwargs`` the blocks compiled and dynamo's compile counts."""
    from step_throughput import measure
    from torch._dynamo.utils import counters

    from ssl_vit.encoder import compile_blocks

    torch.manual_seed(0)
    module = build()
    if compile_kwargs is not None:
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(module, **compile_kwargs)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    images_per_second, flops = measure(module, batch, args.steps, args.warmup, args.precision)
    result: dict[str, Any] = {"img_per_s": round(images_per_second, 1), "flops_per_step": flops}
    if CUDA:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if compile_kwargs is not None:
        # Every compiled block class compiles one frame at its first call; more frames are
        # recompiles (a new token count: MAE's visible tokens, DINO's local crops, guards failing).
        result["dynamo_frames_compiled"] = counters["frames"]["total"]
        result["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    del module
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return result


def step_rows(report: Report, args: argparse.Namespace, clock: Clock, deadline: float) -> None:
    """Part 1: every objective, eager, compiled and lightly's, per model."""
    lightly_missing = missing_packages("lightly")
    compile_kwargs = {"backend": "eager"} if args.smoke else {}  # --smoke: dynamo's tracing only, no codegen
    peak = peak_bf16_dense()
    for model, (encoder, h) in (SMOKE_MODELS if args.smoke else MODELS).items():
        ours = builders(encoder, h)
        theirs = {} if lightly_missing else lightly_builders(encoder, h)
        for objective in OBJECTIVES:
            row: dict[str, Any] = {"model": model, "objective": objective, "batch": args.batch}
            report.rows.append(row)
            missing = missing_packages(REQUIRES[objective]) if objective in REQUIRES else []
            if missing:
                skipped = {"skipped": f"not installed: {missing[0]}"}
                row.update({mode: dict(skipped) for mode in ("eager", "compiled", "lightly")})
                report.write()
                continue
            batch = synthetic_batch(VIEWS.get(objective, "multicrop"), args.batch, h)
            runs = {"eager": (ours[objective], None), "compiled": (ours[objective], compile_kwargs)}
            if objective in theirs:
                runs["lightly"] = (theirs[objective], None)
            for mode, (build, kwargs) in runs.items():
                if clock.left(deadline) < args.min_seconds[mode]:
                    row[mode] = {"skipped": "time"}
                    continue
                started = time.monotonic()
                try:
                    row[mode] = timed_run(build, batch, args, kwargs)
                except Exception as err:  # one failing objective must not stop the check
                    row[mode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                row[mode]["seconds"] = round(time.monotonic() - started, 1)
                report.write()
            add_ratios(row, peak)
            if "lightly" not in runs:
                row["lightly"] = {
                    "skipped": f"not installed: {lightly_missing[0]}" if lightly_missing else "no lightly builder"
                }
            report.write()
            print(json.dumps(row), flush=True)


def add_ratios(row: dict[str, Any], peak: float | None) -> None:
    """GFLOP per image and MFU (from the eager run's FLOP count), and the ratios over lightly."""
    flops = row.get("eager", {}).get("flops_per_step")
    if flops:
        row["gflop_per_img"] = round(flops / row["batch"] / 1e9, 3)
    for mode in ("eager", "compiled", "lightly"):
        rate = row.get(mode, {}).get("img_per_s")
        if rate and flops:
            row[mode]["achieved_tflop_per_s"] = round(flops / row["batch"] * rate / 1e12, 3)
            row[mode]["mfu"] = round(flops / row["batch"] * rate / peak, 3) if peak else None
    theirs = row.get("lightly", {}).get("img_per_s")
    for mode in ("eager", "compiled"):
        ours = row.get(mode, {}).get("img_per_s")
        if ours and theirs:
            row[f"ratio_{mode}_over_lightly"] = round(ours / theirs, 2)


def write_jpeg_shards(folder: Path, images: int, side: int, shards: int) -> None:
    """Random-ish JPEGs (quality 90): smooth colour fields with noise, so they compress like photos."""
    from ssl_vit.data import write_shards

    def samples():
        rng = np.random.default_rng(0)
        for i in range(images):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side))
            noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (side, side, 3))
            buf = io.BytesIO()
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            yield "jpg", buf.getvalue(), i % 10

    write_shards(
        samples(), folder, classes=[str(c) for c in range(10)], source="gpu_check", samples_per_shard=images // shards
    )


class StepClock(L.Callback):
    """Timestamps a pretraining run's steps after ``warmup`` and writes the end-to-end rate
    (batches arriving from the loader included) and the in-step rate to ``out``."""

    def __init__(self, out: str, warmup: int) -> None:
        self.out, self.warmup = out, warmup
        self.images, self.in_step, self.first_end, self.last_end, self._start = 0, 0.0, 0.0, 0.0, 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = self._now()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        now = self._now()
        if batch_idx == self.warmup - 1:
            self.first_end = now
        elif batch_idx >= self.warmup:
            self.images += len(batch[1])
            self.in_step += now - self._start
            self.last_end = now

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        rates = {"timed_images": self.images}
        if self.images:
            rates["end_to_end_img_per_s"] = self.images / (self.last_end - self.first_end)
            rates["in_step_img_per_s"] = self.images / self.in_step
        Path(self.out).write_text(json.dumps(rates))


def pretrain_recipe(objective: str, encoder: dict, h: dict, shards: Path, run: Path, args, on_device: bool) -> dict:
    """A pretraining recipe with the same model, crops and batch as the step-alone rows."""
    model_args = {"SimCLR": h["heads"], "DINO": h["dino_head"]}[objective]
    view = (
        {"class_path": "ssl_vit.data.TwoViews", "init_args": {"size": h["size"]}}
        if objective == "SimCLR"
        else {
            "class_path": "ssl_vit.data.MultiCropViews",
            "init_args": {"global_size": h["size"], "local_size": h["local"], "num_local": 2},
        }
    )
    view["init_args"]["augment_on_device"] = on_device
    clock = {"class_path": "gpu_check.StepClock", "init_args": {"out": str(run / "rates.json"), "warmup": 2}}
    return {
        "seed_everything": 0,
        "allow_collapse": True,  # a few steps are no test of collapse
        "export": False,
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "precision": args.precision,
            "max_steps": args.e2e_steps,
            "default_root_dir": str(run),
            "log_every_n_steps": 10,
            "callbacks": [clock],
        },
        "model": {"class_path": f"ssl_vit.methods.{objective}", "init_args": {"encoder": encoder, **model_args}},
        "data": {
            "train_shards": str(shards),
            "view": view,
            "batch_size": args.batch,
            "num_workers": args.workers,
            "shuffle_buffer": 100,
        },
    }


def end_to_end(report: Report, args: argparse.Namespace, clock: Clock) -> None:
    """Part 2: short ``ssl-vit pretrain`` runs on JPEG shards, two-view and multi-crop, with and
    without ``augment_on_device``; data stall against the step-alone eager rate of part 1."""
    if missing_packages("jsonargparse"):  # the CLI's recipe parser
        report.parts["end_to_end"] = {"skipped": "not installed: jsonargparse"}
        return
    from ssl_vit.cli import main as ssl_vit_main

    model, (encoder, h) = next(iter((SMOKE_MODELS if args.smoke else MODELS).items()))
    results: dict[str, Any] = {"model": model, "workers": args.workers, "steps": args.e2e_steps}
    report.parts["end_to_end"] = results
    step_alone = {row["objective"]: row["eager"].get("img_per_s") for row in report.rows if row["model"] == model}
    with tempfile.TemporaryDirectory() as tmp:
        # Training reads all of train/ when a val/ folder is beside it (else it holds out a tenth),
        # and its one epoch covers every step: no loader restart inside the timed steps.
        shards = Path(tmp) / "data" / "train"
        write_jpeg_shards(shards, args.e2e_steps * args.batch, args.jpeg_side, shards=max(args.workers, 8))
        write_jpeg_shards(shards.parent / "val", args.batch, args.jpeg_side, shards=1)
        for objective in ("SimCLR", "DINO"):
            for on_device in (False, True):
                name = f"{objective}{'_augment_on_device' if on_device else ''}"
                if clock.left() < args.min_seconds["end_to_end"]:
                    results[name] = {"skipped": "time"}
                    continue
                run = Path(tmp) / name
                run.mkdir()
                recipe = run / "recipe.yaml"
                recipe.write_text(json.dumps(pretrain_recipe(objective, encoder, h, shards, run, args, on_device)))
                started = time.monotonic()
                try:
                    ssl_vit_main(["pretrain", "--config", str(recipe)])
                    result = json.loads((run / "rates.json").read_text())
                except (Exception, SystemExit) as err:  # the CLI exits on a bad recipe
                    result = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                result["seconds"] = round(time.monotonic() - started, 1)
                rate = result.get("end_to_end_img_per_s")
                if rate and step_alone.get(objective):
                    result["step_alone_img_per_s"] = step_alone[objective]
                    result["data_stall"] = round(1 - rate / step_alone[objective], 3)
                results[name] = result
                report.write()
                print(name, json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny ViT, 32 px, fp32, 2 steps: the code paths on a CPU")
    parser.add_argument("--out", type=Path, help="the JSON; default benchmarks/results/gpu_check_<device>.json")
    # 8 minutes: with Python's start and one measurement begun just before the deadline, under 9.
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    args = parser.parse_args()
    if args.out:
        check_out(args.out, "gpu_check")  # before any measurement
    if args.smoke:
        args.batch, args.steps, args.warmup, args.precision = 4, 2, 2, "32-true"
        args.workers, args.e2e_steps, args.jpeg_side = 2, 4, 64
        args.min_seconds = dict.fromkeys(("eager", "compiled", "lightly", "end_to_end"), 0.0)
        e2e_reserve = 0.0
    else:
        args.batch, args.steps, args.warmup = 128, 8, 3
        args.precision = "bf16-mixed" if CUDA else "32-true"
        args.workers, args.e2e_steps, args.jpeg_side = 16, 32, 256
        # The least time each measurement is started with: compiling ViT-B's blocks, forward and
        # backward, takes tens of seconds; an end-to-end run starts 16 workers and a trainer.
        args.min_seconds = dict(eager=15.0, compiled=45.0, lightly=15.0, end_to_end=30.0)
        e2e_reserve = 150.0
    clock = Clock(args.budget)
    device = "cuda" if CUDA else "cpu"
    report = Report(
        args.out,
        device,
        precision=args.precision,
        timed_steps=args.steps,
        warmup_steps=args.warmup,
        peak_bf16_dense_flop_per_s=peak_bf16_dense(),
    )
    seconds: dict[str, float] = {}
    report.parts["part_seconds"] = seconds
    models = SMOKE_MODELS if args.smoke else MODELS
    started = time.monotonic()
    report.parts["attention"] = attention_kernels({name: encoder for name, (encoder, _) in models.items()})
    seconds["attention"] = round(time.monotonic() - started, 1)
    report.write()
    missing = missing_packages("webdataset", "braceexpand")  # ssl_vit imports them
    if missing:
        report.parts["step_rows"] = report.parts["end_to_end"] = {"skipped": f"not installed: {', '.join(missing)}"}
    else:
        sys.path.insert(0, str(ROOT))  # ssl_vit from this checkout, installed or not
        started = time.monotonic()
        step_rows(report, args, clock, deadline=clock.end - e2e_reserve)
        seconds["steps"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        end_to_end(report, args, clock)
        seconds["end_to_end"] = round(time.monotonic() - started, 1)
    seconds["total"] = round(clock.elapsed(), 1)
    print(f"wrote {report.write()}")


if __name__ == "__main__":
    main()
