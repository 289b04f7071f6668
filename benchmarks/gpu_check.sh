#!/usr/bin/env bash
# The GPU check of issue 19, for a machine with one NVIDIA GPU (about 5 minutes on an H100/H200;
# every step has a time limit so the whole check stays within 8):
#   1. the test suite's CUDA-marked tests (bf16, SDPA against eager attention, the vision tower's
#      CLS row, the selective scan's CUDA path, training steps, the benchmark at small widths);
#   2. benchmarks/bench_e2e.py --device cuda --dtype bf16 at full depth (40 layers of Vicuna-13B's
#      widths, about 26 GB of weights, no extrapolation), with the cost model at the GPU's matmul
#      rate and bandwidth measured in the same run.
# Outputs go to $OUT (default ./gpu-check): the test log, bench_e2e_cuda.json and .md, nvidia-smi.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, torch with CUDA installed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt" || {
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed)"; exit 2; }
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')" || exit 2

echo "== CUDA-marked tests"
timeout 180 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== bench_e2e.py on the GPU, bf16, full depth"
timeout 270 python3 benchmarks/bench_e2e.py --device cuda --dtype bf16 --train-dtype bf16 --layers 40 \
    --repeats 3 --json "$OUT/bench_e2e_cuda.json" --markdown "$OUT/bench_e2e_cuda.md" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED) (outputs in $OUT)"
exit $status
