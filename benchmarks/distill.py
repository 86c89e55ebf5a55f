"""Distillation into students of three families (ResNet, MobileNet, ViT) against one teacher: each
student's k-NN accuracy against steps (its run's own evaluation, random initialisation included),
its linear probe at the start and end, its cost beside the teacher's (parameters, GFLOPs, CPU
latency and throughput, measured in one process), and its ONNX export in fp32 and int8 under
onnxruntime (parity, latency, throughput, k-NN). Each run is ``ssl-vit distill --config
recipes/quickstart/distill.yaml`` with only the student (and its learning rate's warm-up kept)
changed, then ``ssl-vit export RUN OUT --onnx --int8``.

At ImageNet scale the costs alone (random weights: speed does not depend on them) of a ViT-S/16
teacher and ResNet-18, MobileNetV3-Large and ViT-Ti/16 students at 224 px, measured in the same
process, give the multiples of the teacher's throughput that the 32-px quickstart models are too
small to show.

    python benchmarks/distill.py                                   # makes the SimCLR quickstart teacher
    python benchmarks/distill.py --teacher runs/shapes/simclr/export
    python benchmarks/distill.py --students resnet --steps 156

Writes benchmarks/results/distill_<device>.json; a run of some students replaces their rows and keeps
the others'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from common import ROOT, git_commit, write_result

from ssl_vit.checkpoint import read_checkpoint
from ssl_vit.data.shards import write_embedded_shards
from ssl_vit.eval.compare import CPU_THREADS, measure_costs
from ssl_vit.eval.encoders import timm_encoder

RECIPE = ROOT / "recipes" / "quickstart" / "distill.yaml"
TEACHER_RECIPE = ROOT / "recipes" / "quickstart" / "simclr.yaml"
#: One student per family, each a few hundred thousand parameters at 32 px.
STUDENTS: dict[str, dict[str, Any]] = {
    "resnet": yaml.safe_load(RECIPE.read_text())["model"]["init_args"]["student"],
    "mobilenet": {"name": "mobilenetv3_small_050"},
    "vit": {
        "name": "vit_tiny_patch16_224",
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 2,
    },
}
#: The ImageNet-scale pairing whose costs are measured at 224 px.
AT_SCALE = {
    "teacher vit_small_patch16_224": "vit_small_patch16_224",
    "resnet18": "resnet18",
    "mobilenetv3_large_100": "mobilenetv3_large_100",
    "vit_tiny_patch16_224": "vit_tiny_patch16_224",
}


def make_teacher(work: Path, shards: Path) -> Path:
    """The SimCLR quickstart on ``shards``, exported: the distillation quickstart's teacher."""
    run = work / "teacher"
    subprocess.run(
        [
            "ssl-vit", "pretrain", "--config", str(TEACHER_RECIPE),
            "--data.train_shards", str(shards), "--data.generate_embedded", "false",
            "--trainer.default_root_dir", str(run), "--pictures.every_n_steps", "0",
        ],
        check=True,
    )  # fmt: skip
    return run / "export"


def distil(student: dict[str, Any], teacher: Path, shards: Path, run: Path, steps: int) -> dict[str, Any]:
    """One ``ssl-vit distill`` run of the quickstart recipe with ``student`` and k-NN at every
    quarter of the run: its summary (teacher and student side by side) and its k-NN history."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["model"]["init_args"]["student"] = student
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_steps"] = max(1, steps // 4)
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run(
        [
            "ssl-vit", "distill", "--config", str(run / "recipe.yaml"),
            "--model.init_args.teacher", str(teacher),
            "--data.train_shards", str(shards), "--data.generate_embedded", "false",
            "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(run),
            "--pictures.every_n_steps", "0", "--export", "false",
        ],
        check=True,
    )  # fmt: skip
    summary = json.loads((run / "distill_summary.json").read_text())
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    history = next(state["knn_history"] for name, state in ckpt["callbacks"].items() if "EvaluationCallback" in name)
    return {**summary, "knn_history": [list(point) for point in history]}


def export_onnx(run: Path, out: Path) -> dict[str, Any]:
    subprocess.run(["ssl-vit", "export", str(run), str(out), "--onnx", "--int8"], check=True)
    return json.loads((out / "onnx_report.json").read_text())


def costs_at_scale() -> dict[str, dict[str, float]]:
    """Parameters, GFLOPs and CPU speed of the ImageNet-scale pairing at 224 px, random weights."""
    import timm

    models = {role: timm.create_model(name, pretrained=False, num_classes=0) for role, name in AT_SCALE.items()}
    return measure_costs({role: timm_encoder(model).eval() for role, model in models.items()}, 224)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teacher", default=None, help="a teacher ssl-vit loads (default: make the SimCLR quickstart's)"
    )
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--steps", type=int, default=yaml.safe_load(RECIPE.read_text())["trainer"]["max_steps"])
    args = parser.parse_args()
    if args.teacher and not Path(args.teacher).exists():
        parser.error(f"--teacher {args.teacher} does not exist; give an export folder or checkpoint ssl-vit loads")
    teacher_name = args.teacher or "the SimCLR quickstart, trained by this benchmark"
    with tempfile.TemporaryDirectory(prefix="ssl-vit-distill-") as tmp:  # data, teacher and students go with it
        work = Path(tmp)
        write_embedded_shards(work / "shapes", dataset="shapes")
        shards = work / "shapes" / "train"
        teacher = Path(args.teacher) if args.teacher else make_teacher(work, shards)
        rows = []
        for family in args.students:
            run = work / family
            summary = distil(STUDENTS[family], teacher, shards, run, args.steps)
            onnx = export_onnx(run, work / f"{family}-export")
            row = {"family": family, "student": STUDENTS[family], "teacher": teacher_name, "commit": git_commit()}
            rows.append({**row, "summary": summary, "onnx": onnx})
            print(family, json.dumps(rows[-1]["summary"]["models"], indent=1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_result(
        "distill",
        device,
        rows,
        keep=("family",),  # a run of some families keeps the others' rows
        teacher=teacher_name,
        data="embedded shapes (5,000 training images, 32 px)",
        cpu_threads=CPU_THREADS,
        costs_at_224px=costs_at_scale(),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
