#!/usr/bin/env bash
# Run the image on the sample case the way grand-challenge.org does, then check the outputs
# against the contract and the expected outputs (frame number, Dice, dtype, shape, values,
# JSON type) with test/compare_outputs.py.
#   bash test/docker/test_run.sh [IMAGE]
# Environment: IMAGE (fetaliqa:latest), INPUT (test/sample/input), EXPECTED
# (test/sample/expected), MODEL_DIR (model/ if it exists, else an empty folder: the image's
# embedded default is used), OUTPUT (out/docker-test), PYTHON (.venv/bin/python if present,
# else python3), MIN_DICE (0.95).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
image="${1:-${IMAGE:-fetaliqa:latest}}"
input="${INPUT:-$repo/test/sample/input}"
expected="${EXPECTED:-$repo/test/sample/expected}"
output="${OUTPUT:-$repo/out/docker-test}"
python="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ]; then
  python="$repo/.venv/bin/python"  # the compare step needs numpy and SimpleITK
fi

if [ ! -d "$input/images/stacked-fetal-ultrasound" ]; then
  echo "[test_run] generating the sample case into $input" >&2
  "$python" "$repo/test/sample/make_sample.py" --out "$input"
fi
if [ -n "${MODEL_DIR:-}" ]; then
  model="$MODEL_DIR"
elif [ -d "$repo/model" ]; then
  model="$repo/model"
else  # an empty /opt/ml/model, as on the platform without an uploaded tarball
  model="$repo/out/docker-empty-model"
  mkdir -p "$model"
fi
input="$(cd "$input" && pwd)"; model="$(cd "$model" && pwd)"

mkdir -p "$output"
output="$(cd "$output" && pwd)"
# Clear only what the container writes (never the whole folder: OUTPUT may be anything).
rm -rf "$output/images/fetal-abdomen-segmentation" "$output/fetal-abdomen-frame-number.json" "$output/extras"
chmod 777 "$output"  # the image's non-root user must be able to write here

gpus=()
gpu_note="no GPU (nvidia-smi not found)"
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=(--gpus all)
  gpu_note="--gpus all"
fi
volume="fetaliqa-tmp-$$"
docker volume create "$volume" >/dev/null
trap 'docker volume rm "$volume" >/dev/null 2>&1 || true' EXIT

echo "[test_run] running $image on $input (model: $model, $gpu_note)" >&2
docker run --rm \
  --platform=linux/amd64 \
  --network none \
  ${gpus[@]+"${gpus[@]}"} \
  --volume "$input":/input:ro \
  --volume "$output":/output \
  --volume "$volume":/tmp \
  --volume "$model":/opt/ml/model:ro \
  "$image"

"$python" "$repo/test/compare_outputs.py" --output "$output" --input "$input" \
  --expected "$expected" --min-dice "${MIN_DICE:-0.95}"
