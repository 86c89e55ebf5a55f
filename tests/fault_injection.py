"""Fault injection, end to end: each case breaks a tiny pretraining run the way clusters and
datasets do (a kill, a pre-emption, a truncated checkpoint, broken data, a NaN, a bad recipe),
runs ``ssl-vit pretrain`` as a user would, and reports what was expected, what was observed and
whether anything was lost.

    python -m tests.fault_injection          # prints the table (about two minutes on 2 CPU cores)

``tests/test_reliability.py`` runs the same cases under pytest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image

from ssl_vit.data.shards import write_shards
from ssl_vit.export import export_encoder

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 8, 3  # 128 samples / batch 16


class KillAt(L.Callback):
    """Sends this process ``signal`` right after optimiser step ``step`` (to the process group as a
    step ``step`` begins, for "SIGTERM to the group")."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        # as `timeout` and Slurm's scancel send it: to the loader workers too, at any moment of a step
        if self.signal == "SIGTERM to the group" and trainer.global_step == self.step - 1:
            os.killpg(os.getpgrp(), signal.SIGTERM)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and self.signal != "SIGTERM to the group":
            if self.signal == "SIGINT":  # as a terminal sends Ctrl-C: to the loader workers too
                os.killpg(os.getpgrp(), signal.SIGINT)
            else:
                os.kill(os.getpid(), getattr(signal, self.signal))


class InterruptAtEnd(L.Callback):
    """Ctrl-C (or ``signal``) once the last step is done, as the end-of-run work (evaluation,
    export) runs."""

    def __init__(self, signal: str = "SIGINT") -> None:
        self.signal = signal

    def on_train_end(self, trainer: L.Trainer, *args) -> None:
        if self.signal == "SIGINT":
            os.killpg(os.getpgrp(), signal.SIGINT)  # as a terminal sends it (see KillAt)
        else:
            os.kill(os.getpid(), getattr(signal, self.signal))


class InterruptAtTheLastStepsEnd(L.Callback):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) as the last step ends, before
    the epoch's end saves it: where a fine-tuning run validates."""

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == trainer.max_steps:
            os.killpg(os.getpgrp(), signal.SIGINT)


class InterruptTheLastValidation(L.Callback):
    """Ctrl-C (to the process group) while fine-tuning validates its last step, before the epoch's
    end saves it."""

    def on_validation_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == trainer.max_steps and not trainer.sanity_checking:
            os.killpg(os.getpgrp(), signal.SIGINT)


class TermBeforeTheFirstStep(L.Callback):
    """A SIGTERM to the process group once the evaluation at the run's start is done (it is the
    callback before this one), before the first step."""

    def on_fit_start(self, trainer: L.Trainer, *args) -> None:
        os.killpg(os.getpgrp(), signal.SIGTERM)


class NaNInputAt(L.Callback):
    """Fills the batch of optimiser step ``step`` with NaN, so its loss and gradients are NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


class CollapsedFrom(L.Callback):
    """Marks every optimiser step from ``step`` on as collapsed, as an objective's own check does
    when its teacher's outputs are uniform."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step > self.step:
            pl_module.collapse_watch.update(trainer.global_step, True, repeat_every=10**9)


class WouldRunCode:
    """Unpickling this creates ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_tiny_shards(folder: Path, labelled: bool = True, seed: int = 0) -> Path:
    """128 random 32-px images in 4 shards."""
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(128))
    samples = (("png", png(img), i % 4 if labelled else None) for i, img in enumerate(images))
    classes = [str(c) for c in range(4)] if labelled else []
    write_shards(samples, folder, classes=classes, source="fault injection", samples_per_shard=32)
    return folder


def odd_mode_images(seed: int = 1) -> dict[str, bytes]:
    """Images that decode, but not as 8-bit RGB."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)))
    return {
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "palette.png": encoded(rgb.convert("P"), "PNG"),
        "alpha.png": encoded(rgba, "PNG"),
        "grey16.png": png(rng.integers(0, 65536, (32, 32), dtype=np.uint16).astype(np.uint16)),
        "tiny.png": png(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)),
        "huge.jpg": encoded(rgb.resize((4000, 3000)), "JPEG"),
    }


def write_broken_shard(path: Path, marker: Path) -> None:
    """One shard of 12 samples: 6 odd-mode images, 1 good PNG, 1 corrupt, 1 truncated, 1 empty
    file, 1 with a pickle member that would run code (its image is fine), then a truncated tail
    (a 12th sample cut off mid-file). A full pass reads 11 samples, keeps 8 and skips 4 (corrupt,
    truncated, empty, the tail). (A label that is no class index is no label: its image is kept.)"""
    rng = np.random.default_rng(2)
    good = png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    members = []
    for i, (name, data) in enumerate(odd_mode_images().items()):
        ext = name.split(".", 1)[1]
        members += [(f"odd{i}.{ext}", data), (f"odd{i}.cls", b"1")]
    members += [("good.png", good), ("good.cls", b"0")]
    members += [("corrupt.png", b"not an image at all"), ("corrupt.cls", b"0")]
    members += [("truncated.png", good[: len(good) // 2]), ("truncated.cls", b"0")]
    members += [("empty.png", b""), ("empty.cls", b"0")]
    members += [("pickled.png", good), ("pickled.cls", b"2"), ("pickled.pickle", pickle.dumps(WouldRunCode(marker)))]
    members += [("tail.png", good)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[: data.rindex(good) + 100])  # cut inside the last member


def recipe(folder: Path, shards: Path, **overrides) -> Path:
    """A tiny MAE run: 3 epochs of 8 steps, a checkpoint every epoch."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": EPOCHS,
            "default_root_dir": str(folder / "run"),
            "logger": False,
            "enable_model_summary": False,
        },
        "checkpoint": {"dirpath": str(folder / "run/checkpoints"), "every_n_epochs": 1},
        "model": {
            "class_path": "ssl_vit.methods.MAE",
            "init_args": {
                "encoder": {
                    "name": "vit_tiny_patch16_224",
                    "img_size": 32,
                    "patch_size": 4,
                    "embed_dim": 32,
                    "depth": 1,
                    "num_heads": 2,
                },
                "decoder_dim": 16,
                "decoder_depth": 1,
                "decoder_heads": 2,
                "base_lr": 1e-3,
                "warmup_epochs": 1,
            },
        },
        "data": {
            "train_shards": str(shards),
            "val_shards": str(shards),  # all of them for training: STEPS_PER_EPOCH, no held-out tenth
            "view": {"class_path": "ssl_vit.data.MAEView", "init_args": {"size": 32}},
            "batch_size": 16,
            "num_workers": 1,
            "shuffle_buffer": 32,
        },
    }
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pretrain(folder: Path, *args: str, terminal: bool = False) -> subprocess.CompletedProcess:
    """``ssl-vit pretrain ARGS`` in a process of its own, for runs that a fault kills or signals;
    with ``terminal``, as started at a terminal: a process group of its own (which Ctrl-C
    signals), Ctrl-C not ignored (as it is for the jobs a shell or CI starts in the background)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "ssl_vit.cli", "pretrain", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        start_new_session=terminal,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if terminal else None,
    )


@contextlib.contextmanager
def stderr_as_a_new_process_shows_it(stderr: io.StringIO) -> Iterator[None]:
    """Into ``stderr``, what a new process would show there and pytest would otherwise keep or send
    elsewhere: warnings (under a new interpreter's filters), the lines of loggers whose handler
    writes to the stderr of when they were made (Lightning's), and WARNING records of loggers
    without handlers of their own."""
    loggers = [logging.root, *logging.Logger.manager.loggerDict.values()]
    handlers = [h for log in loggers if isinstance(log, logging.Logger) for h in log.handlers]
    streams = {
        h: h.stream
        for h in handlers
        if type(h) is logging.StreamHandler and h.stream not in (sys.stdout, sys.__stdout__)
    }
    for handler in streams:
        handler.setStream(stderr)
    unhandled = logging.StreamHandler(stderr)
    unhandled.setLevel(logging.WARNING)
    logging.root.addHandler(unhandled)
    try:
        with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line)
            )
            yield
    finally:
        logging.root.removeHandler(unhandled)
        for handler, stream in streams.items():
            handler.setStream(stream)


