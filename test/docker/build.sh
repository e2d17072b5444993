#!/usr/bin/env bash
# Build the grand-challenge image (linux/amd64) from the repository root.
#   bash test/docker/build.sh [IMAGE]      (default IMAGE: fetaliqa:latest, or $IMAGE)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
image="${1:-${IMAGE:-fetaliqa:latest}}"
if [ ! -f "$repo/resources/model/model.json" ] || [ ! -f "$repo/resources/model/model.safetensors" ]; then
  echo "[build] warning: $repo/resources/model holds no exported model: the image will need a" \
       "model tarball in /opt/ml/model to run" >&2
fi
echo "[build] docker build --platform=linux/amd64 -t $image $repo" >&2
docker build --platform=linux/amd64 --tag "$image" "$repo"
echo "[build] built $image" >&2
