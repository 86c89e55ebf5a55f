"""A run's own checkpoints: written with their SHA-256 and verified before a resume, found in
folders whose names hold glob characters, never another run's, and dead writers' leftovers
removed. The end-to-end cases (a used run folder, a moved one, another run's checkpoints, a
checkpoint with a hole) are in ``tests/fault_injection.py``."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ssl_vit.checkpoint import (
    LOCK_FILE,
    RUN_KEY,
    AtomicCheckpointIO,
    RunCheckpoint,
    checksum_path,
    ending_summary,
    file_sha256,
    files_fingerprint,
    located,
    lock_run_folder,
    newest_complete_checkpoint,
    release_run_folders,
    remove_dead_writers_files,
    resume_mismatch,
)
from ssl_vit.cli.training import changed_settings, default_run_folder
from ssl_vit.data.shards import data_fingerprint, data_location, write_shards
from ssl_vit.errors import UserError
from ssl_vit.export import encoder_state_dict
from tests.conftest import png_bytes, random_images

ENCODER = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1}


def save(folder: Path, name: str, step: int) -> Path:
    path = folder / name
    checkpoint = {"global_step": step, "state_dict": {"w": torch.randn(64, 1024)}}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path


def test_checkpoints_carry_a_sha256_that_sha256sum_reads(tmp_path):
    path = save(tmp_path, "last.ckpt", 1)
    assert checksum_path(path).read_text() == f"{file_sha256(path)}  last.ckpt\n"
    check = subprocess.run(["sha256sum", "-c", "last.ckpt.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_checkpoint_with_a_zeroed_hole_is_passed_over(tmp_path):
    older = save(tmp_path, "epoch=0000-step=1.ckpt", 1)
    newer = save(tmp_path, "last.ckpt", 2)
    os.utime(older, (1, 1))
    data = bytearray(newer.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # the archive's index, at its end, is intact
    newer.write_bytes(bytes(data))
    torch.load(newer, weights_only=True, mmap=True)  # what the old check read: it passes
    with pytest.warns(UserWarning, match="last.ckpt: its content does not match last.ckpt.sha256"):
        assert newest_complete_checkpoint((tmp_path, "*.ckpt")) == older


def test_a_checkpoint_is_hashed_once_per_version(tmp_path, monkeypatch):
    """`ssl-vit knn RUN` found the run's newest checkpoint twice, hashing a multi-GB file each time."""
    import ssl_vit.checkpoint as checkpoint

    hashed = []
    monkeypatch.setattr(checkpoint, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))
    path = save(tmp_path, "last.ckpt", 1)
    assert newest_complete_checkpoint((tmp_path, "*.ckpt")) == path == newest_complete_checkpoint((tmp_path, "*.ckpt"))
    assert len(hashed) == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # rewritten in place: the same size, a new modification time
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a second later
    with pytest.warns(UserWarning, match="its content does not match last.ckpt.sha256"):
        assert newest_complete_checkpoint((tmp_path, "*.ckpt")) is None
    assert len(hashed) == 2


def test_glob_characters_in_a_run_folder_are_taken_literally(tmp_path):
    folder = tmp_path / "exp[1]"
    folder.mkdir()
    path = save(folder, "last.ckpt", 1)
    assert newest_complete_checkpoint((folder, "*.ckpt")) == path


def test_only_dead_writers_temporary_files_on_this_host_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), socket.gethostname().replace(".", "_")
    files = {
        "dead writer": f".last.ckpt.{host}-{dead_pid}.tmp",
        "dead writer, named before hosts were": f".last.ckpt.{dead_pid}.tmp",
        "live writer": f".last.ckpt.{host}-{os.getpid()}.tmp",
        "another host's writer": f".last.ckpt.otherhost-{dead_pid}.tmp",
        "not ours": ".notes.tmp",
        # a user's hidden files in the checkpoint folder, named like a dead writer's (both were removed)
        "a user's, named as a writer's on this host": f".backup.{host}-{dead_pid}.tmp",
        "a user's, named as before hosts were": f".thesis.{dead_pid}.tmp",
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"x")
    removed = {path.name for path in remove_dead_writers_files(tmp_path)}
    assert removed == {files["dead writer"], files["dead writer, named before hosts were"]}
    assert {p.name for p in tmp_path.iterdir()} == set(files.values()) - removed


