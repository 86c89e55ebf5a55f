"""``ssl-vit export --onnx [--int8]``: onnxruntime gives the exported timm model's pooled features,
the int8 model stays close to them, the report has its numbers, and bad input is one line with
nothing written."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from rich.console import Console
from timm.models.vision_transformer import VisionTransformer

from ssl_vit import onnx_export
from ssl_vit.checkpoint import RUN_KEY
from ssl_vit.cli import main
from ssl_vit.cli.tools import print_onnx_report
from ssl_vit.data import EvalView, write_shards
from ssl_vit.errors import UserError
from ssl_vit.eval.report import data_hash
from ssl_vit.export import export_encoder, write_timm_folder
from ssl_vit.onnx_export import OnnxOptions, _quantize, prepare_deploy
from tests.conftest import OBJECTIVES, fit_briefly, png_bytes, random_images

QUICK = dict(latency_runs=3, throughput_runs=1, calibration_images=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny SimCLR checkpoint (random images, no data of its own to calibrate on)."""
    torch.manual_seed(0)
    factory, view = OBJECTIVES["simclr"]
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    fit_briefly(factory(), view).save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    """Labelled train and val shards of random 16-px images, 3 classes."""
    root = tmp_path_factory.mktemp("shards")
    for split, seed in (("train", 0), ("val", 1)):
        samples = (("png", png_bytes(img), i % 3) for i, img in enumerate(random_images(24, seed=seed)))
        write_shards(samples, root / split, classes=["a", "b", "c"], source="test", samples_per_shard=12)
    return str(root / "train"), str(root / "val")


@pytest.fixture(scope="module")
def export(checkpoint, shards, tmp_path_factory) -> Path:
    options = OnnxOptions(int8=True, train_shards=shards[0], val_shards=shards[1], **QUICK)
    return export_encoder(checkpoint, tmp_path_factory.mktemp("out") / "export", onnx=options)


def images(n: int, seed: int = 0) -> np.ndarray:
    """Normalised images of uniform random pixels: what the calibration images look like."""
    pixels = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((pixels - mean[:, None, None]) / std[:, None, None]).numpy()


def features(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def test_onnx_gives_the_exported_timm_models_pooled_features(export):
    model = timm.create_model(f"local-dir:{export}", pretrained=True, num_classes=0).eval()
    for batch in (1, 5):  # the batch axis is dynamic
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), dtype=np.float32)
        with torch.no_grad():
            expected = model.forward_head(model.forward_features(torch.from_numpy(x)), pre_logits=True)
        torch.testing.assert_close(torch.from_numpy(features(export / "model.onnx", x)), expected, rtol=1e-4, atol=1e-5)


def test_the_docs_deployment_snippet_gives_the_features_the_run_evaluated(export, tmp_path):
    """docs/export-and-finetune.md's onnxruntime example, run as written on one photo: the
    features of the evaluation view of that photo."""
    page = (Path(__file__).parents[1] / "docs" / "export-and-finetune.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", page, re.S) if "onnxruntime" in block]
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 45, 3), dtype=np.uint8)).save(photo)
    scope = {}
    exec(compile(code.replace("export/simclr", str(export)).replace("photo.jpg", str(photo)), "docs", "exec"), scope)
    model = timm.create_model(f"local-dir:{export}", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        expected = model(EvalView(32)(Image.open(photo).convert("RGB"))[None])
    torch.testing.assert_close(torch.from_numpy(scope["features"]), expected, rtol=1e-4, atol=1e-5)


def assert_int8_follows_fp32(folder: Path, mean_cosine: float) -> None:
    x = images(32, seed=1)
    fp32, int8 = features(folder / "model.onnx", x), features(folder / "model.int8.onnx", x)
    assert int8.shape == fp32.shape
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(int8), torch.from_numpy(fp32), dim=1)
    assert cosine.min() > 0.9 and cosine.mean() > mean_cosine
    assert (folder / "model.int8.onnx").stat().st_size < (folder / "model.onnx").stat().st_size / 2


