"""Checkpoint formats: fidelity against timm's model, conversion, and errors for bad files."""

import logging
import re

import pytest
import timm
import torch
from helpers import randomise
from safetensors.torch import save_file
from timm.models import adapt_input_conv

import seqvision
from seqvision.checkpoint_meta import convert_checkpoint, read_checkpoint
from seqvision.errors import CheckpointError
from seqvision.models import guess_variant, load_pretrained
from seqvision.weights import (
    adapt_input_channels,
    authors_to_timm,
    detect_format,
    load_weights,
    save_weights,
    timm_to_authors,
)

TINY = dict(layers=(2, 1, 2, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8))


def timm_oracle(name: str) -> torch.nn.Module:
    return randomise(timm.create_model(name), seed=len(name))


@pytest.mark.parametrize("name", ["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"])
def test_logits_match_timm_from_timm_and_authors_checkpoints(name, tmp_path):
    oracle = timm_oracle(name)
    timm_file = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(timm_file))
    authors_file = tmp_path / f"{name}.pth"
    torch.save({"model": timm_to_authors(oracle.state_dict())}, authors_file)  # wrapped, as some releases are
    assert detect_format(read_checkpoint(authors_file)[0]) == "authors"

    for ckpt in (timm_file, authors_file):
        model = seqvision.create_model(name, checkpoint_path=ckpt).eval()
        for size in [(224, 224), (160, 288)]:
            x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected, got = oracle(x), model(x)
            assert expected.abs().max() > 0.1  # a non-trivial oracle
            assert (got - expected).abs().max().item() < 1e-5


def test_authors_keys_follow_the_published_layout():
    with torch.device("meta"):
        sd = seqvision.create_model("sequencer2d_s").state_dict()
    authors = timm_to_authors(sd)
    assert "blocks.0.4.down.weight" in authors and "blocks.1.3.down.weight" in authors
    assert "blocks.2.8.down.weight" in authors and "head.weight" in authors
    assert "blocks.0.0.rnn_tokens.rnn_v.weight_hh_l0_reverse" in authors
    assert "stem.proj.weight" in authors and "norm.weight" in authors
    assert authors_to_timm(authors).keys() == sd.keys()


