"""The ``ssl-vit`` command.

    ssl-vit pretrain --config recipes/quickstart/mae.yaml [--trainer.max_steps 624 ...] [--ckpt_path last]
    ssl-vit finetune --config recipes/quickstart/finetune.yaml [--model.init_args.pretrained false ...]
    ssl-vit distill --config recipes/quickstart/distill.yaml [--model.init_args.student '{name: resnet18}' ...]
    ssl-vit knn CHECKPOINT --train_shards TRAIN [--val_shards VAL] [--pooling cls|mean|cls+mean ...]
    ssl-vit probe CHECKPOINT --train_shards TRAIN [--val_shards VAL] [--head linear|attentive|linear+attentive ...]
    ssl-vit segprobe CHECKPOINT --train_shards TRAIN [--val_shards VAL] [--seg_epochs 20 ...]
    ssl-vit export CHECKPOINT OUT [--format timm|state_dict|open_clip] [--role ROLE] [--overwrite] [--onnx [--int8]]
    ssl-vit zeroshot CLIP_CHECKPOINT_OR_OPEN_CLIP_FOLDER --val_shards VAL [--image_size N ...]
    ssl-vit shards embedded OUT_DIR
    ssl-vit shards imagefolder SRC_DIR OUT_DIR [--samples-per-shard N] [--masks MASK_DIR]
    ssl-vit shards captions TABLE.csv|.tsv OUT_DIR [--image-key filepath] [--caption-key title]
    ssl-vit recipes

``pretrain`` is Lightning's CLI (``fit``): every field of a recipe can be overridden on the command
line. Running the same command again resumes from the run's newest complete checkpoint (after a
crash, a kill or a pre-emption); ``--ckpt_path PATH`` resumes from another, ``--auto_resume false``
starts afresh.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import itertools
import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import jsonargparse
import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ssl_vit.checkpoint import (
    AtomicCheckpointIO,
    RunCheckpoint,
    checkpoint_problem,
    checkpoints_in,
    lock_run_folder,
    newest_complete_checkpoint,
    objective_name,
    read_checkpoint,
    release_run_folders,
    remove_dead_writers_files,
    resume_mismatch,
    run_checkpoint,
)
from ssl_vit.data.embedded import DATASETS
from ssl_vit.data.pipeline import ShardDataModule, decodable_samples, evaluation_split
from ssl_vit.data.shards import (
    caption_table_samples,
    image_folder_samples,
    shard_size,
    split_part,
    write_embedded_shards,
    write_shards,
)
from ssl_vit.data.views import EvalView
from ssl_vit.encoder import compile_blocks
from ssl_vit.errors import UserError, counted
from ssl_vit.eval import EvaluationCallback, Evaluator
from ssl_vit.eval.compare import print_comparison
from ssl_vit.eval.encoders import load_evaluated_encoder, standalone_record_stem
from ssl_vit.eval.image_text import evaluate_image_text
from ssl_vit.eval.report import (
    COMMON_SETTINGS,
    PROTOCOL_SETTINGS,
    accuracy_counts,
    print_results,
    settings_tag,
    write_json,
    write_records,
)
from ssl_vit.export import export_encoder
from ssl_vit.finetune import FineTune, LabelledShardDataModule, export_classifier
from ssl_vit.guards import NonFiniteGuard
from ssl_vit.health import HealthCallback
from ssl_vit.methods.base import SSLMethod
from ssl_vit.methods.distill import Distill, export_student, side_by_side
from ssl_vit.onnx_export import ONNX_FILES, OnnxOptions
from ssl_vit.pictures import PicturesCallback, shard_class_names
from ssl_vit.progress import ImagesPerSecondBar, ModuleTable, print_run_summary, run_summary

COMMANDS = {
    "pretrain": "pretrain an encoder from a YAML recipe (Lightning CLI: --config, overrides, --ckpt_path)",
    "finetune": "fine-tune an encoder end to end on labelled shards (MAE's recipe; writes a timm classifier folder)",
    "distill": "distil a frozen encoder into any timm model (a CNN too) and compare the two: size, speed, accuracy",
    "knn": "k-NN accuracy of a frozen encoder (checkpoint, export, timm model) on labelled shards (DINO's protocol)",
    "probe": "linear (MAE's protocol) or attentive (V-JEPA's) probe accuracy of a frozen encoder (checkpoint, export, "
    "timm model)",
    "segprobe": "dense linear-probe mIoU of a frozen encoder's patch tokens on shards with label maps (DINOv2's)",
    "export": "write a checkpoint's encoder as a timm model folder (config.json + model.safetensors), or a whole "
    "CLIP as an open_clip folder",
    "zeroshot": "zero-shot accuracy and image-text retrieval recall of a CLIP checkpoint or open_clip folder on shards",
    "shards": "write WebDataset tar shards from an ImageFolder tree, a CSV/TSV of images and captions, or the "
    "embedded dataset",
    "recipes": "list the shipped recipes, one line each",
}


class RunCLI(LightningCLI):
    """What every ssl-vit training command shares: atomic checkpoints (each periodic one kept,
    plus ``last.ckpt``), auto-resume from the newest complete one, the non-finite-loss guard, the
    progress bar, bf16 on GPUs, and errors that say what to fix."""

    #: The ``ssl-vit`` command that runs it.
    command: ClassVar[str]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # Keep every periodic checkpoint (there is no metric to rank them by) plus last.ckpt, which a
        # run replaces atomically: its folder holds only its own run's checkpoints (see
        # checkpoint_to_resume), so no "last-v1.ckpt" beside another run's "last.ckpt".
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "{epoch:04d}-{step}",
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(ImagesPerSecondBar, "progress_bar")
        parser.add_argument(
            "--export",
            type=bool,
            default=True,
            help="at the end, export the trained model as a timm folder in <default_root_dir>/export",
        )
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="without --ckpt_path, continue from the run's newest complete checkpoint (false: refuse to start "
            "in a run folder that holds checkpoints)",
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning would put a --ckpt_path checkpoint's hyperparameters back over the recipe and
        # the command line (so "resume with a lower base_lr" would resume with the old one), and
        # unpickle it to do so; here the command line defines the run, and before_fit checks the
        # checkpoint against it (objective, encoder) before Lightning restores it.
        pass

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = self.config_init[self.subcommand]["trainer"]
        precision = default_precision(trainer.get("accelerator", "auto"), trainer.get("precision"))
        root = trainer.get("default_root_dir")
        if root is None:  # Lightning's default, the current folder, mixes runs
            kwargs["default_root_dir"] = default_run_folder(self.datamodule.train_shards, self.run_name())
        elif "{data}" in root:  # a second stage's folder beside its first stage's (runs/{data}/dinov3_high_res)
            kwargs["default_root_dir"] = root.replace("{data}", data_name(self.datamodule.train_shards))
        trainer = super().instantiate_trainer(**kwargs, precision=precision)
        # before DDP launches a process per device, and before the logger writes: a refused run writes nothing
        captioned = getattr(self.model, "caption_tokens", None) is not None  # an image-text objective's pairs
        self.datamodule.check_launch(trainer.world_size, captioned=captioned)
        return trainer

    def seconds(self) -> float:
        """The run's wall-clock seconds so far, its earlier sessions' included when it resumed."""
        checkpoints = self.trainer.checkpoint_callback
        return checkpoints.seconds() if isinstance(checkpoints, RunCheckpoint) else time.perf_counter() - self.started

    def run_name(self) -> str:
        """The run's name within its data's runs folder: the objective's."""
        return type(self.model).__name__.lower()

    def before_fit(self) -> None:
        if getattr(self.model, "init_from", None):  # before the run's own checkpoints are matched against it
            self.model.init_from = same_data_init_from(self.model.init_from, self.datamodule.train_shards)
            self.model.hparams["init_from"] = self.model.init_from
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        root = Path(self.trainer.default_root_dir)
        ckpt = self.trainer.checkpoint_callback
        if ckpt.dirpath is None:  # Lightning's default is a new version folder per run: nothing to resume from
            ckpt.dirpath = str(root / "checkpoints")
        ckpt_dir = Path(ckpt.dirpath)
        if ckpt_dir.resolve() == (root / "export").resolve():
            raise UserError(
                f"checkpoint.dirpath {ckpt_dir} is the folder the run exports to at the end, which would replace "
                "the checkpoints; leave checkpoint.dirpath unset (it is <trainer.default_root_dir>/checkpoints)"
            )
        if self.trainer.is_global_zero:
            for path in remove_dead_writers_files(ckpt_dir):
                Console(stderr=True, soft_wrap=True).print(f"removed {path}, left by a checkpoint writer that died")
        config = self.config_init[self.subcommand]
        hparams = self.model.hparams
        run = {"objective": type(self.model).__name__, "encoder": dict(hparams.get("encoder") or {})}
        if config["ckpt_path"] is None:
            config["ckpt_path"] = self.checkpoint_to_resume(config["auto_resume"], ckpt_dir, root, run)
        elif Path(config["ckpt_path"]).is_file():  # not Lightning's "last" / "hpc" names
            path = Path(config["ckpt_path"])
            problem = checkpoint_problem(path) or resume_mismatch(path, read_checkpoint(path, mmap=True), run)
            if problem:
                raise UserError(f"--ckpt_path {path} cannot be resumed by this run: {problem}")
        resumes = bool(config["ckpt_path"]) and Path(config["ckpt_path"]).is_file()
        if resumes and self.stop_if_finished(Path(config["ckpt_path"]), root) == "end only":
            # Restored at its limit, Lightning would skip the training loop and, with it, the
            # on_train_end hooks that evaluate, draw and check the run's end: run just those.
            self.trainer.fit_loop.run = self.trainer.fit_loop.on_run_end
        if self.trainer.is_global_zero:  # after every check that refuses the run: those write nothing
            lock_run_folder(root)
        if resumes:
            if self.trainer.is_global_zero:
                Console(stderr=True, soft_wrap=True).print(
                    f"resuming from {config['ckpt_path']} (to start afresh instead, give the run a folder of its own: "
                    "--trainer.default_root_dir runs/NEW)"
                )
        elif getattr(self.model, "init_from", None) and self.trainer.is_global_zero:
            Console(stderr=True, soft_wrap=True).print(f"the encoder starts from {self.model.init_from} (init_from)")
        self.started = time.perf_counter()

    def stop_if_finished(self, checkpoint: Path, root: Path) -> str | None:
        """A finished run started again would train nothing and then write its summary, export and
        records over the ones it finished with: it says so, shows the summary it finished with and
        exits as that run did. One stopped after its last step, before its summary of that step was
        written, is to do its end-of-run work only ("end only")."""
        ckpt = read_checkpoint(checkpoint, mmap=True)
        epochs = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        loop, step, epoch = self.trainer.fit_loop, ckpt["global_step"], epochs.get("processed", 0)
        if 0 <= loop.max_steps <= step:
            reached, longer = f"step {step} of trainer.max_steps {loop.max_steps}", f"--trainer.max_steps {2 * step}"
        elif loop.max_epochs is not None and 0 <= loop.max_epochs <= epoch:
            reached = f"epoch {epoch} of trainer.max_epochs {loop.max_epochs}"
            longer = f"--trainer.max_epochs {2 * epoch}"
        else:
            return None
        summary_path = root / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if not summary or summary.get("steps") != step:  # stopped during its end-of-run evaluation or export
            if self.trainer.is_global_zero:
                Console(stderr=True, soft_wrap=True).print(
                    f"{root} trained to its limit ({reached}) but was stopped before its end-of-run evaluation, "
                    "export and summary were done: doing them now"
                )
            return "end only"
        if self.trainer.is_global_zero:
            print_run_summary(summary)
            Console(stderr=True, soft_wrap=True).print(
                f"{root} is finished ({checkpoint.name}: {reached}): nothing was trained and nothing written; "
                f"its summary above is {summary_path}. To train it longer, raise the limit (e.g. {longer})"
            )
        failed = bool(summary.get("failed"))
        sys.exit(COLLAPSED_EXIT_CODE if failed and not self.config_init[self.subcommand].get("allow_collapse") else 0)

    def checkpoint_to_resume(self, auto_resume: bool, ckpt_dir: Path, root: Path, run: dict[str, Any]) -> str | None:
        """The run's newest complete checkpoint, when there is one and it is this run's: same
        objective, encoder, data, starting weights and run folder. Anything else in the run's
        checkpoint folder stops the run with one line, so a run never continues another one,
        never writes over its checkpoints, and never reports its numbers."""
        # Ours, and the one Lightning saves on SLURM's pre-emption signal (SIGUSR1) before requeueing.
        places = ((ckpt_dir, "*.ckpt"), (root, "hpc_ckpt_*.ckpt"))
        existing = checkpoints_in(*places)
        if not existing:
            return None
        fresh = "to start afresh, give this run a folder of its own (--trainer.default_root_dir runs/NEW)"
        if not auto_resume:
            raise UserError(
                f"{ckpt_dir} already holds the checkpoints of a run ({existing[0].name}), which --auto_resume false "
                f"would write over; {fresh}"
            )
        newest = newest_complete_checkpoint(*places)
        if newest is None:
            raise UserError(f"none of the checkpoints in {ckpt_dir} is complete (see the warnings above); {fresh}")
        hparams, data = self.model.hparams, self.datamodule.hparams
        run = {**run, "train_shards": data.get("train_shards"), "init_from": hparams.get("init_from"), "folder": root}
        problem = resume_mismatch(newest, read_checkpoint(newest, mmap=True), run)
        if problem:
            raise UserError(f"{newest} is not this run's to resume: {problem}; {fresh}")
        return str(newest)

    def instantiate_classes(self) -> None:
        # jsonargparse wraps errors raised while building the model or data in its own ValueError;
        # surface ours (which say what to fix) instead of the wrapper.
        try:
            super().instantiate_classes()
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            raise (cause or err) from None