def in_this_process(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    """``ssl-vit ARGV`` run by this process (in ``folder``), for every command that no fault kills
    or signals: a new interpreter would spend seconds importing torch and Lightning per command."""
    from ssl_vit.cli import main

    stdout, stderr, here = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(folder)
    try:
        with stderr_as_a_new_process_shows_it(stderr), contextlib.redirect_stdout(stdout):
            try:
                main(list(argv))
                code = 0
            except SystemExit as done:
                code = done.code
            except Exception:
                code = 1
                traceback.print_exc()
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(argv), code, stdout.getvalue(), stderr.getvalue())


def pretrain_in_this_process(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return in_this_process(folder, "pretrain", *args)


#: An end-of-run evaluation callback for shrunk recipe runs: k-NN (and zero-shot) at both ends, no probes.
KNN_AT_BOTH_ENDS = {"class_path": "ssl_vit.eval.EvaluationCallback", "init_args": {"at_start": True, "probes": False}}


def pretrain_recipe_briefly(
    folder: Path, recipe: str, shards: Path, model_args: dict, callbacks: list | None = None
) -> subprocess.CompletedProcess:
    """A shipped recipe as a user runs it, shrunk: 2 steps on ``shards`` (its evaluation data too),
    batch 8, one loader worker, ``model_args`` over its model's, no pictures."""
    config = yaml.safe_load((ROOT / recipe).read_text())
    config["trainer"].update(max_steps=2, max_epochs=-1, logger=False, callbacks=callbacks or [])
    config["model"]["init_args"].update(model_args)
    data = dict(train_shards=str(shards), val_shards=str(shards), batch_size=8, num_workers=1, shuffle_buffer=16)
    config["data"].update(data)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(config))
    return pretrain_in_this_process(folder, "--config", "recipe.yaml", "--pictures.every_n_epochs", "0")


def fault(callback: str, **init_args) -> list[str]:
    """Command-line arguments adding one of this module's fault callbacks to the run."""
    args = [f"--trainer.callbacks+=tests.fault_injection.{callback}"]
    return args + [f"--trainer.callbacks.init_args.{k}={v}" for k, v in init_args.items()]


def checkpoints_intact(folder: Path) -> bool:
    """No half-written file: every checkpoint loads, and no temporary file was left behind."""
    ckpt_dir = folder / "run/checkpoints"
    if list(ckpt_dir.glob(".*.tmp")):
        return False
    for path in ckpt_dir.glob("*.ckpt"):
        try:
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception:
            return False
    return True


