"""The commands that train: ``ssl-vit pretrain``, ``finetune`` and ``distill``.

Each is Lightning's CLI (``fit``) on a recipe, so every field of a recipe can be overridden on the
command line, with what every run shares: atomic checkpoints and auto-resume from the run's own
newest complete one, the guards, the run folder, and the verdict on a run that collapsed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from ssl_vit.checkpoint import (
    LOCK_FILE,
    RUN_KEY,
    AtomicCheckpointIO,
    RunCheckpoint,
    checkpoint_problem,
    checkpoints_in,
    failed_verdict,
    lock_run_folder,
    newest_complete_checkpoint,
    of_these_weights,
    read_checkpoint,
    release_run_folders,
    remove_dead_writers_files,
    resume_mismatch,
    trainer_settings,
    write_verdict,
)
from ssl_vit.cli.tools import SOURCE_TREE
from ssl_vit.data.pipeline import ShardDataModule, embedded_to_write, seen_images
from ssl_vit.data.shards import data_location, is_remote, resolve_shards, split_part
from ssl_vit.distributed import log_folder
from ssl_vit.encoder import compile_blocks
from ssl_vit.errors import UserError, cause_of, counted
from ssl_vit.eval import EvaluationCallback
from ssl_vit.eval.compare import print_comparison
from ssl_vit.eval.report import (
    write_json,
)
from ssl_vit.export import EXPORT_FOLDER, export_encoder
from ssl_vit.finetune import FineTune, LabelledShardDataModule, export_classifier, validated_on_record
from ssl_vit.guards import NonFiniteGuard
from ssl_vit.health import HealthCallback
from ssl_vit.methods.base import SSLMethod
from ssl_vit.methods.distill import Distill, export_student, side_by_side
from ssl_vit.pictures import PicturesCallback
from ssl_vit.progress import ImagesPerSecondBar, ModuleTable, print_run_summary, run_summary

COMMANDS = {
    "pretrain": "pretrain an encoder from a YAML recipe (Lightning CLI: --config, overrides, --ckpt_path)",
    "finetune": "fine-tune an encoder end to end on labelled shards (MAE's recipe; writes a timm classifier folder)",
    "distill": "distil a frozen encoder into any timm model (a CNN too) and compare the two: size, speed, accuracy",
}


def check_sizes_agree(model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """A ViT trained on crops of another size than its ``img_size`` runs (its position embeddings
    are resampled) but is exported, evaluated and deployed at ``img_size``: refused, naming both."""
    size = getattr(getattr(model, "encoder", None), "image_size", None)  # a ViT objective's encoder
    sizes = getattr(getattr(datamodule, "view", None), "sizes", None)
    if size is not None and sizes and size not in sizes:
        raise UserError(
            f"the encoder's img_size is {size} px but data.view makes {sizes[0]}-px crops, so the run would train "
            f"at {sizes[0]} and export and evaluate at {size}; set both (--model.init_args.encoder.img_size "
            f"{sizes[0]} for these crops)"
        )


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
        data = self.datamodule
        run_folder = kwargs.get("default_root_dir", root)
        check_run_folder_outside_data(run_folder, data.train_shards, getattr(data, "val_shards", None))
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
        check_sizes_agree(self.model, self.datamodule)
        for callback in self.trainer.callbacks:  # before Lightning makes the log folder (data to be written: after)
            if isinstance(callback, EvaluationCallback) and not self.datamodule.embedded_to_write():
                callback.check_data(self.datamodule, self.model)
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
        hparams, data = self.model.hparams, self.datamodule.hparams
        # A run continues only itself: another run's checkpoint, or this one's on other data, would
        # report that run's baseline and steps as this one's (its weights start a run by init_from).
        run = {
            "objective": type(self.model).__name__,
            "encoder": dict(hparams.get("encoder") or {}),
            "train_shards": data.get("train_shards"),
            "val_shards": data.get("val_shards"),
            "init_from": hparams.get("init_from"),
            "folder": root,
        }
        if config["ckpt_path"] is None:
            config["ckpt_path"] = self.checkpoint_to_resume(config["auto_resume"], ckpt_dir, root, run)
        elif Path(config["ckpt_path"]).is_file():  # not Lightning's "last" / "hpc" names
            path = Path(config["ckpt_path"])
            problem = checkpoint_problem(path)
            if not problem:
                ckpt = read_checkpoint(path, mmap=True)
                problem = resume_mismatch(path, ckpt, run) or objective_resume_problem(self.model, ckpt)
            if problem:
                raise UserError(
                    f"--ckpt_path {path} cannot be resumed by this run: {problem}; to start from its weights "
                    "instead, give it as the model's init_from"
                )
        resumes = bool(config["ckpt_path"]) and Path(config["ckpt_path"]).is_file()
        if hasattr(self.model, "restoring"):  # an objective (SSLMethod): its init_from is not read then
            self.model.restoring = resumes
        start = getattr(self.model, "init_from", None)
        if not resumes and start and not start.startswith("timm:") and not Path(start).exists():
            raise UserError(f"model.init_args.init_from {start} does not exist")  # before anything is written
        if resumes and self.stop_if_finished(Path(config["ckpt_path"]), root) == "end only":
            # Restored at its limit, Lightning would skip the training loop and, with it, the
            # on_train_end hooks that evaluate, draw and check the run's end: run just those.
            self.trainer.fit_loop.run = self.trainer.fit_loop.on_run_end
        # The lock file of a start that was killed (one that ends releases it): its pid, host and time.
        killed = (root / LOCK_FILE).read_text().strip() if (root / LOCK_FILE).is_file() else None
        if self.trainer.is_global_zero:  # after every check that refuses the run: those write nothing
            # Lightning's own names (--ckpt_path last, hpc) continue the run's checkpoints, when there are some
            named = bool(config["ckpt_path"]) and bool(checkpoints_in(*checkpoint_places(ckpt_dir, root)))
            check_end_of_run_outputs_are_ours(root, export=config["export"], resumes=resumes or named)
            lock_run_folder(root)
        captioned = getattr(self.model, "caption_tokens", None) is not None  # an image-text objective reads pairs
        described = self.datamodule.describe(captioned) if self.trainer.is_global_zero else None
        if described:
            Console(stderr=True, soft_wrap=True).print(f"data: {described}", highlight=False)
        if resumes:
            if self.trainer.is_global_zero:
                resumed = read_checkpoint(Path(config["ckpt_path"]), mmap=True)
                changed = changed_settings(resumed, self.model, self.datamodule, self.trainer.callbacks)
                # its length, which its schedules follow (a finished run raised to go on says so too),
                # clipping and batch; a checkpoint older than a setting's record is not compared on it
                now = trainer_settings(self.trainer)
                then = resumed.get(RUN_KEY, {}).get("trainer", {})
                changed += [
                    f"{key} {then[key]} -> {value}" for key, value in now.items() if then.get(key, value) != value
                ]
                step = resumed.get("global_step")
                if changed:  # for the run's summary
                    self.trainer.checkpoint_callback.changes_at_resume = f"at step {step}: {'; '.join(changed)}"
                Console(stderr=True, soft_wrap=True).print(
                    f"resuming from {config['ckpt_path']} at step {step}"
                    + (f", with settings changed since: {'; '.join(changed)}" if changed else "")
                    + " (to start afresh instead, give the run a folder of its own: "
                    "--trainer.default_root_dir runs/NEW)"
                )
        elif self.trainer.is_global_zero:
            if killed:
                every = self.config[self.subcommand].checkpoint.every_n_train_steps
                saves = f"; the run saves every {every} steps" if every else ""
                Console(stderr=True, soft_wrap=True).print(
                    f"starting at step 0: an earlier start in {root} ({killed}) was killed before its first "
                    f"checkpoint{saves} (--checkpoint.every_n_train_steps N saves more often)"
                )
            if getattr(self.model, "init_from", None):
                start = Path(self.model.init_from)
                ckpt = start.is_file() and start.suffix == ".ckpt"  # a run's checkpoint: its verdict beside it
                failed = failed_verdict(start, read_checkpoint(start, mmap=True)) if ckpt else None
                note = f"; the run it ends failed: {failed}" if failed else ""
                Console(stderr=True, soft_wrap=True).print(f"the encoder starts from {start} (init_from){note}")
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
        # stopped during its end-of-run evaluation or export; or the summary is of other weights (a rewound run)
        if not summary or not of_these_weights(summary, ckpt, "steps"):
            if self.trainer.is_global_zero:
                Console(stderr=True, soft_wrap=True).print(
                    f"{root} trained to its limit ({reached}) but was stopped before its end-of-run evaluation, "
                    "export and summary were done: doing them now"
                )
            return "end only"
        changed = changed_settings(ckpt, self.model, self.datamodule, self.trainer.callbacks)
        if changed:  # its results are not of these settings, which a sweep would read as theirs
            raise UserError(
                f"{root} is finished ({reached}) with other settings than this command's ({'; '.join(changed)}): "
                "nothing was trained and nothing written; to train with them, give the run a folder of its own "
                "(--trainer.default_root_dir runs/NEW)"
            )
        failed = bool(summary.get("failed"))
        if self.trainer.is_global_zero:
            print_run_summary(moved_paths(summary, ckpt.get(RUN_KEY, {}).get("folder"), root))
            Console(stderr=True, soft_wrap=True).print(
                f"{root} is finished ({checkpoint.name}: {reached}"
                + (", and failed: its summary's 'failed' row says why" if failed else "")
                + f"): nothing was trained and nothing written; its summary above is {summary_path}. To train it "
                f"longer, raise the limit (e.g. {longer})"
            )
        sys.exit(COLLAPSED_EXIT_CODE if failed and not self.config_init[self.subcommand].get("allow_collapse") else 0)

    def checkpoint_to_resume(self, auto_resume: bool, ckpt_dir: Path, root: Path, run: dict[str, Any]) -> str | None:
        """The run's newest complete checkpoint, when there is one and it is this run's: same
        objective, encoder, data, starting weights and run folder. Anything else in the run's
        checkpoint folder stops the run with one line, so a run never continues another one,
        never writes over its checkpoints, and never reports its numbers."""
        places = checkpoint_places(ckpt_dir, root)
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
        ckpt = read_checkpoint(newest, mmap=True)
        # and what the objective itself checks (a distillation's teacher), before anything is written
        problem = resume_mismatch(newest, ckpt, run) or objective_resume_problem(self.model, ckpt)
        if problem:
            raise UserError(f"{newest} is not this run's to resume: {problem}; {fresh}")
        return str(newest)

    def instantiate_classes(self) -> None:
        # jsonargparse wraps errors raised while building the model or data in its own ValueError;
        # surface ours (which say what to fix) instead of the wrapper.
        try:
            super().instantiate_classes()
        except Exception as err:
            raise (cause_of(err, UserError) or err) from None


def checkpoint_places(ckpt_dir: Path, root: Path) -> tuple[tuple[Path, str], ...]:
    """Where a run's checkpoints are, as (folder, pattern): ours, and the one Lightning saves on
    SLURM's pre-emption signal (SIGUSR1) before requeueing."""
    return (ckpt_dir, "*.ckpt"), (root, "hpc_ckpt_*.ckpt")