def test_int8_vit_is_dynamically_quantised_and_follows_fp32(export):
    assert_int8_follows_fp32(export, 0.99)
    report = json.loads((export / "onnx_report.json").read_text())
    assert report["int8"]["method"].startswith("onnxruntime quantize_dynamic") and "calibration" not in report["int8"]


def test_int8_cnn_is_statically_quantised_on_training_images_and_follows_fp32(shards, tmp_path):
    cnn = timm.create_model("test_resnet", num_classes=0).eval()
    cnn.pretrained_cfg = {**cnn.pretrained_cfg, "input_size": (3, 32, 32)}  # small images, quick test
    options = OnnxOptions(int8=True, train_shards=shards[0], val_shards=shards[1], **QUICK)
    deploy = prepare_deploy(cnn, options, {})
    out = write_timm_folder(cnn, tmp_path / "cnn", {}, {}, overwrite=False, deploy=deploy)
    assert_int8_follows_fp32(out, 0.99)
    report = json.loads((out / "onnx_report.json").read_text())
    assert report["int8"]["method"].startswith("onnxruntime quantize_static")
    assert report["int8"]["calibration"] == f"16 images of {shards[0]}, evaluation view"
    with pytest.raises(UserError, match="--train_shards") as stopped:  # no data: one line before any work
        prepare_deploy(cnn, OnnxOptions(int8=True), {})
    assert len(str(stopped.value).splitlines()) == 1


def test_report_holds_parity_speed_and_knn_of_both_models(export, shards):
    report = json.loads((export / "onnx_report.json").read_text())
    assert sorted(p.name for p in export.iterdir()) == [
        "README.md",
        "config.json",
        "model.int8.onnx",
        "model.onnx",
        "model.safetensors",
        "onnx_report.json",
    ]
    assert "- ONNX: `model.onnx` and `model.int8.onnx` beside the weights" in (export / "README.md").read_text()
    parity = report["parity"]
    assert parity["images"] == f"16 images of {shards[1]}"  # real images, not random tensors
    assert parity["relative_diff"] <= 1e-4 and parity["max_abs_diff"] >= 0
    assert report["int8"]["cosine_to_fp32"] > 0.9
    assert report["knn"] == {"k": "k=20", "train_shards": shards[0], "val_shards": shards[1]}
    for kind, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        row = report["models"][kind]
        assert row["file"] == name and row["megabytes"] == round((export / name).stat().st_size / 1e6, 3)  # not MiB
        assert row["latency_ms_batch1"] > 0 and row["images_per_s_batch64"] > 0
        assert 0 <= row["knn"]["k=20"]["top1"] <= 100


def test_dynamic_int8_is_judged_one_image_per_call_and_its_batch_dependence_said(export, shards, capsys):
    """Dynamic int8 quantises activations from each call's range: the report's cosine had been
    measured with 16 images in one call, which an edge device running one image never sees."""
    report = json.loads((export / "onnx_report.json").read_text())
    images = torch.stack([EvalView(32)(Image.fromarray(img)) for img in random_images(24, seed=1)[:16]]).numpy()
    fp32, int8 = (ort.InferenceSession(str(export / name)) for name in ("model.onnx", "model.int8.onnx"))
    reference = fp32.run(None, {"images": images})[0]
    alone = np.concatenate([int8.run(None, {"images": image[None]})[0] for image in images])
    together = int8.run(None, {"images": images})[0]

    def mean_cosine(a, b):
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())

    assert report["int8"]["cosine_to_fp32"] == pytest.approx(mean_cosine(alone, reference), abs=6e-6)  # 5 decimals
    batched = report["int8"]["in_one_call"]
    assert batched["images"] == 16
    assert batched["cosine_to_fp32"] == pytest.approx(mean_cosine(together, reference), abs=6e-6)
    assert batched["max_abs_diff_to_one_per_call"] == pytest.approx(float(np.abs(together - alone).max()), abs=1e-6)
    print_onnx_report(report, Console(width=200))
    shown = capsys.readouterr().out
    assert f"mean cosine {report['int8']['cosine_to_fp32']:.4f} one image per call (" in shown


