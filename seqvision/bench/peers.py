"""Peer rows of ``seqvision bench``: the deployment runtimes a user would pick instead (OpenVINO, ONNX Runtime),
each running seqvision's own ONNX export of the same weights as the seqvision rows. Optional: a runtime that is
not installed (``pip install 'seqvision[deploy]'``) gives one note instead of its rows."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..export import export_onnx
from .settings import PEER_BF16, BenchSettings, seeded_model


@dataclass
class PeerSpec:
    """One peer row per (dtype, batch): ``make_step(batch, img_size)`` returns its step; ``dtype``: fp32 or bf16."""

    name: str
    dtype: str
    make_step: Callable[[int, int], Callable[[], None]]

    @property
    def mode(self) -> str:
        return "fp32" if self.dtype == "fp32" else PEER_BF16


def _openvino_specs(ov, onnx_path: Path, dtypes: list[str], threads: int) -> tuple[list[PeerSpec], list[str]]:
    """OpenVINO rows (latency and throughput hints, per dtype), each compiled on first use; notes for the rest."""
    core = ov.Core()
    version = ov.__version__.split("-")[0]
    compiled: dict[tuple[str, str], object] = {}
    notes = []

    def compile_for(precision: str, hint: str):
        if (precision, hint) not in compiled:
            config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
            compiled[(precision, hint)] = core.compile_model(str(onnx_path), "CPU", config)
        return compiled[(precision, hint)]

    def step_factory(precision: str, hint: str) -> Callable[[int, int], Callable[[], None]]:
        def make_step(batch: int, img: int) -> Callable[[], None]:
            model = compile_for(precision, hint)
            x = torch.randn(batch, 3, img, img).numpy()
            requests = min(batch, int(model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            if hint == "LATENCY" or requests == 1:
                request = model.create_infer_request()
                return lambda: request.infer({0: x})
            # Throughput mode as OpenVINO means it: the batch split over its parallel streams, one request each.
            chunks = [c.copy() for c in np.array_split(x, requests)]
            queue = ov.AsyncInferQueue(model, requests)

            def step():
                for c in chunks:
                    queue.start_async({0: c})
                queue.wait_all()

            return step

        return make_step

    specs = []
    has_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for dtype in dtypes:
        if dtype == "bf16" and not has_bf16:
            notes.append("no OpenVINO bf16 rows: OpenVINO has no bf16 kernels for this CPU (it runs them in fp32)")
            continue
        precision = "f32" if dtype == "fp32" else "bf16"
        for hint in ("LATENCY", "THROUGHPUT"):
            specs.append(PeerSpec(f"OpenVINO {version}, {hint.lower()} hint", dtype, step_factory(precision, hint)))
    return specs, notes


def _onnxruntime_specs(ort, onnx_path: Path, dtypes: list[str], threads: int) -> tuple[list[PeerSpec], list[str]]:
    """The ONNX Runtime row (CPU execution provider, fp32)."""
    notes = ["no ONNX Runtime bf16 row: its CPU execution provider runs this model in fp32"] if "bf16" in dtypes else []
    if "fp32" not in dtypes:
        return [], notes
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session: list = []

    def make_step(batch: int, img: int) -> Callable[[], None]:
        if not session:
            session.append(ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]))
        x = torch.randn(batch, 3, img, img).numpy()
        return lambda: session[0].run(None, {"images": x})

    return [PeerSpec(f"ONNX Runtime {ort.__version__}", "fp32", make_step)], notes


def prepare_peers(args: BenchSettings, dtypes: list[str], workdir: Path) -> tuple[list[PeerSpec], list[str]]:
    """The peer rows this run can have (OpenVINO, ONNX Runtime: the installed ones), after exporting the seqvision
    rows' weights with ``seqvision.export.export_onnx`` into ``workdir``; and one note per row left out."""
    wanted = [d for d in dtypes if d in ("fp32", "bf16")]
    if args.no_peers or not wanted:
        return [], []
    if args.train:
        return [], ["no OpenVINO / ONNX Runtime rows: they are inference runtimes (drop --train to see them)"]
    runtimes, notes = {}, []
    for module, label in (("openvino", "OpenVINO"), ("onnxruntime", "ONNX Runtime")):
        try:
            runtimes[module] = importlib.import_module(module)
        except ImportError:
            notes.append(f"no {label} rows: pip install 'seqvision[deploy]' to compare with {label}")
    if not runtimes:
        return [], notes
    onnx_path = workdir / f"{args.model}.onnx"
    try:
        export_onnx(seeded_model(args.model).eval(), onnx_path, args.img_size)
    except Exception as e:  # a variant the exporter cannot take: the other rows still run
        return [], [*notes, f"no peer rows: the ONNX export failed ({type(e).__name__}: {str(e)[:150]})"]
    specs = []
    threads = torch.get_num_threads()
    if "openvino" in runtimes:
        more, more_notes = _openvino_specs(runtimes["openvino"], onnx_path, wanted, threads)
        specs, notes = specs + more, notes + more_notes
    if "onnxruntime" in runtimes:
        more, more_notes = _onnxruntime_specs(runtimes["onnxruntime"], onnx_path, wanted, threads)
        specs, notes = specs + more, notes + more_notes
    return specs, notes
