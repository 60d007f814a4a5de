#!/usr/bin/env bash
# Time the README's two commands on a fresh clone (install included) and append the figures
# to docs/benchmarks.md.   Usage: bench/fresh_clone.sh [REPO_DIR]
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"

timed() {  # timed LABEL CMD...: run, keep the log, print seconds
    local start end
    start=$(date +%s.%N)
    "${@:2}" > "$work/$1.log" 2>&1 || { tail -n 40 "$work/$1.log" >&2; exit 1; }
    end=$(date +%s.%N)
    python3 -c "print(f'{$end - $start:.0f}')"
}

demo_s=$(timed demo make demo)
study_s=$(grep -o 'study took [0-9.]* s' "$work/demo.log" | grep -o '[0-9.]*' || echo "?")
test_s=$(timed test make test)
# pytest's closing line, bare or framed in '=' when it also reports warnings
tests=$(grep -E '^=* ?[0-9]+ passed' "$work/test.log" | tail -n 1 | tr -d '=' | xargs || true)

row="| $(date -u +%F) | $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m) | ${demo_s} s (study ${study_s} s) | ${test_s} s ($tests) |"
echo "$row"
echo "$row" >> "$repo/docs/benchmarks.md"
tail -n 25 "$work/demo.log"
