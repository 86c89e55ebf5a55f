"""``ssl-vit knn`` / ``probe`` / ``segprobe`` on every kind of encoder they take (an ssl-vit
checkpoint, its export folder, a timm model), as a user runs them: the same weights give the same
numbers whatever holds them, and a standalone evaluation writes records of its own beside the
run's, never over them."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from ssl_vit.checkpoint import RUN_KEY
from ssl_vit.cli import main
from ssl_vit.data import write_shards
from ssl_vit.data.shards import resolve_shards
from ssl_vit.eval.encoders import export_record
from ssl_vit.eval.report import settings_tag
from ssl_vit.export import export_encoder
from tests.conftest import OBJECTIVES, fit_briefly
from tests.fault_injection import in_this_process, recipe, write_tiny_shards
from tests.test_own_data import image_folder
from tests.test_segmentation import colour_region_sample, region_shards  # shards with label maps

# Few epochs and images: these tests check where numbers come from and go, not their quality.
SETTINGS = {
    "knn": ["--knn_ks", "[5]"],
    "probe": ["--probe_epochs", "2", "--probe_warmup_epochs", "0", "--probe_batch_size", "16"],
    "segprobe": ["--seg_epochs", "2", "--probe_batch_size", "16"],
}
RECORD_KIND = {"knn": "knn", "probe": "probe", "segprobe": "segmentation"}
RUN_RECORD = json.dumps({"results": "the run's own, with its random-init baseline"})
TIMM_NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A briefly trained MAE run with its own evaluation records, its export, and tiny shards."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    factory, view = OBJECTIVES["mae"]
    checkpoint = root / "checkpoints" / "last.ckpt"
    fit_briefly(factory(), view).save_checkpoint(checkpoint)
    for kind in RECORD_KIND.values():
        checkpoint.with_name(f"last.{kind}.json").write_text(RUN_RECORD)
    return {
        "checkpoint": checkpoint,
        "export": export_encoder(checkpoint, root / "export"),
        "train": Path(region_shards(root / "train", 32, seed=0)),
        "val": Path(region_shards(root / "val", 16, seed=1)),
    }


def evaluate(capsys, command: str, encoder: str | Path, run: dict[str, Path], *options: str) -> Path:
    """The command through the CLI's entry point; the one record it says it wrote."""
    data = ["--train_shards", str(run["train"]), "--val_shards", str(run["val"]), "--num_workers", "0"]
    main([command, str(encoder), *data, *SETTINGS[command], *options])
    written = re.findall(r"^wrote (.+)$", capsys.readouterr().out, flags=re.MULTILINE)
    assert len(written) == 1, written
    return Path(written[0])


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_a_checkpoint_and_its_export_score_the_same_and_leave_the_run_records_alone(capsys, run, command):
    kind = RECORD_KIND[command]
    of_checkpoint = evaluate(capsys, command, run["checkpoint"], run)
    of_export = evaluate(capsys, command, run["export"], run)
    # the checkpoint's architecture with weights from a file: the export's, which are its own
    of_weights = evaluate(capsys, command, run["checkpoint"], run, "--weights", str(run["export"]))

    results = [json.loads(path.read_text())["results"] for path in (of_checkpoint, of_export, of_weights)]
    assert results[0] == results[1] == results[2]
    # the run folder stands for its newest checkpoint: the same evaluation, the same record
    assert evaluate(capsys, command, run["checkpoint"].parent.parent, run) == of_checkpoint
    assert of_checkpoint.parent == run["checkpoint"].parent and of_checkpoint.name.startswith(f"last.{kind}.eval-")
    assert of_export.parent == run["export"].parent and of_export.name.startswith(f"export.{kind}.eval-")
    assert run["checkpoint"].with_name(f"last.{kind}.json").read_text() == RUN_RECORD
    # the same evaluation again replaces its own record; other settings write beside it
    assert evaluate(capsys, command, run["checkpoint"], run) == of_checkpoint
    assert evaluate(capsys, command, run["checkpoint"], run, "--seed", "1") != of_checkpoint
    # the export's architecture at random: the record names neither the export's objective nor its step
    of_random = json.loads(evaluate(capsys, command, run["export"], run, "--weights", "random").read_text())
    assert (of_random["method"], of_random["step"], of_random["weights"]) == ("timm", None, "random")


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_a_timm_model_at_random_or_from_a_weights_file(capsys, run, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a timm model's records go to the current folder
    small = ["--image_size", "32"]  # 2 x 2 patches of 16 px: a fast check
    random = evaluate(capsys, command, f"timm:{TIMM_NAME}", run, "--weights", "random", *small)
    assert random.parent == Path() and random.name.startswith(f"{TIMM_NAME}.{RECORD_KIND[command]}.eval-")
    record = json.loads(random.read_text())
    assert record["method"] == "timm" and record["weights"] == "random"

    torch.manual_seed(0)  # the initialisation --weights random (--seed 0) makes, as a weights file
    weights = timm.create_model(TIMM_NAME, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "weights.safetensors"))
    from_file = evaluate(capsys, command, f"timm:{TIMM_NAME}", run, "--weights", "weights.safetensors", *small)
    assert json.loads(from_file.read_text())["results"] == record["results"]


