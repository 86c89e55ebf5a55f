"""DINOv3's distillation (facebookresearch/dinov3 multidist_meta_arch.py): the DINO, iBOT and
KoLeo terms against formulas written out here, with the frozen teacher's own encoder and heads
and Sinkhorn-Knopp targets; a teacher that never changes; one line for each teacher that cannot teach."""

import re
from pathlib import Path

import pytest
import timm
import torch

from ssl_vit import export_encoder
from ssl_vit.errors import UserError
from ssl_vit.methods import DINO, MAE, DINOv2, DINOv3Distill
from tests.conftest import TINY_ENCODER, fit_briefly
from tests.fault_injection import pretrain_recipe_briefly, write_tiny_shards
from tests.test_dinov2 import masked_step_inputs, reference_student_loss

#: A student narrower and shallower than the teacher (TINY_ENCODER: 64-d, 2 blocks), same 4-px patches.
STUDENT = {**TINY_ENCODER, "embed_dim": 32, "depth": 1}


def save(method, path: Path, view: str = "multicrop") -> Path:
    trainer = fit_briefly(method, view=view, steps=1)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def dinov2_teacher(tmp_path_factory) -> Path:
    """A DINOv2 checkpoint with an iBOT head of its own sizes, its EMA teacher moved away from
    its student, so that a distillation that read the wrong modules would show."""
    torch.manual_seed(0)
    method = DINOv2(
        TINY_ENCODER,
        out_dim=32,
        hidden_dim=24,
        bottleneck_dim=16,
        ibot_separate_head=True,
        ibot_out_dim=20,
        ibot_hidden_dim=12,
        ibot_bottleneck_dim=8,
    )
    with torch.no_grad():
        for p in [*method.teacher_encoder.parameters(), *method.teacher_head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return save(method, tmp_path_factory.mktemp("teacher") / "dinov2.ckpt")


def reference_sinkhorn(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """SwAV/DINOv2's Sinkhorn-Knopp from the formula: Q = exp(logits / temp)^T (K x B), scaled to
    sum 1, then alternately rows to 1/K and columns to 1/B; returned per sample summing to 1."""
    q = torch.exp(logits / temp).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def test_loss_is_dinov2s_against_the_frozen_teachers_heads_with_sinkhorn_targets(dinov2_teacher, monkeypatch):
    torch.manual_seed(1)
    method = DINOv3Distill(str(dinov2_teacher), STUDENT)
    ckpt = torch.load(dinov2_teacher, weights_only=True)
    for name in ("teacher_encoder", "teacher_head", "teacher_ibot_head"):  # the checkpoint's teacher, as saved
        for key, value in getattr(method, name).state_dict().items():
            torch.testing.assert_close(value, ckpt["state_dict"][f"{name}.{key}"], rtol=0, atol=0)
    with torch.no_grad():
        method.mask_token.normal_()
    masks, crops = masked_step_inputs(monkeypatch, b=4)
    method._trainer = None
    monkeypatch.setattr(DINOv3Distill, "teacher_temperature", lambda self: 0.05)
    for quiet in ("log", "log_dict", "watch_collapse"):
        monkeypatch.setattr(DINOv3Distill, quiet, lambda *a, **k: None)
    loss = method.training_step((crops, None), 0)

    g = torch.cat(crops[:2])
    with torch.no_grad():
        t = method.teacher_encoder(g)
        t_cls = reference_sinkhorn(method.teacher_head(t.cls), 0.05).chunk(2)
        t_patch = reference_sinkhorn(method.teacher_ibot_head(t.patches[masks]), 0.05)
    # the student's own iBOT head against the teacher's
    torch.testing.assert_close(
        loss, reference_student_loss(method, crops, masks, t_cls, t_patch, method.ibot_head), atol=1e-5, rtol=1e-5
    )


@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode at the start of training")  # the teacher, as meant
def test_the_teacher_never_changes_nor_trains_and_the_student_exports(dinov2_teacher, tmp_path):
    method = DINOv3Distill(str(dinov2_teacher), STUDENT, freeze_last_layer_epochs=0)
    teacher = {k: v.clone() for k, v in method.state_dict().items() if k.startswith("teacher_")}
    student = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    trainer = fit_briefly(method, view="multicrop", steps=2)

    assert not method.ema_targets
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    for key, value in method.state_dict().items():
        if key.startswith("teacher_"):
            torch.testing.assert_close(value, teacher[key], rtol=0, atol=0, msg=key)
    teacher_params = [*method.teacher_encoder.parameters(), *method.teacher_head.parameters()]
    assert not any(p.requires_grad or p.grad is not None or id(p) in optimised for p in teacher_params)
    assert not method.teacher_encoder.training and method.encoder.training
    assert any(not torch.equal(v, student[k]) for k, v in method.encoder.state_dict().items())

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = export_encoder(tmp_path / "last.ckpt", tmp_path / "export")
    vit = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    assert vit.embed_dim == 32 and len(vit.blocks) == 1  # the student, not the teacher


def test_a_dino_teacher_teaches_without_ibot(tmp_path):
    torch.manual_seed(0)
    dino = save(DINO(TINY_ENCODER, out_dim=32, hidden_dim=24, bottleneck_dim=16), tmp_path / "dino.ckpt")
    method = DINOv3Distill(str(dino), STUDENT)
    assert method.hparams.ibot_loss_weight == 0 and method.teacher_ibot_head is method.teacher_head
    with pytest.raises(UserError, match="DINO checkpoint, which has no patch-level"):
        DINOv3Distill(str(dino), STUDENT, ibot_loss_weight=1.0)


def test_teachers_that_cannot_teach_stop_with_one_line(dinov2_teacher, tmp_path):
    with pytest.raises(UserError, match="is not a checkpoint file"):
        DINOv3Distill(str(tmp_path / "missing.ckpt"), STUDENT)
    made_by = "ssl-vit pretrain --config recipes/quickstart/dinov2.yaml --data.train_shards photos"
    with pytest.raises(UserError, match=f"missing.ckpt not found: run `{re.escape(made_by)}` first"):
        DINOv3Distill(str(tmp_path / "missing.ckpt"), STUDENT, teacher_made_by=made_by)
    mae = save(MAE(TINY_ENCODER, decoder_dim=32, decoder_depth=1, decoder_heads=2), tmp_path / "mae.ckpt", "single")
    with pytest.raises(UserError, match="trained with MAE; DINOv3's distillation needs a teacher with DINO heads"):
        DINOv3Distill(str(mae), STUDENT)
    with pytest.raises(UserError, match="has 4-px patches, the student 8-px"):
        DINOv3Distill(str(dinov2_teacher), {**STUDENT, "patch_size": 8})


def test_the_quickstart_recipe_runs_from_the_command_line_and_exports_the_student(dinov2_teacher, tmp_path):
    """As a user runs it (LightningCLI records only DINOv3Distill's own arguments): a few steps of
    the quickstart, shrunk, ending with the student's export and its health and collapse watch."""
    shards = write_tiny_shards(tmp_path / "shards")
    student = {"teacher": str(dinov2_teacher), "encoder": STUDENT}
    result = pretrain_recipe_briefly(tmp_path, "recipes/quickstart/dinov3_distill.yaml", shards, student)
    assert result.returncode == 0, result.stderr[-3000:]  # a 2-step run is checked before its first update only
    vit = timm.create_model(f"local-dir:{tmp_path / 'runs/shards/dinov3distill/export'}", pretrained=True)
    assert vit.embed_dim == STUDENT["embed_dim"]
