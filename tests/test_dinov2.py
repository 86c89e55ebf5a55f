"""DINOv2 against its official formulas (facebookresearch/dinov2 ssl_meta_arch.py and
param_groups.py), written out here from the pieces' definitions."""

import inspect
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import ssl_vit.methods.dinov2 as dinov2_module
from ssl_vit import export_encoder
from ssl_vit.data import MultiCropViews
from ssl_vit.encoder import ViTEncoder, compile_blocks
from ssl_vit.errors import UserError
from ssl_vit.methods import DINOv2
from tests.conftest import OBJECTIVES, TINY_ENCODER, fit_briefly
from tests.test_recipe_rules import RECIPES


def tiny(**kwargs) -> DINOv2:
    return DINOv2(TINY_ENCODER, out_dim=32, hidden_dim=24, bottleneck_dim=16, **kwargs)


def masked_step_inputs(monkeypatch, b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """iBOT's masks fixed (10 patches of the first view's second image, 25 of the second view's
    second image) and two 32-px global and two 16-px local crops of ``b`` random images."""
    masks = torch.zeros(2 * b, 64, dtype=torch.bool)  # 32-px crops, 4-px patches
    masks[1, :10] = True
    masks[b + 1, 20:45] = True
    monkeypatch.setattr(dinov2_module, "ibot_masks", lambda *args: masks)
    crops = [torch.randn(b, 3, 32, 32) for _ in range(2)] + [torch.randn(b, 3, 16, 16) for _ in range(2)]
    return masks, crops


def reference_student_loss(method, crops, masks, t_cls, t_patch, ibot_head) -> torch.Tensor:
    """DINO + iBOT + 0.1 x KoLeo of a DINOv2-style student against the given teacher targets, from
    the formulas: the student's global crops are masked (patch embedding replaced by the mask token,
    then positions added), its local crops are not."""
    b = crops[0].shape[0]
    x = method.encoder.vit.patch_embed(torch.cat(crops[:2])).flatten(1, 2)
    side = int(x.shape[1] ** 0.5)
    x = torch.where(masks.unsqueeze(-1), method.mask_token.expand_as(x), x).reshape(2 * b, side, side, -1)
    s = method.encoder.vit.norm(method.encoder.vit.blocks(method.encoder._pos_embed(x)[0]))
    s_cls, s_patch = s[:, 0], s[:, 1:]
    local = method.encoder(torch.cat(crops[2:])).cls
    student = [method.head(c) for c in (*s_cls.chunk(2), *local.chunk(2))]

    def ce(target, logits):
        return -(target * F.log_softmax(logits / 0.1, dim=-1)).sum(-1)

    pairs = [(v, w) for v in range(len(crops)) for w in range(2) if v != w]  # never a view against itself
    dino = sum(ce(t_cls[w], student[v]).mean() for v, w in pairs) / len(pairs)
    counts = [int(c) for c in masks.sum(dim=1) if c > 0]  # masked patches of each masked image, in order
    ibot = sum(part.mean() for part in ce(t_patch, ibot_head(s_patch[masks])).split(counts)) / (2 * b)
    koleo = 0.0
    for view in s_cls.chunk(2):  # nearest neighbour by cosine; nn.PairwiseDistance(eps=1e-8) adds eps to x - y
        z = F.normalize(view, dim=-1)
        nearest = (z @ z.T - 2 * torch.eye(b)).argmax(dim=1)
        koleo = koleo - torch.log((z - z[nearest] + 1e-8).norm(dim=1) + 1e-8).mean()
    return dino + ibot + 0.1 * koleo


def test_loss_is_dino_plus_ibot_plus_koleo_with_the_student_masked_and_the_teacher_not(monkeypatch):
    torch.manual_seed(0)
    method = tiny(centering="mean")  # centre 0 at the start: targets = softmax(teacher / temp)
    with torch.no_grad():  # a teacher that differs from the student, so that no term is trivial
        for p in method.teacher_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        method.mask_token.normal_()
    masks, crops = masked_step_inputs(monkeypatch, b=3)
    method._trainer = None
    monkeypatch.setattr(DINOv2, "teacher_temperature", lambda self: 0.05)
    monkeypatch.setattr(DINOv2, "log", lambda *a, **k: None)
    monkeypatch.setattr(DINOv2, "log_dict", lambda *a, **k: None)
    monkeypatch.setattr(DINOv2, "watch_collapse", lambda *a, **k: None)
    loss = method.training_step((crops, None), 0)

    g = torch.cat(crops[:2])
    with torch.no_grad():
        t = method.teacher_encoder(g)
        t_cls = F.softmax(method.teacher_head(t.cls) / 0.05, dim=-1).chunk(2)
        t_patch = F.softmax(method.teacher_head(t.patches[masks]) / 0.05, dim=-1)
    torch.testing.assert_close(
        loss, reference_student_loss(method, crops, masks, t_cls, t_patch, method.head), atol=1e-5, rtol=1e-5
    )


def test_layer_wise_decay_and_patch_embedding_multiplier():
    method = tiny(layer_decay=0.5, patch_embed_lr_mult=0.2)
    optimizer = method.configure_optimizers()
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    depth = 2
    expected = {
        "encoder.vit.patch_embed.proj.weight": 0.5**3 * 0.2,
        "encoder.vit.pos_embed": 0.5**3,
        "encoder.vit.cls_token": 0.5**3,
        "mask_token": 0.5**3,
        "encoder.vit.blocks.0.attn.qkv.weight": 0.5**2,
        "encoder.vit.blocks.1.ls1.gamma": 0.5 ** (depth + 1 - 2),
        "encoder.vit.norm.weight": 1.0,
        "head.mlp.0.weight": 1.0,
    }
    named = dict(method.named_parameters())
    for name, value in expected.items():
        assert scale[id(named[name])] == pytest.approx(value), name
    decays = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(named["encoder.vit.pos_embed"]) in decays and id(named["mask_token"]) in decays
    assert id(named["encoder.vit.blocks.1.ls1.gamma"]) not in decays  # norms, biases, layer scales do not


def test_lr_follows_the_square_root_rule():
    method = tiny(base_lr=4e-3)
    assert method.lr_batch_scale(4096) == pytest.approx(2.0) and method.lr_batch_scale(256) == pytest.approx(0.5)


def attach_trainer(method: DINOv2, step: int, steps_per_epoch: int = 10, total_steps: int = 1000) -> None:
    """A stand-in trainer: a 100-epoch run (DINOv2's length, so nothing is rescaled) at ``step``."""
    method._trainer = SimpleNamespace(
        num_training_batches=steps_per_epoch,
        accumulate_grad_batches=1,
        estimated_stepping_batches=total_steps,
        global_step=step,
    )


def test_teacher_temperature_is_the_official_per_step_linspace():
    # dinov2/train/train.py build_schedulers: CosineScheduler(base = final = teacher_temp,
    # warmup_iters = total_iters = 30 epochs) is np.linspace(0.04, 0.07, warmup) and then 0.07:
    # the last warm-up step is already at 0.07.
    warmup = 300  # 30 epochs of 10 steps
    official = np.concatenate([np.linspace(0.04, 0.07, warmup), [0.07] * 5])
    method = tiny()
    for step in (0, 1, 150, warmup - 2, warmup - 1, warmup, warmup + 4):
        attach_trainer(method, step)
        assert method.teacher_temperature() == pytest.approx(official[step], rel=1e-12), step


def separate_head(**kwargs) -> DINOv2:
    """A DINOv2 whose iBOT head has its own sizes."""
    return tiny(ibot_separate_head=True, ibot_out_dim=40, ibot_hidden_dim=20, ibot_bottleneck_dim=12, **kwargs)


def test_separate_ibot_head_trains_and_its_teacher_follows_it():
    # The iBOT head as large as the DINO head, so that a teacher following the wrong student
    # module would run and only the values tell it apart.
    torch.manual_seed(0)
    method = tiny(
        ibot_separate_head=True,
        ibot_out_dim=32,
        ibot_hidden_dim=24,
        ibot_bottleneck_dim=16,
        mask_probability=1.0,  # every global crop masked: the iBOT head gets a gradient
        freeze_last_layer_epochs=0,
    )
    student_before = [p.clone() for p in method.ibot_head.parameters()]
    teacher_before = [p.clone() for p in method.teacher_ibot_head.parameters()]
    fit_briefly(method, "multicrop", steps=1)
    student_after = list(method.ibot_head.parameters())
    for before, after in zip(student_before, student_after, strict=True):
        assert not torch.equal(before, after)  # every iBOT-head parameter trained, g included
    m = method.ema_momentum(0)
    assert 0 < m < 1
    teacher_after = list(method.teacher_ibot_head.parameters())
    for before, student, teacher in zip(teacher_before, student_after, teacher_after, strict=True):
        torch.testing.assert_close(teacher, m * before + (1 - m) * student)
    assert not any(p.requires_grad for p in method.teacher_ibot_head.parameters())


def test_the_ibot_head_has_its_own_sizes_and_patch_centre():
    # ssl_default_config.yaml ibot.head_n_prototypes / head_hidden_dim / head_bottleneck_dim:
    # 65536 / 2048 / 256; ssl_meta_arch.py sizes the iBOT loss (its centre) by the iBOT head.
    defaults = inspect.signature(DINOv2).parameters
    sizes = [defaults[f"ibot_{size}"].default for size in ("out_dim", "hidden_dim", "bottleneck_dim")]
    assert sizes == [65536, 2048, 256]
    method = separate_head(centering="mean")
    head = method.ibot_head
    assert head.mlp[0].weight.shape == (20, 64) and head.mlp[-1].weight.shape == (12, 20)
    assert head.last_layer.weight.shape == (40, 12)
    assert method.teacher_ibot_head.last_layer.weight.shape == (40, 12)
    assert method.patch_center.shape == (1, 40) and method.center.shape == (1, 32)
    logged = fit_briefly(method, "multicrop", steps=1).logged_metrics
    assert torch.isfinite(logged["train/ibot_loss"])


def test_prototype_norms_start_at_one_and_train_with_weight_decay():
    # dinov2/layers/dino_head.py fills weight_g with 1 and leaves it trainable; param_groups.py
    # puts it with the last layer, decayed (its name has no "bias", "norm" or "gamma").
    # DINO's vision_transformer.py freezes it (norm_last_layer, main_dino.py's default).
    method = separate_head()
    optimizer = method.configure_optimizers()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for head in (method.head, method.ibot_head):
        g = head.last_layer.parametrizations.weight.original0
        assert g.requires_grad and torch.equal(g, torch.ones_like(g))
        assert group_of[id(g)]["weight_decay"] > 0 and group_of[id(g)]["lr_group"] == "last_layer"
    assert not OBJECTIVES["dino"][0]().head.last_layer.parametrizations.weight.original0.requires_grad
    method = tiny(freeze_last_layer_epochs=0)
    fit_briefly(method, "multicrop", steps=1)
    g = method.head.last_layer.parametrizations.weight.original0
    assert not torch.equal(g, torch.ones_like(g))


def test_last_layers_freeze_by_a_zero_lr_keeping_their_gradients():
    # dinov2/train/train.py: last_layer_lr_schedule is the lr schedule with its first
    # freeze_last_layer_epochs x epoch-length steps at 0, so the frozen last layers' gradients
    # still count in their head's clipping norm and still move AdamW's moments.
    torch.manual_seed(0)
    method = separate_head(mask_probability=1.0)
    last_layers = [p for name, p in method.named_parameters() if ".last_layer." in name and p.requires_grad]
    assert len(last_layers) == 4  # g and v of both heads
    before = [p.clone() for p in last_layers]
    trainer = fit_briefly(method, "multicrop", steps=1)  # step 0 of the first epoch (2 steps)
    optimizer = trainer.optimizers[0]
    for p, start in zip(last_layers, before, strict=True):
        assert torch.equal(p, start)  # lr 0: not moved, not even by weight decay
        assert optimizer.state[p]["exp_avg"].abs().sum() > 0  # but the gradient reached AdamW
    lrs = []  # each step's (last layers' lrs, the other groups' lrs), as AdamW is about to step

    class RecordLr(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            groups = optimizer.param_groups
            last = {g["lr"] for g in groups if g["lr_group"] == "last_layer"}
            lrs.append((last, {g["lr"] for g in groups if g["lr_group"] != "last_layer"}))

    fit_briefly(separate_head(freeze_last_layer_epochs=1), "multicrop", steps=3, callbacks=[RecordLr()])
    assert [last for last, _ in lrs[:2]] == [{0.0}, {0.0}]  # epoch 0: steps 0 and 1 (8 images, batch 4)
    assert min(lrs[1][1]) > 0 and min(lrs[2][0]) > 0  # the rest learn meanwhile; the last layers from epoch 1


def test_dino_keeps_dropping_the_last_layers_gradient():
    # main_dino.py's cancel_gradients_last_layer: grad = None in the frozen epochs, so AdamW skips it.
    method = OBJECTIVES["dino"][0]()
    trainer = fit_briefly(method, "multicrop", steps=1)
    assert method.head.last_layer.parametrizations.weight.original1 not in trainer.optimizers[0].state


def test_gradients_are_clipped_per_module_as_the_official_student_modules():
    # dinov2/train/train.py: for v in model.student.values(): v.clip_grad_norm_(3.0), the student
    # being {backbone (with its mask token), dino_head, ibot_head}.
    torch.manual_seed(0)
    method = separate_head()
    method._trainer = None
    modules = [
        [*method.encoder.parameters(), method.mask_token],
        [*method.head.parameters()],
        [*method.ibot_head.parameters()],
    ]
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(id(p) for module in modules for p in module)
    for p in trainable:
        p.grad = torch.randn_like(p)
    for p in method.head.parameters():  # one module under the threshold: left as it is
        p.grad.mul_(1e-3)
    want = []
    for module in modules:  # torch's clip_grad_norm_ on copies, module by module
        copies = [torch.zeros_like(p, requires_grad=True) for p in module]
        for copy, p in zip(copies, module, strict=True):
            copy.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(copies, 3.0)
        want.append([copy.grad for copy in copies])
    method.clip_objective_gradients()
    for module, clipped in zip(modules, want, strict=True):
        for p, grad in zip(module, clipped, strict=True):
            torch.testing.assert_close(p.grad, grad)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in modules[1]])) < 3.0


