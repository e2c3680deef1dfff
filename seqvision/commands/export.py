"""``seqvision export``: ONNX, OpenVINO IR and torch.export programs with dynamic batch, height and width."""

from __future__ import annotations

import argparse

from ..errors import ExportError
from ..export import FORMATS, TOLERANCE, check_sizes, export_model, verify
from ..inference import load_model
from .common import image_size, positive_int


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
    if args.quantize and args.format != "onnx":  # before loading the model: the same check export_model makes
        raise ExportError("--quantize applies to ONNX exports; for PyTorch use `seqvision predict --quantize dynamic`")
    loaded = load_model(args.checkpoint, args.model, "cpu", pretrained=args.pretrained)
    model = loaded.model.float().eval()
    size = args.img_size or loaded.data_config["input_size"][-1]
    out = export_model(model, args.out, args.format, size, args.opset, args.quantize)
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
