"""Fine-tuning: the pretrained encoder arrives whole, layer-wise lr decay follows MAE's
formula, and ``ssl-vit finetune`` writes a classifier timm loads and predicts with."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from ssl_vit import export_encoder
from ssl_vit.data import EvalView, write_shards
from ssl_vit.errors import UserError
from ssl_vit.finetune import FineTune, FineTuneView, LabelledShardDataModule
from tests.conftest import OBJECTIVES, TINY_ENCODER, fit_briefly, png_bytes, random_images
from tests.fault_injection import in_this_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny MAE encoder, briefly trained and exported."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    factory, view = OBJECTIVES["mae"]
    trainer = fit_briefly(factory(), view)
    trainer.save_checkpoint(folder / "last.ckpt")
    return export_encoder(folder / "last.ckpt", folder / "export")


def test_the_pretrained_encoder_arrives_whole(exported):
    model = FineTune(num_classes=7, init_from=str(exported)).model
    encoder = timm.create_model(f"local-dir:{exported}", pretrained=True)
    for name, tensor in encoder.state_dict().items():
        if not name.startswith("norm."):  # MAE's fine-tuning replaces the final norm by fc-norm
            torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    assert model.global_pool == "avg" and model.head.out_features == 7
    # main_finetune.py's trunc_normal_(model.head.weight, std=2e-5) after loading (timm draws it at 0.02)
    assert 1.5e-5 < model.head.weight.std() < 2.5e-5
    random = FineTune(num_classes=7, init_from=str(exported), pretrained=False).model
    assert not torch.equal(random.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_weights_of_another_architecture_are_refused(exported):
    with pytest.raises(UserError, match="does not fit the classifier"):
        FineTune(num_classes=7, init_from=str(exported), encoder={**TINY_ENCODER, "embed_dim": 48})


def test_layer_wise_lr_decay_is_maes(exported):
    """MAE's lr_decay.py: layer id 0 for the patch embedding, position embedding and CLS token,
    i + 1 for block i, depth + 1 for everything after; lr scale = decay ** (depth + 1 - id)."""
    module = FineTune(num_classes=7, init_from=str(exported), layer_decay=0.5, base_lr=1e-3)
    optimizer = module.configure_optimizers()
    depth = len(module.model.blocks)
    scale_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[id(p)] = group["lr_scale"]
    for name, p in module.model.named_parameters():
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        assert scale_of[id(p)] == pytest.approx(0.5 ** (depth + 1 - layer)), name
    decayed = {
        n
        for g in optimizer.param_groups
        if g["weight_decay"] > 0
        for n, p in module.model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.0.attn.qkv.bias" not in decayed
    assert "pos_embed" not in decayed and "cls_token" not in decayed


def labelled_shards(folder: Path, n: int, classes: tuple[str, ...] = ("a", "b", "c", "d")) -> str:
    images = random_images(n, size=32, seed=n)
    samples = (("png", png_bytes(img), i % len(classes)) for i, img in enumerate(images))
    write_shards(samples, folder, classes=list(classes), source="test", samples_per_shard=16)
    return str(folder)


def finetune_args(exported: Path, train: str, val: str, run: Path, *overrides: str) -> list[str]:
    """``ssl-vit finetune`` with the quickstart recipe on tiny shards, as a user runs it."""
    recipe = str(ROOT / "recipes/quickstart/finetune.yaml")
    args = [f"--model.init_from={exported}", f"--data.train_shards={train}", f"--data.val_shards={val}"]
    args += ["--data.batch_size=16", "--data.num_workers=1", f"--trainer.default_root_dir={run}", *overrides]
    return ["finetune", "--config", recipe, *args]


def finetune(folder: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """``ssl-vit finetune ARGS`` run by this process in ``folder``, without a new interpreter's
    seconds of imports."""
    return in_this_process(folder, *finetune_args(*args))


def test_finetune_command_writes_a_classifier_timm_predicts_with(exported, tmp_path):
    train, val = labelled_shards(tmp_path / "train", 64), labelled_shards(tmp_path / "val", 32)
    # 3 steps: the run stops in its first epoch of 4 and still validates there (the quickstart's
    # budget is in steps, so a large folder's run ends mid-epoch; it used to end unvalidated, or
    # report the accuracy of the last epoch's end rather than of its final weights)
    overrides = ["--model.num_classes=4", "--data.shuffle_buffer=16", "--trainer.max_steps=3"]
    result = finetune(tmp_path, exported, train, val, tmp_path / "run", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["val_top1"] <= 100 and summary["weights"] == str(exported)
    assert summary["val_images"] == 32  # what the accuracy counts
    assert summary["val_top5"] is None and "val/top5" not in result.stdout + result.stderr  # 100 of 4 classes
    assert "global_pool=avg" in summary["encoder"]  # as fine-tuned, whatever the export pooled with
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3

    # stopped before its summary (a Ctrl-C during the export): the same command validates the last
    # step's weights again and writes the same summary (it wrote one without the accuracy)
    (tmp_path / "run/summary.json").unlink()
    again = finetune(tmp_path, exported, train, val, tmp_path / "run", *overrides)
    assert again.returncode == 0 and "trained to its limit" in again.stderr, again.stderr[-3000:]
    ended = json.loads((tmp_path / "run/summary.json").read_text())
    kept = ("steps", "val_top1", "val_images")
    assert [ended[k] for k in kept] == [summary[k] for k in kept]

    model = timm.create_model(f"local-dir:{tmp_path / 'run/export'}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == ["a", "b", "c", "d"]
    finetuned = FineTune(num_classes=4, init_from=str(exported))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items()}
    finetuned.model.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), finetuned.model.eval()(x))

    # `ssl-vit export` of the run, for its ONNX: the classifier again, with its logits in ONNX (it said
    # "encoder weights do not match its settings (missing ['vit.cls_token', ...])")
    out = tmp_path / "classifier"
    onnx = ["--onnx", "--int8", "--val_shards", val]  # a classifier's top-1 needs no k-NN bank (docs)
    exported_again = in_this_process(tmp_path, "export", str(tmp_path / "run"), str(out), *onnx)
    assert exported_again.returncode == 0, exported_again.stderr[-3000:]
    again = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert again.pretrained_cfg["label_names"] == ["a", "b", "c", "d"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model(x))
    report = json.loads((out / "onnx_report.json").read_text())
    assert report["output"].startswith("logits") and report["top1"]["images"] == 32
    assert report["models"]["fp32"]["top1"] == pytest.approx(summary["val_top1"], abs=0.01)  # the run's own
    assert 0 <= report["models"]["int8"]["top1"] <= 100
    assert "top-1 %" in exported_again.stdout and f"top-1 on 32 images of {val}" in exported_again.stdout
    assert report["label_names"] == ["a", "b", "c", "d"]
    # where it came from, as the run's own export says (the re-export said random initialisation)
    for folder in (tmp_path / "run/export", out):
        record = json.loads((folder / "config.json").read_text())["ssl_vit"]
        assert record["finetuned_from"] == str(exported) and record["step"] == 3, folder
        assert record["results"]["top1"] == summary["val_top1"]
        card = (folder / "README.md").read_text()
        assert f"fine-tuned from: `{exported}`" in card and "None" not in card and "num_classes=0" not in card
        assert f"- val top1: {summary['val_top1']}" in card and "logits of 4 classes" in card

    # the docs' snippet, as written, on a photo: the classifier's class name for it
    page = (ROOT / "docs/export-and-finetune.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", page, re.S) if "label_names" in block]
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(photo)
    code = code.replace("runs/shapes/finetune/export", str(tmp_path / "run/export")).replace("photo.jpg", str(photo))
    *lines, last = code.strip().splitlines()
    scope = {}
    exec("\n".join([*lines, f"answer = {last}"]), scope)
    with torch.no_grad():
        expected = model(EvalView(32)(Image.open(photo).convert("RGB"))[None]).argmax(-1)[0]
    assert scope["answer"] == ["a", "b", "c", "d"][expected]
    # k-NN reads pretrained encoders: given this checkpoint, it names the classifier's folder
    knn = in_this_process(tmp_path, "knn", str(tmp_path / "run/checkpoints/last.ckpt"), "--train_shards", train)
    assert knn.returncode == 2 and "is a fine-tuning run's checkpoint" in knn.stderr
    assert f"local-dir:{tmp_path / 'run/export'}" in " ".join(knn.stderr.split())


def test_mixup_and_cutmix_targets_are_distributions(exported):
    module = FineTune(num_classes=5, init_from=str(exported))
    torch.manual_seed(0)
    for _ in range(4):  # timm switches between Mixup and CutMix at random
        _, targets = module.mixup(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)))
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
        assert (targets >= 0).all() and targets.max() < 1.0  # smoothed and mixed, never one-hot


def test_unlabelled_shards_stop_fine_tuning_with_one_line(exported, tmp_path):
    unlabelled = (("png", png_bytes(img), None) for img in random_images(32, size=32))
    write_shards(unlabelled, tmp_path / "train", classes=[], source="test", samples_per_shard=16)
    result = finetune(tmp_path, exported, str(tmp_path / "train"), str(tmp_path / "train"), tmp_path / "run")
    assert result.returncode == 2
    assert "has no class labels" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "one sub-folder per class" in result.stderr  # what a user with a folder of images does
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_a_class_count_other_than_the_shards_stops_fine_tuning_with_one_line(exported, tmp_path):
    train, val = labelled_shards(tmp_path / "train", 32), labelled_shards(tmp_path / "val", 16)
    for num_classes in (5, 3):  # the shards have 4: a head with more outputs than classes, or fewer
        result = finetune(tmp_path, exported, train, val, tmp_path / "run", f"--model.num_classes={num_classes}")
        assert result.returncode == 2
        assert f"has 4 classes (a, b, c, d) but model.num_classes is {num_classes}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_val_classes_train_lacks_stop_fine_tuning_with_one_line(exported, tmp_path):
    """A val class of a name train lacks has no output to be scored against. Named before
    model.num_classes, whose advice would otherwise follow one split, then the other."""
    photos = ("fences", "gardens", "sunsets")
    train = labelled_shards(tmp_path / "photos", 32, photos)
    cases = {  # val's classes, num_classes: the classes the line names
        (("abend", "garten", "zaun"), 3): "abend, garten, zaun",
        (("fences", "gardens", "snow", "sunsets"), 4): "snow",
    }
    for i, ((classes, num_classes), named) in enumerate(cases.items()):
        val = labelled_shards(tmp_path / f"val{i}", 16, classes)
        overrides = [f"--model.num_classes={num_classes}", "--trainer.max_steps=1"]
        result = finetune(tmp_path, exported, train, val, tmp_path / "run", *overrides)
        assert result.returncode == 2, (classes, result.stderr[-3000:])
        said = f"data.val_shards {val!r} names classes {named}, which data.train_shards {train!r} has not (fences"
        assert said in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_val_labels_are_read_as_trains_by_class_name(tmp_path):
    """Each split numbers its own classes: a val set without gardens numbers sunsets 1 where train
    has it 2, and was scored against train's gardens (or refused, whatever its order)."""
    train = labelled_shards(tmp_path / "photos", 12, ("fences", "gardens", "sunsets"))
    for name, classes in (("lacking", ("fences", "sunsets")), ("reordered", ("sunsets", "fences", "gardens"))):
        val = labelled_shards(tmp_path / name, 8, classes)
        data = LabelledShardDataModule(train, FineTuneView(32), val, batch_size=8, num_workers=0)
        assert data.check_labels(3) == (
            f"data.val_shards {val!r} has no gardens: its accuracy is over the other classes only"
            if name == "lacking"
            else None
        )
        _, labels = next(iter(data.val_dataloader()))
        as_train = [("fences", "gardens", "sunsets").index(classes[i % len(classes)]) for i in range(8)]
        assert sorted(labels.tolist()) == sorted(as_train), name


