#!/usr/bin/env bash
# The CUDA paths end to end on one GPU, with no real data or weights: the real FetalCLIP
# geometry (ViT-L/14, random weights written in FetalCLIP's checkpoint format) trained with
# the published recipe (LoRA r=8, batch 32, 5 epochs) on simulated sweeps with bf16 autocast
# (or fp16 where the GPU has no bf16), again with fp16 + GradScaler, and under torchrun (NCCL);
# its export run by inference.py on the full-size sample case; the embedded default on CUDA
# checked against the committed CPU outputs; then the inference bench. Figures: docs/bench.md
# and docs/training.md ("On a GPU").
#
#   bash test/gpu_check.sh [WORK]                         (default runs/gpu-check)
#   BACKBONE=fetalclip-small DEVICE=cpu CASES=6 EPOCHS=1 BENCH=default bash test/gpu_check.sh
#       (a quick rehearsal of the same steps on the CPU)
#
# Every step runs even if an earlier one failed; WORK/report/ collects the logs, per-step
# seconds (steps.tsv) and the small result files as it goes; the exit status counts the failed
# steps. On one H200 (16 slow vCPUs) the steps up to the bench took about 8 minutes: training
# 185 s (5 epochs of 34 steps, validation, calibration, two case checks), fp16 83 s, torchrun
# 41 s, each inference.py run about 30 s, of which 14-16 s were Python imports and CUDA start.
set -uo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/gpu-check}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-FetalCLIP}
CASES=${CASES:-24}
EPOCHS=${EPOCHS:-5}
BENCH=${BENCH:-fetalclip default}
NPROC=$(nproc)
R=$W/report
mkdir -p "$R"
: >"$R/steps.tsv"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME COMMAND...: run, log to REPORT/NAME.log, record status and seconds
  local name=$1 t0 rc
  shift
  echo "== $name: $*"
  t0=$EPOCHREALTIME
  "$@" >"$R/$name.log" 2>&1
  rc=$?
  awk -v n="$name" -v rc="$rc" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%s\t%s\t%.1f\n", n, rc, b - a }' \
    | tee -a "$R/steps.tsv"
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    tail -n 25 "$R/$name.log"
  fi
  return 0
}

step env python - <<'EOF'
import platform, torch, peft, open_clip, SimpleITK, numpy
print("python", platform.python_version(), "| torch", torch.__version__, "| peft", peft.__version__,
      "| open_clip", open_clip.__version__, "| SimpleITK", SimpleITK.Version.VersionString(),
      "| numpy", numpy.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda", torch.version.cuda, "|", p.name, f"{p.total_memory / 2**30:.0f} GiB",
          "| bf16", torch.cuda.is_bf16_supported(including_emulation=False))
EOF

step simulate python -c "
import sys; from pathlib import Path
from training.make_default import simulate_release
simulate_release(Path('$W/data'), $CASES, 424242, 35, $NPROC)"

step checkpoint env PYTHONPATH="$PWD/test:$PYTHONPATH" python - "$BACKBONE" "$W/FetalCLIP_weights.pt" <<'EOF'
import sys, torch
from fetaliqa.model.backbone import build_vision_tower
from fetaliqa.model.config import ModelConfig
from training_helpers import write_fetalclip_checkpoint
torch.manual_seed(0)
visual = build_vision_tower(ModelConfig(backbone=sys.argv[1])).state_dict()
write_fetalclip_checkpoint(sys.argv[2], visual)
print(f"{sys.argv[2]}: {sum(v.numel() for v in visual.values()):,} visual parameters")
EOF

train=(python -m training.train --backbone "$BACKBONE" --weights "$W/FetalCLIP_weights.pt" --data "$W/data"
       --cache "$W/cache" --cache-workers "$NPROC" --num-workers 4 --device "$DEVICE" --no-progress)
collect() {  # collect RUN: its logs into the report now (a later step may be cut short)
  local f
  for f in args.json epochs.csv steps.csv calibration.json; do
    if [ -f "$W/$1/$f" ]; then cp "$W/$1/$f" "$R/$1-$f"; fi
  done
}
step train-auto "${train[@]}" --epochs "$EPOCHS" --case-check 2 --out "$W/auto"
collect auto
if [ "$DEVICE" != cpu ]; then
  step train-fp16 "${train[@]}" --amp fp16 --epochs 1 --no-export --out "$W/fp16"
  collect fp16
fi
step torchrun python -m torch.distributed.run --standalone --nproc_per_node 1 -m training.train \
  "${train[@]:3}" --epochs 1 --no-export --out "$W/ddp"
collect ddp

step sample python test/sample/make_sample.py --out "$W/sample" --no-check  # other library versions: still a case
step infer-default python inference.py --input "$W/sample" --output "$W/out-default" --device "$DEVICE"
step compare-default python test/compare_outputs.py --output "$W/out-default" --input "$W/sample" \
  --expected test/sample/expected
step infer-trained python inference.py --input "$W/sample" --output "$W/out-trained" --model "$W/auto/model" \
  --device "$DEVICE" --extras
step check-trained python test/compare_outputs.py --output "$W/out-trained" --input "$W/sample"
# shellcheck disable=SC2086  # BENCH is a list of geometries
step bench python -m fetaliqa.bench --device "$DEVICE" --geometry $BENCH --exhaustive-frames 256 \
  --json "$R/bench.json"

if [ -f "$W/out-trained/extras/result.json" ]; then cp "$W/out-trained/extras/result.json" "$R/trained-result.json"; fi
echo "== $failed failed step(s); report in $R"
exit "$failed"
