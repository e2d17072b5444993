#!/usr/bin/env bash
# The main job on the sample case: set up .venv, generate the sample input if needed, run
# inference.py with the embedded default model (resources/model), print where outputs are.
#   bash test/run_sample.sh [extra inference.py options, e.g. --extras]
set -euo pipefail
cd "$(dirname "$0")/.."
source test/setup_env.sh
python test/sample/make_sample.py --out test/sample/input
python inference.py --input test/sample/input --output out/sample "$@"
echo "outputs:"
echo "  out/sample/images/fetal-abdomen-segmentation/output.mha  (3D uint8 mask on the chosen frame)"
echo "  out/sample/fetal-abdomen-frame-number.json              ($(cat out/sample/fetal-abdomen-frame-number.json | tr -d '\n'))"
if [ -d out/sample/extras ]; then
  echo "  out/sample/extras/  (result.json, quality-curve.png, overlay.png)"
fi