class PretrainCLI(RunCLI):
    command = "pretrain"
    #: Where a run that failed by collapsing sends its user.
    collapse_remedy = "docs/recipes-and-data.md#which-objective-to-start-with for objectives that learn on such data"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(PicturesCallback, "pictures")
        parser.add_lightning_class_args(HealthCallback, "health")
        parser.add_argument(
            "--allow_collapse",
            type=bool,
            default=False,
            help=f"exit 0 even when the run's outputs stayed collapsed for more than "
            f"{COLLAPSED_RUN_FRACTION:.0%} of its steps or at its end (it exits {COLLAPSED_EXIT_CODE} otherwise)",
        )
        parser.add_argument(
            "--compile",
            type=bool,
            default=False,
            help="torch.compile every transformer block (encoder, teacher, decoder) in place before training",
        )

    def before_instantiate_classes(self) -> None:
        # A distillation recipe's teacher "runs/{data}/simclr/export" is the one trained on this
        # run's images, found as the run folders are named (before the model loads it).
        config = self.config[self.subcommand]
        model = getattr(config.model, "init_args", config.model)
        teacher = getattr(model, "teacher", None)
        if isinstance(teacher, str) and "{data}" in teacher:
            model.teacher = teacher.replace("{data}", data_name(config.data.train_shards))
            if getattr(model, "teacher_made_by", None):
                model.teacher_made_by += f" --data.train_shards {config.data.train_shards}"

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        self.check_recipe()  # before the trainer starts printing
        return super().instantiate_trainer(**kwargs)

    def check_recipe(self) -> None:
        if isinstance(self.model, Distill):
            raise UserError("this recipe distils a teacher into a student: run it with `ssl-vit distill --config ...`")
        check_recipe_fits_model(self.datamodule, self.model)

    def before_fit(self) -> None:
        super().before_fit()
        if self.config_init[self.subcommand]["compile"]:
            compile_blocks(self.model)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.interrupted:
            return
        last = own_newest_checkpoint(trainer.checkpoint_callback)
        export_dir = None
        if self.config_init[self.subcommand]["export"] and last is not None:
            export_dir = self.export_model(last, Path(trainer.default_root_dir) / "export")
        summary = run_summary(trainer, self.model, self.seconds(), last, export_dir)
        summary["failed"] = collapse_verdict(summary, self.collapse_remedy)
        write_json(Path(trainer.default_root_dir) / "summary.json", summary)
        print_run_summary(summary)
        self.end_of_run_report(summary)
        if summary["failed"]:
            keep_going = self.config_init[self.subcommand]["allow_collapse"]
            Console(stderr=True).print(
                f"[bold red]ssl-vit {self.command}: run failed:[/] {summary['failed']}", soft_wrap=True
            )
            if not keep_going:
                sys.exit(COLLAPSED_EXIT_CODE)

    def export_model(self, checkpoint: Path, out: Path) -> Path:
        """The end-of-run export of the trained encoder."""
        return export_encoder(checkpoint, out, overwrite=True)

    def end_of_run_report(self, summary: dict[str, Any]) -> None:
        """What a command prints and writes after the run's summary (nothing for pretraining)."""


