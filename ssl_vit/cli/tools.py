"""The commands that read a run, a model or data: ``ssl-vit knn``, ``probe``, ``segprobe``,
``zeroshot``, ``export``, ``shards`` and ``recipes``."""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import jsonargparse
import torch
from rich.console import Console
from rich.table import Table

from ssl_vit.checkpoint import (
    FINE_TUNING,
    failed_verdict,
    objective_name,
    read_checkpoint,
    run_checkpoint,
)
from ssl_vit.data.embedded import DATASETS
from ssl_vit.data.pipeline import decodable_samples, evaluation_split, seen_images
from ssl_vit.data.shards import (
    caption_table_samples,
    image_folder_samples,
    is_remote,
    shard_size,
    split_part,
    write_embedded_shards,
    write_shards,
)
from ssl_vit.data.views import EvalView
from ssl_vit.errors import UserError, counted, first_few
from ssl_vit.eval import Evaluator
from ssl_vit.eval.encoders import (
    export_record,
    load_evaluated_encoder,
    own_pooling,
    resolve_run_folder,
    run_data,
    standalone_record_stem,
)
from ssl_vit.eval.evaluator import whole_patches
from ssl_vit.eval.features import Pooling
from ssl_vit.eval.image_text import evaluate_image_text, no_retrieval, no_zero_shot, prompt_templates
from ssl_vit.eval.report import (
    COMMON_SETTINGS,
    PROTOCOL_SETTINGS,
    accuracy_counts,
    changed_since_run,
    print_results,
    settings_tag,
    with_files,
    write_records,
)
from ssl_vit.export import export_encoder
from ssl_vit.finetune import export_finetuned
from ssl_vit.methods.distill import Distill, export_student
from ssl_vit.onnx_export import ONNX_FILES, OnnxOptions
from ssl_vit.pictures import shard_class_names

