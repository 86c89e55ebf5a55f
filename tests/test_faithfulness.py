"""Where ssl-vit once departed from the official codes: the EMA step, the evaluated encoder,
clipping under fp16 loss scaling, each objective's weight-decay groups, SimMIM's ViT and DINO's
position-embedding resampling, each checked against a rule or formula transcribed from the
official code (docs/faithfulness.md names the files)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from safetensors.torch import load_file
from torch import nn

from ssl_vit import export_encoder
from ssl_vit.encoder import ViTEncoder, dino_resample_pos_embed
from ssl_vit.methods import DINO, SimMIM
from ssl_vit.methods.base import adamw
from ssl_vit.schedules import cosine_to
from tests.conftest import OBJECTIVES, TINY_ENCODER, fit_briefly

# ----------------------------------------------------------------------------- one EMA step per optimiser step

# The momentum each follower uses after optimiser step k (0-based) of a run of `total` steps.
OFFICIAL_EMA_MOMENTUM = {
    # main_dino.py: after optimizer.step() of iteration `it`, m = momentum_schedule[it]
    "dino": lambda k, total: cosine_to(k, total, 0.996, 1.0),
    # moco/builder.py + main_moco.py: iteration k+1 updates, before its keys, with its own momentum
    "mocov3": lambda k, total: cosine_to(k + 1, total, 0.99, 1.0),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_EMA_MOMENTUM))
@pytest.mark.parametrize(
    "num_images, accumulate",
    [(8, 4), (6, 2)],  # 4 micro-batches per step; and 3 per epoch, the last step taking only one
    ids=["accumulate4", "epoch-end-remainder"],
)
def test_ema_followers_step_once_per_optimiser_step(name, num_images, accumulate):
    factory, view = OBJECTIVES[name]
    # lr 0: the followed modules stay put, so only the EMA moves; the paper momenta as written
    method = factory(base_lr=0.0, scale_to_run=False)
    followers = {t: (method.get_submodule(t), method.get_submodule(s)) for t, s in method.ema_targets.items()}
    with torch.no_grad():  # each follower starts one unit away: n EMA steps leave prod(m_i) of that gap
        for target, source in followers.values():
            for t, s in zip(target.parameters(), source.parameters(), strict=True):
                t.copy_(s + 1.0)
    fit_briefly(method, view, steps=2, num_images=num_images, batch_size=2, accumulate_grad_batches=accumulate)
    expected = math.prod(OFFICIAL_EMA_MOMENTUM[name](k, 2) for k in range(2))
    for path, (target, source) in followers.items():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            torch.testing.assert_close(t - s, torch.full_like(t, expected), atol=1e-6, rtol=0, msg=path)


@pytest.mark.parametrize("num_images, accumulate", [(8, 4), (6, 2)], ids=["accumulate4", "epoch-end-remainder"])
def test_dino_centre_moves_once_per_optimiser_step_with_the_global_batch_mean(num_images, accumulate):
    method = OBJECTIVES["dino"][0]()
    outputs = []  # the teacher head's output on every micro-batch
    method.teacher_head.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    fit_briefly(method, "multicrop", steps=2, num_images=num_images, batch_size=2, accumulate_grad_batches=accumulate)
    # main_dino.py update_center, once per iteration of the whole (here accumulated) batch
    per_step = [outputs[:accumulate], outputs[accumulate:]]
    center = torch.zeros_like(method.center)
    for step_outputs in per_step:
        center = center * 0.9 + torch.cat(step_outputs).mean(dim=0, keepdim=True) * 0.1
    torch.testing.assert_close(method.center, center)


# ----------------------------------------------------------------------------- MoCo v3's evaluated encoder


def test_mocov3_evaluates_and_exports_its_base_encoder(tmp_path):
    method = OBJECTIVES["mocov3"][0]()
    trainer = fit_briefly(method, "two")
    with torch.no_grad():  # make the two encoders plainly different
        for p in method.momentum_encoder.parameters():
            p.add_(1.0)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert method.evaluated_encoder is method.encoder
    for role, module in ((None, method.encoder), ("momentum", method.momentum_encoder)):
        out = export_encoder(tmp_path / "last.ckpt", tmp_path / f"{role}.safetensors", role=role, fmt="state_dict")
        exported = load_file(str(out))
        for key, value in module.vit.state_dict().items():
            torch.testing.assert_close(exported[key], value, msg=f"{role}: {key}")


# ----------------------------------------------------------------------------- clipping under fp16 loss scaling


class _RecordingDINO(DINO):
    """DINO that records the gradient norms its own clipping sees."""

    def clip_objective_gradients(self) -> None:
        self.seen.append(torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]))
        super().clip_objective_gradients()


def test_adamw_is_fused_on_a_gpu_except_under_a_grad_scaler():
    # A fused step unscales fp16's gradients itself, after clipping read them scaled, and Lightning
    # refuses trainer.gradient_clip_val for it.
    def on_gpu(scaler):
        precision = SimpleNamespace(scaler=scaler)
        return SimpleNamespace(device=torch.device("cuda"), _trainer=SimpleNamespace(precision_plugin=precision))

    params = [{"params": [nn.Parameter(torch.ones(3))]}]
    assert adamw(on_gpu(None), params).defaults["fused"]
    assert not adamw(on_gpu(torch.amp.GradScaler("cpu")), params).defaults["fused"]


def test_clipping_sees_unscaled_gradients_under_a_grad_scaler():
    seen = {}
    for scale in (1.0, 16.0):  # a scale of 1 is the unscaled reference (larger overflows fp16 here)
        torch.manual_seed(0)
        method = _RecordingDINO(TINY_ENCODER, out_dim=64, hidden_dim=32, bottleneck_dim=16)
        method.seen = []
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
        precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        fit_briefly(method, "multicrop", plugins=[precision], gradient_clip_val=100.0)
        assert not method.optimizers().optimizer.defaults["fused"]
        seen[scale] = torch.stack(method.seen)
    assert seen[1.0].shape[0] == 2  # one clip per optimiser step
    torch.testing.assert_close(seen[16.0], seen[1.0], rtol=1e-2, atol=1e-6)


# ----------------------------------------------------------------------------- weight decay, per official code

# Which parameters each official code decays, transcribed (ssl-vit's names for the same parameters).
OFFICIAL_DECAY_RULE = {
    # mae main_pretrain.py -> timm 0.3.2 optim_factory.add_weight_decay: 1-D parameters and biases exempt
    "mae": lambda name, p: not (p.ndim == 1 or name.endswith(".bias")),
    # dino utils.get_params_groups: biases and 1-D parameters exempt
    "dino": lambda name, p: not (name.endswith(".bias") or p.ndim == 1),
    # moco-v3 main_moco.py (ViT): torch.optim.AdamW(model.parameters(), ...)
    "mocov3": lambda name, p: True,
    # SimMIM optimizer.get_pretrain_param_groups with the encoder's no_weight_decay() {pos_embed, cls_token}
    "simmim": lambda name, p: (
        not (p.ndim == 1 or name.endswith(".bias") or name in {"encoder.vit.pos_embed", "encoder.vit.cls_token"})
    ),
    # google-research/simclr: no decay on batch-norm parameters and biases
    "simclr": lambda name, p: not (p.ndim == 1 or name.endswith(".bias")),
    # ijepa src/helper.py init_opt: ('bias' not in n) and (len(p.shape) != 1) decay
    "ijepa": lambda name, p: "bias" not in name and len(p.shape) != 1,
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_weight_decay_groups_follow_the_official_rule(name):
    assert name in OFFICIAL_DECAY_RULE, f"transcribe {name}'s official weight-decay rule into OFFICIAL_DECAY_RULE"
    method = OBJECTIVES[name][0](weight_decay=0.05)
    optimizer = method.configure_optimizers()
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(method.named_parameters())
    for param_name, p in named.items():
        if not p.requires_grad:
            assert id(p) not in decay_of, param_name
            continue
        assert decay_of[id(p)] == (0.05 if OFFICIAL_DECAY_RULE[name](param_name, p) else 0.0), param_name
    # the cases that used to differ
    decayed = {n for n, p in named.items() if decay_of.get(id(p)) == 0.05}
    expected_decayed = {
        "mae": {"encoder.vit.cls_token", "decoder.mask_token"},
        "dino": {"encoder.vit.cls_token", "encoder.vit.pos_embed"},
        "mocov3": {"encoder.vit.norm.weight", "encoder.vit.blocks.0.attn.qkv.bias"},
        "simmim": {"mask_token"},
        "simclr": set(),
        "ijepa": {"predictor.mask_token"},  # pos embeddings are frozen sin-cos (encoder and predictor)
    }.get(name, set())
    assert expected_decayed <= decayed


# ----------------------------------------------------------------------------- SimMIM's ViT


def test_simmim_vit_has_layer_scale_and_simmims_initialisation():
    torch.manual_seed(0)
    method = SimMIM({**TINY_ENCODER, "embed_dim": 192, "depth": 4, "num_heads": 3}, mask_patch_size=8)
    vit = method.encoder.vit
    assert method.hparams.encoder["init_values"] == 0.1  # recorded, so exports rebuild the same ViT
    # VisionTransformerForSimMIM._trunc_normal_: N(0, 0.02) cut at +-0.02, whose std is 0.02 x 0.5396
    std, bound = 0.02 * 0.5396, 0.02
    for i, block in enumerate(vit.blocks):
        torch.testing.assert_close(block.ls1.gamma, torch.full_like(block.ls1.gamma, 0.1))
        torch.testing.assert_close(block.ls2.gamma, torch.full_like(block.ls2.gamma, 0.1))
        rescale = math.sqrt(2 * (i + 1))  # fix_init_weight
        for weight, divisor in (
            (block.attn.qkv.weight, 1.0),
            (block.mlp.fc1.weight, 1.0),
            (block.attn.proj.weight, rescale),
            (block.mlp.fc2.weight, rescale),
        ):
            assert weight.std().item() == pytest.approx(std / divisor, rel=0.05)
            assert weight.abs().max().item() <= bound / divisor + 1e-7
        assert not block.attn.qkv.bias.any()
    for tensor in (vit.patch_embed.proj.weight, vit.pos_embed, vit.cls_token, method.mask_token):
        assert tensor.abs().max().item() <= bound and tensor.std().item() == pytest.approx(std, rel=0.2)
    assert method.mask_token.shape == (1, 1, 192)


def test_simmim_lr_schedule_scales_peak_warmup_start_and_minimum_by_batch_over_512():
    method = SimMIM(
        TINY_ENCODER, mask_patch_size=8, base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6, warmup_epochs=2, scale_to_run=False
    )
    trainer = SimpleNamespace(
        num_training_batches=10, accumulate_grad_batches=1, estimated_stepping_batches=100, world_size=4
    )
    method.trainer = trainer
    batch = 256  # per device: global 1024, so every lr doubles
    base, warm, low = 1e-4 * 1024 / 512, 5e-7 * 1024 / 512, 5e-6 * 1024 / 512
    # main_simmim.py's linear scaling; timm's warm-up: warmup_lr_init + t * (lr - warmup_lr_init) / warmup_t
    assert method.learning_rate(0, batch) == pytest.approx(warm)
    assert method.learning_rate(10, batch) == pytest.approx(warm + 10 * (base - warm) / 20)
    assert method.learning_rate(20, batch) == pytest.approx(base)
    assert method.learning_rate(100, batch) == pytest.approx(low)
    # main_simmim.py steps the scheduler after each update: updates 0 and 1 both take the start, update k lr(k - 1)
    for global_step, scheduled in ((0, 0), (1, 0), (2, 1), (57, 56)):
        trainer.global_step = global_step
        assert method.schedule_step() == scheduled


def test_simmim_clips_the_global_gradient_norm():
    method = OBJECTIVES["simmim"][0](clip_grad=0.5)
    for p in method.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    method.clip_objective_gradients()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in method.parameters() if p.grad is not None]))
    assert total.item() == pytest.approx(0.5, rel=1e-4)


# ----------------------------------------------------------------------------- DINO's position-embedding resampling


def reference_dino_interpolate_pos_encoding(pos_embed, w, h, patch_size):
    """facebookresearch/dino vision_transformer.py ``interpolate_pos_encoding``, one CLS token."""
    npatch, n = (w // patch_size) * (h // patch_size), pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size + 0.1, h // patch_size + 0.1
    side = int(math.sqrt(n))
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("grid, crop, patch", [(14, 96, 16), (8, 16, 4), (8, 24, 4)])
def test_dino_resampling_matches_dinos_interpolate_pos_encoding(grid, crop, patch):
    pos_embed = torch.randn(1, 1 + grid * grid, 32)  # random init: where timm's antialiasing differs most
    want = reference_dino_interpolate_pos_encoding(pos_embed, crop, crop, patch)
    got = dino_resample_pos_embed(pos_embed, (grid, grid), (crop // patch, crop // patch), num_prefix_tokens=1)
    torch.testing.assert_close(got, want)


def test_dino_encoder_option_resamples_local_crops_as_dino_and_keeps_global_crops():
    dino_enc = ViTEncoder(**TINY_ENCODER, pos_embed_resample="dino")
    timm_enc = ViTEncoder(**TINY_ENCODER)
    timm_enc.load_state_dict(dino_enc.state_dict())
    vit = dino_enc.vit
    local = torch.randn(2, 3, 16, 16)
    want = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(local).flatten(1, 2)], dim=1)
    want = want + reference_dino_interpolate_pos_encoding(vit.pos_embed, 16, 16, 4)
    torch.testing.assert_close(dino_enc._pos_embed(vit.patch_embed(local))[0], want)
    assert not torch.allclose(timm_enc(local).tokens, dino_enc(local).tokens, atol=1e-3)  # the option matters
    full = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_enc(full).tokens, dino_enc(full).tokens)  # same grid: no resampling
    assert DINO(TINY_ENCODER, out_dim=64, hidden_dim=32, bottleneck_dim=16).encoder.pos_embed_resample == "dino"
