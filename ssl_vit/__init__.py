"""ssl-vit: self-supervised pretraining for Vision Transformers on timm and Lightning."""

from ssl_vit.export import export_encoder, load_encoder

__version__ = "0.1.0"
__all__ = ["export_encoder", "load_encoder"]
