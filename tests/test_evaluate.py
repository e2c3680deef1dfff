"""seqvision.evaluate / ``seqvision validate``: the metrics against an independent computation, data handling
(grey-scale, RGBA, corrupt files, class matching) and the command end to end on real digits data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from analysis_helpers import DATA_CONFIG, digits_tree, save_image, tensors, trained_digits_checkpoint
from PIL import Image
from torch import nn

from seqvision import evaluate as ev
from seqvision import ops
from seqvision.commands import validate as validate_command
from seqvision.data import image_folder, open_dataset
from seqvision.errors import DataError
from seqvision.inference import load_any_model, load_model


@pytest.fixture(autouse=True)
def _reference_engine():
    # The analysis code is engine-agnostic; the reference nn.LSTM path needs no compiled kernel.
    with ops.use_engine("reference"):
        yield


class TableModel(nn.Module):
    """Returns a fixed row of logits per image: image i carries its index in pixel (0, 0, 0)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits)
        self.num_classes = logits.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


class Constant(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), self.num_classes)


def _independent_metrics(logits: np.ndarray, y: np.ndarray) -> dict:
    order = np.argsort(-logits, axis=1)
    top1 = 100.0 * np.mean(order[:, 0] == y)
    top5 = 100.0 * np.mean([t in row[:5] for t, row in zip(y, order, strict=True)])
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    loss = -np.mean(logp[np.arange(len(y)), y])
    conf = np.zeros((logits.shape[1],) * 2, dtype=int)
    for t, p in zip(y, order[:, 0], strict=True):
        conf[t, p] += 1
    return dict(top1=top1, top5=top5, loss=loss, confusion=conf)


