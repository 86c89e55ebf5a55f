"""k-NN evaluation time and memory at growing training-bank size N, chunked (ssl-vit's default,
memory O(chunk x N)) against one unchunked pass (the full test x train similarity matrix), side by
side in one run. Each measurement runs in a fresh process so its peak memory is its own.

    python benchmarks/knn_scaling.py                      # CPU sizes; GPU sizes when CUDA is there
    python benchmarks/knn_scaling.py --sizes 10000 50000 --test 2000

Writes benchmarks/results/knn_scaling_<device>.json (device, versions, commit, rows).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import write_result

from ssl_vit.eval.knn import knn_classify


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure_one(n_train: int, n_test: int, dim: int, chunk: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n_train, dim, generator=g).to(device)
    test = torch.randn(n_test, dim, generator=g)
    train_labels, test_labels = torch.randint(0, 1000, (n_train,)), torch.randint(0, 1000, (n_test,))
    knn_classify(train[:1000], train_labels[:1000], test[:64], test_labels[:64], 1000, chunk_size=64)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mib()
    start = time.perf_counter()
    knn_classify(train, train_labels, test, test_labels, 1000, chunk_size=chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": time.perf_counter() - start, "working_mib": max(0.0, peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--test", type=int, default=2000, help="number of test features")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--one", type=int, nargs=2, metavar=("N", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.test, args.dim, args.one[1], device)))
        return
    sizes = args.sizes or ([10_000, 50_000, 100_000, 200_000] if device == "cpu" else [100_000, 400_000, 1_281_167])
    rows = []
    for n in sizes:
        row = {"n_train": n, "n_test": args.test, "dim": args.dim, "chunk": args.chunk}
        for name, chunk in (("chunked", args.chunk), ("unchunked", args.test)):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(n),
                str(chunk),
                "--test",
                str(args.test),
                "--dim",
                str(args.dim),
            ]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            row[f"{name}_seconds"] = round(out["seconds"], 3)
            row[f"{name}_working_mib"] = round(out["working_mib"], 1)
        row["chunk_similarity_mib"] = round(args.chunk * n * 4 / 2**20, 1)  # one chunk's float32 similarities
        row["memory_ratio_unchunked_over_chunked"] = round(
            row["unchunked_working_mib"] / max(row["chunked_working_mib"], 1e-3), 1
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = write_result("knn_scaling", device, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
