"""DINOv2 against its official formulas (facebookresearch/dinov2 ssl_meta_arch.py and
param_groups.py), written out here from the pieces' definitions."""

from types import SimpleNamespace

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
from tests.conftest import TINY_ENCODER, fit_briefly
from tests.test_recipe_rules import RECIPES


def tiny(**kwargs) -> DINOv2:
    return DINOv2(TINY_ENCODER, out_dim=32, hidden_dim=24, bottleneck_dim=16, **kwargs)


def test_loss_is_dino_plus_ibot_plus_koleo_with_the_student_masked_and_the_teacher_not(monkeypatch):
    torch.manual_seed(0)
    method = tiny(centering="mean")  # centre 0 at the start: targets = softmax(teacher / temp)
    with torch.no_grad():  # a teacher that differs from the student, so that no term is trivial
        for p in method.teacher_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        method.mask_token.normal_()
    b, n = 3, 64  # 32-px crops, 4-px patches
    masks = torch.zeros(2 * b, n, dtype=torch.bool)
    masks[1, :10] = True
    masks[4, 20:45] = True
    monkeypatch.setattr(dinov2_module, "ibot_masks", lambda *args: masks)
    crops = [torch.randn(b, 3, 32, 32) for _ in range(2)] + [torch.randn(b, 3, 16, 16) for _ in range(2)]
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
    # the student's masked crops: patch embedding replaced by the mask token, then positions added
    x = method.encoder.vit.patch_embed(g).flatten(1, 2)
    x = torch.where(masks.unsqueeze(-1), method.mask_token.expand_as(x), x).reshape(2 * b, 8, 8, -1)
    s = method.encoder.vit.norm(method.encoder.vit.blocks(method.encoder._pos_embed(x)))
    s_cls, s_patch = s[:, 0], s[:, 1:]
    local = method.encoder(torch.cat(crops[2:])).cls
    student = [method.head(c) for c in (*s_cls.chunk(2), *local.chunk(2))]

    def ce(target, logits):
        return -(target * F.log_softmax(logits / 0.1, dim=-1)).sum(-1)

    pairs = [(v, w) for v in range(4) for w in range(2) if v != w]  # never a view against itself
    dino = sum(ce(t_cls[w], student[v]).mean() for v, w in pairs) / len(pairs)
    patch_ce = ce(t_patch, method.head(s_patch[masks]))
    ibot = (patch_ce[:10].mean() + patch_ce[10:].mean()) / (2 * b)
    koleo = 0.0
    for view in s_cls.chunk(2):  # nearest neighbour by cosine; nn.PairwiseDistance(eps=1e-8) adds eps to x - y
        z = F.normalize(view, dim=-1)
        nearest = (z @ z.T - 2 * torch.eye(b)).argmax(dim=1)
        koleo = koleo - torch.log((z - z[nearest] + 1e-8).norm(dim=1) + 1e-8).mean()
    torch.testing.assert_close(loss, dino + ibot + 0.1 * koleo, atol=1e-5, rtol=1e-5)


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


def test_lr_follows_the_square_root_rule_and_the_teacher_temperature_warms_up_per_step():
    method = tiny(base_lr=4e-3)
    assert method.lr_batch_scale(4096) == pytest.approx(2.0) and method.lr_batch_scale(256) == pytest.approx(0.5)
    temps = []
    for step in (0, 1, 150, 300, 301):  # a 100-epoch run of 10 steps per epoch: 30 warm-up epochs = 300 steps
        method._trainer = SimpleNamespace(
            num_training_batches=10, accumulate_grad_batches=1, estimated_stepping_batches=1000, global_step=step
        )
        temps.append(method.teacher_temperature())
    assert temps == pytest.approx([0.04, 0.04 + 0.03 / 300, 0.055, 0.07, 0.07])


def test_separate_ibot_head_follows_its_own_ema_and_trains():
    method = tiny(ibot_separate_head=True)
    before = method.teacher_ibot_head.mlp[0].weight.clone()
    fit_briefly(method, "multicrop", steps=2)
    assert not torch.equal(method.teacher_ibot_head.mlp[0].weight, before)  # followed the student's
    assert not any(p.requires_grad for p in method.teacher_ibot_head.parameters())


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
