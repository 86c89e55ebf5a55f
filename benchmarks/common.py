"""What every benchmark result records: the machine, the versions, the commit and the command."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def write_result(
    benchmark: str,
    device: str,
    rows: list[dict[str, Any]],
    keep: tuple[str, ...] = (),
    out: Path | None = None,
    **extra: Any,
) -> Path:
    """Write ``benchmarks/results/<benchmark>_<device>.json`` and return its path. With ``keep``
    (row fields), the file's earlier rows whose values of those fields this run did not produce
    stay: a benchmark run in parts (one objective or dataset at a time) adds up to one file.
    ``out`` writes elsewhere (a smoke run's temporary file)."""
    import timm
    import torchvision

    out = out or ROOT / "benchmarks" / "results" / f"{benchmark}_{device}.json"
    check_out(out, benchmark)
    if keep and out.exists():
        ran = {tuple(r[k] for k in keep) for r in rows}
        rows = [r for r in json.loads(out.read_text())["rows"] if tuple(r[k] for k in keep) not in ran] + rows
    record = {
        "benchmark": benchmark,
        "device": device_name(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
        },
        "commit": git_commit(),
        "command": f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
        **extra,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # written aside and renamed: never half a file
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(out)
    return out


def check_out(out: Path, benchmark: str) -> None:
    """Stop, in one line, where ``out`` is a file that is not this benchmark's results: it is
    replaced only by new results."""
    if not out.exists():
        return
    try:
        ours = json.loads(out.read_text()).get("benchmark") == benchmark
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SystemExit(f"{out} is not a {benchmark} results file, and is left as it is; give --out a new file")


def git_commit() -> str:
    """HEAD, with ``-dirty`` when tracked files other than benchmark results have changed since
    (a benchmark run in parts writes its results file between the parts)."""
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return _git("rev-parse", "HEAD") + ("-dirty" if changed else "")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:  # no git where the benchmark runs (a bare GPU machine): the commit stays unknown
        return ""
