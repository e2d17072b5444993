#!/usr/bin/env bash
# Create (or reuse) ./.venv with the pinned dependencies. Sourced by the other scripts.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FETALIQA_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  python3 -c 'import sys; sys.version_info[:2] == (3, 11) or print(f"[setup] warning: python3 is {sys.version.split()[0]}; the pins are tested on 3.11", file=sys.stderr)'
  python3 -m venv "$venv"
fi
# Skip the install when requirements have not changed since the last successful one.
stamp="$venv/.fetaliqa-requirements.sha256"
want="$(cat "$repo/requirements.txt" "$repo/requirements-dev.txt" "$repo/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned requirements into $venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip
  # constraints.txt: what they pull in, pinned too (bash test/make_constraints.sh)
  "$venv/bin/python" -m pip install -q -r "$repo/requirements-dev.txt" -c "$repo/constraints.txt"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
