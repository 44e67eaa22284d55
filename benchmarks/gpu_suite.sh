#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent CUDA machine:
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh
# Runs the `gpu`-marked tests, then each kernel benchmark (each under its own time limit),
# writing full logs and JSON under $OUT and printing a short summary last.
set -u
OUT=${OUT:-/tmp/tessera-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))' | tee "$OUT/device.txt"

run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" >>"$OUT/summary.txt"
}

run gpu-tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels
for bench in ${BENCHES:-attention rms_norm swiglu paged_decode paged_decode_splits kd_loss int8_matmul gemv}; do
  script=benchmarks/bench_$bench.py
  [ -f "$script" ] && run "bench_$bench" 150 python3 "$script" --out "$OUT/bench_$bench.json"
done
echo "== summary"; cat "$OUT/summary.txt"
echo "== gpu tests"; tail -n 15 "$OUT/gpu-tests.log"
for f in "$OUT"/bench_*.log; do echo "== $(basename "$f")"; tail -n 14 "$f"; done
