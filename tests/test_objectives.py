"""SimMIM, DINO, MoCo v3 and SimCLR against short references written from the official formulas."""

import csv
import math
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from ssl_vit.data import MultiCropViews, TwoViews
from ssl_vit.ema import ema_update
from ssl_vit.encoder import ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.guards import CollapseWatch
from ssl_vit.heads import DINOHead
from ssl_vit.losses import (
    dino_loss,
    dino_teacher_probs,
    ibot_patch_loss,
    info_nce,
    koleo_loss,
    masked_pixel_l1,
    nt_xent,
    sinkhorn_knopp_teacher_probs,
)
from ssl_vit.masking import block_patch_mask, ibot_masks, multi_block_mask
from ssl_vit.methods import DINO, MoCoV3, SimCLR, SimMIM
from ssl_vit.methods.dino import embed_crops
from ssl_vit.schedules import cosine_to, linear_warmup_then_constant
from tests.conftest import OBJECTIVES, TINY_ENCODER, fit_briefly, random_images

# ----------------------------------------------------------------------------- SimMIM


def test_block_mask_ratio_blocks_and_independence():
    mask = block_patch_mask(16, (8, 8), patch_size=4, mask_patch_size=8, mask_ratio=0.6)
    assert mask.shape == (16, 8, 8) and mask.dtype == torch.bool
    blocks = mask.view(16, 4, 2, 4, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # each 2x2 block is all masked or all visible
    per_sample = blocks[:, :, 0, :, 0].flatten(1).sum(1)
    assert (per_sample == math.ceil(16 * 0.6)).all()
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1


def test_masked_pixel_l1_matches_reference():
    pred, images = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) < 0.5).float()
    terms = [
        abs(pred[b, c, i, j] - images[b, c, i, j])
        for b in range(2)
        for c in range(3)
        for i in range(8)
        for j in range(8)
        if mask[b, 0, i, j]
    ]
    torch.testing.assert_close(masked_pixel_l1(pred, images, mask), sum(terms) / len(terms), rtol=1e-4, atol=1e-6)
    pred2 = pred + (1 - mask) * 50  # visible pixels do not count
    torch.testing.assert_close(masked_pixel_l1(pred2, images, mask), masked_pixel_l1(pred, images, mask))