def test_patch_centre_is_the_running_mean_of_the_masked_patches_teacher_outputs(monkeypatch):
    # ibot_patch_loss.py reduce_center_update / apply_center_update: centre <- 0.9 centre + 0.1 x
    # the mean of the teacher's head outputs over every masked patch of the batch (not a mean of
    # per-image means), once per step.
    torch.manual_seed(0)
    method = tiny(centering="mean")
    for name in ("log", "log_dict", "watch_collapse"):
        monkeypatch.setattr(DINOv2, name, lambda *a, **k: None)
    monkeypatch.setattr(DINOv2, "teacher_temperature", lambda self: 0.05)
    monkeypatch.setattr(DINOv2, "ema_momentum", lambda self, step: 1.0)  # the teacher stays put
    method._trainer = None
    b = 3
    crops = [torch.randn(b, 3, 32, 32) for _ in range(2)] + [torch.randn(b, 3, 16, 16) for _ in range(2)]
    masks = torch.zeros(2 * b, 64, dtype=torch.bool)
    masks[1, :10] = masks[4, 20:45] = True  # 10 and 25 patches: a mean of image means would differ
    monkeypatch.setattr(dinov2_module, "ibot_masks", lambda *args: masks)
    with torch.no_grad():
        patches = method.teacher_encoder(torch.cat(crops[:2])).patches[masks]
        batch_mean = method.teacher_head(patches).mean(dim=0, keepdim=True)
    want = torch.zeros_like(method.patch_center)
    for _ in range(2):
        method.training_step((crops, None), 0)
        method.after_optimizer_step(0)
        want = 0.9 * want + 0.1 * batch_mean
        torch.testing.assert_close(method.patch_center, want)


