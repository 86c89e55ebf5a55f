"""``ssl-vit distill``: the loss against its formula, a teacher that stays frozen, any timm model
(a CNN) through the evaluators, one line for each bad input, and a tiny run end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from unittest.mock import Mock

import pytest
import timm
import torch
import yaml
from timm.models import save_for_hf

from ssl_vit.errors import UserError
from ssl_vit.eval import Evaluator
from ssl_vit.eval.encoders import TimmModelEncoder, load_evaluated_encoder
from ssl_vit.methods import Distill
from ssl_vit.methods.distill import export_student
from tests.conftest import OBJECTIVES, fit_briefly
from tests.fault_injection import fault, in_this_process, write_tiny_shards

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/quickstart/distill.yaml"
TEACHER_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
#: timm's test ResNet (96-d; a 1x1 map at 32 px, which the dense term spreads over the teacher's 4x4 grid).
CNN_STUDENT = {"name": "test_resnet"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random tiny ViT (32 px, 8-px patches, 32-d) as a timm local-dir folder."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TEACHER_ARGS)
    save_for_hf(vit, str(folder), model_args=TEACHER_ARGS, safe_serialization=True)
    return folder


def fd_reference(student: torch.Tensor, teacher: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Wei et al. 2022 from the formula: teacher whitened per token (zero mean, unit biased variance,
    eps 1e-5), smooth-L1 with beta, mean over everything."""
    mean = teacher.mean(-1, keepdim=True)
    whitened = (teacher - mean) / torch.sqrt(((teacher - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
    diff = (student - whitened).abs()
    return torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).mean()


#: Bilinear resampling (half-pixel centres, edges clamped) of a 2-wide map to 4: positions -0.25, 0.25, 0.75, 1.25.
UPSAMPLE_2_TO_4 = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


@pytest.mark.parametrize("student_grid", [4, 2, 1])  # the teacher's grid, a coarser one, a 1x1 map
def test_loss_is_feature_distillation_of_the_pooled_embedding_and_the_map(teacher, student_grid):
    model = Distill(str(teacher), CNN_STUDENT, global_weight=0.3, dense_weight=0.7)
    gen = torch.Generator().manual_seed(1)
    s_pooled, t_pooled = torch.randn(3, 96, generator=gen), 3 * torch.randn(3, 32, generator=gen) + 1
    s_map = torch.randn(3, 96, student_grid, student_grid, generator=gen)
    t_map = 3 * torch.randn(3, 32, 4, 4, generator=gen) - 1

    g, d = model.distillation_losses(s_pooled, s_map, t_pooled, t_map)

    wg, bg = model.global_proj.weight, model.global_proj.bias
    wd, bd = model.dense_proj.weight, model.dense_proj.bias
    # Resized to the teacher's 4x4 grid: a 1x1 map is the same vector everywhere; a 2x2 one is
    # interpolated along rows and columns.
    resized = s_map.expand(-1, -1, 4, 4) if student_grid == 1 else s_map
    if student_grid == 2:
        resized = UPSAMPLE_2_TO_4 @ s_map @ UPSAMPLE_2_TO_4.T
    s_tokens = resized.flatten(2).mT
    torch.testing.assert_close(g, fd_reference(s_pooled @ wg.T + bg, t_pooled))
    torch.testing.assert_close(d, fd_reference(s_tokens @ wd.T + bd, t_map.flatten(2).mT))


@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode at the start of training")  # the teacher, as meant
def test_teacher_gets_no_gradient_stays_in_eval_mode_and_stays_out_of_optimiser_and_checkpoint(teacher, tmp_path):
    model = Distill(str(teacher), CNN_STUDENT)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    modes = []
    model.teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer = fit_briefly(model, steps=2)

    assert modes and not any(modes)  # in eval mode in every training step, though Lightning called .train()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in before.items())
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.teacher.parameters()}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if not n.startswith("teacher.")}

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert len(ckpt["optimizer_states"][0]["state"]) == len(in_optimizer)
    resumed = Distill(str(teacher), CNN_STUDENT)
    resumed.on_load_checkpoint(ckpt)  # puts the teacher back, as Lightning's restore needs every key
    resumed.load_state_dict(ckpt["state_dict"])
    other = Distill(str(teacher), CNN_STUDENT, teacher_weights="random")  # the same architecture, other weights
    with pytest.raises(UserError, match="distilled from other teacher weights"):
        other.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=True))