class DistillCLI(PretrainCLI):
    """``ssl-vit distill``: pretraining's run (checkpoints, resume, guards, evaluation, pictures,
    health) on :class:`~ssl_vit.methods.distill.Distill`, ending with the student's export and
    the teacher and student side by side (``distill_summary.json``)."""

    command = "distill"
    collapse_remedy = "docs/distillation.md#when-the-student-collapses for what to check"

    def run_name(self) -> str:
        return f"distill-{self.model.hparams.encoder['name']}"

    def check_recipe(self) -> None:
        sizes = tuple(getattr(self.datamodule.view, "sizes", ()))
        if any(size != self.model.image_size for size in sizes):
            raise UserError(
                f"data.view makes {'/'.join(map(str, sizes))}-px crops, model.init_args.image_size is "
                f"{self.model.image_size}: distillation takes one crop size; set them equal"
            )
        self.model.check_crops(sizes)
        check_batch_fits_model(self.datamodule, self.model)

    def export_model(self, checkpoint: Path, out: Path) -> Path:
        return export_student(checkpoint, out, overwrite=True)

    def end_of_run_report(self, summary: dict[str, Any]) -> None:
        evaluation = next((c for c in self.trainer.callbacks if isinstance(c, EvaluationCallback)), None)
        comparison = side_by_side(self.model, evaluation, summary)
        write_json(Path(self.trainer.default_root_dir) / "distill_summary.json", comparison)
        print_comparison(comparison)