def test_simmim_encoder_sees_all_positions_and_loss_is_on_masked_pixels():
    model = SimMIM(TINY_ENCODER, mask_patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    out = model(x)
    assert out.pred.shape == x.shape and out.mask.shape == (2, 8, 8)
    pixel_mask = out.mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    torch.testing.assert_close(out.loss, masked_pixel_l1(out.pred, x, pixel_mask))
    tokens = model.encoder(x, mask=out.mask, mask_token=model.mask_token).patches
    assert tokens.shape == (2, 64, 64)  # every position, masked ones as the mask token


# ----------------------------------------------------------------------------- DINO


def reference_dino_loss(student, teacher, center, n_crops, t_s, t_t):
    s_chunks, t_chunks = student.chunk(n_crops), teacher.chunk(2)
    losses = []
    for i, t in enumerate(t_chunks):
        p = torch.exp((t - center) / t_t) / torch.exp((t - center) / t_t).sum(-1, keepdim=True)
        for v, s in enumerate(s_chunks):
            if v != i:
                log_q = s / t_s - torch.logsumexp(s / t_s, dim=-1, keepdim=True)
                losses.append((-(p * log_q).sum(-1)).mean())
    assert len(losses) == 2 * n_crops - 2
    return sum(losses) / len(losses)


def test_dino_loss_skips_same_view_pairs_and_averages_over_pairs():
    b, k, n_crops = 4, 32, 6
    student, teacher, center = torch.randn(n_crops * b, k), torch.randn(2 * b, k), torch.randn(1, k) * 0.1
    got = dino_loss(student, dino_teacher_probs(teacher, center, 0.04), n_crops, 0.1)
    torch.testing.assert_close(got, reference_dino_loss(student, teacher, center, n_crops, 0.1, 0.04))


def reference_sinkhorn_knopp(scores, eps, iterations):
    """SwAV's Algorithm 1 (Caron et al., 2020), on exp(scores / eps) of the whole batch (B, K):
    Q (K x B) scaled to total 1, then alternately rows to sum 1/K and columns 1/B; returned as
    (B, K) assignments whose rows sum to 1."""
    q = np.exp(scores.double().numpy() / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return torch.from_numpy(q.T * b)


def test_sinkhorn_knopp_targets_follow_swav_and_share_prototypes_equally():
    scores = torch.randn(64, 16).clamp(-1, 1)  # cosine logits, as DINO's normalised last layer gives
    got = sinkhorn_knopp_teacher_probs(scores, 0.05, iterations=3)
    torch.testing.assert_close(got.double(), reference_sinkhorn_knopp(scores, 0.05, 3), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(64))  # one distribution per sample
    # many iterations reach equipartition: every prototype gets B / K of the batch
    share = sinkhorn_knopp_teacher_probs(scores, 0.05, iterations=200).sum(dim=0)
    torch.testing.assert_close(share, torch.full((16,), 4.0), rtol=1e-3, atol=1e-3)


def test_dino_with_sinkhorn_knopp_trains_and_leaves_the_centre():
    model = tiny_dino(centering="sinkhorn_knopp")
    model.log = model.log_dict = lambda *args, **kwargs: None
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    model.teacher_temperature = lambda: 0.04
    loss = model.training_step((crops, torch.zeros(4)), 0)
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.vit.blocks[0].attn.qkv.weight.grad is not None
    assert not model._teacher_means and torch.count_nonzero(model.center) == 0
    with pytest.raises(UserError, match="centering"):
        tiny_dino(centering="median")


def test_dino_teacher_temperature_and_momentum_schedules():
    warm = np.linspace(0.04, 0.07, 30)  # main_dino.py's teacher_temp_schedule
    for epoch in range(40):
        expected = warm[epoch] if epoch < 30 else 0.07
        assert linear_warmup_then_constant(epoch, 30, 0.04, 0.07) == pytest.approx(expected)
    total = 100
    iters = np.arange(total)  # utils.cosine_scheduler(0.996, 1, ...) without warm-up
    schedule = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * iters / len(iters)))
    for step in range(total):
        assert cosine_to(step, total, 0.996, 1.0) == pytest.approx(schedule[step])


def tiny_dino(**kw) -> DINO:
    return DINO(TINY_ENCODER, out_dim=64, hidden_dim=32, bottleneck_dim=16, **kw)


def test_dino_centre_update_and_teacher_has_no_gradient():
    model = tiny_dino()
    teacher_out = torch.randn(8, 64)
    before = model.center.clone()
    means = [half.mean(0, keepdim=True) for half in teacher_out.chunk(2)]  # two micro-batches
    model.update_center(model.center, means)
    torch.testing.assert_close(model.center, before * 0.9 + teacher_out.mean(0, keepdim=True) * 0.1)
    assert not means
    assert not any(p.requires_grad for p in model.teacher_encoder.parameters())
    assert not any(p.requires_grad for p in model.teacher_head.parameters())
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    with torch.no_grad():
        t = embed_crops(model.teacher_encoder, model.teacher_head, crops[:2])
    s = embed_crops(model.encoder, model.head, crops)
    dino_loss(s, dino_teacher_probs(t, model.center, 0.04), 4).backward()
    assert all(p.grad is None for p in model.teacher_encoder.parameters())
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad is not None


def test_ema_update_follows_the_formula_exactly():
    source, target = ViTEncoder(**TINY_ENCODER), ViTEncoder(**TINY_ENCODER)
    expected = {k: 0.9 * v + 0.1 * source.state_dict()[k] for k, v in target.state_dict().items()}
    ema_update(target, source, 0.9)
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_dino_head_last_layer_is_weight_normalised_with_fixed_norm():
    model = tiny_dino()
    param = model.head.last_layer.parametrizations.weight
    assert not param.original0.requires_grad and torch.all(param.original0 == 1)
    w = model.head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(64))


