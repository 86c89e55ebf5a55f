"""SimCLR (Chen et al., 2020) on a ViT: NT-Xent between the projections of two views of each
image, with negatives from the whole global batch."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ssl_vit.encoder import EncoderConfig
from ssl_vit.heads import projection_mlp
from ssl_vit.losses import nt_xent
from ssl_vit.methods.base import SSLMethod
from ssl_vit.schedules import PaperRun


class SimCLR(SSLMethod):
    """SimCLR pretraining (Chen et al., 2020).

    Encoder CLS -> projection MLP (3 layers, BatchNorm) -> NT-Xent with
    temperature 0.1. Optimiser settings follow the ViT SimCLR baseline of MoCo v3 (AdamW, lr
    1.5e-4 x batch / 256, wd 0.1, 40 warm-up epochs)."""

    #: MoCo v3's ViT baseline: 300 epochs (40 warm-up), batch 4096
    paper_run = PaperRun(epochs=300, steps_per_epoch=1281167 // 4096)

    def __init__(
        self,
        encoder: EncoderConfig,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        temperature: float = 0.1,
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
        self.projector = projection_mlp(3, self.encoder.embed_dim, hidden_dim, out_dim)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x1, x2), _ = batch
        z1 = self.projector(self.encoder(x1).cls)
        z2 = self.projector(self.encoder(x2).cls)
        loss = nt_xent(z1, z2, self.hparams.temperature)
        self.watch_collapse(z1)
        self.log("train/loss", loss, prog_bar=True)
        return loss
