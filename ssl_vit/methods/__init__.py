"""One file per objective; each is a LightningModule built on :class:`SSLMethod`."""

from ssl_vit.methods.base import SSLMethod
from ssl_vit.methods.mae import MAE

__all__ = ["MAE", "SSLMethod"]
