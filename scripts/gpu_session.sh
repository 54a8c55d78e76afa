#!/usr/bin/env bash
# One lent-GPU session in one command (a lent machine has no network and no moldiff environment; its
# python3 has a CUDA build of torch, torch-geometric, e3nn, scipy, but no RDKit and no QM9):
#   0. set up: RDKit from the wheels in .whl/ into /tmp/site, the QM9 caches from
#      .gpudata/qm9_pack.npz (scripts/gpu_pack.py: coordinates of the molecules these runs read);
#   1. tests/test_gpu.py, all of it (the CUDA tests and the CPU-side decisions), on the GPU (SKIP_TESTS=1:
#      not; they need RDKit's wheel, which leaves no room for a checkpoint in one call);
#   2. (SKIP_BENCH=1: not) training steps/s at 128x6, batch BENCH_BATCH (default 64), fp32 / TF32 / bf16 (scripts/bench_train_device.py);
#   3. TRAIN_MINUTES (or, with DEADLINE=S, what is left of S seconds) of training of CONFIG from scratch
#      (or, with RESUME=runs/NAME, of that run, resumed; TRAIN_SET adds --set options) into /tmp/gpu_run, its checkpoint split into
#      15 MB parts for the trip back (join: cat checkpoint.pt.part-* > checkpoint.pt).
# Everything lands in $OUT (default out/gpu_session). Each stage has its own time limit, and a failed
# stage does not stop the next. Prepare here (both ignored by .git/info/exclude, both carried):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl rdkit==2026.9.1
#   python scripts/gpu_pack.py --train 8192
# then run it there with carry [".whl", ".gpudata"], having first kept the tracked checkpoints of the
# active runs from travelling (the working tree and the carried paths may take 64 MiB in all; RDKit's
# wheel is 32 MB, the pack 17): `bash scripts/gpu_travel.sh hide` before the call, `restore` after.
# To train on an active run, call a second time while the machine is warm, after `gpu_travel.sh
# hide runs/<run>`, with RESUME=runs/<run> and nothing carried (the first call's RDKit and caches are
# still there); on return, join the parts into the run's folder and set its config's `device` back
# to auto.
#   bash scripts/gpu_session.sh
#   PY=.venv/bin/python WHEELS=0 DEVICE=cpu TRAIN_MINUTES=0.3 bash scripts/gpu_session.sh   # dry run on a CPU
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT_DIR="${OUT:-out/gpu_session}"
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda}"
CONFIG="${CONFIG:-configs/qm9_conditional_categorical.yaml}"
TRAIN_MINUTES="${TRAIN_MINUTES:-4.3}"
THREADS="${THREADS:-8}"
RUN=/tmp/gpu_run
START=$(date +%s)
mkdir -p "$OUT_DIR"
elapsed() { echo "$(( $(date +%s) - START )) s"; }

# ------------------------------------------------------------------ 0. set up
# A second call while the machine is still warm (30 s) finds both from the first and needs neither
# carried: that leaves room for a resumed run's 20 MB checkpoint (RESUME, below).
if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_session: installing .whl/*.whl failed"; exit 3; }
fi
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site:$PWD"; else export PYTHONPATH="$PWD"; fi
export PYTHONUNBUFFERED=1 MOLDIFF_CACHE="$HOME/.cache/moldiff"
if [ -f .gpudata/qm9_pack.npz ]; then
    "$PY" scripts/gpu_pack.py --unpack .gpudata/qm9_pack.npz --cache-dir "$MOLDIFF_CACHE" || exit 3
elif [ ! -f "$MOLDIFF_CACHE/kept.npy" ]; then
    echo "gpu_session: no .gpudata/qm9_pack.npz carried and no caches from an earlier call"; exit 3
fi
{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import platform, torch, rdkit; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), "rdkit", rdkit.__version__)'
    lscpu | grep -E "Model name|^CPU\(s\)"
} 2>&1 | tee "$OUT_DIR/env.txt"
echo "gpu_session: set up after $(elapsed)"

# ------------------------------------------------------------------ 1. tests
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    echo "gpu_session: tests skipped (SKIP_TESTS=1)"
else
    timeout "${TEST_SECONDS:-170}" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_gpu.py > "$OUT_DIR/pytest_gpu.txt" 2>&1
    echo "gpu_session: tests exit $? after $(elapsed): $(tail -n 1 "$OUT_DIR/pytest_gpu.txt")"
    grep -E "FAILED|ERROR" "$OUT_DIR/pytest_gpu.txt" | head -n 20
fi

# ------------------------------------------------------------------ 2. benchmark
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    echo "gpu_session: benchmark skipped (SKIP_BENCH=1)"
else
    timeout "${BENCH_SECONDS:-50}" "$PY" scripts/bench_train_device.py --device "$DEVICE" --sizes 128x6 --modes fp32,tf32,bf16 \
        --compile-sizes "" --steps 30 --time-limit 5 --threads "$THREADS" --batch-size "${BENCH_BATCH:-64}" --out "$OUT_DIR/bench_train.json" 2>&1 | tail -n 8
    echo "gpu_session: benchmark exit $? after $(elapsed)"
fi

# ------------------------------------------------------------------ 3. training
if [ -n "${DEADLINE:-}" ]; then  # seconds after the start by which training must have stopped: use what is left
    TRAIN_MINUTES=$(awk -v d="$DEADLINE" -v e="$(( $(date +%s) - START ))" 'BEGIN { printf "%.2f", (d - e - 60) / 60 }')
fi
if awk -v m="$TRAIN_MINUTES" 'BEGIN { exit !(m <= 0) }'; then
    echo "gpu_session: no training (TRAIN_MINUTES=$TRAIN_MINUTES); done after $(elapsed)"
    exit 0
fi
echo "gpu_session: training for $TRAIN_MINUTES minutes"
rm -rf "$RUN"
if [ -n "${RESUME:-}" ]; then  # a run of this repository (its checkpoint.pt and config.yaml carried): go on with it
    mkdir -p "$RUN" && cp "$RESUME/checkpoint.pt" "$RESUME/config.yaml" "$RUN/" && cp "$RESUME/log.csv" "$RUN/" 2>/dev/null
    start=(--resume)
else
    start=(--config "$CONFIG")
fi
timeout "$(awk -v m="$TRAIN_MINUTES" 'BEGIN { printf "%d", m * 60 + 60 }')" "$PY" -m moldiff.cli train "${start[@]}" \
    --run-dir "$RUN" --set "train.device=$DEVICE" --threads "$THREADS" --set "train.max_minutes=$TRAIN_MINUTES" \
    --set train.checkpoint_minutes=1 --set train.max_steps=10000000 ${TRAIN_SET:-} > "$OUT_DIR/train.txt" 2>&1
echo "gpu_session: training exit $? after $(elapsed)"
head -n 3 "$OUT_DIR/train.txt"; tail -n 4 "$OUT_DIR/train.txt"
if [ -f "$RUN/checkpoint.pt" ]; then
    cp "$RUN/config.yaml" "$OUT_DIR/"; cp "$RUN/log.csv" "$OUT_DIR/" 2>/dev/null
    split -b 15000000 "$RUN/checkpoint.pt" "$OUT_DIR/checkpoint.pt.part-"
    sha256sum "$RUN/checkpoint.pt" | tee -a "$OUT_DIR/env.txt"
fi
echo "gpu_session: done after $(elapsed)"
