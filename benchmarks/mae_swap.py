"""ssl-vit's MAE module against lightly's, in one plain PyTorch loop on the same batches.

Both libraries' MAE pieces are trained in the same loop (constant lr, AdamW, weight decay on every
parameter, lightly's MAETransform crops, plain-pixel MSE on masked patches) on the same batches:

* ``ssl-vit`` and ``lightly-same-init``: lightly's modules start from ssl-vit's initial weights
  and see ssl-vit's masks. If the modules compute the same thing, their losses and accuracies agree
  to float rounding at every step: any gap left is a difference in the code.
* ``lightly``: lightly's modules with their own initialisation and masking. Across seeds, the
  spread of ``ssl-vit`` and ``lightly`` is the noise a single-seed comparison carries.

The same-init pairing runs on the first seed only: it either holds at every step or it does not.

    python benchmarks/mae_swap.py                                 # both embedded datasets, seeds 0 1 2
    python benchmarks/mae_swap.py --datasets glyphs --seeds 0 --steps 50

Writes benchmarks/results/mae_swap_cpu.json (rows of datasets this invocation did not run are kept).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from common import write_result
from quality import EMBEDDED, evaluate
from torch import Tensor, nn

from ssl_vit.data.pipeline import ShardDataset
from ssl_vit.data.shards import resolve_shards, write_embedded_shards
from ssl_vit.masking import PatchMask, random_patch_mask
from ssl_vit.methods import MAE
from ssl_vit.patches import patchify

#: the held-out study's encoder: timm ViT-Tiny at 6 blocks, 4-px patches, 32 px
ENCODER = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 6}


class SslVitPieces(nn.Module):
    """ssl-vit's ``MAE`` module: its encoder, masking, decoder, initialisation and loss."""

    def __init__(self, mae: MAE) -> None:
        super().__init__()
        self.mae = mae
        self.encoder = mae.encoder

    def encode(self, images: Tensor, mask: PatchMask) -> Tensor:
        return self.encoder(images, keep_idx=mask.keep_idx).tokens

    def decode(self, tokens: Tensor, mask: PatchMask) -> Tensor:
        """Predicted pixels of the masked patches, in ascending patch order."""
        pred = self.mae.decoder(tokens, mask.restore_idx)
        return _masked_rows(pred, mask)


class LightlyPieces(nn.Module):
    """lightly's MaskedVisionTransformerTIMM and MaskedVisionTransformerDecoderTIMM, with the
    example's decoder embedding and prediction head; from ``like``'s weights if given."""

    def __init__(self, mae: MAE, like: bool) -> None:
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from lightly.models.modules.masked_vision_transformer_timm import init_weights

        super().__init__()
        self.encoder = copy.deepcopy(mae.encoder)
        init = "skip" if like else ""
        self.backbone = MaskedVisionTransformerTIMM(
            vit=self.encoder.vit, weight_initialization=init, pos_embed_initialization="skip" if like else "sincos"
        )
        dec = mae.decoder
        dim = dec.embed.out_features
        self.decoder_embed = nn.Linear(self.encoder.embed_dim, dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.encoder.num_patches,
            embed_dim=dim,
            depth=len(dec.blocks),
            num_heads=dec.blocks[0].attn.num_heads,
            num_prefix_tokens=1,
            initialize_weights=not like,
        )
        self.prediction_head = nn.Linear(dim, dec.pred.out_features)
        if like:  # the same initial weights as ssl-vit's decoder
            self.decoder_embed.load_state_dict(dec.embed.state_dict())
            self.prediction_head.load_state_dict(dec.pred.state_dict())
            state = {k: v for k, v in dec.state_dict().items() if not k.startswith(("embed.", "pred."))}
            self.decoder.load_state_dict(state)
        else:
            self.decoder_embed.apply(init_weights)
            self.prediction_head.apply(init_weights)

    def encode(self, images: Tensor, mask: PatchMask) -> Tensor:
        return self.backbone.encode(images=images, idx_keep=_lightly_keep(mask))

    def decode(self, tokens: Tensor, mask: PatchMask) -> Tensor:
        from lightly.models import utils

        x = self.decoder_embed(tokens)
        full = utils.set_at_index(x.new_zeros(x.shape[0], mask.mask.shape[1] + 1, x.shape[-1]), _lightly_keep(mask), x)
        idx_mask = _masked_idx(mask) + 1
        return self.prediction_head(utils.get_at_index(self.decoder(full, idx_mask=idx_mask), idx_mask))


def _masked_idx(mask: PatchMask) -> Tensor:
    return mask.mask.argsort(dim=1, stable=True)[:, mask.keep_idx.shape[1] :]


