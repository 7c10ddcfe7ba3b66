#!/usr/bin/env bash
# One command for the first minutes on a GPU: the kernel tests on CUDA, then benchmarks/kernel_speed.py in bf16
# and fp32 (T5-small and BERT-base layer shapes; 1, 8, 1024 and 8192 tokens; Shapeshifter rank 16 and the presets'
# KPD rank 4 with 4x4 blocks; dense, PyTorch factored, materialized and Triton), collected into ONE markdown table
# with each row's time, achieved TFLOP/s and GB/s, its ratio to the dense layer, and the device's measured matmul
# and copy peaks. Meant to finish in under 8 minutes on one H100/H200 (an estimate: it has not run on a GPU yet;
# the tests are cut off at 300 s).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]          # on a GPU machine (default OUTPUT_DIR: gpu_check_out)
#   bash benchmarks/gpu_check.sh --cpu-smoke [DIR]     # anywhere: the benchmark step at toy size on CPU, tests listed
#
# Writes OUTPUT_DIR/gpu_check.md (the table, the device, the date, the test summary) and OUTPUT_DIR/*.log.
set -euo pipefail

mode=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  mode=cpu
  shift
fi
out="${1:-gpu_check_out}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
if [[ -x "$root/.venv/bin/python" && -z "${PYTHON:-}" ]]; then
  python="$root/.venv/bin/python"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
table="$out/rows.md"
report="$out/gpu_check.md"
: > "$table"

kernel_tests=(
  tests/test_triton_kron_linear.py tests/test_library_ops.py tests/test_dispatch.py tests/test_triton_gather.py
  tests/test_triton_segment.py tests/test_triton_tensor_train.py tests/test_block_sparse_kernels.py
  tests/test_library_ops_gathers.py
)

if [[ "$mode" == gpu ]]; then
  if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $python; use --cpu-smoke to check the script on CPU" >&2
    exit 2
  fi
  device="$("$python" -c "import torch; print(torch.cuda.get_device_name())")"
  benchmark=(--device cuda --tokens 1,8,1024,8192 --kpd-block 4 --repeats 20)
  dtypes=(bfloat16 float32)
  echo "== kernel tests on $device"
  set +e
  timeout 300 "$python" -m pytest -q -p no:cacheprovider "${kernel_tests[@]}" > "$out/tests.log" 2>&1
  tests_status=$?
  set -e
  tests_summary="$(tail -n 1 "$out/tests.log")"
else
  device="CPU smoke run (toy settings, not a measurement)"
  benchmark=(--device cpu --tokens 8 --layers "T5-small attn" --kpd-block 4 --repeats 1 --threads 1)
  dtypes=(float32)
  tests_status=0
  tests_summary="dry run, not run: $python -m pytest -q ${kernel_tests[*]}"
fi

for dtype in "${dtypes[@]}"; do
  echo "== kernel_speed.py $dtype"
  "$python" benchmarks/kernel_speed.py --dtype "$dtype" "${benchmark[@]}" --markdown "$table" \
    > "$out/kernel_speed_$dtype.log" 2>&1
done

{
  echo "# GPU check: $device, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Kernel tests (exit $tests_status): $tests_summary"
  echo
  echo "Forward + backward of one linear layer, median of the timed steps; tokens 1 x N. /dense: time over the"
  echo "dense layer's at the same shape. Roofline: max(flops / peak matmul, bytes / peak copy) over the time."
  echo
  cat "$table"
} > "$report"
rm -f "$table"
echo "== wrote $report"
