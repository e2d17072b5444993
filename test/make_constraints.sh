#!/usr/bin/env bash
# Regenerate constraints.txt: every package pip resolves for requirements-dev.txt (the direct
# pins and all they pull in: transformers, timm, huggingface_hub, pillow, ...), at the versions
# it resolves today. setup_env.sh and the Dockerfile install with -c constraints.txt, so a
# later install gets the same versions. Run after changing a requirement:
#   bash test/make_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# no setup_env.sh here: it installs with the old constraints, which a changed pin contradicts
py="${FETALIQA_VENV:-.venv}/bin/python"
[ -x "$py" ] || py=python3
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
"$py" -m pip install -q --dry-run --ignore-installed --report "$report" -r requirements-dev.txt
"$py" - "$report" <<'PY' > constraints.txt
import json, sys
pkgs = json.load(open(sys.argv[1]))["install"]
skip = {"pip", "setuptools", "wheel"}  # the installer's own, upgraded apart
print("# Every resolved dependency of requirements-dev.txt, pinned (bash test/make_constraints.sh).")
for name, version in sorted((p["metadata"]["name"], p["metadata"]["version"]) for p in pkgs):
    if name.lower() not in skip:
        print(f"{name}=={version}")
PY
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)" >&2
