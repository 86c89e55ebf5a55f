"""Shards in, views out: the one input pipeline every objective shares."""

from ssl_vit.data.pipeline import ShardDataModule, ShardDataset, decode_sample
from ssl_vit.data.shards import (
    ShardIndex,
    image_folder_samples,
    resolve_shards,
    write_embedded_shards,
    write_shards,
)
from ssl_vit.data.views import EvalView, MAEView, MixedResolutionViews, MultiCropViews, SimMIMView, TwoViews

__all__ = [
    "EvalView",
    "MAEView",
    "MixedResolutionViews",
    "MultiCropViews",
    "ShardDataModule",
    "ShardDataset",
    "ShardIndex",
    "SimMIMView",
    "TwoViews",
    "decode_sample",
    "image_folder_samples",
    "resolve_shards",
    "write_embedded_shards",
    "write_shards",
]
