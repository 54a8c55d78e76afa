#!/usr/bin/env bash
# Train the conditional generator on to a step mark, keep its pipeline there, score it on a subset of
# EDM's conditional protocol and redraw its MAE-against-hours curve (docs/properties.md, section 7).
#   bash scripts/cond_stage.sh RUN_DIR STEP CORE [PREDICTOR]
# Resumes RUN_DIR (a `moldiff train` run of a property-conditional config) to exactly STEP steps on
# CPU core CORE (one thread), copies RUN_DIR/pipeline to RUN_DIR/snapshots/sSTEP (and its
# checkpoint.pt to RUN_DIR/snapshots/sSTEP.checkpoint.pt), scores the properties PROPS (default
# gap,mu,alpha; "all" for the six) at the guidance scales GUIDANCE (default 0,1,2), 300 molecules
# each, 50 steps, PREDICTOR defaulting to the shipped qm9-props, into
# docs/results/properties/<run>_late_sSTEP.json with `moldiff sample`'s default late resampling, or
# with RESAMPLE=1 (no resampling, as every mark before session 27 ran) into <run>_sSTEP.json; rewrites
# that protocol's curve (<run>_late_curve or <run>_curve .csv/.png) and appends the checkpoint's loss
# gains from its condition to <run>_signal.csv (scripts/cond_signal.py).
# Once it prints "snapshot taken", the run may train on (resumed) while the scoring goes on.
set -euo pipefail
run=$1; step=$2; core=${3:-1}; predictor=${4:-qm9-props}
props=${PROPS:-gap,mu,alpha}; guidance=${GUIDANCE:-0,1,2}
cd "$(dirname "$0")/.."
name=$(basename "$run")
tag=${name}_late; [ "${RESAMPLE:-}" = 1 ] && tag=$name  # one curve per sampling protocol
limit=$(sed -n 's/^  max_steps: *//p' "$run/config.yaml")  # the run's own step limit
taskset -c "$core" .venv/bin/moldiff train --resume --run-dir "$run" --threads 1 \
    --set train.max_steps="$step" --set train.max_minutes=null
# `--set` is saved in the run's config.yaml: put the run's own limit back, so that a plain
# `moldiff train --resume` afterwards trains on instead of stopping at the mark
[ -n "$limit" ] && sed -i "s/^  max_steps: .*/  max_steps: $limit/" "$run/config.yaml"
mkdir -p "$run/snapshots" docs/results/properties
rm -rf "$run/snapshots/s$step"
cp -r "$run/pipeline" "$run/snapshots/s$step"
cp "$run/checkpoint.pt" "$run/snapshots/s$step.checkpoint.pt"
echo "snapshot taken: $run/snapshots/s$step"
taskset -c "$core" .venv/bin/python scripts/eval_conditional.py --generator "$run/snapshots/s$step" \
    --predictor "$predictor" --property "$props" --guidance "$guidance" -n 300 --steps 50 --threads 1 \
    ${RESAMPLE:+--resample "$RESAMPLE"} \
    --out "docs/results/properties/${tag}_s$step.json"
.venv/bin/python scripts/cond_curve.py docs/results/properties/"${tag}"_s*.json \
    --out "docs/results/properties/${tag}_curve"
taskset -c "$core" .venv/bin/python scripts/cond_signal.py "$run" --checkpoint "$run/snapshots/s$step.checkpoint.pt" --molecules 1024 --repeats 2 --threads 1 \
    --out "docs/results/properties/${name}_signal.csv"