def objective_resume_problem(model: L.LightningModule, ckpt: dict[str, Any]) -> str | None:
    """What the objective itself has against continuing ``ckpt`` (``resume_problem``: a
    distillation's other teacher, a fine-tuning run's other classes or starting weights)."""
    check = getattr(model, "resume_problem", None)
    return check(ckpt) if check else None


def changed_settings(
    ckpt: dict[str, Any], model: L.LightningModule, data: L.LightningDataModule, callbacks: list[L.Callback] = ()
) -> list[str]:
    """The recipe settings that differ from the checkpoint's (``model.base_lr 0.001 -> 0.002``, and
    the evaluation's protocol of ``callbacks``): a resumed run takes the command line's, which a
    user who meant a new run should see."""

    def flat(settings: dict[str, Any], prefix: str) -> dict[str, Any]:
        items = {}
        for key, value in settings.items():
            if isinstance(value, dict):
                items |= flat(value, f"{prefix}{key}.")
            elif not key.startswith("_"):
                items[f"{prefix}{key}"] = value
        return items

    then = flat(ckpt.get("hyper_parameters", {}), "model.") | flat(ckpt.get("datamodule_hyper_parameters", {}), "data.")
    now = flat(dict(model.hparams), "model.") | flat(dict(data.hparams), "data.")
    # compared by where they are (resume_mismatch), and a teacher by its weights (Distill.resume_problem)
    located = {"data.train_shards", "model.init_from", "model.teacher"}
    hint = {"model.teacher_made_by"}  # what a missing teacher's message names, no setting of the run
    val_then = ckpt.get(RUN_KEY, {}).get("val_shards")  # where it was: the same folder given another way is no change
    val_now = now.get("data.val_shards")
    same_val = (
        {"data.val_shards"} if val_then and isinstance(val_now, str) and data_location(val_now) == val_then else set()
    )
    changed = [key for key in then if key in now and key not in located | hint | same_val and then[key] != now[key]]
    lines = [f"{key} {then[key]} -> {now[key]}" for key in changed]
    for callback in callbacks:  # the evaluation's protocol: its numbers are of it (none kept before it was)
        kept = ckpt.get("callbacks", {}).get(callback.state_key, {}).get("protocol")
        asked = getattr(callback, "asked_protocol", None)
        if kept and asked is not None:
            lines += [f"evaluation {k} {kept[k]} -> {asked.get(k)}" for k in kept if asked.get(k) != kept[k]]
    return lines


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
            if not embedded_to_write(config.data.train_shards, getattr(config.data, "generate_embedded", False)):
                resolve_shards(config.data.train_shards)  # a mistyped data folder is named as that, not as no teacher
            model.teacher = teacher.replace("{data}", data_name(config.data.train_shards))
            made_by = getattr(model, "teacher_made_by", None)
            if made_by:
                command, _, recipe = made_by.partition(" --config ")
                if recipe and not Path(recipe).exists() and (SOURCE_TREE / recipe).exists():  # run from elsewhere
                    made_by = f"{command} --config {SOURCE_TREE / recipe}"
                model.teacher_made_by = f"{made_by} --data.train_shards {config.data.train_shards}"
        elif getattr(model, "teacher_made_by", None):  # the command that makes the recipe's teacher, not this one
            model.teacher_made_by = None

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
        export = self.config_init[self.subcommand]["export"] and last is not None
        export_dir = Path(trainer.default_root_dir) / "export" if export else None
        summary = run_summary(trainer, self.model, self.seconds(), last, export_dir)
        summary["failed"] = collapse_verdict(summary, self.collapse_remedy)
        if last is not None:  # beside the checkpoint, which its exports' cards read: a failed run's weights say so
            write_verdict(last, trainer.global_step, trainer.checkpoint_callback.weights_id, summary["failed"])
        if export_dir is not None:
            self.export_model(last, export_dir)
        # Written before the summary, which marks the end-of-run work done (stop_if_finished).
        report = self.end_of_run_report(summary)
        write_json(Path(trainer.default_root_dir) / "summary.json", summary)
        print_run_summary(summary)
        if report is not None:
            self.print_report(report)
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

    def end_of_run_report(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """What a command writes beside the run's summary, to print after it (None for pretraining)."""
        return None

    def print_report(self, report: dict[str, Any]) -> None:
        """Prints :meth:`end_of_run_report`'s report."""


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
            )  # the model checked that its teacher and student take that size when it was built
        check_batch_fits_model(self.datamodule, self.model)

    def export_model(self, checkpoint: Path, out: Path) -> Path:
        return export_student(checkpoint, out, overwrite=True)

    def end_of_run_report(self, summary: dict[str, Any]) -> dict[str, Any]:
        evaluation = next((c for c in self.trainer.callbacks if isinstance(c, EvaluationCallback)), None)
        comparison = side_by_side(self.model, evaluation, summary)
        write_json(Path(self.trainer.default_root_dir) / "distill_summary.json", comparison)
        return comparison

    def print_report(self, report: dict[str, Any]) -> None:
        print_comparison(report)


