"""DINOv3's Gram anchoring against references written here from dinov3's formulas: the Gram loss,
its weight and Gram-teacher schedule, and a training step that is DINOv2's plus the weighted term."""

import itertools
import json
import math

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_vit import export_encoder
from ssl_vit.checkpoint import load_checkpoint_encoder, write_verdict
from ssl_vit.data import MixedResolutionViews, MultiCropViews, ShardDataset, resolve_shards
from ssl_vit.errors import UserError
from ssl_vit.losses import gram_loss
from ssl_vit.methods import DINOv2, DINOv3
from tests.conftest import TINY_ENCODER, fit_briefly
from tests.fault_injection import KNN_AT_BOTH_ENDS, pretrain_recipe_briefly, write_tiny_shards
from tests.test_dinov2 import attach_trainer, masked_step_inputs, tiny
from tests.test_encoder import TINY_ROPE_ENCODER

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


def test_dinov3s_own_architecture_trains_and_its_export_loads_in_timm_by_that_name(tmp_path):
    # timm's vit_small_patch16_dinov3 (RoPE, storage tokens, layer scale) at a tiny size, CLS pooling
    # as DINOv3 evaluates; iBOT's masks and the local crops go through its rotary positions.
    method = DINOv3({**TINY_ROPE_ENCODER, "global_pool": "token"}, gram_start=0.5, **HEAD)
    checkpoint = tmp_path / "run" / "last.ckpt"
    fit_briefly(method, "multicrop", steps=4).save_checkpoint(checkpoint)
    out = export_encoder(checkpoint, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architecture"] == "vit_small_patch16_dinov3"
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    encoder, _ = load_checkpoint_encoder(checkpoint)
    for size in (32, 48):  # RoPE's positions at the training size and above it
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), encoder.eval()(x).tokens)
            torch.testing.assert_close(model(x), encoder(x).cls)


def test_the_gram_teacher_reads_its_higher_resolution_crops_resampled_to_the_students_grid(monkeypatch):
    # ssl_meta_arch.py get_gram_teacher_output: the Gram teacher's patch tokens on the Gram crops,
    # as an (h, w) map resampled bicubically (align_corners false, no antialias) to the student's.
    torch.manual_seed(0)
    method = DINOv3(TINY_ENCODER, gram_start=0.5, gram_ramp=0.0, centering="mean", **HEAD)
    masks, crops = masked_step_inputs(monkeypatch, b=3)
    gram_crops = [torch.randn(3, 3, 64, 64) for _ in range(2)]  # 2x the global crops: a 16 x 16 grid
    attach_trainer(method, step=60, total_steps=100)
    for quiet in ("log", "log_dict", "watch_collapse"):
        monkeypatch.setattr(method, quiet, lambda *a, **k: None)
    monkeypatch.setattr(method, "teacher_temperature", lambda: 0.05)
    with_gram_crops = method.training_step((crops + gram_crops, None), 0)
    global_crops = torch.cat(crops[:2])
    student = method.encoder(global_crops, mask=masks, mask_token=method.mask_token).patches
    with torch.no_grad():
        teacher = method.gram_teacher(torch.cat(gram_crops)).patches  # (6, 256, D)
        grid = teacher.transpose(1, 2).reshape(6, -1, 16, 16)
        resampled = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=False)
        target = resampled.reshape(6, -1, 64).transpose(1, 2)
        own = method.gram_teacher(global_crops).patches
    without = method.training_step((crops, None), 0)
    expected_change = 2.0 * (
        reference_gram_loss(student, target, True, False) - reference_gram_loss(student, own, True, False)
    )
    torch.testing.assert_close(with_gram_crops - without, expected_change, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_gram_crops, without)


