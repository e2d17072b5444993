"""Simulated ACOUSLIC-AI-like blind-sweep cases with ground truth from a 3D scene.

A case is 6 sweeps x ``frames_per_sweep`` frames through a seeded 3D scene (maternal wall,
uterus with amniotic fluid and placenta, a fetus at a random position, lie and rotation:
trunk = capped elliptic cylinder with liver, stomach, umbilical vein, spine, ribs, heart,
bowel; head with skull and falx; limbs with long bones; cord loops). Sweeps 1-3 are
transverse caudo-cranial (moving towards +y), sweeps 4-6 sagittal left to right (towards
+x), with operator wobble (tilt, rotation, drift, speed changes, loss of contact).

World frame, mm: x = maternal lateral, y = caudo-cranial (+ cranial), z = depth below the
skin. A frame is the plane ``O + h*e_h + d*e_d`` (h lateral, d depth below the probe face).
Images are formed along the beams of a sector fan (the official FOV geometry): echogenicity
on a coarse polar grid, acoustic shadows as transmission accumulated along each beam, depth
attenuation with time-gain compensation, Rayleigh speckle (precomputed, log-compressed)
multiplied on a fine polar grid, then scan-converted to the frame (OpenCV ``remap``).

Labels come from the geometry, never from pixels: optimal (1) = plane within
``opt_angle_deg`` of perpendicular to the fetal axis, within ``opt_level`` x radius of the
stomach / umbilical-vein level and cutting both the stomach and the umbilical vein, with the
cross-section at least ``opt_inside`` inside the fan;
suboptimal (2) = a transverse abdominal section that is further, more oblique or partly cut
(see ``SimConfig``); 0 otherwise. Masks = the trunk cross-section inside the fan.

Frame sizes other than 562x744 show the same field of view zoomed out; files always say
0.28 mm/pixel and ``ac_mm`` is measured with ``fetaliqa.measure.official_circumference_mm``
at its defaults (the evaluator's constant 0.28 mm, official FOV at 562x744, whole frame
otherwise), so ACs of small cases shrink with the frame. Stacks: uint8 ``(frames, rows,
cols)``, frame ``k*frames_per_sweep + i`` = frame i of sweep k+1.

CLI: ``python -m fetaliqa.simulate --out DIR --cases N --seed S [--layout training|evaluator]
[--frames-per-sweep K] [--size ROWSxCOLS] [--noise X] [--contrast X] [--wobble X]``;
``--stats`` prints label statistics of N cases (geometry only, no pixels, no files).

Modules: ``geometry`` (scene, probe poses, labels: the fast path), ``render`` (pixels, masks).
"""

import argparse
import csv
import json
import sys
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import FULL_SHAPE, SPACING_MM, SWEEPS, SimConfig, _plan, fan_mask, near_misses, plane_levels
from .render import _render

__all__ = ["SimConfig", "SimulatedCase", "simulate_case", "case_seed", "write_case", "label_statistics",
           "frame_geometry", "fan_mask", "main", "SPACING_MM", "FULL_SHAPE", "SWEEPS"]
_CSV_NAME = "fetal_abdominal_circumferences_per_sweep.csv"


@dataclass
class SimulatedCase:
    """One simulated case in the ACOUSLIC-AI format.

    ``stack`` uint8 ``(6*frames_per_sweep, rows, cols)``, 0 outside the fan; ``masks`` uint8 of
    the same shape, 0 background, 1 optimal plane, 2 suboptimal plane; ``ac_mm`` the 6 per-sweep
    reference ACs (official measurement on the largest mask of the sweep's best label; None
    when the sweep has no annotation).
    """
    uuid: str
    subject_id: str
    stack: np.ndarray
    masks: np.ndarray
    ac_mm: list[float | None]
    spacing_mm: float = SPACING_MM