def test_drop_path_is_uniform_over_the_blocks_in_the_imagenet_recipes():
    # dinov2/models/vision_transformer.py: drop_path_uniform -> [rate] * depth, where timm ramps
    # linspace(0, rate, depth) and leaves the first block without drop path.
    dinov3 = ["imagenet/dinov3_vit_s16.yaml", "imagenet/dinov3_vit_b16.yaml"]  # timm's Eva blocks
    for recipe in ["imagenet/dinov2_vit_s16.yaml", "imagenet/dinov2_vit_l16.yaml", *dinov3]:
        encoder = yaml.safe_load((RECIPES / recipe).read_text())["model"]["init_args"]["encoder"]
        blocks = ViTEncoder(**{**DINOv2.encoder_defaults, **encoder, "depth": 3}).vit.blocks
        official = [encoder["drop_path_rate"]] * 3
        assert [b.drop_path1.drop_prob for b in blocks] == [b.drop_path2.drop_prob for b in blocks] == official
    ramp = ViTEncoder(**{**TINY_ENCODER, "depth": 3, "drop_path_rate": 0.3}).vit.blocks
    assert isinstance(ramp[0].drop_path1, torch.nn.Identity)  # timm's rule stays the encoder's default
    uniform = {**TINY_ENCODER, "depth": 3, "drop_path_rate": 0.3, "drop_path_uniform": True}
    first = ViTEncoder(**uniform).vit.blocks[0].drop_path1.train()
    kept = first(torch.ones(4000, 1, 1)).flatten() > 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.03)  # the first block drops at 0.3 too
    teacher = DINOv2(uniform, out_dim=32, hidden_dim=24, bottleneck_dim=16).teacher_encoder
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in teacher.vit.blocks)  # the teacher never drops