class FineTuneCLI(RunCLI):
    command = "finetune"

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        self.datamodule.check_labels(self.model.hparams.num_classes)  # before the trainer starts printing
        return super().instantiate_trainer(**kwargs)

    def run_name(self) -> str:
        return "finetune" if self.model.hparams.pretrained else "finetune-random-init"

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.interrupted:
            return
        if "val/top1" not in trainer.callback_metrics:  # a run that did only its end this session (stop_if_finished)
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        metrics = trainer.callback_metrics
        results = {k: round(float(metrics[f"val/{k}"]), 3) for k in ("top1", "top5") if f"val/{k}" in metrics}
        export_dir = None
        if self.config_init[self.subcommand]["export"]:
            out = Path(trainer.default_root_dir) / "export"
            export_dir = export_classifier(self.model, out, self.datamodule.classes(), results)
        hp = self.model.hparams
        summary = {
            "objective": "fine-tuning",
            "weights": hp.init_from if hp.init_from and hp.pretrained else "random initialisation",
            # as fine-tuned (MAE's average pooling and fc_norm), not as the weights were pretrained
            "encoder": ", ".join(f"{k}={v}" for k, v in {"name": hp.encoder["name"], **self.model.model_args}.items()),
            "steps": trainer.global_step,
            "seconds": round(self.seconds(), 1),
            "val_top1": results.get("top1"),
            "val_top5": results.get("top5"),  # None of five classes or fewer
            "val_images": int(metrics["val/images"]) if "val/images" in metrics else None,
            "checkpoint": str(own_newest_checkpoint(trainer.checkpoint_callback)),
            "export": str(export_dir) if export_dir else None,
            "logs": trainer.log_dir,
        }
        write_json(Path(trainer.default_root_dir) / "summary.json", summary)
        print_run_summary(summary)


#: A run whose outputs stayed collapsed (a uniform teacher, features on nearly one line) for more
#: than this fraction of its steps, or were collapsed at its end, failed: its encoder is not what
#: it was trained to be.
COLLAPSED_RUN_FRACTION = 0.1
COLLAPSED_EXIT_CODE = 3
#: The summary's count and end state of each collapse check, by what the verdict calls it.
COLLAPSE_CHECKS = {
    "its objective's collapse check (e.g. a uniform teacher)": ("collapsed_steps", "collapsed_at_end"),
    "its features' RankMe": ("representation_collapsed_steps", "representation_collapsed_at_end"),
}


def collapse_verdict(summary: dict[str, Any], remedy: str) -> str | None:
    """Why a finished run failed by collapsing (``None`` if it did not), from its summary;
    ``remedy`` says where to look next."""
    steps = summary["steps"] or 0
    found = []
    for check, (count_key, end_key) in COLLAPSE_CHECKS.items():
        count = summary.get(count_key) or 0
        if steps and count > COLLAPSED_RUN_FRACTION * steps:
            found.append(f"{count} of {steps} steps by {check}, more than {COLLAPSED_RUN_FRACTION:.0%} of the run")
        elif summary.get(end_key):
            found.append(f"at its last check, by {check}")
    if not found:
        return None
    return (
        f"its outputs stayed collapsed ({'; '.join(found)}), so its features are not to be trusted; see the warnings "
        f"and pictures/health-*.png for when it began, and {remedy} (--allow_collapse true exits 0 anyway)"
    )


def data_name(train_shards: str) -> str:
    """What a run folder calls its training data: the data's folder, or the folder above one
    named ``train`` (``data/shapes/train`` -> ``shapes``)."""
    path = Path(split_part(train_shards)[0].rstrip("/"))
    folder = path.parent if path.name == "train" or "{" in path.name or path.suffix == ".tar" else path
    return re.sub(r"[^\w.-]+", "-", folder.name).strip("-.") or "data"


def default_run_folder(train_shards: str, name: str) -> str:
    """``runs/<data>/<name>`` (``data/shapes/train`` -> ``runs/shapes/mae``)."""
    return str(Path("runs") / data_name(train_shards) / name)


def same_data_init_from(init_from: str, train_shards: str) -> str:
    """``init_from`` with ``{data}`` replaced by the training data's name (as in
    ``trainer.default_root_dir``), so that a recipe that continues an earlier run (DINOv3's
    high-resolution stage) continues the one on the same data: ``runs/{data}/dinov3/...`` is
    ``runs/photos/dinov3/...`` for ``--data.train_shards photos``.
    Such a starting point must exist: the recipe's own data's run is never taken in its place."""
    if "{data}" not in init_from:
        return init_from
    path = init_from.replace("{data}", data_name(train_shards))
    if not Path(path).exists():
        raise UserError(
            f"model.init_args.init_from {init_from} is {path} for this data, which does not exist: this recipe "
            "continues an earlier run on the same images, so train that one first with the same "
            "--data.train_shards, or point --model.init_args.init_from at a checkpoint or export"
        )
    return path


def own_newest_checkpoint(callback: RunCheckpoint) -> Path | None:
    """The newest complete checkpoint this run saved (or resumed from): never one that merely sits
    in the same folder under a fixed name."""
    saved = {callback.last_model_path, *callback.best_k_models}
    complete = (Path(p) for p in saved if p and Path(p).is_file() and checkpoint_problem(Path(p)) is None)
    return max(complete, key=lambda p: p.stat().st_mtime, default=None)


def default_precision(accelerator: Any, precision: Any, cuda: bool | None = None) -> Any:
    """bf16 mixed precision on GPUs unless the recipe says otherwise, fp32 on CPUs; bf16 asked
    for on a CPU is a mistake (slow, and not what the recipe's numbers were measured with)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    on_gpu = str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and cuda)
    if precision is None:
        return "bf16-mixed" if on_gpu else "32-true"
    if "bf16" in str(precision) and not on_gpu:
        raise UserError(
            f"trainer.precision {precision} asks for bf16, but this run is on a CPU "
            f"(trainer.accelerator {accelerator}); use trainer.precision 32-true, or run on a GPU"
        )
    return precision


def check_recipe_fits_model(datamodule: ShardDataModule, model: SSLMethod) -> None:
    """Every crop the view makes must be a whole number of the encoder's patches, and BatchNorm
    heads need more than one image per device."""
    patch = model.encoder.patch_size
    for size in getattr(datamodule.view, "sizes", ()):
        if size % patch:
            raise UserError(
                f"data.view makes {size}-px crops, which the encoder's {patch}-px patches do not divide; "
                f"use crop sizes that are multiples of {patch}"
            )
    check_batch_fits_model(datamodule, model)


def check_batch_fits_model(datamodule: ShardDataModule, model: SSLMethod) -> None:
    """BatchNorm (heads, CNN students) needs more than one image per device."""
    if datamodule.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError(
            f"data.batch_size is {datamodule.batch_size} image per device, but {type(model).__name__}'s heads use "
            "BatchNorm, which needs at least 2; data.batch_size is per device (global batch = batch_size x devices "
            "x nodes), so lower the number of devices or raise data.batch_size"
        )


def run(cli: type[RunCLI], model: type[L.LightningModule], data: type[ShardDataModule], args: list[str]) -> None:
    """A training command: Lightning's CLI (``fit``) on ``model`` and ``data`` from a recipe."""
    # A warning is one line, "warning: ...", without the source line that raised it.
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # ShardDataset's length is exact per rank and per worker, which this generic warning cannot know.
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning internals
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0"
    # Lightning's advertisement for a cloud product, printed by every Trainer without its logger, and
    # its note that ModuleTable replaces its own summary.
    noise = ("litlogger", "Skipping setting a default `ModelSummary`")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(text in record.getMessage() for text in noise)
    )
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # resuming
    # A run shorter than its logging interval still logs (the progress bar and the end-of-run table).
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval")
    command = cli.command
    try:
        # Checkpoints are loaded as tensors and plain containers only (never arbitrary pickles);
        # "--weights_only" first so that a user's own value, later on the line, wins.
        cli(
            model,
            data,
            subclass_mode_model=issubclass(model, SSLMethod),
            args=["fit", "--weights_only=true", *args],
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [ModuleTable()]},
            # No abbreviations: "--trainer.max_epoch 2" is a typo to report, not max_epochs.
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                "fit": {"prog": f"ssl-vit {command}", "exit_on_error": False, "allow_abbrev": False},
            },
        )
    finally:
        release_run_folders()