def checkpoint_of(folder: Path) -> dict:
    return {
        "hyper_parameters": {"encoder": ENCODER, "init_from": None},
        "datamodule_hyper_parameters": {"train_shards": "data/shapes/train"},
        "ssl_vit": {"objective": "MAE"},
        RUN_KEY: {"folder": str(folder.resolve())},
    }


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, None),
        ({"train_shards": "data/shapes/train/"}, None),  # the same folder, as tab completion writes it
        ({"objective": "DINO"}, "its objective is 'MAE', this run's 'DINO'"),
        ({"encoder": {**ENCODER, "depth": 2}}, "its encoder differs in depth (1 there, 2 here)"),
        ({"train_shards": "shards/mine"}, "its train_shards is 'data/shapes/train', this run's 'shards/mine'"),
        ({"init_from": "export/mae"}, "its init_from is None, this run's 'export/mae'"),
        ({"folder": "elsewhere"}, "it was written by the run in"),
    ],
)
def test_a_resume_names_what_differs_from_the_run(tmp_path, change, expected):
    run_folder = tmp_path / "run"
    path = run_folder / "checkpoints/last.ckpt"
    run = {"objective": "MAE", "encoder": ENCODER, "train_shards": "data/shapes/train", "init_from": None}
    run["folder"] = run_folder
    for key, value in change.items():
        run[key] = tmp_path / value if key == "folder" else value
    problem = resume_mismatch(path, checkpoint_of(run_folder), run)
    assert problem == expected if expected is None else expected in problem


def test_a_resume_that_would_train_on_other_images_of_its_data_is_refused(tmp_path, monkeypatch):
    """Without val data a run trains on all but the held-out tenth of its data; given val data
    at a resume, it would train on that tenth too, which its evaluation then no longer holds out."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    ckpt = checkpoint_of(tmp_path / "run")
    ckpt["datamodule_hyper_parameters"] = {"train_shards": "photos", "val_shards": None}
    run = {"objective": "MAE", "encoder": ENCODER, "train_shards": "photos", "val_shards": None, "init_from": None}
    path = tmp_path / "run/checkpoints/last.ckpt"
    assert resume_mismatch(path, ckpt, run) is None
    problem = resume_mismatch(path, ckpt, {**run, "val_shards": "other"})
    assert problem == (
        "it trained on photos#train, and this run would train on photos: data.val_shards None -> other decides "
        "whether the run holds a tenth of its data out"
    )
    ckpt["datamodule_hyper_parameters"]["val_shards"] = "other"  # other val data, the same training images
    assert resume_mismatch(path, ckpt, {**run, "val_shards": "elsewhere"}) is None


def test_a_resume_compares_where_the_data_and_weights_are_not_how_they_were_written(tmp_path, monkeypatch):
    """The checkpoint records where its data and starting weights were: the same folder given from
    elsewhere or as a full path resumes, and another folder of the same name, given from another
    place, does not; timm's names are compared as written."""
    for home in ("a", "b"):
        (tmp_path / home / "photos").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    assert data_location("photos#2/") == str(tmp_path / "a/photos#2")  # a '#' of the folder's own name
    ckpt = checkpoint_of(tmp_path / "run")
    ckpt["datamodule_hyper_parameters"]["train_shards"] = "photos"
    ckpt["hyper_parameters"]["init_from"] = "export"
    ckpt[RUN_KEY] |= {"train_shards": located("train_shards", "photos"), "init_from": located("init_from", "export")}
    run = {"objective": "MAE", "encoder": ENCODER, "folder": tmp_path / "run"}
    path = tmp_path / "run/checkpoints/last.ckpt"
    for written in ("./{}/", str(tmp_path / "a/{}"), "../a/{}"):
        same = {"train_shards": written.format("photos"), "init_from": written.format("export")}
        assert resume_mismatch(path, ckpt, {**run, **same}) is None, same
    assert "its train_shards is 'photos' (" in resume_mismatch(path, ckpt, {**run, "train_shards": "photos#train"})
    monkeypatch.chdir(tmp_path / "b")
    problem = resume_mismatch(path, ckpt, {**run, "train_shards": "photos", "init_from": "export"})
    assert problem == f"its train_shards is 'photos' ({tmp_path / 'a/photos'}), this run's 'photos'"
    assert "its init_from is 'export' (" in resume_mismatch(path, ckpt, {**run, "init_from": "export"})
    ckpt["hyper_parameters"]["init_from"] = "timm:vit_tiny_patch16_224"
    ckpt[RUN_KEY]["init_from"] = located("init_from", "timm:vit_tiny_patch16_224")
    assert ckpt[RUN_KEY]["init_from"] == "timm:vit_tiny_patch16_224"  # a name, not a file of this folder
    assert resume_mismatch(path, ckpt, {**run, "init_from": "timm:vit_tiny_patch16_224"}) is None


