#!/usr/bin/env bash
# The example benchmark report in one command: simulate 8 small GT cases, make four
# illustrative teams (one breaking the contract), score them with the official metrics.
#   bash docs/benchmark/run_example.sh [OUT]     (default out/benchmark-example; report in OUT/report)
set -euo pipefail
cd "$(dirname "$0")/../.."
source test/setup_env.sh
out="${1:-out/benchmark-example}"
rm -rf "$out"
python -m fetaliqa.simulate --out "$out/gt" --cases 8 --seed 4 --frames-per-sweep 30
python docs/benchmark/make_example_teams.py "$out/gt" "$out/teams"
python -m fetaliqa.benchmark --ground-truth "$out/gt" --out "$out/report" --workers 2 \
  --bootstrap 1000 --seed 0 --predictions oracle="$out/teams/oracle" eroded="$out/teams/eroded" \
  early="$out/teams/early" float-frame="$out/teams/float-frame"
echo "report: $out/report/leaderboard.md"