def test_dinov2_refuses_gram_crops_it_has_no_teacher_for(monkeypatch):
    method = DINOv2(TINY_ENCODER, **HEAD)
    attach_trainer(method, step=0)
    _, crops = masked_step_inputs(monkeypatch, b=2)
    with pytest.raises(UserError, match=r"has no Gram teacher: drop data\.view\.init_args\.gram_size"):
        method.training_step((crops + [torch.randn(2, 3, 64, 64)] * 2, None), 0)


@pytest.mark.parametrize("on_device", [False, True])
def test_gram_crops_are_the_global_crops_regions_undistorted_at_their_own_size(on_device):
    # augmentations.py with gram_teacher_crops_size and gram_teacher_no_distortions: one crop at the
    # larger size, resized down for the student (then distorted), kept undistorted for the Gram teacher.
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    image = Image.fromarray(
        np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (96, 1)), np.full((96, 96), 90.0)], -1).astype(np.uint8)
    )
    view = MultiCropViews(32, 16, 2, global_blur_p=(0.0, 0.0), augment_on_device=on_device, gram_size=64)
    assert view.sizes == (32, 16, 64)
    torch.manual_seed(0)
    crops = view(image)
    assert [c.shape[-1] for c in crops] == [32, 32, 16, 16, 64, 64]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    gram = [c * std + mean for c in crops[4:]]  # back to [0, 1]
    if on_device:  # the loader hands the student's crops over undistorted (uint8): they are the Gram crops, smaller
        for student, big in zip(crops[:2], gram, strict=True):
            small = F.interpolate(big[None], size=(32, 32), mode="bicubic", antialias=True)[0]
            assert (student / 255 - small).abs().mean() < 0.02
        assert view.on_device([torch.zeros(1, 3, 32, 32, dtype=torch.uint8)] * 4 + crops[4:])[4:] == crops[4:]
    with pytest.raises(UserError, match="gram_size 32 must exceed global_size 32"):
        MultiCropViews(32, 16, 2, gram_size=32)


def test_the_high_resolution_stage_continues_a_finished_run_from_the_command_line(tmp_path):
    """recipes/quickstart/dinov3_high_res.yaml as a user runs it, shrunk: it starts from the first
    stage's checkpoint, and its Gram teacher is that checkpoint's EMA teacher throughout."""
    encoder = {**TINY_ROPE_ENCODER, "global_pool": "token", "init_values": 1.0}
    shards = write_tiny_shards(tmp_path / "photos")
    stage = {"encoder": {**encoder, "img_size": 64}, **HEAD}
    recipe = "recipes/quickstart/dinov3_high_res.yaml"
    result = pretrain_recipe_briefly(tmp_path, recipe, shards, stage)
    assert result.returncode == 2 and "init_from runs/{data}/dinov3/checkpoints/last.ckpt is" in result.stderr
    assert "runs/photos/dinov3/checkpoints/last.ckpt for this data, which does not exist" in result.stderr
    # the first stage's run on the same data, where the quickstart puts it
    first = tmp_path / "runs/photos/dinov3/checkpoints/last.ckpt"
    first.parent.mkdir(parents=True)
    fit_briefly(DINOv3(encoder, **HEAD), "multicrop", steps=2).save_checkpoint(first)
    verdict = "its outputs stayed collapsed (2 of 2 steps)"  # as a failed run records it beside its checkpoint
    write_verdict(first, 2, None, verdict)
    result = pretrain_recipe_briefly(tmp_path, recipe, shards, stage, callbacks=[KNN_AT_BOTH_ENDS])
    assert result.returncode == 0, result.stderr[-3000:]  # a 2-step run is checked before its first update only
    assert f"(init_from); the run it ends failed: {verdict}" in " ".join(result.stderr.split())
    at_start = [line for line in result.stderr.splitlines() if "collapsed at step 0" in line]
    assert all("the weights it starts from (runs/photos/dinov3/" in line for line in at_start), at_start
    run = tmp_path / "runs/photos/dinov3_high_res"
    before = torch.load(first, weights_only=True)["state_dict"]
    after = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key, value in before.items():
        if key.startswith("teacher_encoder."):
            torch.testing.assert_close(after[key.replace("teacher_encoder.", "gram_teacher.", 1)], value)
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    vit = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    assert vit.patch_embed.img_size == (64, 64)
    # its starting point is the first stage's weights, and the run says so, not "random init"
    assert "init_from top-1 %" in result.stdout and "random init" not in result.stdout
    assert "init_from_results" in json.loads((run / "checkpoints/last.knn.json").read_text())


