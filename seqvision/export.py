"""``seqvision export``: ONNX, OpenVINO IR and torch.export programs with dynamic batch, height and width.

ONNX: the TorchScript-based exporter lowers nn.LSTM / GRU / RNN to ONNX's own LSTM / GRU / RNN nodes,
whose sequence length stays dynamic (the dynamo-based exporter unrolls the time loop instead, which fixes
the image size). OpenVINO: that ONNX file converted to OpenVINO's IR (.xml + .bin, fp32 weights; the optional
``openvino`` package, ``pip install 'seqvision[deploy]'``). torch.export: the recurrences are captured as one
custom op (``seqvision::rnn2d_reference``) with symbolic shapes. Every format is run at two image sizes and
compared with PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from . import ops
from .commands.common import image_size, positive_int
from .errors import ExportError, UserError
from .files import atomic_write
from .inference import load_model

FORMATS = ("onnx", "openvino", "torch-export")
TOLERANCE = 1e-4


def check_sizes(img_size: int) -> list[tuple[int, int]]:
    """The two sizes an export is checked at: the model's own and a non-square one (224 -> 160x288)."""
    return [(img_size, img_size), (round(img_size * 5 / 7 / 14) * 14 or 28, round(img_size * 9 / 7 / 14) * 14)]


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int, opset: int = 17) -> Path:
    """Write ``model`` as ONNX with dynamic batch / height / width (atomically)."""
    example = torch.randn(1, getattr(model, "in_chans", 3), img_size, img_size)

    def write(tmp: str) -> None:
        with ops.use_engine("reference"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (example,), tmp, dynamo=False, opset_version=opset,
                input_names=["images"], output_names=["logits"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
            )  # fmt: skip

    return atomic_write(path, write)


def require_openvino():
    """The ``openvino`` module, or an ExportError that says how to install it."""
    try:
        import openvino
    except ImportError:
        raise ExportError(
            "the openvino format needs OpenVINO: pip install 'seqvision[deploy]' (or pip install openvino)"
        ) from None
    return openvino


def export_openvino(model: nn.Module, path: str | os.PathLike, img_size: int, opset: int = 17) -> Path:
    """Write ``model`` as an OpenVINO IR with dynamic batch / height / width: ``path`` (NAME.xml) and the weights
    beside it (NAME.bin), converted from ``export_onnx``'s file. Weights stay fp32: OpenVINO picks the inference
    precision (bf16 on CPUs with bf16 hardware) when it compiles the model, as it does for ONNX input."""
    ov = require_openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"an OpenVINO IR is NAME.xml plus NAME.bin: give an output path ending in .xml, not {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.")
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        onnx_path = export_onnx(model, Path(staging) / "model.onnx", img_size, opset)
        staged = Path(staging) / path.name
        ov.save_model(ov.convert_model(str(onnx_path)), str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))  # the .xml last: it names a complete IR
        os.replace(staged, path)
    finally:
        for leftover in Path(staging).iterdir():
            leftover.unlink()
        os.rmdir(staging)
    return path


def export_program(model: nn.Module, path: str | os.PathLike, img_size: int) -> Path:
    """Write ``model`` as a torch.export ExportedProgram (.pt2) with dynamic batch / height / width."""
    from torch.export import Dim, export

    min_side = 2 * getattr(model, "min_input_size", 14)  # sizes 0 and 1 would be specialised by export
    dims = {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=min_side, max=8192),
            3: Dim("width", min=min_side, max=8192)}  # fmt: skip
    example = torch.randn(2, getattr(model, "in_chans", 3), max(img_size, min_side), max(img_size, min_side))
    # A deepcopy gives every parameter its own memory: the model's RNN weights share storage (ops/packing.py), which
    # torch.export.save would stitch back together with a warning about non-CPU weights.
    with ops.use_engine("traceable"), torch.no_grad():
        program = export(copy.deepcopy(model), (example,), dynamic_shapes=(dims,))
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp))