RUN_LENGTH = ("--trainer.max_steps N", "optimiser steps (in epochs: --trainer.max_epochs N --trainer.max_steps -1)")
#: The options most runs set, for ``ssl-vit pretrain|finetune --help``; ``--help-all`` lists every key.
TRAINING_OPTIONS = {
    "pretrain": [
        ("--config RECIPE", "a YAML recipe (`ssl-vit recipes` lists the shipped ones); every key below overrides it"),
        ("--trainer.default_root_dir DIR", "the run folder: checkpoints, export, pictures, logs and summary"),
        (
            "--data.train_shards DATA",
            "a folder of images (a sub-folder per class, or none) or of shards (`ssl-vit shards`), a brace "
            "pattern or pipe:/remote URLs",
        ),
        ("--data.batch_size N", "images per device and step"),
        ("--data.num_workers N", "loader processes per device"),
        RUN_LENGTH,
        ("--trainer.devices N", "devices (GPUs) per node; --trainer.num_nodes for several nodes"),
        ("--model.init_args.base_lr LR", "base learning rate (lr = base_lr x global batch / the objective's divisor)"),
        ("--model.init_args.init_from PATH", "start the encoder from an export folder, timm weights or a checkpoint"),
        ("--ckpt_path PATH", "resume from this checkpoint instead of the run's newest"),
        ("--auto_resume false", "refuse to start in a run folder that holds checkpoints instead of resuming"),
        ("--export false", "skip the end-of-run export to <run folder>/export"),
        ("--compile true", "torch.compile the transformer blocks"),
    ],
    "finetune": [
        ("--config RECIPE", "a YAML recipe (recipes/quickstart/finetune.yaml); every key below overrides it"),
        ("--model.init_from PATH", "the weights to fine-tune: an export folder or an ssl-vit checkpoint"),
        ("--model.num_classes N", "classes of the labelled shards"),
        ("--model.pretrained false", "the same architecture at random initialisation (a baseline)"),
        ("--data.train_shards SHARDS", "labelled shards to train on"),
        ("--data.val_shards SHARDS", "labelled shards to report accuracy on"),
        ("--trainer.default_root_dir DIR", "the run folder: checkpoints, export, logs and summary"),
        RUN_LENGTH,
        ("--ckpt_path PATH", "resume from this checkpoint instead of the run's newest"),
    ],
    "distill": [
        ("--config RECIPE", "a YAML recipe (recipes/quickstart/distill.yaml); every key below overrides it"),
        ("--model.init_args.teacher PATH", "the frozen teacher: an export folder, an ssl-vit .ckpt or timm:NAME"),
        ("--model.init_args.student '{name: NAME}'", "the student: a timm model and its arguments (resnet18...)"),
        ("--model.init_args.image_size N", "the crops both see; data.view.init_args.size must match"),
        ("--data.train_shards SHARDS", "the images to distil on (labels are only for the evaluation)"),
        ("--trainer.default_root_dir DIR", "the run folder: checkpoints, export, pictures, logs and summaries"),
        RUN_LENGTH,
        ("--data.batch_size N", "images per device and step"),
        ("--ckpt_path PATH", "resume from this checkpoint instead of the run's newest"),
        ("--export false", "skip the end-of-run export of the student to <run folder>/export"),
    ],
}


def training_help(command: str) -> str:
    width = max(len(option) for option, _ in TRAINING_OPTIONS[command])
    lines = [f"  {option:<{width}}  {what}" for option, what in TRAINING_OPTIONS[command]]
    return "\n".join(
        [
            f"usage: ssl-vit {command} --config RECIPE [--KEY VALUE ...]",
            "",
            COMMANDS[command],
            "",
            "common options:",
            *lines,
            "",
            f"Every key of a recipe can be set the same way: `ssl-vit {command} --config RECIPE --print_config`",
            f"prints them all with their values; `ssl-vit {command} --help-all` describes every one.",
        ]
    )


def pretrain(args: list[str]) -> None:
    run(PretrainCLI, SSLMethod, ShardDataModule, args)


def finetune(args: list[str]) -> None:
    run(FineTuneCLI, FineTune, LabelledShardDataModule, args)


def distill(args: list[str]) -> None:
    run(DistillCLI, Distill, ShardDataModule, args)