def test_a_val_set_without_the_last_classes_is_scored_and_said(exported, tmp_path):
    """Every val label keeps its place in train's list, as `ssl-vit knn` scores such a set; a
    model.num_classes of val's count gets the advice of train's."""
    train = labelled_shards(tmp_path / "photos", 32, ("fences", "gardens", "sunsets"))
    val = labelled_shards(tmp_path / "val", 16, ("fences", "gardens"))
    result = finetune(
        tmp_path, exported, train, val, tmp_path / "run", "--model.num_classes=3", "--trainer.max_steps=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    note = f"data.val_shards {val!r} has no sunsets: its accuracy is over the other classes only"
    assert f"warning: {note}" in result.stderr
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["val_note"] == note and summary["val_shards"] == val  # where the number is copied from
    card = (tmp_path / "run/export/README.md").read_text()
    # what the accuracy counts, and what answering one class for every image scores (it had no baseline)
    assert summary["val_images"] == 16 and summary["val_majority_class_top1"] == 50.0
    counts = "16 images of 3 classes, 6.2 points each; the largest class alone scores 50.0"
    assert f"Accuracy of this checkpoint on `{val}` (%; {counts}):" in card and f"- {note}" in card
    result = finetune(tmp_path, exported, train, val, tmp_path / "run2", "--model.num_classes=2")
    assert result.returncode == 2
    assert "has 3 classes (fences, gardens, sunsets) but model.num_classes is 2; set model.num_classes to 3" in (
        result.stderr
    )


def test_a_run_keeps_the_classes_and_weights_it_started_with(exported, tmp_path):
    """Its export took the class names from the data as it was at export time (a class folder
    renamed since shifted every label by one), and a resume with --model.pretrained false had its
    card say "fine-tuned from random initialisation" of weights that started pretrained."""
    photos = ("fences", "gardens", "sunsets")
    train, val = labelled_shards(tmp_path / "photos", 32, photos), labelled_shards(tmp_path / "val", 16, photos)
    run = tmp_path / "run"
    result = finetune(tmp_path, exported, train, val, run, "--model.num_classes=3", "--trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    refused = finetune(
        tmp_path,
        exported,
        train,
        val,
        run,
        "--model.num_classes=3",
        "--trainer.max_steps=2",
        "--model.pretrained=false",
    )
    assert refused.returncode == 2 and "its model.pretrained is True, this run's False" in refused.stderr
    renamed = ("gardens", "sunsets", "zfences")  # fences renamed: every class's index moves
    for folder in (train, val):
        shutil.rmtree(folder)
        labelled_shards(Path(folder), 32 if folder == train else 16, renamed)
    refused = finetune(tmp_path, exported, train, val, run, "--model.num_classes=3", "--trainer.max_steps=2")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"its model.label_names is {list(photos)}, this run's {list(renamed)}" in refused.stderr
    assert in_this_process(tmp_path, "export", str(run), str(tmp_path / "out")).returncode == 0
    assert json.loads((tmp_path / "out/config.json").read_text())["pretrained_cfg"]["label_names"] == list(photos)


def test_validating_on_the_training_images_is_said(exported, tmp_path):
    train = labelled_shards(tmp_path / "train", 32)
    result = finetune(
        tmp_path, exported, train, train, tmp_path / "run", "--model.num_classes=4", "--trainer.max_steps=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = f"warning: {train} holds the very images that the classifier trains on ({train}), so these numbers are"
    assert said in result.stderr
    # and where the number is kept: the summary and the card said nothing of it
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["val_note"].startswith(f"{train} holds the very images that the classifier trains on")
    assert "holds the very images" in (tmp_path / "run/export/README.md").read_text()
    assert summary["settings_changed"] is None
    # a resume with other settings: the summary names them, as a pretraining run's does (it had no such key)
    longer = ["--model.num_classes=4", "--trainer.max_steps=2", "--model.min_lr=2e-6"]
    result = finetune(tmp_path, exported, train, train, tmp_path / "run", *longer)
    assert result.returncode == 0, result.stderr[-3000:]
    changed = json.loads((tmp_path / "run/summary.json").read_text())["settings_changed"]
    assert changed == ["at step 1: model.min_lr 1e-06 -> 2e-06; trainer.max_steps 1 -> 2"], changed  # the length too


def test_an_odd_batch_with_mixup_stops_before_any_work(exported, tmp_path):
    """Mixup pairs a batch's images: it stopped at the first step, leaving the run's logs behind."""
    train = labelled_shards(tmp_path / "train", 32)
    result = finetune(
        tmp_path, exported, train, train, tmp_path / "run", "--model.num_classes=4", "--data.batch_size=7"
    )
    assert result.returncode == 2 and "data.batch_size is 7: Mixup and CutMix pair the images" in result.stderr
    assert not (tmp_path / "run").exists()


def test_one_class_stops_fine_tuning_with_one_line(exported, tmp_path):
    """Not "set model.num_classes to 1", which a classifier of one class then refuses."""
    train = labelled_shards(tmp_path / "fences", 16, ("fences",))
    result = finetune(tmp_path, exported, train, train, tmp_path / "run", "--model.num_classes=3")
    assert result.returncode == 2
    assert f"data.train_shards {train!r} has one class (fences), and a classifier needs two or more" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_folder_gives_its_newest_checkpoint_and_a_mistyped_path_its_neighbour(exported, tmp_path):
    """As `ssl-vit knn` reads a run folder; it was "neither an export folder nor an ssl-vit
    checkpoint" for the run folder, its checkpoints and a typo alike."""
    run = tmp_path / "runs/photos/mae"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(exported.parent / "last.ckpt", run / "checkpoints/last.ckpt")
    shutil.copytree(exported, run / "export")
    expected = FineTune(num_classes=4, init_from=str(exported)).model.state_dict()
    for given in (run, run / "checkpoints"):
        module = FineTune(num_classes=4, init_from=str(given))
        assert module.hparams.init_from == str(run / "checkpoints/last.ckpt")  # what the record names
        for name, tensor in module.model.state_dict().items():
            if not name.startswith(("head.", "fc_norm.")):  # new, at random
                torch.testing.assert_close(tensor, expected[name], msg=name)
    with pytest.raises(UserError, match=re.escape(f"{run}/exprt does not exist (did you mean {run}/export?)")):
        FineTune(num_classes=4, init_from=str(run / "exprt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no complete checkpoint, nor does .*; pass an export folder, a run"):
        FineTune(num_classes=4, init_from=str(tmp_path / "empty"))
    # as the user met it: one line
    result = in_this_process(
        tmp_path,
        "finetune",
        "--config",
        str(ROOT / "recipes/quickstart/finetune.yaml"),
        f"--model.init_from={run / 'exprt'}",
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "model.init_from" in result.stderr and "does not exist (did you mean" in result.stderr


def test_a_view_of_another_size_than_the_weights_fine_tunes_at_the_views(exported, tmp_path):
    """Weights trained at 32 px fine-tuned on 64-px crops: the classifier is built at 64 px, the
    position embeddings resampled to its grid (timm's patch embedding asserted 64 != 32)."""
    module = FineTune(num_classes=4, init_from=str(exported), image_size=64)
    encoder = timm.create_model(f"local-dir:{exported}", pretrained=True)
    resampled = resample_abs_pos_embed(encoder.pos_embed, (16, 16), num_prefix_tokens=encoder.num_prefix_tokens)
    torch.testing.assert_close(module.model.pos_embed, resampled)
    assert module.model(torch.randn(2, 3, 64, 64)).shape == (2, 4)

    train, val = labelled_shards(tmp_path / "train", 32), labelled_shards(tmp_path / "val", 16)
    overrides = ["--model.num_classes=4", "--trainer.max_steps=1", "--data.view.init_args.size=64"]
    result = finetune(tmp_path, exported, train, val, tmp_path / "run", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run/summary.json").read_text())["val_images"] == 16
    classifier = timm.create_model(f"local-dir:{tmp_path / 'run/export'}", pretrained=True).eval()
    assert classifier.pretrained_cfg["input_size"] == (3, 64, 64)  # what its users prepare images at
    assert classifier(torch.randn(1, 3, 64, 64)).shape == (1, 4)


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("base_lr", -1.0, "model.base_lr is -1.0; it must be 0 or more"),  # trained by gradient ascent
        ("label_smoothing", 1.5, "model.label_smoothing is 1.5; it must be from 0 to 0.99"),  # towards wrong labels
        ("drop_path_rate", 1.5, "model.drop_path_rate is 1.5; it must be from 0 to 1"),  # a traceback at the 1st step
        ("mixup", -1.0, "model.mixup is -1.0; it must be 0 or more"),  # silently no mixup
        ("layer_decay", -2.0, "model.layer_decay is -2.0; it must be from 0 to 1"),
    ],
)
def test_fine_tuning_settings_out_of_range_are_one_line_before_any_work(setting, value, says):
    with pytest.raises(UserError, match=re.escape(says)):
        FineTune(num_classes=3, encoder=TINY_ENCODER, pretrained=False, **{setting: value})


def test_the_classifier_size_is_the_data_views_and_asking_for_another_says_where_to_set_it(tmp_path):
    # jsonargparse's own message for a linked key was "int | None is not callable"
    recipe = str(ROOT / "recipes/quickstart/finetune.yaml")
    result = in_this_process(tmp_path, "finetune", "--config", recipe, "--model.image_size=48")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "set --data.view.init_args.size N instead" in result.stderr


def test_a_distilled_cnn_student_is_refused_in_one_line_naming_timm(tmp_path):
    # it ended in "ResNet.__init__() got an unexpected keyword argument 'img_size'"
    folder = tmp_path / "student-export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet10t", "model_args": {}}))
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"ssl-vit finetune fine-tunes ViTs; .*student-export is a resnet10t"):
        FineTune(num_classes=3, init_from=str(folder))


