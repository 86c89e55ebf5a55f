"""One file per objective; each is a LightningModule built on :class:`SSLMethod`."""

from typing import Any

from ssl_vit.methods.base import SSLMethod
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.dinov2 import DINOv2
from ssl_vit.methods.dinov3 import DINOv3
from ssl_vit.methods.dinov3_distill import DINOv3Distill
from ssl_vit.methods.distill import Distill
from ssl_vit.methods.ijepa import IJEPA
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.mocov3 import MoCoV3
from ssl_vit.methods.simclr import SimCLR
from ssl_vit.methods.simmim import SimMIM

__all__ = [
    "CLIP",
    "DINO",
    "IJEPA",
    "MAE",
    "DINOv2",
    "DINOv3",
    "DINOv3Distill",
    "Distill",
    "MoCoV3",
    "SSLMethod",
    "SimCLR",
    "SimMIM",
]


def __getattr__(name: str) -> Any:
    # CLIP's text tower is open_clip's: imported when a recipe names it (the `clip` extra), not
    # by every other objective's run.
    if name == "CLIP":
        from ssl_vit.methods.clip import CLIP

        return CLIP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
