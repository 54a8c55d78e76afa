#!/usr/bin/env bash
# Train a screen arm on to a step mark, keep the EMA pipeline exported there, then score it the way
# docs/results/learning_curve scores the EDM control (500 molecules, 50 steps, EDM's sampler).
#   bash scripts/screen_stage.sh RUN_DIR STEP CORE
# Resumes RUN_DIR (a `moldiff train` run) to exactly STEP optimiser steps on CPU core CORE (one
# thread), copies RUN_DIR/pipeline to RUN_DIR/snapshots/sSTEP and appends a row for it to
# docs/results/screen/<run name>.csv (python scripts/learning_curve.py).
set -euo pipefail
run=$1; step=$2; core=${3:-0}
cd "$(dirname "$0")/.."
limit=$(sed -n 's/^  max_steps: *//p' "$run/config.yaml")  # the run's own step limit
taskset -c "$core" .venv/bin/moldiff train --resume --run-dir "$run" --threads 1 \
    --set train.max_steps="$step" --set train.max_minutes=null
# `--set` is saved in the run's config.yaml: put the run's own limit back, so that a plain
# `moldiff train --resume` afterwards trains on instead of stopping at the mark
[ -n "$limit" ] && sed -i "s/^  max_steps: .*/  max_steps: $limit/" "$run/config.yaml"
mkdir -p "$run/snapshots" docs/results/screen
rm -rf "$run/snapshots/s$step"
cp -r "$run/pipeline" "$run/snapshots/s$step"
taskset -c "$core" .venv/bin/python scripts/learning_curve.py "$run/snapshots/s$step" --samples 500 --steps 50 \
    --out "docs/results/screen/$(basename "$run")"