def test_dino_head_batchnorm_option_follows_each_hidden_layer():
    # DINO's use_bn_in_head: Linear -> BatchNorm1d -> GELU for each hidden layer, none on the bottleneck.
    kinds = [type(m).__name__ for m in DINOHead(16, 8, 32, 4, use_bn=True).mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert [type(m).__name__ for m in DINOHead(16, 8, 32, 4).mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_multicrop_views_and_one_encoder_pass_per_resolution():
    from PIL import Image

    views = MultiCropViews(global_size=32, local_size=16, num_local=3)(Image.fromarray(random_images(1, 48)[0]))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    encoder = ViTEncoder(**TINY_ENCODER)
    calls = []
    encoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    batch = [v.unsqueeze(0).repeat(2, 1, 1, 1) for v in views]
    out = embed_crops(encoder, torch.nn.Identity(), batch)
    assert calls == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert out.shape == (10, 64)
    two = TwoViews(size=32)(Image.fromarray(random_images(1, 48)[0]))
    assert [tuple(v.shape) for v in two] == [(3, 32, 32)] * 2


# ----------------------------------------------------------------------------- contrastive


def reference_info_nce(q, k, t):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = []
    for i in range(len(q)):
        logits = torch.stack([q[i] @ k[j] / t for j in range(len(k))])
        losses.append(-(logits[i] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean() * 2 * t


def reference_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    losses = []
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        others = torch.stack([z[i] @ z[j] / t for j in range(n2) if j != i])
        losses.append(-(z[i] @ z[pos] / t - torch.logsumexp(others, 0)))
    return torch.stack(losses).mean()


def test_info_nce_with_the_2t_scale():
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(info_nce(q, k, 0.2), reference_info_nce(q, k, 0.2))


def test_nt_xent_over_2n_views():
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(nt_xent(z1, z2, 0.1), reference_nt_xent(z1, z2, 0.1))


def test_mocov3_freezes_patch_projection_and_uses_fixed_positions():
    model = MoCoV3(TINY_ENCODER, hidden_dim=32, out_dim=16)
    assert not model.encoder.vit.patch_embed.proj.weight.requires_grad
    assert not model.encoder.vit.pos_embed.requires_grad
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert len(model.projector) == 8 and isinstance(model.projector[-1], torch.nn.BatchNorm1d)
    assert not model.projector[-1].affine and len(model.predictor) == 5


def test_collapse_is_reported_with_the_step():
    model = SimCLR(TINY_ENCODER, hidden_dim=32, out_dim=16)
    model.log = lambda *args, **kwargs: None
    trainer = SimpleNamespace(log_every_n_steps=10, estimated_stepping_batches=100, global_step=0)
    model._trainer = trainer
    model.watch_collapse(torch.randn(32, 16))  # healthy: no warning
    trainer.global_step = 10  # not a step whose logs Lightning writes (after the 10th, 20th, ... step)
    model.watch_collapse(torch.ones(32, 16))
    assert model.collapse_watch.since is None
    trainer.global_step = 19
    with pytest.warns(UserWarning, match="has collapsed at step 19.*Check the learning rate"):
        model.watch_collapse(torch.ones(32, 16) + 1e-7 * torch.randn(32, 16))


def test_the_collapse_metrics_reach_the_logs_on_folders_of_few_batches(tmp_path):
    """Checked on the steps Lightning writes its logs at: on others a value is written late, and,
    in epochs shorter than the interval (3 batches here), never."""
    model = SimCLR(TINY_ENCODER, hidden_dim=32, out_dim=16)
    fit_briefly(model, "two", steps=12, num_images=6, batch_size=2, logger=CSVLogger(tmp_path), log_every_n_steps=5)
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).read_text().splitlines()))
    logged = [int(row["step"]) for row in rows if row.get("train/embedding_spread")]
    assert logged == [4, 9]


def test_a_uniform_teacher_is_a_collapse_even_with_spread_embeddings():
    model = SimCLR(TINY_ENCODER, hidden_dim=32, out_dim=16)
    model.log = lambda *args, **kwargs: None
    logits = torch.randn(32, 1024)  # well spread once L2-normalised, whatever their scale
    sharp = torch.softmax(logits / 0.04, dim=-1)
    flat = torch.softmax(1e-3 * logits / 0.04, dim=-1)  # shrunken logits: near-uniform teacher
    model.watch_collapse(logits, sharp)
    assert model.collapse_watch.since is None
    # uniform before any update: the data as a random encoder sees it, not the settings, is named
    with pytest.warns(UserWarning, match="teacher's outputs are nearly uniform.*Before any update: the freshly"):
        model.watch_collapse(1e-3 * logits, flat)
    # the bound is entropy ln K - ln 2: each image's mass spread evenly over half of the outputs
    for used, collapsed in ((400, False), (600, True)):
        probs = torch.zeros(32, 1024)
        probs[:, :used] = 1 / used
        model.collapse_watch = CollapseWatch()
        model.watch_collapse(logits, probs)
        assert (model.collapse_watch.since is not None) == collapsed
    # outputs on one point before any update: no setting has acted yet, so none is blamed
    model.collapse_watch = CollapseWatch()
    with pytest.warns(UserWarning, match="spread .* Before any update: the model as initialised") as caught:
        model.watch_collapse(torch.ones(32, 16))
    assert "learning rate" not in str(caught[0].message)


@pytest.mark.parametrize(
    ("steps", "said"),
    [
        ((4,), "Uniform since step 4, within the run's first tenth: the freshly"),
        ((4, 54), "Uniform since step 4, within the run's first tenth: the freshly"),  # its warning repeated
        ((54,), "learning rate"),
    ],
)
def test_a_teacher_uniform_from_the_start_is_not_blamed_on_the_settings(steps, said):
    # A teacher uniform by the first tenth of a run was warned of with "check the learning rate,
    # temperatures and augmentations", the recipe's own, while the encoder gained 27 k-NN points.
    model = SimCLR(TINY_ENCODER, hidden_dim=32, out_dim=16)
    model.log = lambda *args, **kwargs: None
    trainer = model._trainer = SimpleNamespace(log_every_n_steps=1, estimated_stepping_batches=100, global_step=0)
    logits = torch.randn(32, 1024)
    for step in steps:
        trainer.global_step = step
        with pytest.warns(UserWarning, match="teacher's outputs are nearly uniform") as caught:
            model.watch_collapse(logits, torch.softmax(1e-3 * logits / 0.04, dim=-1))
    assert said in str(caught[0].message)


def test_a_lasting_collapse_keeps_warning_and_is_counted():
    model = SimCLR(TINY_ENCODER, hidden_dim=32, out_dim=16)
    model.log = lambda *args, **kwargs: None
    trainer = SimpleNamespace(log_every_n_steps=5, estimated_stepping_batches=100, global_step=0)
    model._trainer = trainer
    collapsed = torch.ones(32, 16)
    warned_at = []
    for step in (0, *range(4, 100, 5)):  # the checked steps; healthy until step 20, collapsed from then on
        trainer.global_step = step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.watch_collapse(collapsed if step >= 20 else torch.randn(32, 16))
        warned_at += [step for w in caught if f"collapsed (since step 24) at step {step}" in str(w.message)]
    assert warned_at == [34, 44, 54, 64, 74, 84, 94]  # after the onset's warning, every tenth of the run
    assert model.collapse_watch.since == 24 and model.collapse_watch.collapsed_steps == 76  # steps 24-99, checked


def test_collapse_watch_counts_steps_between_collapsed_checks_and_resets_on_recovery():
    watch = CollapseWatch(threshold=0.05)
    assert watch.update(0, False, repeat_every=50) is False
    assert watch.update(10, True, repeat_every=50) is True  # onset
    assert watch.update(20, True, repeat_every=50) is False
    assert watch.update(30, False, repeat_every=50) is False and watch.since is None  # recovered
    assert watch.update(40, True, repeat_every=50) is True  # a new collapse warns again
    assert watch.collapsed_steps == 1 + 10 + 1  # onset's step, 10-20 (both checks collapsed), onset's step
    # A collapse seen at one check between healthy ones far apart counts as its own step only.
    sparse = CollapseWatch()
    for step, collapsed in ((0, False), (10, True), (60, False)):
        sparse.update(step, collapsed, repeat_every=6)
    assert sparse.collapsed_steps == 1 and sparse.since is None
    resumed = CollapseWatch()
    resumed.load_state_dict(watch.state_dict())
    assert resumed.state_dict() == watch.state_dict()


def test_ibot_patch_loss_is_dinov2s_per_crop_mean_over_all_crops():
    """Written from DINOv2's iBOTPatchLoss.forward_masked: each masked patch's cross-entropy,
    weighted 1 / (masked patches in its crop), summed, divided by all global crops."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, [1, 4]] = True  # crop 0: 2 masked patches; crop 2: 3; crops 1 and 3: none
    masks[2, [0, 2, 5]] = True
    student = torch.randn(5, 8, generator=g)
    teacher = torch.softmax(torch.randn(5, 8, generator=g), dim=-1)
    ce = [-(teacher[i] * torch.log_softmax(student[i] / 0.1, dim=-1)).sum() for i in range(5)]
    expected = ((ce[0] + ce[1]) / 2 + (ce[2] + ce[3] + ce[4]) / 3) / 4
    torch.testing.assert_close(ibot_patch_loss(student, teacher, masks, 0.1), expected)


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1)) * 3
    z = (x / x.norm(dim=1, keepdim=True)).double().numpy()
    nearest = [min(np.linalg.norm(z[i] - z[j]) for j in range(9) if j != i) for i in range(9)]
    expected = -np.mean(np.log(np.array(nearest) + 1e-8))
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)
    x.requires_grad_(True)
    koleo_loss(x).backward()  # pushes nearest neighbours apart: a gradient reaches every row
    assert (x.grad.norm(dim=1) > 0).all()


def test_multi_block_mask_covers_at_most_what_was_asked_in_rectangles():
    rng = random.Random(0)
    for want in (4, 10, 20, 31):
        mask = multi_block_mask((8, 8), want, rng)
        assert 0 < mask.sum() <= want and mask.sum() >= min(want, 4)
    # blocks, not scattered patches: rectangles of at least 4 patches make few connected regions
    mask = multi_block_mask((14, 14), 78, rng)
    seen, regions = set(), 0
    for start in map(tuple, mask.nonzero().tolist()):
        if start in seen:
            continue
        regions, todo = regions + 1, [start]
        while todo:
            r, c = todo.pop()
            if (r, c) in seen or not (0 <= r < 14 and 0 <= c < 14) or not mask[r, c]:
                continue
            seen.add((r, c))
            todo += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    assert regions <= mask.sum() / 4


def test_ibot_masks_mask_half_the_crops_across_the_ratio_range():
    masks = ibot_masks(8, (14, 14), random.Random(0))
    counts = sorted(masks.sum(1).tolist())
    assert counts[:4] == [0, 0, 0, 0] and all(c > 0 for c in counts[4:])  # int(8 x 0.5) crops masked
    # the i-th masked crop asks for a ratio in the i-th quarter of (0.1, 0.5): at most its upper edge
    uppers = [int(196 * (0.1 + 0.1 * (i + 1))) for i in range(4)]
    assert all(c <= u for c, u in zip(counts[4:], uppers, strict=True))
    assert counts[-1] > 196 * 0.25  # the last slice asks for 40-50%: rectangles reach most of it


def test_a_run_resumed_at_another_global_batch_says_what_changes(tmp_path):
    """The lr follows the global batch: a resume on other devices, batch or accumulation would
    silently train on other settings than the run it continues."""
    factory, view = OBJECTIVES["simclr"]
    fit_briefly(factory(), view, steps=2, batch_size=4).save_checkpoint(tmp_path / "run.ckpt")
    for batch_size, accumulate, said in ((4, 1, False), (8, 1, True), (4, 2, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = dict(batch_size=batch_size, accumulate_grad_batches=accumulate, ckpt_path=tmp_path / "run.ckpt")
            fit_briefly(factory(), view, steps=3, num_images=16, **resumed)
        lines = [str(w.message) for w in caught if "resuming at a global batch" in str(w.message)]
        assert len(lines) == said, lines
        if said:
            now, method = batch_size * accumulate, factory()
            assert lines[0].startswith(f"resuming at a global batch of {now} (1 devices x {batch_size} x {accumulate}")
            peaks = [f"{method.base_lr * method.lr_batch_scale(batch):.3g}" for batch in (4, now)]
            assert f"where the run trained at 4 until step 2: its peak lr {peaks[0]} -> {peaks[1]}," in lines[0]