def test_registers_train_export_and_load_in_timm(tmp_path):
    torch.manual_seed(0)
    method = DINOv2({**TINY_ENCODER, "reg_tokens": 4}, out_dim=32, hidden_dim=24, bottleneck_dim=16)
    trainer = fit_briefly(method, "multicrop", steps=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = export_encoder(tmp_path / "last.ckpt", tmp_path / "export")  # the EMA teacher, as DINOv2 evaluates
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.num_prefix_tokens == 5  # CLS + 4 registers
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), method.teacher_encoder.eval()(x).tokens)
        assert method.teacher_encoder(x).patches.shape == (2, 64, 64)  # registers are not patches


def test_compiled_blocks_compute_the_same_step_with_masks_and_two_crop_sizes(monkeypatch):
    torch.manual_seed(0)
    method = tiny(centering="mean")
    masks = torch.zeros(6, 64, dtype=torch.bool)
    masks[1, :10] = masks[4, 20:45] = True
    monkeypatch.setattr(dinov2_module, "ibot_masks", lambda *args: masks)
    for name in ("log", "log_dict", "watch_collapse"):
        monkeypatch.setattr(DINOv2, name, lambda *a, **k: None)
    monkeypatch.setattr(DINOv2, "teacher_temperature", lambda self: 0.05)
    method._trainer = None
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(2)]

    def step():
        method.zero_grad()
        loss = method.training_step((crops, None), 0)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    want_loss, want_grads = step()
    assert compile_blocks(method, backend="aot_eager") == 2 * 2  # student and teacher encoders
    loss, grads = step()
    torch.testing.assert_close(loss, want_loss)
    assert grads.keys() == want_grads.keys() and "mask_token" in grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "recipe", ["quickstart/dinov2.yaml", "imagenet/dinov2_vit_s16.yaml", "imagenet/dinov2_vit_l16.yaml"]
)
def test_recipes_blur_as_dinov2s_code_does(recipe):
    # dinov2/data/augmentations.py asks GaussianBlur for p = 1.0 / 0.1 / 0.5 (global 1 / global 2 /
    # local), and dinov2/data/transforms.py hands RandomApply 1 - p: what the released
    # checkpoints saw. Solarisation (a plain RandomSolarize) is not inverted.
    official_blur = [1 - p for p in (1.0, 0.1)] + [1 - 0.5]
    args = yaml.safe_load((RECIPES / recipe).read_text())["data"]["view"]["init_args"]
    view = MultiCropViews(**{**args, "augment_on_device": True})
    blur = [augment.blur_p for augment in view.photometric]
    solarize = [augment.solarize_p for augment in view.photometric]
    assert blur == pytest.approx(official_blur[:2] + official_blur[2:] * args["num_local"])
    assert solarize == [0.0, 0.2] + [0.0] * args["num_local"]
    # dinov2/data/transforms.py blurs with a 9-px kernel at 224 and 98 px; the quickstart's 32-px
    # crops keep a kernel of a tenth of the crop, the rule every other multi-view recipe follows.
    kernels = {augment.kernel_size for augment in view.photometric}
    assert kernels == ({9} if recipe.startswith("imagenet/") else {5, 3})


