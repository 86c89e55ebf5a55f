"""Evaluators against brute-force references, on synthetic features and tiny shards."""

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ssl_vit.data import write_shards
from ssl_vit.encoder import ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.eval import Evaluator, EvalView, FeatureSet, extract_features, knn_classify, load_features, save_features
from ssl_vit.eval.attentive import AttentiveProbeHead, train_attentive_probe
from ssl_vit.eval.compare import headline_accuracy
from ssl_vit.eval.encoders import TimmViTEncoder
from ssl_vit.eval.features import feature_cache_files, pooled_features
from ssl_vit.eval.linear import (
    LinearProbeHead,
    cached_feature_batches,
    feature_chunks,
    lars,
    probe_accuracy,
    train_linear_probe,
)
from ssl_vit.eval.report import accuracy_counts, print_results
from tests.conftest import TINY_ENCODER, fit_briefly, png_bytes, random_images


def brute_force_knn(train_x, train_y, test_x, test_y, num_classes, k, temperature):
    """DINO's weighted vote, one test sample at a time over the full similarity matrix."""
    train_x = train_x / train_x.norm(dim=1, keepdim=True)
    test_x = test_x / test_x.norm(dim=1, keepdim=True)
    sims = test_x @ train_x.T
    top1 = top5 = 0
    for i in range(len(test_x)):
        order = sorted(range(len(train_x)), key=lambda j: -sims[i, j].item())[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(train_y[j])] += torch.exp(sims[i, j] / temperature).item()
        ranked = sorted(range(num_classes), key=lambda c: (-votes[c], c))  # equal votes: lower class first
        top1 += ranked[0] == int(test_y[i])
        top5 += int(test_y[i]) in ranked[: min(5, k)]  # DINO: top-5 among the first min(5, k)
    return 100 * top1 / len(test_x), 100 * top5 / len(test_x)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_knn_equals_brute_force_reference(chunk_size):
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(120, 16, generator=g), torch.randn(45, 16, generator=g)
    train_y, test_y = torch.randint(0, 8, (120,), generator=g), torch.randint(0, 8, (45,), generator=g)
    ks = [1, 5, 10, 20, 100]
    got = knn_classify(train_x, train_y, test_x, test_y, 8, ks=ks, temperature=0.07, chunk_size=chunk_size)
    for k in ks:
        top1, top5 = brute_force_knn(train_x, train_y, test_x, test_y, 8, k, 0.07)
        assert got[k]["top1"] == pytest.approx(top1, abs=1e-3), k
        assert got[k]["top5"] == pytest.approx(top5, abs=1e-3), k


def test_knn_reports_only_the_ks_the_training_images_allow(tmp_path):
    """A k above the number of training images would be all of them again under another name
    (a new user's 150 images showed k=200); all of them count as one k where every k is larger."""
    g = torch.Generator().manual_seed(0)
    val = FeatureSet(torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g))
    shards = labelled_shards(tmp_path / "shards", 6, num_classes=3, seed=0)  # its 3 classes; features below
    evaluator = Evaluator(shards, shards, knn_ks=[10, 20, 100, 200])
    for n, keys in ((150, ["k=10", "k=20", "k=100"]), (100, ["k=10", "k=20", "k=100"]), (8, ["k=8"])):
        train = FeatureSet(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
        got = evaluator.knn(train, val)
        assert list(got) == keys
        if n <= 100:  # the last k is every training image
            assert got[keys[-1]] == knn_classify(train.features, train.labels, val.features, val.labels, 3, ks=[n])[n]


def test_knn_tied_votes_go_to_the_lower_class():
    # Each query sits exactly between two training points of different classes: equal votes.
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    train_y = torch.tensor([3, 1, 0, 2])
    test_x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [-1.0, 1.0]])
    test_y = torch.tensor([1, 0, 0])  # ties 3/1 -> 1, 0/2 -> 0, 1/0 -> 0
    got = knn_classify(train_x, train_y, test_x, test_y, 4, ks=[2], chunk_size=2)
    assert got[2]["top1"] == pytest.approx(100.0)
    flipped = knn_classify(train_x, train_y, test_x, torch.tensor([3, 2, 1]), 4, ks=[2], chunk_size=2)
    assert flipped[2]["top1"] == pytest.approx(0.0)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_linear_probe_separates_linearly_separable_features(optimizer):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 4
    labels = torch.randint(0, 5, (1000,), generator=g)
    features = centres[labels] + torch.randn(1000, 32, generator=g)
    train, val = FeatureSet(features[:800], labels[:800]), FeatureSet(features[800:], labels[800:])
    batches = cached_feature_batches(train, 100)
    base_lr = 0.1 if optimizer == "sgd" else 20.0  # LARS rescales each step by 0.001 x |w| / |grad|
    head = train_linear_probe(batches, 8, 32, 5, epochs=20, batch_size=100, base_lr=base_lr, optimizer=optimizer)
    assert probe_accuracy(head, feature_chunks(val), 5)["top1"] > 99.0


