"""Deployment: predict, ONNX / OpenVINO / torch.export with dynamic sizes, int8, and their errors."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import randomise
from PIL import Image

import seqvision
from seqvision import ops
from seqvision.cli import main
from seqvision.export import export_onnx, export_program, verify
from seqvision.inference import default_class_names, load_model, quantize_dynamic
from seqvision.predict import expand_inputs
from seqvision.weights import save_weights

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8))


def random_model(num_classes=10, seed=0, **kw):
    return randomise(seqvision.create_model("sequencer2d_s", **{**TINY, **kw}, num_classes=num_classes), seed, 0.1)


@pytest.fixture
def checkpoint(tmp_path):
    model = random_model()
    path = tmp_path / "tiny.safetensors"
    names = [f"digit-{i}" for i in range(10)]
    save_weights(
        model, path, info={"model_kwargs": TINY, "class_names": names, "data_config": {"input_size": (3, 56, 56)}}
    )
    return path, model


def test_load_model_rebuilds_custom_model_from_checkpoint(checkpoint):
    path, model = checkpoint
    loaded = load_model(path)
    assert loaded.name == "sequencer2d_s" and loaded.class_names[3] == "digit-3"
    assert loaded.data_config["input_size"] == (3, 56, 56)
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(loaded.model(x), model(x))


def test_default_class_names():
    assert default_class_names(3) == ["0", "1", "2"]
    names = default_class_names(1000)
    assert names[0] == "tench" and names[1] == "goldfish" and len(names) == 1000


def test_expand_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a.png", "d/b.jpg", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    paths, problems = expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.png"), str(tmp_path / "missing.png")])
    assert [p.name for p in paths] == ["b.jpg", "a.png"]
    assert problems == [f"{tmp_path / 'missing.png'}: no such file"]


def test_predict_command_skips_unreadable_and_handles_grey_and_rgba(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 255, (50, 30, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rc = main(["predict", str(tmp_path / "*.png"), "--checkpoint", str(path), "--topk", "3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    results = json.loads(captured.out)
    assert [r["path"].rsplit("/", 1)[1] for r in results] == ["grey.png", "rgba.png"]
    assert "broken.png: cannot read image" in captured.err
    # The top class must be the model's own argmax on the same preprocessing.
    from timm.data import create_transform

    loaded = load_model(path)
    x = create_transform(**loaded.data_config)(Image.open(tmp_path / "grey.png").convert("RGB"))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = results[0]["predictions"]
    assert len(top) == 3 and top[0]["index"] == int(probs.argmax())
    assert top[0]["class"] == f"digit-{int(probs.argmax())}"
    assert top[0]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_predict_nothing_readable_is_an_error(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["predict", str(tmp_path / "none*.png"), "--checkpoint", str(path)]) == 2
    assert "no image could be predicted" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [{}, dict(cell="gru"), dict(union="add", bidirectional=False)])
def test_onnx_export_dynamic_sizes(tmp_path, kw):
    model = random_model(**kw)
    out = export_onnx(model, tmp_path / "m.onnx", 56)
    report = verify(out, "onnx", model, [(56, 56), (42, 84), (112, 70)])
    assert [r["size"] for r in report] == ["56x56", "42x84", "112x70"]
    assert max(r["max_abs_diff"] for r in report) < 1e-4


# The saved program has plain weights: torch.export.save warns when parameters share storage.
@pytest.mark.filterwarnings("error:No complete tensor:UserWarning")
def test_torch_export_dynamic_sizes_and_vanilla(tmp_path):
    model = random_model()
    out = export_program(model, tmp_path / "m.pt2", 56)
    assert max(r["max_abs_diff"] for r in verify(out, "torch-export", model, [(56, 56), (160, 288)])) < 1e-4
    vanilla = randomise(
        seqvision.create_model(
            "v_sequencer_s_pe",
            layers=(1, 1, 1, 1),
            embed_dims=(16,) * 4,
            hidden_sizes=(8,) * 4,
            num_classes=5,
            img_size=56,
        ),
        std=0.1,
    )
    out = export_program(vanilla, tmp_path / "v.pt2", 56)
    assert max(r["max_abs_diff"] for r in verify(out, "torch-export", vanilla, [(56, 56), (70, 98)])) < 1e-4


@pytest.mark.parametrize("kw", [{}, dict(cell="gru")])
def test_openvino_export_dynamic_sizes(tmp_path, kw):
    pytest.importorskip("openvino", reason="optional: pip install 'seqvision[deploy]'")
    from seqvision.export import export_openvino

    model = random_model(**kw)
    out = export_openvino(model, tmp_path / "ir" / "m.xml", 56)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.bin", "m.xml"]  # no staging files left behind
    report = verify(out, "openvino", model, [(56, 56), (42, 84), (112, 70)])  # OpenVINO's output vs eager PyTorch
    assert [r["batch"] for r in report] == [1, 2, 3]
    assert max(r["max_abs_diff"] for r in report) < 1e-4


def test_export_command_openvino(checkpoint, tmp_path, capsys):
    pytest.importorskip("openvino", reason="optional: pip install 'seqvision[deploy]'")
    path, _ = checkpoint
    assert main(["export", "--format", "openvino", "--checkpoint", str(path), str(tmp_path / "a.xml")]) == 0
    out = capsys.readouterr().out
    assert "at 56x56" in out and "at 42x70" in out and f"wrote {tmp_path / 'a.xml'} and {tmp_path / 'a.bin'}" in out
    # fp32 weights (compress_to_fp16 off): over 3 bytes a parameter; fp16 would be 2 (OpenVINO keeps one sum of the
    # RNNs' two bias vectors, so a little under 4).
    assert (tmp_path / "a.bin").stat().st_size > 3 * sum(p.numel() for p in load_model(path).model.parameters())


def test_openvino_export_errors_are_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setitem(sys.modules, "openvino", None)  # as where it is not installed
    assert main(["export", "--format", "openvino", "--checkpoint", str(path), str(tmp_path / "a.xml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'seqvision[deploy]'" in err and "\n" not in err
    monkeypatch.delitem(sys.modules, "openvino")
    pytest.importorskip("openvino", reason="optional: pip install 'seqvision[deploy]'")
    assert main(["export", "--format", "openvino", "--checkpoint", str(path), str(tmp_path / "a.onnx")]) == 2
    assert "ending in .xml" in capsys.readouterr().err


def test_traceable_engine_matches_reference():
    model = random_model(cell="rnn")
    x = torch.randn(2, 3, 42, 70)
    with ops.use_engine("traceable"):
        y = model(x)
    with ops.use_engine("reference"):
        torch.testing.assert_close(y, model(x))


# The saved program has plain weights: torch.export.save warns when parameters share storage.
@pytest.mark.filterwarnings("error:No complete tensor:UserWarning")
def test_export_command_both_formats(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["export", "--format", "onnx", "--checkpoint", str(path), str(tmp_path / "a.onnx")]) == 0
    out = capsys.readouterr().out
    assert "at 56x56" in out and "at 42x70" in out and "wrote" in out
    assert main(["export", "--format", "torch-export", "--checkpoint", str(path), str(tmp_path / "a.pt2")]) == 0
    assert (tmp_path / "a.pt2").stat().st_size > 0


def test_export_int8_onnx_is_smaller(checkpoint, tmp_path):
    path, _ = checkpoint
    assert main(["export", "--format", "onnx", "--checkpoint", str(path), str(tmp_path / "f.onnx")]) == 0
    args = ["export", "--format", "onnx", "--quantize", "dynamic", "--checkpoint", str(path), str(tmp_path / "q.onnx")]
    assert main(args) == 0
    assert (tmp_path / "q.onnx").stat().st_size < (tmp_path / "f.onnx").stat().st_size


def test_export_errors_are_one_line(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    with pytest.raises(SystemExit):  # argparse rejects an unknown format
        main(["export", "--format", "tflite", "--checkpoint", str(path), str(tmp_path / "x")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--format", "onnx", "--checkpoint", str(path), str(blocker / "sub" / "m.onnx")]) == 2
    assert "cannot write" in capsys.readouterr().err
    other = seqvision.create_model("sequencer2d_s", **dict(TINY, layers=(2, 1, 1, 1)), num_classes=10)
    bad = tmp_path / "other.safetensors"
    save_weights(other, bad, info={"model_kwargs": TINY})
    assert main(["export", "--format", "onnx", "--checkpoint", str(bad), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint metadata model_kwargs does not match the tensors" in err and "\n" not in err


def test_quantize_dynamic_keeps_predictions_close():
    model = random_model()
    q = quantize_dynamic(random_model())
    assert type(q.stages[0].blocks[0].rnn_tokens.rnn_v).__module__.startswith("torch.ao.nn.quantized")
    x = torch.randn(4, 3, 56, 56)
    diff = (q(x) - model(x)).abs().max().item()
    assert 0 < diff < 0.1 * model(x).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_torch_compile_fullgraph(engine):
    # nn.LSTM breaks dynamo's graph; seqvision hands its weights to one custom op instead (the reference op or
    # the fused kernel), forward and backward, with dynamic image sizes.
    if engine == "fused":
        from seqvision.ops import fused

        if not fused.available():
            pytest.skip(f"the fused engine could not be built here: {fused.load_error()}")
    model = random_model()
    x = torch.randn(2, 3, 28, 42)
    with ops.use_engine(engine):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        with torch.no_grad():
            for size in [(28, 42), (56, 70)]:
                y = torch.randn(2, 3, *size)
                torch.testing.assert_close(compiled(y), model(y), rtol=1e-4, atol=1e-5)
        torch._dynamo.reset()
        train_step = torch.compile(model, fullgraph=True, dynamic=False)
        train_step(x).square().sum().backward()
        compiled_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().sum().backward()
    for got, want in zip(compiled_grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_reference_op_gradcheck():
    from torch import nn

    from seqvision.ops.reference import rnn2d_reference, rnn2d_reference_op

    torch.manual_seed(0)
    for cls, cell in [(nn.LSTM, "lstm"), (nn.GRU, "gru"), (nn.RNN, "rnn")]:
        rv, rh = (cls(3, 2, batch_first=True, bidirectional=True).double() for _ in range(2))
        x = torch.randn(2, 3, 4, 3, dtype=torch.double, requires_grad=True)
        n = len(rv._flat_weights)

        def op(x, *w, cell=cell, n=n):
            return rnn2d_reference_op(x, list(w[:n]), list(w[n:]), cell, 2, True, "cat")

        weights = [*rv._flat_weights, *rh._flat_weights]
        assert torch.autograd.gradcheck(op, (x, *weights))
        torch.testing.assert_close(op(x, *weights), rnn2d_reference(x, rv, rh, "cat"))
