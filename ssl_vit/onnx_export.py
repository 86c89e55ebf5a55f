"""Deployment export: the pooled embedding of an export folder as ONNX, fp32 and int8, checked
against PyTorch and measured under onnxruntime on this CPU.

``prepare_deploy`` settles, before anything is written, what needs settling (onnxruntime, the
int8 method, the data, and calibration images where the method needs them); ``write_onnx`` then
runs inside ``ssl-vit export``'s staging folder (``ssl_vit.replace``), after the
timm folder is written there: it reloads that folder with ``timm.create_model("local-dir:...")``,
so ``model.onnx`` computes exactly what the exported timm model's
``forward_head(forward_features(x), pre_logits=True)`` computes (the features the run evaluated).
Then it checks onnxruntime against PyTorch (fp32 within ``PARITY_TOLERANCE``), quantises to
``model.int8.onnx`` if asked, and writes ``onnx_report.json``: the parity, and for each model its
latency at batch 1, throughput at batch 64 and k-NN accuracy on the run's evaluation data.

onnx and onnxruntime are an optional dependency (the ``deploy`` extra): imported here only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssl_vit.data.pipeline import NO_LABEL, ShardDataModule, eval_loader, evaluation_split
from ssl_vit.data.shards import resolve_shards
from ssl_vit.data.views import EvalView
from ssl_vit.errors import UserError
from ssl_vit.eval.evaluator import Evaluator
from ssl_vit.eval.features import FeatureSet, labelled_only
from ssl_vit.eval.report import changed_since_run, with_files

if TYPE_CHECKING:
    import onnxruntime

#: What ``write_onnx`` adds to an export folder (``--overwrite`` may replace these too).
ONNX_FILES = ("model.onnx", "model.int8.onnx", "onnx_report.json")
DEPLOY_INSTALL = 'pip install "onnx>=1.16" "onnxruntime>=1.18" (or pip install -e ".[deploy]" in a checkout)'
#: torch's TorchScript exporter (dynamo=False) at opset 17 (LayerNormalization is one op): the
#: dynamo exporter, torch's default since 2.9, needs onnxscript too, one more dependency.
OPSET = 17
#: fp32 onnxruntime against PyTorch: max |difference| / max |PyTorch feature| on the same images.
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 16
THROUGHPUT_BATCH = 64
Int8Method = Literal["dynamic", "static"]
#: How each int8 model is made, chosen by measurement (docs/export-and-finetune.md, "Deploy with
#: ONNX"): on ViTs dynamic quantisation was both faster and closer to fp32 than the best static
#: setting; on a CNN dynamic int8 convolutions (ConvInteger) ran 2-4x slower than fp32, static ones faster.
INT8_METHODS: dict[Int8Method, str] = {
    "dynamic": "onnxruntime quantize_dynamic: int8 weights per output channel, activations quantised per "
    "batch at run time; no calibration images",
    "static": "onnxruntime quantize_static, QDQ: MatMul/Gemm/Conv in int8 (weights per output channel, "
    "activations per tensor with a zero point, MinMax ranges on calibration images), the other ops in fp32",
}


@dataclass(frozen=True)
class OnnxOptions:
    """What ``ssl-vit export --onnx [--int8]`` writes and measures.

    train_shards, val_shards: the k-NN bank and queries (and, train, the calibration images of
        a static int8 model); by default the run's own evaluation data
        (``ShardDataModule.evaluation_data``).
    calibration_images: how many training images calibrate a static int8 model's activations.
    latency_runs: batch-1 runs whose median is the latency; throughput_runs: batch-64 runs, likewise.
    knn_k: the k of the k-NN accuracy reported (DINO's protocol, ssl-vit's ``Evaluator``).
    """

    int8: bool = False
    train_shards: str | None = None
    val_shards: str | None = None
    calibration_images: int = 64
    latency_runs: int = 50
    throughput_runs: int = 5
    knn_k: int = 20


@dataclass(frozen=True)
class Deploy:
    """What ``write_onnx`` does, settled before any work: ``options``, the int8 method (None
    without ``--int8``), and the shards it reads, ``train`` (k-NN bank, calibration) and ``val``
    (k-NN queries), or ``None`` with ``note`` saying why there are none."""

    options: OnnxOptions
    int8: Int8Method | None
    train: str | None
    val: str | None
    note: str = ""
    changed: str = ""  # the run's images changed since its own evaluation, which its export's card gives


def require_onnxruntime() -> None:
    """Stop with one line, before any work, when the deploy extra is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError(f"--onnx needs {err.name}, which is not installed: {DEPLOY_INSTALL}") from None


