"""CLIP against references written here from open_clip's formulas (the symmetric loss, the
logit-scale clamp, the weight-decay exemptions and the optimiser settings), and the captions it
reads: tokenised as open_clip tokenises, bad ones skipped and counted."""

import csv
import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.data import embedded, write_shards
from ssl_vit.data.embedded import CLASSES
from ssl_vit.data.pipeline import ShardDataset, captioned_only, sample_source
from ssl_vit.data.shards import resolve_shards, write_embedded_shards
from ssl_vit.data.views import EvalView
from ssl_vit.errors import UserError
from ssl_vit.eval.image_text import class_embeddings, evaluate_image_text, retrieval_recall, zero_shot_accuracy
from ssl_vit.methods import CLIP
from ssl_vit.methods.clip import CaptionTokens, load_image_text_model, open_clip_folder_contents, open_clip_vision
from tests.conftest import TINY_ENCODER
from tests.fault_injection import (
    KNN_AT_BOTH_ENDS,
    ROOT,
    in_this_process,
    png,
    pretrain_recipe_briefly,
    write_tiny_shards,
)

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
    # open_clip_train's make_wd_exclude: any 1-D parameter (norms, biases, logit_scale), and the names
    # each tower's no_weight_decay() gives (timm's ViT as open_clip's timm image tower declares them)
    declared = {f"text.{n}" for n in method.text.no_weight_decay()}
    declared |= {f"encoder.vit.{n}" for n in method.encoder.vit.no_weight_decay()}
    for name, p in method.named_parameters():
        assert (name not in names) == (p.ndim <= 1 or name in declared), name
    assert {"encoder.vit.pos_embed", "encoder.vit.cls_token", "text.positional_embedding"} <= declared
    assert {"image_projection", "text.token_embedding.weight", "encoder.vit.blocks.0.attn.qkv.weight"} <= names
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    assert method.lr_batch_scale(32768) == method.lr_batch_scale(64) == 1.0  # --lr is the lr at any batch


def test_the_image_tower_starts_as_open_clips_vision_transformer_does():
    """open_clip's VisionTransformer: class and position embeddings drawn at width^-0.5, attention as
    nn.MultiheadAttention initialises it (Xavier-uniform qkv, zero biases), the rest PyTorch's
    defaults; compared by each weight's spread with open_clip's own module of the same shape."""
    width, depth = 384, 1  # a class embedding of 384 draws: its spread known to 4%
    encoder = {**TINY_ENCODER, "name": "vit_base_patch32_clip_224", "embed_dim": width, "depth": depth}
    torch.manual_seed(0)
    method = CLIP(encoder, **TINY_TEXT)
    ours = open_clip_vision(method.encoder.vit, method.image_projection)[1]
    theirs = open_clip.transformer.VisionTransformer(32, 4, width, depth, 2, 4.0, output_dim=16).state_dict()
    for name, tensor in theirs.items():
        mine = ours[f"visual.{name}"]
        if tensor.std() == 0:  # zero biases, LayerNorms
            torch.testing.assert_close(mine, tensor, msg=name)
        else:  # timm's own draws (0.02, CLS 1e-6) are 1.3 to 90000 times off
            assert 0.85 < mine.std() / tensor.std() < 1.15, (name, float(mine.std()), float(tensor.std()))


def test_the_lr_warms_up_as_open_clips_counting_the_step_being_taken():
    """open_clip_train/scheduler.py cosine_lr: base x (step + 1) / W while step < W, then
    0.5 x (1 + cos(pi x (step - W) / (steps - W))) x base."""
    base, warmup, total = 5e-4, 20, 100
    method = CLIP(TINY_ENCODER, **TINY_TEXT, base_lr=base, warmup_epochs=2, scale_to_run=False)
    for step in (0, 1, 10, 18, 19, 20, 21, 60, 99):
        method._trainer = SimpleNamespace(
            num_training_batches=10, accumulate_grad_batches=1, estimated_stepping_batches=total, world_size=1
        )
        if step < warmup:
            expected = base * (step + 1) / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base
        assert method.learning_rate(step, per_device_batch=4) == pytest.approx(expected, rel=1e-12), step


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
    # an image without a caption is not a pair, and is left out apart from the unreadable ones
    assert dataset.skipped.value == 2 and dataset.uncaptioned.value == 1 and dataset.truncated.value == 1
    for why in ("empty caption", "caption is not UTF-8 text"):
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


