"""What the terminal shows while a run trains."""

from types import SimpleNamespace

import pytest
from rich.progress import Progress

from ssl_vit.progress import ImagesPerSecondBar, MeasuredSpeedColumn, print_run_summary
from tests.conftest import OBJECTIVES, fit_briefly


def test_the_speed_column_is_blank_until_a_speed_is_measured():
    clock = iter(float(t) for t in range(100))
    column = MeasuredSpeedColumn("white")
    progress = Progress(column, get_time=lambda: next(clock), disable=True)
    task = progress.add_task("epoch", total=4)
    progress.advance(task, 1)  # one step, as in an epoch of one batch: no speed yet, and no "0.00it/s"
    assert column.render(progress.tasks[0]).plain == ""
    progress.advance(task, 1)
    shown = column.render(progress.tasks[0]).plain
    assert shown.endswith("it/s") and shown != "0.00it/s"


def test_a_run_summary_in_a_log_keeps_every_path_whole(capsys):
    checkpoint = "runs/a_folder_of_photos_with_a_long_name/simclr/checkpoints/last.ckpt"
    failed = "its outputs stayed collapsed for more than 10% of the run, " * 4  # a sentence, which wraps
    print_run_summary({"objective": "SimCLR", "steps": 8, "checkpoint": checkpoint, "export": None, "failed": failed})
    shown = capsys.readouterr().out.splitlines()  # not a terminal: no 80-column limit
    assert any(checkpoint in line for line in shown) and not any("export" in line for line in shown)
    assert max(map(len, shown)) < len(failed)


@pytest.mark.parametrize(("max_epochs", "shown"), [(-1, "Epoch 2"), (5, "Epoch 2/4")])
def test_the_bar_counts_epochs_out_of_a_limit_only_when_there_is_one(max_epochs, shown):
    bar = ImagesPerSecondBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    assert bar._get_train_description(2).strip() == shown


def test_images_per_second_is_the_runs_on_every_device():
    """One device's images over the window's time, times the devices (DDP keeps them in step):
    2 processes showed each one's rate as the run's."""
    bar = ImagesPerSecondBar()
    bar._marks = [(0.0, 16), (1.0, 16), (2.0, 16)]  # the first batch's images came before the window's clock
    assert bar.images_per_second() == 16 and bar.images_per_second(devices=2) == 32


def test_a_run_whose_output_goes_to_a_file_says_how_far_it_is(capsys):
    """rich draws its bar in a file only when it stops: a run logging to a file said nothing for
    its whole length. Here a line every step (file_every_s=0) and the last step's, in epochs of one
    batch each, whose pauses the speed counts (it was measured within an epoch: never, here)."""
    factory, view = OBJECTIVES["simclr"]
    bar = ImagesPerSecondBar(file_every_s=0)
    fit_briefly(factory(), view, steps=3, num_images=4, callbacks=[bar], enable_progress_bar=True)
    shown = capsys.readouterr().out
    assert "Epoch" not in shown  # no bar left over at the end, after the run's tables
    lines = [line for line in shown.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], lines
    assert "train/loss" in lines[-1] and "left" in lines[1] and "left" not in lines[-1]
