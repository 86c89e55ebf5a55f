"""Exports load straight into timm with the in-framework encoder's features; continued
pretraining starts from exactly the exported weights."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import ssl_vit
from ssl_vit import export_encoder, load_encoder
from ssl_vit.checkpoint import encoder_weights, load_checkpoint_encoder
from ssl_vit.encoder import NON_TIMM_SETTINGS
from ssl_vit.errors import UserError
from ssl_vit.export import card, write_timm_folder
from ssl_vit.methods import MAE
from tests.conftest import OBJECTIVES, TINY_ENCODER, fit_briefly
from tests.fault_injection import in_this_process

EVALUATED_ROLE = {"dino": "teacher", "mocov3": "base", "ijepa": "target"}


@pytest.fixture(params=sorted(OBJECTIVES))
def checkpoint(request, tmp_path) -> Path:
    torch.manual_seed(0)
    factory, view = OBJECTIVES[request.param]
    trainer = fit_briefly(factory(), view)
    path = tmp_path / f"{request.param}-run" / "last.ckpt"
    trainer.save_checkpoint(path)
    record = {
        "results": {"k=20": {"top1": 50.0, "top5": 90.0}},
        "random_init_results": {"k=20": {"top1": 12.5, "top5": 60.0}},
        "data": {"train_shards": "photos#train", "val_shards": "photos#heldout"},
        "counts": {"val_images": 8, "classes": 4, "val_classes": 4, "largest_class": 50.0},
    }
    (path.parent / "last.knn.json").write_text(json.dumps(record))
    return path


def test_timm_loads_the_export_with_the_same_features(checkpoint, tmp_path):
    out = export_encoder(checkpoint, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=7).eval()
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    encoder, _ = load_checkpoint_encoder(checkpoint)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder.eval()(x).tokens)
    # and the Python API gives the same model, from the folder or the checkpoint
    for source in (out, checkpoint):
        with torch.no_grad():
            torch.testing.assert_close(load_encoder(source).eval().forward_features(x), encoder(x).tokens)


POOLED_AS_EVALUATED = {"simmim": "mean", "ijepa": "mean"}  # the others are evaluated on the CLS token


def test_timm_pools_the_export_as_the_run_evaluated_it(checkpoint, tmp_path):
    model = timm.create_model(f"local-dir:{export_encoder(checkpoint, tmp_path / 'export')}", pretrained=True).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 32, 32))
        pooled = model.forward_head(tokens, pre_logits=True)
    mean = POOLED_AS_EVALUATED.get(checkpoint.parent.name.split("-")[0]) == "mean"
    torch.testing.assert_close(pooled, tokens[:, model.num_prefix_tokens :].mean(1) if mean else tokens[:, 0])


def test_export_holds_the_encoder_only_and_its_provenance(checkpoint, tmp_path):
    out = export_encoder(checkpoint, tmp_path / "export")
    keys = set(load_file(str(out / "model.safetensors")))
    expected = set(timm.create_model("vit_tiny_patch16_224", num_classes=0, **_args(checkpoint)).state_dict())
    assert keys == expected
    assert not any(
        k.startswith(("decoder", "head", "mask_token", "encoder.", "teacher", "momentum", "proj")) for k in keys
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    # timm's tag and licence name its release of the architecture, not these weights
    assert not {"tag", "license", "hf_hub_id"} & set(config["pretrained_cfg"])
    prov = config["ssl_vit"]
    assert prov["ssl_vit_version"] == ssl_vit.__version__
    card = (out / "README.md").read_text()
    assert f"optimiser steps: {prov['step']}" in card and 'create_model("local-dir:' in card
    # what the run measured, readable: on which images, and against its random initialisation
    assert "by the run on `photos#heldout` (neighbours and probes from `photos#train`), top-1 %" in card
    # what the accuracies count: one image is 12.5 points, and one answer for all scores 50
    assert "top-1 % (8 images of 4 classes, 12 points each; the largest class alone scores 50.0):" in card
    assert "- k-NN: k=20 50.0 (random init: k=20 12.5)\n" in card
    # how a deployment prepares an image, as the evaluation did (timm's transform from config.json)
    said = "- input: RGB, the short side resized to 36 px and the long side in proportion, rounded down (bicubic"
    assert said in card and "centre-cropped to 32 x 32, normalised by" in card
    # the heading gives the shape the weights have, not only the timm name it is built from
    shape = f"{TINY_ENCODER['depth']} blocks, {TINY_ENCODER['embed_dim']}-d, {TINY_ENCODER['patch_size']}-px patches"
    assert card.startswith(f"# vit_tiny_patch16_224 with {shape}, 32-px images, {prov['objective']}\n")
    objective = checkpoint.parent.name.split("-")[0]
    assert prov["objective"].lower() == objective and prov["step"] == 2
    assert prov["encoder_role"] == EVALUATED_ROLE.get(objective, "encoder")
    role = f" ({prov['encoder_role']} encoder)" if objective in EVALUATED_ROLE else ""  # named where there are two
    assert f"- objective: {prov['objective']}{role}\n" in card
    assert prov["knn"] == {"k=20": {"top1": 50.0, "top5": 90.0}}
    assert prov["recipe"]["encoder"] == _encoder(checkpoint)  # with the objective's defaults
    assert TINY_ENCODER.items() <= prov["recipe"]["encoder"].items()


def test_state_dict_format_is_a_plain_timm_state_dict(checkpoint, tmp_path):
    out = export_encoder(checkpoint, tmp_path / "encoder.safetensors", fmt="state_dict")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **_args(checkpoint))
    model.load_state_dict(load_file(str(out)))  # strict: every key, nothing extra


def test_continued_pretraining_starts_from_the_exported_weights(checkpoint, tmp_path):
    out = export_encoder(checkpoint, tmp_path / "export")
    exported = load_file(str(out / "model.safetensors"))
    method = MAE(_encoder(checkpoint), decoder_dim=32, decoder_depth=1, decoder_heads=2, init_from=str(out))
    method.setup("fit")
    for key, value in method.encoder.vit.state_dict().items():
        torch.testing.assert_close(value, exported[key], msg=key)


def test_continued_pretraining_resizes_position_embeddings(checkpoint, tmp_path):
    out = export_encoder(checkpoint, tmp_path / "export")
    method = MAE(
        {**_encoder(checkpoint), "img_size": 48}, decoder_dim=32, decoder_depth=1, decoder_heads=2, init_from=str(out)
    )
    method.setup("fit")
    prefix = method.encoder.num_prefix_tokens  # the CLS token; I-JEPA's encoder has none
    assert method.encoder.vit.pos_embed.shape == (1, prefix + 12 * 12, 64)
    exported = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(method.encoder.vit.blocks[0].attn.qkv.weight, exported["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(method.encoder.vit.pos_embed[:, :prefix], exported["pos_embed"][:, :prefix])


def test_continued_pretraining_from_a_checkpoint_takes_the_heads_too(checkpoint):
    trained = torch.load(checkpoint, weights_only=True)["state_dict"]
    method = OBJECTIVES[checkpoint.parent.name.split("-")[0]][0](init_from=str(checkpoint))
    method.setup("fit")
    for key, value in method.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)


def test_bad_export_and_load_input_is_one_clear_error(checkpoint, tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="not an ssl-vit checkpoint"):
        export_encoder(other, tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_encoder(checkpoint, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("")
    with pytest.raises(UserError, match="cannot write"):
        export_encoder(checkpoint, not_a_folder / "export")  # its parent cannot be created
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    out = export_encoder(checkpoint, tmp_path / "export")
    # an export given to be exported again (to add ONNX to it): it names its run's command
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    shutil.copytree(out, tmp_path / "run/export")
    again = in_this_process(tmp_path, "export", "run/export", "x", "--onnx")
    assert again.returncode == 2 and "run/export is an export folder, which holds no checkpoint" in again.stderr
    assert "export run again: ssl-vit export run OUT --onnx" in again.stderr
    copied = in_this_process(tmp_path, "export", "export", "y")  # a copy elsewhere: what it was written from
    assert copied.returncode == 2 and f"export {checkpoint} again: ssl-vit export {checkpoint} OUT\n" in copied.stderr
    wrong = MAE({**TINY_ENCODER, "embed_dim": 96, "num_heads": 2}, decoder_dim=32, decoder_depth=1, init_from=str(out))
    with pytest.raises(UserError, match="do not fit the encoder"):
        wrong.setup("fit")


def _encoder(checkpoint: Path) -> dict:
    """The checkpoint's encoder settings: the tiny encoder with its objective's defaults (SimMIM's layer scale)."""
    return OBJECTIVES[checkpoint.parent.name.split("-")[0]][0]().hparams.encoder


def _args(checkpoint: Path) -> dict:
    return {k: v for k, v in _encoder(checkpoint).items() if k not in NON_TIMM_SETTINGS}


def test_the_one_encoder_of_an_objective_answers_to_its_old_name_and_its_new():
    """A single-encoder objective's role was 'student' before it was 'encoder': `--role` takes either."""
    weights = {"encoder.w": torch.ones(1), "head.w": torch.zeros(1)}
    for recorded in ("student", "encoder"):
        ckpt = {"ssl_vit": {"encoders": {recorded: "encoder"}}, "state_dict": weights}
        for asked in ("student", "encoder", None):
            assert encoder_weights(ckpt, "x.ckpt", asked) == ({"w": torch.ones(1)}, recorded)
    two = {"ssl_vit": {"encoders": {"teacher": "teacher_encoder", "student": "encoder"}}, "state_dict": weights}
    with pytest.raises(UserError, match="has no 'encoder' encoder; it has teacher, student"):
        encoder_weights(two, "x.ckpt", "encoder")


def test_the_card_says_the_training_data_less_the_tenth_the_run_held_out(tmp_path):
    """Whatever its folder is called: a run without a val folder beside its `train` folder trained
    on all but the held-out tenth; with one, on all of it."""
    (tmp_path / "a/train").mkdir(parents=True)  # no val beside it
    (tmp_path / "b/train").mkdir(parents=True)
    (tmp_path / "b/val").mkdir()

    def training_data(train: str, evaluated_on: dict | None = None, results: tuple = ("- k-NN: k=20 50.0",)) -> str:
        record = {"data": {"train_shards": train, "val_shards": None}, "evaluated_on": evaluated_on}
        text = card("t", record, [], "", list(results), "timm", [])
        return next(line for line in text.splitlines() if line.startswith("- training data:"))

    less = ", less its held-out tenth (`#heldout`), which it was evaluated on"
    assert training_data(str(tmp_path / "a/train")).endswith(less)
    # an unlabelled folder's run evaluates nothing: held out all the same, and not said to be evaluated on
    assert training_data(str(tmp_path / "a/train"), results=()).endswith("less its held-out tenth (`#heldout`)")
    assert training_data(str(tmp_path / "photos")).endswith(less)
    assert training_data(str(tmp_path / "b/train")).endswith("train`")
    # what the run recorded it evaluated on, where the folders have changed since
    assert training_data(str(tmp_path / "b/train"), {"val_shards": f"{tmp_path}/b/train#heldout"}).endswith(less)


def test_a_card_names_what_a_run_took_from_its_init_from():
    # Fine-tuned with pretrained false, the card said it started from the export's weights too.
    def started(recipe: dict) -> list[str]:
        text = card("t", {"recipe": recipe}, [], "", [], "timm", [])
        return [line for line in text.splitlines() if "init_from" in line]

    assert started({"init_from": "runs/a/export"}) == [
        "- started from: `runs/a/export` (init_from), whose own training this card does not count"
    ]
    assert started({"init_from": "runs/a/export", "pretrained": False}) == [
        "- architecture of: `runs/a/export` (init_from; its weights not used, `pretrained: false`)"
    ]


def test_an_export_is_prepared_at_its_own_size_by_timms_validation_too(tmp_path):
    """timm's validation resolves a model's test size first: a release's (resnet10t's 224 px) would
    prepare a 32-px student's images at 7 times the size it was trained and evaluated at."""
    cnn = timm.create_model("resnet10t", num_classes=0)
    assert cnn.pretrained_cfg["test_input_size"] == (3, 224, 224)
    config = {"pretrained_cfg": {"input_size": (3, 32, 32), "crop_pct": 0.875}}
    out = write_timm_folder(cnn, tmp_path / "export", {}, config, overwrite=False)
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    resolved = timm.data.resolve_data_config(model=model, use_test_size=True)
    assert resolved["input_size"] == (3, 32, 32) and resolved["crop_pct"] == 0.875