def evaluate(command: str, args: list[str]) -> None:
    """``ssl-vit knn`` / ``probe`` / ``segprobe``: print a table and write the records, under names
    of their own (``<stem>.<kind>.eval-<settings hash>.json``), never the run's own ones."""
    parser = jsonargparse.ArgumentParser(prog=f"ssl-vit {command}", description=COMMANDS[command], exit_on_error=False)
    parser.add_argument(
        "encoder",
        help="a .ckpt written by `ssl-vit pretrain`, a folder written by `ssl-vit export` (or any timm local-dir "
        "folder with model.safetensors), or timm:NAME",
    )
    parser.add_argument(
        "--weights",
        type=str | None,
        default=None,
        help="default: the encoder's own (for timm:NAME, timm's released weights, from its cache); random: its "
        "architecture at random initialisation (seeded by --seed); or a weights file or export folder to load",
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="folder for the records; default: beside the checkpoint or export folder, the current folder for "
        "timm:NAME",
    )
    # Only the options of this command's protocols (the others keep their defaults).
    kinds = {"knn": ["knn"], "probe": ["probe", "attentive"], "segprobe": ["segmentation"]}[command]
    wanted = {
        "train_shards",  # and --val_shards, optional here (below)
        "cache_dir",
        *COMMON_SETTINGS,
        *(s for k in kinds for s in PROTOCOL_SETTINGS[k]),
    }
    wanted |= {"head"} if command == "probe" else set()
    parser.add_class_arguments(Evaluator, skip=set(inspect.signature(Evaluator).parameters) - wanted)
    parser.add_argument(
        "--val_shards",
        type=str | None,
        default=None,
        help="labelled shards to score; default: as a run reads its data, the val (or valid) folder beside a "
        "train folder, else the held-out tenth of --train_shards against the rest",
    )
    cfg = parser.parse_args(args).as_dict()
    cfg["train_shards"], cfg["val_shards"] = evaluation_split(cfg["train_shards"], cfg["val_shards"])
    source, weights, out = cfg.pop("encoder"), cfg.pop("weights"), cfg.pop("out")
    evaluator = Evaluator(**cfg)
    # data without what the command reads stops here, before any loading
    evaluator.check_shards(labels=command != "segprobe", label_maps=command == "segprobe")
    torch.manual_seed(evaluator.seed)  # --weights random: the same initialisation every time
    encoder, info = load_evaluated_encoder(source, weights)
    if torch.cuda.is_available():
        encoder = encoder.cuda()
    start = time.perf_counter()
    counts: dict[str, int] = {}  # the images and classes the accuracies count
    if command == "segprobe":
        results = {"segmentation": evaluator.segmentation_probe(encoder)}
    else:
        train, val = evaluator.features(encoder, tokens=command == "probe")
        results = {"knn": evaluator.knn(train, val)} if command == "knn" else evaluator.probes(encoder, train, val)
        counts = accuracy_counts(train, val)
    seconds = time.perf_counter() - start
    step = f" (step {info['step']})" if info["step"] is not None else ""
    Console(soft_wrap=True).print(f"{info['method']} encoder of {source}{step}, weights: {info['weights']}")
    print_results(f"{command} evaluation", results, **counts)
    settings = evaluator.settings()
    stem, tag = standalone_record_stem(source, out), settings_tag(source, weights, settings)
    for path in write_records(source, results, info, settings, seconds, stem=stem, tag=tag):
        Console(soft_wrap=True).print(f"wrote {path}")


def zeroshot(args: list[str]) -> None:
    """``ssl-vit zeroshot``: the image-text protocols of the end-of-run table on any shards, from a
    CLIP checkpoint or an open_clip folder; records as ``knn`` writes them (never the run's own)."""
    parser = argparse.ArgumentParser(prog="ssl-vit zeroshot", description=COMMANDS["zeroshot"])
    parser.add_argument(
        "model", help="a CLIP .ckpt written by `ssl-vit pretrain`, its run folder, or an open_clip folder"
    )
    parser.add_argument(
        "--val_shards",
        required=True,
        help="labelled shards (zero-shot from their class names) and/or captioned ones (retrieval)",
    )
    parser.add_argument("--image_size", type=int, default=None, help="default: the model's training resolution")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the records; default: beside the model")
    opts = parser.parse_args(args)
    from ssl_vit.methods.clip import load_image_text_model  # the `clip` extra

    model, image_size, info = load_image_text_model(opts.model)
    if torch.cuda.is_available():
        model = model.cuda()
    settings = {"train_shards": None, "val_shards": opts.val_shards, "image_size": opts.image_size or image_size}
    settings |= {"batch_size": opts.batch_size, "num_workers": opts.num_workers}
    start = time.perf_counter()
    view = EvalView(settings["image_size"])
    names = shard_class_names(opts.val_shards)
    results = evaluate_image_text(model, opts.val_shards, view, names, opts.batch_size, opts.num_workers)
    if not results:
        labels = "one class folder" if names and len(names) == 1 else "no class labels"
        raise UserError(
            f"{opts.val_shards} has {labels} (zero-shot needs two or more classes) and no captions (for retrieval)"
        )
    seconds = time.perf_counter() - start
    print_results(f"zero-shot evaluation of {opts.model}", results, classes=len(names) if names else None)
    evaluated = info.get("checkpoint", opts.model)  # a run folder's records go beside the checkpoint read
    stem, tag = standalone_record_stem(evaluated, opts.out), settings_tag(evaluated, None, settings)
    for path in write_records(evaluated, results, info, settings, seconds, stem=stem, tag=tag):
        Console(soft_wrap=True).print(f"wrote {path}")


def recipes(args: list[str]) -> None:
    """Every recipe under ./recipes (or the source checkout's), with the first line of its header."""
    argparse.ArgumentParser(prog="ssl-vit recipes", description=COMMANDS["recipes"]).parse_args(args)
    root = next((d for d in (Path("recipes"), SOURCE_TREE / "recipes") if d.is_dir()), None)
    if root is None:
        raise UserError("no recipes folder here or in the ssl-vit source tree; run from a checkout of ssl-vit")
    paths = sorted(root.rglob("*.yaml"), key=lambda path: (path.parent.name != "quickstart", path))  # quickstarts first
    summaries = [recipe_summary(path) for path in paths]
    console = Console()
    if not console.is_terminal:  # piped or redirected: a line per recipe, for grep, never wrapped
        # paths as they can be given from here (absolute for the source tree's)
        names = [path.relative_to(root.parent) if root == Path("recipes") else path for path in paths]
        print("\n".join(f"{name}\t{what}" for name, what in zip(names, summaries, strict=True)))
        return
    # On screen, paths under the title's folder, so the summaries keep room.
    table = Table(title=f"recipes in {root.resolve()}{os.sep}")
    shown = [str(path.relative_to(root)) for path in paths]
    table.add_column("recipe", no_wrap=True, min_width=max(map(len, shown), default=6))  # names are typed: never cut
    table.add_column("what it runs")
    for row in zip(shown, summaries, strict=True):
        table.add_row(*row)
    console.print(table)


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's header comment."""
    lines = path.read_text().splitlines()
    header = itertools.takewhile(lambda line: line.startswith("#") and line.strip() != "#", lines)
    paragraph = " ".join(line.lstrip("# ").strip() for line in header)
    return paragraph.split(". ")[0].removesuffix(".")


