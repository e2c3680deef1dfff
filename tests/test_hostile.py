"""Hostile and odd input: every file a user can hand seqvision gets a right answer or a one-line error, never a
hang or a traceback. Images (bombs, lying headers, FIFOs, EXIF, 16-bit and float files, transparency,
undecodable names), checkpoints (lying metadata, malicious pickles, broken files) and command-line values.

Each command-line case checks the exit code, that the error is one line with no traceback, and that the good
files of a batch were still processed. Models are tiny and images 16 px, so the module stays fast.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from train_helpers import TINY, subprocess_env, tiny_set_args

import seqvision
from seqvision import ops
from seqvision.checkpoint_meta import parse_metadata
from seqvision.cli import main
from seqvision.errors import CheckpointError, DataError
from seqvision.images import display_path, max_image_pixels, open_image, to_rgb
from seqvision.inference import load_model
from seqvision.weights import save_weights

KWARGS = TINY["model_kwargs"]
CLASSES = ["ant", "bee", "cat"]
DATA_CONFIG = {
    "input_size": [3, 16, 16],
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 1.0,
    "crop_mode": "center",
}


# -- helpers ---------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _reference_engine():
    """The reference BiLSTM2D engine: these tests are about input, and it needs no compiled extension."""
    with ops.use_engine("reference"):
        yield


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = seqvision.create_model("sequencer2d_s", num_classes=len(CLASSES), **KWARGS)
    with torch.no_grad():  # a random head, so that different inputs get clearly different outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model_and_ckpt(tmp_path_factory):
    """A tiny 3-class model and its seqvision checkpoint with true metadata."""
    model = _tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    info = {"model_kwargs": KWARGS, "class_names": CLASSES, "data_config": DATA_CONFIG}
    save_weights(model, path, info=info)
    return model, path


@pytest.fixture(scope="module")
def ckpt(model_and_ckpt) -> Path:
    return model_and_ckpt[1]


def _pattern(size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png(path: Path, seed: int = 0) -> Path:
    Image.fromarray(_pattern(seed=seed)).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bytes(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A real decompression bomb: a valid 20000 x 20000 1-bit PNG of ~50 kB (400 M pixels, 1.2 GB as RGB)."""
    side = 20000
    row = b"\x00" + bytes(side // 8)  # filter byte + one row of black pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_png_bytes(side, side, 1, 0, idat))
    return path


def _one_line_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _run_cli(argv: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seqvision", *argv],
        env={**subprocess_env(), "SEQVISION_ENGINE": "reference", **env},
        capture_output=True,
        timeout=timeout,
    )


# -- images: opening ---------------------------------------------------------------------------------------------
def test_decompression_bomb_is_refused_from_the_header(bomb):
    with pytest.raises(DataError) as e:
        open_image(bomb)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(bomb))
    # Pillow's own guard answers first above twice its limit: the count, not the sides, is known then.
    assert f"400,000,000 pixels, over the limit of {Image.MAX_IMAGE_PIXELS:,}" in msg
    assert "SEQVISION_MAX_IMAGE_PIXELS=400000000" in msg