def int8_method(model: nn.Module) -> Int8Method:
    """Static for convolutional networks, dynamic for transformers (a ViT's one convolution is
    its patch embedding)."""
    convolutions = sum(isinstance(module, nn.Conv2d) for module in model.modules())
    return "static" if convolutions > 1 else "dynamic"


def prepare_deploy(
    model: nn.Module, options: OnnxOptions, data_record: dict[str, Any], checkpoint: str | Path | None = None
) -> Deploy:
    """Everything ``write_onnx`` needs to know before anything is written: onnxruntime, the int8
    method for ``model``, and the shards, ``options``' when given (a mistake there stops the
    export), else the run's evaluation data (``data_record``: its ``checkpoint``'s data settings)
    when they can be read here, and whether its images changed since the run's evaluation. A
    static int8 model without calibration images stops with one line."""
    require_onnxruntime()
    method = int8_method(model) if options.int8 else None
    if options.train_shards or options.val_shards:
        classifier = getattr(model, "num_classes", 0) > 0  # scored by its top-1 on --val_shards alone
        if classifier and not options.val_shards:
            raise UserError("a classifier's ONNX model is scored on --val_shards; give them")
        if not classifier and not options.train_shards:
            raise UserError("--val_shards are the k-NN's queries; give the bank too, --train_shards")
        if method == "static" and not options.train_shards:
            raise UserError("--int8 of a convolutional network calibrates on training images: give --train_shards")
        train, val = options.train_shards, options.val_shards
        if train and not classifier:  # --train_shards alone is split as `ssl-vit knn` splits it
            train, val = evaluation_split(train, val)
        for shards in (train, val):
            if shards:
                resolve_shards(shards)  # raises a UserError naming what is missing
        return Deploy(options, method, train, val)
    train, val, note = _run_data(data_record)
    if method == "static" and train is None:
        raise UserError(
            f"--int8 of a convolutional network calibrates on training images, and {note}; pass --train_shards "
            "TRAIN --val_shards VAL (labelled shards or image folders, as for `ssl-vit knn`)"
        )
    record = (
        train
        and checkpoint
        and changed_since_run(checkpoint, "knn", with_files({"train_shards": train, "val_shards": val}))
    )
    changed = (
        f"the images changed since the run's own evaluation ({record}): files added, removed or rewritten; the "
        "ONNX k-NN is of the images as they are now, the card's of the images as they were"
        if record
        else ""
    )
    return Deploy(options, method, train, val, note, changed)


