"""``--overwrite`` replaces only what ssl-vit wrote: never the current folder, the sources being
read, a checkpoint folder or a folder holding anything else; and a replacement that fails midway
leaves the old output whole."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ssl_vit import export_encoder
from ssl_vit.cli import main
from ssl_vit.data import write_shards
from ssl_vit.data.shards import write_embedded_shards
from ssl_vit.errors import UserError
from ssl_vit.eval.report import write_json
from tests.conftest import OBJECTIVES, fit_briefly, png_bytes, random_images


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A real (tiny) MAE checkpoint, copied into each test's own folder."""
    factory, view = OBJECTIVES["mae"]
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    fit_briefly(factory(), view).save_checkpoint(path)
    return path.read_bytes()


@pytest.fixture
def run(tmp_path, checkpoint_bytes) -> Path:
    """A run folder as ``ssl-vit pretrain`` leaves it: checkpoints and a summary."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("last.ckpt", "epoch=0000.ckpt"):
        (checkpoints / name).write_bytes(checkpoint_bytes)
    (tmp_path / "run" / "summary.json").write_text("{}")
    return tmp_path / "run"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def cli_exit_code(*args: str) -> int:
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    return stopped.value.code


def image_folder(root: Path) -> Path:
    for i, array in enumerate(random_images(4)):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i}.png")
    return root


def shard_folder(out: Path, seed: int = 0) -> Path:
    samples = (("png", png_bytes(img), i % 2) for i, img in enumerate(random_images(6, seed=seed)))
    write_shards(samples, out, classes=["a", "b"], source=f"test {seed}", samples_per_shard=3, overwrite=True)
    return out


def fail_first_move(monkeypatch, path: Path, end: str) -> None:
    """Make the first rename that moves ``path`` away (``end="from"``) or onto it (``end="to"``)
    fail, as a read-only folder does for a user who is not root. The tests run as root, where
    chmod stops nothing, so the failure is simulated at the rename itself."""
    failed = []

    def failing(real):
        def move(src, dst, *args, **kwargs):
            moved = Path(src if end == "from" else dst)
            if not failed and moved.absolute() == path.absolute():
                failed.append(moved)
                raise PermissionError(errno.EACCES, "Permission denied", str(moved))
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", failing(os.rename))
    monkeypatch.setattr(os, "replace", failing(os.replace))


@pytest.mark.parametrize("out", [".", ".."])
def test_export_never_replaces_the_current_folder_or_one_above_it(tmp_path, run, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert cli_exit_code("export", str(run / "checkpoints/last.ckpt"), out, "--overwrite") == 2
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", [".", ".."])
def test_shards_never_replace_the_current_folder_or_one_above_it(tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    image_folder(work / "photos")
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert cli_exit_code("shards", "imagefolder", "photos", out, "--overwrite") == 2
    assert snapshot(tmp_path) == before


def test_shards_never_replace_a_folder_holding_the_images_they_read(tmp_path, monkeypatch):
    image_folder(tmp_path / "data" / "photos")
    (tmp_path / "data" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for out in ("data", "data/photos"):
        assert cli_exit_code("shards", "imagefolder", "data/photos", out, "--overwrite") == 2
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args",
    [["run/checkpoints"], ["run"], ["run/checkpoints/last.ckpt", "--format", "state_dict"]],
    ids=["checkpoint folder", "run folder", "the checkpoint itself"],
)
def test_export_never_replaces_checkpoints(tmp_path, run, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert cli_exit_code("export", "run/checkpoints/last.ckpt", *args, "--overwrite") == 2
    assert snapshot(tmp_path) == before
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_export_folder_with_a_sub_folder_is_not_replaced(tmp_path, run):
    """The user's case: a read-only sub-folder made the old rmtree fail halfway (model.safetensors
    gone, config.json left, the new export discarded). chmod stops nothing for root, so what this
    checks is that such a folder is refused before anything is touched."""
    out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "export")
    locked = out / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("mine")
    locked.chmod(0o555)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="locked"):
        export_encoder(run / "checkpoints/last.ckpt", out, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["export", "shards"])
def test_a_folder_holding_a_foreign_file_is_not_replaced(tmp_path, run, kind):
    if kind == "export":
        out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "out")
    else:
        out = shard_folder(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"is not only an? \w+ folder .*: it also holds notes\.txt; --overwrite"):
        if kind == "export":
            export_encoder(run / "checkpoints/last.ckpt", out, overwrite=True)
        else:
            shard_folder(out, seed=1)
    assert snapshot(tmp_path) == before


def test_embedded_shards_check_both_splits_before_writing_either(tmp_path):
    shard_folder(tmp_path / "data" / "train")
    (tmp_path / "data" / "val").mkdir()
    (tmp_path / "data" / "val" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"notes\.txt"):
        write_embedded_shards(tmp_path / "data", samples_per_shard=1000, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["timm", "state_dict"])
@pytest.mark.parametrize("end", ["from", "to"], ids=["moving the old aside fails", "moving the new in fails"])
def test_a_failed_replacement_leaves_the_old_export_whole(tmp_path, run, monkeypatch, fmt, end):
    name = "export" if fmt == "timm" else "encoder.safetensors"
    out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / name, fmt=fmt)
    before = snapshot(tmp_path)
    fail_first_move(monkeypatch, out, end)
    with pytest.raises(UserError, match="Permission denied"):
        export_encoder(run / "checkpoints/epoch=0000.ckpt", out, fmt=fmt, overwrite=True)
    assert snapshot(tmp_path) == before  # the old export, and no temporary folder beside it


def test_overwrite_replaces_an_export_with_a_new_one(tmp_path, run):
    out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "export")
    export_encoder(run / "checkpoints/epoch=0000.ckpt", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["ssl_vit"]["checkpoint"].endswith("epoch=0000.ckpt")
    assert out.stat().st_mode & 0o055 == 0o055  # readable by others, like any folder the user makes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # nothing left beside it
    state_dict = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "encoder.safetensors", fmt="state_dict")
    export_encoder(run / "checkpoints/epoch=0000.ckpt", state_dict, fmt="state_dict", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.safetensors", "export", "run"]


def test_a_safetensors_file_ssl_vit_did_not_write_is_not_replaced(tmp_path, run):
    """A state dict export is one file: only its metadata tells it from the user's own weights."""
    (tmp_path / "notes.safetensors").write_text("precious")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "theirs.safetensors"), metadata={"architecture": "resnet50"})
    before = snapshot(tmp_path)
    for name, reason in (("notes", "it is not a safetensors file"), ("theirs", "its metadata does not say ssl-vit")):
        with pytest.raises(UserError, match=f"{name}.safetensors is not a state_dict export: {reason}"):
            out = tmp_path / f"{name}.safetensors"
            export_encoder(run / "checkpoints/last.ckpt", out, fmt="state_dict", overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_runs_own_export_is_replaced_only_from_that_runs_checkpoints(tmp_path, run, checkpoint_bytes):
    """Another run's export, which its summary and records name, is not an export to replace with
    this one's weights; the run's own checkpoints re-export it."""
    own = export_encoder(run / "checkpoints/last.ckpt", run / "export")
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    (other / "last.ckpt").write_bytes(checkpoint_bytes)
    before = snapshot(run)
    with pytest.raises(UserError, match=f"is an output of the run in {run}"):
        export_encoder(other / "last.ckpt", own, overwrite=True)
    assert snapshot(run) == before
    export_encoder(run / "checkpoints/epoch=0000.ckpt", own, overwrite=True)
    assert json.loads((own / "config.json").read_text())["ssl_vit"]["checkpoint"].endswith("epoch=0000.ckpt")


def test_exports_and_records_get_the_permissions_of_any_new_file_of_the_user(tmp_path, run):
    # safetensors and mkstemp write files only their owner can read; an export is often shared
    old_mask = os.umask(0o022)
    try:
        out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "export")
        state_dict = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "encoder.safetensors", fmt="state_dict")
        record = write_json(tmp_path / "record.json", {"k=20": 50.0})
    finally:
        os.umask(old_mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [*out.iterdir(), state_dict, record]}
    assert set(modes.values()) == {"0o644"}, modes