def mixed_views(on_device: bool = False) -> MixedResolutionViews:
    args = dict(num_local=1, global_blur_p=(0.0, 0.0), augment_on_device=on_device)
    sets = [(32, 16, 48), (48, 16, 64), (48, 24, 64)]
    views = [MultiCropViews(g, local, gram_size=gram, **args) for g, local, gram in sets]
    return MixedResolutionViews(views, [0.5, 0.3, 0.2])


def test_mixed_resolutions_draw_one_crop_size_set_per_batch_with_the_configs_ratios():
    # CombinedDataLoader: one loader (crop-size set) per iteration, with probabilities
    # global_local_crop_pairs_ratios.
    mix = mixed_views()
    drawn = []
    for j in range(3000):
        mix.start_batch(f"0:0:{j}")
        drawn.append(mix.views.index(mix.current))
    assert np.allclose(np.bincount(drawn) / len(drawn), [0.5, 0.3, 0.2], atol=0.03)
    mix.start_batch("0:0:7")
    first = mix.current
    mix.start_batch("0:0:8")
    mix.start_batch("0:0:7")
    assert mix.current is first  # the batch's key alone decides
    assert mix.sizes == (32, 16, 48, 64, 24) and mix.decode_side == max(v.decode_side for v in mix.views)


def batch_sizes(dataset: ShardDataset, num_workers: int, batches: int) -> list[tuple[int, ...]]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=dataset.batch_size, num_workers=num_workers)
    return [tuple(crop.shape[-1] for crop in crops) for crops, _ in itertools.islice(loader, batches)]


def test_every_rank_and_worker_crops_a_batch_at_the_sizes_its_place_in_the_epoch_draws(tmp_path):
    # As the official GLOBAL_HOMOGENEOUS mode: the same seeded draw on every rank, a whole batch at
    # one size set; here keyed on the batch's place in the epoch, whichever worker makes it.
    urls, _ = resolve_shards(str(write_tiny_shards(tmp_path / "shards")))
    mix = mixed_views()
    expected = []
    for j in range(8):
        mix.start_batch(f"0:0:{j}")
        s = mix.current.sizes
        expected.append((s[0], s[0], s[1], s[2], s[2]))
    assert len(set(expected)) > 1  # the draw varies over these batches
    ranks = [ShardDataset(urls, mixed_views(), batch_size=4, batches_per_epoch=8, rank=r, world_size=2) for r in (0, 1)]
    assert batch_sizes(ranks[0], 2, 8) == batch_sizes(ranks[1], 2, 8) == expected
    assert batch_sizes(ranks[0], 0, 8) == expected


def test_mixed_resolutions_finish_a_batch_on_the_device_with_the_view_that_made_it():
    mix = mixed_views(on_device=True)
    for i, view in enumerate(mix.views):
        view.on_device = lambda crops, i=i: i
    for i, (g, local, gram) in enumerate([(32, 16, 48), (48, 16, 64), (48, 24, 64)]):
        crops = [torch.zeros(2, 3, side, side, dtype=torch.uint8) for side in (g, g, local, gram, gram)]
        assert mix.on_device(crops) == i


def test_mixed_resolutions_refuse_ratios_that_do_not_fit_their_views_in_one_line():
    views = [MultiCropViews(32, 16, 1), MultiCropViews(48, 16, 1)]
    with pytest.raises(UserError, match="2 views and 3 ratios"):
        MixedResolutionViews(views, [0.5, 0.3, 0.2])
    with pytest.raises(UserError, match="must be non-negative and sum to 1"):
        MixedResolutionViews(views, [0.5, 0.3])
    with pytest.raises(UserError, match="crops of the same sizes"):
        MixedResolutionViews([MultiCropViews(32, 16, 1), MultiCropViews(32, 16, 2)], [0.5, 0.5])