def test_images_without_a_caption_are_left_out_and_the_epoch_counts_those_with_one(tmp_path, caplog):
    """A folder where some images have no caption beside them: CLIP trains on the pairs (as
    open_clip's loader does), says once how many are left out, and sizes its epoch by the pairs;
    shards written from it size theirs by their captioned count, split parts in proportion."""
    (tmp_path / "photos").mkdir()
    for i in range(20):
        Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
        if i % 4 == 0:
            (tmp_path / "photos" / f"{i}.txt").write_text(f"photo {i}")
    urls, index = resolve_shards(str(tmp_path / "photos"))
    with caplog.at_level(logging.WARNING):
        kept, captioned = captioned_only(urls, index)
    assert captioned.num_samples == 5
    assert "15 of the 20 images have no caption (photo.txt beside photo.jpg) and are left out" in caplog.text
    dataset = ShardDataset(kept, EvalView(32), captions=CaptionTokens(8))
    assert len(read_all(dataset)) == 5 and dataset.uncaptioned.value == 0 and dataset.skipped.value == 0

    assert in_this_process(tmp_path, "shards", "imagefolder", "photos", "shards").returncode == 0
    shards, index = resolve_shards(str(tmp_path / "shards"))
    assert (index.num_samples, index.captions) == (20, 5)
    assert captioned_only(shards, index)[1].num_samples == 5
    _, train_part = resolve_shards(str(tmp_path / "shards") + "#train")
    assert (train_part.num_samples, train_part.captions) == (18, 4)  # nine tenths of each, rounded
    dataset = ShardDataset(shards, EvalView(32), captions=CaptionTokens(8))
    assert len(read_all(dataset)) == 5 and dataset.uncaptioned.value == 15 and dataset.skipped.value == 0


def test_a_batch_larger_than_the_captioned_images_stops_naming_their_count_before_writing(tmp_path):
    """The batch-size advice counts the pairs, so following it works; and the run stops before its
    logger writes anything."""
    (tmp_path / "photos").mkdir()
    for i in range(40):
        Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
        if i % 2:
            (tmp_path / "photos" / f"{i}.txt").write_text(f"photo {i}")
    _, train_part = captioned_only(*resolve_shards(str(tmp_path / "photos#train")))
    recipe = str(ROOT / "recipes/quickstart/clip.yaml")
    result = in_this_process(tmp_path, "pretrain", "--config", recipe, "--data.train_shards", "photos")
    assert result.returncode == 2
    n = train_part.num_samples  # the training part's captioned images
    assert f"{n} samples per epoch are fewer than one global batch (128 x 1 devices); set --data.batch_size {n}" in (
        result.stderr
    )
    assert result.stderr.count("have no caption") == 1 and not (tmp_path / "runs").exists()


def test_shards_written_from_a_folder_keep_each_images_caption(tmp_path):
    (tmp_path / "photos").mkdir()
    for name, caption in (("a", b"a cat"), ("b", b"caf\xe9"), ("c", None)):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photos" / f"{name}.png")
        if caption is not None:
            (tmp_path / "photos" / f"{name}.txt").write_bytes(caption)
    result = in_this_process(tmp_path, "shards", "imagefolder", "photos", "shards")
    assert result.returncode == 0, result.stderr
    shards = sorted(str(path) for path in (tmp_path / "shards").glob("*.tar"))
    members = {s["__key__"]: s.get("txt") for s in wds.WebDataset(shards, shardshuffle=False)}
    assert sorted(members.values(), key=str) == sorted([b"a cat", b"caf\xe9", None], key=str)  # bytes as written
    dataset = ShardDataset(shards, EvalView(32), captions=CaptionTokens(8))
    assert len(read_all(dataset)) == 1  # the reader judges them: not UTF-8, none
    assert dataset.skipped.value == 1 and dataset.uncaptioned.value == 1


