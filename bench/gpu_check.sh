#!/usr/bin/env bash
# The GPU check as one prepared command, for a session that is lent a GPU for a few minutes:
# the model and engine tests on CUDA (graphs against eager included), then bench/bench_gpu.py.
# Logs and JSON go to $OUT (the device tool's result folder), else ./gpu_out.
#
# Needs only torch, numpy, safetensors, tokenizers and huggingface_hub (the lent machine's image has
# them; the server's packages are not needed), and the golden data: the device tool sends the checkout
# and a shared/ folder inside it, not the ../shared beside it, so first, here:
#     mkdir -p shared && cp -r ../shared/golden shared/     (44 MB; /shared/ is git-ignored)
# then run `bash bench/gpu_check.sh` there with a 600 s limit. Each part has its own time limit
# (TEST_S, BENCH_S), so a slow part still leaves the other's output.
#
#     GPU_CHECK_DRY=1 bash bench/gpu_check.sh    # the same on the CPU: tests on the CPU, bench --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LFM2AUDIO_GOLDEN=${LFM2AUDIO_GOLDEN:-$PWD/shared/golden}
[ -d "$LFM2AUDIO_GOLDEN" ] || LFM2AUDIO_GOLDEN=$PWD/../shared/golden
PY=${PYTHON:-python3}
TEST_S=${TEST_S:-200}
BENCH_S=${BENCH_S:-360}
if [ -n "${GPU_CHECK_DRY:-}" ]; then
    device=cpu bench_args=(--dry-run)
else
    device=cuda bench_args=()
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
    echo "golden: $LFM2AUDIO_GOLDEN"
} 2>&1 | tee "$OUT/device.txt"

# The tests that take the device from LFM2AUDIO_TEST_DEVICE, the CUDA-only ones, and the CPU checks
# of the graph body (cheap). -p no:cacheprovider: nothing written into the checkout.
tests=(tests/test_cuda.py tests/test_engine_step.py tests/test_model_golden.py tests/test_engine.py)
LFM2AUDIO_TEST_DEVICE=$device timeout "$TEST_S" "$PY" -m pytest -q -rs -p no:cacheprovider "${tests[@]}" 2>&1 \
    | tee "$OUT/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

timeout "$BENCH_S" "$PY" bench/bench_gpu.py "${bench_args[@]}" --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_gpu.log"