MAX_RUN_SEED = 0xFFFFFFFF  # case_seed's stream keeps 32 bits of the run seed


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a run started with ``--seed seed`` (independent streams). ``seed``
    in 0..2**32-1: the stream keeps 32 bits of it, so larger or negative seeds would alias others."""
    if not 0 <= int(seed) <= MAX_RUN_SEED:
        raise ValueError(f"run seed {seed} outside 0..{MAX_RUN_SEED} (it would give another seed's cases)")
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of runs of True in a 1D bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(np.nonzero(d == -1)[0] - np.nonzero(d == 1)[0])


def label_statistics(seed: int, cases: int, config: SimConfig = SimConfig()) -> dict[str, float]:
    """Label statistics of ``cases`` cases of a run with ``seed`` (geometry only, no pixels).

    The same figures as the real training set's per_case_frame_stats.csv summary in
    docs/simulator.md; labels are those of the full render.
    """
    per_case, opt, sub, nsw, runs, near = [], [], [], [], [], []
    per_sweep = [0] * SWEEPS
    n = config.frames_per_sweep
    for i in range(cases):
        plan = _plan(case_seed(seed, i), config)
        lab = plan.labels
        near.append(int(near_misses(plan).sum()))
        per_case.append(int(np.count_nonzero(lab)))
        opt.append(int(np.count_nonzero(lab == 1)))
        sub.append(int(np.count_nonzero(lab == 2)))
        nsw.append(sum(bool(lab[k * n:(k + 1) * n].any()) for k in range(SWEEPS)))
        for k in range(SWEEPS):
            per_sweep[k] += bool(lab[k * n:(k + 1) * n].any())
        for k in range(SWEEPS):
            runs += _runs(lab[k * n:(k + 1) * n] > 0)
    per_case, opt, nsw = np.array(per_case), np.array(opt), np.array(nsw)
    ann = per_case > 0
    out = {"cases": cases, "with_optimal_pct": 100 * np.mean(opt > 0),
           "with_annotation_pct": 100 * np.mean(ann),
           "frames_median": float(np.median(per_case[ann])) if ann.any() else 0.0,
           "frames_min": int(per_case[ann].min()) if ann.any() else 0,
           "frames_max": int(per_case.max(initial=0)),
           "optimal_frames_median": float(np.median(opt[opt > 0])) if (opt > 0).any() else 0.0,
           "suboptimal_frames_median": float(np.median(np.array(sub)[ann])) if ann.any() else 0.0,
           "run_length_median": float(np.median(runs)) if runs else 0.0}
    for k in range(1, 5):
        out[f"sweeps_{k}_pct"] = 100 * np.mean(nsw[ann] == k) if ann.any() else 0.0
    out["sweeps_5plus_pct"] = 100 * np.mean(nsw[ann] >= 5) if ann.any() else 0.0
    for k in range(SWEEPS):
        out[f"sweep_{k + 1}_annotated_pct"] = 100 * per_sweep[k] / max(cases, 1)
    # unannotated transverse trunk sections near the stomach level (geometry.near_misses): the
    # frame F1 of a model that fires on all of them and on every annotated frame
    out["near_miss_frames"] = int(sum(near))
    out["annotated_frames"] = int(per_case.sum())
    out["f1_if_all_transverse_sections_fire"] = (2 * per_case.sum() / (2 * per_case.sum() + sum(near))
                                                 if per_case.sum() else 0.0)
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


def frame_geometry(seed: int, config: SimConfig = SimConfig()) -> dict[str, np.ndarray]:
    """Per frame of a case (geometry only, no pixels): ``label`` (0/1/2, those of the render),
    ``level`` (where the plane crosses the fetal axis, trunk radii from the stomach level;
    ``geometry.plane_levels``) and ``near_miss`` (``geometry.near_misses``). For studying
    where a model's frame decisions go wrong."""
    plan = _plan(seed, config)
    return {"label": plan.labels, "level": plane_levels(plan), "near_miss": near_misses(plan)}


def _reference_acs(masks: np.ndarray, labels: np.ndarray, inside: np.ndarray, n: int) -> list[float | None]:
    """Per sweep: official AC of the best mask, None when the sweep has no annotation.

    Best mask = of the sweep's best label (1, else 2), the one least cut by the fan edge (inside
    fraction to 0.01), then the largest, that the official measurement reads right: the official
    fit on the few boundary points left by a heavily cut mask can be far off, and a mask running
    along the fan edge can be measured on a stray piece of its boundary (a few mm, thousands
    of mm or nothing; ``fetaliqa.measure.misread``); an organiser measuring by hand would not
    pick that frame, nor read that number. When the official measurement misreads every such
    mask: the uncut AC (``measure.uncut_circumference_mm``) of the first one that has it.
    """
    from fetaliqa.measure import misread, official_circumference_mm, uncut_circumference_mm

    out: list[float | None] = []
    for k in range(SWEEPS):
        lab = labels[k * n:(k + 1) * n]
        best = 1 if (lab == 1).any() else 2 if (lab == 2).any() else 0
        if not best:
            out.append(None)
            continue
        frames = k * n + np.nonzero(lab == best)[0]
        order = sorted(frames, key=lambda f: (-round(float(inside[f]), 2), -int(np.count_nonzero(masks[f])), f))
        ac, fallback = None, None
        for f in order:
            official, uncut = official_circumference_mm(masks[f]), uncut_circumference_mm(masks[f])
            if official is not None and not misread(official, uncut):
                ac = official
                break
            fallback = uncut if fallback is None else fallback
        out.append(None if ac is None and fallback is None else float(fallback if ac is None else ac))
    return out


def simulate_case(seed: int, config: SimConfig = SimConfig()) -> SimulatedCase:
    """Simulate one case from ``seed`` (same seed and config -> byte-identical arrays)."""
    plan = _plan(seed, config)
    stack, masks, inside = _render(plan, seed, config)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 2])
    uid = str(uuidlib.UUID(bytes=rng.bytes(16), version=4))
    acs = _reference_acs(masks, plan.labels, inside, config.frames_per_sweep)
    return SimulatedCase(uid, f"sim{int(seed) % 10**10:010d}", stack, masks, acs)