def test_data_moved_with_its_files_unchanged_is_the_same_data(tmp_path):
    """A checkpoint records its data's and init_from's fingerprints too: the same files in a new
    place resume; other files in the recorded folder's name do not."""
    old = tmp_path / "old/photos"
    old.mkdir(parents=True)
    for i, array in enumerate(random_images(4)):
        Image.fromarray(array).save(old / f"{i}.png")
    ckpt = checkpoint_of(tmp_path / "run")
    ckpt["datamodule_hyper_parameters"]["train_shards"] = "photos"
    ckpt[RUN_KEY] |= {"train_shards": located("train_shards", str(old)), "train_files": data_fingerprint(str(old))}
    (tmp_path / "new").mkdir()
    new = old.rename(tmp_path / "new/photos")
    run = {"objective": "MAE", "encoder": ENCODER, "folder": tmp_path / "run"}
    path = tmp_path / "run/checkpoints/last.ckpt"
    assert resume_mismatch(path, ckpt, {**run, "train_shards": str(new)}) is None
    Image.fromarray(random_images(1, seed=9)[0]).save(new / "extra.png")
    assert "its train_shards is 'photos' (" in resume_mismatch(path, ckpt, {**run, "train_shards": str(new)})
    # so is the export a run started from (init_from), moved with the project
    export = tmp_path / "old/export"
    export.mkdir()
    for name in ("config.json", "model.safetensors"):
        (export / name).write_text(name)
    ckpt["hyper_parameters"]["init_from"] = "export"
    ckpt[RUN_KEY] |= {
        "init_from": located("init_from", str(export)),
        "init_files": files_fingerprint("init_from", str(export)),
    }
    moved = export.rename(tmp_path / "new/export")
    assert resume_mismatch(path, ckpt, {**run, "init_from": str(moved)}) is None
    (moved / "model.safetensors").write_text("other weights")
    assert "its init_from is 'export' (" in resume_mismatch(path, ckpt, {**run, "init_from": str(moved)})
    # tar shards given as their folder, then as a brace pattern of all its files: the same files
    samples = [("png", png_bytes(image), 0) for image in random_images(4)]
    write_shards(samples, tmp_path / "shards", ["a"], "test", samples_per_shard=2)
    ckpt["datamodule_hyper_parameters"]["train_shards"] = "shards"
    fingerprint = files_fingerprint("train_shards", str(tmp_path / "shards"))
    ckpt[RUN_KEY] |= {"train_shards": located("train_shards", str(tmp_path / "shards")), "train_files": fingerprint}
    pattern = str(tmp_path / "shards/shard-{000000..000001}.tar")
    assert resume_mismatch(path, ckpt, {**run, "train_shards": pattern}) is None


def test_a_moved_run_folder_still_resumes_its_own_checkpoints(tmp_path):
    moved = tmp_path / "moved"
    ckpt = checkpoint_of(tmp_path / "original")
    run = {"objective": "MAE", "encoder": ENCODER, "folder": moved}
    assert resume_mismatch(moved / "checkpoints/last.ckpt", ckpt, run) is None


def test_another_runs_checkpoint_copied_into_a_run_folder_is_not_resumed(tmp_path):
    """It lies inside the run's folder, as a moved run's own checkpoints do; but this run's own
    checkpoints beside it say the folder did not move. Resumed, it carried the other run's step,
    time and random-init numbers into this run's summary."""
    here, other = tmp_path / "runs/photos/simclr", tmp_path / "runs/b"
    run = {"objective": "MAE", "encoder": ENCODER, "folder": here}
    checkpoints = here / "checkpoints"
    for folder, name in ((here, "epoch=0003-step=12.ckpt"), (other, "epoch=0005-step=16.ckpt")):
        AtomicCheckpointIO().save_checkpoint(checkpoint_of(folder), checkpoints / name)
    copied = checkpoints / "epoch=0005-step=16.ckpt"
    problem = resume_mismatch(copied, torch.load(copied, weights_only=True), run)
    assert f"it was written by the run in {other.resolve()}, and epoch=0003-step=12.ckpt beside it by this run" in (
        problem
    )
    (checkpoints / "epoch=0003-step=12.ckpt").unlink()  # the whole folder moved here: its checkpoints are its own
    assert resume_mismatch(copied, torch.load(copied, weights_only=True), run) is None


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_pickled_weights_are_named_in_one_line_without_suggesting_unsafe_loading(tmp_path):
    path = tmp_path / "weights.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _RunsCode()}, f)
    for load in (lambda: encoder_state_dict(path, None), lambda: AtomicCheckpointIO().load_checkpoint(path)):
        with pytest.raises(UserError, match="holds pickled Python objects") as err:
            load()
        assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)