def test_the_embedded_shapes_carry_captions_of_what_was_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "SPLITS", {"train": 2, "val": 2})  # a few images per class
    write_embedded_shards(tmp_path / "shapes")
    member = next(iter(wds.WebDataset(str(tmp_path / "shapes/val/shard-000000.tar"), shardshuffle=False)))
    caption, label = member["txt"].decode(), int(member["cls"])
    assert CLASSES[label] in caption and "background" in caption


def test_the_quickstart_recipe_trains_clip_from_the_command_line(tmp_path, caplog):
    """As a user runs it, shrunk: captioned shards in (a few images without a caption, left out), a
    trained checkpoint and an image-tower export out."""
    captions = [f"caption number {i}" if i % 8 else None for i in range(32)]
    shards = captioned_shards(tmp_path / "shards", captions, labels=[i % 4 for i in range(32)])
    recipe = "recipes/quickstart/clip.yaml"
    with caplog.at_level(logging.INFO):
        result = pretrain_recipe_briefly(tmp_path, recipe, shards, {"text_layers": 1}, callbacks=[KNN_AT_BOTH_ENDS])
    assert result.returncode == 0, result.stderr[-3000:]  # checked before its first update only: not judged
    assert "4 of the 32 images have no caption (photo.txt beside photo.jpg) and are left out" in caplog.text
    assert caplog.text.count("have no caption") == 1  # said once, though the run reads its data more than once
    assert f"data: 28 images of {shards} in 4 classes (cat; dog; car; tree) for training" in result.stderr  # pairs
    vit = timm.create_model(f"local-dir:{tmp_path / 'runs/shards/clip/export'}", pretrained=True)
    assert vit.embed_dim == 128
    # zero-shot from the shards' class names, in the end-of-run table and records
    assert "zero-shot" in result.stdout
    record = json.loads((tmp_path / "runs/shards/clip/checkpoints/last.zeroshot.json").read_text())
    assert set(record["results"]) == {"top1", "top5"} and "random_init_results" in record
    # retrieval among the evaluation split's captioned pairs (the held-out tenth of 32: 3 or 4)
    assert "image -> text" in result.stdout and "text -> image" in result.stdout
    record = json.loads((tmp_path / "runs/shards/clip/checkpoints/last.retrieval.json").read_text())
    assert set(record["results"]["image_to_text"]) == {"R@1", "R@5", "R@10"} and record["results"]["pairs"] >= 2
    assert "random_init_results" in record
    card = (tmp_path / "runs/shards/clip/export/README.md").read_text()  # the image tower's, with its numbers
    assert "- zero-shot: " in card and "- retrieval: image to text R@1 " in card
    # `ssl-vit zeroshot RUN` on captions rewritten since: said (it gave R@1 62.2 beside the run's 22.2, silently)
    again = ["zeroshot", str(tmp_path / "runs/shards/clip"), "--num_workers", "0"]
    assert "changed since the run's own evaluation" not in in_this_process(tmp_path, *again).stderr
    os.utime(next(Path(shards).glob("*.tar")), (1, 1))
    rewritten = in_this_process(tmp_path, *again)
    assert rewritten.returncode == 0 and "warning: the images or captions changed since" in rewritten.stderr


def test_zero_shot_is_open_clips_prompt_ensemble_classifier():
    """zero_shot_classifier.py: per class, the mean of its prompts' normalised text embeddings (the
    80 of OpenAI's ensemble, as open_clip_train/zero_shot.py evaluates), normalised; each image to
    the class of highest cosine with its normalised projected embedding."""
    torch.manual_seed(0)
    method = CLIP(TINY_ENCODER, **{**TINY_TEXT, "vocab_size": 49408}).eval()
    names = ["cat", "dog", "car", "a", "b", "c", "d", "e", "f", "g", "h"]  # more than the 10 embedded at once
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 11, (40,))
    tokenizer = SimpleTokenizer(context_length=TINY_TEXT["context_length"])
    classes = []
    with torch.no_grad():
        for name in names:
            prompts = [F.normalize(method.text(tokenizer(t(name))), dim=-1)[0] for t in OPENAI_IMAGENET_TEMPLATES]
            classes.append(F.normalize(torch.stack(prompts).mean(0), dim=0))
        pooled = method.encoder.vit.forward_head(method.encoder(images).tokens, pre_logits=True)
        image = F.normalize(pooled @ method.image_projection, dim=-1)
        scores = image @ torch.stack(classes).T
        embedded = class_embeddings(method, names, "cpu")
        result = zero_shot_accuracy(method.embed_images(images), labels, embedded)
    torch.testing.assert_close(embedded, torch.stack(classes), atol=1e-5, rtol=1e-5)
    top1 = 100 * (scores.argmax(1) == labels).float().mean().item()
    top5 = 100 * (scores.topk(5).indices == labels[:, None]).any(1).float().mean().item()
    assert result["top1"] == pytest.approx(top1, abs=1e-3) and result["top5"] == pytest.approx(top5, abs=1e-3)


