#!/usr/bin/env bash
# One prepared run on a lent GPU machine (bench/gpu/prepare.sh first, here): the gpu-marked
# stage tests and the device tests on CUDA, then bench_step.py and bench_epoch.py in bf16 (and
# the step once in fp32, for what bf16 buys), with nvidia-smi sampling the GPU every 0.5 s
# throughout. Everything lands in $OUT (default ./gpu_out): summary.md (per phase: exit code,
# seconds, mean / max GPU utilisation and memory; the benchmarks' images/s and NaTra/standard
# ratios), each phase's log, nvidia_smi.csv and the benchmarks' result files under bench/.
# Phases have their own time limits so the whole run stays inside ~8 minutes.
# Without CUDA it says so and exits 0 (tests/test_devices.py runs that path).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CARRY=$PWD/.gpu_carry
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$CARRY/site" ] && export PYTHONPATH="$PYTHONPATH:$CARRY/site"
[ -d "$CARRY/data" ] && export NATRA_DATA_DIR="$CARRY/data"
export NATRA_BENCH_RESULTS="$OUT/bench" NATRA_BENCH_COMMIT="${NATRA_BENCH_COMMIT:-gpu run}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA: skipping the gpu tests and the bf16 benchmarks (they need a visible CUDA device)" | tee "$OUT/summary.md"
  exit 0
fi

SMI=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used,memory.total,power.draw \
    --format=csv,noheader,nounits -lms 500 > "$OUT/nvidia_smi.csv" 2>/dev/null &
  SMI=$!
  trap 'kill $SMI 2>/dev/null' EXIT
fi
: > "$OUT/phases.csv"

phase() {  # phase NAME LIMIT_S CMD...: run it, log it, record its wall-clock span
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name,$t0,$(date +%s.%N),$rc" >> "$OUT/phases.csv"
  echo "$name: rc=$rc" ; tail -n 3 "$OUT/$name.log"
}

phase tests 240 "$PY" -m pytest -p no:cacheprovider -q -rs tests/test_gpu.py tests/test_devices.py
phase bench_step_bf16 75 "$PY" bench/bench_step.py --device cuda --precision bf16 --rounds 10
phase bench_step_fp32 60 "$PY" bench/bench_step.py --device cuda --precision fp32 --rounds 10
phase bench_epoch_bf16 120 "$PY" bench/bench_epoch.py --quick --device cuda --precision bf16 --rounds 3
[ -n "$SMI" ] && kill "$SMI" 2>/dev/null
"$PY" bench/gpu/summarize.py "$OUT" | tee "$OUT/summary.md"
