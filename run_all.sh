#!/usr/bin/env bash
# Run the whole method, stage by stage: 01 segment ... 07 blend.
#
#   bash run_all.sh [--config FILE] [--set key=value ...] [--from N] [--only N] [--force] [--debug]
#
# --config/--set are passed to every stage; --from N starts at stage N, --only N runs stage N alone,
# --force redoes finished items. Each stage skips what it already finished, so rerunning after an
# interruption resumes where it stopped. The phantom demo data (stage 00) is made by `make demo`.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

config=configs/demo.yaml
from=1
only=""
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --config=*) config=${1#*=}; shift ;;
    --set) pass+=(--set "$2"); shift 2 ;;
    --set=*) pass+=(--set "${1#*=}"); shift ;;
    --from) from=$((10#$2)); shift 2 ;;
    --only) only=$((10#$2)); shift 2 ;;
    --force) pass+=(--force); shift ;;
    --debug) pass+=(--debug); shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

stages=(01_segment 02_clean 03_keypoints 04_register 05_folds 06_train 07_blend)
start_all=$(date +%s)
for stage in "${stages[@]}"; do
  n=$((10#${stage%%_*}))
  if [ -n "$only" ] && [ "$n" -ne "$only" ]; then continue; fi
  if [ -z "$only" ] && [ "$n" -lt "$from" ]; then continue; fi
  echo "=== stage $stage ($(date +%H:%M:%S))"
  t0=$(date +%s)
  if ! "$PY" "src/$stage.py" --config "$config" ${pass[@]+"${pass[@]}"}; then
    echo "run_all.sh: stage $stage failed; fix the problem above and rerun with --from $n" >&2
    exit 1
  fi
  echo "=== stage $stage done in $(( $(date +%s) - t0 )) s"
done
echo "=== all stages done in $(( $(date +%s) - start_all )) s"