def _run_data(record: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """The run's evaluation data (train, val, ""), or (None, None, why not)."""
    train_shards = record.get("train_shards")
    if not train_shards:
        return None, None, "the checkpoint names no training data"
    module = ShardDataModule(
        train_shards,
        view=None,
        val_shards=record.get("val_shards"),
        generate_embedded=record.get("generate_embedded", False),
    )
    train, val = module.evaluation_data()
    try:
        for shards in (train, val):
            resolve_shards(shards)
    except UserError as err:
        return None, None, f"the run's data cannot be read here ({err})"
    return train, val, ""


class PooledEmbedding(nn.Module):
    """What ``model.onnx`` computes: timm's pooled, pre-logits features of the exported model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def write_onnx(folder: Path, deploy: Deploy) -> dict[str, Any]:
    """Add ``model.onnx`` (and ``model.int8.onnx``) and ``onnx_report.json`` to the timm export
    ``folder``; return the report. An encoder's models output its pooled features, measured by
    k-NN; a classifier's (a folder with ``num_classes``, as ``ssl-vit finetune`` writes) its
    logits, measured by top-1 accuracy. Raises a ``UserError`` when the model does not export or
    onnxruntime's fp32 outputs differ from PyTorch's."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("architecture", "the model")
    classifier = bool(config.get("num_classes"))
    if classifier:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    else:
        model = PooledEmbedding(timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)).eval()
    output = "logits" if classifier else "features"
    input_size = tuple(config["pretrained_cfg"]["input_size"])
    fp32 = folder / "model.onnx"
    _export(model, fp32, input_size, name, output)
    sessions = {"fp32": _session(fp32)}

    images, source = _parity_images(deploy, input_size)
    with torch.no_grad():
        reference = model(images).numpy()
    outputs = {"fp32": _run(sessions["fp32"], images.numpy())}
    max_abs = float(np.abs(outputs["fp32"] - reference).max())
    relative = max_abs / max(float(np.abs(reference).max()), 1e-12)
    parity = {"images": source, "max_abs_diff": max_abs, "relative_diff": relative, "tolerance": PARITY_TOLERANCE}
    if not relative <= PARITY_TOLERANCE:  # also catches NaN
        raise UserError(
            f"onnxruntime's fp32 {output} of {name} differ from PyTorch's by {relative:.2e} relative (max abs "
            f"{max_abs:.2e}, tolerance {PARITY_TOLERANCE:.0e}) on {source}; the model does not export faithfully"
        )

    report: dict[str, Any] = {
        "architecture": name,
        "input": {
            "name": "images",
            "shape": ["batch", *input_size],
            "mean": config["pretrained_cfg"].get("mean"),
            "std": config["pretrained_cfg"].get("std"),
        },
        "output": "logits: timm's model(images); logit i is label_names[i]"
        if classifier
        else "features: timm's forward_head(forward_features(images), pre_logits=True)",
        "exporter": f"torch {torch.__version__} torch.onnx.export (TorchScript, dynamo=False), opset {OPSET}",
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "cpu": f"{_cpu_name()}, {os.cpu_count()} threads",
        "parity": parity,
    }
    if deploy.int8 is not None:
        int8 = folder / "model.int8.onnx"
        report["int8"] = {"method": INT8_METHODS[deploy.int8]}
        calibration: list[np.ndarray] = []
        if deploy.int8 == "static" and deploy.train is not None:  # prepare_deploy made sure of the train shards
            calibration = _calibration_batches(deploy.train, input_size, deploy.options.calibration_images)
            report["int8"]["calibration"] = f"{sum(map(len, calibration))} images of {deploy.train}, evaluation view"
        _quantize(fp32, int8, deploy.int8, calibration)
        sessions["int8"] = _session(int8)
        # As an edge device runs it: one image per call.
        one_per_call = np.concatenate([_run(sessions["int8"], image[None].numpy()) for image in images])
        report["int8"]["cosine_to_fp32"] = _mean_cosine(one_per_call, outputs["fp32"])
        if deploy.int8 == "dynamic":  # activations quantised from each call's own range
            in_one_call = _run(sessions["int8"], images.numpy())
            report["int8"]["in_one_call"] = {
                "images": len(images),
                "cosine_to_fp32": _mean_cosine(in_one_call, outputs["fp32"]),
                "max_abs_diff_to_one_per_call": float(np.abs(in_one_call - one_per_call).max()),
                "note": f"an image's output depends on the other images in its call; accuracy is measured in calls "
                f"of {THROUGHPUT_BATCH}",
            }
    report["models"] = {
        kind: {"file": session_path.name, "megabytes": round(session_path.stat().st_size / 1e6, 3)}  # 10^6 bytes
        for kind, session_path in (("fp32", fp32), ("int8", folder / "model.int8.onnx"))
        if kind in sessions
    }
    for kind, session in sessions.items():
        report["models"][kind].update(_speed(session, input_size, deploy.options))
    protocol = "top1" if classifier else "knn"
    if classifier:
        report["label_names"] = config["pretrained_cfg"].get("label_names")
        report[protocol] = _top1(sessions, deploy, input_size, config["pretrained_cfg"].get("label_names"))
    else:
        report[protocol] = _knn(sessions, deploy, input_size)
    for kind, accuracy in report[protocol].pop("results", {}).items():
        report["models"][kind][protocol] = accuracy
    (folder / "onnx_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _cpu_name() -> str:
    """The CPU the speeds were measured on: its model name where Linux tells it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return name or platform.processor() or platform.machine()


def _export(model: nn.Module, path: Path, input_size: tuple[int, ...], name: str, output: str) -> None:
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        # The exporter's deprecation and tracer warnings are noise here: the parity check decides.
        with warnings.catch_warnings(), _native_stdout_to(path.with_suffix(".log")):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["images"],
                output_names=[output],
                dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as err:  # the exporter raises many types (UnsupportedOperatorError, RuntimeError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{name} does not export to ONNX ({type(err).__name__}: {reason}); export without --onnx"
        ) from err


@contextlib.contextmanager
def _native_stdout_to(log: Path) -> Iterator[None]:
    """Send what C++ writes to stdout into ``log`` (removed after): torch's TorchScript exporter
    turns its C++ log on for every export (``setup_onnx_logging`` tests a function object, which
    is always true) and on failure prints the whole graph there, which would bury the one-line
    error."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(log, "wb") as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)
        log.unlink(missing_ok=True)


def _session(path: Path) -> onnxruntime.InferenceSession:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: onnxruntime.InferenceSession, images: np.ndarray) -> np.ndarray:
    return session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


