#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (the device tool, about 6 minutes on an H100):
# (1) bench/gpu_train_speed.py at the full profile's sizes (compute bound and the real DataLoader loop,
#     bf16 + channels-last against fp32); (2) the smoke chain, stages 00-07 and predict.py, on CUDA;
# (3) stage 6 with torch.compile and under torchrun (NCCL, one process) on that chain's crops;
# (4) the test suite with CUDA visible; (0) stage 1 + 2 speed on real radiographs when .devdata/ was carried. Every part writes its log to $OUT as it goes.
#
#   bash bench/scripts/gpu_session.sh          # in the repo root on the GPU box; OUT defaults to bench/output/gpu
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/output/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ! $PY -c "import albumentations" 2>/dev/null; then  # albumentations, segmentation_models_pytorch, pydicom travel as wheels (device README)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  $PY -c "import torch, timm, albumentations, cv2; print('torch', torch.__version__, 'timm', timm.__version__,
'albumentations', albumentations.__version__, 'cv2', cv2.__version__)"; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

PARTS=${PARTS:-stage12 speed smoke_chain compile torchrun tests}  # a subset, e.g. PARTS="smoke_chain torchrun"
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, print the verdict
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - t0 )) s"
  tail -n 25 "$OUT/$name.log"
}

# stage 1 inference + stage 2 on real radiographs (issue 4): a U-Net and radiographs copied into the ignored
# .devdata/ (unet/unet.pt, images/*.jpg) and carried; batch 16 in fp32, then bf16 + channels-last at batch 64 with
# the post-processing and stage 2 in 1, 4, 8 and 16 threads (256 px, the cpu profile's U-Net); the same 100
# radiographs each time
S12=(bench/stage12_speed.py --unet .devdata/unet --images .devdata/images --n 100 --device cuda --threads 8
     --config configs/cpu.yaml --warmup 1)
w() { echo "--set segment.predict_batch_size=64 --set segment.post_workers=$1 --set clean.workers=$1 --out $OUT/s12_b64_w$1.json"; }
part stage12 200 bash -c "$PY ${S12[*]} --set segment.amp=false --out $OUT/s12_b16_fp32.json &&
  $PY ${S12[*]} $(w 1) && $PY ${S12[*]} $(w 4) && $PY ${S12[*]} $(w 8) && $PY ${S12[*]} $(w 16)"

part speed 220 $PY bench/gpu_train_speed.py --seconds 3 --epochs 1 --repeat 4 --n-crops 1024 --workers 12 --out "$OUT"

G=/tmp/gpu_smoke
dirs=(--set input_dir=$G/input --set work_dir=$G/work --set folds_dir=$G/folds --set oof_dir=$G/oof
      --set submissions_dir=$G/submissions --set threads=8)
part smoke_chain 90 bash -c "$PY src/00_make_demo_data.py --config configs/smoke.yaml ${dirs[*]} &&
  PYTHON=$PY bash run_all.sh --config configs/smoke.yaml ${dirs[*]} &&
  img=\$(ls $G/input/boneage-test-dataset/* | head -n 1) &&
  $PY src/predict.py \$img --sex F --config configs/smoke.yaml ${dirs[*]} --out $G/predict --force &&
  ls $G/submissions $G/predict && head -n 3 $G/submissions/*.csv"

one=(--set "train.regions=[A]" --set "train.heads=[reg]" --set train.epochs=2)
part torchrun 40 $PY -m torch.distributed.run --standalone --nproc_per_node=1 src/06_train.py --config configs/smoke.yaml "${dirs[@]}" \
  "${one[@]}" --set oof_dir=$G/oof_ddp --force
part compile 70 $PY src/06_train.py --config configs/smoke.yaml "${dirs[@]}" "${one[@]}" \
  --set oof_dir=$G/oof_compile --set train.compile=true --force
part tests 90 $PY -m pytest -q -p no:cacheprovider tests -n 8
echo "== done $(date -u)"
