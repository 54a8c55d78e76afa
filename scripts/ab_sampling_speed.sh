#!/bin/bash
# A/B sampling speed of two versions of the code, alternated in one run on one core (this machine's
# speed drifts; ratios within a run are what to compare). Same shipped weights, bf16, compiled.
#   bash scripts/ab_sampling_speed.sh 411d2bc [n] [steps] [reps]
# Prints "<label> <seconds>" per run: "new" = this checkout, "old" = the given commit (a worktree in /tmp).
set -euo pipefail
ref=${1:?git ref of the old code}; n=${2:-300}; steps=${3:-50}; reps=${4:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
old=/tmp/moldiff_ab_$ref
[ -d "$old" ] || git -C "$root" worktree add -f "$old" "$ref" -q
for _ in $(seq "$reps"); do
  for which in new old; do
    dir=$root; [ "$which" = old ] && dir=$old
    (cd "$dir" && taskset -c 0 "$root/.venv/bin/python" - "$dir" "$which" "$root" "$n" "$steps" <<'PY' 2>&1 | grep -v Warn | tail -1
import sys, time
dir_, which, root, n, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, dir_)
import torch
import moldiff
assert moldiff.__file__.startswith(dir_), moldiff.__file__
from moldiff.pipeline import load_pretrained
torch.set_num_threads(1)
pipe = load_pretrained(root + "/moldiff/pretrained/qm9").configure_inference(precision="bf16", compile=True)
pipe.sample_arrays(50, steps=5, seed=1)  # compilation and warm-up
t0 = time.monotonic()
pipe.sample_arrays(n, steps=steps, seed=0)
print(which, round(time.monotonic() - t0, 1), flush=True)
PY
    )
  done
done