def test_lars_steps_as_maes_lars():
    """MAE's util/lars.py from its formulas, momentum 0.9, no weight decay: a weight matrix's
    gradient g becomes g x 0.001 ||w|| / ||g||, 1-D parameters keep g; mu <- 0.9 mu + g; w <- w - lr mu."""
    torch.manual_seed(0)
    head = LinearProbeHead(6, 3)
    reference = [p.detach().clone() for p in head.parameters()]
    momentum = [torch.zeros_like(p) for p in reference]
    opt = lars(head.parameters(), lr=0.5)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in reference]
        for p, g in zip(head.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, (w, g) in enumerate(zip(reference, grads, strict=True)):
            update = g * 0.001 * w.norm() / g.norm() if w.ndim > 1 else g
            momentum[i] = 0.9 * momentum[i] + update
            reference[i] = w - 0.5 * momentum[i]
    for p, expected in zip(head.parameters(), reference, strict=True):
        torch.testing.assert_close(p.detach(), expected)


def reference_attentive_classifier(head: AttentiveProbeHead, tokens: torch.Tensor) -> torch.Tensor:
    """V-JEPA's AttentiveClassifier written from its formulas, head by head:
    q <- q + [softmax(q_h k_h^T / sqrt(d_h)) v_h]_h with k, v from LN(x) (its CrossAttention's
    forward applies no output projection); q <- q + MLP(LN(q)); logits = W q."""
    d = tokens.shape[-1]
    h = head.num_heads
    x = torch.nn.functional.layer_norm(tokens, (d,), head.norm_tokens.weight, head.norm_tokens.bias)
    query = head.query[0, 0]
    q = query @ head.q.weight.T + head.q.bias
    kv = x @ head.kv.weight.T + head.kv.bias
    k, v = kv[..., :d], kv[..., d:]
    outs = []
    for i in range(h):
        sl = slice(i * d // h, (i + 1) * d // h)
        weights = torch.softmax(k[..., sl] @ q[sl] / math.sqrt(d // h), dim=1)  # (b, n)
        outs.append((weights.unsqueeze(-1) * v[..., sl]).sum(1))
    pooled = query + torch.cat(outs, dim=-1)
    normed = torch.nn.functional.layer_norm(pooled, (d,), head.norm_query.weight, head.norm_query.bias)
    hidden = torch.nn.functional.gelu(normed @ head.mlp.fc1.weight.T + head.mlp.fc1.bias)
    pooled = pooled + hidden @ head.mlp.fc2.weight.T + head.mlp.fc2.bias
    return pooled @ head.linear.weight.T + head.linear.bias


def test_attentive_probe_head_matches_vjepa_reference():
    torch.manual_seed(0)
    head = AttentiveProbeHead(dim=32, num_heads=4, num_classes=7)
    for p in head.parameters():  # away from the zero biases and unit norms of the initialisation
        p.data.add_(0.1 * torch.randn_like(p))
    tokens = torch.randn(3, 10, 32)
    torch.testing.assert_close(head(tokens), reference_attentive_classifier(head, tokens), atol=1e-5, rtol=1e-5)
    fresh = AttentiveProbeHead(dim=32, num_heads=4, num_classes=7)
    assert fresh.mlp.fc2.weight.std() < fresh.q.weight.std()  # the residual MLP's output rescaled by 1/sqrt(2)
    assert fresh.linear.bias.abs().sum() > 0  # the classifier at PyTorch's default, not the pooler's init


def test_attentive_probe_trains_as_vjepa():
    """V-JEPA's frozen-evaluation loop written out: per step, lr and weight decay set on their
    cosines (lr to 0; weight decay to 1e-6, on tensors of more than one dimension), the
    gradient norm clipped at 1, then AdamW. Features scaled up so that the clipping acts."""
    torch.manual_seed(0)
    features, labels = 50 * torch.randn(4, 8, 6, 16), torch.randint(0, 3, (4, 8))
    epochs, steps, lr, wd = 2, 4, 1e-2, 0.5  # a large decay, so that its schedule shows

    def batches(epoch):
        return zip(features, labels, strict=True)

    torch.manual_seed(1)
    trained = train_attentive_probe(batches, steps, 16, 4, 3, epochs=epochs, lr=lr, weight_decay=wd)
    torch.manual_seed(1)
    head = AttentiveProbeHead(16, 4, 3)
    groups = [[p for p in head.parameters() if p.ndim > 1], [p for p in head.parameters() if p.ndim == 1]]
    opt = torch.optim.AdamW([{"params": groups[0]}, {"params": groups[1], "weight_decay": 0.0}])
    total = epochs * steps
    for step in range(total):
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr * cosine
        opt.param_groups[0]["weight_decay"] = 1e-6 + (wd - 1e-6) * cosine
        loss = torch.nn.functional.cross_entropy(head(features[step % steps]), labels[step % steps])
        opt.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in head.parameters()])
        for p in head.parameters():
            p.grad.mul_(min(1.0, 1.0 / (grads.norm().item() + 1e-6)))
        opt.step()
    for (name, p), expected in zip(trained.named_parameters(), head.parameters(), strict=True):
        torch.testing.assert_close(p, expected, msg=name)


def test_attentive_probe_finds_the_token_that_carries_the_class():
    """The class is in one token at a random position among 15 distractors; the mean of the tokens
    dilutes it 16-fold under distractor noise, attention can pick it out."""
    g = torch.Generator().manual_seed(0)
    n, tokens, dim, classes = 1200, 16, 32, 4
    marker = torch.randn(dim, generator=g) * 3  # says "this token carries the class"
    centres = torch.randn(classes, dim, generator=g) * 2
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, tokens, dim, generator=g) * 2
    where = torch.randint(0, tokens, (n,), generator=g)
    x[torch.arange(n), where] = marker + centres[labels] + 0.3 * torch.randn(n, dim, generator=g)
    train, val = FeatureSet(x[:1000], labels[:1000]), FeatureSet(x[1000:], labels[1000:])
    head = train_attentive_probe(cached_feature_batches(train, 100), 10, dim, 4, classes, epochs=30)
    assert probe_accuracy(head, feature_chunks(val), classes)["top1"] > 95.0


def png_samples(n: int, seed: int) -> list[tuple[str, bytes, int]]:
    return [("png", png_bytes(img), i) for i, img in enumerate(random_images(n, size=32, seed=seed))]


def labelled_shards(folder: Path, n: int, num_classes: int, seed: int, with_labels: bool = True) -> str:
    samples = ((ext, data, i % num_classes if with_labels else None) for ext, data, i in png_samples(n, seed))
    write_shards(samples, folder, classes=[f"c{c}" for c in range(num_classes)], source="test", samples_per_shard=20)
    return str(folder)


def collapsed_encoder() -> ViTEncoder:
    encoder = ViTEncoder(**TINY_ENCODER)
    with torch.no_grad():  # the final norm maps every token to the same vector
        encoder.vit.norm.weight.zero_()
        encoder.vit.norm.bias.fill_(0.5)
    return encoder


def test_collapsed_encoder_scores_chance(tmp_path):
    train = labelled_shards(tmp_path / "train", 100, 5, seed=0)
    val = labelled_shards(tmp_path / "val", 50, 5, seed=1)
    evaluator = Evaluator(train, val, knn_ks=[10, 20], probe_epochs=5, probe_batch_size=25, num_workers=0)
    results = evaluator.run(collapsed_encoder())
    for acc in results["knn"].values():
        assert acc["top1"] == pytest.approx(20.0)  # every query gets the same vote: one class of 5
    assert results["probe"]["top1"] == pytest.approx(20.0)


@pytest.mark.parametrize("cache_gib", [4.0, 0.0])  # tokens cached in memory, or streamed every epoch
def test_attentive_probe_on_a_collapsed_encoder_scores_chance(tmp_path, cache_gib):
    train = labelled_shards(tmp_path / "train", 100, 5, seed=0)
    val = labelled_shards(tmp_path / "val", 50, 5, seed=1)
    evaluator = Evaluator(
        train,
        val,
        head="attentive",
        attentive_epochs=2,
        probe_batch_size=25,
        token_cache_gib=cache_gib,
        num_workers=0,
    )
    results = evaluator.run(collapsed_encoder())
    assert set(results) == {"knn", "attentive"}
    assert results["attentive"]["top1"] == pytest.approx(20.0)


def test_attentive_probe_beats_chance_on_a_separable_encoder(tmp_path):
    """Shards whose classes differ in colour, a random encoder: the patch tokens separate them."""

    def shards(folder: Path, n: int) -> str:
        colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
        rng = np.random.default_rng(len(str(folder)))
        samples = []
        for i in range(n):
            pixels = np.clip(np.array(colours[i % 3]) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            samples.append(("png", png_bytes(pixels), i % 3))
        write_shards(samples, folder, classes=["r", "g", "b"], source="test", samples_per_shard=30)
        return str(folder)

    evaluator = Evaluator(
        shards(tmp_path / "train", 90),
        shards(tmp_path / "val", 30),
        head="linear+attentive",
        attentive_epochs=10,
        probe_epochs=10,
        probe_batch_size=30,
        num_workers=0,
    )
    torch.manual_seed(0)
    results = evaluator.run(ViTEncoder(**TINY_ENCODER))
    assert results["attentive"]["top1"] > 90.0
    assert results["probe"]["top1"] > 90.0


def test_the_probes_read_each_split_once_and_score_as_with_a_pass_each(tmp_path, monkeypatch):
    """The pooled features and the attentive probe's tokens come from one pass over each split;
    the accuracies are those of a separate token pass (which pooled features from a cache need)."""
    import ssl_vit.data.pipeline as pipeline_module

    train = labelled_shards(tmp_path / "train", 60, 3, seed=0)
    val = labelled_shards(tmp_path / "val", 30, 3, seed=1)
    passes = []

    class CountedShards(pipeline_module.ShardDataset):
        def __iter__(self):
            passes.append(self.urls)
            return super().__iter__()

    monkeypatch.setattr(pipeline_module, "ShardDataset", CountedShards)  # what eval_loader builds
    settings = dict(head="linear+attentive", attentive_epochs=3, probe_epochs=3, probe_batch_size=20, num_workers=0)
    torch.manual_seed(0)
    encoder = ViTEncoder(**TINY_ENCODER)
    one_pass = Evaluator(train, val, **settings).run(encoder)
    assert len(passes) == 2  # train, val
    train_set, val_set = Evaluator(train, val, **settings).features(encoder, tokens=True)
    assert train_set.tokens.shape == (60, 64, TINY_ENCODER["embed_dim"]) and val_set.tokens.shape[0] == 30
    cache = str(tmp_path / "cache")
    Evaluator(train, val, **settings, cache_dir=cache).features(encoder)  # pooled features only, saved
    passes.clear()
    separate = Evaluator(train, val, **settings, cache_dir=cache).run(encoder)
    assert len(passes) == 2  # the pooled features from the cache, a token pass over each split
    assert one_pass == separate


def test_cached_features_are_of_one_architecture_not_of_weights_that_fit_another(tmp_path):
    # Two heads or four: the same weights' names and shapes, other features.
    torch.manual_seed(0)
    two_heads = ViTEncoder(**TINY_ENCODER)
    four_heads = ViTEncoder(**{**TINY_ENCODER, "num_heads": 4})
    four_heads.load_state_dict(two_heads.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(two_heads.eval()(images).cls, four_heads.eval()(images).cls)
    splits = {"train": labelled_shards(tmp_path / "train", 6, 2, seed=0)}
    files = [feature_cache_files(tmp_path, enc, splits, 32, "cls", 1)["train"] for enc in (two_heads, four_heads)]
    assert files[0] != files[1]
    assert feature_cache_files(tmp_path, ViTEncoder(**TINY_ENCODER), splits, 32, "cls", 1)["train"] != files[0]


def test_augmented_probe_path_runs_through_the_frozen_encoder(tmp_path):
    train = labelled_shards(tmp_path / "train", 100, 5, seed=0)
    val = labelled_shards(tmp_path / "val", 50, 5, seed=1)
    evaluator = Evaluator(train, val, probe_augment=True, probe_epochs=2, probe_batch_size=25, num_workers=0)
    encoder = collapsed_encoder()
    results = evaluator.probe(encoder, *evaluator.features(encoder))
    assert results["top1"] == pytest.approx(20.0)  # constant features: one class of 5, however trained


def test_a_streamed_probe_trains_on_every_batch_it_counts_with_workers(tmp_path, monkeypatch):
    """60 images in shards of 20 read by 2 workers, batches of 32: each worker's 30 images were
    less than a batch, so with drop_last the augmented probe trained on nothing, and its accuracy
    was an untrained head's."""
    import ssl_vit.eval.evaluator as evaluator_module

    train = labelled_shards(tmp_path / "train", 60, 3, seed=0)
    val = labelled_shards(tmp_path / "val", 30, 3, seed=1)
    trained = []

    def counting(epoch_batches, steps_per_epoch, **kwargs):
        trained.append((sum(len(labels) for _, labels in epoch_batches(0)), steps_per_epoch))
        return train_linear_probe(epoch_batches, steps_per_epoch, **kwargs)

    monkeypatch.setattr(evaluator_module, "train_linear_probe", counting)
    evaluator = Evaluator(train, val, probe_augment=True, probe_epochs=2, probe_batch_size=32, num_workers=2)
    encoder = ViTEncoder(**TINY_ENCODER)
    evaluator.probe(encoder, *evaluator.features(encoder))
    assert trained == [(32, 1)]  # one whole batch an epoch, as the schedule counts


def test_a_probe_schedule_that_gets_fewer_batches_than_it_counts_stops(tmp_path):
    with pytest.raises(RuntimeError, match="trained 0 steps of the 6"):
        train_linear_probe(lambda epoch: iter(()), steps_per_epoch=3, dim=4, num_classes=2, epochs=2)


def test_features_are_deterministic_and_cache_round_trips(tmp_path):
    shards = labelled_shards(tmp_path / "val", 30, 3, seed=2)
    encoder = ViTEncoder(**TINY_ENCODER)
    first = extract_features(encoder, shards, EvalView(32), pooling="cls+mean", num_workers=0)
    again = extract_features(encoder, shards, EvalView(32), pooling="cls+mean", num_workers=2)
    assert first.features.shape == (30, 128)
    assert torch.equal(first.labels, torch.arange(30) % 3)
    torch.testing.assert_close(first.features, again.features)
    save_features(tmp_path / "f.safetensors", first)
    loaded = load_features(tmp_path / "f.safetensors")
    assert torch.equal(loaded.features, first.features) and torch.equal(loaded.labels, first.labels)


def test_the_feature_cache_serves_only_the_same_encoder_on_the_same_data(tmp_path):
    """Features read back for other weights or for changed images would report another model's
    numbers as this one's."""
    train = labelled_shards(tmp_path / "train", 20, 2, seed=0)
    photos = tmp_path / "photos"  # an image folder, to which the user adds an image later
    for i, pixels in enumerate(random_images(10, size=32, seed=1)):
        (photos / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(photos / f"c{i % 2}" / f"{i}.png")
    cache = tmp_path / "cache"
    cached = Evaluator(train, str(photos), num_workers=0, cache_dir=str(cache))
    torch.manual_seed(0)
    trained = ViTEncoder(**TINY_ENCODER)
    torch.manual_seed(1)
    other = ViTEncoder(**TINY_ENCODER)
    for encoder in (trained, other, trained):  # the last from the cache
        read = cached.features(encoder)
        for got, want in zip(read, Evaluator(train, str(photos), num_workers=0).features(encoder), strict=True):
            torch.testing.assert_close(got.features, want.features)
            assert torch.equal(got.labels, want.labels)
    Image.fromarray(random_images(1, size=32, seed=2)[0]).save(photos / "c1" / "new.png")
    assert len(cached.features(trained)[1].labels) == 11
    files = sorted(cache.iterdir())
    assert len(files) == 5  # train and val of each encoder, and the changed folder's val
    mask = os.umask(0)
    os.umask(mask)
    assert all(file.stat().st_mode & 0o777 == 0o666 & ~mask for file in files)  # no temporary files, shareable


def test_last_blocks_concatenates_cls_of_each_block(tmp_path):
    shards = labelled_shards(tmp_path / "val", 8, 2, seed=3)
    encoder = ViTEncoder(**TINY_ENCODER)
    feats = extract_features(encoder, shards, EvalView(32), pooling="cls", last_blocks=2, num_workers=0)
    assert feats.features.shape == (8, 128)
    last = extract_features(encoder, shards, EvalView(32), pooling="cls", num_workers=0)
    torch.testing.assert_close(feats.features[:, 64:], last.features)  # the last block's CLS, final-normed


def test_images_without_a_class_in_labelled_shards_are_left_out_and_counted(tmp_path, caplog):
    """A broken or unlabelled sample among labelled ones (a user's own shards) is left out of the
    evaluation, which says how many; it stopped the run before training."""
    samples = [(ext, data, None if i % 5 == 0 else i % 2) for ext, data, i in png_samples(20, seed=7)]
    write_shards(samples, tmp_path / "some", ["a", "b"], "test", samples_per_shard=20)
    with caplog.at_level(logging.WARNING):
        train, val = Evaluator(str(tmp_path / "some"), str(tmp_path / "some"), num_workers=0).features(
            ViTEncoder(**TINY_ENCODER)
        )
    assert len(train.labels) == len(val.labels) == 16 and (train.labels >= 0).all()
    assert caplog.text.count("4 of 20 images have no class and are left out of k-NN and the probes") == 1


def test_val_labels_are_read_as_trains_by_class_name(tmp_path):
    """Each split numbers its own classes: a val set of train's very images without class c1 numbers
    c2 as 1 and c3 as 2. Each val image's nearest neighbour is itself, so k=1 scores 100 when the
    labels are read by name; by place, every c2 and c3 image was scored against c1 or c2."""
    samples = list(png_samples(24, seed=7))
    train, val = tmp_path / "train", tmp_path / "val"
    write_shards(((ext, data, i % 4) for ext, data, i in samples), train, ["c0", "c1", "c2", "c3"], "test")
    kept = [(ext, data, i % 4) for ext, data, i in samples if i % 4 != 1]
    write_shards(((ext, data, {0: 0, 2: 1, 3: 2}[c]) for ext, data, c in kept), val, ["c0", "c2", "c3"], "test")
    evaluator = Evaluator(str(train), str(val), num_workers=0, knn_ks=[1])
    assert evaluator.run(ViTEncoder(**TINY_ENCODER), probe=False)["knn"]["k=1"]["top1"] == 100.0


def test_bad_evaluation_data_is_a_clear_error(tmp_path):
    encoder = ViTEncoder(**TINY_ENCODER)
    unlabelled = labelled_shards(tmp_path / "unlabelled", 10, 2, seed=4, with_labels=False)
    with pytest.raises(UserError, match="has no image with a class; k-NN and the probes need labelled images"):
        Evaluator(unlabelled, unlabelled, num_workers=0).features(encoder)
    train = labelled_shards(tmp_path / "train", 20, 4, seed=5)
    other = tmp_path / "other"  # a class train lacks: no neighbour or probe output can be of it
    write_shards(((s[0], s[1], s[2] % 4) for s in png_samples(20, seed=6)), other, ["d0", "c1", "c2", "c3"], "test")
    for check in (lambda e: e.run(encoder), lambda e: e.check_shards()):  # the second before any image is read
        with pytest.raises(UserError, match=r"names classes d0 that .* has not \(c0; c1; c2; c3\)"):
            check(Evaluator(train, str(other), num_workers=0))
    # a val set without the last classes keeps every class's place: scored
    fewer = labelled_shards(tmp_path / "val", 20, 3, seed=6)
    assert "knn" in Evaluator(train, fewer, num_workers=0, knn_ks=[5]).run(encoder, probe=False)
    empty = tmp_path / "empty"
    write_shards(iter(()), empty, classes=["a"], source="test")
    with pytest.raises(UserError, match="cannot be empty"):
        Evaluator(train, str(empty), num_workers=0).features(encoder)


def test_attentive_probe_trains_the_probe_only(tmp_path, monkeypatch):
    """The encoder stays frozen (no gradient, weights unchanged); the probe's every tensor learns."""
    import ssl_vit.eval.evaluator as evaluator_module

    train = labelled_shards(tmp_path / "train", 40, 4, seed=0)
    val = labelled_shards(tmp_path / "val", 20, 4, seed=1)
    encoder = ViTEncoder(**TINY_ENCODER)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    heads = []

    def keep(*args, **kwargs):  # the probe's start (same RNG state as inside) and its trained state
        rng = torch.random.get_rng_state()
        start = AttentiveProbeHead(TINY_ENCODER["embed_dim"], TINY_ENCODER["num_heads"], 4)
        torch.random.set_rng_state(rng)
        head = train_attentive_probe(*args, **kwargs)
        heads.append((start, head))
        return head

    monkeypatch.setattr(evaluator_module, "train_attentive_probe", keep)
    evaluator = Evaluator(train, val, head="attentive", attentive_epochs=2, probe_batch_size=20, num_workers=0)
    evaluator.run(encoder)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())
    start, trained = (h.state_dict() for h in heads[0])
    moved = [not torch.equal(start[k], trained[k]) for k in start]
    assert all(moved)  # every probe tensor (query, norms, projections, classifier) left its start


def test_the_results_table_leaves_out_top5_where_it_cannot_be_below_100(capsys):
    results = {"knn": {"k=20": {"top1": 61.0, "top5": 100.0}}}
    print_results("k-NN", results, val_images=41, classes=3)
    three = capsys.readouterr().out
    assert "41 images of 3 classes, 2.4 points each" in three and "top-5" not in three
    print_results("k-NN", results, val_images=41, classes=10)
    assert "top-5" in capsys.readouterr().out


def test_the_dense_probe_table_keeps_its_title_on_one_line(capsys):
    """Over its two narrow columns the title wrapped ("SimCLR after 30 steps: dense" / "linear probe"),
    which a reader of a log took for a table without its row."""
    print_results("SimCLR after 30 steps", {"segmentation": {"miou": 5.3, "pixel_acc": 58.0, "images": 1000}})
    shown = capsys.readouterr().out
    assert "SimCLR after 30 steps: dense linear probe" in shown and "5.3" in shown


def test_the_table_says_when_the_evaluation_images_lack_some_classes(capsys):
    """A small held-out part may have no image of a small class: the accuracy is of the others."""
    labels = {"train": torch.tensor([0, 1, 2, 3, 4]), "val": torch.tensor([0, 0, 2, 2, 4])}
    train, val = (FeatureSet(torch.zeros(5, 2), labels[split]) for split in ("train", "val"))
    print_results("k-NN", {"knn": {"k=20": {"top1": 60.0, "top5": 100.0}}}, **accuracy_counts(train, val))
    assert "5 images of 3 of the 5 classes, 20 points each" in capsys.readouterr().out
    print_results("k-NN", {"knn": {"k=10": {"top1": 0.0, "top5": 100.0}}}, val_images=1, classes=2, val_classes=1)
    assert "1 image of 1 of the 2 classes, 100 points each" in capsys.readouterr().out


def test_the_table_gives_what_the_largest_class_alone_scores_when_classes_are_unequal(capsys):
    """A CLIP run on 45 held-out photos answered 'fences' for all: 37.8% zero-shot, 17 of the 45."""
    train = FeatureSet(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    unequal = FeatureSet(torch.zeros(45, 2), torch.tensor([0] * 17 + [1] * 14 + [2] * 14))
    print_results("zero-shot", {"zeroshot": {"top1": 37.8, "top5": 100.0}}, **accuracy_counts(train, unequal))
    assert "45 images of 3 classes, 2.2 points each; the largest class alone scores 37.8" in capsys.readouterr().out
    equal = FeatureSet(torch.zeros(45, 2), torch.tensor([0, 1, 2] * 15))
    print_results("zero-shot", {"zeroshot": {"top1": 37.8, "top5": 100.0}}, **accuracy_counts(train, equal))
    assert "largest class" not in capsys.readouterr().out  # chance is the same for every answer: nothing to add


@pytest.mark.parametrize("fc_norm", [False, True])
def test_mean_pooling_of_an_average_pooled_timm_vit_is_its_own_embedding(fc_norm):
    """A SimMIM export (final norm, then the mean) or a fine-tuned classifier (the mean, then
    fc_norm): `pooling: mean` gives what timm's model(images) gives without its classifier."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, global_pool="avg", fc_norm=fc_norm)
    with torch.no_grad():  # fc_norm's affine away from its identity start, so that leaving it out shows
        for p in vit.fc_norm.parameters():
            p.normal_()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(TimmViTEncoder(vit.eval()), images, "mean"), vit(images))


def test_a_knn_without_k20_is_not_reported_as_k20():
    """Fewer than 20 training images measure k=10 only: no k=20 number comes of it."""
    assert headline_accuracy({"knn": {"k=10": {"top1": 50.0, "top5": 100.0}}})["knn_k20_top1"] is None
    assert headline_accuracy({"knn": {"k=20": {"top1": 50.0, "top5": 100.0}}})["knn_k20_top1"] == 50.0


def test_a_mid_run_knn_is_said_on_the_console_beside_the_start(tmp_path):
    """The mid-run k-NN went only to TensorBoard and a picture: a user watching a long run saw
    nothing between the start's and the end's tables."""
    from ssl_vit.eval import EvaluationCallback
    from ssl_vit.methods import SimCLR

    shards = labelled_shards(tmp_path / "shards", 12, 2, seed=0)
    evaluation = EvaluationCallback(
        train_shards=shards, val_shards=shards, every_n_steps=2, at_start=True, probes=False, knn_ks=[5], num_workers=0
    )
    lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lines.append
    lightning_log = logging.getLogger("lightning.pytorch")  # the console's, as Lightning's own lines
    lightning_log.addHandler(handler)
    try:
        model = SimCLR(TINY_ENCODER, hidden_dim=32, out_dim=16)
        fit_briefly(model, "two", steps=3, callbacks=[evaluation], default_root_dir=tmp_path)
    finally:
        lightning_log.removeHandler(handler)
    printed = "\n".join(line.getMessage() for line in lines)
    said = re.search(r"step 2: k-NN k=5 top-1 ([\d.]+)% \(random init ([\d.]+)\)", printed)
    assert said, printed
    assert float(said[2]) == pytest.approx(evaluation.baseline["knn"]["k=5"]["top1"], abs=0.05)
