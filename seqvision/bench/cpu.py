"""CPU throughput: seqvision's Sequencer2D (fused / reference engine) against timm, in one run.

Rows: seqvision fused (eager, and under torch.compile with the fused op opaque), seqvision reference,
timm's sequencer2d_* eager and under torch.compile, timm's convnext_tiny. Columns: images/s, ms per image,
peak memory (RSS growth above the pre-run RSS, sampled every 2 ms while the row runs), achieved GFLOP/s and
its fraction of the GEMM peak measured at the start of the same run (one large fp32 / bf16 matmul).

FLOPs per image are 2 x the multiply-adds counted with the LSTM products included (sequencer2d_s:
2 x 8.33 G = 16.7 GFLOP); a training step counts 3 x the forward FLOPs (forward + two backward GEMMs).
bf16 is measured both under CPU autocast ("autocast") and with the model cast to bf16 ("bf16 weights").
All rows are timed in interleaved rounds (one step of every row per round) and each row's fastest round is
reported, so load from other processes disturbs every row alike: compare rows of one table, not absolute numbers.
Two ratio columns compare each row with its baseline (timm's eager model of the same dtype and batch; for bf16
the faster of timm's two modes; seqvision's reference engine for a variant timm lacks): the ratio of the fastest
rounds, and the median, over rounds, of the ratio within each round with its quartiles. Each round's ratio
compares steps run seconds apart, so a change of the host's load between rounds cancels out of it.
The rows share one process and its allocator's free memory, which a run of its own does not have:
benchmarks/bench_memory.py times a training step with each implementation in a fresh process.

bf16 tables also have a "seqvision fused, bf16 recurrence" row (the recurrent products in bf16, see
``seqvision.ops.fused.bf16_recurrence``), and inference tables rows for the deployment runtimes a user would
pick instead, where installed (``pip install 'seqvision[deploy]'``): OpenVINO (latency and throughput hints;
bf16 where the CPU has bf16 hardware) and ONNX Runtime (fp32), both running seqvision's own ONNX export of the
same weights as the seqvision rows. Lines under the table pair the bf16 recurrence with the fp32 one and
seqvision's fastest row with OpenVINO's, round by round.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import ops
from ..errors import UserError
from ..inference import quantize_dynamic
from ..models.complexity import count_complexity
from ..ops import fused
from .peers import prepare_peers
from .settings import BF16_RECURRENCE_ROW, DTYPES, MODES, PEER_BF16, BenchSettings, seeded_model


def gemm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of one large square matmul (best of ``reps``): the ceiling the table's fractions refer to."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def rss_peak() -> Iterator[list[int]]:
    """Yields a one-element list that holds, on exit, the peak RSS growth (bytes) seen while inside."""
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss() - base)


@dataclass
class Row:
    name: str
    mode: str
    batch: int
    step: Callable[[], None]
    flops: float  # per image
    times: list[float] = field(default_factory=list)
    mem: int = 0

    @property
    def dtype(self) -> str:
        if self.mode == PEER_BF16:
            return "bf16"
        return next(d for d, modes in MODES.items() if self.mode in modes)


def baseline_for(row: Row, rows: list[Row]) -> Row | None:
    """The row ``row`` is compared with: timm's eager row of the same dtype and batch (the faster of its modes,
    as the issue's bf16 target asks), else seqvision's eager reference engine (a variant timm lacks)."""
    same = [r for r in rows if r.dtype == row.dtype and r.batch == row.batch and r.times and "compile" not in r.name]
    for prefix in ("timm ", "seqvision reference"):  # timm's row of the same variant (not convnext_tiny's), else ours
        candidates = [r for r in same if r.name.startswith(prefix) and "convnext" not in r.name]
        if candidates:
            return min(candidates, key=lambda r: min(r.times))
    return None


def speed_ratios(row: Row, base: Row) -> tuple[float, float, float, float]:
    """Speed of ``row`` relative to ``base`` (> 1: faster): (fastest rounds, then the lower quartile, median and
    upper quartile of the per-round ratios). Round i of both rows ran in the same interleaved round."""
    fastest = min(base.times) / min(row.times)
    per_round = sorted(b / t for b, t in zip(base.times, row.times, strict=True))
    if len(per_round) < 2:
        return fastest, per_round[0], per_round[0], per_round[0]
    q1, median, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
    return fastest, q1, median, q3


def make_step(
    model: nn.Module,
    batch: int,
    img: int,
    dtype: str,
    mode: str,
    train: bool,
    engine: str | None,
    bf16_recurrence: bool | None = None,
):
    """A closure running one inference or training step of ``model`` with fixed synthetic data (with the fused
    engine's bf16-recurrence setting ``bf16_recurrence`` where not None)."""
    autocast = dtype == "bf16" and mode == "autocast"
    in_dtype = torch.bfloat16 if dtype == "bf16" and mode == "bf16 weights" else torch.float32
    x = torch.randn(batch, 3, img, img, dtype=in_dtype)
    if bf16_recurrence is None:
        engine_ctx = (lambda: ops.use_engine(engine)) if engine else contextlib.nullcontext
    else:

        @contextlib.contextmanager
        def engine_ctx():
            with ops.use_engine(engine or "fused"), fused.use_bf16_recurrence(bf16_recurrence):
                yield

    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    if not train:
        model.eval()

        def step():
            with torch.inference_mode(), engine_ctx(), amp():
                model(x)

        return step
    model.train()
    target = torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with engine_ctx():
            with amp():
                loss = nn.functional.cross_entropy(model(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _row_specs(args: BenchSettings) -> list[tuple[str, Callable[[], nn.Module], str | None, bool]]:
    """(row name, model factory, engine, compile?) for every row."""
    seq = lambda: seeded_model(args.model)
    tim = lambda: timm.create_model(args.model)
    rows = [("seqvision fused", seq, "fused", False), (BF16_RECURRENCE_ROW, seq, "fused", False)]
    if not args.no_compile:
        rows.append(("seqvision fused + torch.compile", seq, "fused", True))
    if not args.no_reference:
        rows.append(("seqvision reference", seq, "reference", False))
        if not args.no_compile:
            rows.append(("seqvision reference + torch.compile", seq, "reference", True))
    if timm.is_model(args.model):
        rows.append((f"timm {args.model}", tim, None, False))
        if not args.no_compile:
            rows.append((f"timm {args.model} + torch.compile", tim, None, True))
    else:  # e.g. the GRU / tanh-RNN variants, which timm does not have
        print(f"note: timm has no {args.model}; the table compares seqvision's engines only")
    if not args.no_convnext:
        rows.append(("timm convnext_tiny", lambda: timm.create_model("convnext_tiny"), None, False))
    return rows


def _flops_per_image(factory: Callable[[], nn.Module], img: int) -> float:
    """2 x multiply-adds with the RNN products (counted on a meta-device copy: no memory, no weights)."""
    with torch.device("meta"):
        model = factory()
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return 2.0 * count_complexity(model, img).macs
    # No RNN: torch's counter is exact (it counts 2 FLOPs per multiply-add of convs / linears / matmuls).
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, img, img, device="meta"))
    return float(counter.get_total_flops())


def comparisons(rows: list[Row]) -> list[str]:
    """Lines pairing rows of one (dtype, batch) round by round: the bf16 recurrence against the fp32 one (fused
    engine, same mode), and seqvision's fastest row against OpenVINO's fastest."""
    kernel = fused.bf16_recurrence_kernel() if fused.available() else "reference engine"
    lines = []
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.times:
            groups.setdefault((r.dtype, r.batch), []).append(r)
    for (dtype, batch), group in groups.items():
        for r in group:
            if r.name != BF16_RECURRENCE_ROW:
                continue
            base = next((b for b in group if b.name == "seqvision fused" and b.mode == r.mode), None)
            if base is not None:
                title = f"bf16 vs fp32 recurrence ({kernel} kernel), fused, {r.mode}, batch {batch}"
                lines.append(_pair_line(title, r, base))
        ours = [r for r in group if r.name.startswith("seqvision")]
        openvino = [r for r in group if r.name.startswith("OpenVINO")]
        if ours and openvino:
            best, peer = (min(rs, key=lambda r: min(r.times)) for rs in (ours, openvino))
            title = f"{best.name} ({best.mode}) vs {peer.name} ({peer.mode}), {dtype}, batch {batch}"
            lines.append(_pair_line(title, best, peer))
    return lines


def _pair_line(title: str, row: Row, base: Row) -> str:
    fastest, q1, median, q3 = speed_ratios(row, base)
    return f"{title}: {fastest:.2f}x fastest rounds, {median:.2f}x per-round median ({q1:.2f}-{q3:.2f})"


def _fmt_table(rows: list[Row], peaks: dict[str, float], train: bool) -> str:
    head = (
        "| model | dtype / mode | batch | img/s | ms/img | peak RSS delta (MiB) | GFLOP/s | % of GEMM peak "
        "| vs baseline, fastest rounds | vs baseline, per-round median (quartiles) | baseline |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if not r.times:
            continue
        t = min(r.times)  # other processes only ever slow a round down: the fastest round is the least disturbed
        ips = r.batch / t
        gflops = ips * r.flops * (3 if train else 1) / 1e9
        dt = "bf16" if r.dtype == "bf16" else "fp32"  # int8 dynamic: compared with the fp32 peak
        base = baseline_for(r, rows)
        if base is None:
            ratios = "| | | none |"
        else:
            fastest, q1, median, q3 = speed_ratios(r, base)
            ratios = f"| {fastest:.2f}x | {median:.2f}x ({q1:.2f}-{q3:.2f}) | {base.name}, {base.mode} |"
        lines.append(
            f"| {r.name} | {r.mode} | {r.batch} | {ips:.2f} | {1e3 * t / r.batch:.1f} | {r.mem / 2**20:.0f} | "
            f"{gflops:.0f} | {100 * gflops / peaks[dt]:.0f}% {ratios}"
        )
    return "\n".join(lines)


def run_cpu(args: BenchSettings) -> int:
    """Measure every row on the CPU and print the table and the paired comparisons; 124 when SIGTERM cut it short."""
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = list(args.batch or (1, 8, 32))
    dtypes = [d.strip() for d in str(args.dtype).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise UserError(f"unknown --dtype {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    if "bf16" in dtypes and not ops.cpu_has_bf16():
        print("note: skipping bf16 - oneDNN has no bf16 path on this CPU (it needs AVX-512 or AMX)")
        dtypes = [d for d in dtypes if d != "bf16"]
    if args.train and "int8" in dtypes:
        raise UserError("int8 (dynamic quantisation) is inference only; drop int8 from --dtype or drop --train")
    if not fused.available():
        print(f"note: the fused engine is not available ({fused.load_error()}); its rows use the reference path")
    with tempfile.TemporaryDirectory(prefix="seqvision-bench-") as workdir:
        return _run_cpu(args, batches, dtypes, Path(workdir))


def _run_cpu(args: BenchSettings, batches: list[int], dtypes: list[str], workdir: Path) -> int:
    peaks: dict[str, float] = {}
    all_rows: list[Row] = []
    groups = [(dtype, batch) for dtype in dtypes for batch in batches]
    done = 0
    with _stop_on_sigterm() as stopped:
        peaks["fp32"] = gemm_peak(torch.float32)
        if "bf16" in dtypes:
            peaks["bf16"] = gemm_peak(torch.bfloat16, 3072)
        specs = _row_specs(args)
        flops = {name: _flops_per_image(factory, args.img_size) for name, factory, _, _ in specs}
        peer_specs, notes = prepare_peers(args, dtypes, workdir)
        for note in notes:
            print(f"note: {note}")
        for dtype, batch in groups:
            all_rows += _measure_group(args, dtype, batch, specs, flops, peer_specs)
            done += 1
            gc.collect()
    if stopped:
        print(
            f"note: stopped by SIGTERM (a time limit?) after {done} of {len(groups)} dtype / batch groups; "
            "the table shows the groups that finished"
        )
    kind = "training step (fwd + bwd + AdamW)" if args.train else "inference"
    print(
        f"\n{args.model}, {args.img_size} px, {kind}, {torch.get_num_threads()} threads; GEMM peak measured: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
        + "\n"
    )
    print(_fmt_table(all_rows, peaks, args.train))
    lines = comparisons(all_rows)
    if lines:
        print("\nPaired in the same rounds (> 1: the first is faster):")
        print("\n".join(f"- {line}" for line in lines))
    return 124 if stopped else 0


class _Stopped(BaseException):
    """Raised by the SIGTERM handler; a BaseException, so a row's `except Exception` does not swallow it."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[list[bool]]:
    """While inside, SIGTERM (``timeout``'s signal) ends the block early instead of the process; the yielded list
    is non-empty afterwards if it did. A long run cut off by a time limit then still prints what it measured."""
    stopped: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def handler(signum, frame):
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stopped
    except _Stopped:
        stopped.append(True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _measure_group(
    args: BenchSettings, dtype: str, batch: int, specs, flops: dict[str, float], peer_specs
) -> list[Row]:
    """Every row of one (dtype, batch): built, warmed up (its memory measured), then timed in interleaved rounds."""
    rows: list[Row] = []
    for mode in MODES[dtype]:
        for name, factory, engine, comp in specs:
            if mode == "int8 dynamic" and (comp or engine == "fused"):
                continue  # quantised LSTMs run on the reference path; compile rows add nothing here
            if name == BF16_RECURRENCE_ROW and dtype != "bf16":
                continue  # the setting changes bf16 calls only
            model = factory()
            if mode == "bf16 weights":
                model = model.bfloat16()
            if mode == "int8 dynamic":
                model = quantize_dynamic(model)
            if comp:  # the step calls the compiled callable; parameters and train()/eval() stay shared
                model = _Compiled(model, name.startswith("timm"))
            # The fused rows fix the setting both ways, so SEQVISION_BF16_RECURRENCE cannot blur the A/B.
            recurrence = {"seqvision fused": False, BF16_RECURRENCE_ROW: True}.get(name)
            step = make_step(model, batch, args.img_size, dtype, mode, args.train, engine, recurrence)
            rows.append(Row(name, mode, batch, step, flops[name]))
    for peer in (p for p in peer_specs if p.dtype == dtype):
        try:
            step = peer.make_step(batch, args.img_size)
        except Exception as e:  # e.g. a runtime that cannot compile the model: keep the other rows
            print(f"{peer.name} ({peer.mode}, batch {batch}) failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        rows.append(Row(peer.name, peer.mode, batch, step, flops["seqvision fused"]))
    # Warm-up (compilation happens here), memory per row, then interleaved timed rounds.
    for r in list(rows):
        gc.collect()
        try:
            with rss_peak() as peak:
                for _ in range(args.warmup):
                    r.step()
        except Exception as e:  # e.g. a torch.compile failure: report it, keep the other rows
            print(f"{r.name} ({r.mode}, batch {r.batch}) failed: {type(e).__name__}: {str(e)[:200]}")
            rows.remove(r)
            continue
        r.mem = peak[0]
    for _ in range(args.iters):
        for r in rows:
            t = time.perf_counter()
            r.step()
            r.times.append(time.perf_counter() - t)
    return rows


class _Compiled(nn.Module):
    """``torch.compile(model)`` that keeps the module's parameters and train() / eval() reachable."""

    def __init__(self, model: nn.Module, is_timm: bool):
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)  # static shapes: one graph per stage shape
        self.is_timm = is_timm

    def forward(self, x):
        # seqvision.ops enables Dynamo's allow_rnn for its own opaque ops; timm's nn.LSTM is left to a graph
        # break, as a plain torch.compile user of timm gets (not unrolled by Dynamo).
        # A higher recompile limit: timm's LSTM2D.forward is recompiled per stage shape around those breaks.
        ctx = (
            torch._dynamo.config.patch(allow_rnn=False, recompile_limit=64)
            if self.is_timm
            else contextlib.nullcontext()
        )
        with ctx:
            return self.compiled(x)
