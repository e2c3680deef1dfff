"""``seqvision export``: ONNX, OpenVINO IR and torch.export programs with dynamic batch, height and width.

ONNX: the TorchScript-based exporter lowers nn.LSTM / GRU / RNN to ONNX's own LSTM / GRU / RNN nodes,
whose sequence length stays dynamic (the dynamo-based exporter unrolls the time loop instead, which fixes
the image size). OpenVINO: that ONNX file converted to OpenVINO's IR (.xml + .bin, fp32 weights; the optional
``openvino`` package, ``pip install 'seqvision[deploy]'``). torch.export: the recurrences are captured as one
custom op (``seqvision::rnn2d_reference``) with symbolic shapes. Every format is run at two image sizes and
compared with PyTorch.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from . import ops
from .errors import ExportError, UserError
from .files import atomic_write

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


def export_model(
    model: nn.Module, path: str | os.PathLike, fmt: str, img_size: int, opset: int = 17, quantize: str | None = None
) -> Path:
    """Export ``model`` to ``path`` in ``fmt`` (one of ``FORMATS``), with int8 dynamic quantisation of the ONNX
    file's weights where ``quantize == "dynamic"``; an ExportError of one line when the exporter fails."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if quantize and fmt != "onnx":
        raise ExportError("--quantize applies to ONNX exports; for PyTorch use `seqvision predict --quantize dynamic`")
    out = Path(path)
    try:
        if fmt == "onnx":
            export_onnx(model, out, img_size, opset)
            if quantize:
                from onnxruntime.quantization import QuantType, quantize_dynamic  # optional dependency

                quantize_dynamic(str(out), str(out), weight_type=QuantType.QInt8)
        elif fmt == "openvino":
            export_openvino(model, out, img_size, opset)
        else:
            export_program(model, out, img_size)
    except UserError:
        raise
    except Exception as e:  # exporter internals: report one line, not their traceback
        raise ExportError(f"export to {fmt} failed: {str(e).strip().splitlines()[0][:300]}") from None
    return out
