#!/usr/bin/env bash
# Every CPU figure of the bf16 / AMX targets in one command, for a machine whose CPU has bf16 hardware (AMX or
# AVX512-BF16), such as the host CPU of a lent GPU machine: on a CPU without it bf16 is emulated and the bf16
# rows measure the emulation. Pinned to two physical cores (the issue's setting) with taskset and --threads 2.
# At most BUDGET seconds (default 540: a lent machine's 10-minute command limit, with room to start). Steps, the
# targets' figures first:
#   CPU, its bf16 / AMX flags and GEMM peaks; the fused engine's build and the tests that matter on this CPU
#   (bf16, the AMX recurrence kernel, OpenVINO export; every core);
#   inference at batch 8 (bf16 then fp32; timm, convnext_tiny, OpenVINO and ONNX Runtime rows, and the fused
#   engine with fp32 and with bf16 recurrent products: the A/B), at batch 32, a training step at batch 8, inference
#   at batch 1, the bf16 logit error against fp32 next to timm's; then, while time is left, training memory in
#   fresh processes and the torch.compile rows.
# Each bench call has a time limit; one cut off prints the groups it finished (bf16 first) and "rc 124".
# Logs go to $OUT (default /tmp/cpu_check). Run from the repository root (pip install -e '.[deploy]' for the
# OpenVINO / ONNX Runtime rows; without them those rows are left out with one line each):
#
#     bash benchmarks/cpu_check.sh          # CORES=0,5 to choose the two CPUs yourself, BUDGET=900 for more time
#
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/cpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
# The first CPU this process may use, and the first one that is not its SMT sibling: two physical cores.
CORES=${CORES:-$($PY -c "
import os
cpus = sorted(os.sched_getaffinity(0))
try:
    text = open(f'/sys/devices/system/cpu/cpu{cpus[0]}/topology/thread_siblings_list').read().strip()
except OSError:
    text = str(cpus[0])
siblings = set()
for part in text.split(','):  # e.g. '0,8' or '0-1'
    first, _, last = part.partition('-')
    siblings.update(range(int(first), int(last or first) + 1))
others = [c for c in cpus if c not in siblings] or cpus[1:] or cpus
print(f'{cpus[0]},{others[0]}')
")}
echo "pinned to CPUs $CORES; budget $BUDGET s"
PIN="taskset -c $CORES"
command -v taskset >/dev/null || { echo "no taskset here: running unpinned, 2 threads"; PIN=""; }
t0=$SECONDS
step() { echo; echo "== [$((SECONDS - t0)) s] $*"; }
left() { echo $((BUDGET - (SECONDS - t0))); }
# limit CAP RESERVE: seconds for a step: CAP, or less so that RESERVE seconds stay for the steps after it.
limit() {
    local l=$(($(left) - $2))
    ((l > $1)) && l=$1
    ((l < 20)) && l=20
    echo $l
}

step "CPU and software"
lscpu | grep -E "^(Model name|CPU\(s\)|Thread\(s\) per core|L2 cache|L3 cache):"
echo "bf16 / AMX flags: $(grep -o -w -E 'avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
$PIN $PY - <<'EOF'
import sys, time, torch, timm
from seqvision import ops
torch.set_num_threads(2)
print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__)
for name in ("openvino", "onnxruntime"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed (pip install -e '.[deploy]')")
print("ATen CPU capability:", torch.backends.cpu.get_cpu_capability(), "| oneDNN bf16:", ops.cpu_has_bf16())
# Without bf16 hardware a bf16 matmul is emulated: minutes for this size, so it is left out.
for dtype, n in ((torch.float32, 2048), (torch.bfloat16, 3072))[: 2 if ops.cpu_has_bf16() else 1]:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter(); [a @ b for _ in range(3)]; t = (time.perf_counter() - t) / 3
    print(f"{dtype} {n}^3 matmul on 2 threads: {2 * n**3 / t / 1e9:.0f} GFLOP/s")
EOF

step "building the fused CPU engine (every core)"
timeout "$(limit 180 360)" $PY -c "
from seqvision.ops import fused
assert fused.available(), fused.load_error()
print('fused engine ready; bf16 recurrent products run on the', fused.bf16_recurrence_kernel(), 'kernel')"

step "tests: bf16 and the bf16 recurrence (the AMX kernel where this CPU has AMX), OpenVINO export (every core)"
timeout "$(limit 150 320)" $PY -m pytest -v -p no:cacheprovider -m "not slow" tests/test_fused.py tests/test_deploy.py \
    -k "bf16 or openvino" >"$OUT/pytest.log" 2>&1
echo "pytest rc $? (rc 124: cut off; the counts below are of the tests that ran)"
echo "$(grep -c " PASSED" "$OUT/pytest.log") passed, $(grep -c -E " (FAILED|ERROR)" "$OUT/pytest.log") failed"
grep -E " (FAILED|ERROR)|recurrence_kernel_follows" "$OUT/pytest.log" | tail -8

# bench LOG SECONDS ARGS: one `seqvision bench` table on the two pinned cores; cut off by its limit, it prints the
# dtype / batch groups it finished.
bench() {
    local log=$1 limit=$2
    shift 2
    timeout "$limit" $PIN $PY -m seqvision bench --threads 2 "$@" >"$OUT/$log.log" 2>&1
    echo "$log rc $?"
    grep -E "^note:| failed: " "$OUT/$log.log"  # rows left out, a row that failed to run, a cut-off run
    sed -n '/GEMM peak/,$p' "$OUT/$log.log"
}
step "inference, sequencer2d_s 224 px, batch 8: bf16 (autocast, bf16 weights), fp32; peers, convnext_tiny"
bench inference_8 "$(limit 150 200)" --batch 8 --dtype bf16,fp32 --iters 4 --no-compile --no-reference
step "inference, batch 32"
bench inference_32 "$(limit 150 140)" --batch 32 --dtype bf16,fp32 --iters 2 --warmup 1 --no-compile \
    --no-reference --no-convnext
step "training step (forward + backward + AdamW), batch 8: bf16, fp32"
bench training "$(limit 120 80)" --batch 8 --dtype bf16,fp32 --train --iters 2 --warmup 1 --no-compile \
    --no-reference --no-convnext
step "inference, batch 1"
bench inference_1 "$(limit 70 40)" --batch 1 --dtype bf16,fp32 --iters 5 --no-compile --no-reference --no-convnext
step "bf16 logits against fp32, seqvision's bf16 settings and timm's (same weights, batch 8, 224 px)"
timeout "$(limit 60 0)" $PIN $PY benchmarks/bf16_logits.py --batch 8 --img-size 224 --threads 2 >"$OUT/logits.log" 2>&1
echo "logits rc $?"
sed -n '/^| /,$p' "$OUT/logits.log"

if (($(left) > 90)); then
    step "training memory and speed, each implementation in a fresh process (fp32, batch 8)"
    OMP_NUM_THREADS=2 timeout $(($(left) - 10)) $PIN $PY benchmarks/bench_memory.py --batch 8 --warmup 1 --steps 1 \
        >"$OUT/memory.log" 2>&1
    echo "memory rc $?"
    sed -n '/^| /,$p' "$OUT/memory.log"
fi
if (($(left) > 120)); then
    step "torch.compile rows, inference at batch 8 (compilation included in the warm-up)"
    bench compiled "$(limit 600 10)" --batch 8 --dtype bf16,fp32 --iters 3 --no-convnext --no-peers
fi
step "done"