def last_state(folder: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(folder / "run/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    return ckpt["global_step"], ckpt["state_dict"]


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return bool(state) and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def new_run(work: Path, name: str, **overrides) -> tuple[Path, str]:
    """A fresh folder for one case and its tiny recipe."""
    folder = work / name
    folder.mkdir()
    return folder, str(recipe(folder, work / "shards", **overrides))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@dataclass
class Outcome:
    expected: str
    observed: str
    ok: bool
    data_lost: str


def uninterrupted(work: Path) -> tuple[int, dict[str, torch.Tensor]]:
    folder = work / "uninterrupted"
    folder.mkdir(exist_ok=True)
    if not (folder / "run/checkpoints/last.ckpt").exists():
        result = pretrain_in_this_process(folder, "--config", str(recipe(folder, work / "shards")))
        assert result.returncode == 0, result.stderr[-3000:]
    return last_state(folder)


def case_sigkill(work: Path) -> Outcome:
    """SIGKILL in the middle of epoch 2; the same command again resumes from epoch 1's checkpoint."""
    folder, config = new_run(work, "sigkill")
    killed = pretrain(folder, "--config", config, *fault("KillAt", step=STEPS_PER_EPOCH + 3))
    again = pretrain_in_this_process(folder, "--config", config)
    step, params = last_state(folder)
    ref_step, ref_params = uninterrupted(work)
    diff = max_difference(params, ref_params)
    resumed = "resuming from" in again.stderr
    ok = killed.returncode == -signal.SIGKILL and again.returncode == 0 and resumed and step == ref_step
    ok = ok and diff < 1e-4
    return Outcome(
        f"resume, end at step {ref_step}, parameters as uninterrupted",
        f"killed (rc {killed.returncode}); resumed={resumed}, step {step}, max |param diff| {diff:.1e}",
        ok,
        "none" if checkpoints_intact(folder) and resumed else "yes",
    )


def case_sigkill_before_the_first_checkpoint(work: Path) -> Outcome:
    """SIGKILL before the first checkpoint (a short run of the quickstarts' 78-step checkpoints):
    the same command starts again from step 0, and says why, where it said nothing."""
    folder, config = new_run(work, "sigkill_early")
    killed = pretrain(folder, "--config", config, *fault("KillAt", step=3))
    again = pretrain_in_this_process(folder, "--config", config)
    step, params = last_state(folder)
    ref_step, ref_params = uninterrupted(work)
    diff = max_difference(params, ref_params)
    said = "starting at step 0: an earlier start in" in again.stderr and "was killed before its first" in again.stderr
    ok = killed.returncode == -signal.SIGKILL and again.returncode == 0 and said and step == ref_step and diff < 1e-4
    return Outcome(
        f"say it starts at step 0 and why, end at step {ref_step}, parameters as uninterrupted",
        f"killed (rc {killed.returncode}); said={said}, step {step}, max |param diff| {diff:.1e}",
        ok,
        "none",
    )


def case_resume_after_init_from_removed(work: Path) -> Outcome:
    """A run started from an export (init_from) resumes from its own checkpoint, which holds every
    weight, though the export has been moved away since: it stopped at the missing export."""
    folder, config = new_run(work, "init_gone", **{"trainer.max_epochs": 1})
    uninterrupted(work)
    start = export_encoder(work / "uninterrupted/run/checkpoints/last.ckpt", folder / "start")
    init = f"--model.init_args.init_from={start}"
    first = pretrain_in_this_process(folder, "--config", config, init)
    shutil.move(start, folder / "moved")
    again = pretrain_in_this_process(folder, "--config", config, init, f"--trainer.max_epochs={EPOCHS}")
    step, _ = last_state(folder)
    ok = first.returncode == 0 and again.returncode == 0 and "resuming from" in again.stderr
    ok = ok and step == EPOCHS * STEPS_PER_EPOCH
    return Outcome(
        f"resume to step {EPOCHS * STEPS_PER_EPOCH} without the moved export",
        f"rc {first.returncode}, then rc {again.returncode}: {last_line(again.stderr)[:60]}; step {step}",
        ok,
        "none",
    )


def case_project_moved(work: Path) -> Outcome:
    """A project, its images, the export its run started from and its run folder, moved with mv,
    and the same command in its new place with a higher limit: it resumes on the same files (it
    refused: the recorded locations of the data, then of the export, were the old ones)."""
    folder, config = new_run(work, "project", **{"trainer.max_epochs": 1})
    shutil.copytree(work / "shards", folder / "photos")
    uninterrupted(work)
    export_encoder(work / "uninterrupted/run/checkpoints/last.ckpt", folder / "start")
    data = ["--data.train_shards=photos", "--data.val_shards=photos", "--model.init_args.init_from=start"]
    first = pretrain_in_this_process(folder, "--config", config, *data)
    moved = folder.rename(work / "project_moved")
    there = [f"--trainer.default_root_dir={moved / 'run'}", f"--checkpoint.dirpath={moved / 'run/checkpoints'}"]
    longer = f"--trainer.max_epochs={EPOCHS}"
    again = pretrain_in_this_process(moved, "--config", str(moved / Path(config).name), *data, *there, longer)
    step, _ = last_state(moved)
    ok = first.returncode == 0 and again.returncode == 0 and "resuming from" in again.stderr
    ok = ok and step == EPOCHS * STEPS_PER_EPOCH
    return Outcome(
        f"resume on the moved files to step {EPOCHS * STEPS_PER_EPOCH}",
        f"rc {first.returncode}, then rc {again.returncode}: {last_line(again.stderr)[:60]}; step {step}",
        ok,
        "none",
    )


def case_sigterm(work: Path) -> Outcome:
    """A scheduler's SIGTERM, to the process group as `timeout` and Slurm's scancel send it: last.ckpt
    is saved after the step in flight, the exit code says so. (Before, the loader worker died of it
    and the run ended in a traceback, unsaved.)"""
    folder, config = new_run(work, "sigterm")
    term_step = STEPS_PER_EPOCH + 3
    group = "SIGTERM to the group"
    stopped = pretrain(folder, "--config", config, *fault("KillAt", step=term_step, signal=group), terminal=True)
    saved_step, _ = last_state(folder)
    ref_step, _ = uninterrupted(work)
    # the stopped run's weights, exported: their card says that the run stopped short (it read as a finished run's)
    early = export_encoder(folder / "run/checkpoints/last.ckpt", folder / "early-export")
    said = f"optimiser steps: {term_step} of the {ref_step} its run was set to take"
    short = said in (early / "README.md").read_text()
    again = pretrain_in_this_process(folder, "--config", config)
    step, _ = last_state(folder)
    short = short and "its run was set to take" not in (folder / "run/export/README.md").read_text()
    ok = stopped.returncode == 128 + signal.SIGTERM and saved_step == term_step and step == ref_step and short
    ok = ok and "weights_only" not in stopped.stdout + stopped.stderr  # Lightning's line on a save not told what
    return Outcome(
        f"save at step {term_step}, exit 143, its card says it stopped short; resume to step {ref_step}",
        f"rc {stopped.returncode}, saved step {saved_step}, card said so={short}, resumed rc {again.returncode} to "
        f"step {step}",
        ok and again.returncode == 0,
        "none" if saved_step == term_step and checkpoints_intact(folder) else "yes",
    )


def case_ctrl_c(work: Path) -> Outcome:
    """Ctrl-C at a terminal in epoch 2 (to the process and its loader worker): the step in flight
    ends and is saved, the exit status says so, and the same command resumes from it to the
    uninterrupted run's parameters. (Before, nothing was saved: the run went back to epoch 1's
    checkpoint.)"""
    folder, config = new_run(work, "ctrl_c")
    at = STEPS_PER_EPOCH + 3
    stopped = pretrain(folder, "--config", config, *fault("KillAt", step=at, signal="SIGINT"), terminal=True)
    said = f"stopped by Ctrl-C at step {at}: saved" in stopped.stderr
    saved_step, _ = last_state(folder)
    again = pretrain_in_this_process(folder, "--config", config)
    step, state = last_state(folder)
    ref_step, ref_state = uninterrupted(work)
    resumed = f"resuming from {folder / 'run/checkpoints/last.ckpt'}" in again.stderr
    same = step == ref_step and max_difference(state, ref_state) == 0
    ok = stopped.returncode == 128 + signal.SIGINT and said and saved_step == at and resumed and same
    return Outcome(
        f"save at step {at}, exit 130; the same command resumes from it to step {ref_step}, as uninterrupted",
        f"rc {stopped.returncode}, said={said}, saved step {saved_step}; resumed={resumed}, rc {again.returncode}, "
        f"step {step}, parameters as uninterrupted={same}",
        ok and again.returncode == 0,
        "none" if saved_step == at and checkpoints_intact(folder) else "yes",
    )


def case_ctrl_c_after_the_last_step(work: Path) -> Outcome:
    """Ctrl-C during the end-of-run work, with checkpoints every 5 steps of 24: the last step is
    kept, and the same command again does only the evaluation, export and summary. (The run kept
    step 20 and trained the rest again; with a checkpoint at the last step, it said "is finished"
    and never wrote the export or the summary.)"""
    end_of_run_knn = {"class_path": "ssl_vit.eval.EvaluationCallback", "init_args": {"probes": False}}
    overrides = {"checkpoint.every_n_epochs": None, "checkpoint.every_n_train_steps": 5}
    folder, config = new_run(work, "ctrl_c_at_end", **overrides, **{"trainer.callbacks": [end_of_run_knn]})
    stopped = pretrain(folder, "--config", config, *fault("InterruptAtEnd"), terminal=True)
    kept, _ = last_state(folder)
    again = pretrain_in_this_process(folder, "--config", config)
    summary_path = folder / "run/summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    done = summary.get("steps") == kept and summary.get("knn_k20_top1") is not None
    done = done and (folder / "run/export/model.safetensors").is_file() and "trained to its limit" in again.stderr
    ok = stopped.returncode != 0 and kept == EPOCHS * STEPS_PER_EPOCH and again.returncode == 0 and done
    return Outcome(
        f"keep step {EPOCHS * STEPS_PER_EPOCH}; the same command evaluates, exports and writes the summary",
        f"rc {stopped.returncode}, kept step {kept}; then rc {again.returncode}, summary of step "
        f"{summary.get('steps')} with k-NN {summary.get('knn_k20_top1')}, ended={done}",
        ok,
        "none" if kept == EPOCHS * STEPS_PER_EPOCH else "yes",
    )


def case_ctrl_c_as_the_last_step_ends(work: Path) -> Outcome:
    """Ctrl-C as the last step ends, before the epoch's end saves it (where fine-tuning validates):
    the last step is saved and named, the loader's workers stopped, and the same command does the
    end. (It said "saved in ;", saved nothing, and waited for ever on a loader worker at exit.)"""
    folder, config = new_run(work, "ctrl_c_last_step", **{"trainer.max_steps": 20})  # mid-epoch: workers at work
    stopped = pretrain(folder, "--config", config, *fault("InterruptAtTheLastStepsEnd"), terminal=True)
    last = folder / "run/checkpoints/last.ckpt"
    kept = last_state(folder)[0] if last.is_file() else None
    said = f"interrupted after the last step (20), saved in {last}" in " ".join(stopped.stderr.split())
    again = pretrain_in_this_process(folder, "--config", config)
    done = (folder / "run/summary.json").is_file() and "doing them now" in again.stderr
    ok = stopped.returncode == 128 + signal.SIGINT and kept == 20 and said and again.returncode == 0 and done
    return Outcome(
        "save step 20 and name it, exit 130; the same command does the end",
        f"rc {stopped.returncode}, kept step {kept}, said={said}; then rc {again.returncode}, end done={done}",
        ok,
        "none" if kept == 20 else "yes",
    )


def case_sigterm_after_the_last_step(work: Path) -> Outcome:
    """A scheduler's SIGTERM during the end-of-run work: it stops there (the kill that follows
    would cut it short anyway), with the last step kept and exit 143, and the same command again
    does only the evaluation, export and summary. (It went on to its end, ignoring the SIGTERM.)"""
    end_of_run_knn = {"class_path": "ssl_vit.eval.EvaluationCallback", "init_args": {"probes": False}}
    folder, config = new_run(work, "sigterm_at_end", **{"trainer.callbacks": [end_of_run_knn]})
    stopped = pretrain(folder, "--config", config, *fault("InterruptAtEnd", signal="SIGTERM"))
    kept, _ = last_state(folder)
    summary_path = folder / "run/summary.json"
    stopped_there = not summary_path.exists() and "after the last step" in stopped.stderr
    again = pretrain_in_this_process(folder, "--config", config)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    done = summary.get("steps") == kept and (folder / "run/export/model.safetensors").is_file()
    ok = stopped.returncode == 128 + signal.SIGTERM and stopped_there and kept == EPOCHS * STEPS_PER_EPOCH
    return Outcome(
        f"stop at once, exit 143, keep step {EPOCHS * STEPS_PER_EPOCH}; the same command does the end",
        f"rc {stopped.returncode}, stopped before the summary: {stopped_there}, kept step {kept}; then rc "
        f"{again.returncode}, summary of step {summary.get('steps')}",
        ok and again.returncode == 0 and done,
        "none" if kept == EPOCHS * STEPS_PER_EPOCH and checkpoints_intact(folder) else "yes",
    )


def case_sigterm_at_the_start_of_a_resume(work: Path) -> Outcome:
    """A scheduler's SIGTERM while a resumed run evaluates before its first step: it stops at once,
    exit 143, with its checkpoint as it was, and the same command resumes to the end. (The SIGTERM
    was lost: the run trained to its end and exited 0, so the job did what its scheduler had
    stopped.)"""
    knn = {"class_path": "ssl_vit.eval.EvaluationCallback", "init_args": {"probes": False}}
    folder, config = new_run(work, "sigterm_at_start", **{"trainer.callbacks": [knn]})
    first = pretrain(folder, "--config", config, *fault("KillAt", step=3, signal="SIGTERM"))
    last = folder / "run/checkpoints/last.ckpt"
    before = last.read_bytes()
    stopped = pretrain(folder, "--config", config, *fault("TermBeforeTheFirstStep"), terminal=True)
    kept = last.read_bytes() == before
    said = f"before the first step: nothing new to save; the same command will resume from {last}"
    said = said in stopped.stderr
    again = pretrain_in_this_process(folder, "--config", config)
    step, _ = last_state(folder)
    ref_step, _ = uninterrupted(work)
    ok = first.returncode == stopped.returncode == 128 + signal.SIGTERM and kept and said
    return Outcome(
        f"exit 143 before training, said so, step 3 kept as it was; the same command resumes to step {ref_step}",
        f"rc {first.returncode} then {stopped.returncode}, said={said}, checkpoint as it was={kept}; resumed rc "
        f"{again.returncode} to step {step}",
        ok and again.returncode == 0 and step == ref_step,
        "none" if kept and checkpoints_intact(folder) else "yes",
    )


def case_truncated_checkpoint(work: Path) -> Outcome:
    """The newest checkpoint is cut short (a full disk, a half copy): the run falls back to the one before."""
    folder, config = new_run(work, "truncated", **{"trainer.max_epochs": 2})
    first = pretrain_in_this_process(folder, "--config", config)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt_dir = folder / "run/checkpoints"
    last = (ckpt_dir / "last.ckpt").read_bytes()
    (ckpt_dir / "last.ckpt").write_bytes(last[: len(last) // 2])
    again = pretrain_in_this_process(folder, "--config", str(recipe(folder, work / "shards")))
    step, _ = last_state(folder)
    warned = "skipping checkpoint" in again.stderr and "last.ckpt" in again.stderr
    resumed_from = next((line for line in again.stderr.splitlines() if "resuming from" in line), "")
    ok = again.returncode == 0 and warned and "epoch=0001" in resumed_from and step == EPOCHS * STEPS_PER_EPOCH
    return Outcome(
        "skip it with a warning, resume from the previous one",
        f"warned={warned}, {resumed_from.strip() or 'did not resume'}, ended at step {step}",
        ok,
        "none" if "epoch=0001" in resumed_from else "yes",
    )


def case_broken_data(work: Path) -> Outcome:
    """A shard of corrupt, truncated, odd-mode images, an empty file, a pickle member and a cut tail."""
    folder = work / "broken_data"
    shards = folder / "shards"
    shards.mkdir(parents=True)
    marker = folder / "unpickled"
    write_broken_shard(shards / "broken.tar", marker)
    overrides = {"data.samples_per_epoch": 16, "data.batch_size": 4, "data.shuffle_buffer": 0}
    config = recipe(folder, shards / "broken.tar", **overrides, **{"data.max_skip_fraction": 0.5})
    result = pretrain_in_this_process(folder, "--config", str(config), "--trainer.max_epochs=1")
    summary = next((line for line in result.stderr.splitlines() if "epoch 0: read" in line), "")
    # 16 kept samples = 2 whole passes over the shard's 8 readable ones (the last ends only where the
    # cut tail begins); its unreadable ones are counted in the first, the 8 taken again apart.
    expected = "read 11 samples, 5 of them skipped; read 8 of them again"
    ok = result.returncode == 0 and expected in summary and not marker.exists()
    return Outcome(
        f"run to the end, {expected}, pickle never loaded",
        f"rc {result.returncode}; {summary.split('epoch 0: ')[-1] or 'no summary'}; unpickled={marker.exists()}",
        ok,
        "none" if result.returncode == 0 else "yes",
    )


def case_mostly_broken_data(work: Path) -> Outcome:
    folder = work / "mostly_broken"
    shards = folder / "shards"
    shards.mkdir(parents=True)
    write_broken_shard(shards / "broken.tar", folder / "unpickled")
    config = recipe(folder, shards / "broken.tar", **{"data.samples_per_epoch": 64, "data.batch_size": 4})
    result = pretrain_in_this_process(folder, "--config", str(config))
    ok = result.returncode == 2 and "data.max_skip_fraction" in result.stderr and "Traceback" not in result.stderr
    return Outcome(
        "stop with one message naming data.max_skip_fraction",
        f"rc {result.returncode}: {last_line(result.stderr)[:90]}",
        ok,
        "none" if not list(folder.rglob("*.tmp")) else "yes",
    )


def case_nan_loss(work: Path) -> Outcome:
    """NaN at step 5: the guard cannot tell bad data from parameters broken by step 4's update
    (a too high lr looks the same), so the state it keeps is the one from before that update."""
    folder, config = new_run(work, "nan")
    result = pretrain_in_this_process(folder, "--config", config, *fault("NaNInputAt", step=5))
    saved = folder / "run/checkpoints/last-good-step=00000004.ckpt"
    message = last_line(result.stderr)
    ckpt = torch.load(saved, weights_only=True) if saved.exists() else {}
    good = ckpt.get("global_step") == 4 and all_finite(ckpt["state_dict"])
    ok = result.returncode == 2 and "non-finite loss at step 5 of MAE" in message and good
    return Outcome(
        "stop naming step 5 and MAE; the state of step 4 saved",
        f"rc {result.returncode}: {message[:90]}",
        ok,
        "none" if good else "yes",
    )


def case_nan_skipped(work: Path) -> Outcome:
    folder, config = new_run(work, "nan_skip")
    result = pretrain_in_this_process(
        folder, "--config", config, "--nonfinite.action=skip", *fault("NaNInputAt", step=5)
    )
    step, params = last_state(folder) if result.returncode == 0 else (0, {})
    finite = all_finite(params)
    warned = "non-finite loss at step 5 of MAE: step skipped" in result.stderr
    ok = result.returncode == 0 and warned and finite and step == EPOCHS * STEPS_PER_EPOCH
    return Outcome(
        "warn, skip step 5, finish with finite parameters",
        f"rc {result.returncode}, warned={warned}, step {step}, finite={finite}",
        ok,
        "none" if finite else "yes",
    )


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def bad_config(name: str, expected: str, make_args: Callable[[Path, Path], list[str]]) -> Callable[[Path], Outcome]:
    """A recipe mistake: exit 2 with one error line (after Lightning's device lines, for mistakes
    found once the trainer exists), no traceback, and nothing written."""

    def case(work: Path) -> Outcome:
        folder = work / f"config_{name}"
        folder.mkdir()
        result = pretrain_in_this_process(folder, *make_args(folder, work))
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        message = errors[0] if errors else last_line(result.stderr)
        wrote = [p for p in (folder / "run").rglob("*") if p.is_file()] if (folder / "run").exists() else []
        ok = result.returncode == 2 and len(errors) == 1 and expected in message and not wrote
        ok = ok and "Traceback" not in result.stderr
        return Outcome(f"one line: ...{expected}...", f"rc {result.returncode}: {message[:90]}", ok, "none")

    case.__name__ = f"case_config_{name}"
    return case


def _tiny(folder: Path, work: Path, **overrides) -> list[str]:
    return ["--config", str(recipe(folder, work / "shards", **overrides))]


DINO = str(ROOT / "recipes/quickstart/dino.yaml")
MOCOV3 = str(ROOT / "recipes/quickstart/mocov3.yaml")
CONFIG_CASES = [
    bad_config(
        "unknown_key", "unknown recipe key 'data.batch_sise'", lambda f, w: [*_tiny(f, w), "--data.batch_sise=3"]
    ),
    bad_config(
        "unknown_model_key",
        "unknown recipe key 'model.init_args.mask_ration' of MAE; did you mean 'model.init_args.mask_ratio'?",
        lambda f, w: [*_tiny(f, w), "--model.init_args.mask_ration=0.5"],
    ),
    bad_config(
        "unknown_encoder_key",
        "unknown recipe key 'model.init_args.encoder.detph' of MAE; did you mean 'model.init_args.encoder.depth'?",
        lambda f, w: [*_tiny(f, w), "--model.init_args.encoder.detph=3"],
    ),
    bad_config("wrong_type", "data.batch_size", lambda f, w: [*_tiny(f, w), "--data.batch_size=many"]),
    bad_config(
        "patch_vs_image",
        "patch_size 4x4 does not divide img_size 30x30",
        lambda f, w: _tiny(f, w, **{"model.init_args.encoder.img_size": 30}),
    ),
    bad_config(
        "mask_ratio", "mask_ratio must be in (0, 1)", lambda f, w: [*_tiny(f, w), "--model.init_args.mask_ratio=1.5"]
    ),
    bad_config(
        "local_crop_vs_patch",
        "12-px crops, which the encoder's 8-px patches do not divide",
        lambda f, w: ["--config", DINO, "--data.view.init_args.local_size=12", f"--data.train_shards={w / 'shards'}"],
    ),
    bad_config(
        "batch_of_one_with_batchnorm",
        "heads use BatchNorm, which needs at least 2",
        lambda f, w: ["--config", MOCOV3, "--data.batch_size=1", f"--data.train_shards={w / 'shards'}"],
    ),
    bad_config(
        "fewer_shards_than_devices",
        "1 shards cannot feed 2 devices",
        lambda f, w: [
            *_tiny(f, w, **{"data.train_shards": str(w / "shards/shard-000000.tar")}),
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
        ],
    ),
    bad_config(
        "missing_data",
        "nowhere does not exist: give a folder of images",
        lambda f, w: _tiny(f, w, **{"data.train_shards": str(f / "nowhere")}),
    ),
    bad_config(
        "bf16_on_cpu",
        "trainer.precision bf16-mixed asks for half precision, but this run is on a CPU",
        lambda f, w: [*_tiny(f, w), "--trainer.precision=bf16-mixed"],
    ),
    bad_config(
        "unlabelled_eval",
        "has no class labels",
        lambda f, w: _tiny(
            f,
            w,
            **{
                "trainer.callbacks": [
                    {
                        "class_path": "ssl_vit.eval.EvaluationCallback",
                        "init_args": {"train_shards": str(w / "unlabelled"), "val_shards": str(w / "unlabelled")},
                    }
                ]
            },
        ),
    ),
    bad_config(
        "abbreviated_key",
        "unknown recipe key 'trainer.max_epoch'",
        lambda f, w: [*_tiny(f, w), "--trainer.max_epoch=2"],
    ),
    bad_config(
        "negative_epochs",
        "`max_epochs` must be a non-negative integer",
        lambda f, w: [*_tiny(f, w), "--trainer.max_epochs=-5"],
    ),
    bad_config("negative_workers", "data.num_workers is -1", lambda f, w: [*_tiny(f, w), "--data.num_workers=-1"]),
    bad_config(
        "negative_lr", "a learning rate cannot be negative", lambda f, w: [*_tiny(f, w), "--model.init_args.base_lr=-1"]
    ),
    bad_config(
        "checkpoints_in_export_folder",
        "is the folder the run exports to at the end",
        lambda f, w: _tiny(f, w, **{"checkpoint.dirpath": str(f / "run/export")}),
    ),
]


def copy_of_uninterrupted(work: Path, name: str) -> tuple[Path, str, dict[Path, bytes]]:
    """A copy of the finished uninterrupted run in ``work/name`` (its recipe pointing at the copy),
    and the bytes of every file in it, to tell afterwards whether anything was lost."""
    uninterrupted(work)
    folder = work / name
    shutil.copytree(work / "uninterrupted", folder)
    config = str(recipe(folder, work / "shards"))
    return folder, config, {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def untouched(files: dict[Path, bytes]) -> bool:
    return all(path.is_file() and path.read_bytes() == data for path, data in files.items())


def case_fresh_start_in_a_used_run_folder(work: Path) -> Outcome:
    """--auto_resume false where a run's checkpoints are: writing last-v1.ckpt beside them and
    exporting the old last.ckpt is what Lightning alone would do; ssl-vit refuses in one line."""
    folder, config, files = copy_of_uninterrupted(work, "used_folder")
    result = pretrain_in_this_process(folder, "--config", config, "--auto_resume=false")
    message = last_line(result.stderr)
    ok = result.returncode == 2 and "--auto_resume false would write over" in message and untouched(files)
    return Outcome(
        "refuse in one line naming a new run folder; every file as it was",
        f"rc {result.returncode}: {message[:90]}",
        ok and "Traceback" not in result.stderr,
        "none" if untouched(files) else "yes",
    )


def case_finished_run_started_again(work: Path) -> Outcome:
    """The same command again once the run has finished: there is nothing to train, and Lightning
    alone would write a summary of 0 seconds and no loss, records and a log folder of that empty
    run. It says the run is finished, shows the summary it finished with and writes nothing."""
    folder, config, files = copy_of_uninterrupted(work, "finished")
    result = pretrain_in_this_process(folder, "--config", config)
    said = "is finished" in result.stderr and "nothing was trained" in result.stderr
    # the limit that stopped it, and not a resume it does not do
    said = said and f"(e.g. --trainer.max_epochs {2 * EPOCHS})" in result.stderr and "resuming" not in result.stderr
    # the summary it shows lists its export and pictures where they are, not where the run was (a copy here)
    said = said and "export" in result.stdout and "uninterrupted" not in result.stdout
    new = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p not in files)
    ok = result.returncode == 0 and said and untouched(files) and not new
    return Outcome(
        "say it is finished, exit 0; every file as it was, none added",
        f"rc {result.returncode}, said={said}, untouched={untouched(files)}, new files {new[:3]}",
        ok,
        "none" if untouched(files) else "yes",
    )


def case_run_copied_without_file_times(work: Path) -> Outcome:
    """A finished run copied with `cp -r`, which gives the files new times in any order: the same
    command says it is finished, and `ssl-vit export` exports its last step. (The first epoch's
    checkpoint came out newest: the run trained from step 8 again, and knn, export and finetune
    took step 8's weights.)"""
    folder, config, files = copy_of_uninterrupted(work, "copied")
    first = next((folder / "run/checkpoints").glob("*step=8*.ckpt"))
    os.utime(first, (first.stat().st_atime, first.stat().st_mtime + 3600))  # written last by the copy
    result = pretrain_in_this_process(folder, "--config", config)
    exported = in_this_process(folder, "export", "run", "out")
    card = (folder / "out/README.md").read_text() if exported.returncode == 0 else ""
    finished = result.returncode == 0 and "is finished" in result.stderr and "resuming" not in result.stderr
    last_step = f"optimiser steps: {EPOCHS * STEPS_PER_EPOCH}\n" in card
    return Outcome(
        f"say it is finished; export step {EPOCHS * STEPS_PER_EPOCH}",
        f"rc {result.returncode}, finished={finished}; export of the last step={last_step}",
        finished and last_step and untouched(files),
        "none" if untouched(files) else "yes",
    )


def case_finished_run_started_again_with_other_settings(work: Path) -> Outcome:
    """A finished run started again with another lr (a sweep in one run folder): showing the
    summary it finished with would pass its numbers off as the new lr's. It refuses in one line
    naming the changed setting and a new run folder, and writes nothing."""
    folder, config, files = copy_of_uninterrupted(work, "finished_other_lr")
    result = pretrain_in_this_process(folder, "--config", config, "--model.init_args.base_lr=0.002")
    message = last_line(result.stderr)
    said = "is finished" in message and "model.base_lr 0.001 -> 0.002" in message and "runs/NEW" in message
    new = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p not in files)
    ok = result.returncode == 2 and said and untouched(files) and not new and "Traceback" not in result.stderr
    return Outcome(
        "refuse in one line naming the changed setting; every file as it was, none added",
        f"rc {result.returncode}: {message[:90]}",
        ok,
        "none" if untouched(files) else "yes",
    )


def case_moved_run_folder_with_brackets(work: Path) -> Outcome:
    """A finished run's folder moved to a path with glob characters ('exp[1]'), then trained one
    epoch longer with gradient clipping: it resumes its own last checkpoint (the path is not a
    pattern), naming both changes (a trainer setting other than the limits went unsaid)."""
    folder, _, _ = copy_of_uninterrupted(work, "exp[1]")
    config = str(recipe(folder, work / "shards", **{"trainer.max_epochs": EPOCHS + 1}))
    result = pretrain_in_this_process(folder, "--config", config, "--trainer.gradient_clip_val=0.25")
    step, _ = last_state(folder)
    resumed = "resuming from" in result.stderr
    # the run's length changed, which its schedules follow, and its clipping: said, and kept in its summary
    said = f"with settings changed since: trainer.max_epochs {EPOCHS} -> {EPOCHS + 1}" in result.stderr
    said = said and "; trainer.gradient_clip_val None -> 0.25" in result.stderr
    summary = json.loads((folder / "run/summary.json").read_text())
    said = said and any(f"trainer.max_epochs {EPOCHS} -> {EPOCHS + 1}" in c for c in summary["settings_changed"] or [])
    ok = result.returncode == 0 and resumed and said and step == (EPOCHS + 1) * STEPS_PER_EPOCH
    return Outcome(
        f"resume saying the longer limit, end at step {(EPOCHS + 1) * STEPS_PER_EPOCH}",
        f"rc {result.returncode}, resumed={resumed}, said={said}, step {step}",
        ok,
        "none" if checkpoints_intact(folder) else "yes",
    )


def case_another_runs_checkpoints(work: Path) -> Outcome:
    """A new run folder (--trainer.default_root_dir) with a recipe whose checkpoint.dirpath points at
    another run's checkpoints, or given another run's checkpoint by --ckpt_path: never restored,
    one line, nothing written. (With --ckpt_path, the new run reported the other run's baseline
    and wrote an export of its weights recording training on its own data.)"""
    folder, config, files = copy_of_uninterrupted(work, "another_run")
    result = pretrain_in_this_process(folder, "--config", config, f"--trainer.default_root_dir={folder / 'new-run'}")
    message = last_line(result.stderr)
    ok = result.returncode == 2 and "not this run's to resume" in message and "Restored" not in result.stderr
    ok = ok and untouched(files) and not (folder / "new-run").exists()
    new_run = [f"--trainer.default_root_dir={folder / 'new-run2'}", f"--checkpoint.dirpath={folder / 'new-run2/ckpts'}"]
    given = pretrain_in_this_process(
        folder, "--config", config, *new_run, f"--ckpt_path={folder / 'run/checkpoints/last.ckpt'}"
    )
    given_message = last_line(given.stderr)
    ok = ok and given.returncode == 2 and "cannot be resumed by this run: it was written by the run in" in given_message
    ok = ok and "Restored" not in given.stderr and untouched(files) and not (folder / "new-run2").exists()
    return Outcome(
        "refuse in one line, restore nothing, for its checkpoint folder and for --ckpt_path",
        f"rc {result.returncode}: {message[:90]}; --ckpt_path: rc {given.returncode}: {given_message[:90]}",
        ok,
        "none" if untouched(files) else "yes",
    )


def case_checkpoint_with_a_hole(work: Path) -> Outcome:
    """The newest checkpoint has a zeroed hole (its archive index intact), and a checkpoint writer
    killed mid-save left its temporary file: the hole fails its SHA-256 and the run falls back to
    the checkpoint before; the dead writer's file is removed."""
    folder, config, _ = copy_of_uninterrupted(work, "hole")
    ckpt_dir = folder / "run/checkpoints"
    last = bytearray((ckpt_dir / "last.ckpt").read_bytes())
    middle = len(last) // 2
    last[middle : middle + 4096] = bytes(4096)
    (ckpt_dir / "last.ckpt").write_bytes(bytes(last))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = ckpt_dir / f".last.ckpt.{socket.gethostname().replace('.', '_')}-{int(dead.stdout)}.tmp"
    leftover.write_bytes(b"half a checkpoint")
    result = pretrain_in_this_process(folder, "--config", config)
    # the checkpoint before is the last epoch's: the run is finished by it, and says so
    resumed_from = next((line for line in result.stderr.splitlines() if "is finished (" in line), "")
    warned = "skipping checkpoint" in result.stderr and "does not match" in result.stderr
    by_the_one_before = f"(epoch={EPOCHS - 1:04d}-step={EPOCHS * STEPS_PER_EPOCH}.ckpt: epoch {EPOCHS} of "
    fell_back = by_the_one_before in resumed_from
    ok = result.returncode == 0 and warned and fell_back and not leftover.exists()
    return Outcome(
        "skip it (SHA-256), fall back on the one before; dead writer's file removed",
        f"rc {result.returncode}, warned={warned}, {resumed_from.strip()[:90] or 'did not fall back'}, "
        f"leftover removed={not leftover.exists()}",
        ok,
        "none" if fell_back else "yes",
    )


KILLED_AFTER_STEP = STEPS_PER_EPOCH + 3  # 3 batches into epoch 1: odd, so the 2 loader workers swap roles


def case_kill_mid_epoch(work: Path) -> Outcome:
    """SIGKILL right after a mid-epoch checkpoint (3 of epoch 1's 8 batches, 2 loader workers):
    the resumed run continues that epoch's data where it stopped and ends bit-identical to an
    uninterrupted run of the same recipe. (A checkpoint every step, so that both runs' last.ckpt
    holds the final step: Lightning saves none at the end of a run that saved one before.)"""
    overrides = {
        "trainer.max_epochs": 2,
        "data.num_workers": 2,
        "checkpoint.every_n_epochs": None,
        "checkpoint.every_n_train_steps": 1,
    }
    ref_folder, ref_config = new_run(work, "mid_epoch_uninterrupted", **overrides)
    reference = pretrain_in_this_process(ref_folder, "--config", ref_config)
    assert reference.returncode == 0, reference.stderr[-3000:]
    folder, config = new_run(work, "kill_mid_epoch", **overrides)
    killed = pretrain(folder, "--config", config, *fault("KillAt", step=KILLED_AFTER_STEP + 1))
    saved_step, _ = last_state(folder)
    again = pretrain_in_this_process(folder, "--config", config)
    step, params = last_state(folder)
    ref_step, ref_params = last_state(ref_folder)
    diff = max_difference(params, ref_params)
    resumed = saved_step == KILLED_AFTER_STEP and "resuming from" in again.stderr
    ok = killed.returncode == -signal.SIGKILL and again.returncode == 0 and resumed and step == ref_step
    return Outcome(
        f"resume at step {KILLED_AFTER_STEP}, mid-epoch; parameters bit-identical to uninterrupted",
        f"killed (rc {killed.returncode}) after step {saved_step}'s checkpoint; resumed={resumed}, "
        f"step {step}, max |param diff| {diff:.1e}",
        ok and diff == 0,
        "none" if checkpoints_intact(folder) and resumed else "yes",
    )


def case_overwrite_current_or_checkpoint_folder(work: Path) -> Outcome:
    """`ssl-vit export CKPT . --overwrite` and `ssl-vit export CKPT <its checkpoint folder>
    --overwrite`, which used to empty the folder: each refused in one line, every file as it was."""
    uninterrupted(work)
    folder = work / "overwrite"
    (folder / "run/checkpoints").mkdir(parents=True)
    (folder / "run/checkpoints/last.ckpt").write_bytes((work / "uninterrupted/run/checkpoints/last.ckpt").read_bytes())
    (folder / "notes.txt").write_text("the user's own file")
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    refused, observed = True, []
    for out in (".", "run/checkpoints"):
        result = in_this_process(folder, "export", "run/checkpoints/last.ckpt", out, "--overwrite")
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        refused = refused and result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
        message = (errors or [last_line(result.stderr)])[0].split("error: ", 1)[-1]
        observed.append(f"{out}: rc {result.returncode}, {message[:60]}")
    kept = all(path.is_file() and path.read_bytes() == data for path, data in files.items())
    return Outcome(
        "refuse each in one line; every file as it was",
        " | ".join(observed),
        refused and kept,
        "none" if kept else "yes",
    )


def parameter_rms(state: dict[str, torch.Tensor]) -> float:
    """Root mean square of a state dict's floating-point entries (about 0.3 for the tiny MAE,
    whose LayerNorm weights are ones, trained or not)."""
    floats = [v.float().flatten() for v in state.values() if v.is_floating_point()]
    return torch.cat(floats).square().mean().sqrt().item() if floats else math.inf


def case_lr_blowup_recovered(work: Path) -> Outcome:
    """base_lr 1e6: the first update blows the parameters up, the next loss jumps 1e20-fold (its
    gradients are NaN). The run stops and keeps the state from before that update; the same
    command with base_lr 1e-3 resumes from it and finishes with parameters of normal size."""
    folder, config = new_run(work, "lr_blowup")
    blown = pretrain_in_this_process(folder, "--config", config, "--model.init_args.base_lr=1e6")
    message = last_line(blown.stderr)
    saved = list((folder / "run/checkpoints").glob("last-good-step=*.ckpt"))
    saved_state = torch.load(saved[0], weights_only=True)["state_dict"] if len(saved) == 1 else {}
    resumed = pretrain_in_this_process(folder, "--config", config, "--model.init_args.base_lr=1e-3")
    from_saved = len(saved) == 1 and f"resuming from {saved[0]}" in resumed.stderr
    from_saved = from_saved and "with settings changed since: model.base_lr 1000000.0 -> 0.001 (" in resumed.stderr
    summary = folder / "run/summary.json"  # says so too: the run's first steps had another lr
    changes = json.loads(summary.read_text()).get("settings_changed") if summary.is_file() else None
    changed = f"at step {int(saved[0].stem.split('=')[-1])}: model.base_lr 1000000.0 -> 0.001" if saved else ""
    card = folder / "run/export/README.md"  # and the model card
    from_saved = from_saved and changes == [changed]
    from_saved = from_saved and card.is_file() and f"- settings changed by a resume {changed}" in card.read_text()
    step, params = last_state(folder) if resumed.returncode == 0 else (0, {})
    ref_step, reference = uninterrupted(work)
    normal = parameter_rms(reference)
    saved_rms, final_rms = parameter_rms(saved_state), parameter_rms(params)
    kept = saved_rms < 2 * normal and all_finite(saved_state)
    ok = blown.returncode == 2 and "abnormal loss at step 1 of MAE" in message and kept and from_saved
    ok = ok and step == ref_step and all_finite(params) and final_rms < 2 * normal
    return Outcome(
        f"stop at the jump, keep parameters of normal size (rms {normal:.2f}); resume with base_lr 1e-3 to the end",
        f"rc {blown.returncode}: {message.split('error: ', 1)[-1][:40]}...; "
        f"saved {saved[0].name if saved else 'nothing'}, rms {saved_rms:.2g}; "
        f"resumed={from_saved}, rc {resumed.returncode}, step {step}, rms {final_rms:.2g}",
        ok,
        "none" if kept else "yes",
    )


def case_collapsed_run_fails(work: Path) -> Outcome:
    """A run whose outputs stay collapsed from step 2 of 24: it finishes, exports and writes its
    summary, then says it failed and exits 3; --allow_collapse true exits 0."""
    folder, config = new_run(work, "collapsed", **{"trainer.max_epochs": 1})
    failed = pretrain_in_this_process(folder, "--config", config, *fault("CollapsedFrom", step=2))
    summary = json.loads((folder / "run/summary.json").read_text()) if (folder / "run/summary.json").exists() else {}
    said = "run failed" in last_line(failed.stderr) and "collapsed" in str(summary.get("failed"))
    # the weights say so wherever they go: the run's export, and one written later (they read as a good run's)
    later = export_encoder(folder / "run/checkpoints/last.ckpt", folder / "later-export")
    cards = [(export / "README.md").read_text() for export in (folder / "run/export", later)]
    said = said and all(f"- **the run failed**: {summary['failed']}" in card for card in cards)
    # The same finished run again: exit 3 again, its last line saying it failed; told to keep going, exit 0.
    again = pretrain_in_this_process(folder, "--config", config)
    said_again = "and failed: its summary's 'failed' row says why" in last_line(again.stderr)
    kept_going = pretrain_in_this_process(folder, "--config", config, "--allow_collapse=true")
    ok = failed.returncode == 3 and said and (folder / "run/export/model.safetensors").is_file()
    ok = ok and again.returncode == 3 and said_again and kept_going.returncode == 0
    return Outcome(
        "finish, export (its card saying it failed), summary 'failed', exit 3, again 3 saying so; exit 0 with "
        "--allow_collapse true",
        f"rc {failed.returncode}, said={said}, again rc {again.returncode} said={said_again}, "
        f"then rc {kept_going.returncode}",
        ok,
        "none",
    )


CASES: list[Callable[[Path], Outcome]] = [
    case_sigkill,
    case_sigkill_before_the_first_checkpoint,
    case_resume_after_init_from_removed,
    case_project_moved,
    case_kill_mid_epoch,
    case_sigterm,
    case_ctrl_c,
    case_ctrl_c_after_the_last_step,
    case_ctrl_c_as_the_last_step_ends,
    case_sigterm_after_the_last_step,
    case_sigterm_at_the_start_of_a_resume,
    case_truncated_checkpoint,
    case_checkpoint_with_a_hole,
    case_fresh_start_in_a_used_run_folder,
    case_finished_run_started_again,
    case_finished_run_started_again_with_other_settings,
    case_run_copied_without_file_times,
    case_moved_run_folder_with_brackets,
    case_another_runs_checkpoints,
    case_broken_data,
    case_mostly_broken_data,
    case_nan_loss,
    case_nan_skipped,
    case_lr_blowup_recovered,
    case_collapsed_run_fails,
    case_overwrite_current_or_checkpoint_folder,
    *CONFIG_CASES,
]


def prepare(work: Path) -> None:
    """The shared inputs: labelled and unlabelled tiny shards."""
    if not (work / "shards").exists():
        write_tiny_shards(work / "shards")
        write_tiny_shards(work / "unlabelled", labelled=False)


def main() -> None:
    import tempfile

    from rich.console import Console
    from rich.table import Table

    table = Table("case", "expected", "observed", "ok", "data lost", title="ssl-vit fault injection")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        for case in CASES:
            outcome = case(work)
            failed += not outcome.ok
            name = case.__name__.removeprefix("case_")
            table.add_row(name, outcome.expected, outcome.observed, "yes" if outcome.ok else "NO", outcome.data_lost)
    Console(width=200).print(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