def test_overwrite_replaces_existing_shards(tmp_path):
    out = shard_folder(tmp_path / "shards", seed=0)
    shard_folder(out, seed=1)
    assert json.loads((out / "dataset.json").read_text())["source"] == "test 1"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "shard-000000.tar", "shard-000001.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_shards_overwrite_only_the_shards_they_wrote(tmp_path):
    """Shard folders were told apart by file names alone: a tar the user put beside the shards, a
    shard folder another tool wrote with its own dataset.json, were deleted without a word."""
    out = shard_folder(tmp_path / "shards", seed=0)
    with tarfile.open(out / "shard-000900.tar", "w"):
        pass  # the user's, not listed as written
    with pytest.raises(UserError, match=r"it also holds shard-000900\.tar, which ssl-vit did not write there"):
        shard_folder(out, seed=1)
    (out / "shard-000900.tar").unlink()
    shutil.copy(out / "shard-000001.tar", out / "shard-000000.tar")  # a shard replaced by hand
    with pytest.raises(UserError, match=r"its shard-000000\.tar was changed since ssl-vit wrote it"):
        shard_folder(out, seed=1)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    shutil.copy(out / "shard-000001.tar", theirs / "shard-000000.tar")
    (theirs / "dataset.json").write_text('{"name": "my dataset from another tool"}')
    with pytest.raises(UserError, match=r"its dataset\.json does not say which files ssl-vit wrote"):
        shard_folder(theirs, seed=1)
    assert json.loads((theirs / "dataset.json").read_text()) == {"name": "my dataset from another tool"}