def reference_recall(image, text, k):
    """open_clip's get_clip_metrics: each query's rank is where its own pair falls in the
    descending sort of its scores; R@k = the fraction ranked below k."""
    out = {}
    for name, logits in (("image_to_text", image @ text.T), ("text_to_image", text @ image.T)):
        ranks = [int((torch.argsort(row, descending=True) == i).nonzero()) for i, row in enumerate(logits)]
        out[name] = 100 * sum(r < k for r in ranks) / len(ranks)
    return out


def test_retrieval_recall_is_open_clips_and_lets_identical_captions_tie():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(30, 8), dim=-1), F.normalize(torch.randn(30, 8), dim=-1)
    text = F.normalize(text + 0.6 * image, dim=-1)  # pairs alike, not perfectly
    recalls = retrieval_recall(image, text)
    for k in (1, 5, 10):
        expected = reference_recall(image, text, k)
        for direction in ("image_to_text", "text_to_image"):
            assert recalls[direction][f"R@{k}"] == pytest.approx(expected[direction], abs=1e-3)
    assert 0 < recalls["image_to_text"]["R@1"] < recalls["image_to_text"]["R@10"] < 100  # the case tests something
    # two alike images captioned alike: image 1's own caption ties with image 0's, so neither is a miss
    image = F.normalize(torch.randn(30, 8), dim=-1)
    image[1] = F.normalize(image[0] + 0.01 * torch.randn(8), dim=0)
    text = image.clone()
    text[1] = text[0]
    assert retrieval_recall(image, text)["image_to_text"]["R@1"] == 100.0
    assert reference_recall(image, text, 1)["image_to_text"] < 100.0  # where open_clip's sort counts one a miss


def test_image_text_evaluation_reads_labels_and_captions_from_the_same_shards(tmp_path):
    """Zero-shot from the class names and retrieval over the captioned pairs, each against its
    reference on the model's own embeddings of the same images."""
    torch.manual_seed(0)
    method = CLIP(TINY_ENCODER, **{**TINY_TEXT, "vocab_size": 49408}).eval()
    captions = [f"photo {i}" for i in range(12)]
    shards = captioned_shards(tmp_path / "shards", captions, labels=[i % 3 for i in range(12)])
    names = ["cat", "dog", "car"]
    results, counts = evaluate_image_text(method, str(shards), EvalView(32), names, batch_size=5, num_workers=0)
    assert counts == {"val_images": 12, "classes": 3, "val_classes": 3, "largest_class": 33.3}
    urls, _ = resolve_shards(str(shards))
    images = torch.stack([image for image, _ in ShardDataset(urls, EvalView(32), shuffle_shards=False)])
    labels = torch.tensor([i % 3 for i in range(12)])
    with torch.no_grad():
        image = method.embed_images(images)
        text = method.embed_texts(torch.stack([method.caption_tokens(c)[0] for c in captions]))
        expected = zero_shot_accuracy(image, labels, class_embeddings(method, names, "cpu"))
    assert results["zeroshot"] == expected
    assert results["retrieval"] == {**retrieval_recall(image, text), "pairs": 12}
    # one class: zero-shot would score 100 whatever the model, and is left out
    one_class, _ = evaluate_image_text(method, str(shards), EvalView(32), ["cat"], batch_size=5, num_workers=0)
    assert "zeroshot" not in one_class and one_class["retrieval"] == results["retrieval"]


