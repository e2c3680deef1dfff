"""GPU throughput: seqvision's Sequencer2D (Triton engine) vs timm's sequencer2d_s/m/l and convnext_tiny.

One run, same process, same settings for every model: AMP (bf16 by default), batch 256, 224 px, inference
(eval, inference_mode) and training (forward + backward + SGD step); images per second and peak memory.
``benchmark()`` measures, ``format_table()`` prints; ``run_gpu`` is ``seqvision bench --device cuda`` and
``benchmarks/bench_gpu.py`` the script with every option (``--device cpu`` there is a smoke test of the code
path only, at whatever small size you give it).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator, Sequence

import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity
from torch.profiler import profile as profiler

from .. import ops
from ..errors import UserError
from ..models import create_model
from ..ops import triton_lstm
from .settings import BenchSettings

DEFAULT_MODELS = (
    "seqvision:sequencer2d_s",
    "seqvision:sequencer2d_m",
    "seqvision:sequencer2d_l",
    "timm:sequencer2d_s",
    "timm:sequencer2d_m",
    "timm:sequencer2d_l",
    "timm:convnext_tiny",
)
ENGINES = ("triton", "auto", "reference")


@contextlib.contextmanager
def seqvision_engine(engine: str, stats: dict[str, int]) -> Iterator[None]:
    """Route seqvision's BiLSTM2D through ``engine``; ``stats`` counts Triton calls and fallbacks.

    "triton": the Triton recurrence wherever it covers the configuration, else the dispatcher (cuDNN) — this
    works whether or not the dispatcher already selects Triton itself. "auto" / "reference": the dispatcher's.
    """

    if engine != "triton":
        with ops.use_engine(engine):
            yield
        return

    original = ops.rnn2d

    def rnn2d(x, rnn_v, rnn_h, union):
        out = triton_lstm.rnn2d_triton(x, rnn_v, rnn_h, union)
        if not torch.compiler.is_compiling():  # a counter in the traced code would recompile at every call
            stats["triton" if out is not None else "fallback"] += 1
        return out if out is not None else original(x, rnn_v, rnn_h, union)

    ops.rnn2d = rnn2d
    try:
        yield
    finally:
        ops.rnn2d = original


def build(spec: str) -> nn.Module:
    """``seqvision:<variant>`` or ``timm:<model>``, random weights."""
    lib, _, name = spec.partition(":")
    if lib == "seqvision":
        return create_model(name)
    if lib == "timm":
        return timm.create_model(name, pretrained=False)
    raise ValueError(f"model spec {spec!r}: expected seqvision:<name> or timm:<name>")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module,
    mode: str,
    batch: int,
    img_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    warmup: int,
    iters: int,
    profile: int = 0,
) -> dict:
    """Images per second and peak memory of one model in one mode ("infer" or "train"); with ``profile`` > 0
    also the ``profile`` operators/kernels that took the most device time over two more steps, as a table."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), amp:
                model(x)

    elif mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        def step() -> None:
            with amp:
                loss = nn.functional.cross_entropy(model(x), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    else:
        raise ValueError(f"mode {mode!r}: expected infer or train")

    for _ in range(warmup):  # includes Triton's first-call compilation and cuDNN's algorithm choice
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    out = {"img_s": batch * iters / seconds, "ms_per_iter": 1e3 * seconds / iters, "peak_gib": peak}
    if profile:
        on_gpu = device.type == "cuda"
        with profiler(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
            _sync(device)
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        out["profile"] = prof.key_averages().table(sort_by=key, row_limit=profile, max_name_column_width=70)
    return out


def benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    modes: Sequence[str] = ("infer", "train"),
    batch: int = 256,
    img_size: int = 224,
    device: str = "cuda",
    amp: str = "bf16",
    engine: str | Sequence[str] = "triton",
    warmup: int = 5,
    iters: int = 20,
    log=print,
    compile: bool = False,
    profile: int = 0,
) -> list[dict]:
    """Measure every model in every mode; one result dict per (model, mode). Raises RuntimeError without CUDA
    when ``device`` is "cuda". An out-of-memory run is recorded as such and the others go on. ``compile``:
    every model under ``torch.compile`` (static shapes; the warm-up steps include the compilation);
    ``profile``: see ``measure``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    engines = [e.strip() for e in engine.split(",")] if isinstance(engine, str) else list(engine)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"engine {unknown[0]!r}: expected one or more of {', '.join(ENGINES)}")
    results = []
    for spec in models:
        is_ours = spec.startswith("seqvision:")
        for eng in engines if is_ours else [None]:
            for mode in modes:
                stats = {"triton": 0, "fallback": 0}
                row = {"model": spec, "mode": mode, "batch": batch, "img_size": img_size, "amp": amp}
                row["compiled"] = compile
                if is_ours:
                    row["engine"] = eng
                model = None
                try:
                    model = build(spec).to(dev)
                    if compile:
                        model = torch.compile(model, dynamic=False)
                    with seqvision_engine(eng, stats) if is_ours else contextlib.nullcontext():
                        row |= measure(model, mode, batch, img_size, dev, amp_dtype, warmup, iters, profile)
                except Exception as e:  # out of memory, or a model that cannot run here: record it, go on
                    error = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"
                    row |= {"img_s": float("nan"), "ms_per_iter": float("nan"), "peak_gib": float("nan")}
                    row["error"] = error
                finally:
                    model = None
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                if is_ours:
                    row |= {"triton_calls": stats["triton"], "fallback_calls": stats["fallback"]}
                    if stats["triton"]:  # which kernel variant each hidden size ran with (GPUs differ)
                        row["triton_settings"] = triton_lstm.chosen_settings(dev)
                results.append(row)
                log(format_row(row))
                if "profile" in row:
                    log(row["profile"])
    return results


def format_row(r: dict) -> str:
    note = r.get("error", "")
    if r.get("fallback_calls"):
        note += f" ({r['fallback_calls']} BiLSTM2D calls fell back from Triton)"
    if r.get("triton_settings"):
        note += " [" + "; ".join(f"{k}: {v}" for k, v in r["triton_settings"].items()) + "]"
    return f"{_name(r):<46} {r['mode']:<6} {r['img_s']:>10.1f} img/s {r['peak_gib']:>8.2f} GiB {note}"


def _name(r: dict) -> str:
    return r["model"] + (f" ({r['engine']})" if "engine" in r else "") + (" compiled" if r.get("compiled") else "")


def format_table(results: Sequence[dict], baseline: str = "timm:sequencer2d_s") -> str:
    """Markdown table, with each row's speed relative to ``baseline`` in the same mode (its eager row where the
    table has one, else its compiled row)."""
    rows = [r for r in results if r["model"] == baseline]
    eager = [r for r in rows if not r.get("compiled")]
    base = {r["mode"]: r["img_s"] for r in (eager or rows)}
    mixed = eager and any(r.get("compiled") for r in results)
    lines = [
        f"| model | mode | img/s | vs {baseline}{' eager' if mixed else ''} | peak memory (GiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:  # no baseline row in this mode (e.g. a profile run of one model): the ratio cell says so
        ratio = f"{r['img_s'] / base[r['mode']]:.2f}x" if r["mode"] in base else "no baseline"
        lines.append(f"| {_name(r)} | {r['mode']} | {r['img_s']:.1f} | {ratio} | {r['peak_gib']:.2f} |")
    return "\n".join(lines)


def run_gpu(s: BenchSettings) -> int:
    """``seqvision bench --device cuda``: seqvision (Triton engine) vs timm's same variant and convnext_tiny, eager
    and (unless ``no_compile``) under torch.compile; prints the table."""
    if "int8" in s.dtype:
        raise UserError("int8 (dynamic quantisation) runs on the CPU only; drop it from --dtype for --device cuda")
    if not torch.cuda.is_available():
        raise UserError(f"--device {s.device}: no CUDA device is available here; use --device cpu")
    print(f"device: {torch.cuda.get_device_name(s.device)}, torch {torch.__version__}")
    models = [f"seqvision:{s.model}", f"timm:{s.model}"] + ([] if s.no_convnext else ["timm:convnext_tiny"])
    run = dict(
        models=models,
        modes=["train"] if s.train else ["infer"],
        batch=s.batch[0] if s.batch else 256,
        img_size=s.img_size,
        device=s.device,
        amp="none" if s.dtype.strip() == "fp32" else "bf16",
        warmup=s.warmup,
        iters=s.iters,
    )
    results = benchmark(**run)
    if not s.no_compile:
        results += benchmark(**run, compile=True)
    print()
    print(format_table(results))
    return 0