class FineTuneCLI(RunCLI):
    command = "finetune"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        # The classifier at the size the data view makes, whatever size its weights were trained at.
        parser.link_arguments("data.view", "model.image_size", lambda view: view.size, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # before the trainer starts printing; what val lacks goes into the summary and the card too
        if self.model.mixup is not None and self.datamodule.batch_size % 2:  # it stopped at the first step
            raise UserError(
                f"data.batch_size is {self.datamodule.batch_size}: Mixup and CutMix pair the images of a batch, so "
                "give an even number, or turn them off (--model.mixup 0 --model.cutmix 0)"
            )
        self.val_note = self.datamodule.check_labels(self.model.hparams.num_classes)
        self.model.hparams["label_names"] = self.datamodule.classes()  # what logit i is, as the run trains
        train, val = self.datamodule.evaluation_data()
        seen = seen_images(train, val, None, learns="the classifier trains on")
        for warning in (self.val_note, seen and f"{val} holds {seen}"):
            if warning:
                Console(stderr=True, soft_wrap=True).print(f"warning: {warning}", highlight=False)
        # the summary and the card say it too: a validation on training images scores them
        self.val_note = "; ".join(filter(None, (self.val_note, seen and f"{val} holds {seen}"))) or None
        return super().instantiate_trainer(**kwargs)

    def run_name(self) -> str:
        return "finetune" if self.model.hparams.pretrained else "finetune-random-init"

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        # Lightning validates at the last step only in an epoch check_val_every_n_epoch validates, and
        # not at all in a session that did only the run's end (stop_if_finished): the last weights'
        # accuracy, on every rank (the validation gathers its counts from all of them)
        if self.model.validated_at != trainer.global_step:
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        results = {k: round(float(metrics[f"val/{k}"]), 3) for k in ("top1", "top5") if f"val/{k}" in metrics}
        val = self.datamodule.evaluation_data()[1]  # what the accuracy counts
        checkpoint = own_newest_checkpoint(trainer.checkpoint_callback)
        hp = self.model.hparams
        summary = {
            "objective": "fine-tuning",
            "weights": hp.init_from if hp.init_from and hp.pretrained else "random initialisation",
            # as fine-tuned (MAE's average pooling and fc_norm), not as the weights were pretrained
            "encoder": ", ".join(f"{k}={v}" for k, v in {"name": hp.encoder["name"], **self.model.model_args}.items()),
            "steps": trainer.global_step,
            "seconds": round(self.seconds(), 1),
            "val_top1": results.get("top1"),
            "val_step": self.model.validated_at,  # the step whose weights the accuracies are of: the last
            "val_top5": results.get("top5"),  # None of five classes or fewer
            "val_images": int(metrics["val/images"]) if "val/images" in metrics else None,
            # what answering the largest class for every image scores: the accuracy to beat
            "val_majority_class_top1": round(float(metrics["val/majority_class_top1"]), 1)
            if "val/majority_class_top1" in metrics
            else None,
            "val_shards": val,
            "val_note": self.val_note,  # the classes val lacks, or that it holds training images
            "settings_changed": getattr(trainer.checkpoint_callback, "settings_changed", None) or None,  # by resumes
            "checkpoint": str(checkpoint),
            "weights_id": getattr(trainer.checkpoint_callback, "weights_id", None),
            "export": None,
            "logs": log_folder(trainer),
        }
        if self.config_init[self.subcommand]["export"]:
            out = Path(trainer.default_root_dir) / "export"
            classes = self.model.hparams["label_names"]
            validated_on = validated_on_record(summary)
            summary["export"] = str(
                export_classifier(self.model, out, classes, results, checkpoint, validated_on=validated_on)
            )
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
        if summary.get(end_key) is None:  # not checked, or only before the first update: nothing to judge
            continue
        count = summary.get(count_key) or 0
        if steps and count > COLLAPSED_RUN_FRACTION * steps:
            found.append(f"{count} of {steps} steps by {check}, more than {COLLAPSED_RUN_FRACTION:.0%} of the run")
        elif summary.get(end_key):
            found.append(f"at its last check, by {check}")
    if not found:
        return None
    return (
        f"its outputs stayed collapsed ({'; '.join(found)}), so its objective did not train as its method means "
        "to (its numbers may still have risen, by its other terms or by chance: weigh them against the random-init "
        "column and another objective's); see the warnings "
        f"and pictures/health-*.png for when it began, and {remedy} (--allow_collapse true exits 0 anyway)"
    )


def data_name(train_shards: str) -> str:
    """What a run folder calls its training data: the data's folder, or the folder above one
    named ``train`` (``data/shapes/train`` -> ``shapes``; ``.`` is the current folder's name)."""
    path = Path(split_part(train_shards)[0].rstrip("/"))
    if not is_remote(train_shards):
        path = Path(os.path.abspath(os.path.expanduser(path)))
    folder = path.parent if path.name == "train" or "{" in path.name or path.suffix == ".tar" else path
    return re.sub(r"[^\w.-]+", "-", folder.name).strip("-.") or "data"


#: What a run writes in its folder at its end, beside its export.
RUN_SUMMARIES = ("summary.json", "distill_summary.json")


def moved_paths(summary: dict[str, Any], folder: str | None, root: Path) -> dict[str, Any]:
    """A run's summary with the paths in its run ``folder`` as it was then given where the run
    folder is now (``root``): a folder moved whole lists its export and pictures where they are."""
    if not folder or Path(folder) == root.resolve():
        return summary

    def where(value: Any) -> Any:  # a path names a folder ("MAE", a name, would resolve into the current one)
        if not isinstance(value, str) or os.sep not in value or not Path(value).resolve().is_relative_to(folder):
            return value
        return str(root / Path(value).resolve().relative_to(folder))

    return {key: where(value) for key, value in summary.items()}


def check_end_of_run_outputs_are_ours(root: Path, export: bool, resumes: bool) -> None:
    """A file where a run writes at its end (its summary, its export folder) that is not its own
    stops the run at its start, not after its training, and is never replaced: the user's, or an
    earlier run's whose checkpoints this run does not resume (``resumes``), e.g. deleted."""
    elsewhere = "give the run another folder (--trainer.default_root_dir PATH)"
    for path in (root / name for name in RUN_SUMMARIES):
        try:
            written = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            written = {}
        if path.exists() and not (isinstance(written, dict) and "steps" in written):
            raise UserError(
                f"{path} is not a summary ssl-vit wrote, and the run writes its summary there at its end: move it "
                f"out or {elsewhere}"
            )
        if written and not resumes:
            raise UserError(
                f"{path} is the summary of an earlier run ({counted(written['steps'], 'step')}) with no checkpoint "
                "here to resume, and this run starts afresh and would write over it and its export at its end: move "
                f"them out or {elsewhere}"
            )
    out = root / "export"
    if not export or not os.path.lexists(out) or (out.is_dir() and not any(out.iterdir())):
        return
    reason = EXPORT_FOLDER.foreign(out) or (
        None if resumes else "it is an earlier run's, which this run does not continue"
    )
    if reason:
        raise UserError(
            f"{out} is not an export this run wrote ({reason}), and the run exports there at its end: move it out, "
            f"{elsewhere}, or pass --export false"
        )


#: The folders a run writes in its run folder.
RUN_OUTPUT_FOLDERS = ("checkpoints", "pictures", "export", "lightning_logs")


def check_run_folder_outside_data(root: str, *data: str | None) -> None:
    """A run folder inside a folder the run reads would have its pictures and checkpoints read as
    images, by its own evaluation and by every later run on that folder; data in a folder the run
    writes (``--data.train_shards pictures`` with the run folder ``.``) would get them too."""
    run = Path(root).resolve()
    fix = "give the run a folder apart from the data (--trainer.default_root_dir PATH, or start from another folder)"
    for spec in data:
        if not spec or is_remote(spec):
            continue
        folder = Path(os.path.expanduser(split_part(spec)[0])).resolve()
        if not folder.is_dir():
            continue
        if run == folder or folder in run.parents:
            raise UserError(
                f"the run folder {root} is inside the data folder {spec}, whose images the run reads: its pictures "
                f"would be read as images; {fix}"
            )
        written = next((run / name for name in RUN_OUTPUT_FOLDERS if (run / name) in (folder, *folder.parents)), None)
        if written:
            raise UserError(f"the data folder {spec} is in {written}, where the run writes its {written.name}; {fix}")


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
    if ("bf16" in str(precision) or str(precision).startswith("16")) and not on_gpu:  # Lightning makes fp16 bf16
        raise UserError(
            f"trainer.precision {precision} asks for half precision, but this run is on a CPU "
            f"(trainer.accelerator {accelerator}); use trainer.precision 32-true, or run on a GPU"
        )
    if str(precision).startswith("64"):  # the data and the evaluation's features are float32
        raise UserError(f"trainer.precision {precision} is not supported; use 32-true (or bf16-mixed on a GPU)")
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
            parser_class=command_parser(command),
        )
    finally:
        release_run_folders()