def test_without_data_parity_is_checked_on_random_tensors_and_said_so(checkpoint, tmp_path, capsys):
    main(["export", str(checkpoint), str(tmp_path / "export"), "--int8"])  # a ViT's int8 needs no calibration
    report = json.loads((tmp_path / "export" / "onnx_report.json").read_text())
    assert "random normal tensors" in report["parity"]["images"]
    assert report["knn"] == {"k": "k=20", "note": "not measured: the checkpoint names no training data"}
    assert set(report["models"]) == {"fp32", "int8"}
    out = capsys.readouterr().out
    assert "onnxruntime fp32 vs PyTorch" in out and "model.int8.onnx" in out


@pytest.mark.parametrize("int8_speed, slower", [((0.5, 900.0), True), ((0.5, 1100.0), False), ((0.1, 900.0), False)])
def test_an_int8_model_slower_than_fp32_at_both_batch_sizes_is_said_to_be(export, int8_speed, slower, capsys):
    report = json.loads((export / "onnx_report.json").read_text())
    report["models"]["fp32"].update(latency_ms_batch1=0.2, images_per_s_batch64=1000.0)
    report["models"]["int8"].update(latency_ms_batch1=int8_speed[0], images_per_s_batch64=int8_speed[1])
    print_onnx_report(report, Console(width=200))
    said = "model.int8.onnx is slower than model.onnx on this CPU at batch 1 and 64" in capsys.readouterr().out
    assert said == slower


