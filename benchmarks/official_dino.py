"""The official DINO code on scikit-learn's digits, at the DINO quickstart's scale.

Does DINO's own implementation keep its teacher from going uniform on real grey digits, where
ssl-vit's DINO quickstart does not? This trains facebookresearch/dino's modules (``VisionTransformer``,
``DINOHead``, ``MultiCropWrapper``, ``DINOLoss`` with its centring, ``utils.cosine_scheduler``,
``clip_gradients``, ``cancel_gradients_last_layer``) with ``main_dino.py``'s training step and
defaults (teacher temperature 0.04, momentum 0.996 -> 1, lr 5e-4 x batch / 256 with 10 warm-up
epochs, weight decay 0.04 -> 0.4, gradient clip 3, last layer frozen for the first epoch, global
crops 0.4-1, local crops 0.05-0.4, its augmentations), scaled to the quickstart: a 4-block 128-d
ViT with 8-px patches at 32 px, two 24-px local crops, batch 128, 156 steps, on the digits split
as ``quality.py`` splits them. Each step records the teacher's targets as the loss uses them
(softmax of the centred teacher output over the temperature): their mean entropy over ln K, and
whether ssl-vit's check would call them uniform (above ln K - ln 2). k-NN (k=20, T=0.07, cosine)
of the teacher backbone's CLS features on the 300 validation digits, at the start and the end.

    git clone https://github.com/facebookresearch/dino /tmp/dino
    python benchmarks/official_dino.py --dino_repo /tmp/dino                    # quickstart head, seeds 0 1 2
    python benchmarks/official_dino.py --dino_repo /tmp/dino --head paper --seeds 0

Writes benchmarks/results/official_dino_cpu.json (rows of other heads and seeds are kept).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import write_result
from PIL import Image
from quality import DIGITS_VAL_EVERY
from torchvision import transforms

#: DINOHead sizes: out_dim, hidden_dim, bottleneck_dim
HEADS = {"quickstart": (1024, 256, 64), "paper": (65536, 2048, 256)}
BATCH, LOCAL_CROPS, LOCAL_SIZE = 128, 2, 24


def digits() -> tuple[list[Image.Image], np.ndarray, list[Image.Image], np.ndarray]:
    """The 8 x 8 digits as 32-px RGB images, bicubic-upscaled, split as quality.py writes them."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [
        Image.fromarray((grey * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC).convert("RGB")
        for grey in data.images
    ]
    val = np.arange(len(images)) % DIGITS_VAL_EVERY == 0
    pick = lambda mask: [img for img, m in zip(images, mask, strict=True) if m]  # noqa: E731
    return pick(~val), data.target[~val], pick(val), data.target[val]


def crops(utils):
    """main_dino.py's DataAugmentationDINO at 32 px (global) and LOCAL_SIZE px (local crops)."""
    flip_and_jitter = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ]
    )
    normalise = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    resized = lambda size, scale: transforms.RandomResizedCrop(size, scale=scale, interpolation=Image.BICUBIC)  # noqa: E731
    first = transforms.Compose([resized(32, (0.4, 1.0)), flip_and_jitter, utils.GaussianBlur(1.0), normalise])
    second = transforms.Compose(
        [resized(32, (0.4, 1.0)), flip_and_jitter, utils.GaussianBlur(0.1), utils.Solarization(0.2), normalise]
    )
    local = transforms.Compose(
        [resized(LOCAL_SIZE, (0.05, 0.4)), flip_and_jitter, utils.GaussianBlur(p=0.5), normalise]
    )
    return [first, second] + [local] * LOCAL_CROPS, normalise


@torch.no_grad()
def knn_top1(backbone, view, train, train_labels, val, val_labels, k: int = 20, temperature: float = 0.07) -> float:
    def features(images):
        return F.normalize(
            torch.cat(
                [backbone(torch.stack([view(i) for i in images[s : s + 256]])) for s in range(0, len(images), 256)]
            ),
            dim=1,
        )

    similarity, nearest = (features(val) @ features(train).T).topk(k, dim=1)
    votes = torch.zeros(len(val), 10).scatter_add_(
        1, torch.as_tensor(train_labels)[nearest], (similarity / temperature).exp()
    )
    return round(float((votes.argmax(1) == torch.as_tensor(val_labels)).float().mean() * 100), 1)


