"""``seqvision bench`` (CPU table, int8 rows, GPU hand-off) at tiny sizes: the code paths, not the speed.

Speed itself is measured by the benchmark scripts (benchmarks/RESULTS.md), never asserted in a test."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqvision import ops
from seqvision.bench import gpu as benchmark_gpu
from seqvision.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script_module(name: str):
    """A script of benchmarks/ imported as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if re.match(r"\| \w", line)]


def test_cpu_bench_table_with_int8_rows(capsys):
    argv = ["bench", "--img-size", "32", "--batch", "1,2", "--dtype", "fp32,int8", "--iters", "1", "--warmup", "1",
            "--no-compile", "--no-convnext", "--no-peers"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert rows[0][:4] == ["model", "dtype / mode", "batch", "img/s"]
    body = {(r[0], r[1], int(r[2])): r for r in rows[1:]}
    for batch in (1, 2):
        for name in ("seqvision fused", "seqvision reference", "timm sequencer2d_s"):
            assert (name, "fp32", batch) in body
        assert ("seqvision reference", "int8 dynamic", batch) in body
        assert ("timm sequencer2d_s", "int8 dynamic", batch) in body
        assert ("seqvision fused", "int8 dynamic", batch) not in body  # quantised LSTMs run on the reference path
    for r in body.values():
        ips, ms = float(r[3]), float(r[4])
        # img/s has 2 decimals: below a few img/s (a loaded host) that rounding alone moves 1000 / img/s by 0.005 / ips.
        assert ips > 0 and ms == pytest.approx(1e3 / ips, rel=0.02 + 0.005 / ips, abs=0.1)
        timm_row = body[("timm sequencer2d_s", r[1], int(r[2]))]
        assert r[10] == "timm sequencer2d_s, " + r[1]
        # The fastest-round ratio is the ratio of the two rows' img/s columns (each rounded to 2 decimals).
        assert float(r[8].rstrip("x")) == pytest.approx(ips / float(timm_row[3]), rel=0.02, abs=0.01)
        median, quartiles = re.fullmatch(r"([\d.]+)x \(([\d.]+-[\d.]+)\)", r[9]).groups()
        q1, q3 = map(float, quartiles.split("-"))
        assert q1 <= float(median) <= q3
    for batch in (1, 2):
        assert body[("timm sequencer2d_s", "fp32", batch)][8:10] == ["1.00x", "1.00x (1.00-1.00)"]
    assert "GEMM peak measured: fp32" in out and "bf16" not in out.split("GEMM peak measured:")[1].splitlines()[0]


def test_speed_ratios_pair_the_rounds():
    from seqvision.bench import Row, baseline_for, speed_ratios

    def row(name, mode, times, batch=8):
        return Row(name, mode, batch, lambda: None, 1.0, list(times))

    # Round 2 was slow for both (load from elsewhere): per round the fused row is 2x, 1.5x, 2x, 1.6x, 2x timm.
    timm = row("timm sequencer2d_s", "fp32", [2.0, 6.0, 2.0, 4.0, 2.0])
    fused = row("seqvision fused", "fp32", [1.0, 4.0, 1.0, 2.5, 1.0])
    fastest, q1, median, q3 = speed_ratios(fused, timm)
    assert fastest == pytest.approx(2.0)
    assert (q1, median, q3) == pytest.approx((1.6, 2.0, 2.0))
    assert speed_ratios(timm, timm) == (1.0, 1.0, 1.0, 1.0)
    # The baseline: timm's eager row of the same dtype and batch; for bf16 the faster of timm's two modes.
    autocast = row("timm sequencer2d_s", "autocast", [3.0, 3.0])
    weights = row("timm sequencer2d_s", "bf16 weights", [2.0, 5.0])
    compiled = row("timm sequencer2d_s + torch.compile", "autocast", [1.0, 1.0])
    ours = row("seqvision fused", "autocast", [1.0, 1.0])
    other_batch = row("timm sequencer2d_s", "autocast", [0.5, 0.5], batch=1)
    convnext = row("timm convnext_tiny", "autocast", [0.1, 0.1])
    rows = [timm, fused, autocast, weights, compiled, ours, other_batch, convnext]
    assert baseline_for(ours, rows) is weights and baseline_for(fused, rows) is timm
    # A variant timm lacks: the eager reference engine; nothing to compare with: None.
    reference = row("seqvision reference", "fp32", [3.0, 3.0])
    gru = row("seqvision fused", "fp32", [1.0, 1.0])
    assert baseline_for(gru, [gru, reference]) is reference and baseline_for(gru, [gru]) is None


def test_cpu_bench_of_a_variant_timm_lacks(capsys):
    """gru_sequencer2d_s is not in timm: the table compares seqvision's engines and says why timm is missing."""
    argv = ["bench", "--model", "gru_sequencer2d_s", "--img-size", "32", "--batch", "1", "--dtype", "fp32",
            "--iters", "1", "--warmup", "1", "--no-compile", "--no-convnext", "--no-peers"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    names = [r[0] for r in _table_rows(out)[1:]]
    assert names == ["seqvision fused", "seqvision reference"], names
    assert "timm has no gru_sequencer2d_s" in out
    assert {r[10] for r in _table_rows(out)[1:]} == {"seqvision reference, fp32"}


def _pair_lines(text: str) -> dict[str, tuple[float, float, float, float]]:
    """The "Paired in the same rounds" lines: title -> (fastest, median, q1, q3)."""
    pattern = r"- (.+): ([\d.]+)x fastest rounds, ([\d.]+)x per-round median \(([\d.]+)-([\d.]+)\)"
    return {m[0]: tuple(float(v) for v in m[1:]) for m in re.findall(pattern, text)}


@pytest.mark.slow
def test_peer_rows_run_seqvisions_export(capsys):
    # OpenVINO (both hints) and ONNX Runtime rows for fp32, compared with timm like every row, and seqvision's
    # fastest row paired with OpenVINO's fastest under the table.
    ov = pytest.importorskip("openvino", reason="optional: pip install 'seqvision[deploy]'")
    ort = pytest.importorskip("onnxruntime", reason="optional: pip install 'seqvision[deploy]'")
    argv = ["bench", "--img-size", "32", "--batch", "2", "--dtype", "fp32", "--iters", "3", "--warmup", "1",
            "--no-compile", "--no-convnext"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    body = {r[0]: r for r in _table_rows(out)[1:]}
    version = ov.__version__.split("-")[0]
    peers = [f"OpenVINO {version}, {hint} hint" for hint in ("latency", "throughput")]
    peers.append(f"ONNX Runtime {ort.__version__}")
    for name in peers:
        assert body[name][1:3] == ["fp32", "2"] and body[name][10] == "timm sequencer2d_s, fp32"
        assert float(body[name][3]) > 0
    pairs = _pair_lines(out)
    (title, (fastest, median, q1, q3)), = pairs.items()
    ours = max((r for r in body.values() if r[0].startswith("seqvision")), key=lambda r: float(r[3]))
    theirs = max((body[n] for n in peers[:2]), key=lambda r: float(r[3]))
    assert title == f"{ours[0]} (fp32) vs {theirs[0]} (fp32), fp32, batch 2"
    assert fastest == pytest.approx(float(ours[3]) / float(theirs[3]), rel=0.02, abs=0.01)
    assert q1 <= median <= q3


def test_peers_export_the_seqvision_rows_weights(tmp_path, monkeypatch):
    # The peers run seqvision's ONNX export of the very weights the seqvision rows hold (``seeded_model``), so their
    # rows compare runtimes, not models. The model's head is zero-initialised, so it gets seeded random weights here:
    # with zero logits any two models would agree.
    ort = pytest.importorskip("onnxruntime", reason="optional: pip install 'seqvision[deploy]'")
    from seqvision.bench import peers
    from seqvision.bench.settings import BenchSettings

    original = peers.seeded_model

    def seeded_with_head(name):
        model = original(name)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            model.head.fc.weight.copy_(torch.randn(model.head.fc.weight.shape, generator=g))
        return model

    monkeypatch.setattr(peers, "seeded_model", seeded_with_head)
    specs, _ = peers.prepare_peers(BenchSettings(img_size=32, model="sequencer2d_s"), ["fp32"], tmp_path)
    assert any(s.name.startswith("ONNX Runtime") for s in specs)
    x = torch.randn(2, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "sequencer2d_s.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        eager = seeded_with_head("sequencer2d_s").eval()(x)
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), eager, rtol=0, atol=1e-4)


def test_peers_skipped_with_one_line_each(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as where they are not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    argv = ["bench", "--img-size", "32", "--batch", "1", "--dtype", "fp32", "--iters", "1", "--warmup", "1",
            "--no-compile", "--no-convnext"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: no ")]
    assert notes == [
        "note: no OpenVINO rows: pip install 'seqvision[deploy]' to compare with OpenVINO",
        "note: no ONNX Runtime rows: pip install 'seqvision[deploy]' to compare with ONNX Runtime",
    ]
    assert {r[0] for r in _table_rows(out)[1:]} == {"seqvision fused", "seqvision reference", "timm sequencer2d_s"}


def test_comparisons_pair_the_rounds():
    from seqvision.bench import Row, comparisons
    from seqvision.bench.settings import BF16_RECURRENCE_ROW, PEER_BF16

    def row(name, mode, times):
        return Row(name, mode, 8, lambda: None, 1.0, list(times))

    rows = [
        row("seqvision fused", "autocast", [4.0, 8.0, 4.0]),
        row(BF16_RECURRENCE_ROW, "autocast", [2.0, 8.0, 1.0]),  # per round 2x, 1x, 4x
        row("seqvision fused", "bf16 weights", [3.0, 3.0, 3.0]),  # no bf16-recurrence row of this mode: no line
        row("timm sequencer2d_s", "autocast", [9.0, 9.0, 9.0]),
        row("OpenVINO 2026.4, latency hint", PEER_BF16, [6.0, 6.0, 6.0]),
        row("OpenVINO 2026.4, throughput hint", PEER_BF16, [3.0, 4.0, 2.0]),  # OpenVINO's fastest
    ]
    lines = comparisons(rows)
    assert len(lines) == 2 and "bf16 vs fp32 recurrence" in lines[0] and ", fused, autocast, batch 8:" in lines[0]
    assert lines[0].endswith(": 4.00x fastest rounds, 2.00x per-round median (1.50-3.00)")
    # seqvision's fastest (the bf16-recurrence row, 1.0) against OpenVINO's fastest (throughput, 2.0): per round
    # 3/2, 4/8, 2/1.
    assert lines[1] == (
        f"{BF16_RECURRENCE_ROW} (autocast) vs OpenVINO 2026.4, throughput hint ({PEER_BF16}), bf16, batch 8: "
        "2.00x fastest rounds, 1.50x per-round median (1.00-1.75)"
    )


@pytest.mark.slow
@pytest.mark.skipif(not ops.cpu_has_bf16(), reason="bf16 rows need a CPU where oneDNN has a bf16 path")
def test_bf16_recurrence_rows_and_their_pairing(capsys):
    argv = ["bench", "--img-size", "32", "--batch", "1", "--dtype", "bf16", "--iters", "2", "--warmup", "1",
            "--no-compile", "--no-convnext", "--no-peers"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    body = {(r[0], r[1]): r for r in _table_rows(out)[1:]}
    pairs = _pair_lines(out)
    for mode in ("autocast", "bf16 weights"):
        ours, base = body[("seqvision fused, bf16 recurrence", mode)], body[("seqvision fused", mode)]
        title = next(t for t in pairs if t.startswith("bf16 vs fp32 recurrence") and f"fused, {mode}, batch 1" in t)
        assert pairs[title][0] == pytest.approx(float(ours[3]) / float(base[3]), rel=0.02, abs=0.01)


def test_sigterm_prints_the_finished_groups(monkeypatch, capsys):
    # A time limit (timeout's SIGTERM) during the second batch group: the first group's table still comes out.
    import os
    import signal

    from seqvision.bench import cpu

    def measure(args, dtype, batch, *rest):
        if batch == 2:
            try:  # inside a row's step: the rows' own error handling must not swallow the stop
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts this
            except Exception:
                pass
            raise AssertionError("SIGTERM did not stop the run")
        return [cpu.Row("timm sequencer2d_s", "fp32", batch, lambda: None, 1.0, [0.5, 0.25])]

    monkeypatch.setattr(cpu, "_measure_group", measure)
    argv = ["bench", "--img-size", "32", "--batch", "1,2,4", "--dtype", "fp32", "--no-compile", "--no-convnext",
            "--no-peers"]
    assert main(argv) == 124
    out = capsys.readouterr().out
    assert "stopped by SIGTERM (a time limit?) after 1 of 3 dtype / batch groups" in out
    assert [r[:3] for r in _table_rows(out)[1:]] == [["timm sequencer2d_s", "fp32", "1"]]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "sequencer2d_xs"], "sequencer2d_xs"),
        (["--dtype", "fp64"], "unknown --dtype fp64"),
        (["--dtype", "int8", "--train"], "inference only"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--device", "cuda", "--dtype", "int8"], "runs on the CPU only"),
    ],
)
def test_bench_bad_arguments_are_one_line(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no GPU")
def test_bench_cuda_without_gpu_says_so(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device is available here; use --device cpu" in err and len(err.splitlines()) == 1


def test_gpu_benchmark_code_path_on_cpu():
    rows = benchmark_gpu.benchmark(
        ["seqvision:sequencer2d_s", "timm:sequencer2d_s"], ["infer", "train"], batch=2, img_size=32, device="cpu",
        amp="none", engine="reference", warmup=1, iters=1, log=lambda _: None,
    )
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("seqvision:sequencer2d_s", "infer"), ("seqvision:sequencer2d_s", "train"),
        ("timm:sequencer2d_s", "infer"), ("timm:sequencer2d_s", "train"),
    ]
    assert all(r["img_s"] > 0 and "error" not in r for r in rows), rows
    table = benchmark_gpu.format_table(rows)
    assert "1.00x" in table  # timm's own rows are the baseline


def test_gpu_benchmark_several_engines_and_profile_on_cpu():
    rows = benchmark_gpu.benchmark(
        ["seqvision:sequencer2d_s"], ["infer"], batch=1, img_size=32, device="cpu", amp="none",
        engine="auto,reference", warmup=1, iters=1, log=lambda _: None, profile=3,
    )
    assert [r["engine"] for r in rows] == ["auto", "reference"]
    assert all("error" not in r and "Self CPU" in r["profile"] for r in rows), rows
    with pytest.raises(ValueError, match="engine 'cudnn'"):
        benchmark_gpu.benchmark(["seqvision:sequencer2d_s"], ["infer"], device="cpu", engine="triton,cudnn")


def test_gpu_row_names_the_triton_settings_used():
    row = dict(model="seqvision:sequencer2d_s", engine="triton", mode="infer", img_s=10.0, peak_gib=1.0,
               fallback_calls=0, triton_settings={"torch.bfloat16, D=96": "hidden state split 64 + 32"})
    assert benchmark_gpu.format_row(row).endswith("[torch.bfloat16, D=96: hidden state split 64 + 32]")


def test_gpu_table_compares_with_timm_eager_when_compiled_rows_follow():
    row = lambda model, compiled, img_s: dict(model=model, mode="infer", img_s=img_s, peak_gib=1.0, compiled=compiled)
    rows = [row("timm:sequencer2d_s", False, 100.0), row("seqvision:sequencer2d_s", False, 150.0),
            row("timm:sequencer2d_s", True, 200.0), row("seqvision:sequencer2d_s", True, 300.0)]
    table = benchmark_gpu.format_table(rows)
    assert "vs timm:sequencer2d_s eager" in table
    assert [r[3] for r in _table_rows(table)[1:]] == ["1.00x", "1.50x", "2.00x", "3.00x"]
    only_compiled = benchmark_gpu.format_table(rows[2:])  # a --compile run: its own timm row is the baseline
    assert [r[3] for r in _table_rows(only_compiled)[1:]] == ["1.00x", "1.50x"]
    alone = benchmark_gpu.format_table(rows[1:2])  # a profile run of seqvision alone: no timm row to compare with
    assert [r[3] for r in _table_rows(alone)[1:]] == ["no baseline"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")
def test_triton_op_sweep_smoke_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEQVISION_TRITON_INTERPRET": "1"}
    script = Path(__file__).parent.parent / "benchmarks" / "bench_triton_op.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| tiny | cudnn |") for line in lines)
    for setting in ("32:16:1:1:0", "32:16:1:1:1"):  # the hidden state in one piece, then split in two
        triton_row = next(line for line in lines if line.startswith(f"| tiny | triton | {setting} |"))
        assert float(triton_row.split("|")[-2].strip()) < 2e-2  # bf16 error against fp32
    assert lines[-1] in ("SEQVISION_TRITON_TUNE=32:16:1:1:0", "SEQVISION_TRITON_TUNE=32:16:1:1:1")


def test_bf16_skipped_where_the_cpu_has_no_bf16_hardware(monkeypatch, capsys):
    from seqvision import ops

    monkeypatch.setattr(ops, "cpu_has_bf16", lambda: False)
    argv = ["bench", "--img-size", "32", "--batch", "1", "--dtype", "bf16", "--iters", "1", "--warmup", "1",
            "--no-compile", "--no-convnext"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipping bf16" in out and "autocast" not in out and "bf16 weights" not in out


def test_cpu_has_bf16_matches_the_cpu_flags():
    from pathlib import Path

    from seqvision import ops

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "flags" not in cpuinfo.read_text():
        pytest.skip("no /proc/cpuinfo flags to compare with")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    # oneDNN runs bf16 natively with AVX512-BF16 / AMX and fast enough with AVX-512 (BW, VL, DQ) alone.
    expected = bool(flags & {"avx512_bf16", "amx_bf16"}) or {"avx512bw", "avx512vl", "avx512dq"} <= flags
    assert ops.cpu_has_bf16() == expected


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_fresh_process_benchmark_runs_each_row_alone():
    script = BENCHMARKS / "bench_memory.py"
    args = ["--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "1", "--rounds", "2", "--tuned-malloc"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fresh process (2 x 1 timed steps), glibc malloc tuned (MALLOC_MMAP_MAX_=0" in r.stdout
    rows = {row[0]: row for row in _table_rows(r.stdout)[1:]}
    assert set(rows) == {"seqvision fused", "seqvision reference", "timm"}
    for _name, fast, median, _speed, peak, before, _ratio, growth, _gratio, faults, sys_s in rows.values():
        assert 0 < float(fast) <= float(median)
        assert float(peak) >= float(before) > 100  # torch alone is more than 100 MiB resident
        assert 0 < float(growth) < float(peak)  # the steps allocated something; the libraries were there before
        assert float(faults) >= 0 and float(sys_s) >= 0
    timm, fused = rows["timm"], rows["seqvision fused"]
    assert timm[3] == "1.00x / 1.00x" and timm[6] == "1.00x" and timm[8] == "1.00x"
    for shown, t, f in zip(fused[3].split(" / "), map(float, timm[1:3]), map(float, fused[1:3]), strict=True):
        rounding = t / f * (0.5 / t + 0.5 / f) + 0.005  # the table's ms are whole numbers, its ratios 2 decimals
        assert float(shown.rstrip("x")) == pytest.approx(t / f, abs=rounding)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_fresh_process_benchmark_of_inference(monkeypatch):
    script = BENCHMARKS / "bench_memory.py"
    args = ["--inference", "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "1"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batch 2, inference, fp32, CPU" in r.stdout
    rows = {row[0]: row for row in _table_rows(r.stdout)[1:]}
    assert set(rows) == {"seqvision fused", "seqvision reference", "timm"}
    # What a row process runs: the flag reaches the step it times.
    bench_memory = _script_module("bench_memory")
    import seqvision.bench

    made = []
    real = seqvision.bench.make_step
    monkeypatch.setattr(seqvision.bench, "make_step", lambda *a: made.append(a[5]) or real(*a))
    for train in (False, True):
        result = bench_memory.measure("seqvision fused", "sequencer2d_s", 1, 32, 1, 1, train=train)
        assert len(result["times"]) == 1 and result["peak"] > 0 and result["growth"] >= 0
    assert made == [False, True]


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--rounds", "-1"), ("--batch", "0"), ("--warmup", "-2")])
def test_fresh_process_benchmark_refuses_bad_counts(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script_module("bench_memory").main([flag, value])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and out.out == ""
    assert f"argument {flag}: must be an integer of" in out.err, out.err


def test_fresh_process_benchmark_of_a_variant_timm_lacks():
    script = BENCHMARKS / "bench_memory.py"
    args = ["--model", "gru_sequencer2d_s", "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "1"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "timm has no gru_sequencer2d_s; the ratios are to seqvision's reference engine" in r.stdout
    rows = {row[0]: row for row in _table_rows(r.stdout)[1:]}
    assert set(rows) == {"seqvision fused", "seqvision reference"}
    assert rows["seqvision reference"][3] == "1.00x / 1.00x" and rows["seqvision reference"][6] == "1.00x"
    assert rows["seqvision reference"][8] == "1.00x"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its ptxas)")
def test_split_kernels_fit_the_shared_memory_of_consumer_gpus(capsys):
    """Compiled for an RTX 40xx (sm_89, 99 KiB per block) without a GPU: at D = 96 the one-piece kernels need more
    shared memory than that, the split ones (what the engine falls back to there) less."""
    assert _script_module("triton_resources").main(["--sm", "89", "--layout", "D=96"]) == 0
    rows = [r for r in _table_rows(capsys.readouterr().out) if r[0].startswith("RTX 40xx")]
    assert len(rows) == 4, rows
    for _gpu, layout, kernel, _regs, _spilled, shared, limit, fits in rows:
        if "one piece" in layout:
            assert fits == "NO" and float(shared) > float(limit) == 99, (layout, kernel, shared)
        else:
            assert fits == "yes" and float(shared) <= 99, (layout, kernel, shared)


def _script_calls(script: str, command: str) -> list[list[str]]:
    """The arguments of every ``command`` call in a shell script, continuation lines joined, redirections and
    shell expansions of $OUT dropped or filled in."""
    calls = re.findall(re.escape(command) + r"((?:[^\n]*\\\n)*[^\n]*)", script)
    words = [shlex.split(call.replace("\\\n", " ")) for call in calls]
    return [[w.replace("$OUT", "/tmp/out") for w in ws if not re.match(r"^\d?>", w)] for ws in words]


def test_cpu_check_script_command_lines_parse():
    # benchmarks/cpu_check.sh is for a lent machine whose CPU has bf16 hardware (device time, rarely): its
    # calls are parsed here with the real parsers; every bench call runs on two threads, as the issue measures.
    from seqvision.commands.bench import build_parser

    script = (BENCHMARKS / "cpu_check.sh").read_text()
    bench_calls = [args[2:] for args in _script_calls(script, "\nbench ") + _script_calls(script, "    bench ")]
    # inference at batch 8, 32, training, inference at batch 1, compiled rows
    assert len(bench_calls) == 5, bench_calls
    parsed = [build_parser().parse_args(args) for args in bench_calls]
    for p in parsed:
        assert p.dtype.split(",")[0] == "bf16" and "fp32" in p.dtype and p.model == "sequencer2d_s"
    # The targets' figures: bf16 inference at batch 8 and 32 against timm, convnext_tiny and the peers (the
    # fused engine's bf16-recurrence row is in every bf16 table), training at batch 8, inference at batch 1.
    inference = {p.batch[0]: p for p in parsed[:4] if not p.train}
    assert sorted(inference) == [1, 8, 32] and not inference[8].no_convnext
    assert not any(p.no_peers for p in inference.values())
    assert [p.batch for p in parsed if p.train] == [[8]]
    assert '$PY -m seqvision bench --threads 2 "$@"' in script
    logits = _script_calls(script, "benchmarks/bf16_logits.py")
    assert len(logits) == 1
    parsed_logits = _script_module("bf16_logits").build_parser().parse_args(logits[0])
    assert parsed_logits.batch == 8 and parsed_logits.img_size == 224 and parsed_logits.threads == 2
    memory_calls = _script_calls(script, "benchmarks/bench_memory.py")
    assert len(memory_calls) == 1
    parsed = _script_module("bench_memory").build_parser().parse_args(memory_calls[0])
    assert parsed.batch == 8 and not parsed.inference
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "cpu_check.sh")]).returncode == 0  # the shell parses it


def test_gpu_check_script_command_lines_parse():
    # benchmarks/gpu_check.sh runs only where a GPU is lent (minutes of device time, rarely): a renamed or
    # re-typed flag would waste that run, so its bench_gpu.py calls are parsed here with the real parser.
    calls = _script_calls((BENCHMARKS / "gpu_check.sh").read_text(), "benchmarks/bench_gpu.py")
    assert len(calls) >= 4, calls
    for args in calls:
        _script_module("bench_gpu").build_parser().parse_args(args)