@pytest.mark.parametrize("recipe, gamma", [("quickstart/dinov2.yaml", None), ("imagenet/dinov2_vit_s16.yaml", 1e-5)])
def test_the_imagenet_recipes_keep_dinov2s_layer_scale_and_the_quickstart_has_none(recipe, gamma):
    encoder = yaml.safe_load((RECIPES / recipe).read_text())["model"]["init_args"]["encoder"]
    block = ViTEncoder(**{**DINOv2.encoder_defaults, **encoder, "depth": 1}).vit.blocks[0]
    if gamma is None:
        assert isinstance(block.ls1, torch.nn.Identity) and isinstance(block.ls2, torch.nn.Identity)
    else:
        torch.testing.assert_close(block.ls1.gamma, torch.full_like(block.ls1.gamma, gamma))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"mask_ratio_range": (0.0, 0.5)}, "mask ratios must lie in"),
        ({"mask_ratio_range": (0.5, 0.1)}, "mask ratios must lie in"),
        ({"mask_ratio_range": (0.1, 1.0)}, "mask ratios must lie in"),
        ({"mask_probability": 1.5}, "fraction of global crops masked"),
        ({"mask_probability": 0.0}, "no global crop is masked"),
    ],
)
def test_impossible_ibot_masking_stops_with_one_line(setting, message):
    with pytest.raises(UserError, match=message):
        tiny(**setting)


def test_registers_of_a_non_vit_stop_with_one_line():
    with pytest.raises(UserError, match="cannot build encoder"):
        DINOv2({"name": "resnet18", "reg_tokens": 4}, out_dim=32, hidden_dim=24, bottleneck_dim=16)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "mean"])
def test_without_ibot_the_step_is_dino_plus_koleo(centering):
    # DINOv2's `do_ibot = False`: nothing masked, no iBOT term, no patch centre moved (a mean over
    # no patches would make it NaN), and the unused iBOT head keeps no gradient.
    torch.manual_seed(0)
    method = tiny(mask_probability=0.0, ibot_loss_weight=0.0, ibot_separate_head=True, centering=centering)
    logged = fit_briefly(method, "multicrop").logged_metrics
    assert logged["train/ibot_loss"] == 0.0
    want = logged["train/dino_loss"] + 0.1 * logged["train/koleo_loss"]
    assert logged["train/loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(method.patch_center, torch.zeros_like(method.patch_center))
    assert all(p.grad is None for p in method.ibot_head.parameters())