def test_header_that_lies_about_its_size(tmp_path):
    # 10000 x 10000 claimed (between Pillow's limit and twice it, where Pillow would only warn), a few bytes of
    # pixel data: refused from the header, nothing decoded.
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_bytes(10000, 10000, 8, 2, zlib.compress(b"\x00" * 100)))
    with pytest.raises(DataError, match=r"huge\.png: image is 10000x10000 = 100,000,000 pixels, over the limit of"):
        open_image(huge)
    # Within the limit, with half the pixel data the header promises: a truncated file, by path.
    full = zlib.compress(b"\x00" * 3001 * 3000)
    short = tmp_path / "short.png"
    short.write_bytes(_png_bytes(3000, 3000, 8, 0, full[: len(full) // 2]))
    with pytest.raises(DataError, match=r"short\.png: cannot read image"):
        open_image(short)


def test_extreme_aspect_ratio_is_refused(tmp_path):
    # 60,000 pixels, far under the limit, but the resize of its short side to 256 px would make 3.9 G pixels.
    strip = tmp_path / "strip.png"
    strip.write_bytes(_png_bytes(60000, 1, 8, 0, zlib.compress(b"\x00" * 60001)))
    with pytest.raises(DataError, match=r"strip\.png: image is 60000x1: empty or longer than 100:1"):
        open_image(strip)
    Image.fromarray(np.zeros((1, 100), np.uint8)).save(tmp_path / "ok.png")
    assert open_image(tmp_path / "ok.png").size == (100, 1)


def test_pixel_limit_from_the_environment(tmp_path, monkeypatch):
    img = _png(tmp_path / "a.png")
    monkeypatch.setenv("SEQVISION_MAX_IMAGE_PIXELS", "255")
    assert max_image_pixels() == 255
    with pytest.raises(DataError, match=r"16x16 = 256 pixels, over the limit of 255.*SEQVISION_MAX_IMAGE_PIXELS=256"):
        open_image(img)
    monkeypatch.setenv("SEQVISION_MAX_IMAGE_PIXELS", "256")
    assert open_image(img).size == (16, 16)
    monkeypatch.setenv("SEQVISION_MAX_IMAGE_PIXELS", "0")
    assert max_image_pixels() is None
    monkeypatch.setenv("SEQVISION_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match="SEQVISION_MAX_IMAGE_PIXELS must be a pixel count"):
        open_image(img)


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: it must not be opened
    with pytest.raises(DataError, match=r"pipe\.png: is a named pipe \(FIFO\), not a regular file"):
        open_image(fifo)
    with pytest.raises(DataError, match="is a directory"):
        open_image(tmp_path)
    with pytest.raises(DataError, match="is a device"):
        open_image("/dev/zero")
    with pytest.raises(DataError, match=r"nope\.png: cannot read image \(No such file"):
        open_image(tmp_path / "nope.png")
    link = tmp_path / "link.png"
    link.symlink_to(_png(tmp_path / "real.png"))
    assert open_image(link).size == (16, 16)  # a link to a regular file is read


def test_truncated_and_corrupt_files_are_refused_by_path(tmp_path):
    for ext in ("png", "jpg"):
        buf = io.BytesIO()
        Image.fromarray(_pattern(64)).save(buf, format="PNG" if ext == "png" else "JPEG")
        bad = tmp_path / f"cut.{ext}"
        bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(DataError, match=rf"cut\.{ext}: cannot read image \(image file is truncated"):
            open_image(bad)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png: cannot read image \(not in an image format"):
        open_image(text)


def _exif_rotated_jpeg(path: Path, displayed: np.ndarray) -> None:
    """Store ``displayed`` rotated 90 degrees counter-clockwise with EXIF orientation 6 ("rotate 90 clockwise
    to display"), as a camera held sideways does."""
    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=100, subsampling=0, exif=exif.tobytes())


def test_exif_orientation_is_applied(tmp_path, model_and_ckpt):
    # What the viewer shows: a bright top half over a dark bottom half, in 8 x 8 blocks JPEG keeps well.
    displayed = np.zeros((16, 16, 3), np.uint8)
    displayed[:8] = (230, 200, 40)
    displayed[8:, :8] = (20, 90, 200)
    path = tmp_path / "sideways.jpg"
    _exif_rotated_jpeg(path, displayed)
    stored = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(stored - np.rot90(displayed)).max() <= 8  # the file holds the sideways pixels
    seen = np.asarray(open_image(path)).astype(int)
    assert np.abs(seen - displayed).max() <= 8  # JPEG rounding only

    # The prediction is that of the upright image, not that of the stored pixels.
    model, ckpt = model_and_ckpt
    loaded = load_model(ckpt)
    from timm.data import create_transform

    tf = create_transform(**loaded.data_config)
    with torch.no_grad():
        got = model(tf(open_image(path))[None]).softmax(-1)
        upright = model(tf(Image.fromarray(displayed))[None]).softmax(-1)
        stored = model(tf(Image.open(path).convert("RGB"))[None]).softmax(-1)
    assert (got - upright).abs().max() < 0.02
    assert (stored - upright).abs().max() > 5 * (got - upright).abs().max()


def test_16_bit_grey_png_is_scaled_like_its_8_bit_version(tmp_path):
    grey8 = _pattern()[..., 0]
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 255 -> 65535
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.array_equal(np.asarray(open_image(tmp_path / "g16.png")), np.asarray(open_image(tmp_path / "g8.png")))
    # Values between the 8-bit steps round to the nearest one.
    v16 = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16) + 100
    Image.fromarray(v16).save(tmp_path / "odd.png")
    want = np.floor(v16.astype(float) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(open_image(tmp_path / "odd.png"))[..., 1], want)
    # A 32-bit integer image outside 0..65535 has no agreed scale.
    big = Image.fromarray(np.full((4, 4), 70000, np.int32))
    with pytest.raises(DataError, match="16-bit image with values from 70000 to 70000, outside 0..65535"):
        to_rgb(big, "big.tif")


def test_float_tiff_is_scaled_like_its_8_bit_version(tmp_path):
    grey8 = _pattern()[..., 1]
    Image.fromarray(grey8.astype(np.float32) / 255).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert np.array_equal(np.asarray(open_image(tmp_path / "f.tif"))[..., 0], grey8)
    for name, values in (("range", grey8.astype(np.float32)), ("nan", np.full((4, 4), np.nan, np.float32))):
        Image.fromarray(values).save(tmp_path / f"{name}.tif")
        with pytest.raises(DataError, match=rf"{name}\.tif: floating-point image .* no agreed way to scale"):
            open_image(tmp_path / f"{name}.tif")


def test_transparency_palette_and_cmyk(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # transparent: white, whatever colour hides under it
    rgba[0, 1] = (10, 20, 30, 255)  # opaque: its colour
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white
    Image.fromarray(rgba).save(tmp_path / "a.png")
    got = np.asarray(open_image(tmp_path / "a.png"))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [10, 20, 30]
    assert abs(int(got[1, 0, 0]) - 127) <= 1

    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), mode="LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [50, 50, 50]]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1])
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(open_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [200, 100, 50]]]

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])  # no ink: white; full cyan: (0, 255, 255)
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert np.abs(np.asarray(open_image(tmp_path / "c.jpg")).astype(int) - [[255, 255, 255], [0, 255, 255]]).max() < 8


