#!/usr/bin/env bash
# moldiff on a CUDA GPU, in one go (issue 20: "GPU correctness"): tests at most 4 minutes, benchmark
# at most 3.5, plus the set-up when the environment is new (downloading torch's CUDA build: minutes):
#   1. set up: a virtual environment with PyTorch's CUDA build (`make setup`, which installs
#      TORCH_SPEC, default torch==2.13.0, first: PyPI's default build is the CUDA one) and check
#      that torch sees the GPU;
#   2. the GPU tests: pytest -m gpu (tests/test_gpu.py: sampling, training, kill + resume, and
#      two-process NCCL DDP when there are two GPUs);
#   3. a short training benchmark (scripts/bench_train_device.py): steps/s of the debug (16x2),
#      qm9_small (128x6) and EDM (256x9) models at batch 64 in fp32, TF32 and bf16 autocast, then
#      TF32 and bf16 with torch.compile at 128x6 (rows written as they come; a time-out cuts the last).
# Results go to $OUT if set (else out/gpu_check): env.txt, pytest_gpu.txt, bench_train.txt/.json,
# summary.txt. Without a GPU it stops at step 1 with one line saying so (exit status 2).
#
#   bash scripts/gpu_check.sh                  # from anywhere; it works in the repository root
#   VENV=.venv-gpu bash scripts/gpu_check.sh   # another environment (default: .venv, or .venv-gpu
#                                              # when .venv holds a CPU-only torch on a GPU machine)
#   GPU_CHECK_PYTHON=/opt/py/bin/python bash scripts/gpu_check.sh   # an interpreter that already has
#                                              # torch (CUDA) and moldiff installed: no set-up
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT_DIR="${OUT:-out/gpu_check}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"
START=$(date +%s)

die() { echo "gpu_check: error: $*" >&2; exit 2; }
say() { echo "gpu_check: $*"; }

mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"

# ------------------------------------------------------------------ 1. set up
have_gpu_hw=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    have_gpu_hw=1
    nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
fi

torch_cuda() {  # prints "<torch version> <cuda build or None> <GPUs torch sees>"; fails without torch
    local py="$1/bin/python"
    [ -n "${GPU_CHECK_PYTHON:-}" ] && py="$GPU_CHECK_PYTHON"
    "$py" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null
}

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    torch_cuda "$VENV" >/dev/null || die "GPU_CHECK_PYTHON=$GPU_CHECK_PYTHON cannot import torch"
elif [ ! -x "$VENV/bin/python" ] || ! torch_cuda "$VENV" >/dev/null; then
    if [ "$have_gpu_hw" = 0 ] && [ ! -x "$VENV/bin/python" ]; then
        die "no NVIDIA GPU here (nvidia-smi finds none) and no $VENV to check; run this on a machine with a CUDA GPU"
    fi
    say "setting up $VENV with $TORCH_SPEC (make setup) ..."
    make setup VENV="$VENV" TORCH_SPEC="$TORCH_SPEC" > "$OUT_DIR/setup.txt" 2>&1 \
        || die "make setup failed (log: $OUT_DIR/setup.txt; last line: $(tail -n 1 "$OUT_DIR/setup.txt"))"
fi
read -r TORCH_VERSION CUDA_BUILD N_GPU <<< "$(torch_cuda "$VENV")"
if [ "${N_GPU:-0}" = 0 ] && [ "$have_gpu_hw" = 1 ] && [ "${CUDA_BUILD:-None}" = None ] && [ "$VENV" = .venv ] \
        && [ -z "${GPU_CHECK_PYTHON:-}" ]; then
    # A GPU machine with a CPU-only torch in .venv (e.g. a copy of a CPU machine's environment):
    # build a separate GPU environment rather than replacing it.
    VENV=.venv-gpu
    say "$VENV: .venv holds torch $TORCH_VERSION without CUDA; setting up $VENV with $TORCH_SPEC (make setup) ..."
    make setup VENV="$VENV" TORCH_SPEC="$TORCH_SPEC" > "$OUT_DIR/setup.txt" 2>&1 \
        || die "make setup failed (log: $OUT_DIR/setup.txt; last line: $(tail -n 1 "$OUT_DIR/setup.txt"))"
    read -r TORCH_VERSION CUDA_BUILD N_GPU <<< "$(torch_cuda "$VENV")"
fi
if [ "${N_GPU:-0}" = 0 ]; then
    if [ "${CUDA_BUILD:-None}" = None ]; then
        die "no CUDA GPU: torch $TORCH_VERSION in $VENV is a CPU-only build and torch.cuda.is_available() is False; nothing to check here"
    fi
    die "no CUDA GPU: torch $TORCH_VERSION (CUDA $CUDA_BUILD) in $VENV sees none (torch.cuda.is_available() is False); nothing to check here"
fi
PY="${GPU_CHECK_PYTHON:-$VENV/bin/python}"
"$PY" - > "$OUT_DIR/env.txt" 2>&1 <<'EOF'
import platform, torch
from moldiff.runtime import choose_arithmetic, cpu_has_native_bf16, resolve_device
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), "capability", torch.cuda.get_device_capability(i))
print("--device auto ->", resolve_device("auto"))
print("training/sampling arithmetic on cuda:", choose_arithmetic("cuda"))
print("CPU native bf16:", cpu_has_native_bf16())
EOF
cat "$OUT_DIR/env.txt"
say "torch $TORCH_VERSION (CUDA $CUDA_BUILD), $N_GPU GPU(s); setup done after $(( $(date +%s) - START )) s"

# ------------------------------------------------------------------ 2. GPU tests
say "pytest -m gpu (tests/test_gpu.py) ..."
timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$OUT_DIR/pytest_gpu.txt" 2>&1
PYTEST_RC=$?
tail -n 5 "$OUT_DIR/pytest_gpu.txt"

# ------------------------------------------------------------------ 3. training benchmark
say "training benchmark (scripts/bench_train_device.py) ..."
timeout 210 "$PY" scripts/bench_train_device.py --device cuda --sizes 16x2,128x6,256x9 --compile-sizes 128x6 \
    --steps 50 --time-limit 10 --out "$OUT_DIR/bench_train.json" > "$OUT_DIR/bench_train.txt" 2>&1
BENCH_RC=$?
cat "$OUT_DIR/bench_train.txt"

{
    echo "gpu_check: torch $TORCH_VERSION, CUDA $CUDA_BUILD, $N_GPU GPU(s); $(( $(date +%s) - START )) s in all"
    echo "pytest -m gpu: exit status $PYTEST_RC ($(tail -n 1 "$OUT_DIR/pytest_gpu.txt"))"
    echo "benchmark: exit status $BENCH_RC (124: stopped at the time limit; rows so far in bench_train.txt)"
} | tee "$OUT_DIR/summary.txt"
[ "$PYTEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
