#!/usr/bin/env bash
# Stage 6 of a real-data chain on a lent GPU machine (issue 11's retrain): stages 1-5 run on the CPU box, their
# crops (A, B, C), folds and label CSVs copied into the ignored .gpudata/ (16 x 16 stand-ins for the radiographs,
# which stage 6 never reads but the input check wants to find) and carried. Each model of the grid trains in its
# own process (the cpu profile's small VGG leaves the GPU nearly idle; the crops' augmentation on the CPU bounds
# it), then one plain run finds every fold done and writes the oof files. Models, oof files and logs come back as a
# tar split into 15 MiB parts (the device tool returns at most 8 files of 16 MiB):
#
#   OUT=... bash bench/scripts/gpu_stage6.sh [--set KEY=VALUE ...]
#   cat stage6.tar.part-* | tar -xf - -C CHAIN_ROOT     # here: work/models/, oof/, work/logs/
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-bench/output/gpu}
D=${GPUDATA:-.gpudata}
mkdir -p "$OUT" "$D/work/logs"
A=(--config configs/cpu.yaml --set "input_dir=$D/input" --set "work_dir=$D/work" --set "folds_dir=$D/folds"
   --set "oof_dir=$D/oof" "$@")
t0=$(date +%s)
$PY src/06_train.py "${A[@]}" --list 2>/dev/null >"$D/models.txt" || exit 1
pids=()
for m in $(cat "$D/models.txt"); do
  $PY src/06_train.py "${A[@]}" --set "train.only_models=[$m]" --set threads=2 --set train.num_workers=2 \
    >"$D/work/logs/06_train_$m.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
echo "models trained in $(( $(date +%s) - t0 )) s (rc $rc)"
$PY src/06_train.py "${A[@]}" || rc=1
echo "stage 6 in $(( $(date +%s) - t0 )) s (rc $rc)"
grep -h "val MAE" "$D"/work/logs/06_train_*.log | tail -n 12
tar -cf - -C "$D" work/models oof work/logs | split -b 15m - "$OUT/stage6.tar.part-"
ls -la "$OUT"
exit $rc