def test_last_checkpoint_holds_the_final_step_when_checkpoints_are_every_n_steps(tmp_path):
    import lightning as L

    from ssl_vit.checkpoint import RunCheckpoint

    from .conftest import OBJECTIVES, _RandomViews

    factory, view = OBJECTIVES["mae"]
    checkpoints = RunCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_last=True, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, callbacks=[checkpoints], enable_progress_bar=False
    )
    trainer.fit(factory(), torch.utils.data.DataLoader(_RandomViews(view), batch_size=2))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_resumed_run_counts_the_seconds_of_its_earlier_sessions():
    """The summary's seconds of a resumed run: the seconds its checkpoint had taken to reach, and
    this session's."""
    state = RunCheckpoint().state_dict()
    assert 0 <= state["seconds"] < 5
    resumed = RunCheckpoint()
    resumed.load_state_dict({**state, "seconds": 1000.0})
    assert 1000.0 <= resumed.seconds() < 1005.0 and RunCheckpoint().seconds() < 5


@pytest.mark.parametrize(
    ("train_shards", "folder"),
    [
        ("data/shapes/train", "runs/shapes/mae"),
        ("photos/", "runs/photos/mae"),
        ("photos#train", "runs/photos/mae"),
        ("set #1", "runs/set-1/mae"),  # a '#' in a folder's own name is part of it
        ("set #2#heldout", "runs/set-2/mae"),
        ("/data/train-{000000..000127}.tar", "runs/data/mae"),
    ],
)
def test_the_run_folder_is_named_after_the_data(train_shards, folder):
    assert default_run_folder(train_shards, "mae") == folder


def test_a_second_run_in_a_folder_in_use_stops_and_a_killed_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from ssl_vit.checkpoint import lock_run_folder as lock; "
            f"lock({str(tmp_path)!r}); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on {socket.gethostname()}"):
            lock_run_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()  # a killed holder leaves its file, but not its lock
    lock_run_folder(tmp_path)
    release_run_folders()
    assert not (tmp_path / LOCK_FILE).exists()  # a run that ends removes its own
    lock_run_folder(tmp_path)
    release_run_folders()