OPEN_CLIP_TOWERS = {
    # timm's CLIP ViT: pre-norm, no patch bias, CLS pooling
    "clip": dict(name="vit_base_patch32_clip_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
    # a plain timm ViT: patch bias, mean pooling (norm after pooling), layer scale
    "plain": {**TINY_ENCODER, "global_pool": "avg", "init_values": 0.1},
}


@pytest.mark.parametrize("tower", list(OPEN_CLIP_TOWERS))
def test_open_clip_loads_the_model_alone_with_the_same_embeddings(tmp_path, tower):
    torch.manual_seed(0)
    method = CLIP(OPEN_CLIP_TOWERS[tower], **{**TINY_TEXT, "vocab_size": 49408}).eval()
    with torch.no_grad():  # weights unlike any initialisation, so that every one must land in its place
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config, state = open_clip_folder_contents(method)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    images, captions = torch.randn(4, 3, 32, 32), ["a red ring", "a cat on a mat", "x", "top left, noisy"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images, normalize=True), method.embed_images(images))
        ours = torch.stack([method.caption_tokens(c)[0] for c in captions])
        assert torch.equal(tokenizer(captions), ours)
        torch.testing.assert_close(model.encode_text(ours, normalize=True), method.embed_texts(ours))
    assert model.logit_scale.item() == pytest.approx(method.logit_scale.item())


def test_another_open_clip_folder_is_evaluated_on_its_own_preprocessing(tmp_path):
    """An open_clip folder ssl-vit did not write is scored on the view open_clip's own eval
    transform makes from its preprocess_cfg (here OpenAI's mean and std, which it does not name,
    and bilinear resizing); an ssl-vit export on the run's evaluation view. (Every folder was scored
    on ssl-vit's view with ImageNet's mean and std.)"""
    torch.manual_seed(0)
    config, state = open_clip_folder_contents(CLIP(TINY_ENCODER, **{**TINY_TEXT, "vocab_size": 49408}))
    config["preprocess_cfg"] = {"size": 32, "interpolation": "bilinear"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    _, size, info = load_image_text_model(tmp_path)
    torch.testing.assert_close(EvalView(size, **info["view"])(image), preprocess(image), atol=1e-5, rtol=0)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({**config, "ssl_vit": {"step": 3}}))
    assert load_image_text_model(tmp_path)[2]["view"] == {}  # ssl-vit's own export: the run's view
    (tmp_path / "open_clip_config.json").write_text(json.dumps({**config, "preprocess_cfg": {"resize_mode": "squash"}}))
    with pytest.raises(UserError, match="resizes by 'squash'"):
        load_image_text_model(tmp_path)