COMMANDS = {
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

#: The checkout ssl-vit runs from (an editable install): its recipes/ are the shipped recipes.
SOURCE_TREE = Path(__file__).resolve().parents[2]


def check_not_another_checkpoints_run_export(out: Path, checkpoint: Path) -> None:
    """A run's own export folder, which its ``summary.json`` names beside the checkpoint it ends
    with, takes only an export of that checkpoint: the summary would describe other weights."""
    summary_file = out.resolve().parent / "summary.json"
    if not summary_file.is_file():
        return
    summary = json.loads(summary_file.read_text())
    ends_with = Path(summary.get("checkpoint") or "")
    if Path(summary.get("export") or "").name == out.resolve().name and ends_with.name != checkpoint.name:
        raise UserError(
            f"{out} is the export that {summary_file} names, of the run's {ends_with.name}; an export of "
            f"{checkpoint.name} there would leave that summary describing other weights: write it to another folder"
        )


def check_records_folder(out: str | None) -> None:
    """--out names a folder (made if missing): a file there stops the command before any work."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the records")


def evaluate(command: str, args: list[str]) -> None:
    """``ssl-vit knn`` / ``probe`` / ``segprobe``: print a table and write the records, under names
    of their own (``<stem>.<kind>.eval-<settings hash>.json``), never the run's own ones."""
    parser = jsonargparse.ArgumentParser(prog=f"ssl-vit {command}", description=COMMANDS[command], exit_on_error=False)
    parser.add_argument(
        "encoder",
        help="a .ckpt written by `ssl-vit pretrain`, its run folder (its newest checkpoint), a folder written by "
        "`ssl-vit export` (or any timm local-dir folder with model.safetensors), or timm:NAME",
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
        "cache_dir",  # --train_shards, --val_shards, --pooling: options of their own (below)
        *COMMON_SETTINGS,
        *(s for k in kinds for s in PROTOCOL_SETTINGS[k]),
    }
    wanted = (wanted | ({"head"} if command == "probe" else set())) - {"pooling"}
    parser.add_class_arguments(Evaluator, skip=set(inspect.signature(Evaluator).parameters) - wanted)
    if command != "segprobe":
        parser.add_argument(
            "--pooling",
            type=Pooling | None,
            default=None,
            help="cls, mean (of the patch tokens) or cls+mean; default: what the model pools (timm's global_pool), "
            "the mean for SimMIM, I-JEPA and fine-tuned classifiers, else the CLS token",
        )
    parser.add_argument(
        "--train_shards",
        type=str | None,
        default=None,
        help="labelled images or shards (a folder of class folders, or `ssl-vit shards` output); default, for a "
        "run folder, its checkpoint or its export: the data the run trained on",
    )
    parser.add_argument(
        "--val_shards",
        type=str | None,
        default=None,
        help="labelled shards to score; default: as a run reads its data, the val (or valid) folder beside a "
        "train folder, else the held-out tenth of --train_shards against the rest",
    )
    cfg = parser.parse_args(args).as_dict()
    check_records_folder(cfg["out"])
    trained_on = run_data(cfg["encoder"])
    if cfg["train_shards"] is None:
        if trained_on is None:
            raise UserError(
                f"ssl-vit {command} {cfg['encoder']} needs --train_shards (labelled data to evaluate on): only a run "
                "folder, its checkpoint or an ssl-vit export know the data they trained on"
            )
        cfg["train_shards"], cfg["val_shards"] = trained_on[0], cfg["val_shards"] or trained_on[1]
        if not is_remote(trained_on[0]) and not Path(split_part(trained_on[0])[0]).exists():
            raise UserError(
                f"{trained_on[0]}, the data the run of {cfg['encoder']} trained on, is no longer there (moved or "
                "removed); give where it is now with --train_shards"
            )
    cfg["train_shards"], cfg["val_shards"] = evaluation_split(cfg["train_shards"], cfg["val_shards"])
    seen = seen_images(cfg["train_shards"], cfg["val_shards"], trained_on)
    source, weights, out = resolve_run_folder(cfg.pop("encoder")), cfg.pop("weights"), cfg.pop("out")
    pooling = cfg.pop("pooling", None)
    evaluator = Evaluator(**cfg)
    # data without what the command reads stops here, before any loading
    evaluator.check_shards(labels=command != "segprobe", label_maps=command == "segprobe")
    torch.manual_seed(evaluator.seed)  # --weights random: the same initialisation every time
    encoder, info = load_evaluated_encoder(source, weights)
    if seen:
        Console(stderr=True, soft_wrap=True).print(f"warning: {evaluator.val_shards} holds {seen}")
    evaluator.pooling = pooling or own_pooling(encoder)
    if torch.cuda.is_available():
        encoder = encoder.cuda()
    start = time.perf_counter()
    counts: dict[str, Any] = {}  # the images and classes the accuracies count
    if command == "segprobe":
        results = {"segmentation": evaluator.segmentation_probe(encoder)}
    else:
        train, val = evaluator.features(encoder, tokens=command == "probe")
        results = {"knn": evaluator.knn(train, val)} if command == "knn" else evaluator.probes(encoder, train, val)
        counts = accuracy_counts(train, val)
    seconds = time.perf_counter() - start
    step = f" (step {info['step']})" if info["step"] is not None else ""
    # What the numbers are of: the features and the data (the same table can come of other settings).
    size = f"{evaluator.image_size or encoder.image_size}-px images"
    blocks = f" of the last {evaluator.last_blocks} blocks" if evaluator.last_blocks > 1 else ""
    # a model without a CLS token of a ViT's (a CNN) pools its own way: timm's forward_head
    pooled = "the model's own" if evaluator.pooling == "cls" and not hasattr(encoder, "vit") else evaluator.pooling
    features = size if command == "segprobe" else f"{pooled} pooling{blocks}, {size}"
    learnt = {"knn": "neighbours from", "probe": "probes trained on", "segprobe": "probe trained on"}[command]
    data = f"scored on {evaluator.val_shards}, {learnt} {evaluator.train_shards}"
    Console(soft_wrap=True).print(
        f"{info['method']} encoder of {source}{step}, weights: {info['weights']}; {features}; {data}"
    )
    print_results(f"{command} evaluation", results, **counts)
    left_out = [k for k in evaluator.knn_ks if f"k={k}" not in results["knn"]] if command == "knn" else []
    if left_out:  # asked for, and more neighbours than there are: all of them again, under another name
        ks = ", ".join(map(str, left_out))
        Console(soft_wrap=True).print(f"k={ks} left out: more than the {len(train.labels)} training images")
    settings = with_files(evaluator.settings())
    own = (
        next(filter(None, (changed_since_run(written_from(source), kind, settings) for kind in results)), None)
        if weights is None
        else None
    )
    if own:
        Console(stderr=True, soft_wrap=True).print(
            f"warning: the images changed since the run's own evaluation ({own}): files added, removed or "
            "rewritten; these numbers are of the images as they are now, the run's records of the images as they were"
        )
    stem, tag = standalone_record_stem(source, out), settings_tag(source, weights, settings, info["step"])
    for path in write_records(source, results, info, settings, seconds, stem=stem, tag=tag, counts=counts):
        Console(soft_wrap=True).print(f"wrote {path}")


def written_from(source: str) -> str:
    """The checkpoint an ssl-vit export was written from, where it still is (the run's own records
    lie beside it); ``source`` itself otherwise."""
    checkpoint = export_record(source).get("checkpoint")
    return checkpoint if checkpoint and Path(checkpoint).is_file() else source


def zeroshot(args: list[str]) -> None:
    """``ssl-vit zeroshot``: the image-text protocols of the end-of-run table on any shards, from a
    CLIP checkpoint or an open_clip folder; records as ``knn`` writes them (never the run's own)."""
    parser = argparse.ArgumentParser(prog="ssl-vit zeroshot", description=COMMANDS["zeroshot"])
    parser.add_argument(
        "model", help="a CLIP .ckpt written by `ssl-vit pretrain`, its run folder, or an open_clip folder"
    )
    parser.add_argument(
        "--val_shards",
        default=None,
        help="labelled shards (zero-shot from their class names) and/or captioned ones (retrieval); default: what "
        "the run evaluated on (the val folder beside its data, else its held-out tenth)",
    )
    parser.add_argument("--image_size", type=int, default=None, help="default: the model's training resolution")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the records; default: beside the model")
    opts = parser.parse_args(args)
    check_records_folder(opts.out)
    for name, value, least in (("batch_size", opts.batch_size, 1), ("num_workers", opts.num_workers, 0)):
        if value < least:
            raise UserError(f"--{name} is {value}; it must be at least {least}")
    if opts.image_size is not None and opts.image_size < 1:
        raise UserError(f"--image_size is {opts.image_size}; leave it out for the model's own, or give pixels")
    if opts.val_shards is None:
        trained_on = run_data(opts.model)
        if trained_on is None:
            raise UserError(
                f"ssl-vit zeroshot {opts.model} needs --val_shards (images to score): only a run folder or its "
                "checkpoint know the data they trained on"
            )
        opts.val_shards = evaluation_split(*trained_on)[1]
    from ssl_vit.methods.clip import load_image_text_model  # the `clip` extra

    model, image_size, info = load_image_text_model(opts.model)
    seen = seen_images(None, opts.val_shards, info.pop("trained_on", None))
    if seen:
        Console(stderr=True, soft_wrap=True).print(f"warning: {opts.val_shards} holds {seen}")
    if torch.cuda.is_available():
        model = model.cuda()
    size = whole_patches(opts.image_size or image_size, model.patch_size, image_size)
    settings = {"train_shards": None, "val_shards": opts.val_shards, "image_size": size}
    settings = with_files(settings | {"batch_size": opts.batch_size, "num_workers": opts.num_workers})
    start = time.perf_counter()
    view = EvalView(settings["image_size"], **info.get("view", {}))
    names = shard_class_names(opts.val_shards)
    results, counts = evaluate_image_text(model, opts.val_shards, view, names, opts.batch_size, opts.num_workers)
    if not results:
        labels = "one class folder" if names and len(names) == 1 else "no class labels"
        raise UserError(
            f"{opts.val_shards} has {labels} (zero-shot needs two or more classes) and no captions (for retrieval)"
        )
    if "retrieval" not in results:
        Console(stderr=True, soft_wrap=True).print(no_retrieval(opts.val_shards))
    if "zeroshot" not in results:
        Console(stderr=True, soft_wrap=True).print(no_zero_shot(opts.val_shards))
    seconds = time.perf_counter() - start
    title = f"zero-shot evaluation of {opts.model} on {opts.val_shards}"
    print_results(title, results, **(counts or {"classes": len(names) if names else None}))
    if "zeroshot" in results:  # a score far below chance often means folder names unlike the captions' words
        templates = prompt_templates()
        Console(soft_wrap=True).print(
            f"zero-shot prompts: open_clip's {len(templates)} templates ('{templates[0]('{}')}', ...) with "
            f"each class folder's name ({first_few(names, 6)}): name the folders with the captions' words"
        )
    evaluated = info.get("checkpoint", opts.model)  # a run folder's records go beside the checkpoint read
    own = next(filter(None, (changed_since_run(evaluated, kind, settings) for kind in results)), None)
    if own:
        Console(stderr=True, soft_wrap=True).print(
            f"warning: the images or captions changed since the run's own evaluation ({own}): files added, removed "
            "or rewritten; these numbers are of them as they are now, the run's records of them as they were"
        )
    stem, tag = standalone_record_stem(evaluated, opts.out), settings_tag(evaluated, None, settings, info.get("step"))
    for path in write_records(evaluated, results, info, settings, seconds, stem=stem, tag=tag, counts=counts):
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
        "checkpoint",
        help="a .ckpt written by `ssl-vit pretrain`, `distill` or `finetune`, or a run folder (its newest complete "
        "checkpoint); a fine-tuning run's is its classifier",
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
        "--role",
        default=None,
        help="which encoder (teacher/student; MoCo v3: base/momentum); default: the one the paper evaluates",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write OUT/model.onnx (the pooled embedding, or a classifier's logits; dynamic batch), checked "
        "against PyTorch and measured (latency, throughput, k-NN or a classifier's top-1) in OUT/onnx_report.json",
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
    opts.out = os.path.expanduser(opts.out)  # a quoted '~/exports/x', which no shell expanded
    onnx = None
    if opts.onnx or opts.int8:
        onnx = OnnxOptions(
            int8=opts.int8,
            train_shards=opts.train_shards,
            val_shards=opts.val_shards,
            calibration_images=opts.calibration_images,
        )
    given = Path(opts.checkpoint)
    if (given / "config.json").is_file():  # an export already: what it was written from is what to export
        run = given.parent if (given.parent / "checkpoints").is_dir() else None
        written_from = export_record(given).get("checkpoint")
        source = run or written_from or "the run or .ckpt it was written from"
        raise UserError(
            f"{given} is an export folder, which holds no checkpoint; export {source} again: ssl-vit export {source} "
            f"OUT{' --onnx' if onnx else ''}"
        )
    checkpoint = run_checkpoint(given) if given.is_dir() else opts.checkpoint
    check_not_another_checkpoints_run_export(Path(opts.out), Path(checkpoint))
    failed = failed_verdict(Path(checkpoint), read_checkpoint(checkpoint, mmap=True))
    if failed:
        Console(stderr=True, soft_wrap=True).print(f"warning: {checkpoint} ends a run that failed: {failed}")
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
    ckpt = read_checkpoint(checkpoint)
    objective = objective_name(ckpt)
    if objective == FINE_TUNING:
        if opts.format != "timm" or opts.role:
            raise UserError(
                "a fine-tuning run's classifier is exported as one timm folder: no --format state_dict or "
                "open_clip, no --role"
            )
        out = export_finetuned(checkpoint, opts.out, overwrite=opts.overwrite, onnx=onnx)
    elif objective == Distill.__name__ and opts.format == "timm":
        if opts.role not in (None, "student"):  # the teacher is not in the checkpoint: it is its own folder
            raise UserError(
                f"a distillation run's checkpoint holds its student only (--role student); the teacher is "
                f"{ckpt['hyper_parameters'].get('teacher')}, which is exported already"
            )
        out = export_student(checkpoint, opts.out, overwrite=opts.overwrite, onnx=onnx)
    else:
        out = export_encoder(checkpoint, opts.out, role=opts.role, fmt=opts.format, overwrite=opts.overwrite, onnx=onnx)
    console = Console(soft_wrap=True)
    console.print(
        f"wrote {out} from {checkpoint}" + (", which ends a failed run (the warning above)" if failed else "")
    )
    if opts.format == "timm":
        head = ", its head and label names included" if objective == FINE_TUNING else ""
        classes = "" if head else ", num_classes=0"
        task = "" if head else " (features; num_classes=N adds a new N-class head to train)"
        console.print(f'load it with timm.create_model("local-dir:{out}", pretrained=True{classes}){head}{task}')
    if onnx is not None:
        print_onnx_report(json.loads((Path(out) / "onnx_report.json").read_text()), console)
    gone = [name for name in replaced_onnx if not (Path(out) / name).exists()]
    if gone:
        again = "--onnx --int8" if "model.int8.onnx" in gone else "--onnx"
        names = " and ".join([", ".join(gone[:-1]), gone[-1]] if len(gone) > 1 else gone)
        console.print(f"--overwrite removed {names}, made for the export it replaced; {again} writes them for this one")


def print_onnx_report(report: dict[str, Any], console: Console) -> None:
    """The parity line and one row per ONNX model: size, speed and accuracy (an encoder's k-NN, a
    classifier's top-1)."""
    parity = report["parity"]
    console.print(
        f"onnxruntime fp32 vs PyTorch on {parity['images']}: max abs difference {parity['max_abs_diff']:.2e}, "
        f"relative {parity['relative_diff']:.2e} (tolerance {parity['tolerance']:.0e})",
        highlight=False,
    )
    output = report["output"].split(":")[0]  # features or logits
    if "int8" in report:
        int8 = report["int8"]
        batched = int8.get("in_one_call")
        batched = (
            f" ({batched['cosine_to_fp32']:.4f} with {batched['images']} in one call: dynamic int8's outputs "
            "depend on the other images in a call)"
            if batched
            else ""
        )
        console.print(
            f"int8 vs fp32 {output}: mean cosine {int8['cosine_to_fp32']:.4f} one image per call{batched}",
            highlight=False,
        )
    classifier = "top1" in report
    protocol = report["top1" if classifier else "knn"]
    heading = "top-1 %" if classifier else f"{protocol['k']} top-1 %"
    if "images" in protocol:
        caption = f"top-1 on {protocol['images']} images of {protocol['val_shards']}"
    elif "val_shards" in protocol:
        caption = f"k-NN of {protocol['val_shards']} against {protocol['train_shards']}"
    else:
        caption = None
    table = Table(
        "model", "MB", "batch-1 ms", "batch-64 img/s", heading, title=f"onnxruntime on {report['cpu']}", caption=caption
    )
    for row in report["models"].values():
        accuracy = row.get("top1") if classifier else row.get("knn", {}).get(protocol["k"], {}).get("top1")
        speed = f"{row['latency_ms_batch1']:.2f}", f"{row['images_per_s_batch64']:.0f}"
        table.add_row(row["file"], f"{row['megabytes']:.2f}", *speed, "-" if accuracy is None else f"{accuracy:.1f}")
    console.print(table)
    if "note" in protocol:
        console.print(f"{'top-1' if classifier else 'k-NN'} {protocol['note']}", highlight=False)
    if "changed" in protocol:
        console.print(f"warning: {protocol['changed']}", highlight=False)
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
    emb.add_argument("out_dir", help="a new folder for the shards (train/ and val/ in it)")
    emb.add_argument("--dataset", choices=list(DATASETS), default="shapes")
    emb.add_argument("--seed", type=int, default=0)
    folder = sub.add_parser("imagefolder", help="an ImageFolder tree (one sub-folder per class) -> OUT_DIR")
    folder.add_argument("src_dir", help="the folder of images: one sub-folder per class, or none (unlabelled)")
    folder.add_argument("out_dir", help="a new folder for the shards and their dataset.json")
    folder.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="the largest tar file (default 1 GiB)")
    folder.add_argument(
        "--masks", default=None, help="a parallel folder of label maps (PNG of class indices) for dense probes"
    )
    folder.add_argument(
        "--unlabelled",
        action="store_true",
        help="every image, sub-folders included, without class labels: for sub-folders that are no classes "
        "(dates, cameras, batches)",
    )
    table = sub.add_parser(
        "captions", help="a CSV/TSV of image paths and captions (open_clip's --csv-* layout) -> OUT_DIR, for CLIP"
    )
    table.add_argument("table", help="a header row, then one image path (relative to the table's folder) and caption")
    table.add_argument("out_dir", help="a new folder for the shards and their dataset.json")
    table.add_argument("--separator", default=None, help="default: a comma for .csv, a tab otherwise")
    table.add_argument("--image-key", default="filepath", help="the column of image paths (open_clip's default)")
    table.add_argument("--caption-key", default="title", help="the column of captions (open_clip's default)")
    table.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="the largest tar file (default 1 GiB)")
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
    if opts.samples_per_shard is not None and opts.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard is {opts.samples_per_shard}; give 1 or more, or leave it out")
    opts.out_dir = os.path.expanduser(opts.out_dir)  # a quoted '~/shards', which no shell expanded
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
            samples, count = caption_table_samples(opts.table, opts.separator, opts.image_key, opts.caption_key)
        else:
            for folder in filter(None, (opts.src_dir, opts.masks)):  # beside it: the folder stays images only
                if Path(folder).resolve() in Path(opts.out_dir).resolve().parents:
                    raise UserError(
                        f"{opts.out_dir} is inside {folder}, which this command reads: the shards would sit among the "
                        f"images, and {folder} would no longer read as an image folder; write them beside it, e.g. "
                        f"{Path(folder).resolve()}-shards"
                    )
            classes, samples, count = image_folder_samples(opts.src_dir, masks=opts.masks, labelled=not opts.unlabelled)
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
