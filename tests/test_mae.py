"""MAE against short references written from the paper's / official code's formulas."""

import math

import pytest
import torch

from ssl_vit.errors import UserError
from ssl_vit.losses import masked_patch_mse, normalized_patch_targets
from ssl_vit.masking import random_patch_mask
from ssl_vit.methods import MAE
from ssl_vit.patches import patchify, unpatchify
from ssl_vit.schedules import warmup_cosine
from tests.conftest import TINY_ENCODER


def tiny_mae(**kwargs) -> MAE:
    return MAE(TINY_ENCODER, decoder_dim=32, decoder_depth=1, decoder_heads=2, **kwargs)


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.5])
def test_mask_keeps_exact_count_and_differs_per_sample(ratio):
    n = 64
    m = random_patch_mask(8, n, ratio)
    keep = int(n * (1 - ratio))
    assert m.keep_idx.shape == (8, keep)
    assert (m.mask.sum(1) == n - keep).all()
    for b in range(8):
        visible = set(m.keep_idx[b].tolist())
        assert len(visible) == keep
        assert visible == set((m.mask[b] == 0).nonzero().flatten().tolist())
        # restore_idx inverts the shuffle whose first `keep` entries are the kept patches
        shuffle = m.restore_idx[b].argsort()
        assert (shuffle[:keep] == m.keep_idx[b]).all()
        assert (shuffle[m.restore_idx[b]] == torch.arange(n)).all()
    assert len({tuple(sorted(k.tolist())) for k in m.keep_idx}) == 8


def test_patchify_matches_explicit_loops_and_round_trips():
    x = torch.randn(2, 3, 8, 12)
    p = 4
    patches = patchify(x, p)
    assert patches.shape == (2, 6, 48)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                block = x[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # (C, p, p)
                torch.testing.assert_close(patches[b, i * 3 + j], block.permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(patches, p, (2, 3)), x)


def test_norm_pix_target_is_per_patch_normalised():
    patches = torch.randn(2, 5, 48) * 3 + 1
    target = normalized_patch_targets(patches)
    for b in range(2):
        for n in range(5):
            v = patches[b, n]
            mean = v.sum() / v.numel()
            var = ((v - mean) ** 2).sum() / (v.numel() - 1)  # the official code uses torch.var (unbiased)
            torch.testing.assert_close(target[b, n], (v - mean) / math.sqrt(var + 1e-6))


def test_loss_covers_masked_patches_only():
    pred, target = torch.randn(3, 10, 12), torch.randn(3, 10, 12)
    mask = (torch.rand(3, 10) < 0.7).float()
    mask[0, 0] = 1
    expected = sum(((pred[b, n] - target[b, n]) ** 2).mean() for b in range(3) for n in range(10) if mask[b, n])
    torch.testing.assert_close(masked_patch_mse(pred, target, mask), expected / mask.sum())
    # Visible patches do not matter at all.
    pred2 = pred.clone()
    pred2[mask == 0] += 100
    torch.testing.assert_close(masked_patch_mse(pred2, target, mask), masked_patch_mse(pred, target, mask))


def test_encoder_never_sees_masked_pixels():
    model = tiny_mae().eval()
    x = torch.randn(2, 3, 32, 32)
    m = random_patch_mask(2, 64, 0.75)
    patches = patchify(x, 4)
    patches[m.mask.bool()] = torch.randn_like(patches[m.mask.bool()]) * 10
    x_changed = unpatchify(patches, 4, (8, 8))
    out, out_changed = model.encoder(x, keep_idx=m.keep_idx), model.encoder(x_changed, keep_idx=m.keep_idx)
    torch.testing.assert_close(out.tokens, out_changed.tokens)


def test_forward_loss_equals_reference_on_its_own_mask():
    model = tiny_mae(norm_pix_loss=True).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    target = normalized_patch_targets(patchify(x, 4))
    per_patch = ((out.pred - target) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, (per_patch * out.mask.mask).sum() / out.mask.mask.sum())
    assert out.pred.shape == (2, 64, 48)


def test_encoder_position_embedding_is_fixed_sincos():
    model = tiny_mae()
    assert not model.encoder.vit.pos_embed.requires_grad
    assert not model.decoder.pos_embed.requires_grad
    assert torch.all(model.encoder.vit.pos_embed[0, 0] == 0)


def test_a_few_steps_reduce_the_loss_on_fixed_data():
    torch.manual_seed(0)
    model = tiny_mae()
    x = torch.randn(16, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # same mask every step: the loss is then comparable
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_mae_optimiser_betas():
    assert tiny_mae().configure_optimizers().defaults["betas"] == (0.9, 0.95)


def test_warmup_cosine_schedule_matches_mae_formula():
    peak, final, total, warm = 1e-3, 1e-5, 100, 10
    for step in range(total):
        epoch_like = step  # MAE: lr = lr * epoch / warmup, then min + (lr - min) / 2 * (1 + cos(pi * t))
        if step < warm:
            expected = peak * epoch_like / warm
        else:
            expected = final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert warmup_cosine(step, total, warm, peak, final) == pytest.approx(expected)


def test_bad_mask_ratio_is_a_clear_error():
    with pytest.raises(UserError, match="mask_ratio"):
        tiny_mae(mask_ratio=1.0)
