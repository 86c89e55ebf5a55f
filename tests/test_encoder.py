import math

import pytest
import torch

from ssl_vit import encoder as encoder_module
from ssl_vit.encoder import ViTEncoder, compile_blocks, sincos_pos_embed_2d
from ssl_vit.errors import UserError
from ssl_vit.patches import patchify, unpatchify
from tests.conftest import OBJECTIVES, TINY_ENCODER


def reference_sincos(embed_dim: int, grid: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed, written from its formulas with explicit loops."""
    quarter = embed_dim // 4
    rows = []
    for r in range(grid):
        for c in range(grid):
            row = []
            for pos in (c, r):  # first half encodes the column, second half the row
                freqs = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
                row += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
            rows.append(row)
    return torch.tensor([[0.0] * embed_dim, *rows])


def test_sincos_pos_embed_matches_mae_formula():
    torch.testing.assert_close(sincos_pos_embed_2d(16, (3, 3)), reference_sincos(16, 3), atol=1e-6, rtol=0)


def test_output_has_cls_and_patch_tokens():
    enc = ViTEncoder(**TINY_ENCODER).eval()
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.cls.shape == (2, 64)
    assert out.patches.shape == (2, 64, 64)
    # With nothing dropped or masked, exactly timm's own forward_features.
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x).tokens, enc.vit.forward_features(x))


def test_keep_idx_runs_only_the_visible_tokens():
    enc = ViTEncoder(**TINY_ENCODER).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    out = enc(x, keep_idx=keep)
    assert out.patches.shape == (2, 16, 64)
    # Reference: embed, add positions, select the kept patches by hand, run the blocks.
    for b in range(2):
        tokens = enc.vit._pos_embed(enc.vit.patch_embed(x[b : b + 1]))
        visible = torch.cat([tokens[:, :1], tokens[:, 1:][:, keep[b]]], dim=1)
        expected = enc.vit.norm(enc.vit.blocks(visible))
        torch.testing.assert_close(out.tokens[b : b + 1], expected)


def test_mask_token_replaces_masked_patch_embeddings():
    enc = ViTEncoder(**TINY_ENCODER).eval()
    token = torch.randn(64)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    # Make x2 equal to x1 on visible patches only: outputs must then agree exactly.
    p1, p2 = patchify(x1, 4), patchify(x2, 4)
    p2[~mask] = p1[~mask]
    x2 = unpatchify(p2, 4, (8, 8))
    out1 = enc(x1, mask=mask, mask_token=token)
    out2 = enc(x2, mask=mask, mask_token=token)
    torch.testing.assert_close(out1.tokens, out2.tokens)
    # And masked positions really see the token: without the mask, outputs differ.
    assert not torch.allclose(enc(x1).tokens, enc(x2).tokens)


def test_other_resolution_interpolates_position_embeddings():
    enc = ViTEncoder(**TINY_ENCODER).eval()
    out = enc(torch.randn(2, 3, 16, 16))  # a 4x4 grid on an encoder built for 8x8
    assert out.patches.shape == (2, 16, 64)
    assert torch.isfinite(out.tokens).all()


def test_fused_attention_is_used():
    enc = ViTEncoder(**TINY_ENCODER)
    assert all(block.attn.fused_attn for block in enc.vit.blocks)


def test_bad_architecture_is_a_clear_error():
    with pytest.raises(UserError, match="does not divide"):
        ViTEncoder(**{**TINY_ENCODER, "patch_size": 5})
    with pytest.raises(UserError, match="cannot build encoder 'resnet18'"):
        ViTEncoder(name="resnet18")  # not a ViT: timm rejects the ViT-only arguments
    with pytest.raises(UserError, match="unknown timm model"):
        ViTEncoder(name="vit_nonexistent")


def _loss_and_grads(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(1)  # the same MAE mask in both runs
    loss = model(images).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(encoder_module, "checkpoint_seq", lambda blocks, x: calls.append(1) or blocks(x))
    torch.manual_seed(0)
    plain = ViTEncoder(**TINY_ENCODER)
    checkpointed = ViTEncoder(**TINY_ENCODER, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        checkpointed(images)  # nothing to recompute without gradients
    assert not calls
    checkpointed(images)
    assert calls
    monkeypatch.undo()
    plain(images).tokens.square().mean().backward()
    checkpointed(images).tokens.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_blocks_compute_the_same_step_and_keep_state_dict_keys():
    torch.manual_seed(0)
    model = OBJECTIVES["mae"][0]()
    images = torch.randn(4, 3, 32, 32)
    want_loss, want_grads = _loss_and_grads(model, images)
    keys = list(model.state_dict())
    assert compile_blocks(model) == 3  # 2 encoder blocks + 1 decoder block
    loss, grads = _loss_and_grads(model, images)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert list(model.state_dict()) == keys  # exports and checkpoints are unchanged


TINY_ROPE_ENCODER = dict(
    name="vit_small_patch16_dinov3", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_reg_tokens=2
)


def test_a_rope_vit_is_timms_own_forward_at_any_resolution():
    # DINOv3's architecture in timm (Eva: rotary positions on the patches, CLS + storage tokens).
    enc = ViTEncoder(**TINY_ROPE_ENCODER).eval()
    assert enc.num_prefix_tokens == 3 and enc.vit.pos_embed is None
    for size in (32, 24):  # a global and a local crop: RoPE computes positions for each grid
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(enc(x).tokens, enc.vit.forward_features(x))


def test_a_rope_vits_kept_tokens_keep_their_rotary_positions():
    enc = ViTEncoder(**TINY_ROPE_ENCODER).eval()
    with torch.no_grad():  # attention sharp enough for positions to matter (at init it is near uniform)
        for block in enc.vit.blocks:
            block.attn.qkv.weight.mul_(30)
    x = torch.randn(2, 3, 32, 32)
    full = enc(x)
    # Every patch kept, in another order per sample: attention is order-free, so each token's
    # output is the full forward's, wherever it sits, only if its rotary position went with it.
    order = torch.stack([torch.randperm(64) for _ in range(2)])
    shuffled = enc(x, keep_idx=order)
    torch.testing.assert_close(shuffled.patches, torch.stack([full.patches[b, order[b]] for b in range(2)]))
    torch.testing.assert_close(shuffled.cls, full.cls)
    assert enc(x, keep_idx=order[:, :16]).patches.shape == (2, 16, 64)


def test_objectives_that_fix_a_position_embedding_refuse_a_rope_vit():
    from ssl_vit.methods import MAE

    with pytest.raises(UserError, match="has none \\(RoPE positions\\)"):
        MAE(encoder=TINY_ROPE_ENCODER)


def test_a_layer_scale_that_timm_would_keep_is_refused_not_ignored():
    # timm drops None arguments: init_values null would leave vit_*_dinov3's 1e-5 layer scale in place.
    with pytest.raises(UserError, match="init_values null cannot turn off vit_small_patch16_dinov3's layer scale"):
        ViTEncoder(**TINY_ROPE_ENCODER, init_values=None)
    assert ViTEncoder(**TINY_ENCODER, init_values=None).vit.blocks[0].ls1.__class__ is torch.nn.Identity
    gamma = ViTEncoder(**TINY_ROPE_ENCODER, init_values=1.0).vit.blocks[0].gamma_1
    torch.testing.assert_close(gamma, torch.ones_like(gamma))