def command_parser(command: str) -> type[LightningArgumentParser]:
    """Lightning's parser, named ``ssl-vit COMMAND`` unless told otherwise: jsonargparse builds
    the one that prints ``--model.help CLASS`` without a name, which argparse then takes from
    the program (``ssl-vit``)."""

    class CommandParser(LightningArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("prog", f"ssl-vit {command}")
            super().__init__(*args, **kwargs)

    return CommandParser


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
        ("--model.init_from PATH", "the weights to fine-tune: an export folder, a run folder or an ssl-vit checkpoint"),
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
    if importlib.util.find_spec("open_clip") and any(arg.startswith(("--help", "--model.help")) for arg in args):
        # CLIP is imported only when a recipe names it (the `clip` extra); the help that lists the
        # objectives, or describes one by name, must know it too.
        import ssl_vit.methods.clip  # noqa: F401
    run(PretrainCLI, SSLMethod, ShardDataModule, args)


def finetune(args: list[str]) -> None:
    if any(arg.split("=")[0] == "--model.image_size" for arg in args):  # linked: jsonargparse's message is unreadable
        raise UserError("finetune takes model.image_size from the data view: set --data.view.init_args.size N instead")
    run(FineTuneCLI, FineTune, LabelledShardDataModule, args)


def distill(args: list[str]) -> None:
    run(DistillCLI, Distill, ShardDataModule, args)
