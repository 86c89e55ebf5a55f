"""The ``ssl-vit`` command as a user runs it: bad recipes stop with one line, pretraining writes a
checkpoint, and re-running with ``--ckpt_path last`` resumes at the saved step."""

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_vit.data.pipeline import seen_images
from ssl_vit.data.shards import resolve_shards
from ssl_vit.errors import UserError
from tests.fault_injection import in_this_process

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart" / "mae.yaml"
TINY = [
    "--model.init_args.encoder.embed_dim=32",
    "--model.init_args.encoder.depth=1",
    "--model.init_args.encoder.num_heads=2",
    "--model.init_args.decoder_dim=16",
    "--model.init_args.decoder_depth=1",
    "--data.batch_size=32",
    "--data.samples_per_epoch=128",
    "--data.num_workers=1",
    "--data.shuffle_buffer=64",
    "--trainer.log_every_n_steps=1",
    # The quickstart's attentive and dense probes, shortened, on a fifth of the shapes' training
    # images and half their validation images (the standalone commands below match).
    "--trainer.callbacks.init_args.attentive_epochs=2",
    "--trainer.callbacks.init_args.seg_epochs=2",
    "--trainer.callbacks.init_args.train_shards=data/shapes/train/shard-{000000..000003}.tar",
    "--trainer.callbacks.init_args.val_shards=data/shapes/val/shard-{000000..000001}.tar",
]