def test_features_are_what_the_model_pools_unless_pooling_is_given(capsys, run, tmp_path):
    """A SimMIM or I-JEPA export, or a fine-tuned classifier, pools the mean of its patch tokens
    (timm's global_pool avg); its CLS token, if it has one, is untrained."""
    torch.manual_seed(0)
    args = {"img_size": 32, "global_pool": "avg"}
    folder = tmp_path / "model"
    model = timm.create_model(TIMM_NAME, num_classes=0, **args)
    timm.models.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    pooled = {}
    for pooling in (None, "mean", "cls"):
        given = [] if pooling is None else ["--pooling", pooling]
        record = json.loads(
            evaluate(capsys, "knn", folder, run, "--out", str(tmp_path / "records"), *given).read_text()
        )
        pooled[pooling] = (record["protocol"]["pooling"], record["results"])
    assert pooled[None] == pooled["mean"] and pooled["cls"][0] == "cls"
    record = json.loads(evaluate(capsys, "knn", run["export"], run).read_text())  # MAE's: the CLS token
    assert record["protocol"]["pooling"] == "cls"


def test_a_k_larger_than_the_training_images_is_said_to_be_left_out(capsys, run):
    data = ["--train_shards", str(run["train"]), "--val_shards", str(run["val"]), "--num_workers", "0"]
    main(["knn", str(run["export"]), *data, "--knn_ks", "[5,50]", "--out", str(run["train"].parent / "k")])
    out = capsys.readouterr().out
    assert "k=50 left out: more than the 32 training images" in out and "k=5 " in out


def test_weights_of_another_patch_size_are_refused_not_resampled(capsys, run, tmp_path, monkeypatch):
    """Evaluating weights in an architecture of other patches would score a model nobody trained."""
    monkeypatch.chdir(tmp_path)  # where a timm model's records would go
    eight_px = timm.create_model(TIMM_NAME, patch_size=8, img_size=32, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in eight_px.items()}, str(tmp_path / "eight.safetensors"))
    with pytest.raises(SystemExit) as exit_:
        evaluate(capsys, "knn", f"timm:{TIMM_NAME}", run, "--weights", str(tmp_path / "eight.safetensors"))
    error = capsys.readouterr().err.strip()
    assert (
        exit_.value.code == 2 and len(error.splitlines()) == 1 and "-px patches, this architecture has 16-px" in error
    )