def test_a_run_folder_is_a_teacher_as_its_newest_checkpoint(tmp_path):
    """As `ssl-vit knn RUN` reads it (the docs: the teacher is anything knn evaluates)."""
    make, views = OBJECTIVES["simclr"]
    fit_briefly(make(), views, steps=1).save_checkpoint(tmp_path / "run/checkpoints/last.ckpt")

    model = Distill(str(tmp_path / "run"), CNN_STUDENT)

    from_checkpoint, _ = load_evaluated_encoder(str(tmp_path / "run/checkpoints/last.ckpt"))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.teacher(images).cls, from_checkpoint.eval()(images).cls)


def test_a_vit_student_exports_as_a_timm_vit_folder(teacher, tmp_path):
    """A ViT student is ssl-vit's own encoder in the checkpoint; its export is a timm ViT."""
    model = Distill(str(teacher), {"name": "vit_tiny_patch16_224", **TEACHER_ARGS})
    fit_briefly(model, steps=1).save_checkpoint(tmp_path / "last.ckpt")

    out = export_student(tmp_path / "last.ckpt", tmp_path / "export")

    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.forward_features(images)[:, 0], model.encoder.eval()(images).cls)
    assert json.loads((out / "config.json").read_text())["ssl_vit"]["objective"] == "Distill"


def test_a_cnn_goes_through_the_evaluators_as_pooled_embedding_and_map_tokens(numbered_shards):
    shards, _ = numbered_shards
    cnn = timm.create_model("test_resnet", pretrained=False, num_classes=0, output_stride=8)
    encoder = TimmModelEncoder(cnn, image_size=16).eval()
    images = torch.randn(2, 3, 16, 16)
    out = encoder(images)
    torch.testing.assert_close(out.cls, cnn.forward_head(cnn.forward_features(images), pre_logits=True))
    assert out.patches.shape == (2, 4, 96)  # the 2x2 map as tokens
    assert (encoder.embed_dim, encoder.patch_size, encoder.num_heads, encoder.has_class_token) == (96, 8, 1, True)

    evaluator = Evaluator(
        str(shards), str(shards), knn_ks=[1], probe_epochs=1, head="linear+attentive", attentive_epochs=1, num_workers=0
    )
    results = evaluator.run(encoder)
    assert results["knn"]["k=1"]["top1"] == 100.0  # every image is its own nearest neighbour
    assert {"probe", "attentive"} <= set(results)