def ssl_vit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_vit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with the embedded dataset at data/shapes, where the quickstart recipe looks."""
    work = tmp_path_factory.mktemp("work")
    result = in_this_process(work, "shards", "embedded", "data/shapes")
    assert result.returncode == 0, result.stderr
    assert "wrote 5000 samples of 10 classes in 20 shards" in result.stdout
    return work


@pytest.mark.parametrize("where", ["recipe", "command line"])
def test_unknown_recipe_key_stops_before_any_work(tmp_path, where):
    if where == "recipe":
        recipe = tmp_path / "typo.yaml"
        recipe.write_text(RECIPE.read_text().replace("batch_size:", "batch_sise:"))
        result = in_this_process(tmp_path, "pretrain", "--config", str(recipe))
    else:
        result = in_this_process(tmp_path, "pretrain", "--config", str(RECIPE), "--data.batch_sise=3")
    assert result.returncode == 2
    assert "unknown recipe key 'data.batch_sise'; did you mean 'data.batch_size'?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_a_recipe_path_outside_the_checkout_names_the_shipped_recipe(tmp_path):
    result = in_this_process(tmp_path, "pretrain", "--config", "recipes/quickstart/simclr.yaml")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"the shipped one is {ROOT / 'recipes/quickstart/simclr.yaml'}" in result.stderr
    result = in_this_process(tmp_path, "pretrain", "--config", "mine.yaml")
    assert result.returncode == 2 and "mine.yaml does not exist; `ssl-vit recipes` lists" in result.stderr
    result = in_this_process(tmp_path, "pretrain", "--config", "simclr.yaml")  # a shipped recipe's name alone
    assert f"did you mean {ROOT / 'recipes/quickstart/simclr.yaml'}?" in result.stderr


def test_missing_shards_stop_with_one_message(tmp_path):
    result = in_this_process(
        tmp_path,
        "pretrain",
        "--config",
        str(RECIPE),
        "--data.train_shards=/nonexistent/train-{0..3}.tar",
        "--data.generate_embedded=false",
    )
    assert result.returncode == 2
    assert "4 of 4 shards of '/nonexistent/train-{0..3}.tar' are missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    # a glob or a list, as a shell or webdataset would read them: said, with what is read instead
    for spec, written in (("own/*.tar", "a glob pattern"), ("own/a.tar,own/b.tar", "a list")):
        with pytest.raises(UserError, match=re.escape(f"{spec} is {written}, which is not expanded here")):
            resolve_shards(spec)
    with pytest.raises(UserError, match="2 of 2 shards"):
        resolve_shards("own/{a,b}.tar")  # a brace pattern's commas are its own


def test_pretrain_resumes_and_its_evaluation_matches_the_standalone_commands(workdir):
    args = ["pretrain", "--config", str(RECIPE), *TINY]
    first = in_this_process(workdir, *args, "--trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt_dir = workdir / "runs/shapes/mae/checkpoints"
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # 128 samples / batch 32
    (first_seconds,) = [state["seconds"] for name, state in ckpt["callbacks"].items() if "RunCheckpoint" in name]
    assert ckpt["ssl_vit_run"]["train_shards"] == str(workdir.resolve() / "data/shapes/train")  # where, not the words

    # a new process, as a user's, with the same data written another way
    resume = [*args, "--data.train_shards=./data/shapes/train/", "--trainer.max_epochs=2", "--ckpt_path=last"]
    second = ssl_vit(*resume, cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint" in second.stdout + second.stderr
    resumed = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8 and resumed["epoch"] == ckpt["epoch"] + 1
    assert resumed["optimizer_states"][0]["state"]  # AdamW moments came along

    # The end-of-run evaluation: a table, JSON records, and the random-init baseline kept across the resume.
    assert "k-NN k=20" in second.stdout and "linear probe" in second.stdout and "attentive probe" in second.stdout
    assert "dense linear probe" in second.stdout and "mIoU" in second.stdout
    assert "500 images of 10 classes, 0.2 points each" in second.stdout  # what a point is worth
    kinds = ("knn", "probe", "attentive", "segmentation")
    in_run = {kind: json.loads((ckpt_dir / f"last.{kind}.json").read_text()) for kind in kinds}
    assert in_run["knn"]["step"] == 8 and in_run["knn"]["method"] == "MAE"
    assert set(in_run["knn"]["results"]) == {"k=10", "k=20", "k=100", "k=200"}
    assert "random_init_results" in in_run["probe"]

    # The same numbers from the standalone commands on the checkpoint.
    data = [arg.replace("--trainer.callbacks.init_args.", "--") for arg in TINY if "_shards=" in arg]
    protocols = {
        "knn": [],
        "probe": ["--head=linear+attentive", "--attentive_epochs=2"],
        "segprobe": ["--seg_epochs=2"],
    }
    for command, protocol in protocols.items():  # each command takes its own protocols' options only
        result = in_this_process(workdir, command, str(ckpt_dir / "last.ckpt"), *data, *protocol)
        assert result.returncode == 0, result.stderr[-3000:]
    for kind in kinds:  # in files of their own: the run's records are left as they were
        (record,) = ckpt_dir.glob(f"last.{kind}.eval-*.json")
        standalone = json.loads(record.read_text())
        assert json.loads((ckpt_dir / f"last.{kind}.json").read_text()) == in_run[kind]
        assert standalone["results"] == in_run[kind]["results"]
        assert standalone["protocol"] == in_run[kind]["protocol"]

    # The run folder, as the README documents it; TensorBoard has the scalars and the pictures.
    run = workdir / "runs/shapes/mae"
    assert {p.name for p in run.iterdir()} >= {"checkpoints", "export", "pictures", "lightning_logs", "summary.json"}
    drawn = {p.name.split("-step=")[0] for p in (run / "pictures").glob("*.png")}
    assert drawn == {
        "reconstruction",
        "attention",
        "patch_pca",
        "loss",
        "knn",
        "embedding_pca",
        "health-rankme",
        "health-spread",
    }
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["knn_k20_top1"] == in_run["knn"]["results"]["k=20"]["top1"]
    assert summary["evaluation_images"] == 500
    assert summary["seconds"] > first_seconds > 1  # the first session's seconds count too
    assert "MAE run" in second.stdout and "knn k20 top1" in second.stdout and summary["rankme_cls"] > 1
    logs = sorted((run / "lightning_logs").glob("version_*"))
    assert (logs[-1] / "config.yaml").exists()
    events = EventAccumulator(str(logs[-1]))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/knn_k20_top1"} <= set(events.Tags()["scalars"])
    assert {"pictures/reconstruction", "pictures/attention"} <= set(events.Tags()["images"])

    # Export: a folder timm loads by itself, with the run's evaluation in its provenance.
    result = in_this_process(workdir, "export", str(ckpt_dir / "last.ckpt"), "export/mae")
    assert result.returncode == 0, result.stderr[-3000:]
    model = timm.create_model(f"local-dir:{workdir / 'export/mae'}", pretrained=True, num_classes=10)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    provenance = json.loads((workdir / "export/mae/config.json").read_text())["ssl_vit"]
    assert provenance["knn"] == in_run["knn"]["results"] and provenance["step"] == 8
    assert provenance["attentive"] == in_run["attentive"]["results"]
    assert provenance["objective"] == "MAE" and provenance["data"]["train_shards"] == str(
        (workdir / "data/shapes/train").resolve()
    )
    again = in_this_process(workdir, "export", str(ckpt_dir / "last.ckpt"), "export/mae")
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_evaluating_something_that_is_not_a_checkpoint_is_one_clear_message(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "notes.yaml").write_text("a: 1\n")
    for name in ("cat", "dog"):  # labelled images: the data is right, only the encoder is not
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "photos" / name / "0.png")
    for path, message in (("other.pt", "is not an ssl-vit checkpoint"), ("notes.yaml", "is not an ssl-vit checkpoint")):
        result = in_this_process(tmp_path, "knn", path, "--train_shards=photos", "--val_shards=photos")
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # Without --train_shards: only a run knows its data; a missing path is named as missing.
    for source, message in (("runs/nope", "runs/nope does not exist"), ("timm:vit_tiny_patch16_224", "--train_shards")):
        result = in_this_process(tmp_path, "knn", source)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_scoring_images_the_neighbours_or_the_run_have_seen_is_said(tmp_path, monkeypatch):
    """knn|probe on the images they learn from, or on those the run trained on, score seen images
    (k-NN finds each image itself); held-out parts are not warned of."""
    monkeypatch.chdir(tmp_path)
    run = (str(tmp_path / "photos"), None)  # a run that trained on photos and held out its tenth
    assert seen_images("photos#train", "photos#heldout", run) is None
    assert seen_images("other", "photos#heldout", run) is None
    said = "the very images that the neighbours and probes learn from ({}), so these numbers are not of held-out"
    assert seen_images("photos", "./photos/", None).startswith(said.format(tmp_path.resolve() / "photos"))
    held = f"images the run trained on (it held out {tmp_path / 'photos'}#heldout), so these numbers are not"
    assert seen_images("other", "photos", run).startswith(held)
    assert seen_images(None, "photos#train", run).startswith(held)  # nothing learns from images (zero-shot)
    assert seen_images(None, "photos#heldout", run) is None
    own = (str(tmp_path / "photos"), "photos")  # a run that evaluated on its training images
    assert seen_images(None, "photos", own).startswith("images the run trained on, so these numbers are not")
    (tmp_path / "set/train").mkdir(parents=True)  # a run evaluated on the val folder beside its train folder
    (tmp_path / "set/val").mkdir()
    beside = (str(tmp_path / "set/train"), None)
    assert seen_images("x", "set/val", beside) is None and seen_images("x", "set/train#heldout", beside)


def test_ctrl_c_before_a_run_can_stop_at_a_step_is_one_line(monkeypatch, capsys):
    """Ctrl-C while a command imports or reads (before a run stops at a step's end) ends it in one line, 130."""
    import ssl_vit.cli as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["finetune", "--config", "recipe.yaml"])
    assert stopped.value.code == 130 and capsys.readouterr().err.strip() == "ssl-vit finetune: stopped by Ctrl-C"


