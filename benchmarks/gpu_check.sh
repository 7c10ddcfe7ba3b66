#!/usr/bin/env bash
# One command for the few minutes of a lent GPU: the kernel tests on CUDA, then benchmarks/kernel_speed.py (T5-small
# and BERT-base layer shapes; Shapeshifter rank 16 and the presets' KPD rank 4 with 4x4 blocks; dense, PyTorch
# factored, materialized and Triton) in bf16 at 8192, 8, 1024 and 1 tokens and in fp32 at 8192, collected into ONE
# markdown table with each row's time, achieved TFLOP/s and GB/s, its ratio to the dense layer and the device's
# measured matmul and copy peaks, and benchmarks/generation.py (T5-small generate and forward, dense against
# compressed) in bf16. Each step has its own time limit and the report is rewritten after each one, so a step that
# fails or runs out of time costs only its own rows; 8 minutes 30 at most.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]          # on a GPU machine (default OUTPUT_DIR: gpu_check_out)
#   bash benchmarks/gpu_check.sh --cpu-smoke [DIR]     # anywhere: the benchmark step at toy size on CPU, tests listed
#
# Writes OUTPUT_DIR/gpu_check.md (the device, the date, the test summary, the table, the generation table) and
# OUTPUT_DIR/*.log. PYTHON picks the interpreter (default: the repository's .venv, else python3); the repository
# root is put on PYTHONPATH, so the package need not be installed.
set -uo pipefail

mode=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  mode=cpu
  shift
fi
out="${1:-gpu_check_out}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [[ -x "$root/.venv/bin/python" && -z "${PYTHON:-}" ]]; then
  python="$root/.venv/bin/python"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
table="$out/rows.md"
report="$out/gpu_check.md"
: > "$table"
rm -f "$out/tests.log" "$out/generation.log" "$out"/kernel_speed_*.log
steps=()

kernel_tests=(
  tests/test_triton_kron_linear.py tests/test_library_ops.py tests/test_dispatch.py tests/test_triton_gather.py
  tests/test_triton_segment.py tests/test_triton_tensor_train.py tests/test_block_sparse_kernels.py
  tests/test_library_ops_gathers.py
)

write_report() {
  {
    echo "# GPU check: $device, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$environment"
    echo
    echo "Kernel tests: $tests_summary"
    echo
    echo "Steps (exit status; 124: stopped at its time limit): ${steps[*]}"
    echo
    echo "Forward + backward of one linear layer, median of the timed steps; tokens 1 x N. /dense: time over the"
    echo "dense layer's at the same shape. Roofline: max(flops / peak matmul, bytes / peak copy) over the time."
    echo
    cat "$table"
    if [[ -s "$out/generation.log" ]]; then
      echo
      echo "## benchmarks/generation.py"
      echo
      echo '```'
      sed -n '/^torch /p;/^model /,$p' "$out/generation.log"
      echo '```'
    fi
  } > "$report"
}

# run_step NAME SECONDS LOG COMMAND...: runs COMMAND under a time limit with its output appended to LOG, records
# its exit status, rewrites the report
run_step() {
  local name="$1" seconds="$2" log="$3"
  shift 3
  echo "== $name (limit ${seconds}s)"
  timeout "$seconds" "$@" >> "$log" 2>&1
  local status=$?
  steps+=("$name=$status")
  write_report
  return 0
}

if [[ "$mode" == gpu ]]; then
  if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $python; use --cpu-smoke to check the script on CPU" >&2
    exit 2
  fi
  device="$("$python" -c "import torch; print(torch.cuda.get_device_name())")"
  environment="$("$python" -c "import torch, triton, transformers; print(f'torch {torch.__version__}, \
triton {triton.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}')")"
  benchmark=(--device cuda --kpd-block 4 --repeats 10)
  # dtype:tokens:seconds, most wanted first (the first step of a tile family compiles its kernels); generation
  # runs after the first two
  speed_steps=(bfloat16:8192:90 bfloat16:8:75 generation bfloat16:1024:45 bfloat16:1:45 float32:8192:60)
  tests_summary="running"
  run_step kernel-tests 120 "$out/tests.log" "$python" -m pytest -q -rfE -p no:cacheprovider -n 8 "${kernel_tests[@]}"
  tests_summary="$(tail -n 1 "$out/tests.log") (log: tests.log)"
else
  device="CPU smoke run (toy settings, not a measurement)"
  environment="$("$python" -c "import torch; print(f'torch {torch.__version__}')")"
  benchmark=(--device cpu --layers "T5-small attn" --kpd-block 4 --repeats 1 --threads 1)
  speed_steps=(float32:8:40)
  tests_summary="dry run, not run: $python -m pytest -q ${kernel_tests[*]}"
fi

for step in "${speed_steps[@]}"; do
  if [[ "$step" == generation ]]; then
    run_step generation-bfloat16 80 "$out/generation.log" "$python" benchmarks/generation.py --device cuda \
      --dtype bfloat16 --rounds 5
    continue
  fi
  IFS=: read -r dtype tokens limit <<< "$step"
  run_step "kernel_speed-$dtype-$tokens" "$limit" "$out/kernel_speed_$dtype.log" \
    "$python" benchmarks/kernel_speed.py --dtype "$dtype" --tokens "$tokens" "${benchmark[@]}" --markdown "$table"
done
rm -f "$table"
echo "== wrote $report"