def test_a_folder_made_at_the_output_while_it_was_written_is_left_alone(tmp_path, run, monkeypatch):
    """The check before writing is not enough: the user (or a second command) may make the folder
    while the output is written; the output is then refused, and their folder kept."""
    import ssl_vit.replace as replace

    real_permissions = replace.give_default_permissions

    def user_makes_the_folder(path: Path) -> None:  # after the write, before the move into place
        real_permissions(path)
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "notes.txt").write_text("mine")

    monkeypatch.setattr(replace, "give_default_permissions", user_makes_the_folder)
    with pytest.raises(UserError, match=r"while this command wrote, .*out already exists and is not empty"):
        write_shards((("png", png_bytes(img), 0) for img in random_images(2)), tmp_path / "out", ["a"], "test")
    assert snapshot(tmp_path / "out") == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # nothing left beside it


def test_a_folder_with_only_an_exports_file_names_is_not_an_export(tmp_path, run):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("my project")
    with pytest.raises(UserError, match=r"is not an export folder .*: it has no config\.json"):
        export_encoder(run / "checkpoints/last.ckpt", tmp_path / "docs", overwrite=True)
    assert (tmp_path / "docs" / "README.md").read_text() == "my project"


def test_an_export_whose_model_card_was_edited_is_not_replaced(tmp_path, run):
    """The docs say an export can be pushed to a model hub as it is, so users edit its card."""
    out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "export")
    with open(out / "README.md", "a") as card:
        card.write("\nTrained on our line-3 camera images.\n")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"its README\.md was changed since ssl-vit wrote it; .* move that out"):
        export_encoder(run / "checkpoints/epoch=0000.ckpt", out, overwrite=True)
    assert snapshot(tmp_path) == before
    (out / "README.md").unlink()  # moved out: the rest is ssl-vit's, as written
    export_encoder(run / "checkpoints/epoch=0000.ckpt", out, overwrite=True)


def test_an_export_whose_config_was_edited_or_a_timm_folder_ssl_vit_never_wrote_is_not_replaced(tmp_path, run):
    """config.json holds the digests of the files as written, and its own entries' digest."""
    out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "label_names": ["cat", "dog"]}))  # a user's edit
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"its config\.json was changed since ssl-vit wrote it"):
        export_encoder(run / "checkpoints/epoch=0000.ckpt", out, overwrite=True)
    assert snapshot(tmp_path) == before
    hand_made = {"architecture": "resnet50", "num_classes": 0}  # a timm folder of the user's own, three weeks' work
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text(json.dumps(hand_made))
    (tmp_path / "mine" / "model.safetensors").write_bytes(b"weights")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"its config\.json does not say which files ssl-vit wrote"):
        export_encoder(run / "checkpoints/last.ckpt", tmp_path / "mine", overwrite=True)
    assert snapshot(tmp_path) == before
    export_encoder(run / "checkpoints/last.ckpt", tmp_path / "again")  # as written, replaced
    export_encoder(run / "checkpoints/epoch=0000.ckpt", tmp_path / "again", overwrite=True)


def test_an_output_given_as_a_link_is_written_where_the_link_points(tmp_path, run):
    (tmp_path / "big_disk").mkdir()
    (tmp_path / "export").symlink_to(tmp_path / "big_disk")
    export_encoder(run / "checkpoints/last.ckpt", tmp_path / "export")
    assert (tmp_path / "export").is_symlink() and (tmp_path / "big_disk" / "model.safetensors").is_file()
    export_encoder(run / "checkpoints/epoch=0000.ckpt", tmp_path / "export", overwrite=True)
    assert (tmp_path / "export").is_symlink()
    config = json.loads((tmp_path / "big_disk" / "config.json").read_text())
    assert config["ssl_vit"]["checkpoint"].endswith("epoch=0000.ckpt")