def main_with_a_checkpoint_write_that_meets(error: BaseException, monkeypatch, tmp_path) -> int:
    """``ssl-vit pretrain`` whose checkpoint write meets ``error`` on its third write (a Ctrl-C, a
    full disk): torch's zip writer turns either into "RuntimeError: ... unexpected pos". Its exit status."""
    import ssl_vit.cli as cli
    from ssl_vit.checkpoint import AtomicCheckpointIO, _HashingWriter

    writes, write = [], _HashingWriter.write

    def third_write_meets_the_error(self, data):
        writes.append(len(data))
        if len(writes) == 3:
            raise error
        return write(self, data)

    monkeypatch.setattr(_HashingWriter, "write", third_write_meets_the_error)
    saving = lambda argv: AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, tmp_path / "last.ckpt")  # noqa: E731
    monkeypatch.setattr(cli, "run_command", saving)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["pretrain", "--config", "recipe.yaml"])
    return stopped.value.code


def test_ctrl_c_during_a_checkpoint_write_is_one_line_and_leaves_no_partial_file(monkeypatch, tmp_path, capsys):
    """A second Ctrl-C while the first one's checkpoint was being written: three chained
    tracebacks and exit status 1."""
    import ssl_vit.cli as cli

    assert main_with_a_checkpoint_write_that_meets(KeyboardInterrupt(), monkeypatch, tmp_path) == 130
    assert capsys.readouterr().err.strip() == "ssl-vit pretrain: stopped by Ctrl-C"
    assert list(tmp_path.iterdir()) == []

    def failing(argv):  # any other error keeps its traceback
        raise RuntimeError("not a Ctrl-C")

    monkeypatch.setattr(cli, "run_command", failing)
    with pytest.raises(RuntimeError, match="not a Ctrl-C"):
        cli.main(["pretrain", "--config", "recipe.yaml"])