def _eval_loader(
    shards: str, input_size: tuple[int, ...], shuffle: bool = False, batch_size: int = THROUGHPUT_BATCH
) -> DataLoader:
    """Samples of ``shards`` through the evaluation view at the model's input size, in a fixed
    order (or, ``shuffle``, a seeded shuffle, so a handful mixes classes)."""
    urls, _ = resolve_shards(shards)
    view = EvalView(input_size[-1])
    return eval_loader(urls, view, batch_size, shuffle_shards=shuffle, shuffle_buffer=1000 if shuffle else 0)


def _first_images(shards: str, input_size: tuple[int, ...], n: int, shuffle: bool) -> Tensor:
    images, count = [], 0
    for batch, _ in _eval_loader(shards, input_size, shuffle, batch_size=min(n, 64)):
        images.append(batch)
        count += len(batch)
        if count >= n:
            break
    if not images:
        raise UserError(f"no readable images in {shards!r}")
    return torch.cat(images)[:n]


def _parity_images(data: Deploy, input_size: tuple[int, ...]) -> tuple[Tensor, str]:
    if data.val is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(PARITY_IMAGES, *input_size, generator=generator)
        return images, f"{PARITY_IMAGES} random normal tensors ({data.note}: no images to check on)"
    images = _first_images(data.val, input_size, PARITY_IMAGES, shuffle=False)
    return images, f"{len(images)} images of {data.val}"


def _calibration_batches(shards: str, input_size: tuple[int, ...], n: int) -> list[np.ndarray]:
    images = _first_images(shards, input_size, n, shuffle=True)
    return [images[i : i + 16].numpy() for i in range(0, len(images), 16)]