def distill_args(teacher: Path, *overrides: str) -> list[str]:
    return ["distill", "--config", str(RECIPE), f"--model.init_args.teacher={teacher}", *overrides]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--model.init_args.teacher=runs/x/export"], "teacher runs/x/export does not exist; pass an ssl-vit .ckpt"),
        (  # the recipe's teacher, for the user's own images
            ["--model.init_args.teacher=runs/{data}/simclr/export", "--data.train_shards=photos"],
            # the recipe by its full path: the command runs outside the checkout
            f"teacher runs/photos/simclr/export not found: run `ssl-vit pretrain --config {ROOT}/"
            "recipes/quickstart/simclr.yaml --data.train_shards photos` first, or give a teacher trained on other "
            "images (--model.init_args.teacher PATH)",
        ),
        (  # a mistyped data folder is no missing teacher
            ["--model.init_args.teacher=runs/{data}/simclr/export", "--data.train_shards=fotos"],
            "fotos does not exist: give a folder of images",
        ),
        (  # the quickstart's shapes, not written yet: the teacher's command writes them
            ["--model.init_args.teacher=runs/{data}/simclr/export", "--data.train_shards=data/shapes/train"],
            f"teacher runs/shapes/simclr/export not found: run `ssl-vit pretrain --config {ROOT}/recipes/quickstart",
        ),
        (["--model.init_args.teacher=."], "is not a timm model folder"),
        (["--model.init_args.student.name=resnet1"], "timm has no model 'resnet1'; did you mean resnet18"),
        (
            ["--model.init_args.student={name: test_vit, img_size: 64}"],
            "the student ViT is built for 64-px images, the crops are 32 px",
        ),
        (
            ["--model.init_args.student={name: test_resnet, in_chans: 1}"],
            "the student (test_resnet) cannot take the 32-px RGB crops",
        ),
        (["--data.view.init_args.size=48"], "data.view makes 48-px crops, model.init_args.image_size is 32"),
        (
            ["--model.init_args.teacher=timm:test_resnet", "--model.init_args.teacher_weights=w.safetensors"],
            "model.init_args.teacher_weights w.safetensors: weights files load into ViTs only",
        ),
    ],
    ids=[
        "missing teacher",
        "teacher of other data",
        "mistyped data",
        "shapes to come",
        "not a teacher",
        "unknown student",
        "ViT size",
        "channels",
        "crop size",
        "weights",
    ],
)
def test_bad_input_stops_with_one_line_before_any_work(teacher, tmp_path, overrides, expected):
    write_tiny_shards(tmp_path / "photos")
    result = in_this_process(tmp_path, *distill_args(teacher, *overrides))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_a_tiny_distillation_run_ends_with_teacher_and_student_side_by_side(teacher, tmp_path, monkeypatch):
    shards = write_tiny_shards(tmp_path / "shards")
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["trainer"]["callbacks"][0]["init_args"].update(knn_ks=[20], probe_epochs=2, num_workers=1)
    recipe["trainer"].update(max_epochs=1, logger=False)
    recipe["model"]["init_args"].update(student=CNN_STUDENT, image_size=16)  # 16-px crops: a quarter of the work
    recipe["data"]["view"]["init_args"]["size"] = 16
    recipe["data"].update(
        train_shards=str(shards), val_shards=str(shards), batch_size=16, samples_per_epoch=32, num_workers=1
    )
    recipe["data"]["shuffle_buffer"] = 32
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(recipe))
    command = distill_args(teacher)
    command[command.index(str(RECIPE))] = "distill.yaml"
    run = tmp_path / "runs/shards/distill-test_resnet"
    # Stopped while comparing teacher and student: the run is not finished (its summary not written,
    # where it was, which left the comparison missing, or stale, for good).
    with monkeypatch.context() as patch:
        patch.setattr("ssl_vit.cli.training.side_by_side", Mock(side_effect=KeyboardInterrupt))
        stopped = in_this_process(tmp_path, *command)  # a new interpreter would spend seconds on imports
    assert stopped.returncode == 130 and not (run / "summary.json").exists(), stopped.stderr[-3000:]
    result = in_this_process(tmp_path, *command)
    assert result.returncode == 0 and "doing them now" in result.stderr, result.stderr[-3000:]

    summary = json.loads((run / "distill_summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["models"]) == {"teacher", "student", "student at random init"}
    for row in (summary["models"]["teacher"], summary["models"]["student"]):
        assert row["parameters"] > 0 and row["gflops_per_image"] > 0 and row["cpu_images_per_s_batch64"] > 0
        assert row["knn_k20_top1"] is not None and row["probe_top1"] is not None
    assert summary["models"]["student"]["model"] == "test_resnet"
    assert "teacher and student after 2" in result.stdout and "CPU img/s" in result.stdout
    assert f"│ {summary['models']['teacher']['model']} │" in result.stdout  # whole in a log, not cut to 80 columns
    assert " with 1 blocks, 32-d, 8-px patches" in summary["models"]["teacher"]["model"]  # not timm's base name alone

    # The student's export is a timm folder that the evaluators (and timm) load as it was trained.
    exported, info = load_evaluated_encoder(str(run / "export"))
    assert isinstance(exported, TimmModelEncoder) and exported.image_size == 16 and info["method"] == "Distill"
    card = (run / "export/README.md").read_text()
    assert "- features: the last feature map, globally pooled" in card
    assert f"- distilled from the teacher `{teacher}`" in card  # the card named no teacher (config.json did)
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    student = Distill(str(teacher), CNN_STUDENT, image_size=16)
    student.on_load_checkpoint(ckpt)
    student.load_state_dict(ckpt["state_dict"])
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(exported.eval()(images).cls, student.encoder.eval()(images).cls)

    # k-NN given the run's checkpoint names the student's folder (it read the CNN as a ViT encoder)
    knn = in_this_process(tmp_path, "knn", str(run / "checkpoints/last.ckpt"), "--train_shards", str(shards))
    assert knn.returncode == 2 and "is a distillation run's checkpoint" in knn.stderr
    assert f"local-dir:{run / 'export'}" in " ".join(knn.stderr.split())
    knn = in_this_process(tmp_path, "knn", str(run / "export"), "--train_shards", str(shards), "--num_workers", "0")
    assert knn.returncode == 0 and "; the model's own pooling, 16-px images;" in knn.stdout, knn.stderr[-3000:]

    # `ssl-vit export RUN` writes the same student (a CNN, not the teacher's ViT), here with its ONNX model.
    standalone = in_this_process(tmp_path, "export", str(run), "again", "--onnx")
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    again, _ = load_evaluated_encoder(str(tmp_path / "again"))
    torch.testing.assert_close(again.eval()(images).cls, exported(images).cls)
    assert (tmp_path / "again/model.onnx").exists()
    assert "failed" not in standalone.stderr
    teacher_role = in_this_process(tmp_path, "export", str(run), "teacher-out", "--role", "teacher")
    assert teacher_role.returncode == 2 and "holds its student only" in teacher_role.stderr  # it wrote the student

    # The same teacher written another way is the same run, finished (it was "other settings: model.teacher").
    slashed = [arg + "/" if arg.startswith("--model.init_args.teacher=") else arg for arg in command]
    finished = in_this_process(tmp_path, *slashed)
    assert finished.returncode == 0 and "is finished" in finished.stderr, finished.stderr[-3000:]

    # Continuing it with another teacher is refused before anything is written (Lightning's config.yaml included).
    before = sorted(run.rglob("*"))
    again = [*command, "--model.init_args.teacher_weights=random", "--trainer.max_epochs=2", "--trainer.logger=true"]
    other = in_this_process(tmp_path, *again)
    assert other.returncode == 2 and "it was distilled from other teacher weights" in other.stderr, other.stderr
    given = in_this_process(tmp_path, *again, f"--ckpt_path={run / 'checkpoints/last.ckpt'}")  # named, not found
    assert given.returncode == 2 and "cannot be resumed by this run: it was distilled from other" in given.stderr
    assert sorted(run.rglob("*")) == before

    # A run whose student collapses fails as `ssl-vit distill`, pointing to what to check; its export warns.
    collapsed = in_this_process(
        tmp_path, *command, "--trainer.default_root_dir=runs/collapsed", *fault("CollapsedFrom", step=0)
    )
    assert collapsed.returncode == 3, collapsed.stderr[-3000:]
    assert "ssl-vit distill: run failed" in collapsed.stderr
    assert "docs/distillation.md#when-the-student-collapses" in collapsed.stderr
    warned = in_this_process(tmp_path, "export", "runs/collapsed", "collapsed-export")
    assert warned.returncode == 0 and "checkpoints/last.ckpt ends a run that failed: its outputs" in warned.stderr
    assert "UserWarning" not in warned.stderr and "which ends a failed run" in warned.stdout  # and after the rest


def test_a_student_whose_map_is_one_vector_is_warned_of(teacher):
    """A stride-32 CNN at 32 px: the dense term would see one vector per image, with no word."""
    with pytest.warns(UserWarning, match=r"\(test_resnet\) has a 1 x 1 feature map at 32 px, the teacher 4 x 4"):
        Distill(str(teacher), CNN_STUDENT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Distill(str(teacher), {**CNN_STUDENT, "output_stride": 8})  # a 4 x 4 map, as the teacher's