def test_a_second_ctrl_c_mid_step_exits_130_as_the_first_does(monkeypatch):
    """Lightning ends a fit interrupted mid-step with status 1, which reads as a crash."""
    import signal

    import lightning as L

    import ssl_vit.cli as cli
    from tests.conftest import OBJECTIVES, fit_briefly

    class PressedMidStep(L.Callback):
        def on_train_batch_start(self, *args):
            raise KeyboardInterrupt

    factory, view = OBJECTIVES["simclr"]
    monkeypatch.setattr(cli, "run_command", lambda argv: fit_briefly(factory(), view, callbacks=[PressedMidStep()]))
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.main(["pretrain", "--config", "recipe.yaml"])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores it after an interrupt
    assert stopped.value.code == 130
    monkeypatch.setattr(cli, "run_command", lambda argv: sys.exit(1))  # any other status 1 stays
    with pytest.raises(SystemExit) as stopped:
        cli.main(["pretrain", "--config", "recipe.yaml"])
    assert stopped.value.code == 1


def test_a_full_disk_during_a_checkpoint_write_is_one_line(monkeypatch, tmp_path, capsys):
    """85 lines of traceback ending in "RuntimeError: ... unexpected pos" on a full disk."""
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    assert main_with_a_checkpoint_write_that_meets(full, monkeypatch, tmp_path) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl-vit pretrain: error: No space left on device; free space")
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_shards_offers_both_embedded_datasets(tmp_path):
    result = in_this_process(tmp_path, "shards", "embedded", "--help")
    assert result.returncode == 0 and "shapes" in result.stdout and "glyphs" in result.stdout


@pytest.mark.parametrize("count", ["0", "-5"])
def test_shards_of_no_samples_each_are_refused(tmp_path, count):
    """-5 wrote "140 samples in 141 shards", the first an empty tar."""
    (tmp_path / "photos/a").mkdir(parents=True)
    result = in_this_process(tmp_path, "shards", "imagefolder", "photos", "out", "--samples-per-shard", count)
    assert result.returncode == 2 and f"--samples-per-shard is {count}; give 1 or more" in result.stderr
    assert not (tmp_path / "out").exists()


def test_shards_of_an_empty_folder_or_of_a_file_say_which_and_what_to_do(tmp_path):
    """They said "it is empty", and "image folder photos/a/1.jpg does not exist" of a file."""
    (tmp_path / "photos/a").mkdir(parents=True)
    result = in_this_process(tmp_path, "shards", "imagefolder", "photos", "out")
    assert result.returncode == 2 and "image folder photos has no images (it is empty): put jpg/" in result.stderr
    (tmp_path / "photos/a/1.jpg").write_bytes(b"")
    result = in_this_process(tmp_path, "shards", "imagefolder", "photos/a/1.jpg", "out")
    assert result.returncode == 2 and "image folder photos/a/1.jpg is a file; give the folder" in result.stderr
    # shards inside the folder they read: it then held a shard folder among its classes, and no run read it
    result = in_this_process(tmp_path, "shards", "imagefolder", "photos", "photos/a/sh")
    assert result.returncode == 2 and "photos/a/sh is inside photos, which this command reads" in result.stderr
    assert not (tmp_path / "photos/a/sh").exists()


