"""Rebuild the embedded default model from scratch: simulate -> cache -> train -> calibrate -> export.

    python -m training.make_default            # writes resources/model/ (25-38 min on 2 quiet AVX-512 cores)

Training cases are `fetaliqa.simulate.case_seed(SEED, i)` for i < CASES (default seed 1000);
evaluation uses another seed (`python -m training.evaluate --seed 2026`), and the exported
provenance records the training seeds so the evaluator can refuse an overlap.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent


def _simulate_one(job: tuple[int, int, int, str]) -> None:
    from fetaliqa.simulate import SimConfig, case_seed, simulate_case, write_case
    seed, i, fps, part = job
    write_case(simulate_case(case_seed(seed, i), SimConfig(frames_per_sweep=fps)), Path(part), "training")


def simulate_release(out: Path, cases: int, seed: int, frames_per_sweep: int, workers: int) -> Path:
    """Simulate `cases` cases into `out` (release layout); skipped when already complete."""
    done = out / ".complete.json"
    spec = {"cases": cases, "seed": seed, "frames_per_sweep": frames_per_sweep}
    if done.exists() and json.loads(done.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    parts = out / ".parts"
    jobs = [(seed, i, frames_per_sweep, str(parts / f"{i:04d}")) for i in range(cases)]
    with ProcessPoolExecutor(max_workers=workers) as pool:  # one CSV per part: writers never race
        list(tqdm(pool.map(_simulate_one, jobs), total=cases, desc="simulating", unit="case", file=sys.stderr))
    rows, header = [], None
    for sub in ("images/stacked_fetal_ultrasound", "masks/stacked_fetal_abdomen"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for _, _, _, part in jobs:
        part = Path(part)
        for sub in ("images/stacked_fetal_ultrasound", "masks/stacked_fetal_abdomen"):
            for f in (part / sub).iterdir():
                os.replace(f, out / sub / f.name)
        with open(part / "circumferences/fetal_abdominal_circumferences_per_sweep.csv", newline="") as fh:
            r = list(csv.reader(fh))
        header, rows = r[0], rows + r[1:]
    (out / "circumferences").mkdir(exist_ok=True)
    with open(out / "circumferences/fetal_abdominal_circumferences_per_sweep.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    shutil.rmtree(parts)
    done.write_text(json.dumps(spec))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.make_default", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "default", help="simulated data, cache and run")
    p.add_argument("--cases", type=int, default=144)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--frames-per-sweep", type=int, default=35,
                   help="35 (a quarter of the real 140) gives more distinct fetuses per CPU minute; frames "
                        "look the same")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--export-to", type=Path, default=REPO / "resources" / "model")
    p.add_argument("--procs", type=int, default=2, help="training processes (torchrun, gloo, 1 thread each)")
    a, train_args = p.parse_known_args(argv)  # anything else goes to training.train
    from fetaliqa.simulate import MAX_RUN_SEED
    if not 0 <= a.seed <= MAX_RUN_SEED or a.cases < 1 or a.frames_per_sweep < 1:
        p.error(f"--seed must be in 0..{MAX_RUN_SEED}, --cases and --frames-per-sweep >= 1")
    t0 = time.time()
    data = simulate_release(a.work / "data", a.cases, a.seed, a.frames_per_sweep, a.workers)
    t_sim = time.time() - t0
    from . import train
    sim = {"generator": "fetaliqa.simulate", "seed": a.seed, "cases": a.cases, "frames_per_sweep": a.frames_per_sweep}
    # the shipped provenance names the data by how to remake it, not by this machine's path
    where = {"data": f"fetaliqa.simulate cases (python -m training.make_default --seed {a.seed} --cases {a.cases})"}
    argv_train = ["--preset", "default-sim", "--data", str(data), "--out", str(a.work / "run"),
                  "--export-to", str(a.export_to), "--provenance", json.dumps({"simulation": sim, **where}),
                  *train_args]
    rc = train.run_training(argv_train, a.procs)
    print(f"[make_default] simulation {t_sim / 60:.1f} min, total {(time.time() - t0) / 60:.1f} min; "
          f"model in {a.export_to}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
