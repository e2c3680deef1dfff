"""One BiLSTM2D token mixer on a GPU: the Triton engine's launch settings against cuDNN (nn.LSTM), same run.

Shapes are Sequencer2D-S's blocks at 224 px (stage 1: 32x32 tokens, C=192, D=48; stages 2-4: 16x16, C=384,
D=96), batch 256, bf16 autocast. For each shape it times inference (forward under inference_mode) and a
training step (forward + backward) of the whole mixer (input projection + recurrence), the Triton recurrence
alone, and the projection GEMM alone; every Triton setting is also checked against the fp32 reference.

    python benchmarks/bench_triton_op.py                     # every candidate setting, prints a table
    python benchmarks/bench_triton_op.py --worker 0/4        # only compile the kernels of every 4th candidate

``--worker i/n`` fills Triton's on-disk cache, so n processes started side by side compile the candidates in
parallel and the timing run afterwards compiles nothing. The last line printed is the fastest setting per
BLOCK_D in ``SEQVISION_TRITON_TUNE`` form (the sum of inference and training time decides). ``--device cpu``
is a smoke test of the code path only (a tiny shape, two settings, in Triton's interpreter: set
TRITON_INTERPRET=1 and SEQVISION_TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

# name -> (H, W, C, D)
SHAPES = {"stage1": (32, 32, 192, 48), "stage2-4": (16, 16, 384, 96)}
# BLOCK_D -> candidate (BLOCK_N, num_warps, prefetch, split); the first is the built-in default. split: the hidden
# state in two pieces (48 = 32 + 16, 96 = 64 + 32; what RTX 30xx/40xx run at D = 96) instead of one padded one.
# Split with 32 sequences per program is left out: ptxas (sm_90) spills 1-10 KB per thread there.
CANDIDATES = {
    64: [(16, 8, 1, 0), (32, 8, 1, 0), (16, 4, 1, 0), (16, 8, 1, 1)],
    128: [(16, 8, 1, 0), (16, 4, 1, 0), (32, 8, 1, 0), (16, 8, 1, 1), (16, 4, 1, 1)],
}


def _block_d(D: int) -> int:
    from seqvision.ops.triton_lstm import block_size  # imported late: main() puts the repository on sys.path

    return block_size(D)


def _tune(block_d: int, cand: tuple[int, ...]) -> str:
    return ":".join(str(v) for v in (block_d, *cand))


def _setup(shape: tuple[int, int, int, int], batch: int, device: str):
    H, W, C, D = shape
    torch.manual_seed(0)
    make = lambda: nn.LSTM(C, D, batch_first=True, bidirectional=True).to(device)
    rv, rh = make(), make()
    x = torch.randn(batch, H, W, C, device=device, requires_grad=True)
    return x, rv, rh


def _forward(engine: str, x, rv, rh) -> torch.Tensor:
    """The mixer under bf16 autocast: cuDNN (the reference path) or the Triton engine."""
    from seqvision.ops.reference import rnn2d_reference
    from seqvision.ops.triton_lstm import rnn2d_triton

    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        if engine == "cudnn":
            return rnn2d_reference(x, rv, rh, "cat")
        y = rnn2d_triton(x, rv, rh, "cat")
    if y is None:
        raise RuntimeError("the Triton engine declined this configuration")
    return y


def _runner(engine: str, x, rv, rh, mode: str) -> Callable[[], None]:
    forward = lambda: _forward(engine, x, rv, rh)
    if mode == "infer":

        def step():
            with torch.inference_mode():
                forward()

        return step
    grad = None

    def train_step():
        nonlocal grad
        y = forward()
        if grad is None:
            grad = torch.randn_like(y)
        y.backward(grad)

    return train_step


def _recurrence_only(x, rv, rh) -> tuple[Callable[[], None], Callable[[], None]]:
    """The Triton recurrence and the projection GEMM, each alone (inference), at the mixer's shapes."""
    import torch.nn.functional as F

    from seqvision.ops.triton_lstm import rnn2d_triton_op

    w_ih = torch.cat([rv.weight_ih_l0, rv.weight_ih_l0_reverse, rh.weight_ih_l0, rh.weight_ih_l0_reverse])
    b = torch.cat([rv.bias_ih_l0, rv.bias_ih_l0_reverse, rh.bias_ih_l0, rh.bias_ih_l0_reverse])
    w_hh = torch.stack([rv.weight_hh_l0, rv.weight_hh_l0_reverse, rh.weight_hh_l0, rh.weight_hh_l0_reverse])
    xb, wb, bb = x.detach().bfloat16(), w_ih.detach().bfloat16(), b.detach().bfloat16()
    gx = F.linear(xb, wb, bb)
    w_hh = w_hh.detach().bfloat16()
    return (lambda: rnn2d_triton_op(gx, w_hh, [0, 1, 2, 3], False)), (lambda: F.linear(xb, wb, bb))