def test_shards_refuses_to_overwrite(workdir):
    result = in_this_process(workdir, "shards", "embedded", "data/shapes")
    assert result.returncode == 2 and "already exists" in result.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(recipe, tmp_path):
    pretrains = "class_path: ssl_vit.methods." in recipe.read_text()
    command = "distill" if "methods.Distill" in recipe.read_text() else "pretrain" if pretrains else "finetune"
    result = in_this_process(tmp_path, command, "--config", str(recipe), "--print_config")
    assert result.returncode == 0, result.stderr
    assert ("class_path: ssl_vit.methods." if pretrains else "init_from: runs/shapes/mae/export") in result.stdout


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/results/README.md"]


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def code_in(text: str) -> str:
    """The fenced blocks and inline code spans of a markdown text."""
    return "\n".join(re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text))


def recipes_named(page: Path) -> set[str]:
    """The recipe files a page names, less those its own ``cp`` commands write."""
    text = page.read_text()
    created = set(re.findall(r"cp \S+ (\S+)", text))
    return set(re.findall(r"recipes/[\w/]+\.yaml", text)) - created


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_recipe_and_script_the_readme_and_docs_name_exists(page):
    for recipe in sorted(recipes_named(page)):
        assert (ROOT / recipe).is_file(), f"{recipe} in {page_id(page)} does not exist"
    for script in set(re.findall(r"python (benchmarks/\w+\.py)", page.read_text())):
        assert (ROOT / script).is_file(), f"{script} in {page_id(page)} does not exist"


