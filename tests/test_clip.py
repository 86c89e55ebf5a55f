"""CLIP against references written here from open_clip's formulas (the symmetric loss, the
logit-scale clamp, the weight-decay exemptions and the optimiser settings), and the captions it
reads: tokenised as open_clip tokenises, bad ones skipped and counted."""

import json
import logging
import math

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.data import embedded, write_shards
from ssl_vit.data.embedded import CLASSES
from ssl_vit.data.pipeline import ShardDataset
from ssl_vit.data.shards import resolve_shards, write_embedded_shards
from ssl_vit.data.views import EvalView
from ssl_vit.methods import CLIP
from ssl_vit.methods.clip import CaptionTokens
from tests.conftest import TINY_ENCODER
from tests.fault_injection import KNN_AT_BOTH_ENDS, in_this_process, png, pretrain_recipe_briefly

TINY_TEXT = dict(embed_dim=16, context_length=12, vocab_size=50, text_width=32, text_heads=2, text_layers=1)


def reference_clip_loss(image, text, scale):
    """open_clip ClipLoss on one process: logits = scale x image @ text.T; cross-entropy of each
    row (an image against every text) and each column (a text against every image) with the
    pair's own partner as the target, averaged, then the mean of the two directions."""
    logits = scale * image @ text.T
    n = len(image)
    rows = sum(-F.log_softmax(logits[i], dim=0)[i] for i in range(n)) / n
    cols = sum(-F.log_softmax(logits[:, j], dim=0)[j] for j in range(n)) / n
    return (rows + cols) / 2


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    """Caption-like token ids: start token, words, end-of-text (the largest id, where open_clip
    pools), zero padding."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, TINY_TEXT["context_length"], dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(3, 10, (), generator=g))
        out[i, 0] = 47
        out[i, 1:length] = torch.randint(1, 46, (length - 1,), generator=g)
        out[i, length] = 49
    return out


def test_the_step_is_the_symmetric_loss_of_the_normalised_projected_towers(monkeypatch):
    torch.manual_seed(0)
    method = CLIP(TINY_ENCODER, **TINY_TEXT)
    monkeypatch.setattr(method, "log", lambda *a, **k: None)
    monkeypatch.setattr(method, "watch_collapse", lambda *a, **k: None)
    images, ids = torch.randn(5, 3, 32, 32), tokens(5)
    loss = method.training_step((images, ids), 0)
    vit = method.encoder.vit
    cls = vit.norm(vit.blocks(vit._pos_embed(vit.patch_embed(images))))[:, 0]  # timm's CLS pooling
    image = F.normalize(cls @ method.image_projection, dim=-1)
    text = F.normalize(method.text(ids), dim=-1)
    expected = reference_clip_loss(image, text, 1 / 0.07)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert method.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_clip_loss_is_lowest_for_matching_pairs():
    from ssl_vit.losses import clip_loss

    torch.manual_seed(0)
    image = F.normalize(torch.randn(6, 8), dim=-1)
    matched = clip_loss(image, image, torch.tensor(100.0))
    shuffled = clip_loss(image, image[torch.randperm(6)], torch.tensor(100.0))
    torch.testing.assert_close(matched, reference_clip_loss(image, image, 100.0))
    assert matched < 0.1 < shuffled


def test_the_logit_scale_is_clamped_to_ln_100_after_each_optimiser_step():
    method = CLIP(TINY_ENCODER, **TINY_TEXT)
    method._trainer = None
    with torch.no_grad():
        method.logit_scale.fill_(6.0)
    method.after_optimizer_step(0)
    assert method.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        method.logit_scale.fill_(-1.0)
    method.after_optimizer_step(1)
    assert method.logit_scale.item() == 0.0


def test_open_clips_decay_exemptions_and_optimiser_settings():
    method = CLIP(TINY_ENCODER, **TINY_TEXT)
    optimizer = method.configure_optimizers()
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {name for name, p in method.named_parameters() if id(p) in decayed}
    # open_clip's exclude: p.ndim < 2 or "bn"/"ln"/"bias" in the name or logit_scale
    for name, p in method.named_parameters():
        excluded = p.ndim < 2 or "bias" in name or "logit_scale" in name or name == "encoder.vit.cls_token"
        assert (name not in names) == excluded, name
    assert {"image_projection", "text.token_embedding.weight", "text.positional_embedding"} <= names
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    assert method.lr_batch_scale(32768) == method.lr_batch_scale(64) == 1.0  # --lr is the lr at any batch


def test_a_short_run_trains_both_towers_and_keeps_the_scale_in_bounds():
    torch.manual_seed(0)
    method = CLIP(TINY_ENCODER, **TINY_TEXT, base_lr=1.0, warmup_epochs=0)  # a large step for the scale
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), tokens(8)), batch_size=4)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    L.Trainer(max_steps=2, accelerator="cpu", **quiet).fit(method, data)
    moved = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    assert {"image_projection", "logit_scale", "text.text_projection"} <= moved
    assert any(n.startswith("encoder.") for n in moved) and any(n.startswith("text.transformer.") for n in moved)
    assert 0 <= method.logit_scale.item() <= math.log(100)


def captioned_shards(folder, captions, labels=None):
    """One 32-px random image per caption (bytes, or None for no caption member), in 2 shards."""
    rng = np.random.default_rng(0)
    samples = []
    for i, caption in enumerate(captions):
        image = png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        samples.append(("png", image, None if labels is None else labels[i], None, None))
        if caption is not None:
            samples[-1] = (*samples[-1][:4], caption)
    classes = [] if labels is None else ["cat", "dog", "car", "tree"]
    write_shards(samples, folder, classes=classes, source="test", samples_per_shard=max(1, len(captions) // 2))
    return folder


def read_all(dataset):
    return list(dataset._read(list(dataset.urls)))


def test_captions_are_read_tokenised_and_bad_ones_skipped_and_counted(tmp_path, caplog):
    tokenize = CaptionTokens(context_length=8)
    folder = captioned_shards(
        tmp_path / "shards", ["a red ring", None, "   ", "one two three four five six seven", "ok"]
    )
    # non-UTF-8 bytes, written by hand: write_shards takes text
    broken = tmp_path / "broken"
    broken.mkdir()
    with wds.TarWriter(str(broken / "shard-000000.tar")) as sink:
        sink.write({"__key__": "x", "png": png(np.zeros((32, 32, 3), np.uint8)), "txt": b"caf\xe9"})
    urls = [str(p) for p in sorted(folder.glob("*.tar"))] + [str(broken / "shard-000000.tar")]
    dataset = ShardDataset(urls, EvalView(32), captions=tokenize)
    with caplog.at_level(logging.WARNING):
        samples = read_all(dataset)
    open_clip = SimpleTokenizer(context_length=8)  # the reference: open_clip's own call
    assert [tokens.tolist() for _, tokens in samples] == [
        open_clip("a red ring")[0].tolist(),
        open_clip("one two three four five six seven")[0].tolist(),
        open_clip("ok")[0].tolist(),
    ]
    assert samples[1][1][-1] == 49407  # cut as open_clip cuts: the end-of-text token stays last
    assert dataset.skipped.value == 3 and dataset.truncated.value == 1
    for why in ("no caption (.txt member)", "empty caption", "caption is not UTF-8 text"):
        assert why in caplog.text
    assert "ignoring .txt" not in caplog.text  # captions are a member ssl-vit reads


def test_a_folder_of_images_reads_each_images_caption_from_its_txt(tmp_path):
    (tmp_path / "photos").mkdir()
    for name, caption in (("a", "a cat"), ("b", "a dog")):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photos" / f"{name}.png")
        (tmp_path / "photos" / f"{name}.txt").write_text(caption)
    urls, _ = resolve_shards(str(tmp_path / "photos"))
    tokenize = CaptionTokens(context_length=8)
    samples = read_all(ShardDataset(urls, EvalView(32), captions=tokenize))
    open_clip = SimpleTokenizer(context_length=8)
    assert sorted(t.tolist() for _, t in samples) == sorted(open_clip(c)[0].tolist() for c in ("a cat", "a dog"))


def test_shards_written_from_a_folder_keep_each_images_caption(tmp_path):
    (tmp_path / "photos").mkdir()
    for name, caption in (("a", b"a cat"), ("b", b"caf\xe9"), ("c", None)):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photos" / f"{name}.png")
        if caption is not None:
            (tmp_path / "photos" / f"{name}.txt").write_bytes(caption)
    result = in_this_process(tmp_path, "shards", "imagefolder", "photos", "shards")
    assert result.returncode == 0, result.stderr
    members = {s["__key__"]: s.get("txt") for s in wds.WebDataset(str(tmp_path / "shards/shard-000000.tar"))}
    assert sorted(members.values(), key=str) == sorted([b"a cat", b"caf\xe9", None], key=str)  # bytes as written
    dataset = ShardDataset([str(tmp_path / "shards/shard-000000.tar")], EvalView(32), captions=CaptionTokens(8))
    assert len(read_all(dataset)) == 1 and dataset.skipped.value == 2  # the reader judges them: not UTF-8, none


def test_the_embedded_shapes_carry_captions_of_what_was_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "SPLITS", {"train": 2, "val": 2})  # a few images per class
    write_embedded_shards(tmp_path / "shapes")
    member = next(iter(wds.WebDataset(str(tmp_path / "shapes/val/shard-000000.tar"), shardshuffle=False)))
    caption, label = member["txt"].decode(), int(member["cls"])
    assert CLASSES[label] in caption and "background" in caption


def test_the_quickstart_recipe_trains_clip_from_the_command_line(tmp_path):
    """As a user runs it, shrunk: captioned shards in, a trained checkpoint and an image-tower export out."""
    captions = [f"caption number {i}" for i in range(32)]
    shards = captioned_shards(tmp_path / "shards", captions, labels=[i % 4 for i in range(32)])
    recipe = "recipes/quickstart/clip.yaml"
    result = pretrain_recipe_briefly(tmp_path, recipe, shards, {"text_layers": 1}, callbacks=[KNN_AT_BOTH_ENDS])
    assert result.returncode in (0, 3), result.stderr[-3000:]  # 3: random images may end flagged collapsed
    vit = timm.create_model(f"local-dir:{tmp_path / 'runs/shards/clip/export'}", pretrained=True)
    assert vit.embed_dim == 128
    # zero-shot from the shards' class names, in the end-of-run table and records
    assert "zero-shot" in result.stdout
    record = json.loads((tmp_path / "runs/shards/clip/checkpoints/last.zeroshot.json").read_text())
    assert set(record["results"]) == {"top1", "top5"} and "random_init_results" in record


def test_zero_shot_is_open_clips_prompt_ensemble_classifier():
    """zero_shot_classifier.py: per class, the mean of its prompts' normalised text embeddings,
    normalised; each image to the class of highest cosine with its normalised projected embedding."""
    torch.manual_seed(0)
    method = CLIP(TINY_ENCODER, **{**TINY_TEXT, "vocab_size": 49408}).eval()
    names = ["cat", "dog", "car"]
    pooled, labels = torch.randn(40, 64), torch.randint(0, 3, (40,))
    tokenizer = SimpleTokenizer(context_length=TINY_TEXT["context_length"])
    classes = []
    with torch.no_grad():
        for name in names:
            prompts = [F.normalize(method.text(tokenizer(t(name))), dim=-1)[0] for t in SIMPLE_IMAGENET_TEMPLATES]
            classes.append(F.normalize(torch.stack(prompts).mean(0), dim=0))
        scores = F.normalize(pooled @ method.image_projection, dim=-1) @ torch.stack(classes).T
    top1 = 100 * (scores.argmax(1) == labels).float().mean().item()
    result = method.zero_shot(pooled, labels, names)
    assert result["top1"] == pytest.approx(top1, abs=1e-3) and result["top5"] == 100.0  # 3 classes: all in the top 5
