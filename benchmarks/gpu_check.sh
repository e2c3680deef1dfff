#!/usr/bin/env bash
# Issue 8's GPU session in one command (at most 9 minutes; the eager part took 2 on an H100): versions, the
# Triton engine's GPU tests (parity with the reference path and with timm's model), the op-level sweep of launch
# settings against cuDNN, the model benchmark (seqvision Triton / cuDNN vs timm's sequencer2d and convnext_tiny)
# with the fastest settings, the same without the Triton LayerNorm, a kernel profile, torch.compile rows, then M
# and L while time is left. Logs and JSON (8 files) go to $OUT (default /tmp/gpu_check). Run from the
# repository root:
#
#     bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_check}
SCRATCH=$(mktemp -d)  # compile workers' logs (the device tool returns at most 8 files from $OUT)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
t0=$SECONDS
step() { echo; echo "== [$((SECONDS - t0)) s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
$PY -c "import sys, torch, triton, timm; print(sys.version.split()[0], torch.__version__, triton.__version__, timm.__version__)" \


step "compiling the sweep's kernels in 6 processes while the GPU tests run"
for i in 0 1 2 3 4 5; do
    timeout 200 $PY benchmarks/bench_triton_op.py --worker "$i/6" >"$SCRATCH/warm_$i.log" 2>&1 &
done
timeout 240 $PY -m pytest -q tests/test_triton.py -k "cuda or tuned" -n 4 -rP -p no:cacheprovider \
    >"$OUT/pytest.log" 2>&1
echo "pytest rc $?"
grep -E "passed|failed|error|relative logit error" "$OUT/pytest.log" | tail -8
wait
grep -h "compiled\|Error" "$SCRATCH"/warm_*.log | tail -12

step "op sweep: Triton settings vs cuDNN, one BiLSTM2D mixer"
timeout 170 $PY benchmarks/bench_triton_op.py --json "$OUT/op.json" >"$OUT/op.log" 2>&1
echo "op sweep rc $?"
sed -n '/^| shape/,$p' "$OUT/op.log"
TUNE=$(grep '^SEQVISION_TRITON_TUNE=' "$OUT/op.log" | tail -1 | cut -d= -f2)
echo "settings used below: SEQVISION_TRITON_TUNE=${TUNE:-<built-in defaults>}"

step "model benchmark: bf16 AMP, batch 256, 224 px"
SEQVISION_TRITON_TUNE=$TUNE timeout 200 $PY benchmarks/bench_gpu.py \
    --models seqvision:sequencer2d_s timm:sequencer2d_s timm:convnext_tiny \
    --engine triton,reference --warmup 3 --iters 10 --json "$OUT/model_s.json" >"$OUT/model_s.log" 2>&1
echo "model bench rc $?"
sed -n '/^| model/,$p' "$OUT/model_s.log"

step "A/B: nn.LayerNorm instead of the Triton LayerNorm (inference only: training uses nn.LayerNorm anyway)"
SEQVISION_TRITON_TUNE=$TUNE SEQVISION_NO_TRITON_LAYERNORM=1 timeout 120 $PY benchmarks/bench_gpu.py \
    --models seqvision:sequencer2d_s timm:sequencer2d_s --modes infer --warmup 3 --iters 10 >"$SCRATCH/ln_off.log" 2>&1
echo "LayerNorm off rc $?"
grep -E "img/s" "$SCRATCH/ln_off.log"

step "where the time goes: seqvision inference, top kernels"
timeout 60 $PY benchmarks/bench_gpu.py --models seqvision:sequencer2d_s --modes infer --warmup 2 --iters 3 \
    --profile 14 >"$OUT/profile.log" 2>&1
echo "profile rc $?"

step "torch.compile, inference (compilation included in the warm-up)"
SEQVISION_TRITON_TUNE=$TUNE timeout $((480 - (SECONDS - t0))) $PY benchmarks/bench_gpu.py --compile --modes infer \
    --models seqvision:sequencer2d_s timm:sequencer2d_s --warmup 3 --iters 10 >"$OUT/compiled.log" 2>&1
echo "compiled rc $?"
grep -E "img/s" "$OUT/compiled.log"

if ((SECONDS - t0 < 420)); then
    step "model benchmark, larger variants"
    SEQVISION_TRITON_TUNE=$TUNE timeout $((540 - (SECONDS - t0))) $PY benchmarks/bench_gpu.py \
        --models seqvision:sequencer2d_l timm:sequencer2d_l seqvision:sequencer2d_m timm:sequencer2d_m \
        --engine triton --warmup 2 --iters 6 >"$OUT/model_ml.log" 2>&1
    echo "model bench M/L rc $?"
    grep -E "img/s" "$OUT/model_ml.log"
fi
step "done"
