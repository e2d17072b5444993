#!/usr/bin/env bash
# Save the image for upload to grand-challenge.org and tar the model for its separate upload.
#   bash test/docker/export.sh [IMAGE]
# Environment: IMAGE (fetaliqa:latest), MODEL_DIR (model/: an exported model folder,
# model.json + model.safetensors at its top level), EXPORT_DIR (out/export).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
image="${1:-${IMAGE:-fetaliqa:latest}}"
model="${MODEL_DIR:-$repo/model}"
dest="${EXPORT_DIR:-$repo/out/export}"
mkdir -p "$dest"

name="$(printf '%s' "$image" | tr '/:' '__')"
echo "[export] docker save $image | gzip -> $dest/$name.tar.gz" >&2
docker save "$image" | gzip -c > "$dest/$name.tar.gz.partial"
mv "$dest/$name.tar.gz.partial" "$dest/$name.tar.gz"

if [ -f "$model/model.json" ] && [ -f "$model/model.safetensors" ]; then
  # -C: the files must sit at the top of the tarball (the platform extracts it into /opt/ml/model)
  tar -czf "$dest/model.tar.gz" -C "$model" .
  echo "[export] model tarball $dest/model.tar.gz from $model" >&2
elif [ -n "${MODEL_DIR:-}" ]; then
  echo "[export] error: $model does not hold model.json and model.safetensors" >&2
  exit 1
else
  echo "[export] no exported model in $model: no model tarball (the image's embedded default runs)" >&2
fi
ls -l "$dest" >&2