def test_missing_onnxruntime_says_which_pip_install(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert exit_code("export", str(checkpoint), str(tmp_path / "export"), "--onnx") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[deploy]"' in err and "onnxruntime" in err
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_does_not_export_is_one_line_and_nothing_written(checkpoint, tmp_path, monkeypatch, capfd):
    # aten::linalg_svdvals has no ONNX export at opset 17
    monkeypatch.setattr(VisionTransformer, "forward_head", lambda self, x, pre_logits=False: torch.linalg.svdvals(x))
    assert exit_code("export", str(checkpoint), str(tmp_path / "export"), "--onnx") == 2
    captured = capfd.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "vit_tiny_patch16_224 does not export" in captured.err
    assert "Torch IR graph" not in captured.out  # the exporter's C++ dump of the graph
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_onnx_that_differs_from_pytorch_stops_the_export(checkpoint, tmp_path, monkeypatch):
    # A batch-size branch is frozen by tracing at the example's batch of 2: the 16 parity images take the other.
    def forward_head(self, x, pre_logits=False):
        pooled = x[:, 0]
        return pooled if x.shape[0] == 2 else -pooled

    monkeypatch.setattr(VisionTransformer, "forward_head", forward_head)
    with pytest.raises(UserError, match="differ from PyTorch's"):
        export_encoder(checkpoint, tmp_path / "export", onnx=OnnxOptions(**QUICK))
    assert list(tmp_path.iterdir()) == []


def test_onnx_files_are_part_of_what_overwrite_replaces_and_the_export_says_so(export, checkpoint, tmp_path, capsys):
    assert set(onnx_export.ONNX_FILES) <= {p.name for p in export.iterdir()}
    copy = tmp_path / "export"
    copy.mkdir()
    for path in export.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    main(["export", str(checkpoint), str(copy), "--overwrite"])  # an ONNX export is an export folder
    assert not (copy / "model.onnx").exists()
    said = capsys.readouterr().out
    assert "--overwrite removed model.onnx, model.int8.onnx and onnx_report.json, made for the export" in said
    assert "--onnx --int8 writes them for this one" in said
    main(["export", str(checkpoint), str(copy), "--overwrite"])  # nothing of the kind left to lose
    assert "removed" not in capsys.readouterr().out


def exit_code(*args: str) -> int:
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    return stopped.value.code


def test_quantising_leaves_the_root_logger_as_it_was(export, tmp_path, monkeypatch):
    """onnxruntime's quantiser calls logging.info, which gives a root logger without handlers
    Python's default one; the command's own messages would then print as "WARNING:name:..."."""
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a command, outside pytest's capture
    _quantize(export / "model.onnx", tmp_path / "model.int8.onnx", "dynamic", [])
    assert logging.root.handlers == [] and (tmp_path / "model.int8.onnx").is_file()


def test_the_run_data_is_found_where_the_run_found_it_from_any_folder(checkpoint, shards, tmp_path, monkeypatch):
    """A run on `--data.train_shards train` records that string and, in its run record, where it was:
    exported from another folder, k-NN read the string there (another folder's `train`, or none)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["datamodule_hyper_parameters"] = {"train_shards": "train", "val_shards": None}
    ckpt[RUN_KEY] = {"train_shards": shards[0]}
    torch.save(ckpt, tmp_path / "moved.ckpt")
    monkeypatch.chdir(tmp_path)  # no `train` here
    main(["export", "moved.ckpt", "export", "--onnx", "--calibration_images", "8"])
    report = json.loads((tmp_path / "export" / "onnx_report.json").read_text())
    assert report["knn"]["train_shards"] == shards[0] and report["knn"]["val_shards"] == shards[1]


def test_train_shards_alone_are_split_as_knn_splits_them(checkpoint, shards, tmp_path):
    """`ssl-vit knn` takes --train_shards alone (a `val` folder beside `train`, else the held-out
    tenth); `export --onnx` asked for --val_shards too."""
    main(["export", str(checkpoint), str(tmp_path / "export"), "--onnx", "--train_shards", shards[0]])
    report = json.loads((tmp_path / "export" / "onnx_report.json").read_text())
    assert (report["knn"]["train_shards"], report["knn"]["val_shards"]) == shards


def test_images_without_a_class_are_left_out_of_the_onnx_knn_as_of_the_runs(export, tmp_path, caplog):
    # Partly labelled shards: k-NN scores the labelled images (the run's rule), where the ONNX
    # report refused the whole export.
    samples = (("png", png_bytes(img), None if i < 4 else i % 3) for i, img in enumerate(random_images(24, seed=2)))
    write_shards(samples, tmp_path / "val", classes=["a", "b", "c"], source="test", samples_per_shard=12)
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    input_size = tuple(json.loads((export / "config.json").read_text())["pretrained_cfg"]["input_size"])
    with caplog.at_level(logging.WARNING):
        kept = onnx_export._features({"fp32": session}, str(tmp_path / "val"), input_size)["fp32"]
    assert len(kept.labels) == len(kept.features) == 20 and bool((kept.labels >= 0).all())
    assert "4 of 24 images have no class and are left out" in caplog.text


def test_images_changed_since_the_runs_evaluation_are_said_beside_the_onnx_knn(checkpoint, shards, tmp_path, capsys):
    """The ONNX k-NN (66.7) read beside the card's (73.3) as a loss in the conversion, where 30
    images had been added to the run's folder since."""
    train, val = shutil.copytree(shards[0], tmp_path / "train"), shutil.copytree(shards[1], tmp_path / "val")
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["datamodule_hyper_parameters"] = {"train_shards": str(train), "val_shards": str(val)}
    ckpt[RUN_KEY] = {"train_shards": str(train), "val_shards": str(val)}
    run = tmp_path / "run/last.ckpt"
    run.parent.mkdir()
    torch.save(ckpt, run)
    evaluated = {"train_shards": str(train), "val_shards": str(val), "files": data_hash(str(train), str(val))}
    run.with_name("last.knn.json").write_text(json.dumps({"data": evaluated, "step": 2, "results": {}}))
    main(["export", str(run), str(tmp_path / "same"), "--onnx"])
    assert "changed" not in json.loads((tmp_path / "same/onnx_report.json").read_text())["knn"]
    os.utime(next(Path(train).glob("*.tar")), (1, 1))  # a shard rewritten since
    main(["export", str(run), str(tmp_path / "changed"), "--onnx"])
    report = json.loads((tmp_path / "changed/onnx_report.json").read_text())["knn"]
    assert report["changed"].startswith(
        f"the images changed since the run's own evaluation ({run.with_name('last.knn.json')})"
    )
    assert "warning: the images changed since the run's own evaluation" in capsys.readouterr().out