@torch.no_grad()
def verify(path: str | os.PathLike, fmt: str, model: nn.Module, sizes: list[tuple[int, int]]) -> list[dict]:
    """Run the exported file at each size and compare with ``model``: [{size, max_abs_diff}]."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
    elif fmt == "openvino":
        # fp32 explicitly: on CPUs with bf16 hardware OpenVINO would otherwise run bf16 and the check would measure
        # rounding, not the export.
        compiled = require_openvino().Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        run = lambda x: torch.from_numpy(compiled(x.numpy())[0])  # noqa: E731
    else:
        program = torch.export.load(str(path)).module()
        run = program
    report = []
    in_chans = getattr(model, "in_chans", 3)
    for i, (h, w) in enumerate(sizes):
        x = torch.randn(1 + i, in_chans, h, w, generator=torch.Generator().manual_seed(i))
        diff = (run(x).float() - model(x).float()).abs().max().item()
        report.append({"size": f"{h}x{w}", "batch": 1 + i, "max_abs_diff": diff})
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Export a trained Sequencer to ONNX, OpenVINO IR (.xml + .bin; needs pip install 'seqvision[deploy]') "
            "or a torch.export program with dynamic batch, height and width, then run it at two image sizes and "
            f"compare with PyTorch in fp32 (fails if the difference exceeds {TOLERANCE})."
        ),
        epilog=(
            "examples:\n"
            "  seqvision export --format onnx --checkpoint runs/digits/best.pth digits.onnx\n"
            "  seqvision export --format openvino --checkpoint runs/digits/best.pth digits.xml\n"
            "  seqvision export --format torch-export --model sequencer2d_s --checkpoint sequencer2d_s.pth s.pt2\n"
            "  seqvision export --format onnx --checkpoint best.pth --quantize dynamic digits-int8.onnx"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", help="output file (.onnx, .xml for OpenVINO (its .bin goes beside it), or .pt2)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx, openvino or torch-export")
    p.add_argument("--checkpoint", help="weights to export (any format seqvision reads)")
    p.add_argument("--model", help="variant name (needed only when the checkpoint does not say)")
    p.add_argument("--pretrained", action="store_true", help="export the published weights of --model")
    p.add_argument("--img-size", type=image_size, help="example / check size (default: the model's input size)")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--quantize", choices=("dynamic",),
        help="int8 LSTM/MatMul weights with ONNX Runtime's dynamic quantisation (onnx only)",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ExportError(f"unknown format {args.format!r}; choose {', '.join(FORMATS)}")
    if args.quantize and args.format != "onnx":
        raise ExportError("--quantize applies to ONNX exports; for PyTorch use `seqvision predict --quantize dynamic`")
    loaded = load_model(args.checkpoint, args.model, "cpu", pretrained=args.pretrained)
    model = loaded.model.float().eval()
    size = args.img_size or loaded.data_config["input_size"][-1]
    out = Path(args.out)
    try:
        if args.format == "onnx":
            export_onnx(model, out, size, args.opset)
            if args.quantize:
                from onnxruntime.quantization import QuantType
                from onnxruntime.quantization import quantize_dynamic as ort_quantize

                ort_quantize(str(out), str(out), weight_type=QuantType.QInt8)
        elif args.format == "openvino":
            export_openvino(model, out, size, args.opset)
        else:
            export_program(model, out, size)
    except UserError:
        raise
    except Exception as e:  # exporter internals: report one line, not their traceback
        raise ExportError(f"export to {args.format} failed: {str(e).strip().splitlines()[0][:300]}") from None
    report = verify(out, args.format, model, check_sizes(size))
    for r in report:
        print(f"{out}: batch {r['batch']} at {r['size']}: max |exported - PyTorch fp32| = {r['max_abs_diff']:.2e}")
    worst = max(r["max_abs_diff"] for r in report)
    if args.quantize:
        print("int8 weights: the difference above is quantisation error; check accuracy with `seqvision validate`")
    elif worst > TOLERANCE:
        raise ExportError(f"{out} differs from PyTorch by {worst:.2e} (> {TOLERANCE}); the export is not faithful")
    files = [out, out.with_suffix(".bin")] if args.format == "openvino" else [out]
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"wrote {' and '.join(map(str, files))} ({size_mb:.1f} MB), dynamic batch/height/width, {loaded.name}")
    return 0