# ----------------------------------------------------------------------------- files and CLI
def _write_image(array: np.ndarray, path: Path, compress: bool) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((SPACING_MM, SPACING_MM, 1.0))
    sitk.WriteImage(img, str(path), compress)


def write_case(case: SimulatedCase, out_dir: Path, layout: str = "training") -> None:
    """Write a case in the ACOUSLIC-AI ``training`` release layout or the ``evaluator`` GT layout.

    training: ``images/stacked_fetal_ultrasound/<uuid>.mha``, ``masks/stacked_fetal_abdomen/<uuid>.mha``
    and a row of ``circumferences/fetal_abdominal_circumferences_per_sweep.csv`` (replaced if the
    uuid is already there). evaluator: ``<uuid>/fetal_abdomen_stacked_masks/<uuid>.mha``,
    ``<uuid>/fetal_abdominal_circumference.json``, ``<uuid>/images/stacked-fetal-ultrasound/<uuid>.mha``.
    Images are uncompressed (speckle hardly compresses), masks compressed; spacing 0.28 mm, z 1.
    """
    out_dir = Path(out_dir)
    u = case.uuid
    if layout == "training":
        _write_image(case.stack, out_dir / "images" / "stacked_fetal_ultrasound" / f"{u}.mha", False)
        _write_image(case.masks, out_dir / "masks" / "stacked_fetal_abdomen" / f"{u}.mha", True)
        path = out_dir / "circumferences" / _CSV_NAME
        header = ["uuid", "subject_id"] + [f"sweep_{k}_ac_mm" for k in range(1, SWEEPS + 1)]
        rows = []
        if path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and r[0] != u]
        rows.append([u, case.subject_id] + ["" if a is None else repr(float(a)) for a in case.ac_mm])
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
    elif layout == "evaluator":
        d = out_dir / u
        _write_image(case.masks, d / "fetal_abdomen_stacked_masks" / f"{u}.mha", True)
        _write_image(case.stack, d / "images" / "stacked-fetal-ultrasound" / f"{u}.mha", False)
        acs = {f"sweep_{k + 1}_ac_mm": (None if a is None else float(a)) for k, a in enumerate(case.ac_mm)}
        (d / "fetal_abdominal_circumference.json").write_text(json.dumps(acs, indent=2) + "\n")
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'training' or 'evaluator'")


def _size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be ROWSxCOLS, e.g. 562x744, got {text!r}") from None
    if rows < 32 or cols < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return rows, cols


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"number of cases must be >= 0, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from fetaliqa.io import check_writable

    p = argparse.ArgumentParser(prog="python -m fetaliqa.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="output folder (created if missing)")
    p.add_argument("--cases", type=_count, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="run seed; case i uses case_seed(seed, i)")
    p.add_argument("--layout", choices=("training", "evaluator"), default="training")
    p.add_argument("--frames-per-sweep", type=int, default=SimConfig.frames_per_sweep,
                   help="frames per sweep, 6 sweeps per case (default 140)")
    p.add_argument("--size", type=_size, default=FULL_SHAPE, help="frame ROWSxCOLS (default 562x744)")
    knobs = {"noise": "speckle strength, 0 = none", "contrast": "tissue contrast, <1 = harder",
             "wobble": "operator tilt/drift/speed/contact-loss variability", "gain": "overall brightness",
             "blur": "speckle grain size and edge softness"}
    for name, text in knobs.items():
        p.add_argument(f"--{name}", type=float, default=getattr(SimConfig, name),
                       help=f"{text} (default {getattr(SimConfig, name)})")
    p.add_argument("--stats", action="store_true", help="print label statistics of the cases "
                   "(geometry only, fast); writes nothing")
    a = p.parse_args(argv)
    if not 0 <= a.seed <= MAX_RUN_SEED:
        p.error(f"--seed must be in 0..{MAX_RUN_SEED}, got {a.seed}")
    if a.stats and a.cases < 1:
        p.error("--stats needs --cases >= 1")
    try:
        cfg = SimConfig(frames_per_sweep=a.frames_per_sweep, rows=a.size[0], cols=a.size[1], noise=a.noise,
                        contrast=a.contrast, wobble=a.wobble, gain=a.gain, blur=a.blur)
    except ValueError as err:
        p.error(str(err))
    if a.stats:
        for k, v in label_statistics(a.seed, a.cases, cfg).items():
            print(f"{k}: {v:.3f}" if isinstance(v, float) and abs(v) < 1 else
                  f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
        return 0
    if a.out is None:
        p.error("--out is required (or --stats)")
    try:
        check_writable(a.out)
    except OSError as err:
        print(f"error: cannot write to output folder {a.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    for i in tqdm(range(a.cases), desc="simulating cases", unit="case", file=sys.stderr):
        write_case(simulate_case(case_seed(a.seed, i), cfg), a.out, a.layout)
    return 0