def test_an_old_output_a_killed_replacement_moved_aside_is_put_back(tmp_path, run):
    import ssl_vit.replace as replace

    out = export_encoder(run / "checkpoints/last.ckpt", tmp_path / "export")
    before = snapshot(out)
    host = replace.writer_id().rsplit("-", 1)[0]
    dead = 2**22 + 12345  # above the kernel's default pid_max: no process has it
    killed = tmp_path / f".export.{host}-{dead}.x1y2z3.partial"
    (killed / "new").mkdir(parents=True)  # half written
    out.rename(killed / "old")  # killed between its two renames: nothing at out
    alive = tmp_path / f".export.{replace.writer_id()}.a1b2c3.partial"  # a writer at work: not touched
    alive.mkdir()
    export_encoder(run / "checkpoints/epoch=0000.ckpt", out, overwrite=True)
    assert not killed.exists() and alive.is_dir()
    assert json.loads((out / "config.json").read_text())["ssl_vit"]["checkpoint"].endswith("epoch=0000.ckpt")
    alive.rmdir()
    killed_again = tmp_path / f".export.{host}-{dead}.q1w2e3.partial"
    (killed_again / "new").mkdir(parents=True)
    out.rename(killed_again / "old")
    with pytest.raises(UserError, match="already exists"):  # put back first, so refused without --overwrite
        export_encoder(run / "checkpoints/last.ckpt", out)
    assert not killed_again.exists() and snapshot(out) != before and (out / "model.safetensors").is_file()


@pytest.fixture
def small_embedded(monkeypatch):
    """The embedded dataset at a few images per class: the same code, seconds less."""
    from ssl_vit.data import embedded

    monkeypatch.setitem(embedded.SPLITS, "train", 3)
    monkeypatch.setitem(embedded.SPLITS, "val", 2)
    return embedded


def test_embedded_shards_stopped_while_written_leave_both_old_splits(tmp_path, small_embedded, monkeypatch):
    write_embedded_shards(tmp_path / "data", samples_per_shard=10, seed=0)
    before = snapshot(tmp_path)
    samples = small_embedded.embedded_samples

    def stopped_at_val(split, *args, **kwargs):
        if split == "val":
            raise KeyboardInterrupt  # as Ctrl-C while val is written
        return samples(split, *args, **kwargs)

    monkeypatch.setattr(small_embedded, "embedded_samples", stopped_at_val)
    with pytest.raises(KeyboardInterrupt):
        write_embedded_shards(tmp_path / "data", samples_per_shard=10, seed=1, overwrite=True)
    assert snapshot(tmp_path) == before  # no train of seed 1 beside a val of seed 0, nothing left beside


def test_embedded_shards_whose_train_is_missing_are_written_again(tmp_path, small_embedded):
    """A kill between the two splits' moves leaves val alone (train moves in last); the run that
    writes the data again (train missing) replaces that val, its own of the same seed."""
    write_embedded_shards(tmp_path / "data", samples_per_shard=10, seed=0)
    before = snapshot(tmp_path)
    shutil.rmtree(tmp_path / "data" / "train")
    write_embedded_shards(tmp_path / "data", samples_per_shard=10, seed=0)
    assert snapshot(tmp_path).keys() == before.keys()
    shutil.rmtree(tmp_path / "data" / "train")
    with pytest.raises(UserError, match="val already exists"):  # another seed's val is not its own
        write_embedded_shards(tmp_path / "data", samples_per_shard=10, seed=1)


def test_an_output_under_a_quoted_home_goes_to_the_home_folder(tmp_path, run, monkeypatch):
    """`ssl-vit export RUN '~/texp'`: no shell expanded the ~, and a folder named ~ was made here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    main(["export", str(run / "checkpoints/last.ckpt"), "~/texp"])
    main(["shards", "imagefolder", str(image_folder(tmp_path / "photos")), "~/tshards"])
    assert (tmp_path / "home/texp/model.safetensors").is_file() and (tmp_path / "home/tshards/dataset.json").is_file()
    assert not (tmp_path / "~").exists()


def test_a_runs_own_export_takes_only_the_checkpoint_its_summary_names(run, capsys):
    """`export run/checkpoints/epoch=0000.ckpt run/export --overwrite` replaced the run's export with
    an earlier step's, while its summary went on naming that export beside its last step's numbers."""
    (run / "summary.json").write_text(json.dumps({"checkpoint": "run/checkpoints/last.ckpt", "export": "run/export"}))
    main(["export", str(run / "checkpoints/last.ckpt"), str(run / "export")])
    before = snapshot(run / "export")
    assert cli_exit_code("export", str(run / "checkpoints/epoch=0000.ckpt"), str(run / "export"), "--overwrite") == 2
    said = capsys.readouterr().err
    assert "is the export that" in said and "of the run's last.ckpt; an export of epoch=0000.ckpt there" in said
    assert snapshot(run / "export") == before
    main(["export", str(run / "checkpoints/last.ckpt"), str(run / "export"), "--overwrite"])  # the one it names
