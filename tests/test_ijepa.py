"""I-JEPA against references written from facebookresearch/ijepa: the multi-block masks
(``src/masks/multiblock.py``), the targets and smooth L1 loss, the predictor's inputs
(``src/models/vision_transformer.py``), the EMA target encoder and the schedules (``src/train.py``,
``src/utils/schedulers.py``)."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from ssl_vit.encoder import compile_blocks, sincos_pos_embed_2d
from ssl_vit.errors import UserError
from ssl_vit.eval import EvaluationCallback
from ssl_vit.eval.features import pooled_features
from ssl_vit.masking import ContextTargetMasks, ijepa_block_size, ijepa_multiblock_masks
from ssl_vit.methods import IJEPA
from tests.conftest import OBJECTIVES, fit_briefly
from tests.test_recipe_rules import RECIPES


def tiny(**kwargs) -> IJEPA:
    return OBJECTIVES["ijepa"][0](**kwargs)


# ----------------------------------------------------------------------------- masks


def reference_block_size(u, height, width, scale, aspect_ratio):
    """multiblock.py _sample_block_size, from one uniform draw u."""
    max_keep = int(height * width * (scale[0] + u * (scale[1] - scale[0])))
    ar = aspect_ratio[0] + u * (aspect_ratio[1] - aspect_ratio[0])
    h, w = round(math.sqrt(max_keep * ar)), round(math.sqrt(max_keep / ar))
    while h >= height:
        h -= 1
    while w >= width:
        w -= 1
    return h, w


def test_block_sizes_follow_the_official_draw():
    for u in [*torch.rand(200).tolist(), 0.0, 1.0]:
        for grid, scale, aspect in [
            ((16, 16), (0.15, 0.2), (0.75, 1.5)),  # ViT-H/14's targets
            ((16, 16), (0.85, 1.0), (1.0, 1.0)),  # its context: 1.0 would be the whole grid, capped
            ((14, 14), (0.15, 0.2), (0.75, 1.5)),  # ViT-B/16 at 224 px
            ((8, 8), (0.3, 0.9), (0.3, 3.0)),
        ]:
            assert ijepa_block_size(u, grid, scale, aspect) == reference_block_size(u, *grid, scale, aspect)


def rectangle(idx: torch.Tensor, width: int) -> tuple[int, int, int, int]:
    """Patch indices that form a rectangle -> (top, left, height, width); fails if they do not."""
    rows, cols = (idx // width).tolist(), (idx % width).tolist()
    top, left = min(rows), min(cols)
    h, w = max(rows) - top + 1, max(cols) - left + 1
    assert len(set(idx.tolist())) == len(idx) == h * w, "not a full rectangle"
    return top, left, h, w


def test_multiblock_masks_follow_the_official_collator():
    grid, batch, min_keep = (14, 14), 16, 10
    sizes = {reference_block_size(u / 1000, *grid, (0.15, 0.2), (0.75, 1.5)) for u in range(1001)}
    context_sizes = {reference_block_size(u / 1000, *grid, (0.85, 1.0), (1.0, 1.0)) for u in range(1001)}
    positions = set()
    for _ in range(20):
        masks = ijepa_multiblock_masks(batch, grid, min_keep=min_keep)
        assert masks.target_idx.shape[:2] == (4, batch)
        target_shapes = set()
        for t in range(4):
            for b in range(batch):
                top, left, h, w = rectangle(masks.target_idx[t, b], grid[1])
                target_shapes.add((h, w))
                positions.add((top, left))
                assert top + h < grid[0] + 1 and top <= grid[0] - h - 1 and left <= grid[1] - w - 1  # randint bounds
        assert len(target_shapes) == 1 and target_shapes <= sizes  # one block size for the whole batch
        context = masks.context_idx
        assert context.shape[0] == batch and context.shape[1] > min_keep
        for b in range(batch):
            idx = context[b]
            assert torch.all(idx[1:] > idx[:-1])  # ascending, no repeats
            rows, cols = idx // grid[1], idx % grid[1]
            extent = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
            assert any(extent[0] <= h and extent[1] <= w for h, w in context_sizes)  # inside one context block
            assert not set(idx.tolist()) & set(masks.target_idx[:, b].flatten().tolist())  # targets removed
    assert len(positions) > 50  # every sample places its own blocks


def test_context_keeps_the_smallest_samples_count_and_overlap_is_optional():
    torch.manual_seed(1)
    grid = (8, 8)
    counts, overlaps = [], []
    for allow_overlap in (False, True):
        for _ in range(30):
            masks = ijepa_multiblock_masks(8, grid, min_keep=4, allow_overlap=allow_overlap)
            shared = [
                set(masks.context_idx[b].tolist()) & set(masks.target_idx[:, b].flatten().tolist()) for b in range(8)
            ]
            overlaps.append((allow_overlap, any(shared)))
            counts.append(masks.context_idx.shape[1])
    assert not any(o for allowed, o in overlaps if not allowed) and any(o for allowed, o in overlaps if allowed)
    assert min(counts) > 4 and len(set(counts)) > 1  # the batch's smallest context, drawn anew each batch


def test_crowded_targets_give_way_after_twenty_failed_draws():
    """Four targets covering nearly the whole grid leave no room for a context of more than
    min_keep patches: the collator then drops target constraints one at a time (last first)."""
    torch.manual_seed(0)
    masks = ijepa_multiblock_masks(
        4, (6, 6), target_scale=(0.55, 0.55), target_aspect_ratio=(1.0, 1.0), context_scale=(0.7, 0.7), min_keep=12
    )
    assert masks.context_idx.shape[1] > 12


def test_blocks_too_small_for_min_keep_fail_with_one_message():
    with pytest.raises(UserError, match="min_keep=10"):
        tiny(min_keep=10)  # 3 x 3 target blocks on the 8 x 8 grid


# ----------------------------------------------------------------------------- loss, targets and predictor


def fixed_masks(batch: int) -> ContextTargetMasks:
    torch.manual_seed(3)
    return ijepa_multiblock_masks(batch, (8, 8), min_keep=4)


def test_loss_is_smooth_l1_to_the_layer_normed_target_blocks():
    method = tiny().eval()
    images = torch.randn(3, 3, 32, 32)
    masks = fixed_masks(3)
    out = method(images, masks)
    with torch.no_grad():
        h = method.target_encoder(images).patches  # (B, N, D), the whole image
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        # apply_masks: one (B, Kt, D) slab per target block, concatenated block after block
        target = torch.stack([torch.stack([h[b, idx] for b, idx in enumerate(block)]) for block in masks.target_idx])
        target = target.flatten(0, 1)
    torch.testing.assert_close(out.target, target)
    d = (out.pred - target).abs()
    assert (d > 1).any() and (d < 1).any()  # both branches of the smooth L1 are exercised
    expected = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    torch.testing.assert_close(out.loss, expected)


def test_predictor_sees_only_the_context_and_each_blocks_positions():
    method = tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    masks = fixed_masks(2)
    out = method(images, masks)
    p = method.predictor
    context = method.encoder(images, keep_idx=masks.context_idx).patches
    pos = sincos_pos_embed_2d(32, (8, 8), num_prefix_tokens=0)  # VisionTransformerPredictor's fixed positions
    with torch.no_grad():
        for t, block in enumerate(masks.target_idx):
            for b in range(2):  # one sequence per (block, sample): its context, then a query per target patch
                x = p.embed(context[b]) + pos[masks.context_idx[b]]
                queries = p.mask_token[0] + pos[block[b]]
                seq = p.blocks(torch.cat([x, queries]).unsqueeze(0))
                expected = p.proj(p.norm(seq)[0, x.shape[0] :])
                torch.testing.assert_close(out.pred[t * 2 + b], expected, atol=1e-5, rtol=1e-4)

    # The context encoder sees nothing outside the context: changing those pixels changes no prediction.
    hidden = torch.ones(2, 64, dtype=torch.bool)
    hidden.scatter_(1, masks.context_idx, False)
    pixel_hidden = hidden.view(2, 1, 8, 1, 8, 1).expand(2, 3, 8, 4, 8, 4).reshape(2, 3, 32, 32)
    changed = method(images + 5.0 * pixel_hidden * torch.randn_like(images), masks)
    torch.testing.assert_close(changed.pred, out.pred)
    assert not torch.allclose(changed.target, out.target)  # while the target encoder saw them


# ----------------------------------------------------------------------------- target encoder and schedules


class _Snapshots(L.Callback):
    def __init__(self):
        self.context, self.target = [], []

    def _take(self, pl_module):
        self.context.append([p.detach().clone() for p in pl_module.encoder.parameters()])
        self.target.append([p.detach().clone() for p in pl_module.target_encoder.parameters()])

    def on_train_start(self, trainer, pl_module):
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert all(p.grad is None for p in pl_module.target_encoder.parameters())


def test_target_encoder_gets_no_gradient_and_follows_the_linear_ema_exactly():
    method = tiny(scale_to_run=False, target_momentum=0.9)  # a momentum far from 1 shows any error
    with torch.no_grad():  # a target one unit away from the context encoder: each m_k shows in the gap
        for p in method.target_encoder.parameters():
            p.add_(1.0)
    snaps = _Snapshots()
    fit_briefly(method, steps=3, callbacks=[snaps])
    assert not any(p.requires_grad for p in method.target_encoder.parameters())
    for k in range(3):  # train.py: after update k, target <- m_k target + (1 - m_k) context, m_k linear in k
        m = 0.9 + k * (1.0 - 0.9) / 3
        for before, after, context in zip(snaps.target[k], snaps.target[k + 1], snaps.context[k + 1], strict=True):
            torch.testing.assert_close(after, m * before + (1 - m) * context)
        assert not all(torch.equal(a, b) for a, b in zip(snaps.context[k], snaps.context[k + 1], strict=True))


def reference_schedules(
    total: int, warmup: int, start_lr: float, lr: float, final_lr: float, wd: float, final_wd: float
):
    """schedulers.py WarmupCosineSchedule and CosineWDSchedule, stepped once before each update."""
    lrs, wds = [], []
    for step in range(1, total + 1):
        if step < warmup:
            lrs.append(start_lr + step / max(1, warmup) * (lr - start_lr))
        else:
            progress = (step - warmup) / max(1, total - warmup)
            lrs.append(max(final_lr, final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))))
        wds.append(min(final_wd, final_wd + (wd - final_wd) * 0.5 * (1 + math.cos(math.pi * step / total))))
    return lrs, wds


def test_lr_and_weight_decay_follow_the_official_schedulers():
    method = tiny(scale_to_run=False)  # the paper's 40 warm-up epochs as they are
    optimizer = method.configure_optimizers()
    method.optimizers = lambda: SimpleNamespace(optimizer=optimizer)
    method.log = lambda *args, **kwargs: None
    total, per_epoch = 600, 10  # 60 epochs of 10 steps: 400 warm-up steps, then cosine
    lrs, wds = [], []
    for step in range(total):
        method._trainer = SimpleNamespace(
            num_training_batches=per_epoch,
            accumulate_grad_batches=1,
            estimated_stepping_batches=total,
            world_size=1,
            global_step=step,
        )
        method.on_train_batch_start((None, torch.zeros(2048)), 0)  # the paper's batch: the paper's lrs
        lrs.append(optimizer.param_groups[0]["lr"])
        wds.append(max(g["weight_decay"] for g in optimizer.param_groups))
        assert min(g["weight_decay"] for g in optimizer.param_groups) == 0.0  # biases and norms never decay
    ref_lrs, ref_wds = reference_schedules(total, 400, 2e-4, 1e-3, 1e-6, 0.04, 0.4)
    assert lrs == pytest.approx(ref_lrs, rel=1e-9) and wds == pytest.approx(ref_wds, rel=1e-9)
    assert method.lr_batch_scale(512) == pytest.approx(0.5)  # sqrt(512 / 2048): all three lrs scale


# ----------------------------------------------------------------------------- init


def test_init_is_the_official_trunc_normal_002_at_the_papers_widths():
    """src/helper.py init_model: every Linear and the patch embedding trunc-normal(0.02), biases 0.
    Both ImageNet recipes (ViT-B/16 and ViT-H/14, predictor 384), built one block deep, draw that."""
    torch.manual_seed(0)
    for name in ("ijepa_vit_b16", "ijepa_vit_h14"):
        args = yaml.safe_load((RECIPES / "imagenet" / f"{name}.yaml").read_text())["model"]["init_args"]
        method = IJEPA({**args["encoder"], "depth": 1}, predictor_dim=args["predictor_dim"], predictor_depth=1)
        enc, pred = method.encoder.vit, method.predictor
        drawn = {
            "encoder qkv": enc.blocks[0].attn.qkv.weight,
            "encoder fc2": enc.blocks[0].mlp.fc2.weight,
            "patch embedding": enc.patch_embed.proj.weight,
            "predictor embed": pred.embed.weight,
            "predictor fc1": pred.blocks[0].mlp.fc1.weight,
        }
        for part, weight in drawn.items():
            assert weight.std().item() == pytest.approx(0.02, rel=0.02), f"{name}: {part}"
        assert not enc.blocks[0].attn.qkv.bias.any() and not pred.proj.bias.any()


def test_narrower_layers_keep_the_gain_of_the_papers_narrowest():
    """A layer narrower than the paper's keeps std x sqrt(fan-in) of the paper's narrowest (ViT-B/16's
    768-d encoder, ViT-H/14's 14 x 14 x 3 patches, the 384-d predictor), on the tiny model's weights."""
    method = tiny()  # 64-d encoder, 4 x 4 x 3 patches, a 32-d predictor
    enc, pred = method.encoder.vit, method.predictor
    expected = {
        "encoder": 0.02 * math.sqrt(768) / math.sqrt(64),
        "patch": 0.02 * math.sqrt(588) / math.sqrt(48),
        "predictor": 0.02 * math.sqrt(384) / math.sqrt(32),
    }
    weights = {
        "encoder": torch.cat([enc.blocks[0].attn.qkv.weight.flatten(), enc.blocks[1].mlp.fc2.weight.flatten()]),
        "patch": enc.patch_embed.proj.weight.flatten(),
        "predictor": torch.cat([pred.embed.weight.flatten(), pred.blocks[0].mlp.fc1.weight.flatten()]),
    }
    for part, w in weights.items():
        assert w.std().item() == pytest.approx(expected[part], rel=0.1), part
    assert pred.mask_token.std().item() == pytest.approx(expected["predictor"], rel=0.3)
    assert not enc.blocks[0].attn.qkv.bias.any() and not pred.proj.bias.any()
    # the target encoder starts as an exact copy
    for a, b in zip(method.encoder.parameters(), method.target_encoder.parameters(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- evaluation and export


def test_the_evaluated_encoder_is_the_target_encoder_on_mean_pooled_tokens():
    method = tiny()
    assert method.evaluated_encoder is method.target_encoder
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = pooled_features(method.target_encoder, images, "mean")
        torch.testing.assert_close(pooled, method.target_encoder(images).tokens.mean(dim=1))  # no prefix tokens
        timm_pooled = method.target_encoder.vit.forward_head(method.target_encoder.vit.forward_features(images))
        torch.testing.assert_close(timm_pooled, pooled)  # timm's avg pool gives the same vector
    with pytest.raises(UserError, match="no CLS token"):
        pooled_features(method.target_encoder, images, "cls")


def test_compiled_blocks_follow_a_context_size_that_changes_every_batch():
    """The context's token count is the batch's smallest, new each batch: the compiled blocks
    (encoder, target encoder, predictor) must give eager's loss and gradients at each size."""
    method = tiny()
    images = torch.randn(4, 3, 32, 32)
    draws = [ijepa_multiblock_masks(4, (8, 8), min_keep=4) for _ in range(3)]
    assert len({m.context_idx.shape[1] for m in draws}) > 1

    def step(masks):
        method.zero_grad()
        loss = method(images, masks).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    eager = [step(m) for m in draws]
    assert compile_blocks(method, backend="aot_eager") == 2 + 2 + 1  # context and target encoders, predictor
    for (want_loss, want_grads), masks in zip(eager, draws, strict=True):
        loss, grads = step(masks)
        torch.testing.assert_close(loss, want_loss)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_evaluating_the_cls_token_stops_before_training(numbered_shards):
    shards, _ = numbered_shards
    callback = EvaluationCallback(train_shards=str(shards), val_shards=str(shards))  # pooling: cls by default
    with pytest.raises(UserError, match="pooling: mean"):
        callback.setup(None, tiny(), "fit")
