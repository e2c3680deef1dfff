"""seqvision train: recipes and overrides, a digits run and its records, exact resumption after SIGKILL,
atomic checkpoints, the NaN stop, data errors, fine-tuning to another class count, DDP with two processes."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import make_tree, run_train, subprocess_env, tiny_set_args

from seqvision.cli import main as cli_main
from seqvision.commands.train import build_parser, config_from_args
from seqvision.errors import ConfigError, DataError, DivergedError, UserError
from seqvision.train import TrainConfig, Trainer, load_recipe, recipe_names, resolve_config, scaled_lr, train
from seqvision.train.checkpoint import save_checkpoint


def main(argv: list[str]) -> int:
    return cli_main(["train", *argv])

TIMING = ("epoch_seconds", "img_per_s")


def tiny_cfg(out: Path, *argv: str, **extra) -> TrainConfig:
    args = build_parser().parse_args(["--output", str(out), *argv, *tiny_set_args(**extra)])
    return config_from_args(args)[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    summary = train(tiny_cfg(out, epochs=3, tensorboard=True), "digits")
    return out, summary


# -- configuration ----------------------------------------------------------------------------------------
def test_help_works():
    text = build_parser().format_help()
    assert "examples:" in text and "--resume" in text and "torchrun" in text
    r = subprocess.run([sys.executable, "-m", "seqvision.train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage:" in r.stdout
    from seqvision.commands.demo import build_parser as demo_parser

    assert "--skip-train" in demo_parser().format_help()


def test_recipes_load_with_the_papers_values():
    names = set(recipe_names())
    assert {
        "digits",
        "imagenet_s",
        "imagenet_m",
        "imagenet_l",
        "imagenet_l_392",
        "cifar10",
        "cifar100",
        "flowers102",
        "stanford_cars",
    } <= names
    cfgs = {n: resolve_config(load_recipe(n)) for n in names}
    s = cfgs["imagenet_s"]
    assert (s.lr, s.lr_base_batch, s.epochs, s.cooldown_epochs, s.warmup_epochs) == (
        2e-3,
        2048,
        300,
        10,
        20,
    )
    assert (s.aa, s.reprob, s.mixup, s.cutmix, s.smoothing) == (
        "rand-m9-mstd0.5-inc1",
        0.25,
        0.8,
        1.0,
        0.1,
    )
    assert (s.weight_decay, s.drop_path, s.min_lr, s.warmup_lr, s.clip_grad) == (
        0.05,
        0.1,
        1e-6,
        1e-6,
        None,
    )
    assert cfgs["imagenet_m"].model == "sequencer2d_m" and cfgs["imagenet_m"].lr == 2e-3
    assert cfgs["imagenet_l"].model == "sequencer2d_l"
    f = cfgs["imagenet_l_392"]
    assert (f.img_size, f.lr, f.lr_base_batch, f.epochs, f.warmup_epochs) == (392, 5e-5, 512, 30, 0)
    assert (f.weight_decay, f.drop_path, f.crop_pct, f.pretrained) == (1e-8, 0.4, 1.0, True)
    for name, classes in (
        ("cifar10", "cifar10"),
        ("cifar100", "cifar100"),
        ("flowers102", "flowers102"),
        ("stanford_cars", "stanford_cars"),
    ):
        t = cfgs[name]
        assert t.dataset == classes and t.pretrained
        assert (t.lr, t.lr_base_batch, t.weight_decay, t.clip_grad, t.reprob) == (
            1e-4,
            512,
            1e-4,
            1.0,
            0.0,
        )
        assert (t.epochs, t.cooldown_epochs, t.warmup_epochs, t.mixup, t.cutmix) == (
            200,
            10,
            5,
            0.8,
            1.0,
        )
        assert t.img_size == 224 and t.aa == "rand-m9-mstd0.5-inc1"


def test_digits_yaml_is_the_builtin_default():
    from importlib import resources

    import yaml

    packaged = yaml.safe_load(resources.files("seqvision").joinpath("configs", "digits.yaml").read_text())
    assert load_recipe("digits") == packaged and packaged["dataset"] == "digits"
    cfg, name, _ = config_from_args(build_parser().parse_args([]))
    assert name == "digits" and cfg.dataset == "digits" and cfg.model_kwargs == packaged["model_kwargs"]
    assert (cfg.img_size, cfg.epochs) == (packaged["img_size"], packaged["epochs"])


def test_command_line_overrides_apply():
    argv = [
        "-c",
        "imagenet_s",
        "--epochs",
        "5",
        "--batch-size",
        "16",
        "--set",
        "lr=1e-3",
        "--set",
        "aa=null",
        "--set",
        "model_kwargs.layers=[2,2,2,2]",
        "--no-amp",
        "--data-dir",
        "/data/x",
    ]
    cfg, name, _ = config_from_args(build_parser().parse_args(argv))
    assert name == "imagenet_s"
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.aa, cfg.amp) == (5, 16, 1e-3, None, False)
    assert cfg.model_kwargs == {"layers": [2, 2, 2, 2]} and cfg.data_dir == "/data/x"
    assert cfg.mixup == 0.8  # untouched keys keep the recipe's value
    cfg, _, _ = config_from_args(build_parser().parse_args(["--data-dir", "/d"]))
    assert cfg.dataset == "folder"  # --data-dir alone means an ImageFolder tree
    with pytest.raises(ConfigError, match="did you mean epochs"):
        config_from_args(build_parser().parse_args(["--set", "epoch=3"]))
    with pytest.raises(ConfigError, match="must be an integer"):
        config_from_args(build_parser().parse_args(["--set", "batch_size=big"]))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_from_args(build_parser().parse_args(["--set", "lr"]))
    with pytest.raises(ConfigError, match="no recipe"):
        load_recipe("imagenet_xxl")


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=-1", "lr must be above 0, got -1.0"),
        ("clip_grad=-1", "clip_grad must be above 0"),  # would clip every gradient to garbage, silently
        ("workers=-1", "workers must be 0 or more"),
        ("drop_path=2", "drop_path must be between 0 and 1"),
        ("smoothing=1", "smoothing must be at least 0 and below 1"),
        ("weight_decay=-0.1", "weight_decay must be 0 or more"),
        ("epochs=0", "epochs must be at least 1"),
        ("num_classes=ten", "num_classes must be an integer"),
        ("layer_decay=abc", "layer_decay must be a number"),
        ("scale=[0.9,0.1]", "scale must be two numbers [low, high] with 0 < low <= high <= 1"),
        ("ratio=[0,1]", "ratio must be two numbers"),
        ("model_kwargs.bogus=1", "model_kwargs.bogus is not an argument of sequencer2d_s"),
        ("model_kwargs.layres=[1,1,1,1]", "did you mean layers?"),
        ("model_kwargs=[1,2]", "model_kwargs must be a mapping"),
        ("model_kwargs.num_classes=3", "model_kwargs.num_classes: set it with the training key"),
        ("lr.x=1", "lr has no keys of its own"),
        ("seed=-1", "seed must be between 0 and 4294967295"),
        ("seed=4611686018427387904", "seed must be between 0 and 4294967295"),
        ("img_size=100000", "img_size must be between 1 and 4096"),
        ("crop_pct=5", "crop_pct must be between 0.25 and 2"),
        ("mean=[0.5,0.5]", "mean must be three numbers"),
        ("dataset=imagenet", "dataset must be one of digits, mnist5k, folder"),
        ("progress=maybe", "progress must be one of auto, true, false"),
    ],
)
def test_out_of_range_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        config_from_args(build_parser().parse_args(["--set", override]))
    assert message in str(e.value)


def test_set_takes_several_pairs_at_once():
    pairs = "batch_size=12,workers=3,model_kwargs.layers=[1,2,1,1]"
    cfg, _, _ = config_from_args(build_parser().parse_args(["--set", pairs]))
    assert (cfg.batch_size, cfg.workers, cfg.model_kwargs["layers"]) == (12, 3, [1, 2, 1, 1])
    cfg, _, _ = config_from_args(build_parser().parse_args(["--set", "aa=rand-m9-mstd0.5,mean=[0.5,0.5,0.5]"]))
    assert cfg.aa == "rand-m9-mstd0.5" and cfg.mean == [0.5, 0.5, 0.5]


def test_documented_train_commands_parse():
    # Every `seqvision train` line of the README and of `train --help` (the README's `--set a=1,b=2` example
    # once failed with "batch_size must be an integer").
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text() + "\n" + build_parser().format_help()
    lines = re.findall(r"^\s*(?:torchrun .*?-m )?seqvision train(.*?)(?:\s+#.*)?$", text, re.M)
    lines = [line for line in lines if "--resume" not in line and "/ validate" not in line]
    commands = [shlex.split(line.replace("\\", "")) for line in lines]
    assert len(commands) >= 5, commands
    for argv in commands:
        cfg, _, _ = config_from_args(build_parser().parse_args(argv))
        assert cfg.batch_size >= 1, argv


def test_every_recipe_is_within_the_ranges():
    for name in recipe_names():
        resolve_config(load_recipe(name))  # raises ConfigError on a value out of range


def test_print_config(capsys):
    assert main(["--epochs", "7", "--print-config"]) == 0
    assert "epochs: 7" in capsys.readouterr().out


def test_linear_lr_scaling():
    cfg = TrainConfig.from_dict(dict(lr=2e-3, lr_base_batch=2048, batch_size=128, accum_steps=2))
    assert scaled_lr(cfg, world_size=4) == (pytest.approx(1e-3), 1024)
    assert scaled_lr(cfg.replace(lr_scaling="none"), world_size=4) == (2e-3, 1024)


# -- a run and what it leaves behind ----------------------------------------------------------------------
def test_digits_run_learns_and_records(digits_run):
    out, summary = digits_run
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.05, losses
    assert float(rows[-1]["top1"]) > 25, rows[-1]  # chance is 10 %
    assert summary["best_top1"] == max(float(r["top1"]) for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["parameters"] == summary["parameters"] > 0 and saved["epochs"] == 3
    assert saved["updates_per_rank"] == [3 * (1437 // 32)]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    log = (out / "log.txt").read_text()
    assert "lr 0.005 is for a global batch of 32" in log and "-> lr 0.005 (linear scaling)" in log
    from seqvision.ops import fused

    resolved = (
        f"fused C++ kernel, {fused.parallel_threads()} threads"
        if fused.available()
        else "reference: the fused kernel is unavailable"
    )
    assert f"BiLSTM2D engine auto ({resolved}" in log


def test_checkpoint_is_safe_to_load_and_complete(digits_run):
    from seqvision.inference import load_model
    from seqvision.models import create_model
    from seqvision.weights import load_weights

    out, _ = digits_run
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "rng", "config", "class_names", "data_config", "history"):
        assert key in state, key
    assert state["epoch"] == 3 and state["step"] == 0 and state["class_names"] == [str(i) for i in range(10)]
    assert isinstance(state["rng"]["torch"], torch.Tensor) and isinstance(state["rng"]["python"][1], list)
    assert all(g["fused"] is True for g in state["optimizer"]["param_groups"])  # torch's one-kernel AdamW
    model = create_model("sequencer2d_s", num_classes=10, **state["model_kwargs"])
    load_weights(model, out / "best.pth")
    loaded = load_model(out / "best.pth")  # what predict / validate do: rebuilt from the file alone
    assert loaded.class_names == state["class_names"] and loaded.data_config["input_size"] == (3, 16, 16)


def test_engine_options_run(tmp_path, monkeypatch, capsys):
    """bf16 autocast, accumulation over 3 batches, clipping, gradient checkpointing and EMA together; on a CPU
    where oneDNN has no bf16 path (simulated here) the log warns that --amp will be slow."""
    from seqvision import ops

    monkeypatch.setattr(ops, "cpu_has_bf16", lambda: False)
    before = ops.get_engine()
    summary = train(
        tiny_cfg(
            tmp_path / "r",
            epochs=1,
            amp=True,
            accum_steps=3,
            clip_grad=1.0,
            grad_checkpointing=True,
            model_ema=True,
            model_ema_decay=0.9,
            engine="reference",
        )
    )
    assert ops.get_engine() == before  # the run's engine choice does not outlive the run
    assert summary["updates_per_rank"] == [math.ceil((1437 // 32) / 3)]
    row = read_csv(tmp_path / "r" / "metrics.csv")[0]
    assert math.isfinite(float(row["train_loss"])) and "ema_top1" in row
    assert "model_ema" in torch.load(tmp_path / "r" / "last.pth", weights_only=True)
    assert "warning: --amp on a CPU where oneDNN has no bf16 path" in capsys.readouterr().out


@pytest.mark.parametrize("engine, builds", [("auto", True), ("fused", True), ("reference", False)])
def test_cpu_run_builds_the_fused_engine_before_epoch_one(tmp_path, monkeypatch, engine, builds):
    """A first build of the fused kernel (~30 s) happens while the run is set up, not inside epoch 1's timing."""
    from seqvision.ops import fused
    from seqvision.train import Trainer

    calls = []
    monkeypatch.setattr(fused, "available", lambda: calls.append(1) or True)
    trainer = Trainer(tiny_cfg(tmp_path / "r", epochs=1, engine=engine))
    try:
        trainer.build()
        assert bool(calls) is builds
    finally:
        trainer.close()