def test_an_image_tower_open_clip_cannot_hold_is_refused_in_one_line():
    rope = dict(name="vit_small_patch16_dinov3", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(
        UserError, match="open_clip's ViT has learned absolute positions only; this image tower is a Eva"
    ):
        open_clip_folder_contents(CLIP(rope, **TINY_TEXT))


def test_zeroshot_gives_the_same_numbers_from_the_checkpoint_and_its_open_clip_export(tmp_path):
    """As a user runs them: pretrain briefly, `ssl-vit export --format open_clip`, then
    `ssl-vit zeroshot` on the run folder and on the export."""
    captions = [f"caption number {i}" for i in range(24)]
    shards = captioned_shards(tmp_path / "shards", captions, labels=[i % 4 for i in range(24)])
    result = pretrain_recipe_briefly(tmp_path, "recipes/quickstart/clip.yaml", shards, {"text_layers": 1})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs/shards/clip"
    result = in_this_process(tmp_path, "export", str(run / "checkpoints/last.ckpt"), "oc", "--format", "open_clip")
    assert result.returncode == 0, result.stderr
    assert "local-dir:oc" in result.stdout
    card = (tmp_path / "oc/README.md").read_text()  # where it came from and how to load it, as a timm export's
    assert "- training data: `" in card and 'open_clip.get_tokenizer("local-dir:PATH_TO_THIS_FOLDER")' in card
    onnx = in_this_process(tmp_path, "export", str(run), "oc2", "--format", "open_clip", "--onnx")
    assert onnx.returncode == 2 and "leave them out with --format open_clip" in onnx.stderr
    records = []
    for model, stem in ((str(run), run / "checkpoints/last"), ("oc", tmp_path / "oc")):
        result = in_this_process(tmp_path, "zeroshot", model, "--val_shards", "shards", "--num_workers", "0")
        assert result.returncode == 0, result.stderr
        assert "zero-shot" in result.stdout and "image -> text" in result.stdout
        assert "24 images of 4 classes, 4.2 points each" in result.stdout  # what the accuracy counts
        # what the classes are called in the prompts: a score below chance is often folder names unlike the captions'
        assert "zero-shot prompts: open_clip's 80 templates ('a bad photo of a {}.', ...)" in result.stdout
        # the run trained on these very shards (its val_shards too): said, from the run and from its export
        assert "warning: shards holds images the run trained on, so these" in result.stderr, result.stderr
        written = sorted(stem.parent.glob(f"{stem.name}.*.eval-*.json"))  # a run's beside the checkpoint read
        assert [p.name.split(".")[1] for p in written] == ["retrieval", "zeroshot"]
        records.append([json.loads(p.read_text())["results"] for p in written])
    assert records[0] == records[1] and records[0][0]["pairs"] == 24
    # without --val_shards, a run is scored on what it evaluated on (as `ssl-vit knn RUN` is); an open_clip
    # folder, which does not know its data, asks for them
    default = in_this_process(tmp_path, "zeroshot", str(run), "--num_workers", "0")
    assert default.returncode == 0 and "image -> text" in default.stdout, default.stderr
    assert len(list(run.glob("checkpoints/last.*.eval-*.json"))) == 2  # the same evaluation: its records replaced
    unlabelled = captioned_shards(tmp_path / "unlabelled", captions[:8])  # retrieval only, and why
    retrieval = in_this_process(tmp_path, "zeroshot", "oc", "--val_shards", str(unlabelled), "--num_workers", "0")
    assert retrieval.returncode == 0 and f"zero-shot is skipped: {unlabelled} has no class labels" in retrieval.stderr
    asked = in_this_process(tmp_path, "zeroshot", "oc")
    assert asked.returncode == 2 and "needs --val_shards" in asked.stderr, asked.stderr
    # labelled images without captions: zero-shot only, and a line on why there is no retrieval
    write_tiny_shards(tmp_path / "plain")
    plain = in_this_process(tmp_path, "zeroshot", "oc", "--val_shards", "plain", "--num_workers", "0")
    assert plain.returncode == 0 and "image -> text" not in plain.stdout, plain.stderr
    assert "retrieval is skipped: fewer than two images of plain have a caption" in plain.stderr
    bad = in_this_process(tmp_path, "zeroshot", str(run / "export"), "--val_shards", "shards")
    assert bad.returncode == 2 and "a timm export holds the image tower only" in bad.stderr
    for model in (str(run), "oc"):  # settings out of range: one line each, from the run and from its export
        for option, value, said in (
            ("--batch_size", "0", "--batch_size is 0; it must be at least 1"),
            ("--num_workers", "-2", "--num_workers is -2; it must be at least 0"),
            ("--image_size", "0", "--image_size is 0; leave it out"),
            ("--image_size", "30", "image_size 30 is not a multiple of the encoder's 8-px patches"),
        ):
            refused = in_this_process(tmp_path, "zeroshot", model, "--val_shards", "shards", option, value)
            assert refused.returncode == 2 and said in refused.stderr, (model, option, refused.stderr[-2000:])
    (tmp_path / "oc/README.md").write_text("# my notes on this model\n")  # the user's now: not replaced
    again = in_this_process(tmp_path, "export", str(run), "oc", "--format", "open_clip", "--overwrite")
    assert again.returncode == 2 and "its README.md was changed since ssl-vit wrote it" in again.stderr, again.stderr


def test_shards_written_from_a_caption_table_pair_each_image_with_its_caption(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / f"{name}.png")
    captions = {"img/a.png": "a cat, on a mat", "img/b.png": 'the "big" dog', "img/c.png": ""}
    with (tmp_path / "pairs.csv").open("w", newline="") as f:  # open_clip's columns; quoting as csv writes it
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(captions.items())
    result = in_this_process(tmp_path, "shards", "captions", "pairs.csv", "shards", "--samples-per-shard", "3")
    assert result.returncode == 0, result.stderr
    assert "wrote 3 samples without classes in 1 shard to shards (2 with captions)" in result.stdout
    members = [s["txt"].decode() for s in wds.WebDataset(str(tmp_path / "shards/shard-000000.tar"), shardshuffle=False)]
    assert members == list(captions.values())  # the table's order, text as given
    dataset = ShardDataset([str(tmp_path / "shards/shard-000000.tar")], EvalView(32), captions=CaptionTokens(12))
    assert len(read_all(dataset)) == 2 and dataset.skipped.value == 1  # the empty caption is skipped
    # a TSV with other column names, and the mistakes a user makes, each in one line
    (tmp_path / "pairs.tsv").write_text("path\ttext\nimg/a.png\ta cat\n")
    ok = in_this_process(
        tmp_path, "shards", "captions", "pairs.tsv", "tsv", "--image-key", "path", "--caption-key", "text"
    )
    assert ok.returncode == 0, ok.stderr
    # a longer table is spread over shards as a folder is (at least 64, so every loader worker reads its own)
    (tmp_path / "long.tsv").write_text("filepath\ttitle\n" + "img/a.png\ta cat\n" * 130)
    spread = in_this_process(tmp_path, "shards", "captions", "long.tsv", "long")
    assert spread.returncode == 0 and f"in {len(resolve_shards(str(tmp_path / 'long'))[0])} shards" in spread.stdout
    assert len(resolve_shards(str(tmp_path / "long"))[0]) >= 64
    wrong_keys = in_this_process(tmp_path, "shards", "captions", "pairs.tsv", "x")
    assert wrong_keys.returncode == 2 and "has no 'filepath' or 'title' column" in wrong_keys.stderr
    (tmp_path / "gone.tsv").write_text("filepath\ttitle\nimg/a.png\ta\nimg/zz.png\tb\n")
    gone = in_this_process(tmp_path, "shards", "captions", "gone.tsv", "y")
    assert gone.returncode == 2 and "1 of 2 images in gone.tsv do not exist (first: img/zz.png)" in gone.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_caption_table_and_the_folder_it_lists_hold_out_the_same_images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):  # two classes of captioned photos, and a table of the same pairs beside the folder
        image = tmp_path / "photos" / f"c{i % 2}" / f"p{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(image)
        image.with_suffix(".txt").write_text(f"photo {i}")
    rows = "".join(f"photos/c{i % 2}/p{i}.png\tphoto {i}\n" for i in range(40))
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n" + rows)
    assert in_this_process(tmp_path, "shards", "imagefolder", "photos", "folder").returncode == 0
    # the table named from another folder: its images are keyed by where they are, not how it was named
    (tmp_path / "elsewhere").mkdir()
    table = in_this_process(tmp_path / "elsewhere", "shards", "captions", "../pairs.tsv", str(tmp_path / "table"))
    assert table.returncode == 0, table.stderr

    def heldout(data: str) -> set[str]:  # each held-out image by its path in the folder
        parts, reader = resolve_shards(f"{tmp_path / data}#heldout")[0], ShardDataset([], EvalView(8))
        return {sample_source(s) or s["__key__"] for part in parts for s in reader._samples(part)}

    held_out = heldout("photos")
    assert held_out and held_out == heldout("folder") == heldout("table")


def test_clip_on_shards_without_captions_stops_in_one_line(tmp_path):
    shards = captioned_shards(tmp_path / "shards", [None] * 16, labels=[i % 4 for i in range(16)])
    result = pretrain_recipe_briefly(tmp_path, "recipes/quickstart/clip.yaml", shards, {"text_layers": 1})
    assert result.returncode == 2
    assert "has no captions (a .txt beside each image)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # stopped before the run folder, its lock and its logs were made
    old = tmp_path / "old"  # shards whose index predates the caption count: the first sample is read
    write_shards([("png", png(np.zeros((8, 8, 3), np.uint8)), 0)] * 16, old, ["a"], "test", samples_per_shard=8)
    index = json.loads((old / "dataset.json").read_text())
    (old / "dataset.json").write_text(json.dumps({k: v for k, v in index.items() if k != "captions"}))
    result = pretrain_recipe_briefly(tmp_path, "recipes/quickstart/clip.yaml", old, {"text_layers": 1})
    assert result.returncode == 2 and "has no captions" in result.stderr
