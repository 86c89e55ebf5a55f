"""DINOv3's Gram anchoring against references written here from dinov3's formulas: the Gram loss,
its weight and Gram-teacher schedule, and a training step that is DINOv2's plus the weighted term."""

import math

import lightning as L
import pytest
import torch

from ssl_vit.errors import UserError
from ssl_vit.losses import gram_loss
from ssl_vit.methods import DINOv2, DINOv3
from tests.conftest import TINY_ENCODER, fit_briefly
from tests.test_dinov2 import attach_trainer, masked_step_inputs

HEAD = dict(out_dim=32, hidden_dim=24, bottleneck_dim=16)


def reference_gram_loss(student, teacher, image_level, remove_neg):
    """gram_loss.py: normalise each token, one similarity matrix per image (or per batch), negatives
    zeroed if asked, mean of the squared differences over every entry."""
    if not image_level:
        student, teacher = student.reshape(1, -1, student.shape[-1]), teacher.reshape(1, -1, teacher.shape[-1])
    total, count = 0.0, 0
    for s, t in zip(student, teacher, strict=True):
        s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        gs, gt = s @ s.T, t @ t.T
        if remove_neg:
            gs, gt = torch.where(gs < 0, 0.0, gs), torch.where(gt < 0, 0.0, gt)
        total = total + ((gs - gt) ** 2).sum()
        count += gs.numel()
    return total / count


@pytest.mark.parametrize("image_level", [True, False])
@pytest.mark.parametrize("remove_neg", [False, True])
def test_gram_loss_is_the_mse_of_the_normalised_patches_gram_matrices(image_level, remove_neg):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 10, 8), torch.randn(3, 10, 8) * 5
    expected = reference_gram_loss(student, teacher, image_level, remove_neg)
    torch.testing.assert_close(gram_loss(student, teacher, image_level, remove_neg), expected)


def test_weight_and_gram_teacher_follow_the_anchoring_schedule():
    method = DINOv3(TINY_ENCODER, gram_start=0.5, gram_ramp=0.04, gram_update_every=0.05, gram_max_updates=2, **HEAD)
    attach_trainer(method, step=0, total_steps=200)  # start at step 100, a rise over 8 steps, updates every 10
    # linear_warmup_cosine_decay(start 0, peak 0, end 2, ...): 0, then peak -> end by a half cosine, then end.
    expected = [
        0.0 if i < 100 else 2.0 + 0.5 * (0.0 - 2.0) * (1 + math.cos(math.pi * min(i - 100, 8) / 8)) for i in range(200)
    ]
    assert [method.gram_weight(i) for i in range(200)] == pytest.approx(expected)
    assert [i for i in range(200) if method.takes_ema_teacher(i)] == [100, 110, 120]


def test_the_gram_teacher_is_the_ema_teacher_of_the_phase_start_and_stays(tmp_path):
    torch.manual_seed(0)
    method = DINOv3(TINY_ENCODER, gram_start=0.5, gram_max_updates=0, **HEAD)
    seen, modes = {}, []
    method.gram_teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))

    class SnapshotTeacher(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # runs before the module's hook
            seen[trainer.global_step] = {k: v.clone() for k, v in module.teacher_encoder.state_dict().items()}

    fit_briefly(method, "multicrop", steps=4, callbacks=[SnapshotTeacher()])
    gram, final = method.gram_teacher.state_dict(), method.teacher_encoder.state_dict()
    for key, value in gram.items():
        torch.testing.assert_close(value, seen[2][key], rtol=0, atol=0)  # taken before step 2 of 4, kept
    assert any(not torch.equal(gram[k], final[k]) for k in gram)  # the EMA teacher moved on; the Gram one did not
    assert not any(p.requires_grad for p in method.gram_teacher.parameters())
    assert modes == [False, False]  # run in steps 2 and 3 only, in eval mode as the official train() keeps it


def test_step_is_dinov2s_plus_the_weighted_gram_term(monkeypatch):
    torch.manual_seed(0)
    method = DINOv3(TINY_ENCODER, gram_start=0.5, gram_ramp=0.0, centering="mean", **HEAD)
    with torch.no_grad():  # teachers that differ from the student, so that no term is trivial
        for teacher in (method.teacher_encoder, method.gram_teacher):
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        method.mask_token.normal_()
    plain = DINOv2(TINY_ENCODER, centering="mean", **HEAD)
    plain.load_state_dict({k: v for k, v in method.state_dict().items() if not k.startswith("gram_teacher.")})
    masks, crops = masked_step_inputs(monkeypatch, b=3)
    for module in (method, plain):
        attach_trainer(module, step=60, total_steps=100)  # in the Gram phase, after the rise: weight 2
        for quiet in ("log", "log_dict", "watch_collapse"):
            monkeypatch.setattr(module, quiet, lambda *a, **k: None)
        monkeypatch.setattr(module, "teacher_temperature", lambda: 0.05)
    loss = method.training_step((crops, None), 0)
    global_crops = torch.cat(crops[:2])
    student = method.encoder(global_crops, mask=masks, mask_token=method.mask_token).patches
    with torch.no_grad():
        target = method.gram_teacher(global_crops).patches
    expected = plain.training_step((crops, None), 0) + 2.0 * reference_gram_loss(student, target, True, False)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    attach_trainer(method, step=49, total_steps=100)  # before the phase: DINOv2's step alone
    attach_trainer(plain, step=49, total_steps=100)
    torch.testing.assert_close(method.training_step((crops, None), 0), plain.training_step((crops, None), 0))


def test_a_gram_start_outside_the_run_stops_with_one_line():
    with pytest.raises(UserError, match=r"gram_start 1\.5 is a fraction of the run"):
        DINOv3(TINY_ENCODER, gram_start=1.5, **HEAD)