def test_every_benchmark_answers_help(monkeypatch, capsys):
    """Each benchmark script parses its options (whose defaults read recipes) and prints its help:
    benchmarks/distill.py once stopped at a KeyError when the distillation recipe's budget moved
    from epochs to steps, which no run of the suite noticed."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # their shared `common` module
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name == "common.py":
            continue
        monkeypatch.setattr(sys, "argv", [str(script), "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
        assert done.value.code == 0, f"python {script.relative_to(ROOT)} --help exits {done.value.code}"
        assert "usage:" in capsys.readouterr().out


def test_every_command_the_readme_and_docs_name_runs(capsys):
    pages_naming: dict[str, list[str]] = {}
    for page in PAGES:
        for command in set(re.findall(r"\bssl-vit ([a-z]+)", code_in(page.read_text()))):
            pages_naming.setdefault(command, []).append(page_id(page))
    from ssl_vit.cli import main

    for command, pages in sorted(pages_naming.items()):
        try:  # in this process: the command exists and its --help works
            main([command, "--help"])
        except SystemExit as done:
            assert done.code == 0, f"`ssl-vit {command}` in {', '.join(pages)} exits {done.code}"
    assert recipes_named(ROOT / "README.md"), "the README names no recipe"
    recipes = set().union(*map(recipes_named, PAGES))
    listed = in_this_process(ROOT, "recipes")  # not a terminal: a line per recipe, "path<TAB>what it runs"
    assert listed.returncode == 0 and all(Path(r).name in listed.stdout for r in recipes)
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert lines[0][0].startswith("recipes/quickstart/")  # what a newcomer runs first, first
    summaries = dict(lines)  # a header's first sentence, across its lines
    cpu = "on a CPU in a few minutes"
    assert summaries["recipes/quickstart/mae.yaml"] == f"MAE on the embedded shapes data with a tiny ViT, {cpu}"
    clip = f"CLIP on the embedded shapes and their captions with a tiny ViT and text transformer, {cpu}"
    assert summaries["recipes/quickstart/clip.yaml"] == clip


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_in_the_readme_and_docs_resolves(page):
    text = re.sub(r"```.*?```|`[^`\n]+`", "", page.read_text(), flags=re.S)  # code is not links
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    local = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    files = {t.split("#")[0] for t in local} - {""}
    missing = sorted(f for f in files if not (page.parent / f).exists())
    assert not missing, f"{page_id(page)} links to missing files: {missing}"
    broken = []
    for name, anchor in (t.split("#", 1) for t in local if "#" in t):
        target = page.parent / name if name else page
        if target.suffix == ".md" and anchor not in heading_anchors(target):
            broken.append(f"{name}#{anchor}")
    assert not broken, f"{page_id(page)} links to headings that do not exist: {broken}"


PLACEHOLDERS = {"N": "2", "LR": "0.001", "PATH": "x", "DIR": "runs/x", "SHARDS": "data/x"}


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_training_help_fits_a_screen_and_names_only_keys_the_parser_takes(command, capsys):
    from ssl_vit.cli import main
    from ssl_vit.cli.training import TRAINING_OPTIONS

    main([command, "--help"])
    short = capsys.readouterr().out
    assert len(short.splitlines()) < 30 and "--print_config" in short
    recipe = ROOT / "recipes/quickstart" / ("finetune.yaml" if command == "finetune" else "mae.yaml")
    options = [word for option, _ in TRAINING_OPTIONS[command][1:] for word in option.split()]  # [0] is --config
    options = [PLACEHOLDERS.get(word, word) for word in options]
    with pytest.raises(SystemExit) as done:  # --print_config parses the whole line, prints it and exits
        main([command, "--config", str(recipe), *options, "--print_config"])
    assert done.value.code == 0, capsys.readouterr().err


def test_every_objective_has_its_help_clip_included(tmp_path):
    # In a fresh process: CLIP is imported only when named, so another test's import would hide it.
    described = ssl_vit("pretrain", "--model.help", "CLIP", cwd=tmp_path)
    assert described.returncode == 0 and "--model.text_layers" in described.stdout, described.stderr
    assert described.stdout.startswith("usage: ssl-vit pretrain --model.")  # the command to give them to


def test_version_and_unknown_commands(capsys):
    from ssl_vit.cli import main

    main(["--version"])
    assert re.fullmatch(r"ssl-vit \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    with pytest.raises(SystemExit) as done:
        main(["pretrian"])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("ssl-vit: error: unknown command 'pretrian'\n")


def test_a_run_collapsed_for_more_than_a_tenth_of_its_steps_or_at_its_end_failed():
    from ssl_vit.cli.training import DistillCLI, PretrainCLI, collapse_verdict

    def verdict(collapsed=None, representation=None, collapsed_at_end=None, representation_at_end=None, steps=150):
        summary = {
            "steps": steps,
            "collapsed_steps": collapsed,
            "collapsed_at_end": collapsed_at_end,
            "representation_collapsed_steps": representation,
            "representation_collapsed_at_end": representation_at_end,
        }
        return collapse_verdict(summary, PretrainCLI.collapse_remedy)

    assert verdict(15, 0, False, False) is None and verdict() is None
    assert verdict(1, 1, False, False) is None  # a dip seen at one check, over by the next
    assert "141 of 150 steps by its objective's collapse check" in verdict(141, 3, True, False)
    assert "16 of 150 steps by its features' RankMe" in verdict(None, 16, None, False)
    # A run of 9 steps is checked at step 0 only, before any update (CLIP's random embeddings are
    # that close): no check saw it trained (its summary's end state is None), so nothing to judge.
    assert verdict(1, None, None, None, steps=9) is None
    assert "at its last check, by its features' RankMe" in verdict(0, 1, False, True)
    # Each command names a docs section on what to do next; the sections must exist.
    for cli in (PretrainCLI, DistillCLI):
        page, anchor = re.search(r"(docs/[\w-]+\.md)#([\w-]+)", cli.collapse_remedy).groups()
        assert anchor in heading_anchors(ROOT / page)


@pytest.mark.parametrize(
    ("command", "own", "others"),
    [
        ("knn", "--knn_ks", ("--probe_epochs", "--attentive_epochs", "--seg_epochs", "--head")),
        ("probe", "--attentive_epochs", ("--knn_ks", "--seg_epochs")),
        ("segprobe", "--seg_epochs", ("--knn_ks", "--probe_epochs", "--head")),
    ],
)
def test_each_evaluation_command_lists_only_its_own_options(command, own, others, capsys):
    from ssl_vit.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert own in text and not [option for option in others if option in text]