def test_display_path_is_printable_anywhere():
    assert display_path(b"caf\xe9.png") == "caf\\xe9.png"  # not UTF-8: the byte, escaped
    assert display_path("café.png") == "café.png"
    assert display_path("a\nb.png") == "a\\nb.png"  # one line whatever the name


# -- images: commands ------------------------------------------------------------------------------------------
def test_predict_batch_with_a_bomb_predicts_the_others(tmp_path, ckpt, bomb, capsys):
    good = [_png(tmp_path / "one.png", 1), _png(tmp_path / "two.png", 2)]
    assert main(["predict", str(good[0]), str(bomb), str(good[1]), "--checkpoint", str(ckpt)]) == 0
    out, err = capsys.readouterr()
    _one_line_error(err, f"skipped {bomb}: image has 400,000,000 pixels", "SEQVISION_MAX_IMAGE_PIXELS=")
    assert [line.split(":")[0] for line in out.strip().splitlines()] == [str(p) for p in good]

    # Alone, the bomb is the one error line, with exit code 2.
    assert main(["predict", str(bomb), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, f"seqvision predict: error: no image could be predicted: {bomb}: ", "over the limit of")


def _folder(root: Path, per_class: int = 2) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _png(root / name / f"{i}.png", 10 * c + i)
    return root


def test_validate_skips_a_bomb_and_evaluates_the_rest(tmp_path, ckpt, bomb, capsys):
    data = _folder(tmp_path / "val")
    os.link(bomb, data / "bee" / "bomb.png")
    out_dir = tmp_path / "out"
    argv = ["validate", "--checkpoint", str(ckpt), "--data-dir", str(data), "--workers", "0"]
    assert main([*argv, "--output-dir", str(out_dir)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"skipped {data / 'bee' / 'bomb.png'}: image has 400,000,000 pixels") and len(err) == 2
    summary = json.loads((out_dir / "validate.json").read_text())
    assert summary["images"] == 6 and summary["skipped"] == 1


def test_torchvision_image_sets_read_through_open_image(tmp_path, bomb, monkeypatch):
    # Flowers102's layout with made-up split files (torchvision checks their md5, which is patched out here).
    from scipy.io import savemat
    from torchvision.datasets import Flowers102

    from seqvision.data import ImageDataset, open_dataset

    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    for i in (1, 2, 3):
        Image.fromarray(_pattern(seed=i)).save(base / "jpg" / f"image_{i:05d}.jpg")
    (base / "jpg" / "image_00004.jpg").write_bytes(bomb.read_bytes())
    savemat(base / "setid.mat", {"trnid": [1, 2], "valid": [1, 3], "tstid": [3, 4]})
    savemat(base / "imagelabels.mat", {"labels": [1, 2, 1, 2]})
    monkeypatch.setattr(Flowers102, "_check_integrity", lambda self: True)
    val = ImageDataset(open_dataset("flowers102", "val", tmp_path).samples)
    img, target, problem = val[0]
    assert img.size == (16, 16) and target == 0 and problem == ""
    img, _, problem = val[1]  # the bomb, named by path, refused by the pixel limit
    assert img is None and str(base / "jpg" / "image_00004.jpg") in problem and "over the limit" in problem


def _unreadable_folder(data: Path) -> Path:
    for name in CLASSES:
        (data / name).mkdir(parents=True)
        (data / name / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return data


@pytest.mark.parametrize(
    "command", [["validate"], ["robustness", "folder"], ["adversarial", "--steps", "1"], ["erf"], ["resolution-sweep"]]
)
def test_folder_of_only_unreadable_images_is_named(command, tmp_path, ckpt, capsys):
    data = _unreadable_folder(tmp_path / "val")
    argv = [*command, "--checkpoint", str(ckpt), "--data-dir", str(data), "--workers", "0"]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    _one_line_error(capsys.readouterr().err, f"no image in {data} could be ", "(3 unreadable; the first: ")


def test_predict_folder_of_only_unreadable_images_is_named(tmp_path, ckpt, capsys):
    data = _unreadable_folder(tmp_path / "val")
    assert main(["predict", str(data), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith(f"skipped {data}/") for line in err[:3])
    assert err[3] == f"seqvision predict: error: no image could be predicted from {data} (3 skipped)"


def test_fifo_in_an_image_folder_does_not_hang_predict(tmp_path, ckpt):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "a.png")
    os.mkfifo(folder / "b.png")
    # In a child process with a time limit: a regression blocks in open() and fails here instead of hanging.
    r = _run_cli(["predict", str(folder), "--checkpoint", str(ckpt)], timeout=240)
    assert r.returncode == 0, r.stderr
    _one_line_error(r.stderr.decode(), f"skipped {folder / 'b.png'}: is a named pipe (FIFO)")
    assert r.stdout.decode().startswith(f"{folder / 'a.png'}: ")


def test_undecodable_file_name_under_an_ascii_locale(tmp_path, ckpt):
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    _png(folder / name)
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes(b"junk")
    argv = ["predict", str(folder), "--checkpoint", str(ckpt)]
    r = _run_cli(argv, LC_ALL="C", LANG="C", PYTHONIOENCODING="ascii")
    assert r.returncode == 0, r.stderr
    _one_line_error(r.stderr.decode("ascii"), f"skipped {folder}/bad\\xff.png: cannot read image")
    assert r.stdout.decode("ascii").startswith(f"{folder}/caf\\xe9.png: ")
    r = _run_cli([*argv, "--json"], LC_ALL="C", LANG="C", PYTHONIOENCODING="ascii")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["predictions"]


# -- checkpoint metadata ---------------------------------------------------------------------------------------
def _lying(tmp_path: Path, model: torch.nn.Module, **fields: str) -> Path:
    """A seqvision .safetensors of ``model`` whose metadata fields are replaced by ``fields`` (raw text)."""
    meta = {
        "format": "pt",
        "layout": "timm",
        "model_name": "sequencer2d_s",
        "model_kwargs": json.dumps(KWARGS),
        "class_names": json.dumps(CLASSES),
        "data_config": json.dumps(DATA_CONFIG),
    }
    meta.update(fields)
    path = tmp_path / "lying.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def _kwargs(**change) -> str:
    return json.dumps({**KWARGS, **change})


def _config(**change) -> str:
    return json.dumps({**DATA_CONFIG, **change})


LIES = {
    "model_kwargs not a mapping": ({"model_kwargs": "[1, 2]"}, "model_kwargs must be a mapping"),
    "absurd width": ({"model_kwargs": _kwargs(embed_dims=[16, 32, 32, 10**9])}, "model_kwargs.embed_dims[3] must be"),
    "wrong type": ({"model_kwargs": _kwargs(layers="abc")}, "model_kwargs.layers must be a list"),
    "bool as a count": ({"model_kwargs": _kwargs(layers=[True, 1, 1, 1])}, "model_kwargs.layers[0] must be"),
    "unknown argument": ({"model_kwargs": _kwargs(bogus=1)}, "model_kwargs.bogus is not a known field"),
    "redirect to another file": (
        {"model_kwargs": _kwargs(checkpoint_path="/etc/passwd")},
        "model_kwargs.checkpoint_path would load another file",
    ),
    "asks for a download": ({"model_kwargs": _kwargs(pretrained=True)}, "model_kwargs.pretrained would download"),
    "not JSON": ({"model_kwargs": "{layers: 1"}, "model_kwargs is not valid JSON"),
    "nested too deeply": ({"class_names": "[" * 100000 + "]" * 100000}, "class_names is JSON nested too deeply"),
    "class_names a string": ({"class_names": json.dumps("ant bee cat")}, "class_names must be a list of names"),
    "class_names shorter than the head": (
        {"class_names": json.dumps(CLASSES[:2])},
        "class_names lists 2 names but the tensors hold a 3-class",
    ),
    "class name with a newline": ({"class_names": json.dumps(["a\nb", "b", "c"])}, "class_names[0] must be printable"),
    "huge data_config": ({"data_config": _config(x="y" * 100000)}, "data_config is 100,"),
    "unknown data_config key": ({"data_config": _config(shell="rm")}, "data_config.shell is not a known field"),
    "absurd input size": ({"data_config": _config(input_size=[3, 100000, 9])}, "data_config.input_size[1] must be"),
    "crop_pct near zero": ({"data_config": _config(crop_pct=0.0001)}, "data_config.crop_pct must be"),
    "mean for 4 channels": ({"data_config": _config(mean=[0.5] * 4)}, "data_config.mean has 4 values"),
    "channels against the stem": (
        {"data_config": _config(input_size=[1, 16, 16], mean=[0.5], std=[0.5])},
        "data_config.input_size has 1 channels but the stem takes 3",
    ),
    "unknown variant": ({"model_name": "sequencer9000"}, "model_name 'sequencer9000' is neither a registered variant"),
    "another variant": ({"model_name": "gru_sequencer2d_s"}, "model_name does not match the tensors (gru_sequencer2d"),
    "a variant that cannot be built with these arguments": (
        {"model_name": "v_sequencer_s"},
        "model_name does not describe a model that can be built (v_sequencer_s",
    ),
    "kwargs against the tensors": (
        {"model_kwargs": _kwargs(hidden_sizes=[4, 8, 8, 16])},
        "model_kwargs does not match the tensors",
    ),
    "num_classes against the head": (
        {"model_kwargs": _kwargs(num_classes=5)},
        "model_kwargs.num_classes is 5 but the tensors hold a 3-class",
    ),
    "epoch not a number": ({"epoch": "soon"}, "epoch must be a whole number"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_lying_metadata_is_one_line_naming_the_field(case, tmp_path, model_and_ckpt, capsys):
    fields, expected = LIES[case]
    path = _lying(tmp_path, model_and_ckpt[0], **fields)
    img = _png(tmp_path / "a.png")
    assert main(["predict", str(img), "--checkpoint", str(path)]) == 2
    _one_line_error(capsys.readouterr().err, f"seqvision predict: error: {path}: checkpoint metadata {expected}")
    with pytest.raises(CheckpointError, match="checkpoint metadata"):
        load_model(path)


def test_true_metadata_loads_and_predicts(tmp_path, model_and_ckpt, capsys):
    model, ckpt = model_and_ckpt
    loaded = load_model(ckpt)
    assert loaded.class_names == CLASSES and loaded.data_config["input_size"] == (3, 16, 16)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    # The same file with its metadata rewritten field by field by _lying: accepted as it is true.
    assert main(["predict", str(_png(tmp_path / "a.png")), "--checkpoint", str(_lying(tmp_path, model))]) == 0
    assert capsys.readouterr().out.split(": ")[1].split(" ")[0] in CLASSES


def test_model_kwargs_schema_is_every_sequencer_argument():
    import inspect

    from seqvision.checkpoint_meta import MODEL_KWARGS
    from seqvision.models import VARIANTS, Sequencer

    assert set(MODEL_KWARGS) == set(inspect.signature(Sequencer.__init__).parameters) - {"self"}
    for name, cfg in VARIANTS.items():  # every registered variant's arguments pass the checks
        assert parse_metadata({"model_name": name, "model_kwargs": dict(cfg)}, name).model_kwargs


def test_lying_training_checkpoint_and_convert(tmp_path, model_and_ckpt, capsys):
    model = model_and_ckpt[0]
    pth = tmp_path / "best.pth"
    torch.save({"model": model.state_dict(), "model_name": "sequencer2d_s", "model_kwargs": [1, 2]}, pth)
    assert main(["predict", str(_png(tmp_path / "a.png")), "--checkpoint", str(pth)]) == 2
    _one_line_error(capsys.readouterr().err, f"{pth}: checkpoint metadata model_kwargs must be a mapping")
    # convert does not pass metadata on that contradicts the tensors
    lie = _lying(tmp_path, model, class_names=json.dumps(CLASSES + ["dog"]))
    assert main(["convert", str(lie), str(tmp_path / "out.safetensors")]) == 2
    _one_line_error(capsys.readouterr().err, "class_names lists 4 names")
    assert not (tmp_path / "out.safetensors").exists()


def test_parse_metadata_types_training_checkpoint_values():
    meta = parse_metadata(
        {"model_name": "sequencer2d_s", "model_kwargs": dict(KWARGS), "class_names": CLASSES, "epoch": 3}, "x.pth"
    )
    assert meta.model_kwargs["layers"] == [1, 1, 1, 1] and meta.epoch == 3 and meta.describes_model
    assert meta.to_info()["class_names"] == CLASSES
    with pytest.raises(CheckpointError, match="x.pth: checkpoint metadata epoch must be a whole number"):
        parse_metadata({"epoch": -1}, "x.pth")


# -- malicious pickles and broken checkpoints, at every entry point ------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(params=["zip", "legacy", "raw-pickle"])
def evil(request, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {"stem.proj.weight": torch.zeros(1)}, "x": _Payload(marker)}
    if request.param == "zip":
        torch.save(obj, path)
    elif request.param == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    assert not marker.exists()
    return path, marker


ENTRY_POINTS = {
    "predict": lambda p, t: ["predict", str(_png(t / "a.png")), "--checkpoint", str(p)],
    "validate": lambda p, t: ["validate", "--checkpoint", str(p), "--data-dir", "digits", "--workers", "0"],
    "convert": lambda p, t: ["convert", str(p), str(t / "out.safetensors")],
    "export": lambda p, t: ["export", str(t / "m.pt2"), "--format", "torch-export", "--checkpoint", str(p)],
    "train --finetune": lambda p, t: [
        "train", "--output", str(t / "run"), "--finetune", str(p), *tiny_set_args(), "--set", "engine=reference",
    ],
}  # fmt: skip


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_malicious_pickle_runs_no_code(entry, evil, tmp_path, capsys):
    path, marker = evil
    assert main(ENTRY_POINTS[entry](path, tmp_path)) == 2
    _one_line_error(capsys.readouterr().err, str(path))
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    with pytest.raises(CheckpointError):
        seqvision.create_model("sequencer2d_s", checkpoint_path=path, **KWARGS)
    assert not marker.exists()


def test_broken_checkpoints_are_one_line(tmp_path, ckpt, capsys):
    img = str(_png(tmp_path / "a.png"))
    data = ckpt.read_bytes()
    cases = {
        "empty.pth": (b"", "is empty (0 bytes)"),
        "cut.safetensors": (data[: len(data) // 2], "truncated or corrupt safetensors file"),
        "notes.pth": (b"these are my notes\n", "not a checkpoint"),
    }
    buf = io.BytesIO()
    torch.save(_tiny_model().state_dict(), buf)
    cases["cut.pth"] = (buf.getvalue()[: len(buf.getvalue()) // 2], "truncated or corrupt checkpoint")
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert main(["predict", img, "--checkpoint", str(tmp_path / name)]) == 2, name
        _one_line_error(capsys.readouterr().err, str(tmp_path / name), expected)
    # A bare file of one variant given as another: names both.
    bare = tmp_path / "bare.pth"
    torch.save(_tiny_model().state_dict(), bare)
    assert main(["predict", img, "--checkpoint", str(bare), "--model", "gru_sequencer2d_s"]) == 2
    _one_line_error(capsys.readouterr().err, f"{bare} does not fit gru_sequencer2d_s")


# -- command-line values -----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_predict_on_a_missing_device_is_one_line(tmp_path, ckpt, capsys):
    img = str(_png(tmp_path / "a.png"))
    assert main(["predict", img, "--checkpoint", str(ckpt), "--device", "cuda"]) == 2
    _one_line_error(capsys.readouterr().err, "device cuda was asked for but cuda is not available here")
    assert main(["predict", img, "--checkpoint", str(ckpt), "--device", "banana"]) == 2
    _one_line_error(capsys.readouterr().err, "unknown device 'banana'")


def test_validate_timm_model_with_a_seqvision_checkpoint(ckpt, capsys):
    argv = ["validate", "--model", "resnet18", "--checkpoint", str(ckpt), "--data-dir", "digits", "--workers", "0"]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, f"{ckpt} does not fit resnet18", "leave out --model")


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "--data-dir", "digits", "--img-size", "100000"],
        ["validate", "--data-dir", "digits", "--crop-pct", "0.001"],
        ["export", "m.onnx", "--format", "onnx", "--img-size", "100000"],
        ["resolution-sweep", "--data-dir", "digits", "--sizes", "224", "100000"],
        ["robustness", "folder", "--data-dir", "digits", "--img-size", "100000"],
        ["adversarial", "--data-dir", "digits", "--img-size", "100000"],
        ["erf", "--data-dir", "digits", "--img-size", "100000"],
    ],
)
def test_absurd_sizes_are_refused_while_parsing(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"seqvision {argv[0]}: error: argument ") and "must be" in err
    assert "Traceback" not in err


def test_scales_past_the_size_limit_are_one_line(tmp_path, ckpt, capsys):
    argv = ["resolution-sweep", "--checkpoint", str(ckpt), "--data-dir", "digits", "--scales", "1", "1000"]
    assert main([*argv, "--output-dir", str(tmp_path), "--workers", "0"]) == 2
    _one_line_error(capsys.readouterr().err, "--scales gives 16000 px, above the largest input size (4096 px)")


def test_internal_error_is_one_line_and_debug_shows_the_trace(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr("seqvision.commands.models.models_table", broken)
    monkeypatch.delenv("SEQVISION_DEBUG", raising=False)
    assert main(["models"]) == 1
    _one_line_error(
        capsys.readouterr().err,
        "seqvision models: internal error: RuntimeError: something inside broke; run with --debug",
    )
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["models", "--debug"])
    monkeypatch.setenv("SEQVISION_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["models"])


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("seqvision.commands.models.models_table", interrupted)
    monkeypatch.delenv("SEQVISION_DEBUG", raising=False)
    assert main(["models"]) == 130
    _one_line_error(capsys.readouterr().err, "seqvision models: interrupted")
    with pytest.raises(KeyboardInterrupt):
        main(["models", "--debug"])
