#!/usr/bin/env bash
# Keep the active runs' tracked checkpoints (about 20 MB each) from travelling to a lent GPU machine,
# whose call takes 64 MiB of working tree and carried files in all (scripts/gpu_session.sh), and put
# them back afterwards. Only git's index and .gitignore change; the files stay on disk.
#   bash scripts/gpu_travel.sh hide [RUN]   # no active run's checkpoint travels, except RUN's
#   bash scripts/gpu_travel.sh restore      # index and .gitignore as they were
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
backup=.git/gpu_travel.gitignore
list=.git/gpu_travel.hidden
case "${1:-}" in
hide)
    [ -e "$backup" ] && { echo "gpu_travel: already hidden; run 'restore' first" >&2; exit 2; }
    keep="${2:-}"
    cp .gitignore "$backup"
    : > "$list"
    # the active runs are the `!runs/<run>/` lines of .gitignore (committed or not yet)
    for run in $(sed -n 's|^!runs/\([^/]*\)/$|\1|p' .gitignore); do
        [ "$run" = "$(basename "${keep:-/}")" ] && continue
        sed -i "\|^!runs/$run/\$|d" .gitignore
        if git ls-files --error-unmatch "runs/$run/checkpoint.pt" >/dev/null 2>&1; then
            git rm -q --cached "runs/$run/checkpoint.pt"
            echo "runs/$run/checkpoint.pt" >> "$list"
        fi
        echo "gpu_travel: runs/$run stays here"
    done
    ;;
restore)
    [ -e "$backup" ] || { echo "gpu_travel: nothing hidden" >&2; exit 2; }
    cp "$backup" .gitignore
    xargs -r git add < "$list"
    git reset -q $(cat "$list")  # tracked again, their changes unstaged as before
    rm -f "$backup" "$list"
    echo "gpu_travel: restored"
    ;;
*)
    echo "usage: bash scripts/gpu_travel.sh hide [RUN] | restore" >&2; exit 2 ;;
esac