def _masked_rows(x: Tensor, mask: PatchMask) -> Tensor:
    idx = _masked_idx(mask)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _lightly_keep(mask: PatchMask) -> Tensor:
    """lightly's idx_keep for ssl-vit's mask: the class token (index 0) then the kept patches + 1."""
    cls = torch.zeros_like(mask.keep_idx[:, :1])
    return torch.cat([cls, mask.keep_idx + 1], dim=1)


def lightly_mask(batch: int, num_patches: int) -> PatchMask:
    """lightly's random_token_mask, as a PatchMask."""
    from lightly.models import utils

    idx_keep, idx_mask = utils.random_token_mask(size=(batch, num_patches + 1), mask_ratio=0.75)
    shuffle = torch.cat([idx_keep[:, 1:], idx_mask], dim=1) - 1
    mask = torch.ones(batch, num_patches)
    mask.scatter_(1, idx_keep[:, 1:] - 1, 0.0)
    return PatchMask(idx_keep[:, 1:] - 1, shuffle.argsort(dim=1), mask)


def batches(data: Path, steps: int, batch_size: int, seed: int) -> list[Tensor]:
    """The run's batches, drawn once so that every variant of a seed sees the same images and crops."""
    from lightly.transforms import MAETransform

    transform = MAETransform(input_size=ENCODER["img_size"])
    urls, _ = resolve_shards(str(data / "train"))
    torch.manual_seed(seed)
    dataset = ShardDataset(urls, lambda img: transform(img)[0], shuffle_buffer=1000, seed=seed)
    out = []
    while len(out) < steps:
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True):
            out.append(images)
            if len(out) == steps:
                break
    return out


def build(variant: str, seed: int, decoder: tuple[int, int, int]) -> tuple[nn.Module, bool]:
    """The pieces of a variant, and whether it draws lightly's masks."""
    torch.manual_seed(seed)
    dim, depth, heads = decoder
    mae = MAE(
        encoder=ENCODER,
        decoder_dim=dim,
        decoder_depth=depth,
        decoder_heads=heads,
        norm_pix_loss=False,
        scale_to_run=False,
    )
    if variant == "lightly-same-init":
        return LightlyPieces(mae, like=True), False
    if variant == "ssl-vit":
        return SslVitPieces(mae), False
    return LightlyPieces(mae, like=False), True


VARIANTS = ("ssl-vit", "lightly", "lightly-same-init")


def train(variant: str, data: Path, images: list[Tensor], seed: int, args: argparse.Namespace) -> dict:
    model, lightly_masks = build(variant, seed, tuple(args.decoder))
    encoder = model.encoder
    row = {"variant": variant, "seed": seed, "steps": 0, **evaluate(encoder, data, "cls")}
    rows = [row]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    mask_gen = torch.Generator().manual_seed(seed + 1)  # ssl-vit and lightly-same-init draw identical masks
    losses = []
    for step, x in enumerate(images, start=1):
        n = encoder.num_patches
        if lightly_masks:
            mask = lightly_mask(x.shape[0], n)
        else:
            mask = random_patch_mask(x.shape[0], n, 0.75, generator=mask_gen)
        pred = model.decode(model.encode(x, mask), mask)
        loss = nn.functional.mse_loss(pred, _masked_rows(patchify(x, encoder.patch_size), mask))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step in args.eval_at:
            rows.append(
                {"variant": variant, "seed": seed, "steps": step, "loss": losses[-1], **evaluate(encoder, data, "cls")}
            )
    rows[-1]["losses"] = [round(v, 5) for v in losses]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(EMBEDDED), choices=EMBEDDED)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--decoder", nargs=3, type=int, default=[128, 2, 4], metavar=("DIM", "DEPTH", "HEADS"))
    args = parser.parse_args()
    args.eval_at = {args.steps}
    with tempfile.TemporaryDirectory(prefix="ssl-vit-mae-swap-") as tmp:  # the written data goes with it
        work = Path(tmp)
        rows = []
        for name in args.datasets:
            data = work / name
            write_embedded_shards(data, dataset=name)
            for seed in args.seeds:
                images = batches(data, args.steps, args.batch_size, seed)
                for variant in args.variants:
                    if variant == "lightly-same-init" and seed != args.seeds[0]:
                        continue
                    for r in train(variant, data, images, seed, args):
                        rows.append({"dataset": name, **r})
                        print({k: v for k, v in rows[-1].items() if k != "losses"}, file=sys.stderr, flush=True)
    out = write_result(
        "mae_swap", "cpu", rows, keep=("dataset",), lr=args.lr, decoder=args.decoder, batch_size=args.batch_size
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
