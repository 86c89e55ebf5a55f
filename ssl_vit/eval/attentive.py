"""Attentive probe, V-JEPA's protocol (``src/models/attentive_pooler.py``, the frozen image
classification eval, ``evals/image_classification_frozen``): one learnable query cross-attends to
the frozen encoder's patch tokens, one MLP on the query, then a linear classifier. It reads what the patch
tokens hold without needing the CLS token to summarise it, which is why masked-image and
latent-prediction encoders score far higher with it than with a linear probe on CLS."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from ssl_vit.eval.linear import train_probe_head


class AttentiveProbeHead(nn.Module):
    """V-JEPA's ``AttentiveClassifier`` at depth 1: ``q = query + CrossAttn(q, LN(tokens))``,
    ``q = q + MLP(LN(q))``, ``logits = Linear(q)``. Its cross-attention has no output projection:
    V-JEPA's ``CrossAttention`` builds one but its forward never applies it (V-JEPA 2 dropped it).
    Pooler weights truncated-normal (std 0.02), biases 0, the MLP's output layer divided by sqrt(2)
    as ``_rescale_blocks`` does; the classifier keeps PyTorch's default initialisation, as there."""

    def __init__(self, dim: int, num_heads: int, num_classes: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive probe: {num_heads} heads do not divide the feature width {dim}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_tokens = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_query = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.mlp.fc2.weight.div_(math.sqrt(2.0))
        self.linear = nn.Linear(dim, num_classes)

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, N, D) patch tokens -> (B, D): the query after the cross-attention block."""
        b, n, d = tokens.shape
        h = self.num_heads
        k, v = self.kv(self.norm_tokens(tokens)).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        q = self.q(self.query).reshape(1, h, 1, d // h).expand(b, -1, -1, -1)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        query = self.query + attended
        query = query + self.mlp(self.norm_query(query))
        return query[:, 0]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.linear(self.pool(tokens))


def train_attentive_probe(
    epoch_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    dim: int,
    num_heads: int,
    num_classes: int,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    final_weight_decay: float = 1e-6,
    warmup_epochs: float = 0,
    device: torch.device | str = "cpu",
) -> AttentiveProbeHead:
    """V-JEPA's optimisation (``configs/evals/vitl16_in1k.yaml``, ``eval.py``): AdamW, lr 1e-3 for
    its global batch of 1024 with no warm-up and cosine to 0, weight decay on every tensor of more
    than one dimension (the query too, not biases or norms) from 1e-3 down a cosine to 1e-6,
    gradient norm clipped at 1, 20 epochs."""
    head = AttentiveProbeHead(dim, num_heads, num_classes).to(device)
    decayed = [p for p in head.parameters() if p.ndim > 1]
    exempt = [p for p in head.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}], lr=lr
    )
    return train_probe_head(
        head, opt, epoch_batches, steps_per_epoch, epochs, lr, warmup_epochs, final_weight_decay, max_grad_norm=1.0
    )
