"""Distillation of a frozen encoder (the teacher: anything ``ssl-vit knn`` evaluates) into any timm
model (the student: a ViT, ResNet, MobileNet, ConvNeXt...), by feature distillation (Wei et al.,
2022, SwinTransformer/Feature-Distillation) on two things the student hands on: its pooled
embedding and its spatial feature map.

One view per image (a random resized crop and a flip); the teacher sees the same view, under
``torch.no_grad``, in eval mode, and is in no optimiser and no checkpoint.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ssl_vit.checkpoint import data_settings, encoder_weights, read_checkpoint
from ssl_vit.encoder import TIMM_VITS, ViTEncoder
from ssl_vit.errors import UserError, last_line
from ssl_vit.eval.callback import EvaluationCallback
from ssl_vit.eval.compare import CPU_THREADS, cost_ratios, headline_accuracy, measure_costs
from ssl_vit.eval.encoders import (
    TIMM_PREFIX,
    FrozenEncoder,
    TimmModelEncoder,
    load_evaluated_encoder,
    missing_source,
)
from ssl_vit.eval.evaluator import Evaluator
from ssl_vit.export import architecture_name, preprocessing_cfg, provenance, write_encoder, write_timm_folder
from ssl_vit.losses import feature_distillation_loss
from ssl_vit.methods.base import SSLMethod
from ssl_vit.onnx_export import OnnxOptions, prepare_deploy
from ssl_vit.pictures import Columns, pca_colours, to_display
from ssl_vit.schedules import PaperRun


class Distill(SSLMethod):
    """Feature distillation of ``teacher`` into ``student``.

    loss = ``global_weight`` x FD(P_g(student pooled), teacher pooled)
         + ``dense_weight`` x FD(P_d(student map resized to the teacher's grid), teacher patch map)

    FD is :func:`~ssl_vit.losses.feature_distillation_loss` (smooth-L1, beta 2, to the teacher's
    features whitened by a LayerNorm without affine parameters), P_g and P_d learned linear maps to
    the teacher's width (FD's 1x1 convolution), the resize bilinear. The pooled embeddings are
    timm's ``forward_head(pre_logits=True)`` (a ViT teacher's CLS token), the maps a CNN's last
    feature map and a ViT's patch tokens. Optimiser settings are FD's: AdamW, lr 3e-4 x batch /
    512 reached from 5e-7 over 10 of 300 epochs, then a cosine to 5e-6 (all three scaled by the
    batch), weight decay 0.05, global gradient norm clipped at 3.

    Args:
        teacher: an ``ssl-vit export`` or timm ``local-dir`` folder, an ssl-vit ``.ckpt`` (the
            encoder its paper evaluates) or ``timm:NAME``.
        student: a timm model name and its keyword arguments (``{name: resnet18}``), built
            without weights and without a classifier.
        teacher_weights: weights to load into the teacher's architecture (``--weights`` of
            ``ssl-vit knn``: a ``.safetensors``, a checkpoint, ``random``).
        teacher_made_by: the command that makes a missing teacher, named when it is missing.
        image_size: the crops both see (the recipe's view makes them); default the teacher's
            native resolution.
    """

    #: FD's runs (``configs/pretrain/fd_pretrain__*_300ep.yaml``, README): 300 epochs, 16 GPUs x 128.
    paper_run = PaperRun(epochs=300, steps_per_epoch=1281167 // 2048)
    eval_mode_modules = ("teacher",)
    encoders: ClassVar[dict[str, str]] = {"student": "encoder"}
    collapse_advice = "Check the learning rate, and the teacher's own features (ssl-vit knn TEACHER)."
    #: ``main_fd.py`` L249-251: lr, warm-up lr and minimum lr x global batch / 512.
    lr_batch_divisor = 512
    lr_bounds_scale_with_batch = True

    def __init__(
        self,
        teacher: str,
        student: dict[str, Any],
        teacher_weights: str | None = None,
        teacher_made_by: str | None = None,
        image_size: int | None = None,
        global_weight: float = 1.0,
        dense_weight: float = 1.0,
        smooth_l1_beta: float = 2.0,
        clip_grad: float = 3.0,
        base_lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 10,
        min_lr: float = 5e-6,
        warmup_lr: float = 5e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        scale_to_run: bool = True,
    ) -> None:
        super().__init__(
            student,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            betas=betas,
            warmup_lr=warmup_lr,
            scale_to_run=scale_to_run,
        )
        teacher_encoder, self.teacher_info = load_teacher(teacher, teacher_weights, teacher_made_by)
        self.teacher = teacher_encoder.requires_grad_(False).eval()
        self.image_size = int(image_size or self.teacher.image_size)
        self.hparams["image_size"] = self.image_size  # what the export records as the student's input
        if isinstance(self.encoder, TimmModelEncoder):
            self.encoder.image_size = self.image_size
        (teacher_dim, teacher_map_dim), (student_dim, student_map_dim) = self.check_crops([self.image_size])
        self.global_proj = nn.Linear(student_dim, teacher_dim)
        self.dense_proj = nn.Linear(student_map_dim, teacher_map_dim)
        self._teacher_sha256: str | None = None

    def build_encoder(self, config: dict[str, Any]) -> nn.Module:
        return build_student(config)

    @torch.no_grad()
    def check_crops(self, sizes: Iterable[int]) -> list[tuple[int, int]]:
        """A forward pass of one blank image of each crop size through the teacher and the student
        (in eval mode, so BatchNorm statistics stay); a model that cannot take a size stops the run
        with one line. Returns (pooled dim, map channels) of the teacher and of the student."""
        was_training = self.training
        self.eval()
        dims: list[tuple[int, int]] = []
        try:
            for size in sizes:
                dims, grids = [], []
                if isinstance(self.encoder, ViTEncoder) and self.encoder.image_size != size:
                    raise UserError(
                        f"the student ViT is built for {self.encoder.image_size}-px images, the crops are {size} px; "
                        f"set model.init_args.student.img_size {size}"
                    )
                images = torch.zeros(1, 3, size, size, device=self.device)
                for role, encoder in (("teacher", self.teacher), ("student", self.encoder)):
                    try:
                        pooled, fmap = encoder.pooled_and_map(images)
                    except Exception as err:
                        raise UserError(
                            f"the {role} ({self.model_name(role)}) cannot take the {size}-px RGB crops of data.view: "
                            f"{last_line(err)}; choose a {role} and crop size that fit each other"
                        ) from err
                    dims.append((pooled.shape[1], fmap.shape[1]))
                    grids.append(tuple(fmap.shape[-2:]))
                if grids[1] == (1, 1) and grids[0] != (1, 1):
                    rank_zero_warn(
                        f"the student ({self.model_name('student')}) has a 1 x 1 feature map at {size} px, the "
                        f"teacher {grids[0][0]} x {grids[0][1]}: the dense term sees one vector per image; a stride "
                        "that fits the image (output_stride: 8 for ResNets) or larger crops give it a map "
                        "(docs/distillation.md)"
                    )
        finally:
            self.train(was_training)
        return dims

    def model_name(self, role: str) -> str:
        vit = getattr(self.teacher if role == "teacher" else self.encoder, "vit", None)
        if vit is not None:  # timm's base name alone would hide the shape (4 blocks, 8-px patches...)
            return architecture_name(vit)
        if role == "teacher":
            return str(self.teacher_info["encoder"].get("name") or self.hparams.teacher)
        return self.hparams.encoder["name"]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, _ = batch
        with torch.no_grad():
            teacher_pooled, teacher_map = self.teacher.pooled_and_map(images)
        student_pooled, student_map = self.encoder.pooled_and_map(images)
        global_loss, dense_loss = self.distillation_losses(student_pooled, student_map, teacher_pooled, teacher_map)
        loss = self.hparams.global_weight * global_loss + self.hparams.dense_weight * dense_loss
        self.watch_collapse(student_pooled)
        self.log_dict({"train/global_loss": global_loss, "train/dense_loss": dense_loss})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def distillation_losses(
        self, student_pooled: Tensor, student_map: Tensor, teacher_pooled: Tensor, teacher_map: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The global and dense terms; maps are (B, C, h, w)."""
        beta = self.hparams.smooth_l1_beta
        dense = self.dense_prediction(student_map, teacher_map.shape[-2:])
        dense_loss = feature_distillation_loss(dense, teacher_map.flatten(2).transpose(1, 2), beta)
        return feature_distillation_loss(self.global_proj(student_pooled), teacher_pooled, beta), dense_loss

    def dense_prediction(self, student_map: Tensor, grid: tuple[int, int]) -> Tensor:
        """The student's map resized to the teacher's ``grid`` (bilinear), then each position
        projected to the teacher's width (the two commute): (B, h*w, D_teacher)."""
        if student_map.shape[-2:] != grid:
            student_map = F.interpolate(student_map, size=grid, mode="bilinear", align_corners=False)
        return self.dense_proj(student_map.flatten(2).transpose(1, 2))

    def pictures(self, images: Tensor) -> dict[str, list[Tensor]]:
        """The teacher's whitened patch features (the dense term's targets) and the student's
        prediction of them, on the teacher's first three principal components as R, G, B: the
        same colour is the same feature, so the columns agree as far as dense distillation has
        taught the student."""
        _, teacher_map = self.teacher.pooled_and_map(images)
        _, student_map = self.encoder.pooled_and_map(images)
        grid = tuple(teacher_map.shape[-2:])
        target = teacher_map.flatten(2).transpose(1, 2).float()
        target = F.layer_norm(target, target.shape[-1:])
        colours = pca_colours(target, grid, self.dense_prediction(student_map, grid).float())
        shown = to_display(images)
        columns = [shown, *(F.interpolate(c, size=images.shape[-2:], mode="nearest") for c in colours)]
        title = "teacher's patch features and the student's prediction of them, teacher's PCA as R, G, B"
        return {"patch_pca": Columns(columns, title, ["image", "teacher", "student"])}

    def teacher_sha256(self) -> str:
        """A digest of the teacher's weights: a resumed run must distil the same teacher."""
        if self._teacher_sha256 is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.teacher.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._teacher_sha256 = digest.hexdigest()
        return self._teacher_sha256

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The teacher is an input, like the data: its weights stay where they are (a large teacher
        # would double every checkpoint); its digest makes sure a resumed run uses the same one.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["ssl_vit"]["teacher"] = {"source": self.hparams.teacher, "sha256": self.teacher_sha256()}

    def resume_problem(self, checkpoint: dict[str, Any]) -> str | None:
        """Why this run cannot continue ``checkpoint``: it was distilled from another teacher."""
        saved = checkpoint.get("ssl_vit", {}).get("teacher", {})
        if saved.get("sha256") in (None, self.teacher_sha256()):
            return None
        weights = self.hparams.teacher_weights
        here = f"{self.hparams.teacher}" + (f" with teacher_weights {weights}" if weights else "")
        then, now = saved.get("sha256", "")[:12], self.teacher_sha256()[:12]
        return (
            f"it was distilled from other teacher weights ({saved.get('source')}, SHA-256 {then}...) than this "
            f"run's ({here}, SHA-256 {now}...)"
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        problem = self.resume_problem(checkpoint)
        if problem:  # the command line checks this before it starts; this is for runs started from Python
            raise UserError(f"{problem}; give this run a folder of its own (--trainer.default_root_dir runs/NEW)")
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})


def build_student(config: dict[str, Any]) -> nn.Module:
    """The student from ``{name, **timm keyword arguments}``, without weights or classifier: a ViT
    as ssl-vit's own :class:`~ssl_vit.encoder.ViTEncoder` (so its checkpoints export and evaluate
    as after pretraining), any other model behind :class:`~ssl_vit.eval.encoders.TimmModelEncoder`."""
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if not name:
        raise UserError("model.init_args.student has no name; give a timm model, e.g. student: {name: resnet18}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('resnet*')` lists names"
        raise UserError(f"model.init_args.student: timm has no model {name!r}{hint}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except Exception as err:  # a keyword the architecture does not take, sizes that do not fit
        raise UserError(f"timm cannot build the student {name!r} with {kwargs}: {last_line(err)}") from err
    if isinstance(model, TIMM_VITS):
        return ViTEncoder(name, **kwargs)
    return TimmModelEncoder(model)


def load_teacher(source: str, weights: str | None, made_by: str | None) -> tuple[FrozenEncoder, dict[str, Any]]:
    """The teacher as ``ssl-vit knn`` loads it, or one line saying why not."""
    if not source.startswith(TIMM_PREFIX) and not Path(source).exists():
        if made_by:
            raise UserError(
                f"teacher {source} not found: run `{made_by}` first, or give a teacher trained on other images "
                "(--model.init_args.teacher PATH)"
            )
        raise UserError(f"teacher {missing_source(source)}")
    try:
        return load_evaluated_encoder(source, weights)
    except UserError as err:  # its hints name `ssl-vit knn`'s option; here the recipe's field
        hint = str(err).replace("--weights ", "model.init_args.teacher_weights ")
        raise UserError(f"teacher {source}: {hint}") from err
    except Exception as err:  # a folder or file that is not what it claims to be
        raise UserError(f"teacher {source} does not load: {last_line(err)}") from err


def checkpoint_student(ckpt: dict[str, Any], path: str | Path) -> tuple[nn.Module, str]:
    """A read distillation checkpoint's student, built from its settings with its trained weights."""
    student = build_student(dict(ckpt["hyper_parameters"]["encoder"]))
    weights, role = encoder_weights(ckpt, path)
    student.load_state_dict(weights)
    return student, role


def export_student(
    checkpoint: str | Path, out: str | Path, overwrite: bool = False, onnx: OnnxOptions | None = None
) -> Path:
    """A distillation checkpoint's student as a folder ``timm.create_model("local-dir:OUT",
    pretrained=True)`` loads, written aside and renamed into place: a ViT as ``ssl-vit export``
    writes it, any other model with the crop size it was trained at as its input size."""
    ckpt = read_checkpoint(checkpoint)
    student, role = checkpoint_student(ckpt, checkpoint)
    if isinstance(student, ViTEncoder):
        return write_encoder(student, role, ckpt, checkpoint, out, overwrite=overwrite, onnx=onnx)
    config = dict(ckpt["hyper_parameters"]["encoder"])
    deploy = prepare_deploy(student.model, onnx, data_settings(ckpt), checkpoint) if onnx else None
    size = ckpt["hyper_parameters"]["image_size"]
    record = {"pretrained_cfg": preprocessing_cfg((size, size)), "ssl_vit": provenance(ckpt, checkpoint, role)}
    model_args = {k: v for k, v in config.items() if k != "name"}
    return write_timm_folder(student.model, out, model_args, record, overwrite, reads=[checkpoint], deploy=deploy)


def side_by_side(model: Distill, evaluation: EvaluationCallback | None, summary: dict[str, Any]) -> dict[str, Any]:
    """The end of a distillation run (``distill_summary.json``): teacher and student, each with its
    cost (:func:`~ssl_vit.eval.compare.measure_costs`, at the run's crop size) and its accuracy on
    the run's evaluation data by the run's protocols: the student's as the run's own evaluation
    measured it (``summary``, from ``run_summary``), the teacher's measured here by the same
    settings; and the student at random initialisation, when the run evaluated it at the start."""
    teacher_accuracy = headline_accuracy(None)
    if evaluation is not None and not evaluation.skipped:
        # The same protocol settings, without a feature cache (it would hand back the student's features).
        settings = {**evaluation.settings(), "cache_dir": None}
        if settings["pooling"].startswith("cls") and not model.teacher.has_class_token:
            settings["pooling"] = "mean"  # a teacher without a CLS token (I-JEPA's) is evaluated mean-pooled
        evaluator = Evaluator(**settings)
        with torch.random.fork_rng(devices=[]):
            teacher_accuracy = headline_accuracy(evaluator.run(model.teacher, probe=evaluation.probes_at_ends))
    size = model.image_size
    teacher = {"model": model.model_name("teacher"), "source": model.hparams.teacher}
    student = {"model": model.model_name("student")}
    costs = measure_costs({"teacher": model.teacher, "student": model.encoder}, size)
    rows = {
        "teacher": {**teacher, **costs["teacher"], **teacher_accuracy},
        "student": {**student, **costs["student"], **{k: summary.get(k) for k in teacher_accuracy}},
    }
    if evaluation is not None and evaluation.baseline is not None:
        rows["student at random init"] = {**student, **headline_accuracy(evaluation.baseline)}
    return {
        "title": f"teacher and student after {summary['steps']} steps of distillation ({size}-px images)",
        "caption": f"CPU timings on {CPU_THREADS} thread, both models in this process, timed in turns",
        "image_size": size,
        "steps": summary["steps"],
        "cpu_threads": CPU_THREADS,
        "models": rows,
        "student_over_teacher": cost_ratios(rows["student"], rows["teacher"]),
    }
