#!/usr/bin/env bash
# Every GPU check this project still owes, in one run (each step has a time limit):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Runs the CUDA tests, then the decode, SVM and training-step benchmarks on the GPU, each
# with its reference in the same process. Each step's output goes to OUT_DIR/<step>.txt
# (default: gpu_check/); a failed step is reported and the others still run.
set -u
out=${1:-gpu_check}
mkdir -p "$out"
status=0
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$@" >"$out/$name.txt" 2>&1; then
        tail -n 25 "$out/$name.txt"
    else
        echo "!! $name failed or timed out (exit $?); last lines:"
        tail -n 25 "$out/$name.txt"
        status=1
    fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
step cuda_tests 240 python -m pytest -q tests/test_svm.py tests/test_decoding.py
step decode 120 python benchmarks/decode.py --device cuda --rounds 3
step decode_b128 120 python benchmarks/decode.py --device cuda --batch 128 --rounds 2
step voc07_svm 240 python benchmarks/voc07_svm.py --device cuda --float32_cg --reference_jobs 16
step train_step 240 python benchmarks/train_step.py --device cuda --steps 10
exit $status