def test_convert_round_trip_all_formats(tmp_path):
    model = randomise(seqvision.create_model("sequencer2d_s", **TINY, num_classes=7))
    src = tmp_path / "native.safetensors"
    save_weights(model, src)
    _, meta = read_checkpoint(src)
    assert meta["model_name"] == "sequencer2d_s"
    convert_checkpoint(src, tmp_path / "authors.pth", to="authors")
    convert_checkpoint(tmp_path / "authors.pth", tmp_path / "timm.safetensors", to="timm")
    convert_checkpoint(tmp_path / "timm.safetensors", tmp_path / "back.safetensors", to="seqvision")
    assert detect_format(read_checkpoint(tmp_path / "authors.pth")[0]) == "authors"
    back, _ = read_checkpoint(tmp_path / "back.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_guess_variant_recognises_published_shapes():
    with torch.device("meta"):
        sd = seqvision.create_model("sequencer2d_m", num_classes=10).state_dict()
    assert guess_variant(sd) == "sequencer2d_m"
    assert guess_variant(timm_to_authors(sd)) == "sequencer2d_m"


def test_checkpoint_of_another_variant_names_the_problem(tmp_path):
    path = tmp_path / "m.safetensors"
    with torch.device("meta"):
        m = seqvision.create_model("sequencer2d_m")
    sd = {k: torch.zeros(v.shape) for k, v in m.state_dict().items()}
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        seqvision.create_model("sequencer2d_s", checkpoint_path=path)
    msg = str(err.value)
    assert "does not fit sequencer2d_s" in msg and "unexpected keys" in msg
    assert "looks like a sequencer2d_m checkpoint" in msg and "\n" not in msg


def test_shape_mismatch_is_reported(tmp_path):
    wide = seqvision.create_model("sequencer2d_s", **dict(TINY, hidden_sizes=(8, 8, 8, 8)))
    path = tmp_path / "wide.pth"
    torch.save(wide.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e\.g\. stages\.0\.blocks\.0"):
        seqvision.create_model("sequencer2d_s", **TINY, checkpoint_path=path)


def test_other_class_count_reinitialises_head_and_says_so(tmp_path):
    src = randomise(seqvision.create_model("sequencer2d_s", **TINY, num_classes=1000))
    path = tmp_path / "in1k.safetensors"
    save_weights(src, path)
    with pytest.warns(UserWarning, match="1000-class head and the model 10 classes"):
        model = seqvision.create_model("sequencer2d_s", **TINY, num_classes=10, checkpoint_path=path)
    assert torch.equal(model.stem.proj.weight, src.stem.proj.weight)
    assert model.head.fc.weight.shape == (10, 32) and model.head.fc.weight.abs().max() == 0
    headless = seqvision.create_model("sequencer2d_s", **TINY, num_classes=0)
    with pytest.warns(UserWarning, match="re-initialised"):
        load_weights(headless, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_corrupt_and_missing_files(tmp_path, suffix):
    model = seqvision.create_model("sequencer2d_s", **TINY)
    good = tmp_path / f"good{suffix}"
    save_weights(model, good, fmt="timm")
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(model, truncated)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\x00not a checkpoint" * 50)
    with pytest.raises(CheckpointError, match="corrupt" if suffix == ".safetensors" else "not a checkpoint"):
        load_weights(model, garbage)
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_weights(model, empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, tmp_path / f"missing{suffix}")


def test_format_is_read_from_the_contents_not_the_suffix(tmp_path):
    model = randomise(seqvision.create_model("sequencer2d_s", **TINY))
    misnamed = tmp_path / "weights.pth"  # a safetensors file under a .pth name, as hubs sometimes serve them
    save_weights(model, tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").rename(misnamed)
    legacy = tmp_path / "legacy.bin"  # torch.save's pre-1.6 (non-zip) format
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    for path in (misnamed, legacy):
        fresh = seqvision.create_model("sequencer2d_s", **TINY, checkpoint_path=path)
        assert torch.equal(fresh.head.fc.weight, model.head.fc.weight), path.name
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # a JPEG header: the wrong file passed as weights
    with pytest.raises(CheckpointError, match="not a checkpoint .* pass the weights file itself"):
        load_weights(model, photo)


def test_non_sequencer_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a Sequencer checkpoint"):
        load_weights(seqvision.create_model("sequencer2d_s", **TINY), path)


def test_training_checkpoint_with_prefixes_loads(tmp_path):
    model = randomise(seqvision.create_model("sequencer2d_s", **TINY))
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    path = tmp_path / "last.pth"
    torch.save(wrapped, path)
    fresh = seqvision.create_model("sequencer2d_s", **TINY, checkpoint_path=path)
    assert torch.equal(fresh.norm.weight, model.norm.weight)


def test_pretrained_loads_from_hub_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with torch.device("meta"):
        shapes = seqvision.create_model("sequencer2d_s").state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in shapes.items()}
    torch.save(timm_to_authors(sd), cache / "sequencer2d_s.pth")  # the authors' release file name
    model = seqvision.create_model("sequencer2d_s", pretrained=True)
    assert torch.equal(model.head.fc.weight, sd["head.fc.weight"])


def test_pretrained_without_published_weights():
    with pytest.raises(CheckpointError, match="no published weights for gru_sequencer2d_s"):
        seqvision.create_model("gru_sequencer2d_s", pretrained=True)


def test_seqvision_format_requires_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="safetensors"):
        save_weights(seqvision.create_model("sequencer2d_s", **TINY), tmp_path / "x.pth", fmt="seqvision")


def _write(model, folder, fmt):
    if fmt == "authors":
        path = folder / "a.pth"
        torch.save({"model": timm_to_authors(model.state_dict())}, path)
        return path
    if fmt == "timm":
        path = folder / "t.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path
    return save_weights(model, folder / "s.safetensors")


@pytest.mark.parametrize("fmt", ["authors", "timm", "seqvision"])
@pytest.mark.parametrize("in_chans", [1, 2, 4])
def test_stem_is_adapted_to_in_chans_from_any_format(fmt, in_chans, tmp_path, caplog):
    src = randomise(seqvision.create_model("sequencer2d_s", **TINY))
    path = _write(src, tmp_path, fmt)
    with caplog.at_level(logging.WARNING, logger="seqvision.weights"):
        model = seqvision.create_model("sequencer2d_s", **TINY, in_chans=in_chans, checkpoint_path=path)
    # timm's adaptation of a pretrained stem is the oracle, bit for bit
    assert torch.equal(model.stem.proj.weight, adapt_input_conv(in_chans, src.stem.proj.weight))
    assert torch.equal(model.stem.proj.bias, src.stem.proj.bias) and torch.equal(model.norm.weight, src.norm.weight)
    said = [r.getMessage() for r in caplog.records if r.name == "seqvision.weights"]
    assert len(said) == 1 and f"from the file's 3 input channels to the model's {in_chans}" in said[0], said
    assert ("summed" if in_chans == 1 else f"scaled by 3/{in_chans}") in said[0]


def test_grey_stem_sees_a_grey_image_as_the_rgb_stem_sees_it_in_three_equal_channels():
    rgb = randomise(seqvision.create_model("sequencer2d_s", **TINY))
    grey = seqvision.create_model("sequencer2d_s", **TINY, in_chans=1)
    load_weights(grey, rgb.state_dict())
    x = torch.randn(2, 1, 28, 42)
    torch.testing.assert_close(grey.stem(x), rgb.stem(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)


def test_adapt_input_channels_from_other_file_channel_counts():
    w = torch.randn(8, 2, 3, 3)
    torch.testing.assert_close(adapt_input_channels(w, 1), w.sum(1, keepdim=True))
    three = adapt_input_channels(w, 3)
    torch.testing.assert_close(three, torch.cat([w, w[:, :1]], 1) * (2 / 3))
    assert adapt_input_channels(w, 2) is w
    half = adapt_input_channels(w.to(torch.bfloat16), 1)
    assert half.dtype == torch.bfloat16


def test_in_chans_adaptation_is_not_a_licence_for_other_mismatches(tmp_path):
    other = seqvision.create_model("sequencer2d_s", **dict(TINY, embed_dims=(8, 32, 32, 32)))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"stem\.proj\.weight: file \(8, 3, 7, 7\), model \(16, 1, 7, 7\)"):
        seqvision.create_model("sequencer2d_s", **TINY, in_chans=1, checkpoint_path=path)


def test_pretrained_from_cache_dir_with_in_chans(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    with torch.device("meta"):
        shapes = seqvision.create_model("sequencer2d_s").state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in shapes.items()}
    torch.save(timm_to_authors(sd), tmp_path / "sequencer2d_s.pth")
    model = seqvision.create_model("sequencer2d_s", pretrained=True, cache_dir=tmp_path, in_chans=1)
    assert torch.equal(model.stem.proj.weight, sd["stem.proj.weight"].sum(1, keepdim=True))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(CheckpointError, match=re.escape(f"download it yourself to {empty}")):
        load_pretrained(seqvision.create_model("sequencer2d_m", layers=(1, 1, 1, 1)), "sequencer2d_m", empty)


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("no network in tests")


def test_seqvision_file_of_a_custom_model_rebuilds_that_model(tmp_path):
    """A model built with other arguments than its variant's (fewer blocks, narrower, GRU cells) saved as a
    seqvision file: loading the file alone gives back the same model, logits and all."""
    from seqvision.inference import load_model

    custom = dict(layers=[1, 1, 1, 1], embed_dims=[32, 64, 64, 64], hidden_sizes=[8, 16, 16, 16], cell="gru")
    model = seqvision.create_model("sequencer2d_s", num_classes=3, **custom).eval()
    randomise(model)
    path = save_weights(model, tmp_path / "custom.safetensors")
    assert read_checkpoint(path)[1]["model_kwargs"] == custom
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded.model.stages[0].blocks[0].rnn_tokens.rnn_v, torch.nn.GRU)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    plain = save_weights(seqvision.create_model("sequencer2d_s", num_classes=3), tmp_path / "p.safetensors")
    assert "model_kwargs" not in read_checkpoint(plain)[1]  # a stock variant needs no arguments