@pytest.mark.parametrize("layout", ["one folder", "train and valid"])
def test_without_val_shards_a_command_reads_the_data_as_a_run_does(capsys, run, tmp_path, layout):
    """`ssl-vit knn EXPORT --train_shards photos`: the held-out tenth of photos against the rest,
    or the val (valid) folder beside a train folder, as the run that made the export evaluated."""
    if layout == "one folder":
        train = image_folder(tmp_path / "photos", ["cat", "dog"], per_class=20)
        expected = (f"{train}#train", f"{train}#heldout")
    else:
        train = image_folder(tmp_path / "pets" / "train", ["cat", "dog"], per_class=6)
        image_folder(tmp_path / "pets" / "valid", ["cat", "dog"], per_class=2)
        expected = (str(train), str(tmp_path / "pets" / "valid"))
    main(["knn", str(run["export"]), "--train_shards", str(train), "--num_workers", "0", *SETTINGS["knn"]])
    written = re.findall(r"^wrote (.+)$", capsys.readouterr().out, flags=re.MULTILINE)
    data = json.loads(Path(written[0]).read_text())["data"]
    assert (data["train_shards"], data["val_shards"]) == expected


def test_a_folder_of_pickled_weights_is_named_as_such_and_never_loaded(capsys, run, tmp_path):
    folder = tmp_path / "hub_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": TIMM_NAME}))
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(SystemExit):
        evaluate(capsys, "knn", folder, run)
    assert "holds its weights pickled (pytorch_model.bin)" in capsys.readouterr().err


def test_an_encoder_that_is_none_of_these_is_one_line_naming_what_is_accepted(capsys, run, tmp_path):
    (tmp_path / "folder/export").mkdir(parents=True)
    (tmp_path / "last.ckpt.sha256").write_text("0123abcd  last.ckpt\n")  # a text file; as pickle opcodes, garbage
    said = {
        tmp_path / "missing.ckpt": "does not exist",
        tmp_path / "folder": "not a timm model folder",
        tmp_path / "folder/exprt": f"does not exist (did you mean {tmp_path / 'folder/export'}?)",
        tmp_path / "last.ckpt.sha256": "is not an ssl-vit checkpoint: torch.save did not write it",
        "timm:no_such_model": "timm has no model",
    }
    for encoder, expected in said.items():
        with pytest.raises(SystemExit) as exit_:
            evaluate(capsys, "knn", encoder, run)
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and expected in error, error
        assert "timm" in error or "pass a .ckpt written by `ssl-vit pretrain`" in error, error  # what is accepted


def test_each_command_checks_its_data_has_what_it_reads_before_loading_anything(capsys, run, tmp_path, monkeypatch):
    """Label maps without classes: k-NN and the probes stop with one line before the encoder is
    loaded; the dense probe, which reads the maps only, runs."""
    rng = np.random.default_rng(0)
    regions = (colour_region_sample(rng, i % 2) for i in range(32))
    samples = [(ext, image, None, label_map) for ext, image, _, label_map in regions]
    unlabelled = write_shards(samples, tmp_path / "maps_only", classes=[], source="test")
    assert unlabelled.classes == [] and unlabelled.mask_classes
    import ssl_vit.cli.tools as cli

    loaded = []
    monkeypatch.setattr(cli, "load_evaluated_encoder", lambda *args: loaded.append(args) or pytest.fail("loaded"))
    maps_only = {**run, "train": tmp_path / "maps_only", "val": tmp_path / "maps_only"}
    for command in ("knn", "probe"):
        with pytest.raises(SystemExit) as exit_:
            evaluate(capsys, command, run["checkpoint"], maps_only)
        error = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(error.splitlines()) == 1 and "need labelled images" in error, error
    assert not loaded
    monkeypatch.undo()
    record = evaluate(capsys, "segprobe", run["checkpoint"], maps_only)
    results = json.loads(record.read_text())["results"]
    assert "miou" in results and results["images"] == resolve_shards(str(maps_only["val"]))[1].num_samples