def test_existing_run_is_not_overwritten(digits_run):
    out, _ = digits_run
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_cfg(out))


# -- checkpoints: atomic, NaN stop, exact resume ----------------------------------------------------------
def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    save_checkpoint({"w": torch.ones(3)}, tmp_path, "last.pth")
    before = (tmp_path / "last.pth").read_bytes()

    def crash_half_way(self, data):  # a crash (kill, full disk) in the middle of writing
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_bytes", crash_half_way)
    with pytest.raises(OSError):
        save_checkpoint({"w": torch.zeros(10_000)}, tmp_path, "last.pth")
    assert (tmp_path / "last.pth").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    build = Trainer.build

    def build_with_nan(self):  # the loss turns NaN a few batches into epoch 2
        build(self)
        real, calls = self.train_loss, [0]

        def loss(logits, target):
            calls[0] += 1
            value = real(logits, target)
            return value * float("nan") if calls[0] > self.batches_per_epoch + 3 else value

        self.train_loss = loss

    monkeypatch.setattr(Trainer, "build", build_with_nan)
    out = tmp_path / "r"
    with pytest.raises(DivergedError, match="nan at epoch 2, batch 4") as e:
        train(tiny_cfg(out, save_every_steps=2))
    assert "last good checkpoint" in str(e.value) and "\n" not in str(e.value)
    state = torch.load(out / "last.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # the mid-epoch save before the NaN batch
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "summary.json").exists()
    # the command line reports it as one line
    rc = main(["--output", str(tmp_path / "r2"), *tiny_set_args()])
    assert rc == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    # drop-path (torch RNG), mixup (numpy RNG) and RandAugment (per-sample seeds) all take part
    extra = dict(epochs=3, save_every_steps=7, drop_path=0.1, mixup=0.5, aa="rand-m5-mstd0.5-inc1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_train(["--output", str(full), *tiny_set_args(**extra)])
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "seqvision.train", "--output", str(cut), *tiny_set_args(**extra)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (cut / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # let it run on past the checkpoint, into work that will be lost
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(cut / "last.pth", weights_only=True)
    assert (killed_at["epoch"], killed_at["step"]) < (3, 0)

    r = run_train(["--resume", str(cut)])
    assert r.returncode == 0, r.stderr
    assert f"batch {killed_at['step']}" in r.stdout
    a, b = read_csv(full / "metrics.csv"), read_csv(cut / "metrics.csv")
    assert [{k: v for k, v in row.items() if k not in TIMING} for row in a] == [
        {k: v for k, v in row.items() if k not in TIMING} for row in b
    ]
    sa = torch.load(full / "last.pth", weights_only=True)
    sb = torch.load(cut / "last.pth", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


# -- data errors -----------------------------------------------------------------------------------------
def test_missing_data_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["--data-dir", str(missing), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1


def test_empty_class_is_one_line(tmp_path, capsys):
    make_tree(tmp_path / "d" / "train", {"a": 3, "b": 0})
    make_tree(tmp_path / "d" / "val", {"a": 1, "b": 1})
    assert main(["--data-dir", str(tmp_path / "d"), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "d" / "train" / "b") in err and err.count("\n") == 1


def test_corrupt_image_stops_the_run_naming_the_file(tmp_path):
    make_tree(tmp_path / "d" / "train", {"a": 4, "b": 4})
    make_tree(tmp_path / "d" / "val", {"a": 2, "b": 2})
    bad = tmp_path / "d" / "train" / "b" / "2.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=str(bad)) as e:
        train(tiny_cfg(tmp_path / "r", "--data-dir", str(tmp_path / "d"), batch_size=4, epochs=1))
    assert isinstance(e.value, UserError)


# -- fine-tuning ------------------------------------------------------------------------------------------
def test_finetune_to_another_class_count(digits_run, tmp_path):
    src = digits_run[0] / "best.pth"
    make_tree(tmp_path / "d" / "train", {"red": 6, "green": 6, "blue": 6})
    make_tree(tmp_path / "d" / "val", {"red": 2, "green": 2, "blue": 2}, seed=1)
    cfg = tiny_cfg(tmp_path / "r", "--data-dir", str(tmp_path / "d"), "--finetune", str(src), batch_size=6, epochs=2)
    trainer = Trainer(cfg, "ft")
    with pytest.warns(UserWarning, match="re-initialised"):
        trainer.build()
    source = torch.load(src, weights_only=True)["model"]
    assert torch.equal(trainer.core.stem.proj.weight, source["stem.proj.weight"])
    assert trainer.core.head.fc.weight.shape[0] == 3
    trainer.close()

    with pytest.warns(UserWarning, match="re-initialised"):
        train(cfg, "ft")
    state = torch.load(tmp_path / "r" / "last.pth", weights_only=True)
    assert state["class_names"] == ["blue", "green", "red"] and state["model"]["head.fc.weight"].shape[0] == 3


# -- the demo ---------------------------------------------------------------------------------------------
def test_demo_trains_and_predicts(tmp_path, capsys):
    from seqvision.commands.demo import build_parser as demo_parser
    from seqvision.commands.demo import run as demo_run

    argv = ["--output", str(tmp_path / "demo"), "--epochs", "1", "--samples", "4"]
    argv += tiny_set_args(exclude=("epochs",))  # the tiny model; --epochs 1 stays
    assert demo_run(demo_parser().parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert out.count("true ") == 4 and "top-1 on all 360 validation digits" in out


# -- several processes ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_with_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "seqvision.train",
        "--output",
        str(out),
        *tiny_set_args(epochs=2),
    ]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    per_rank = (1437 // 2) // 32
    assert summary["world_size"] == 2 and summary["updates_per_rank"] == [2 * per_rank, 2 * per_rank]
    assert summary["global_batch"] == 64 and summary["lr"] == pytest.approx(0.01)  # 5e-3 @ 32 -> 64
    rows = read_csv(out / "metrics.csv")
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert r.stdout.count("seqvision train ->") == 1  # only rank 0 logs
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pth") == ["best.pth", "last.pth"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and not any(k.startswith("module.") for k in state["model"])


@pytest.mark.slow
def test_fsdp_two_processes_with_gloo(tmp_path):
    """--fsdp shards the model across 2 CPU processes (with accumulation and clipping); the checkpoint holds the
    full (gathered) weights, which load into a fresh model and give the validation accuracy the run reported."""
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "seqvision.train", "--output", str(out), "--fsdp",
           *tiny_set_args(epochs=1, accum_steps=2, clip_grad=1.0)]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    per_rank = (1437 // 2) // 32
    assert summary["world_size"] == 2 and summary["updates_per_rank"] == [math.ceil(per_rank / 2)] * 2
    assert "FSDP" in r.stdout
    from seqvision import evaluate as ev
    from seqvision.data import open_dataset
    from seqvision.inference import load_model

    loaded = load_model(out / "best.pth")  # the evaluator's own pipeline, rebuilt from the file alone
    data = open_dataset("digits", "val")
    result, _ = ev.validate(loaded, data, ev.eval_data_config(loaded), torch.device("cpu"))
    assert result.n == 360 and result.top1 == pytest.approx(summary["best_top1"], abs=0.01)

    # Resuming a sharded run: each rank reloads its shard of the optimiser state and training goes on.
    r = subprocess.run([*cmd, "--resume", str(out), "--set", "epochs=2"], env=subprocess_env(), capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(out / "metrics.csv")
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.slow
def test_compiled_training_writes_plain_checkpoints(tmp_path):
    """--compile trains through torch.compile; checkpoints hold the bare module's keys (no _orig_mod.)."""
    from seqvision.inference import load_model

    summary = train(tiny_cfg(tmp_path / "c", epochs=1, compile=True))
    assert summary["updates_per_rank"] == [1437 // 32]
    state = torch.load(tmp_path / "c" / "last.pth", weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])
    assert load_model(tmp_path / "c" / "best.pth").model.num_classes == 10


def test_bad_model_kwargs_values_are_one_line(tmp_path, capsys):
    rc = main(["--output", str(tmp_path / "r"), *tiny_set_args(), "--set", "model_kwargs.layers=[1,1]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model_kwargs do not build a sequencer2d_s" in err


# -- the run directory -----------------------------------------------------------------------------------
def test_output_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert main(["--output", str(out), *tiny_set_args()]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(tmp_path / "f") in err and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "mine"


def test_files_seqvision_did_not_write_are_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "notes"}')
    (out / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="summary.json that no seqvision run wrote"):
        train(tiny_cfg(out))
    assert (out / "summary.json").read_text() == '{"my": "notes"}' and (out / "notes.txt").read_text() == "keep"


def test_a_run_directory_in_use_is_refused(tmp_path):
    from seqvision.train.rundir import RunDir

    holder = RunDir(tmp_path / "r")
    holder.claim(resuming=False, overwrite=False)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on "):
            Trainer(tiny_cfg(tmp_path / "r"))
    finally:
        holder.release()
    Trainer(tiny_cfg(tmp_path / "r")).close()  # free again once the holder is gone


def test_stale_temporary_files_are_removed_on_resume(digits_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_run[0], run)
    stale = run / ".last.pth.k3j2x9.tmp.pth"  # what a kill during atomic_write leaves
    stale.write_bytes(b"half a checkpoint")
    mine = run / ".my-notes.tmp"
    mine.write_text("not ours")
    trainer = Trainer(tiny_cfg(run), resume=run)
    trainer.close()
    assert not stale.exists() and mine.exists()
    log = capsys.readouterr().out
    assert "removed 1 temporary file(s) left by an interrupted write: .last.pth.k3j2x9.tmp.pth" in log


def test_results_follow_the_umask(digits_run):
    mask = os.umask(0)
    os.umask(mask)
    out = digits_run[0]
    for name in ("last.pth", "best.pth", "metrics.csv", "summary.json", "curves.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.slow
def test_sigterm_ends_in_one_line_with_the_resume_command(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "seqvision.train", "--output", str(out), *tiny_set_args(epochs=3, save_every_steps=3)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (out / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"seqvision train: stopped by SIGTERM; `seqvision train --resume {out}` continues from its last checkpoint"
    ]
    torch.load(out / "last.pth", weights_only=True)  # the checkpoint it points to is whole


# -- a torchvision set, trained and then validated -------------------------------------------------------
def test_model_trained_on_a_torchvision_set_validates_on_it(tmp_path):
    """Train on a generated tree in torchvision's StanfordCars layout, then `seqvision validate --dataset
    stanford_cars` scores the checkpoint with the evaluator's own pipeline: the same top-1 as the run's."""
    from train_helpers import make_stanford_cars

    make_stanford_cars(tmp_path / "cars", n_train=32, n_test=10)
    out = tmp_path / "run"
    argv = ["--dataset", "stanford_cars", "--data-dir", str(tmp_path / "cars"), *tiny_set_args(batch_size=8, epochs=2)]
    summary = train(tiny_cfg(out, *argv))
    results = tmp_path / "results"
    rc = cli_main(["validate", "--checkpoint", str(out / "best.pth"), "--dataset", "stanford_cars", "--data-dir",
                   str(tmp_path / "cars"), "--device", "cpu", "--workers", "0", "--output-dir", str(results)])
    assert rc == 0
    res = json.loads((results / "validate.json").read_text())
    assert res["images"] == 10 and res["labels_matched"] == "by class name"
    assert res["top1"] == pytest.approx(summary["best_top1"], abs=0.01) and res["top1"] > 50


def test_a_timm_model_trains_with_the_same_recipe_and_loads_back(tmp_path):
    """--model takes a timm name (a peer trained with the same recipe); its checkpoint rebuilds from the file
    alone, and the evaluator's pipeline gives the top-1 the run reported."""
    from seqvision import evaluate as ev
    from seqvision.data import open_dataset
    from seqvision.inference import load_model

    args = ["--output", str(tmp_path / "r"), "--model", "test_resnet", *tiny_set_args(("model_kwargs",), epochs=1)]
    cfg = config_from_args(build_parser().parse_args(args))[0]
    assert cfg.model_kwargs == {}  # the digits recipe's Sequencer arguments belong to its model, not this one
    summary = train(cfg)
    loaded = load_model(tmp_path / "r" / "best.pth")
    assert loaded.name == "test_resnet" and loaded.class_names == [str(i) for i in range(10)]
    result, _ = ev.validate(loaded, open_dataset("digits", "val"), ev.eval_data_config(loaded), torch.device("cpu"))
    assert result.n == 360 and result.top1 == pytest.approx(summary["best_top1"], abs=0.01)
