"""Label-free health metrics: RankMe against its formula, and the callback over a short run."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssl_vit.health import HealthCallback, embedding_spread, rankme, teacher_health
from ssl_vit.pictures import save_picture
from tests.conftest import OBJECTIVES, fit_briefly


def test_rankme_is_garrido_et_al_eq_1():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    sigma = np.linalg.svd(z.numpy().astype(np.float64), compute_uv=False)
    p = sigma / np.abs(sigma).sum() + 1e-7
    assert rankme(z) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)

    basis = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))[0]
    for r in (1, 5, 16):  # r equal singular values: every used direction counts once
        assert rankme(basis[:, :r] @ torch.eye(r, 16)) == pytest.approx(r, rel=1e-4)


def test_spread_and_teacher_health():
    assert embedding_spread(torch.ones(8, 4)) == pytest.approx(0.0)
    assert embedding_spread(torch.eye(32)) > 0.9
    uniform = torch.full((10, 8), 1 / 8)
    assert teacher_health(uniform) == pytest.approx((1.0, 1 / 8))
    one_hot = torch.eye(8)
    assert teacher_health(one_hot) == pytest.approx((0.0, 1.0), abs=1e-6)


@pytest.mark.parametrize("name", ["dino", "mae"])
def test_health_is_measured_from_the_first_step_and_drawn(tmp_path, numbered_shards, name, monkeypatch):
    shards, _ = numbered_shards
    factory, view = OBJECTIVES[name]
    figures = {}

    def recording_save_picture(trainer, picture, figure):
        figures[picture] = figure
        return save_picture(trainer, picture, figure)

    monkeypatch.setattr("ssl_vit.health.save_picture", recording_save_picture)
    health = HealthCallback(shards=str(shards), num_images=16, every_n_steps=1)
    fit_briefly(factory(), view, steps=3, callbacks=[health], default_root_dir=str(tmp_path))
    assert [step for step, _ in health.history["rankme_cls"]] == [0, 1, 2, 3]
    assert all(1.0 <= r <= 16 for _, r in health.history["rankme_mean"])  # at most min(images, dim)
    assert ("teacher_entropy" in health.history) == (name == "dino")  # only objectives with a teacher
    assert {p.name.split("-step=")[0] for p in (tmp_path / "pictures").glob("*.png")} >= {
        "health-rankme",
        "health-spread",
    }
    (spread,) = figures["health-spread"].axes
    legend = [t.get_text() for t in spread.get_legend().get_texts()]
    teacher = ["teacher entropy / ln K", "fraction of prototypes in use"] if name == "dino" else []
    assert legend == ["spread", *teacher]
    assert ("teacher" in spread.get_title()) == (name == "dino")  # no teacher, none in the title
    (ranks,) = figures["health-rankme"].axes
    assert [t.get_text() for t in ranks.get_legend().get_texts()] == ["CLS token", "mean of the patch tokens"]
    assert ranks.get_title().startswith("RankMe of 16 held images") and ranks.get_xlabel() == "step"
    restored = HealthCallback()
    restored.load_state_dict(health.state_dict())
    assert restored.history == health.history and restored.watch.last_check == 3


def test_checks_are_spaced_to_cost_at_most_the_overhead_budget():
    trainer = SimpleNamespace(log_every_n_steps=10, strategy=SimpleNamespace(broadcast=lambda value, src: value))
    health = HealthCallback(max_overhead=0.01)
    health.schedule_next(trainer, step=0, check_seconds=0.3)  # no step timed yet: log_every_n_steps
    assert health.next_check == 10
    health._step_seconds = [0.1, 0.3]  # mean 0.2 s: a 0.3 s check is 1% of 150 steps
    health.schedule_next(trainer, step=10, check_seconds=0.3)
    assert health.next_check == 160 and health._step_seconds == []
    health._step_seconds = [1.0]  # slow steps: the floor of log_every_n_steps holds
    health.schedule_next(trainer, step=160, check_seconds=0.05)
    assert health.next_check == 170
    fixed = HealthCallback(every_n_steps=7)
    fixed.schedule_next(trainer, step=3, check_seconds=99.0)  # a fixed interval ignores the cost
    assert fixed.next_check == 10


def test_a_collapsed_representation_is_reported_with_its_step(tmp_path, numbered_shards):
    shards, _ = numbered_shards
    factory, view = OBJECTIVES["mae"]
    method = factory(base_lr=0.0)
    with torch.no_grad():  # the final norm maps every token to the same vector
        method.encoder.vit.norm.weight.zero_()
        method.encoder.vit.norm.bias.fill_(0.5)
    health = HealthCallback(shards=str(shards), num_images=16, every_n_steps=1)
    with pytest.warns(UserWarning, match=r"representation has collapsed at step 0 .*RankMe"):
        fit_briefly(method, view, steps=2, callbacks=[health], default_root_dir=str(tmp_path))
    assert health.watch.collapsed_steps == 2  # steps 1 and 2: the check at step 0 comes before any step


def test_too_few_held_images_skip_the_health_checks_with_a_warning(tmp_path, numbered_shards):
    """RankMe is at most the number of images: on one held-out image every encoder reads as collapsed."""
    shards, _ = numbered_shards
    factory, view = OBJECTIVES["mae"]
    health = HealthCallback(shards=f"{shards}/shard-000000.tar", every_n_steps=1)  # fewer than 8 images
    with pytest.warns(UserWarning, match=r"health checks are skipped: .* has \d image"):
        fit_briefly(factory(), view, steps=2, callbacks=[health], default_root_dir=str(tmp_path))
    assert health.history == {} and health.watch.collapsed_steps == 0
