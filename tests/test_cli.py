"""The ``ssl-vit`` command as a user runs it: bad recipes stop with one line, pretraining writes a
checkpoint, and re-running with ``--ckpt_path last`` resumes at the saved step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart" / "mae.yaml"
TINY = [
    "--model.init_args.encoder.embed_dim=32",
    "--model.init_args.encoder.depth=1",
    "--model.init_args.encoder.num_heads=2",
    "--model.init_args.decoder_dim=16",
    "--model.init_args.decoder_depth=1",
    "--data.batch_size=32",
    "--data.samples_per_epoch=128",
    "--data.num_workers=1",
    "--data.shuffle_buffer=64",
]


def ssl_vit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_vit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    result = ssl_vit("shards", "embedded", str(root), cwd=root.parent)
    assert result.returncode == 0, result.stderr
    assert "wrote 5000 samples of 10 classes in 20 shards" in result.stdout
    return root


@pytest.mark.parametrize("where", ["recipe", "command line"])
def test_unknown_recipe_key_stops_before_any_work(tmp_path, where):
    if where == "recipe":
        recipe = tmp_path / "typo.yaml"
        recipe.write_text(RECIPE.read_text().replace("batch_size:", "batch_sise:"))
        result = ssl_vit("pretrain", "--config", str(recipe), cwd=tmp_path)
    else:
        result = ssl_vit("pretrain", "--config", str(RECIPE), "--data.batch_sise=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown recipe key 'data.batch_sise'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_missing_shards_stop_with_one_message(tmp_path):
    result = ssl_vit(
        "pretrain",
        "--config",
        str(RECIPE),
        "--data.train_shards=/nonexistent/train-{0..3}.tar",
        "--data.generate_embedded=false",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "4 of 4 shards of '/nonexistent/train-{0..3}.tar' are missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_pretrain_writes_a_checkpoint_and_resumes_at_its_step(tmp_path, shapes):
    args = ["pretrain", "--config", str(RECIPE), f"--data.train_shards={shapes / 'train'}", *TINY]
    first = ssl_vit(*args, "--trainer.max_epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "runs/quickstart/mae/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4  # 128 samples / batch 32

    second = ssl_vit(*args, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint" in second.stdout + second.stderr
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 8 and resumed["epoch"] == ckpt["epoch"] + 1
    assert resumed["optimizer_states"][0]["state"]  # AdamW moments came along


def test_shards_refuses_to_overwrite(tmp_path, shapes):
    result = ssl_vit("shards", "embedded", str(shapes), cwd=tmp_path)
    assert result.returncode == 2 and "already exists" in result.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(recipe, tmp_path):
    result = ssl_vit("pretrain", "--config", str(recipe), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "class_path: ssl_vit.methods." in result.stdout