def test_a_run_whose_data_moved_names_it_and_the_option_that_gives_it(capsys, run, tmp_path):
    ckpt = torch.load(run["checkpoint"], weights_only=True)
    ckpt[RUN_KEY] = {"train_shards": str(tmp_path / "photos")}  # where it was; moved since
    (tmp_path / "checkpoints").mkdir()
    torch.save(ckpt, tmp_path / "checkpoints/last.ckpt")
    with pytest.raises(SystemExit):
        main(["knn", str(tmp_path)])
    error = capsys.readouterr().err
    assert f"{tmp_path / 'photos'}, the data the run of {tmp_path} trained on, is no longer there" in error
    assert "give where it is now with --train_shards" in error


def test_an_export_written_elsewhere_knows_the_data_its_run_trained_on(capsys, run, tmp_path):
    # `ssl-vit export RUN exports/NAME`: its provenance says where the run found its data, as the
    # run's own export/ folder does through the run (it needed --train_shards).
    photos = image_folder(tmp_path / "photos", ["cats", "dogs"], per_class=12)
    ckpt = torch.load(run["checkpoint"], weights_only=True)
    ckpt[RUN_KEY] = {"train_shards": str(photos)}
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run/checkpoints/last.ckpt")
    export_encoder(tmp_path / "run/checkpoints/last.ckpt", tmp_path / "exports/mae")
    main(["knn", str(tmp_path / "exports/mae"), "--num_workers", "0", "--knn_ks", "[5]"])
    assert f"scored on {photos}#heldout, neighbours from {photos}#train" in capsys.readouterr().out


def test_a_record_of_a_checkpoint_trained_further_is_written_beside_the_earlier_one():
    """`last.ckpt` at step 45 is not the weights `last.ckpt` had at step 20: its record is another."""
    settings = {"train_shards": "t", "val_shards": "v", "files": "f", "knn_ks": [20]}
    assert settings_tag("last.ckpt", None, settings, 20) != settings_tag("last.ckpt", None, settings, 45)
    assert settings_tag("last.ckpt", None, settings, 20) == settings_tag("last.ckpt", None, dict(settings), 20)


def test_the_same_evaluation_run_from_another_folder_has_the_same_record(tmp_path, monkeypatch):
    """The encoder and weights are hashed where they are, as the data is, not as the command wrote them."""
    (tmp_path / "elsewhere").mkdir()
    settings = {"train_shards": "photos", "val_shards": "photos#heldout", "files": "f"}
    monkeypatch.chdir(tmp_path)
    here = settings_tag("runs/mae/last.ckpt", "weights.safetensors", settings, 20)
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = {k: f"../{v}" for k, v in settings.items() if k != "files"} | {"files": "f"}
    assert settings_tag("../runs/mae/last.ckpt", "../weights.safetensors", moved, 20) == here
    assert settings_tag("timm:vit_small_patch16_224", "random", settings, None).startswith("eval-")


