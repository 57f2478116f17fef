#!/usr/bin/env bash
# The README's commands, verbatim, in a fresh clone and a fresh venv, from the clone's root; prints each one's wall
# time. This is what a new user does first: run it before resolving anything that touches a command.
#
#   bash bench/fresh_clone.sh                 # clone this checkout's HEAD; quick start, the other README
#                                             # commands, and the test command's install step
#   bash bench/fresh_clone.sh --tests         # also run the README's test command (the whole suite)
#   KEEP=1 bash bench/fresh_clone.sh          # keep the clone (its path is printed)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
RUN_TESTS=0
[[ "${1:-}" == "--tests" ]] && RUN_TESTS=1
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/trainkit-fresh-XXXXXX")"
[[ -n "${KEEP:-}" ]] || trap 'rm -rf "$SCRATCH"' EXIT

timed() {  # timed NAME COMMAND: run COMMAND under bash in the clone, print "NAME: N s" (exit on failure)
  local name="$1" command="$2" start end
  echo "--- $name: $command"
  start=$(date +%s.%N)
  if ! bash -c "$command" > "$SCRATCH/$name.log" 2>&1; then
    tail -40 "$SCRATCH/$name.log"
    echo "FAILED: $name (log: $SCRATCH/$name.log)"
    exit 1
  fi
  end=$(date +%s.%N)
  awk -v n="$name" -v s="$start" -v e="$end" 'BEGIN { printf "%s: %.1f s\n", n, e - s }' | tee -a "$SCRATCH/times.txt"
}

git clone -q "$REPO" "$SCRATCH/trainkit"
cd "$SCRATCH/trainkit"
timed venv "python -m venv .venv"
# shellcheck disable=SC1091
source .venv/bin/activate
# The README's ```bash blocks, one command a line, in order: the quick start (install && train) comes first, the
# test command (install && pytest) is the one that runs pytest, and every other line runs as written, in between.
mapfile -t LINES < <(python - <<'EOF'
import re
for block in re.findall(r"```bash\n(.*?)```", open("README.md").read(), re.S):
    for line in block.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            print(line.strip())
EOF
)
QUICK_START="${LINES[0]}"
TEST_COMMAND=$(printf '%s\n' "${LINES[@]}" | grep -m1 'pytest')
timed install "${QUICK_START%% && *}"
timed quick_start "${QUICK_START#* && }"
for f in checkpoints/last checkpoints/best checkpoints/final export/model.ckpt export/model.json; do
  [[ -e "runs/digits/$f" ]] || { echo "FAILED: the quick start left no runs/digits/$f"; exit 1; }
done
grep -h "eval/accuracy" runs/digits/metrics.jsonl | tail -1
n=0
for line in "${LINES[@]:1}"; do
  [[ "$line" == "$TEST_COMMAND" ]] && continue
  n=$((n + 1))
  timed "readme_$n" "$line"
done
timed test_install "${TEST_COMMAND%% && *}"
if [[ $RUN_TESTS == 1 ]]; then
  timed tests "${TEST_COMMAND#* && }"
fi
echo "=== fresh clone of $(git -C "$REPO" rev-parse --short HEAD) in $SCRATCH"
cat "$SCRATCH/times.txt"
