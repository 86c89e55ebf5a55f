"""Input-pipeline throughput per loader worker for each objective's views: ssl-vit's streaming
shard pipeline against torchvision's ImageFolder + DataLoader reading the same images as JPEG
files, side by side in one run (each a full pass, worker start-up included).

For views with ``augment_on_device`` the workers only decode, crop and flip; the photometric part
runs batched on the device, and its rate there is timed separately (``device_stage``). Large
photos show the reduced-size JPEG decoding (the shards) against full decoding (ImageFolder).

    python benchmarks/loader_throughput.py                    # 1,000 images of 256 px, 1 and 2 workers
    python benchmarks/loader_throughput.py --size 2048 --images 200 --workers 1   # large photos
    python benchmarks/loader_throughput.py --images 5000 --workers 1 4 8

Writes benchmarks/results/loader_throughput_cpu.json (``..._2048px_cpu.json`` for other sizes):
machine, versions, commit, rows.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import write_result
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from ssl_vit.data import MAEView, MultiCropViews, ShardDataset, SimMIMView, TwoViews, write_shards
from ssl_vit.data.embedded import shapes_image
from ssl_vit.data.shards import resolve_shards

VIEWS = {  # the ImageNet recipes' views
    "MAEView 224": lambda: MAEView(224),
    "SimMIMView 192": lambda: SimMIMView(192),
    "TwoViews 224 (MoCo v3, SimCLR)": lambda: TwoViews(224),
    "MultiCropViews 2x224 + 10x96 (DINO)": lambda: MultiCropViews(224, 96, 10),
    "TwoViews 224, augment_on_device": lambda: TwoViews(224, augment_on_device=True),
    "MultiCropViews 2x224 + 10x96, augment_on_device": lambda: MultiCropViews(224, 96, 10, augment_on_device=True),
}


def write_images(root: Path, n: int, size: int) -> None:
    """The same ``n`` JPEGs (quality 90) as an ImageFolder tree and as tar shards."""
    samples = []
    for i in range(n):
        label = i % 10
        image, *_ = shapes_image(label, np.random.default_rng(i), min(size, 256))
        if size > 256:  # a large photo: drawing the shapes at full size would take minutes
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        folder = root / "imagefolder" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        samples.append(("jpg", buf.getvalue(), label))
    write_shards(
        samples, root / "shards", classes=[f"class{c}" for c in range(10)], source="bench", samples_per_shard=n // 8
    )


def images_per_second(loader: DataLoader) -> tuple[float, int]:
    start, count = time.perf_counter(), 0
    for _, labels in loader:
        count += len(labels)
    return count / (time.perf_counter() - start), count


def device_stage_images_per_second(view, urls: list[str], device: str, batch_size: int = 128) -> float:
    """Images per second through ``view.on_device`` (every crop position) on ``device``."""
    crops, _ = next(iter(DataLoader(ShardDataset(urls, view), batch_size=batch_size)))
    crops = [c.to(device) for c in crops]
    view.on_device(crops)  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        view.on_device(crops)
    sync()
    return repeats * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # each worker decodes and augments on one core, as in training
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images, args.size)
        urls, _ = resolve_shards(str(root / "shards"))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for name, make_view in VIEWS.items():
            view = make_view()
            on_device = getattr(view, "photometric", None)
            device_rate = device_stage_images_per_second(view, urls, device) if on_device else None
            for workers in args.workers:
                shard_loader = DataLoader(
                    ShardDataset(urls, make_view(), shuffle_buffer=500), batch_size=args.batch_size, num_workers=workers
                )
                folder_loader = DataLoader(
                    ImageFolder(str(root / "imagefolder"), transform=make_view()),
                    batch_size=args.batch_size,
                    num_workers=workers,
                    shuffle=True,
                )
                shards, n_shards = images_per_second(shard_loader)
                folder, n_folder = images_per_second(folder_loader)
                assert n_shards == n_folder == args.images
                row = {
                    "view": name,
                    "workers": workers,
                    "ssl_vit_shards_img_per_s_per_worker": round(shards / workers, 1),
                    "torchvision_imagefolder_img_per_s_per_worker": round(folder / workers, 1),
                    "ratio_shards_over_imagefolder": round(shards / folder, 2),
                }
                if device_rate:
                    row[f"device_stage_img_per_s_on_{device}"] = round(device_rate, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    name = "loader_throughput" if args.size == 256 else f"loader_throughput_{args.size}px"
    out = write_result(name, "cpu", rows, images=args.images, jpeg_side=args.size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