@pytest.mark.parametrize(
    ("command", "option", "value", "says"),
    [
        ("knn", "--knn_temperature", "0", "knn_temperature is 0.0; it must be above 0"),
        ("knn", "--knn_temperature", "-1", "knn_temperature is -1.0; it must be above 0"),
        ("knn", "--knn_ks", "[0]", "knn_ks is [0]; give one or more numbers of neighbours, each 1 or more"),
        ("knn", "--batch_size", "0", "batch_size is 0; it must be above 0"),
        ("knn", "--knn_chunk_size", "0", "knn_chunk_size is 0; it must be above 0"),
        ("probe", "--probe_epochs", "0", "probe_epochs is 0; it must be above 0"),
        ("probe", "--probe_base_lr", "-1", "probe_base_lr is -1.0; it must be above 0"),
        ("probe", "--probe_batch_size", "0", "probe_batch_size is 0; it must be above 0"),
        (
            "knn",
            "--image_size",
            "5",
            "image_size 5 is not a multiple of the encoder's 4-px patches; give one, such as 4",
        ),
        ("knn", "--last_blocks", "9", "last_blocks is 9, but the encoder has 2 blocks"),
    ],
)
def test_an_evaluation_setting_out_of_range_is_one_line_before_any_work(capsys, run, command, option, value, says):
    """A temperature of 0 scored and recorded k-NN from no neighbour's weight, 0 probe epochs an
    untrained head; other values ended in tracebacks (ZeroDivisionError, negative class values)."""
    data = ["--train_shards", str(run["train"]), "--val_shards", str(run["val"])]
    with pytest.raises(SystemExit) as stopped:
        main([command, str(run["checkpoint"]), *data, option, value])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_an_out_that_is_a_file_stops_before_any_work(capsys, run, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        main(["knn", str(run["checkpoint"]), "--train_shards", str(run["train"]), "--out", str(tmp_path / "keep.txt")])
    assert stopped.value.code == 2 and "--out" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as stopped:  # it failed in mkdir, after reading every image
        main(
            [
                "knn",
                str(run["checkpoint"]),
                "--train_shards",
                str(run["train"]),
                "--cache_dir",
                str(tmp_path / "keep.txt"),
            ]
        )
    assert stopped.value.code == 2 and "is a file; give a folder for the cached features" in capsys.readouterr().err


def test_a_run_given_relative_data_is_evaluated_on_its_own_data_from_any_folder(tmp_path):
    """`--data.val_shards val` was recorded as typed: from another folder holding a `val` of its
    own, `ssl-vit knn RUN` and the export's provenance read that one (51.1 where the run read 73.3)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((a, 0), (b, 1)):
        write_tiny_shards(folder / "train", seed=seed)
        write_tiny_shards(folder / "val", seed=seed + 10)
    recipe(a, Path("train"), **{"data.val_shards": "val", "trainer.max_epochs": 1})
    trained = in_this_process(a, "pretrain", "--config", "recipe.yaml", "--trainer.default_root_dir", "run")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert export_record(str(a / "run/export"))["data"]["val_shards"] == str(a / "val")
    scored = in_this_process(b, "knn", str(a / "run"), "--knn_ks", "[5]", "--num_workers", "0")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert f"scored on {a / 'val'}, neighbours from {a / 'train'}" in scored.stdout


def test_weights_that_are_not_there_or_not_safetensors_are_one_line_before_anything_is_written(tmp_path, run):
    write_tiny_shards(tmp_path / "shards")
    recipe(tmp_path, tmp_path / "shards", **{"model.init_args.init_from": "missing.safetensors"})
    started = in_this_process(tmp_path, "pretrain", "--config", "recipe.yaml")
    said = "ssl-vit pretrain: error: model.init_args.init_from missing.safetensors does not exist"
    assert started.returncode == 2 and started.stderr.strip().splitlines()[-1] == said
    assert not (tmp_path / "run").exists()  # no logs folder left behind
    (tmp_path / "junk.safetensors").write_text("not tensors")
    for weights, says in (("missing.safetensors", "do not exist"), ("junk.safetensors", "is not a safetensors file")):
        data = ["--train_shards", str(run["train"]), "--val_shards", str(run["val"]), "--num_workers", "0"]
        scored = in_this_process(tmp_path, "knn", str(run["checkpoint"]), "--weights", weights, *data)
        assert scored.returncode == 2 and says in scored.stderr and "Traceback" not in scored.stderr, scored.stderr


def test_an_export_evaluated_from_inside_its_folder_writes_its_record_beside_it(capsys, run, monkeypatch):
    # `cd export && ssl-vit knn .` printed its table, then "PosixPath('.') has an empty name", unwritten
    monkeypatch.chdir(run["export"])
    written = evaluate(capsys, "knn", ".", run)
    assert written.parent == run["export"].parent and written.name.startswith("export.knn.eval-")