def test_a_folder_on_a_filesystem_without_locks_trains_with_a_warning(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot be locked \\(Function not implemented\\): a second run"):
        lock_run_folder(tmp_path)
    release_run_folders()


def test_a_run_folder_that_cannot_be_written_stops_in_one_line(tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder would be")
    with pytest.raises(UserError, match=r"the run folder .*runs/photos cannot be written \(Not a directory\)"):
        lock_run_folder(tmp_path / "runs/photos")


def test_a_resume_names_the_settings_changed_since_its_checkpoint():
    """A user who meant a new run with a larger batch sees that the old one goes on with it."""
    ckpt = {
        "hyper_parameters": {"_class_path": "ssl_vit.methods.SimCLR", "base_lr": 1e-3, "encoder": {"depth": 4}},
        "datamodule_hyper_parameters": {"batch_size": 32, "view": {"init_args": {"size": 32}}},
    }
    model = SimpleNamespace(hparams={"base_lr": 2e-3, "encoder": {"depth": 4}})
    data = SimpleNamespace(hparams={"batch_size": 32, "view": {"init_args": {"size": 48}}, "new_setting": 1})
    ckpt["datamodule_hyper_parameters"]["train_shards"], data.hparams["train_shards"] = "photos", "./photos/"
    # the hint a distillation recipe gives for its missing teacher is no setting (an older run kept the recipe's)
    ckpt["hyper_parameters"]["teacher_made_by"], model.hparams["teacher_made_by"] = "ssl-vit pretrain ...", None
    assert changed_settings(ckpt, model, data) == ["model.base_lr 0.001 -> 0.002", "data.view.init_args.size 32 -> 48"]
    # the same val folder given by its full path is no change; another folder is
    ckpt["datamodule_hyper_parameters"]["val_shards"], ckpt[RUN_KEY] = "val", {"val_shards": data_location("val")}
    data.hparams["val_shards"] = data_location("val")
    assert changed_settings(ckpt, model, data)[2:] == []
    data.hparams["val_shards"] = "other"
    assert changed_settings(ckpt, model, data)[2:] == ["data.val_shards val -> other"]
    data.hparams["val_shards"] = "val"
    # the evaluation's protocol too: a finished run's table is of the one it kept (its summary, refused)
    from ssl_vit.eval import EvaluationCallback

    kept = EvaluationCallback(train_shards="photos#train", val_shards="photos#heldout", segmentation=True)
    kept.segmentation = False  # as its setup turns the dense probe off on data without label maps
    ckpt["callbacks"] = {kept.state_key: kept.state_dict()}
    same = EvaluationCallback(train_shards="photos#train", val_shards="photos#heldout", segmentation=True)
    assert changed_settings(ckpt, model, data, [same])[2:] == []  # the same recipe: nothing changed
    other = {"pooling": "mean", "num_workers": 1, "segmentation": True}
    asked = EvaluationCallback(train_shards="photos#train", val_shards="photos#heldout", **other)
    assert changed_settings(ckpt, model, data, [asked])[2:] == ["evaluation pooling cls -> mean"]


def test_a_checkpoint_is_saved_though_its_data_is_gone(tmp_path):
    """The data's fingerprint is read at the first save; data moved away mid-run must not stop it."""
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path),
        datamodule=SimpleNamespace(hparams={"train_shards": "gone"}),
        estimated_stepping_batches=10,
        max_steps=10,
        max_epochs=-1,
        gradient_clip_val=None,
        gradient_clip_algorithm=None,
        accumulate_grad_batches=1,
        precision="32-true",
        limit_train_batches=1.0,
        num_devices=1,
        num_nodes=1,
    )
    checkpoint, model = {}, SimpleNamespace(hparams={"init_from": "gone/export"})
    RunCheckpoint(dirpath=tmp_path).on_save_checkpoint(trainer, model, checkpoint)
    assert checkpoint[RUN_KEY]["train_files"] is None and checkpoint[RUN_KEY]["train_shards"].endswith("gone")
    assert checkpoint[RUN_KEY]["init_files"] is None and checkpoint[RUN_KEY]["init_from"].endswith("gone/export")
    assert checkpoint[RUN_KEY]["trained_part"].endswith("gone#train")  # what it trains on, to compare at a resume


def test_the_summary_of_a_run_belongs_to_its_checkpoint_only_at_the_step_it_ended(tmp_path):
    """A finished run trained further and stopped: its last.ckpt is no longer the weights its
    summary.json scored (an export of it reported step 8's accuracy for step 19's weights)."""
    checkpoint = tmp_path / "checkpoints/last.ckpt"
    checkpoint.parent.mkdir()
    summary = {"checkpoint": str(checkpoint), "steps": 8, "val_top1": 24.4, "weights_id": "a"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    hparams = {"encoder": {"name": "vit_tiny_patch16_224"}}
    torch.save(
        {"global_step": 8, "state_dict": {}, "hyper_parameters": hparams, RUN_KEY: {"weights_id": "a"}}, checkpoint
    )
    assert ending_summary(checkpoint) == summary
    torch.save(
        {"global_step": 19, "state_dict": {}, "hyper_parameters": hparams, RUN_KEY: {"weights_id": "a"}}, checkpoint
    )
    assert ending_summary(checkpoint) is None
    # rewound by --ckpt_path, trained again to the same step: other weights
    torch.save(
        {"global_step": 8, "state_dict": {}, "hyper_parameters": hparams, RUN_KEY: {"weights_id": "b"}}, checkpoint
    )
    assert ending_summary(checkpoint) is None


def test_a_val_folder_that_appeared_beside_the_data_since_is_no_silent_change_of_the_training_images(
    tmp_path, monkeypatch
):
    """`data/val` made after a run on `data/train` started: the resume trained on all of data/train,
    the held-out tenth its evaluation had scored included, and nothing said so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/train").mkdir(parents=True)
    ckpt = checkpoint_of(tmp_path / "run")
    ckpt["datamodule_hyper_parameters"] = {"train_shards": "data/train", "val_shards": None}
    ckpt[RUN_KEY] = {**ckpt.get(RUN_KEY, {}), "trained_part": f"{tmp_path}/data/train#train"}
    run = {"objective": "MAE", "encoder": ENCODER, "train_shards": "data/train", "val_shards": None, "init_from": None}
    path = tmp_path / "run/checkpoints/last.ckpt"
    assert resume_mismatch(path, ckpt, run) is None
    (tmp_path / "data/val").mkdir()
    problem = resume_mismatch(path, ckpt, run)
    assert problem is not None and "a val folder beside it decides whether the run holds a tenth" in problem