def run(dino: str, head: str, seed: int, steps: int) -> dict:
    sys.path.insert(0, dino)
    import utils
    import vision_transformer as vits
    from main_dino import DINOLoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, train_labels, val, val_labels = digits()
    transforms_per_crop, view = crops(utils)
    out_dim, hidden, bottleneck = HEADS[head]
    vit = dict(img_size=[32], patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4, qkv_bias=True)
    student = utils.MultiCropWrapper(
        vits.VisionTransformer(**vit, drop_path_rate=0.1),
        vits.DINOHead(128, out_dim, use_bn=False, norm_last_layer=True, hidden_dim=hidden, bottleneck_dim=bottleneck),
    )
    teacher = utils.MultiCropWrapper(
        vits.VisionTransformer(**vit),
        vits.DINOHead(128, out_dim, use_bn=False, hidden_dim=hidden, bottleneck_dim=bottleneck),
    )
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False

    per_epoch = len(train) // BATCH  # main_dino's loader drops the last batch
    epochs = math.ceil(steps / per_epoch)
    loss_fn = DINOLoss(out_dim, 2 + LOCAL_CROPS, 0.04, 0.04, 0, epochs)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    lr = utils.cosine_scheduler(5e-4 * BATCH / 256, 1e-6, epochs, per_epoch, warmup_epochs=min(10, epochs))
    wd = utils.cosine_scheduler(0.04, 0.4, epochs, per_epoch)
    momentum = utils.cosine_scheduler(0.996, 1, epochs, per_epoch)
    start = knn_top1(teacher.backbone, view, train, train_labels, val, val_labels)
    entropies, losses, step = [], [], 0
    while step < steps:
        order = rng.permutation(len(train))
        for b in range(per_epoch):
            if step >= steps:
                break
            batch = [train[j] for j in order[b * BATCH : (b + 1) * BATCH]]
            images = [torch.stack([t(img) for img in batch]) for t in transforms_per_crop]
            epoch = step // per_epoch
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = lr[step]
                if i == 0:  # only the regularised group
                    group["weight_decay"] = wd[step]
            teacher_output, student_output = teacher(images[:2]), student(images)
            targets = F.softmax((teacher_output - loss_fn.center) / loss_fn.teacher_temp_schedule[epoch], dim=-1)
            entropies.append(float(-(targets * targets.clamp_min(1e-12).log()).sum(1).mean()) / math.log(out_dim))
            loss = loss_fn(student_output, teacher_output, epoch)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            utils.clip_gradients(student, 3.0)
            utils.cancel_gradients_last_layer(epoch, student, 1)
            optimizer.step()
            with torch.no_grad():
                for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                    pt.mul_(momentum[step]).add_((1 - momentum[step]) * ps.detach())
            step += 1
            if step % 20 == 0:
                print(f"{head} seed {seed} step {step}: loss {loss.item():.3f}, entropy / ln K {entropies[-1]:.3f}")
    uniform = [e > 1 - math.log(2) / math.log(out_dim) for e in entropies]
    return {
        "head": head,
        "seed": seed,
        "steps": steps,
        "out_dim": out_dim,
        "hidden_dim": hidden,
        "bottleneck_dim": bottleneck,
        "knn_k20_start": start,
        "knn_k20_end": knn_top1(teacher.backbone, view, train, train_labels, val, val_labels),
        "uniform_steps": sum(uniform),
        "first_uniform_step": uniform.index(True) if any(uniform) else None,
        "teacher_entropy_first_last": [round(entropies[0], 3), round(entropies[-1], 3)],
        "loss_last_10_mean": round(sum(losses[-10:]) / 10, 3),
        "ln_k": round(math.log(out_dim), 3),
        "teacher_entropy_every_10": [round(e, 3) for e in entropies[::10]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dino_repo", required=True, help="a checkout of facebookresearch/dino")
    parser.add_argument("--head", choices=list(HEADS), nargs="+", default=["quickstart"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=156)
    args = parser.parse_args()
    if not (Path(args.dino_repo) / "main_dino.py").is_file():
        parser.error(f"--dino_repo {args.dino_repo} has no main_dino.py; give a checkout of facebookresearch/dino")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)  # DINOLoss all-reduces its centre
    torch.set_num_threads(2)
    rows = [run(args.dino_repo, head, seed, args.steps) for head in args.head for seed in args.seeds]
    print(write_result("official_dino", "cpu", rows, keep=("head", "seed")))


if __name__ == "__main__":
    main()