def export(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ssl-vit export", description=COMMANDS["export"])
    parser.add_argument(
        "checkpoint", help="a .ckpt written by `ssl-vit pretrain`, or a run folder (its newest complete checkpoint)"
    )
    parser.add_argument("out", help="the folder to write (a .safetensors file with --format state_dict)")
    parser.add_argument(
        "--format",
        choices=["timm", "state_dict", "open_clip"],
        default="timm",
        help="timm: a folder timm.create_model('local-dir:OUT', pretrained=True) loads; state_dict: one file; "
        "open_clip (CLIP only): both towers, a folder open_clip.create_model_and_transforms('local-dir:OUT') loads",
    )
    parser.add_argument(
        "--role", default=None, help="which encoder (teacher/student); default: the one the paper evaluates"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write OUT/model.onnx (the pooled embedding, dynamic batch), checked against PyTorch and "
        "measured (latency, throughput, k-NN) in OUT/onnx_report.json",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write OUT/model.int8.onnx (implies --onnx): dynamic int8 for a ViT, static for a CNN, "
        "calibrated on training images",
    )
    parser.add_argument(
        "--train_shards",
        default=None,
        help="for --onnx: the k-NN bank and int8 calibration images (default: the run's)",
    )
    parser.add_argument("--val_shards", default=None, help="for --onnx: the k-NN queries (default: the run's)")
    parser.add_argument(
        "--calibration_images", type=int, default=OnnxOptions.calibration_images, help="for a CNN's --int8"
    )
    opts = parser.parse_args(args)
    onnx = None
    if opts.onnx or opts.int8:
        onnx = OnnxOptions(
            int8=opts.int8,
            train_shards=opts.train_shards,
            val_shards=opts.val_shards,
            calibration_images=opts.calibration_images,
        )
    checkpoint = run_checkpoint(Path(opts.checkpoint)) if Path(opts.checkpoint).is_dir() else opts.checkpoint
    failed = failed_run(Path(checkpoint))
    if failed:
        warnings.warn(f"{checkpoint} ends a run that failed: {failed}", stacklevel=1)
    if opts.format == "open_clip":
        if onnx is not None or opts.role:
            raise UserError(
                "--onnx, --int8 and --role apply to an encoder export; leave them out with --format open_clip"
            )
        from ssl_vit.methods.clip import export_open_clip  # the `clip` extra

        out = export_open_clip(checkpoint, opts.out, overwrite=opts.overwrite)
        Console(soft_wrap=True).print(
            f'wrote {out} from {checkpoint}\nload it with open_clip.create_model_and_transforms("local-dir:{out}") '
            f'and open_clip.get_tokenizer("local-dir:{out}")'
        )
        return
    # An ONNX model made for the replaced export need not describe this one: --overwrite drops it; say so.
    replaced_onnx = [name for name in ONNX_FILES if opts.overwrite and (Path(opts.out) / name).is_file()]
    if objective_name(read_checkpoint(checkpoint)) == Distill.__name__ and opts.format == "timm":
        out = export_student(checkpoint, opts.out, overwrite=opts.overwrite, onnx=onnx)
    else:
        out = export_encoder(checkpoint, opts.out, role=opts.role, fmt=opts.format, overwrite=opts.overwrite, onnx=onnx)
    console = Console(soft_wrap=True)
    console.print(f"wrote {out} from {checkpoint}")
    if opts.format == "timm":
        load = f'timm.create_model("local-dir:{out}", pretrained=True, num_classes=N)'
        console.print(f"load it with {load}")
    if onnx is not None:
        print_onnx_report(json.loads((Path(out) / "onnx_report.json").read_text()), console)
    gone = [name for name in replaced_onnx if not (Path(out) / name).exists()]
    if gone:
        again = "--onnx --int8" if "model.int8.onnx" in gone else "--onnx"
        names = " and ".join([", ".join(gone[:-1]), gone[-1]] if len(gone) > 1 else gone)
        console.print(f"--overwrite removed {names}, made for the export it replaced; {again} writes them for this one")


def failed_run(checkpoint: Path) -> str | None:
    """Why the run that ``checkpoint`` ends failed (its ``summary.json``'s verdict), if it did."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):  # the run folder, or its checkpoints/
        summary = folder / "summary.json"
        if summary.is_file():
            record = json.loads(summary.read_text())
            ends_it = Path(record.get("checkpoint") or "").name == checkpoint.name
            return record.get("failed") if ends_it else None
    return None


def print_onnx_report(report: dict[str, Any], console: Console) -> None:
    """The parity line and one row per ONNX model: size, speed and k-NN accuracy."""
    parity = report["parity"]
    console.print(
        f"onnxruntime fp32 vs PyTorch on {parity['images']}: max abs difference {parity['max_abs_diff']:.2e}, "
        f"relative {parity['relative_diff']:.2e} (tolerance {parity['tolerance']:.0e})",
        highlight=False,
    )
    if "int8" in report:
        console.print(f"int8 vs fp32 features: mean cosine {report['int8']['cosine_to_fp32']:.4f}", highlight=False)
    knn, k = report["knn"], report["knn"]["k"]
    table = Table(
        "model", "MB", "batch-1 ms", "batch-64 img/s", f"{k} top-1 %", title=f"onnxruntime on {report['cpu']}"
    )
    for row in report["models"].values():
        accuracy = f"{row['knn'][k]['top1']:.1f}" if "knn" in row else "-"
        speed = f"{row['latency_ms_batch1']:.2f}", f"{row['images_per_s_batch64']:.0f}"
        table.add_row(row["file"], f"{row['megabytes']:.2f}", *speed, accuracy)
    console.print(table)
    if "note" in knn:
        console.print(f"k-NN {knn['note']}", highlight=False)
    fp32, int8 = report["models"]["fp32"], report["models"].get("int8")
    # Small models gain nothing from int8 arithmetic and lose time to its (de)quantisation steps.
    if int8 and (
        int8["latency_ms_batch1"] > fp32["latency_ms_batch1"]
        and int8["images_per_s_batch64"] < fp32["images_per_s_batch64"]
    ):
        console.print(
            "model.int8.onnx is slower than model.onnx on this CPU at batch 1 and 64: deploy model.onnx "
            "here, or time both on the CPU you deploy to",
            highlight=False,
        )


def shards(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ssl-vit shards", description=COMMANDS["shards"])
    sub = parser.add_subparsers(dest="source", required=True)
    emb = sub.add_parser("embedded", help="an embedded dataset: writes OUT_DIR/train and OUT_DIR/val")
    emb.add_argument("out_dir")
    emb.add_argument("--dataset", choices=list(DATASETS), default="shapes")
    emb.add_argument("--seed", type=int, default=0)
    folder = sub.add_parser("imagefolder", help="an ImageFolder tree (one sub-folder per class) -> OUT_DIR")
    folder.add_argument("src_dir")
    folder.add_argument("out_dir")
    folder.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    folder.add_argument(
        "--masks", default=None, help="a parallel folder of label maps (PNG of class indices) for dense probes"
    )
    table = sub.add_parser(
        "captions", help="a CSV/TSV of image paths and captions (open_clip's --csv-* layout) -> OUT_DIR, for CLIP"
    )
    table.add_argument("table", help="a header row, then one image path (relative to the table's folder) and caption")
    table.add_argument("out_dir")
    table.add_argument("--separator", default=None, help="default: a comma for .csv, a tab otherwise")
    table.add_argument("--image-key", default="filepath", help="the column of image paths (open_clip's default)")
    table.add_argument("--caption-key", default="title", help="the column of captions (open_clip's default)")
    table.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    for p in (emb, folder, table):
        p.add_argument(
            "--samples-per-shard",
            type=int,
            default=None,
            help="default: 250 (embedded), else 1,000, fewer below 64,000 images: at least 64 shards, so that every "
            "loader worker can read its own share of an epoch's images once",
        )
        p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    opts = parser.parse_args(args)
    console = Console()
    if opts.source == "embedded":
        indexes = write_embedded_shards(
            opts.out_dir,
            samples_per_shard=opts.samples_per_shard or 250,
            seed=opts.seed,
            overwrite=opts.overwrite,
            dataset=opts.dataset,
        )
    else:
        if opts.source == "captions":
            classes, reads = [], [opts.table, str(Path(opts.table).parent)]
            samples = caption_table_samples(opts.table, opts.separator, opts.image_key, opts.caption_key)
            size = 1000
        else:
            classes, samples, count = image_folder_samples(opts.src_dir, masks=opts.masks)
            reads = [opts.src_dir, *([opts.masks] if opts.masks else [])]
            size = shard_size(count)
        index = write_shards(
            decodable_samples(samples),
            opts.out_dir,
            classes=classes,
            source=f"{opts.source} {opts.table if opts.source == 'captions' else opts.src_dir}",
            samples_per_shard=opts.samples_per_shard or size,
            max_shard_bytes=opts.max_shard_bytes,
            overwrite=opts.overwrite,
            reads=reads,
        )
        indexes = {"": index}
    for split, index in indexes.items():
        where = f"{opts.out_dir}/{split}" if split else opts.out_dir
        classes = f"of {counted(len(index.classes), 'class', 'classes')}" if index.classes else "without classes"
        captioned = f" ({index.captions} with captions)" if index.captions else ""
        console.print(
            f"wrote {counted(index.num_samples, 'sample')} {classes} in {counted(len(index.shards), 'shard')} to "
            f"{where}{captioned}"
        )


#: The checkout ssl-vit runs from (an editable install): its recipes/ are the shipped recipes.
SOURCE_TREE = Path(__file__).resolve().parents[1]


def recipe_error_message(err: argparse.ArgumentError, command: str) -> str:
    """One line out of jsonargparse's nested report on a bad recipe or override."""
    text = str(err)
    unknown = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --([^= ]+)", text)
    if unknown:
        key = unknown.group(1) or unknown.group(2)
        if command in TRAINING_OPTIONS:
            return f"unknown recipe key '{key}'; `ssl-vit {command} --help` lists the common keys"
        return f"unknown option '--{key}'; `ssl-vit {command} --help` lists the accepted ones"
    missing = re.search(r"Parser key \"config\":\s*File does not exist: '([^']+)'", text)
    if missing:
        path = Path(missing.group(1))
        shipped = SOURCE_TREE / path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else None
        if shipped is not None and shipped.is_file():
            return (
                f"recipe {path} does not exist; the shipped one is {shipped}: give that path, or run from {SOURCE_TREE}"
            )
        return f"recipe {path} does not exist; `ssl-vit recipes` lists the shipped recipes"
    noise = ("Does not validate", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")
    return " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(f"ssl-vit {importlib.metadata.version('ssl-vit')}")
        return
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
        usage = "usage: ssl-vit COMMAND ... (ssl-vit COMMAND --help for its options; ssl-vit --version)"
        asked = bool(argv) and argv[0] in ("-h", "--help")
        unknown = "" if asked or not argv else f"ssl-vit: error: unknown command '{argv[0]}'\n"
        print(f"{unknown}{usage}\n\ncommands:\n" + "\n".join(lines), file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    command, rest = argv[0], argv[1:]
    if command in TRAINING_OPTIONS and any(arg in ("-h", "--help") for arg in rest):
        print(training_help(command))
        return
    rest = ["--help" if arg == "--help-all" else arg for arg in rest]
    try:
        if command in ("knn", "probe", "segprobe"):
            evaluate(command, rest)
        else:
            training = {"pretrain": pretrain, "finetune": finetune, "distill": distill}
            commands = {"export": export, "shards": shards, "zeroshot": zeroshot, "recipes": recipes}
            {**training, **commands}[command](rest)
    except SIGTERMException:  # RunCheckpoint saved last.ckpt; tell the scheduler the job did not finish
        sys.exit(128 + signal.SIGTERM)
    except BrokenPipeError:  # `ssl-vit recipes | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting flushes nowhere
        sys.exit(128 + signal.SIGPIPE)
    except (UserError, argparse.ArgumentError, MisconfigurationException) as err:
        # Lightning's MisconfigurationException is its own word on a bad setting (e.g. max_epochs -5).
        message = recipe_error_message(err, command) if isinstance(err, argparse.ArgumentError) else str(err)
        # escape: a message is plain text, and rich would take `.[deploy]` in one for markup and drop it
        Console(stderr=True).print(
            f"[bold red]ssl-vit {command}: error:[/] {escape(message)}", highlight=False, soft_wrap=True
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