def _quantize(fp32: Path, int8: Path, method: Int8Method, calibration: list[np.ndarray]) -> None:
    """``fp32`` quantised to ``int8`` (``INT8_METHODS``). Static: only the matrix products and
    convolutions, in S8S8 (int8 activations and weights); with LayerNorm, softmax, GELU and the
    residual adds in int8 too, a ViT's features drifted (cosine 0.88 to fp32 on ViT-S/16), and u8
    activations saturate on AVX2 CPUs without VNNI (cosine 0.96). The activations keep a zero
    point: a CNN's are mostly ReLU outputs, which a symmetric range would give only half the int8
    codes (a distilled ResNet-10-T: cosine 0.92 to fp32 symmetric, 0.995 with zero points)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    prepared = int8.with_name("model.prepared.onnx")  # inside the staging folder, removed below
    # onnxruntime's quantiser logs through the root logger (logging.info), which gives the root
    # Python's default handler: every later message of the command would print as "WARNING:name:...".
    root_handlers = list(logging.root.handlers)
    try:
        # onnxruntime's advice before quantising: shape inference and graph optimisation (fused ops).
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        if method == "dynamic":
            quantize_dynamic(str(prepared), str(int8), per_channel=True, weight_type=QuantType.QInt8)
            return
        quantize_static(
            str(prepared),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        )
    finally:
        prepared.unlink(missing_ok=True)
        logging.root.handlers[:] = root_handlers


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    return round(float(nn.functional.cosine_similarity(a, b, dim=1).mean()), 5)


def _speed(
    session: onnxruntime.InferenceSession, input_size: tuple[int, ...], options: OnnxOptions
) -> dict[str, float]:
    """Median latency at batch 1 and throughput at batch 64, after a warm-up run of each."""
    generator = torch.Generator().manual_seed(0)
    one = torch.randn(1, *input_size, generator=generator).numpy()
    many = torch.randn(THROUGHPUT_BATCH, *input_size, generator=generator).numpy()
    return {
        "latency_ms_batch1": round(1000 * _median_seconds(session, one, options.latency_runs), 3),
        "images_per_s_batch64": round(THROUGHPUT_BATCH / _median_seconds(session, many, options.throughput_runs), 1),
    }


def _median_seconds(session: onnxruntime.InferenceSession, images: np.ndarray, runs: int) -> float:
    _run(session, images)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        _run(session, images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _knn(
    sessions: dict[str, onnxruntime.InferenceSession], deploy: Deploy, input_size: tuple[int, ...]
) -> dict[str, Any]:
    """k-NN accuracy of each model's features (ssl-vit's ``Evaluator``, DINO's protocol): one
    pass over the images feeds every model."""
    k = f"k={deploy.options.knn_k}"
    if deploy.train is None or deploy.val is None:
        return {"k": k, "note": f"not measured: {deploy.note}"}
    evaluator = Evaluator(deploy.train, deploy.val, knn_ks=[deploy.options.knn_k])
    unlabelled = evaluator.unlabelled()
    if unlabelled:
        return {"k": k, "note": f"not measured: {unlabelled}"}
    train, val = (_features(sessions, shards, input_size) for shards in (deploy.train, deploy.val))
    results = {kind: evaluator.knn(train[kind], val[kind]) for kind in sessions}
    k = next(iter(results[next(iter(sessions))]))  # all the training images, where they are fewer than k
    changed = {"changed": deploy.changed} if deploy.changed else {}
    return {"k": k, "train_shards": deploy.train, "val_shards": deploy.val, "results": results, **changed}


def _top1(
    sessions: dict[str, onnxruntime.InferenceSession],
    deploy: Deploy,
    input_size: tuple[int, ...],
    label_names: list[str] | None,
) -> dict[str, Any]:
    """Top-1 accuracy (%) of each classifier's logits on the evaluation images, whose classes
    must be the classifier's (the same names in the same order)."""
    if deploy.val is None:
        return {"note": f"not measured: {deploy.note}"}
    _, index = resolve_shards(deploy.val)
    if index is None or index.classes != label_names:
        classes = f"classes {index.classes}" if index and index.classes else "no classes"
        return {"note": f"not measured: {deploy.val} has {classes}, the classifier's are {label_names}"}
    correct, count = dict.fromkeys(sessions, 0), 0
    for images, labels in _eval_loader(deploy.val, input_size):
        labelled = labels != NO_LABEL  # images without a class are not scored, as in fine-tuning's top-1
        images, labels = images[labelled], labels[labelled]
        for kind, session in sessions.items():
            predicted = torch.from_numpy(_run(session, images.numpy())).argmax(dim=1)
            correct[kind] += int((predicted == labels).sum())
        count += len(labels)
    if not count:
        raise UserError(f"no readable samples in {deploy.val!r}; an evaluation split cannot be empty")
    results = {kind: round(100 * hits / count, 2) for kind, hits in correct.items()}
    return {"val_shards": deploy.val, "images": count, "results": results}


def _features(
    sessions: dict[str, onnxruntime.InferenceSession], shards: str, input_size: tuple[int, ...]
) -> dict[str, FeatureSet]:
    features: dict[str, list[Tensor]] = {kind: [] for kind in sessions}
    labels = []
    batches: Iterable[tuple[Tensor, Tensor]] = _eval_loader(shards, input_size)
    for images, batch_labels in batches:
        for kind, session in sessions.items():
            features[kind].append(torch.from_numpy(_run(session, images.numpy())))
        labels.append(batch_labels)
    if not labels:
        raise UserError(f"no readable samples in {shards!r}; an evaluation split cannot be empty")
    all_labels = torch.cat(labels).long()
    return {kind: labelled_only(FeatureSet(torch.cat(parts), all_labels), shards) for kind, parts in features.items()}