def test_the_accuracy_reported_is_of_the_last_steps_weights(exported, tmp_path):
    """Lightning validates at a run's last step only in an epoch that check_val_every_n_epoch
    validates: 4 steps an epoch, validated every second epoch, the run stops at step 10 of epoch
    3, and reported step 8's accuracy as the final weights' (a helper's run: 55.6, where the last
    checkpoint scores 53.3). The summary names the step validated; its accuracy is a validation of
    the last checkpoint's."""
    train, val = labelled_shards(tmp_path / "train", 64), labelled_shards(tmp_path / "val", 32)
    overrides = ["--model.num_classes=4", "--trainer.max_steps=10", "--trainer.check_val_every_n_epoch=2"]
    overrides += ["--model.base_lr=0.05", "--model.mixup=0", "--model.cutmix=0"]  # steps 9 and 10 change much
    assert finetune(tmp_path, exported, train, val, tmp_path / "run", *overrides).returncode == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == summary["val_step"] == 10
    module = FineTune.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    data = LabelledShardDataModule(train, FineTuneView(32), val, batch_size=16, num_workers=0)
    data.check_labels(4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (validated,) = trainer.validate(module, datamodule=data, verbose=False)
    assert summary["val_top1"] == pytest.approx(validated["val/top1"], abs=1e-3)


def test_ctrl_c_in_the_last_validation_saves_the_last_step_and_exits(exported, tmp_path):
    """Ctrl-C at a terminal while fine-tuning validates its last step, before the epoch's end saves
    it: that step is saved and named, and the command exits 130. (It said "saved in ;", saved
    nothing, and then waited for ever on a loader worker that ignores the SIGTERM of its exit.)"""
    train, val = labelled_shards(tmp_path / "train", 64), labelled_shards(tmp_path / "val", 32)
    fault = "--trainer.callbacks+=tests.fault_injection.InterruptTheLastValidation"
    args = finetune_args(
        exported, train, val, tmp_path / "run", "--model.num_classes=4", "--trainer.max_steps=6", fault
    )
    result = subprocess.run(
        [sys.executable, "-m", "ssl_vit.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # as at a terminal: the Ctrl-C goes to its process group
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert result.returncode == 130, result.stderr[-3000:]
    assert f"interrupted after the last step (6), saved in {last}" in " ".join(result.stderr.split())
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 6
