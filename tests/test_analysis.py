"""seqvision.analysis: CE / mCE arithmetic, ImageNet-A/-R masks, resolution sweep, FGSM / PGD and ERF,
each command end to end on the real digits data or trees generated here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from analysis_helpers import DATA_CONFIG, TINY, digits_tree, save_image, tensors, trained_digits_checkpoint
from helpers import randomise
from PIL import Image
from torch import nn

from seqvision import create_model, ops
from seqvision import evaluate as ev
from seqvision.analysis import adversarial, erf, resolution, robustness
from seqvision.commands import adversarial as adversarial_command
from seqvision.commands import erf as erf_command
from seqvision.commands import resolution_sweep as resolution_command
from seqvision.commands import robustness as robustness_command
from seqvision.errors import DataError
from seqvision.inference import load_model


@pytest.fixture(autouse=True)
def _reference_engine():
    # The analysis code is engine-agnostic; the reference nn.LSTM path needs no compiled kernel.
    with ops.use_engine("reference"):
        yield


def _run(module, argv: list[str]) -> int:
    return module.run(module.build_parser().parse_args(argv))


def _common(tmp_path) -> list[str]:
    return ["--device", "cpu", "--workers", "0", "--output-dir", str(tmp_path / "out")]


def _accuracy(model: nn.Module, paths: list, transform=None) -> float:
    """Top-1 (%) computed directly: open each file, preprocess, one forward pass."""
    tf = transform or ev.eval_transform(DATA_CONFIG)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in paths])
    with torch.no_grad():
        pred = model(x).argmax(1)
    return 100.0 * float(np.mean([int(p) == t for p, (_, t) in zip(pred, paths, strict=True)]))


# -- ImageNet-C arithmetic -------------------------------------------------------------------------------
def test_ce_and_mce_by_hand():
    errors = {"gaussian_noise": [0.5, 0.6, 0.7, 0.8, 0.9], "brightness": [0.2, 0.3, 0.4, 0.5, 0.6]}
    r = robustness.corruption_errors(errors)
    # by hand: CE = 100 * mean error / AlexNet's error: 100 * 0.7 / 0.886428 and 100 * 0.4 / 0.564592
    assert r["per_corruption"]["gaussian_noise"]["ce"] == pytest.approx(78.96862464, abs=1e-6)
    assert r["per_corruption"]["brightness"]["ce"] == pytest.approx(70.84762094, abs=1e-6)
    assert r["mce"] == pytest.approx((78.96862464 + 70.84762094) / 2, abs=1e-6)
    assert r["mean_error"] == pytest.approx(55.0)
    assert r["complete"] is False

    # An error equal to AlexNet's on every corruption is CE 100 everywhere, mCE 100, and complete.
    same = {c: [e] * 5 for c, e in robustness.ALEXNET_ERRORS.items()}
    r = robustness.corruption_errors(same)
    assert r["complete"] is True and r["mce"] == pytest.approx(100.0)
    with pytest.raises(DataError, match="no AlexNet baseline"):
        robustness.corruption_errors({"speckle": [0.1]})


def test_alexnet_table():
    assert len(robustness.CORRUPTIONS) == 15
    # the published per-severity AlexNet errors on gaussian_noise average to the table's value
    assert np.mean([0.69528, 0.82542, 0.93554, 0.98138, 0.99452]) == pytest.approx(
        robustness.ALEXNET_ERRORS["gaussian_noise"]
    )
    assert all(0.5 < e < 1 for e in robustness.ALEXNET_ERRORS.values())


def test_imagenet_a_and_r_class_lists():
    wnids_1k = ev.imagenet_wnids()
    sets = {}
    for subset in ("imagenet-a", "imagenet-r"):
        wnids, indices = robustness.subset_classes(subset)
        assert len(wnids) == len(set(wnids)) == 200 and len(indices) == 200
        assert [wnids_1k[i] for i in indices] == list(wnids)  # each index names its wnid
        sets[subset] = set(wnids)
    assert sets["imagenet-a"] != sets["imagenet-r"]
    assert "n01498041" in sets["imagenet-a"]  # stingray, the first ImageNet-A class


def test_imagenet_c_end_to_end(tmp_path):
    ckpt = trained_digits_checkpoint()
    root = tmp_path / "imagenet-c"
    rng = np.random.default_rng(0)
    trees = {}
    for c, s, fn in [
        ("gaussian_noise", 1, lambda a: a + rng.normal(0, 1.0, a.shape)),
        ("gaussian_noise", 5, lambda a: a + rng.normal(0, 12.0, a.shape)),
        ("contrast", 2, lambda a: 8 + (a - 8) * 0.5),
    ]:
        trees[(c, s)] = digits_tree(root / c / str(s), per_class=6, transform=fn)
    argv = ["imagenet-c", "--checkpoint", str(ckpt), "--data-dir", str(root), *_common(tmp_path)]
    assert _run(robustness_command, argv) == 0
    res = json.loads((tmp_path / "out" / "imagenet-c.json").read_text())

    model = load_model(ckpt).model
    err = {k: 1 - _accuracy(model, v) / 100 for k, v in trees.items()}
    got = res["errors_by_severity"]
    assert got["gaussian_noise"]["1"] == pytest.approx(err[("gaussian_noise", 1)])
    assert got["gaussian_noise"]["5"] == pytest.approx(err[("gaussian_noise", 5)])
    assert got["contrast"]["2"] == pytest.approx(err[("contrast", 2)])
    assert err[("gaussian_noise", 5)] > err[("gaussian_noise", 1)]  # heavier noise, more errors
    ce_noise = 100 * (err[("gaussian_noise", 1)] + err[("gaussian_noise", 5)]) / 2 / 0.886428
    ce_contrast = 100 * err[("contrast", 2)] / 0.853204
    assert res["per_corruption"]["gaussian_noise"]["ce"] == pytest.approx(ce_noise)
    assert res["mce"] == pytest.approx((ce_noise + ce_contrast) / 2)
    assert res["complete"] is False and "fog/1" in res["missing"]
    assert res["crop_pct"] == 1.0
    rows = (tmp_path / "out" / "imagenet_c.csv").read_text().splitlines()
    assert rows[0].startswith("corruption,") and len(rows) == 3


def test_imagenet_a_masks_to_200_logits(tmp_path):
    wnids, indices = robustness.subset_classes("imagenet-a")
    outside = next(i for i in range(1000) if i not in set(indices))
    model = randomise(create_model("sequencer2d_s", num_classes=1000, **TINY), seed=3, std=0.02)
    with torch.no_grad():
        # The top logit overall belongs to a class outside ImageNet-A; among the 200 kept logits the top is
        # ImageNet-A class 0. Masked scoring is right on class-0 images only; unmasked is never right.
        model.head.fc.bias.zero_()
        model.head.fc.bias[outside] = 10.0
        model.head.fc.bias[indices[0]] = 5.0
    ckpt = tmp_path / "in1k.pth"
    torch.save(dict(model=model.state_dict(), model_name="sequencer2d_s", model_kwargs=TINY,
                    data_config=DATA_CONFIG), ckpt)
    rng = np.random.default_rng(1)
    paths = []
    for k in [0, 57, 199]:
        for j in range(4):
            arr = rng.uniform(0, 16, (8, 8))
            paths.append((save_image(arr, tmp_path / "a" / wnids[k] / f"{j}.png", "RGBA" if j == 0 else "L"), k))
    argv = ["imagenet-a", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "a"), *_common(tmp_path)]
    assert _run(robustness_command, argv) == 0
    res = json.loads((tmp_path / "out" / "imagenet-a.json").read_text())

    tf = ev.eval_transform(DATA_CONFIG)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in paths])
    with torch.no_grad():
        logits = model(x)
    pred = logits[:, list(indices)].argmax(1)  # position among the 200 ImageNet-A classes
    want = 100.0 * np.mean([int(p) == t for p, (_, t) in zip(pred, paths, strict=True)])
    unmasked = 100.0 * np.mean([int(i) == indices[t] for i, (_, t) in zip(logits.argmax(1), paths, strict=True)])
    assert res["images"] == 12 and res["top1"] == pytest.approx(want)
    assert want == pytest.approx(100 / 3) and unmasked == 0

    # ImageNet-Sketch (any 1000-class tree) is scored on all 1000 logits, classes matched by wnid
    argv_sketch = ["imagenet-sketch", *argv[1:]]
    assert _run(robustness_command, argv_sketch) == 0
    res = json.loads((tmp_path / "out" / "imagenet-sketch.json").read_text())
    assert res["images"] == 12 and res["top1"] == pytest.approx(unmasked)

    (tmp_path / "a" / "n00000000").mkdir()
    save_image(np.zeros((8, 8)), tmp_path / "a" / "n00000000" / "x.png")
    with pytest.raises(DataError, match="not imagenet-a classes"):
        _run(robustness_command, argv)


# -- resolution sweep ------------------------------------------------------------------------------------
def test_sweep_sizes():
    assert resolution.sweep_sizes(224) == [112, 168, 224, 280, 336, 392, 448]
    assert resolution.sweep_sizes(28, (0.25, 0.5, 1.0, 2.0), min_size=14) == [14, 28, 56]


def test_resolution_sweep_command(tmp_path):
    ckpt = trained_digits_checkpoint()
    argv = ["--checkpoint", str(ckpt), "--data-dir", "digits", "--scales", "0.25", "0.5", "1", "2",
            "--max-images", "120", "--batch-size", "120", "--compare", "test_resnet", *_common(tmp_path)]
    with pytest.warns(UserWarning, match="test_resnet has random weights"):
        assert _run(resolution_command, argv) == 0
    out = tmp_path / "out"
    res = json.loads((out / "resolution.json").read_text())
    ours = {r["size"]: r for r in res["rows"] if r["model"] == "sequencer2d_s"}
    assert sorted(ours) == [14, 28, 56]  # 7 px is below the 14 px this model needs: dropped
    theirs = {r["size"]: r for r in res["rows"] if r["model"] == "test_resnet"}
    assert sorted(theirs) == [7, 14, 28, 56]  # the same sizes (a ResNet takes 7 px), scaled to its own 160
    assert theirs[56]["scale"] == pytest.approx(56 / 160) and all(r["images"] == 120 for r in theirs.values())

    # at the training size the sweep reproduces validate's number, computed independently here
    x, y = tensors("val")
    x, y = x[::3], y[::3]  # --max-images 120 of 360: every third image
    with torch.no_grad():
        pred = load_model(ckpt).model(x).argmax(1)
    assert ours[28]["top1"] == pytest.approx(100.0 * (pred == y).float().mean().item())
    assert ours[28]["scale"] == 1.0 and ours[56]["scale"] == 2.0
    assert len(set(round(r["top1"], 6) for r in ours.values())) > 1  # the size really changed the input
    assert len((out / "resolution.csv").read_text().splitlines()) == 1 + 3 + 4
    with Image.open(out / "resolution.png") as im:
        assert im.format == "PNG"


# -- adversarial -----------------------------------------------------------------------------------------
def test_fgsm_direction_on_a_linear_model():
    # two-class linear model: d CE / dx has the sign of (w_other - w_true), so FGSM moves x by exactly that
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    x = torch.full((3, 3, 2, 2), 0.5)
    y = torch.tensor([0, 1, 0])
    adv = adversarial.fgsm(lin, x, y, eps=0.1)
    w = lin[1].weight.detach()
    for i, t in enumerate(y):
        expected = 0.5 + 0.1 * torch.sign(w[1 - t] - w[t]).view(3, 2, 2)
        torch.testing.assert_close(adv[i], expected)


def test_pgd_stays_in_the_eps_ball():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(8, 3, 2, 2)
    y = torch.randint(0, 3, (8,))
    adv = adversarial.pgd(lin, x, y, eps=0.05, steps=10, step_size=0.02, random_start=True)
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        loss = nn.functional.cross_entropy
        assert loss(lin(adv), y) > loss(lin(x), y)  # the attack increased the loss


def test_attacks_on_trained_model(tmp_path):
    loaded = load_model(trained_digits_checkpoint())
    model = adversarial.Normalized(loaded.model, DATA_CONFIG["mean"], DATA_CONFIG["std"]).eval()
    x, y = tensors("val", limit=96)
    x01 = x * 0.5 + 0.5  # undo the test's normalisation: attacks work in [0, 1] pixels
    with torch.no_grad():
        clean = model(x01).argmax(1)
        torch.testing.assert_close(model(x01), loaded.model(x))
    strong = adversarial.robust_accuracy(model, [(x01, y)], eps=8 / 255, steps=5, step_size=2 / 255)
    assert strong["changed_predictions"]["fgsm"] > 0
    assert strong["accuracy"]["pgd"] <= strong["accuracy"]["clean"]
    assert strong["accuracy"]["fgsm"] < strong["accuracy"]["clean"]
    assert strong["accuracy"]["clean"] == pytest.approx(100.0 * (clean == y).float().mean().item())
    assert strong["max_linf"]["pgd"] <= 8 / 255 + 1e-6
    assert not any(m.training for m in model.modules())  # rnn_grad_mode put the LSTMs back in eval mode

    argv = ["--checkpoint", str(trained_digits_checkpoint()), "--data-dir", "digits", "--max-images", "96",
            "--batch-size", "48", *_common(tmp_path)]
    assert _run(adversarial_command, argv) == 0
    res = json.loads((tmp_path / "out" / "adversarial.json").read_text())
    assert res["eps"] == pytest.approx(1 / 255) and res["steps"] == 5 and res["step_size"] == pytest.approx(0.5 / 255)
    assert res["images"] == 96
    assert res["accuracy"]["pgd"] <= res["accuracy"]["clean"]
    x, y = tensors("val")
    every = [i * len(y) // 96 for i in range(96)]  # --max-images: evenly spaced
    with torch.no_grad():
        want = (loaded.model(x[every]).argmax(1) == y[every]).float().mean().item()
    assert res["accuracy"]["clean"] == pytest.approx(100.0 * want)
    assert res["max_linf"]["pgd"] <= 1 / 255 + 1e-6
    assert len((tmp_path / "out" / "adversarial.csv").read_text().splitlines()) == 4


# -- effective receptive field ---------------------------------------------------------------------------
def test_erf_exact_for_average_pooling():
    # centre (3, 3) of a 3x3 mean filter depends on its 3x3 neighbourhood with weight 1/9 per image and channel
    model = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1))
    x = [torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    raw, info = erf.effective_receptive_field(model, x, ["0"], layout="NCHW")
    want = np.zeros((8, 8))
    want[2:5, 2:5] = 6 * 3 / 9
    np.testing.assert_allclose(raw["0"], want, rtol=1e-6)
    assert info["0"]["centre"] == [3, 3]
    np.testing.assert_allclose(erf.log_maps(raw)["0"], np.log10(want + 1))


def test_erf_of_a_sequencer_block_is_a_cross():
    # Up to stage 1, a token mixes only with its row and column (BiLSTM2D); everything else is per token.
    model = randomise(create_model("sequencer2d_s", num_classes=10, **TINY), seed=0, std=0.2)
    x = [torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))]
    layers = ["stages.0", "stages.1", "stages.3"]
    raw, info = erf.effective_receptive_field(model, x, layers)
    assert info["stages.0"]["feature_shape"] == [8, 8, 16] and info["stages.0"]["centre"] == [3, 3]
    band = np.zeros((56, 56), dtype=bool)
    band[21:28, :] = band[:, 21:28] = True  # token (3, 3) covers pixels 21..27
    m = raw["stages.0"]
    assert (m[~band] == 0).all() and (m[band] > 0).mean() > 0.9
    peak = np.unravel_index(np.argmax(m), m.shape)
    assert 21 <= peak[0] < 28 and 21 <= peak[1] < 28  # the token's own patch (the residual path) dominates
    assert (raw["stages.3"] > 0).mean() > (m > 0).mean()  # deeper layers see more of the image

    scaled = erf.shared_minmax(erf.log_maps(raw))
    assert min(s.min() for s in scaled.values()) == 0 and max(s.max() for s in scaled.values()) == 1
    logs = erf.log_maps(raw)
    top = max(logs, key=lambda n: logs[n].max())
    low = min(logs, key=lambda n: logs[n].max())
    assert scaled[top].max() == 1 and scaled[low].max() < 1  # one scale for all, not one per layer


def test_erf_timm_model_default_layers():
    model = timm.create_model("test_resnet", num_classes=5).eval()
    layers = erf.default_layers(model)
    assert layers and layers[0] in dict(model.named_modules())
    raw, info = erf.effective_receptive_field(model, [torch.randn(2, 3, 64, 64)], layers[:2])
    for n in layers[:2]:
        assert raw[n].shape == (64, 64) and raw[n].max() > 0
        assert (raw[n] == 0).any()  # a CNN's early stage sees only part of the image


def test_erf_command(tmp_path):
    argv = ["--checkpoint", str(trained_digits_checkpoint()), "--data-dir", "digits", "--max-images", "16",
            "--batch-size", "8", "--img-size", "56", *_common(tmp_path)]
    assert _run(erf_command, argv) == 0
    out = tmp_path / "out"
    res = json.loads((out / "erf.json").read_text())
    assert [r["layer"] for r in res["layers"]] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert res["images"] == 16 and res["input_size"] == 56
    maps = np.load(out / "erf.npz")
    assert maps["stages.0"].shape == (56, 56)
    for name in ("erf.png", "erf_stages_0.png", "erf_stages_3.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    assert max(r["scaled_max"] for r in res["layers"]) == pytest.approx(1.0)