def _table_loader(n: int, y: torch.Tensor, batch: int = 7):
    x = torch.zeros(n, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_metrics_match_independent_computation():
    g = torch.Generator().manual_seed(1)
    n, c = 53, 12
    logits = torch.randn(n, c, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    r = ev.evaluate(TableModel(logits), _table_loader(n, y))
    want = _independent_metrics(logits.numpy().astype(np.float64), y.numpy())
    assert r.n == n and r.topk == 5
    assert r.top1 == pytest.approx(want["top1"])
    assert r.top5 == pytest.approx(want["top5"])
    assert r.loss == pytest.approx(want["loss"], rel=1e-5)
    np.testing.assert_array_equal(r.confusion, want["confusion"])
    assert 0 < r.top1 < r.top5 < 100  # random logits: the check above is not vacuous
    rows = r.per_class([f"c{i}" for i in range(c)])
    assert sum(row["images"] for row in rows) == n
    for row in rows:
        assert row["accuracy"] == pytest.approx(100.0 * want["confusion"][row["index"], row["index"]] / row["images"])


def test_class_index_scores_only_the_kept_logits():
    g = torch.Generator().manual_seed(2)
    n = 40
    logits = torch.randn(n, 30, generator=g)
    keep = [29, 3, 17, 8, 11, 0]
    y = torch.randint(0, len(keep), (n,), generator=g)
    r = ev.evaluate(TableModel(logits), _table_loader(n, y), class_index=keep)
    want = _independent_metrics(logits[:, keep].numpy().astype(np.float64), y.numpy())
    assert r.top1 == pytest.approx(want["top1"]) and r.top5 == pytest.approx(want["top5"])
    assert r.loss == pytest.approx(want["loss"], rel=1e-5)
    assert r.confusion.shape == (6, 6)


def test_target_mapping():
    assert ev.target_mapping(["3", "7"], [str(i) for i in range(10)], 10) == ([3, 7], "by class name")
    wnids = ev.imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764"  # tench, class 0
    idx, how = ev.target_mapping([wnids[5], wnids[999]], ["tench"] * 1000, 1000)
    assert idx == [5, 999] and how == "by ImageNet wnid"
    assert ev.target_mapping(["b", "a"], [], 4) == ([0, 1], "by position (sorted folder names)")
    with pytest.raises(DataError, match="3 classes"):
        ev.target_mapping(["a", "b", "c"], ["x", "y"], 2)


def test_odd_and_broken_images(tmp_path):
    digit = np.arange(64, dtype=float).reshape(8, 8) / 4
    good = [save_image(digit, tmp_path / "a" / f"x.{ext}", mode) for ext, mode in
            [("png", "L"), ("bmp", "RGB"), ("tif", "P")]]
    good.append(save_image(digit, tmp_path / "b" / "rgba.png", "RGBA"))
    good.append(save_image(digit, tmp_path / "b" / "grey16.png", "I;16"))
    (tmp_path / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    png = (tmp_path / "a" / "x.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(png[: len(png) // 2])
    data = image_folder(tmp_path)
    assert data.class_names == ["a", "b"] and len(data.samples) == 7
    model = Constant(2)  # only the data path matters here
    loader = ev.eval_loader(data, ev.eval_transform(DATA_CONFIG), batch_size=3)
    ds = loader.dataset
    r = ev.evaluate(model, loader, num_classes=2)
    assert r.n == 5
    assert len(r.skipped) == 2
    assert any("corrupt.jpg" in s for s in r.skipped) and any("truncated.png" in s for s in r.skipped)
    assert all(ds[i][0].shape == (3, 28, 28) for i, (p, _) in enumerate(data.samples) if Path(p) in good)
    with pytest.raises(DataError, match=r"corrupt\.jpg|truncated\.png"):
        ev.evaluate(model, loader, num_classes=2, on_error="fail")


def test_empty_or_missing_data(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_dataset("folder", None, tmp_path / "nope")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="holds no images"):
        image_folder(tmp_path)


def _validate(argv: list[str]) -> int:
    return validate_command.run(validate_command.build_parser().parse_args(argv))


def test_validate_command_on_digits(tmp_path, capsys):
    ckpt = trained_digits_checkpoint()
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--data-dir", "digits", "--device", "cpu", "--workers", "0",
            "--batch-size", "100", "--confusion-matrix", "--output-dir", str(out)]
    assert _validate(argv) == 0
    res = json.loads((out / "validate.json").read_text())

    # The same number computed without the evaluator: model on independently preprocessed tensors.
    x, y = tensors("val")
    model = load_model(ckpt).model
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert res["images"] == len(y) == 360
    assert res["top1"] == pytest.approx(100.0 * (pred == y).float().mean().item())
    assert res["top1"] > 75  # really trained, so the other analyses below measure something
    assert res["top5"] >= res["top1"] and res["images_per_second"] > 0
    assert res["preprocessing"]["input_size"] == [3, 28, 28] and res["labels_matched"] == "by class name"
    per_class = {r["name"]: r for r in res["per_class"]}
    for d in range(10):
        mask = y == d
        assert per_class[str(d)]["images"] == int(mask.sum())
        assert per_class[str(d)]["accuracy"] == pytest.approx(100.0 * (pred[mask] == d).float().mean().item())
    assert len((out / "per_class.csv").read_text().splitlines()) == 11
    with Image.open(out / "confusion.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert "top-1 %" in capsys.readouterr().out


def test_validate_int8_keeps_digits_accuracy(tmp_path):
    """--quantize dynamic: LSTM and Linear weights in int8, top-1 on the 360 validation digits within 2 points
    of fp32 (the issue asks for int8's accuracy against fp32; the note reports the measured pair)."""
    ckpt = trained_digits_checkpoint()
    results = {}
    for quant in ([], ["--quantize", "dynamic"]):
        out = tmp_path / ("int8" if quant else "fp32")
        argv = ["--checkpoint", str(ckpt), "--data-dir", "digits", "--device", "cpu", "--workers", "0",
                "--output-dir", str(out), *quant]
        assert _validate(argv) == 0
        results[bool(quant)] = json.loads((out / "validate.json").read_text())
    fp32, int8 = results[False], results[True]
    assert int8["quantize"] == "dynamic" and fp32["quantize"] is None
    assert int8["images"] == fp32["images"] == 360
    assert int8["top1"] != pytest.approx(fp32["top1"], abs=0) or int8["loss"] != pytest.approx(fp32["loss"], rel=1e-7)
    assert abs(int8["top1"] - fp32["top1"]) <= 2.0, (int8["top1"], fp32["top1"])


def test_validate_command_on_image_folder(tmp_path):
    ckpt = trained_digits_checkpoint()
    files = digits_tree(tmp_path / "val", per_class=4)
    rgba = save_image(np.full((8, 8), 8.0), tmp_path / "val" / "3" / "rgba.png", "RGBA")
    (tmp_path / "val" / "5" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(tmp_path), "--split", "val", "--device", "cpu",
            "--workers", "0", "--output-dir", str(out)]
    assert _validate(argv) == 0
    res = json.loads((out / "validate.json").read_text())
    assert res["images"] == len(files) + 1 and res["skipped"] == 1
    assert res["skipped_images"][0].startswith(str(tmp_path / "val" / "5" / "broken.png"))

    model = load_model(ckpt).model
    tf = ev.eval_transform(DATA_CONFIG)
    paths = [*files, (rgba, 3)]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in paths])
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert res["top1"] == pytest.approx(100.0 * np.mean([int(p) == t for p, (_, t) in zip(pred, paths, strict=True)]))

    with pytest.raises(DataError, match="broken.png"):
        _validate([*argv, "--on-error", "fail"])


def test_amp_agrees_with_float32():
    loaded = load_model(trained_digits_checkpoint())
    x, y = tensors("val", limit=64)
    fp = ev.evaluate(loaded.model, [(x, y)], amp=False)
    bf = ev.evaluate(loaded.model, [(x, y)], amp=True)  # bfloat16 autocast on CPU
    assert bf.n == fp.n == 64 and abs(bf.top1 - fp.top1) <= 5.0


def test_timm_model_with_checkpoint(tmp_path):
    model = timm.create_model("test_resnet", num_classes=7)
    ckpt = tmp_path / "resnet.pth"
    torch.save({"model": model.state_dict(), "class_names": list("abcdefg")}, ckpt)
    loaded = load_any_model("test_resnet", ckpt)
    assert loaded.model.num_classes == 7 and loaded.class_names == list("abcdefg")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.eval()(x))
    assert loaded.data_config["input_size"] == model.pretrained_cfg["input_size"]