@pytest.mark.parametrize("flip", [True, False])
def test_multi_crop_views_flip_only_when_asked(flip):
    # DINOv3's configs set horizontal_flips: false for every crop, the Gram teacher's included.
    left_bright = np.zeros((64, 64, 3), dtype=np.uint8)
    left_bright[:, :32] = 255
    view = MultiCropViews(
        32,
        16,
        2,
        global_scale=(0.9, 1.0),
        local_scale=(0.9, 1.0),
        augment_on_device=True,
        gram_size=48,
        horizontal_flip=flip,
    )
    torch.manual_seed(0)
    flipped = []
    for _ in range(20):
        for crop in view(Image.fromarray(left_bright)):
            half = crop.shape[-1] // 2
            flipped.append(bool(crop[..., :half].float().mean() < crop[..., half:].float().mean()))
    assert any(flipped) if flip else not any(flipped)


def test_the_lr_can_rise_by_a_half_cosine_as_the_high_resolution_stage():
    # build_schedulers_v2 with lr start 0, peak 0, end E, cosine_epochs W: E (1 - cos(pi t / W)) / 2, then E.
    linear, cosine = DINOv3(TINY_ENCODER, **HEAD), DINOv3(TINY_ENCODER, lr_warmup="cosine", **HEAD)
    for method in (linear, cosine):
        attach_trainer(method, step=0)  # 100 epochs of 10 steps: the 10 warm-up epochs are 100 steps
        method._trainer.world_size = 1
    peak = cosine.learning_rate(100, 1024)
    assert peak == pytest.approx(4e-3)
    for step in (0, 1, 30, 50, 99):
        assert cosine.learning_rate(step, 1024) == pytest.approx(peak * (1 - math.cos(math.pi * step / 100)) / 2)
        assert linear.learning_rate(step, 1024) == pytest.approx(peak * step / 100)


def test_the_teacher_momentum_can_be_held_as_the_high_resolution_stage():
    # high_res_adapt: momentum start = peak = end = 0.999; DINOv2's final_momentum_teacher defaults to 1.
    held = tiny(teacher_momentum=0.999, teacher_momentum_end=0.999, scale_to_run=False)
    default = tiny(teacher_momentum=0.999, scale_to_run=False)
    for method in (held, default):
        attach_trainer(method, step=0)
    assert [held.ema_momentum(s) for s in (0, 500, 999)] == pytest.approx([0.999] * 3)
    assert default.ema_momentum(0) == pytest.approx(0.999) and default.ema_momentum(1000) == pytest.approx(1.0)


def test_the_ema_teacher_runs_in_eval_mode_so_its_targets_carry_no_rope_jitter():
    """ssl_meta_arch's teacher.eval(): DINOv3's RoPE coordinate rescaling (``rope_rescale_coords``,
    2 in every ImageNet recipe) is a training-mode augmentation of the student only."""
    torch.manual_seed(0)
    method = DINOv3({**TINY_ROPE_ENCODER, "rope_rescale_coords": 2.0}, gram_start=0.5, **HEAD)
    modes = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, module, *args):
            modes.append((module.encoder.training, module.teacher_encoder.training, module.teacher_head.training))

    fit_briefly(method, "multicrop", steps=2, callbacks=[Modes()])
    assert modes == [(True, False, False)] * 2
    method.train()  # as the pictures and evaluation callbacks put it back after their own eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(method.encoder(x).cls, method.encoder(x).cls)  # the student's positions jitter
        torch.testing.assert_close(method.teacher_encoder(x).cls, method.teacher_encoder(x).cls, rtol=0, atol=0)
