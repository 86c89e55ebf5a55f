"""The ``ssl-vit`` command.

    ssl-vit pretrain --config recipes/quickstart/mae.yaml [--trainer.max_steps 624 ...] [--ckpt_path last]
    ssl-vit finetune --config recipes/quickstart/finetune.yaml [--model.init_args.pretrained false ...]
    ssl-vit distill --config recipes/quickstart/distill.yaml [--model.init_args.student '{name: resnet18}' ...]
    ssl-vit knn CHECKPOINT --train_shards TRAIN [--val_shards VAL] [--pooling cls|mean|cls+mean ...]
    ssl-vit probe CHECKPOINT --train_shards TRAIN [--val_shards VAL] [--head linear|attentive|linear+attentive ...]
    ssl-vit segprobe CHECKPOINT --train_shards TRAIN [--val_shards VAL] [--seg_epochs 20 ...]
    ssl-vit export RUN_OR_CKPT OUT [--format timm|state_dict|open_clip] [--role ROLE] [--overwrite] [--onnx [--int8]]
    ssl-vit zeroshot CLIP_CHECKPOINT_OR_OPEN_CLIP_FOLDER --val_shards VAL [--image_size N ...]
    ssl-vit shards embedded OUT_DIR
    ssl-vit shards imagefolder SRC_DIR OUT_DIR [--samples-per-shard N] [--masks MASK_DIR]
    ssl-vit shards captions TABLE.csv|.tsv OUT_DIR [--image-key filepath] [--caption-key title]
    ssl-vit recipes

The commands that train (Lightning's CLI on a recipe: every field can be overridden on the command
line, and the same command again resumes the run) are in ``training.py``; the ones that read a
run, a model or data in ``tools.py``. This module dispatches, and turns a ``UserError`` into one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import importlib.metadata
import inspect
import multiprocessing
import os
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from rich.console import Console
from rich.markup import escape

from ssl_vit.cli import tools, training
from ssl_vit.cli.tools import SOURCE_TREE, evaluate, export, recipes, shards, zeroshot
from ssl_vit.cli.training import TRAINING_OPTIONS, distill, finetune, pretrain, training_help
from ssl_vit.errors import UserError, cause_of

COMMANDS = {**training.COMMANDS, **tools.COMMANDS}


def recipe_error_message(err: argparse.ArgumentError, command: str) -> str:
    """One line out of jsonargparse's nested report on a bad recipe or override."""
    text = str(err)
    unknown = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --([^= ]+)", text)
    if unknown:
        key = unknown.group(1) or unknown.group(2)
        if command in TRAINING_OPTIONS:
            common = [option.split()[0].removeprefix("--") for option, _ in TRAINING_OPTIONS[command]]
            close = difflib.get_close_matches(key, common, n=1)
            meant = f"did you mean '{close[0]}'? " if close else ""
            return f"unknown recipe key '{key}'; {meant}`ssl-vit {command} --help` lists the common keys"
        return f"unknown option '--{key}'; `ssl-vit {command} --help` lists the accepted ones"
    # a model setting its class does not take, and an encoder setting (jsonargparse breaks its report over lines)
    taken = (
        r"class_path '([\w.]+)': (?:Option '(\w+)' is not accepted|Parser key \"encoder\": Unexpected keys: \{'(\w+)')"
    )
    setting = re.search(taken.replace(" ", r"\s*"), text)
    if setting:
        return unknown_setting_message(setting.group(1), setting.group(2), setting.group(3), command)
    missing = re.search(r"Parser key \"config\":\s*File does not exist: '([^']+)'", text)
    if missing:
        path = Path(missing.group(1))
        shipped = SOURCE_TREE / path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else None
        if shipped is not None and shipped.is_file():
            return (
                f"recipe {path} does not exist; the shipped one is {shipped}: give that path, or run from {SOURCE_TREE}"
            )
        named = sorted((SOURCE_TREE / "recipes").rglob(path.name))
        if len(named) == 1:  # `--config simclr.yaml`: the shipped recipe of that name
            return f"recipe {path} does not exist; did you mean {named[0]}? (`ssl-vit recipes` lists the shipped ones)"
        return f"recipe {path} does not exist; `ssl-vit recipes` lists the shipped recipes"
    noise = ("Does not validate", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")
    return " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise))


def unknown_setting_message(class_path: str, key: str | None, encoder_key: str | None, command: str) -> str:
    """``model.init_args.KEY`` (or ``model.init_args.encoder.KEY``) that the class does not take,
    with the nearest one it does."""
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if key:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        where, unknown = "model.init_args", key
        listed = f"`ssl-vit {command} --model.help {name}` lists them"
    else:  # the encoder's settings: ViTEncoder's own and timm's VisionTransformer's
        from timm.models.vision_transformer import VisionTransformer

        from ssl_vit.encoder import ViTEncoder

        accepted = [
            *inspect.signature(ViTEncoder.__init__).parameters,
            *inspect.signature(VisionTransformer).parameters,
        ]
        where, unknown = "model.init_args.encoder", encoder_key
        listed = "the encoder takes ssl_vit.encoder.ViTEncoder's settings and timm's VisionTransformer's arguments"
    close = difflib.get_close_matches(unknown, accepted, n=1)
    meant = f"did you mean '{where}.{close[0]}'? " if close else ""
    return f"unknown recipe key '{where}.{unknown}' of {name}; {meant}{listed}"


def disk_full(err: BaseException) -> OSError | None:
    found = cause_of(err, OSError)
    return found if isinstance(found, OSError) and found.errno in (errno.ENOSPC, errno.EDQUOT) else None


def main(argv: list[str] | None = None) -> None:
    """The ``ssl-vit`` command; ``argv`` (a test's) instead of the process's own arguments."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else argv

    def stopped_by_ctrl_c() -> NoReturn:
        Console(stderr=True).print(f"ssl-vit {argv[0] if argv else ''}: stopped by Ctrl-C", highlight=False)
        sys.exit(128 + signal.SIGINT)

    try:
        run_command(argv)
    except SIGTERMException as stop:  # RunCheckpoint saved last.ckpt; tell the scheduler the job did not finish
        if own_process:  # saved: a Ctrl-C while the loader's workers stop would only print a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(128 + getattr(stop, "signum", signal.SIGTERM))
    except KeyboardInterrupt:  # Ctrl-C before a run could stop at a step's end (imports, reading), or a second one
        stopped_by_ctrl_c()
    except SystemExit as stop:
        # Lightning ends a fit that a Ctrl-C interrupted mid-step (the second one) with status 1, a crash's
        if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt):
            sys.exit(128 + signal.SIGINT)
        raise
    except BrokenPipeError:  # `ssl-vit recipes | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting flushes nowhere
        sys.exit(128 + signal.SIGPIPE)
    except (UserError, argparse.ArgumentError, MisconfigurationException) as err:
        command = argv[0]
        # Lightning's MisconfigurationException is its own word on a bad setting (e.g. max_epochs -5).
        message = recipe_error_message(err, command) if isinstance(err, argparse.ArgumentError) else str(err)
        if "\nOriginal Traceback" in message:  # raised in a loader worker: torch put the worker's traceback first
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        # escape: a message is plain text, and rich would take `.[deploy]` in one for markup and drop it
        Console(stderr=True).print(
            f"[bold red]ssl-vit {command}: error:[/] {escape(message)}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except Exception as err:
        if cause_of(err, KeyboardInterrupt):
            stopped_by_ctrl_c()
        full = disk_full(err)
        if full is None:
            raise
        where = f" writing {full.filename}" if full.filename else ""
        Console(stderr=True).print(
            f"[bold red]ssl-vit {argv[0]}: error:[/] {escape(full.strerror or 'no space left')}{where}; free space "
            "there (or write elsewhere) and run the command again: what it replaces is kept until its new output is "
            "whole, and a run resumes from its newest complete checkpoint",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    finally:
        stop_loader_workers()


def stop_loader_workers() -> None:
    """Kill the daemon processes (data loader workers) still running when a command ends, as
    multiprocessing means to at exit: loader workers ignore SIGTERM (a SIGTERM to the process group
    is the training process's to act on), so the terminate() it sends cannot stop those of an
    epoch a signal interrupted, and the process would wait for them for ever."""
    daemons = [child for child in multiprocessing.active_children() if child.daemon]
    if not daemons:
        return
    torch_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's would raise: a worker was killed
    try:
        for child in daemons:
            child.kill()
            child.join(timeout=10)
    finally:
        if torch_handler is not None:  # None: one set outside Python, which cannot be put back
            signal.signal(signal.SIGCHLD, torch_handler)


def run_command(argv: list[str]) -> None:
    """``ssl-vit COMMAND ARGS``, the usage without a known command, or a training command's help."""
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
    if command in ("knn", "probe", "segprobe"):
        evaluate(command, rest)
        return
    trains = {"pretrain": pretrain, "finetune": finetune, "distill": distill}
    reads = {"export": export, "shards": shards, "zeroshot": zeroshot, "recipes": recipes}
    {**trains, **reads}[command](rest)