def _rel_err(engine: str, x, rv, rh, ref: torch.Tensor) -> float:
    with torch.no_grad():
        y = _forward(engine, x, rv, rh)
    return ((y.float() - ref).norm() / ref.norm()).item()


def jobs() -> list[tuple[str, int, tuple[int, ...]]]:
    return [(name, _block_d(s[3]), c) for name, s in SHAPES.items() for c in CANDIDATES[_block_d(s[3])]]


def warm(worker: int, n_workers: int, batch: int) -> None:
    """Compile (by running once) the kernels of every n-th candidate; Triton caches them on disk."""
    for k, (name, block_d, cand) in enumerate(jobs()):
        if k % n_workers != worker:
            continue
        os.environ["SEQVISION_TRITON_TUNE"] = _tune(block_d, cand)
        x, rv, rh = _setup(SHAPES[name], batch, "cuda")
        try:
            for mode in ("infer", "train"):
                _runner("triton", x, rv, rh, mode)()
            torch.cuda.synchronize()
        except Exception as e:  # the timing run records the failure of this setting
            print(f"worker {worker}: {name} {_tune(block_d, cand)} failed: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"worker {worker}: compiled {name} {_tune(block_d, cand)}", flush=True)


def _timer(device: str, rep_ms: int) -> Callable[[Callable[[], None]], float]:
    """Median milliseconds of ``fn``: CUDA events through triton's do_bench on a GPU, a host clock on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=max(5, rep_ms // 5), rep=rep_ms, return_mode="median")

    def host(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    return host


def run(batch: int, rep_ms: int, device: str = "cuda", shapes=SHAPES, candidates=CANDIDATES) -> list[dict]:
    bench = _timer(device, rep_ms)
    torch.backends.cudnn.benchmark = True
    rows = []
    for name, shape in shapes.items():
        H, W, C, D = shape
        x, rv, rh = _setup(shape, batch, device)
        with torch.no_grad():
            ref = _runner_output_fp32(x, rv, rh)
        tokens = batch * H * W
        rec_gflop = tokens * 4 * 2 * 4 * D * D / 1e9  # h @ W_hh^T of 4 directions
        proj_gflop = tokens * 2 * C * 4 * 4 * D / 1e9
        # cuDNN with its algorithm search (the baseline) and without: one H100 run measured the stage-1 mixer
        # 2.0e-1 off fp32 under bf16 autocast (stages 2-4: 4.7e-4); this shows whether the search's pick did it.
        base = None
        for search in (True, False):
            torch.backends.cudnn.benchmark = search
            t = {m: bench(_runner("cudnn", x, rv, rh, m)) for m in ("infer", "train")}
            base = base or t
            engine = "cudnn" if search else "cudnn, benchmark off"
            row = dict(shape=name, engine=engine, setting="", infer_ms=t["infer"], train_ms=t["train"])
            row |= dict(rel_err=_rel_err("cudnn", x, rv, rh, ref))
            row |= dict(infer_x_cudnn=base["infer"] / t["infer"], train_x_cudnn=base["train"] / t["train"])
            rows.append(row)
        torch.backends.cudnn.benchmark = True
        proj_ms = None
        for cand in candidates[_block_d(D)]:
            tune = _tune(_block_d(D), cand)
            os.environ["SEQVISION_TRITON_TUNE"] = tune
            try:
                t = {m: bench(_runner("triton", x, rv, rh, m)) for m in ("infer", "train")}
                rec, proj = _recurrence_only(x, rv, rh)
                rec_ms = bench(rec)
                proj_ms = proj_ms or bench(proj)
                err = _rel_err("triton", x, rv, rh, ref)
            except Exception as e:  # a setting that does not compile or fit: record, go on
                rows.append(dict(shape=name, engine="triton", setting=tune, error=f"{type(e).__name__}: {e}"[:200]))
                print(rows[-1], flush=True)
                continue
            rows.append(
                dict(
                    shape=name,
                    engine="triton",
                    setting=tune,
                    infer_ms=t["infer"],
                    train_ms=t["train"],
                    recurrence_ms=rec_ms,
                    recurrence_tflops=rec_gflop / rec_ms,
                    projection_ms=proj_ms,
                    projection_tflops=proj_gflop / proj_ms,
                    rel_err=err,
                    infer_x_cudnn=base["infer"] / t["infer"],
                    train_x_cudnn=base["train"] / t["train"],
                )
            )
            print(rows[-1], flush=True)
        os.environ.pop("SEQVISION_TRITON_TUNE", None)
    return rows


def _runner_output_fp32(x, rv, rh) -> torch.Tensor:
    from seqvision.ops.reference import rnn2d_reference

    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return rnn2d_reference(x, rv, rh, "cat").float()
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def best_settings(rows: Sequence[dict]) -> str:
    best: dict[int, tuple[float, str]] = {}
    for r in rows:
        if r["engine"] != "triton" or "error" in r:
            continue
        block_d = int(r["setting"].split(":")[0])
        score = r["infer_ms"] + r["train_ms"]
        if block_d not in best or score < best[block_d][0]:
            best[block_d] = (score, r["setting"])
    return ",".join(s for _, s in sorted(best.values(), key=lambda v: v[1]))


def table(rows: Sequence[dict]) -> str:
    out = [
        "| shape | engine | setting | infer ms | train ms | infer x cuDNN | train x cuDNN | recurrence ms (TFLOP/s) "
        "| projection ms (TFLOP/s) | rel. error vs fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['engine']} | {r['setting']} | {r['error']} |||||||")
            continue
        rec = f"{r['recurrence_ms']:.3f} ({r['recurrence_tflops']:.1f})" if "recurrence_ms" in r else ""
        proj = f"{r['projection_ms']:.3f} ({r['projection_tflops']:.0f})" if "projection_ms" in r else ""
        ix, tx = r.get("infer_x_cudnn", 1.0), r.get("train_x_cudnn", 1.0)
        out.append(
            f"| {r['shape']} | {r['engine']} | {r['setting']} | {r['infer_ms']:.3f} | {r['train_ms']:.3f} "
            f"| {ix:.2f}x | {tx:.2f}x | {rec} | {proj} | {r['rel_err']:.1e} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench_triton_op",
        description=__doc__.split("\n")[0],
        epilog="example: python benchmarks/bench_triton_op.py --batch 256 --json op.json",
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rep-ms", type=int, default=100, help="milliseconds of timed repeats per measurement")
    p.add_argument("--worker", help="i/n: only compile every n-th candidate's kernels, starting at the i-th")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test in Triton's interpreter)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.device == "cpu":
        tiny = {"tiny": (3, 4, 8, 20)}  # D = 20: one piece of 32, or split 16 + 16
        rows = run(2, 1, "cpu", tiny, {32: [(16, 1, 1, 0), (16, 1, 1, 1)]})
        print(table(rows))
        print("SEQVISION_TRITON_TUNE=" + best_settings(rows))
        return 0
    if not torch.cuda.is_available():
        print("bench_triton_op: no CUDA device available; nothing to time.")
        return 0
    if args.worker:
        i, n = (int(v) for v in args.worker.split("/"))
        warm(i, n, args.batch)
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, bf16 autocast")
    rows = run(args.batch, args.rep_ms)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print()
    print("SEQVISION_TRITON_TUNE=" + best_settings(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
