"""MoCo v3 (Chen et al., 2021), following facebookresearch/moco-v3 ``moco/builder.py`` (ViT).

Queries (base encoder -> projector -> predictor) of each view are matched against keys (momentum
encoder -> momentum projector) of the other view across the whole global batch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_vit.ema import frozen_copy
from ssl_vit.encoder import EncoderConfig
from ssl_vit.heads import projection_mlp
from ssl_vit.losses import info_nce
from ssl_vit.methods.base import SSLMethod
from ssl_vit.schedules import PaperRun, cosine_to


class MoCoV3(SSLMethod):
    """MoCo v3 pretraining (Chen et al., 2021).

    Defaults are the paper's ViT-B/16 settings: projector 3 x 4096 -> 256
    and predictor 2 x 4096 -> 256 (BatchNorm; use ``trainer.sync_batchnorm`` across GPUs),
    temperature 0.2 with the loss scaled by 2T, momentum 0.99 -> 1 (cosine), a frozen random
    patch projection, fixed sin-cos positions, AdamW with lr 1.5e-4 x batch / 256 and wd 0.1,
    40 warm-up epochs. Set ``encoder.weight_init: moco`` for the paper's initialisation."""

    #: the ViT recipe: 300 epochs (40 warm-up), batch 4096
    paper_run = PaperRun(epochs=300, steps_per_epoch=1281167 // 4096)

    # The official linear probe (main_lincls.py) and conversion (convert_to_deit.py) keep base_encoder.
    encoders: ClassVar[dict[str, str]] = {"base": "encoder", "momentum": "momentum_encoder"}
    ema_targets: ClassVar[dict[str, str]] = {"momentum_encoder": "encoder", "momentum_projector": "projector"}

    def __init__(
        self,
        encoder: EncoderConfig,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        temperature: float = 0.2,
        momentum: float = 0.99,
        freeze_patch_embed: bool = True,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.1,
        warmup_epochs: float = 40,
        min_lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        init_from: str | None = None,
        scale_to_run: bool = True,
    ) -> None:
        super().__init__(
            encoder,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            betas=betas,
            init_from=init_from,
            scale_to_run=scale_to_run,
        )
        enc = self.encoder
        enc.fix_sincos_pos_embed()
        proj = enc.vit.patch_embed.proj
        bound = math.sqrt(6.0 / float(3 * math.prod(proj.kernel_size) + enc.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        if freeze_patch_embed:  # the paper's fix for training instability: a random, frozen patch projection
            proj.requires_grad_(False)
        self.projector = projection_mlp(3, enc.embed_dim, hidden_dim, out_dim)
        self.predictor = projection_mlp(2, out_dim, hidden_dim, out_dim)
        self.momentum_encoder = frozen_copy(self.encoder)
        self.momentum_projector = frozen_copy(self.projector)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        return True  # main_moco.py: AdamW over model.parameters(), norms and biases too

    def ema_momentum(self, step: int) -> float:
        # The official code updates at the start of each iteration, before the keys, with that
        # iteration's momentum; updating after step k with step k+1's momentum is the same.
        start = self.run_momentum(self.hparams.momentum)
        return cosine_to(step + 1, int(self.trainer.estimated_stepping_batches), start, 1.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x1, x2), _ = batch
        q1 = self.predictor(self.projector(self.encoder(x1).cls))
        q2 = self.predictor(self.projector(self.encoder(x2).cls))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1).cls)
            k2 = self.momentum_projector(self.momentum_encoder(x2).cls)
        t = self.hparams.temperature
        loss = info_nce(q1, k2, t) + info_nce(q2, k1, t)
        self.watch_collapse(q1)
        self.log("train/loss", loss, prog_bar=True)
        return loss
