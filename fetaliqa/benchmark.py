"""Benchmark competing teams' ACOUSLIC-AI outputs against ground truth with the official metrics.

``python -m fetaliqa.benchmark --ground-truth GT --predictions NAME=DIR [NAME=DIR ...] --out REPORT
[--workers N] [--bootstrap 1000] [--seed S] [--mode official|corrected] [--methods MODEL_DIR ...]``

GT: the training layout (``images/stacked_fetal_ultrasound``, ``masks/stacked_fetal_abdomen``,
``circumferences/fetal_abdominal_circumferences_per_sweep.csv``) or the evaluator layout
(``<uuid>/fetal_abdomen_stacked_masks/<uuid>.mha`` + ``<uuid>/fetal_abdominal_circumference.json``).
A team DIR holds ``<uuid>/images/fetal-abdomen-segmentation/<one>.mha`` and
``<uuid>/fetal-abdomen-frame-number.json`` per case, or a grand-challenge ``predictions.json``
(a list of jobs: ``pk``, ``inputs`` naming the input image, ``outputs`` with each socket's
``relative_path``) beside ``<pk>/output/...`` folders.

REPORT gets ``per_case.csv``, ``leaderboard.csv``, ``leaderboard.md``, ``summary.json``,
``<team>/metrics.json`` (grand-challenge format ``{"case": {...}, "aggregates": {...}}``) and PNG
plots; the JSON files are strict JSON, an infinite or undefined number written as the string
``"inf"``, ``"-inf"`` or ``"nan"``. Outputs that break the contract (the evaluator would have failed
the whole submission) are listed per case with the reason; that team's remaining cases are still
scored, but it is ranked after every team without a violation (on grand-challenge it would have
no score at all). Outputs for uuids the GT does not hold are listed and not scored.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from fetaliqa.io import read_ac_table, strict_json
from fetaliqa.metrics import METRICS, aggregate, score_case, summarise_gt

SEG_SLUG, FRAME_SLUG, INPUT_SLUG = "fetal-abdomen-segmentation", "fetal-abdomen-frame-number", "stacked-fetal-ultrasound"
SEG_REL, FRAME_REL = "images/fetal-abdomen-segmentation", "fetal-abdomen-frame-number.json"
IMAGE_SUFFIXES = (".mha", ".tif", ".tiff")
EVALUATOR_SUFFIXES = (".mha", ".tiff")  # what the evaluator globs for (``*.mha``, ``*.tiff``; case-sensitive)
N_SWEEPS = 6
CSV_COLUMNS = ["team", "case", "frame", *METRICS, "ac_pred_mm", "ac_ref_mm", "score", "soft_frame", "flags",
               "violation"]


# ----------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class GtCase:
    uuid: str
    mask_path: Path
    ac_ref_mm: tuple[float | None, ...]
    image_path: Path | None = None


@dataclass(frozen=True)
class TeamCase:
    seg_dir: Path | None
    frame_path: Path | None
    frame_value: Any = None  # a grand-challenge job may carry the value inline
    problem: str = ""


def _float_or_none(v: Any) -> float | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    f = float(v)
    return None if math.isnan(f) else f


def discover_ground_truth(root: Path) -> dict[str, GtCase]:
    """Cases of a GT folder in the training or the evaluator layout, by uuid."""
    root = Path(root)
    masks = root / "masks" / "stacked_fetal_abdomen"
    if masks.is_dir():
        csv_path = root / "circumferences" / "fetal_abdominal_circumferences_per_sweep.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"training layout without {csv_path}")
        acs = {uuid: ac for uuid, (_, ac) in read_ac_table(csv_path).items()}
        cases = {}
        for p in sorted(masks.glob("*.mha")):
            if p.stem not in acs:
                raise ValueError(f"{p}: case {p.stem} has no row in {csv_path}")
            img = root / "images" / "stacked_fetal_ultrasound" / p.name
            cases[p.stem] = GtCase(p.stem, p, acs[p.stem], img if img.is_file() else None)
        return cases
    cases = {}
    for d in sorted(q for q in root.iterdir() if q.is_dir()):
        mask = d / "fetal_abdomen_stacked_masks" / f"{d.name}.mha"
        js = d / "fetal_abdominal_circumference.json"
        if mask.is_file() and js.is_file():
            ac = json.loads(js.read_text())
            img = d / "images" / "stacked-fetal-ultrasound" / f"{d.name}.mha"
            cases[d.name] = GtCase(d.name, mask, tuple(_float_or_none(ac.get(f"sweep_{k}_ac_mm"))
                                                      for k in range(1, N_SWEEPS + 1)), img if img.is_file() else None)
    if not cases:
        raise FileNotFoundError(f"{root}: neither the training layout (masks/stacked_fetal_abdomen/) nor the "
                                "evaluator layout (<uuid>/fetal_abdomen_stacked_masks/<uuid>.mha) found")
    return cases


def _socket(values: list[dict], slug: str) -> dict | None:
    return next((v for v in values if v.get("interface", {}).get("slug") == slug), None)


def discover_team(root: Path) -> dict[str, TeamCase]:
    """One team's outputs by case uuid (per-case folders or a grand-challenge predictions.json)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"team folder not found: {root}")
    pj = root / "predictions.json"
    if pj.is_file():
        out: dict[str, TeamCase] = {}
        for job in json.loads(pj.read_text()):
            inp = _socket(job.get("inputs", []), INPUT_SLUG)
            name = (inp or {}).get("image", {}) or {}
            uuid = Path(name.get("name", "")).name.split(".")[0]
            base = root / str(job.get("pk")) / "output"
            seg = _socket(job.get("outputs", []), SEG_SLUG)
            frm = _socket(job.get("outputs", []), FRAME_SLUG)
            problem = "" if uuid else f"job {job.get('pk')}: no {INPUT_SLUG} input image name"
            out[uuid or str(job.get("pk"))] = TeamCase(
                base / (seg or {}).get("interface", {}).get("relative_path", SEG_REL),
                base / (frm or {}).get("interface", {}).get("relative_path", FRAME_REL),
                (frm or {}).get("value"), problem)
        return out
    return {d.name: TeamCase(d / SEG_REL if (d / SEG_REL).is_dir() else d / "output" / SEG_REL,
                             d / FRAME_REL if (d / FRAME_REL).is_file() else d / "output" / FRAME_REL)
            for d in sorted(root.iterdir()) if d.is_dir()}


class Violation(Exception):
    """A team output that breaks the submission contract (the official evaluation would fail)."""


def load_team_case(tc: TeamCase, gt_shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """Read and check one team output -> (frame, volume); raises Violation with the reason."""
    if tc.problem:
        raise Violation(tc.problem)
    files = sorted(p for p in tc.seg_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if tc.seg_dir and tc.seg_dir.is_dir() else []
    if len(files) != 1:
        raise Violation(f"expected exactly one .mha/.tiff in {SEG_REL}, found {len(files)}")
    if files[0].suffix not in EVALUATOR_SUFFIXES:
        raise Violation(f"{files[0].name}: the evaluator reads only *.mha and *.tiff files")
    if tc.frame_path and tc.frame_path.is_file():
        try:
            frame = json.loads(tc.frame_path.read_text())
        except json.JSONDecodeError as exc:
            raise Violation(f"{FRAME_REL} is not valid JSON: {exc}") from None
    elif tc.frame_value is not None:  # the job's JSON value itself: a string stays a string
        frame = tc.frame_value
    else:
        raise Violation(f"missing {FRAME_REL}")
    if isinstance(frame, bool) or not isinstance(frame, int):
        raise Violation(f"frame number {frame!r} is a {type(frame).__name__}, the evaluator needs a JSON integer")
    if not -1 <= frame < gt_shape[0]:
        raise Violation(f"frame number {frame} outside -1..{gt_shape[0] - 1}")
    try:
        vol = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0])))
    except RuntimeError as exc:
        raise Violation(f"cannot read {files[0].name}: {str(exc).strip().splitlines()[-1]}") from None
    if vol.ndim != 3:
        raise Violation(f"segmentation is {vol.ndim}D {vol.shape}, the evaluator needs the 3D {gt_shape} volume")
    if vol.shape != gt_shape:
        raise Violation(f"segmentation shape {vol.shape} differs from the input's {gt_shape}")
    lo, hi = vol.min(), vol.max()
    if lo < 0 or hi > 1 or (vol.dtype.kind == "f" and not np.all((vol == 0) | (vol == 1))):
        raise Violation(f"segmentation values outside {{0, 1}} (min {lo}, max {hi})")
    return frame, vol


# ---------------------------------------------------------------------------------------- scoring
def score_gt_case(gt: GtCase, teams: dict[str, TeamCase | None], mode: str = "official",
                  frames_per_sweep: int | None = None) -> list[dict]:
    """All teams' rows for one GT case (GT read once). Runs in a worker process."""
    img = sitk.ReadImage(str(gt.mask_path))
    gt_arr = sitk.GetArrayFromImage(img)
    fps = frames_per_sweep or gt_arr.shape[0] // N_SWEEPS
    if fps < 1 or (frames_per_sweep is None and gt_arr.shape[0] % N_SWEEPS):
        raise ValueError(f"{gt.mask_path}: {gt_arr.shape[0]} frames is not {N_SWEEPS} sweeps; pass --frames-per-sweep")
    summary = summarise_gt(gt_arr)
    rows = []
    for team, tc in teams.items():
        row: dict[str, Any] = {"team": team, "case": gt.uuid, "violation": ""}
        try:
            if tc is None:
                raise Violation("no output for this case")
            frame, vol = load_team_case(tc, gt_arr.shape)
            s = score_case(gt_arr, gt.ac_ref_mm, frame, vol, frames_per_sweep=fps, mode=mode,
                           spacing_mm=img.GetSpacing()[0], summary=summary)
        except Violation as exc:
            row["violation"] = str(exc)
        else:
            d = s.to_dict()
            row.update({k: d[k] for k in ("frame", *METRICS, "ac_pred_mm", "ac_ref_mm", "score", "soft_frame")})
            row["flags"] = ";".join(s.flags)
        rows.append(row)
    return rows


def _num(row: dict, key: str) -> float:
    v = row.get(key)
    return math.nan if v is None or v == "" else float(v)


def bootstrap(scores: np.ndarray, n: int, seed: int) -> dict:
    """Case-level bootstrap of each team's mean score. ``scores``: (teams, cases), paired by case.
    Returns per-team 2.5/97.5 % percentiles and rank frequencies (rank 1 = best)."""
    t, c = scores.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, c, size=(n, c))
    with np.errstate(invalid="ignore"):
        boot = scores[:, idx].mean(axis=2)  # (teams, n): the score is linear in the case means
    key = np.where(np.isnan(boot), -np.inf, boot)
    ranks = np.argsort(np.argsort(-key, axis=0, kind="stable"), axis=0)  # 0-based rank per resample
    freq = np.stack([(ranks == r).mean(axis=1) for r in range(t)], axis=1)  # (teams, ranks)
    # order statistics, no interpolation: an infinite score (the Dice quirk) stays inf instead of nan
    return {"low": np.percentile(boot, 2.5, axis=1, method="lower"),
            "high": np.percentile(boot, 97.5, axis=1, method="higher"), "rank_freq": freq}


def permutation_test(a: np.ndarray, b: np.ndarray, n: int, seed: int) -> float:
    """Two-sided paired sign-flip permutation test of mean(a - b) = 0 over cases; p-value."""
    with np.errstate(invalid="ignore"):
        d = np.asarray(a, float) - np.asarray(b, float)
    if not np.all(np.isfinite(d)) or len(d) == 0:
        return math.nan
    obs = abs(d.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, len(d)))
    perm = np.abs((signs * d).mean(axis=1))
    return float((1 + np.sum(perm >= obs - 1e-12)) / (n + 1))


# ---------------------------------------------------------------------------------------- reports
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:.{digits}f}"
    return str(v)


def write_reports(rows: list[dict], teams: list[str], out: Path, n_boot: int, seed: int) -> list[dict]:
    """Write all report files; returns the leaderboard rows (best first)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (teams.index(r["team"]), r["case"]))
    with open(out / "per_case.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k), 6) for k in CSV_COLUMNS})

    by_team = {t: [r for r in rows if r["team"] == t] for t in teams}
    board = []
    for t in teams:
        ok = [r for r in by_team[t] if not r["violation"]]
        agg = _aggregate_rows(ok)
        (out / t).mkdir(exist_ok=True)
        (out / t / "metrics.json").write_text(strict_json(
            {"case": {r["case"]: {k: r.get(k) for k in ("frame", *METRICS, "ac_pred_mm", "ac_ref_mm", "score",
                                                         "flags", "violation")} for r in by_team[t]},
             "aggregates": agg}))
        n_bad = sum(1 for r in by_team[t] if r["violation"] and not r.get("extra"))
        board.append({"team": t, "n_scored": len(ok), "n_violations": n_bad,
                      "n_extra": sum(1 for r in by_team[t] if r.get("extra")),
                      "n_flagged": sum(1 for r in ok if r.get("flags")), **{
                          f"{m}_{s}": agg[m][s] for m in (*METRICS, "score") for s in ("mean", "std")}})

    # Ranked, with paired bootstrap and permutation tests: the teams without a contract violation
    # (the ones grand-challenge would score), over all cases. Only when no team is free of them,
    # every team with a scored case, over the cases all of them scored. The others follow, on the
    # mean of the cases they scored (CI from those cases alone, no rank frequencies); a team
    # without any scored case comes last.
    scored = {t: {r["case"]: _num(r, "score") for r in by_team[t] if not r["violation"]} for t in teams}
    ranked = [b["team"] for b in board if b["n_scored"] and not b["n_violations"]]
    all_failing = not ranked
    if all_failing:
        ranked = [t for t in teams if scored[t]]
    common = sorted(set.intersection(*[set(scored[t]) for t in ranked])) if ranked else []
    s_mat = np.array([[scored[t][c] for c in common] for t in ranked]).reshape(len(ranked), len(common))
    boot = bootstrap(s_mat, n_boot, seed) if common else None
    for b in board:
        t = b["team"]
        i = ranked.index(t) if t in ranked else None
        own = None if i is not None or not scored[t] else bootstrap(
            np.array([[scored[t][c] for c in sorted(scored[t])]]), n_boot, seed)
        src, j = (boot, i) if i is not None else (own, 0)
        b["score_ci_low"] = float(src["low"][j]) if src else math.nan
        b["score_ci_high"] = float(src["high"][j]) if src else math.nan
        b["rank_freq"] = [float(x) for x in boot["rank_freq"][i]] if boot and i is not None else []
        b["fails_submission"] = bool(b["n_violations"])

    def order_key(b: dict) -> tuple:
        group = 0 if b["team"] in ranked else 1 if b["n_scored"] else 2
        return group, (-b["score_mean"] if not math.isnan(b["score_mean"]) else math.inf)

    board = sorted(board, key=order_key)
    for rank, b in enumerate(board, 1):
        b["rank"] = rank
    tests = []
    for a, b in zip(board, board[1:]):
        if b["team"] not in ranked:
            break
        ia, ib = ranked.index(a["team"]), ranked.index(b["team"])
        tests.append({"better": a["team"], "worse": b["team"], "n_cases": len(common),
                      "mean_diff": _mean_diff(s_mat[ia], s_mat[ib]) if common else math.nan,
                      "p_value": permutation_test(s_mat[ia], s_mat[ib], max(n_boot, 1000), seed) if common else math.nan})

    cols = ["rank", "team", "score_mean", "score_ci_low", "score_ci_high", *[f"{m}_{s}" for m in METRICS
                                                                               for s in ("mean", "std")],
            "score_std", "n_scored", "n_violations", "fails_submission", "n_extra", "n_flagged"]
    with open(out / "leaderboard.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, cols + ["rank_freq"], extrasaction="ignore")
        w.writeheader()
        for b in board:
            w.writerow({**{k: _fmt(b[k], 6) for k in cols}, "rank_freq": " ".join(f"{x:.3f}" for x in b["rank_freq"])})
    _write_markdown(out, board, tests, rows, n_boot, seed, len(common), all_failing)
    _plots(out, rows, [b["team"] for b in board])
    (out / "summary.json").write_text(strict_json({"leaderboard": board, "permutation_tests": tests,
                                                    "bootstrap": {"resamples": n_boot, "seed": seed,
                                                                  "paired_cases": len(common),
                                                                  "paired_teams": ranked}}))
    return board


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):
        return float(np.mean(a - b))


def _aggregate_rows(rows: list[dict]) -> dict:
    from fetaliqa.metrics import CaseScore

    scores = [CaseScore(frame=int(r["frame"]), **{m: _num(r, m) for m in METRICS}, ac_pred_mm=r.get("ac_pred_mm"),
                        ac_ref_mm=r.get("ac_ref_mm"), flags=[f for f in r.get("flags", "").split(";") if f])
              for r in rows]
    return aggregate(scores)


def _write_markdown(out: Path, board: list[dict], tests: list[dict], rows: list[dict], n_boot: int, seed: int,
                    n_common: int, all_failing: bool) -> None:
    failing = [b["team"] for b in board if b["fails_submission"]]
    if all_failing:
        who = (f"the {n_common} cases that every team with a scored case scored (paired; every team has a contract "
               "violation, so all are ranked on the cases they scored)")
    else:
        who = f"the {n_common} cases, paired, for the teams without a contract violation"
    L = ["# ACOUSLIC-AI benchmark", "",
         "Score = 0.5 (1 - NAE_AC) + 0.25 soft Dice + 0.25 WFSS (means over cases); population std. "
         f"95 % CI: {n_boot} case bootstrap resamples (seed {seed}) over {who}."
         + ("" if all_failing or not failing else
            " A team with a contract violation would get no score on grand-challenge (the evaluation of its "
            "whole submission fails): it is ranked after them, on the mean of the cases it did score, its CI "
            "from those cases alone."), "",
         "| rank | team | score | 95 % CI | NAE_AC | Dice | soft Dice | WFSS | Hausdorff (px) | scored | violations | quirk-flagged |",
         "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in board:
        L.append(f"| {b['rank']} | {b['team']} | {_fmt(b['score_mean'])} | {_fmt(b['score_ci_low'], 3)}-"
                 f"{_fmt(b['score_ci_high'], 3)} | " + " | ".join(
                     f"{_fmt(b[m + '_mean'])} ± {_fmt(b[m + '_std'], 3)}" for m in ("nae_ac", "dice", "dice_soft",
                                                                                     "wfss", "hausdorff"))
                 + f" | {b['n_scored']} | {b['n_violations']} | {b['n_flagged']} |")
    n_ranked = sum(1 for b in board if b["rank_freq"])
    L += ["", "## Rank frequencies (bootstrap)", "", "| team | " + " | ".join(f"rank {i + 1}" for i in range(n_ranked))
          + " |", "|---|" + "---:|" * n_ranked]
    L += [f"| {b['team']} | " + " | ".join(f"{x:.3f}" for x in b["rank_freq"]) + " |" for b in board if b["rank_freq"]]
    L += ["", "## Paired permutation tests between neighbours", "", "| better | worse | mean diff | p |", "|---|---|---:|---:|"]
    L += [f"| {t['better']} | {t['worse']} | {_fmt(t['mean_diff'])} | {_fmt(t['p_value'])} |" for t in tests]
    infinite = [b for b in board if math.isinf(b["score_mean"])]
    if infinite:
        L += ["", "## Infinite scores", "",
              "The official Dice of an empty prediction on an empty GT frame is +inf (ITK's 0/0), and one such "
              "case makes a team's mean Dice, soft Dice and score +inf: the official leaderboard would rank it "
              "first. It happens for frame -1 (scored against the last GT frame, almost never annotated) and for "
              "an empty mask on any unannotated frame (`dice_inf_empty` below; `--mode corrected` gives finite "
              "numbers). Teams: " + ", ".join(f"{b['team']} ({_n_flagged(rows, b['team'], 'dice_inf_empty')} cases)"
                                              for b in infinite) + "."]
    flagged = [r for r in rows if r.get("flags")]
    L += ["", "## Cases where a quirk of the official evaluation decided the number", ""]
    L += [f"- {r['team']} / {r['case']}: {r['flags']}" for r in flagged] or ["none"]
    bad = [r for r in rows if r["violation"] and not r.get("extra")]
    L += ["", "## Contract violations (the official evaluation would fail the whole submission)", ""]
    L += [f"- {r['team']} / {r['case']}: {r['violation']}" for r in bad] or ["none"]
    extra = [r for r in rows if r.get("extra")]
    if extra:
        L += ["", "## Outputs for cases the ground truth does not hold (not scored)", ""]
        L += [f"- {r['team']} / {r['case']}" for r in extra]
    L += ["", "![scores](score_distribution.png) ![Bland-Altman](bland_altman.png) ![WFSS](wfss_outcomes.png)", ""]
    (out / "leaderboard.md").write_text("\n".join(L))


def _n_flagged(rows: list[dict], team: str, flag: str) -> int:
    return sum(1 for r in rows if r["team"] == team and flag in (r.get("flags") or "").split(";"))


def _plots(out: Path, rows: list[dict], teams: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {t: [r for r in rows if r["team"] == t and not r["violation"]] for t in teams}
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(teams), 4))
    data = [[v for v in (_num(r, "score") for r in ok[t]) if math.isfinite(v)] for t in teams]
    ax.boxplot([d or [math.nan] for d in data], showmeans=True)
    for i, d in enumerate(data, 1):
        ax.scatter(np.full(len(d), i) + np.random.default_rng(i).uniform(-0.15, 0.15, len(d)), d, s=8, alpha=0.6)
    ax.set_xticks(range(1, len(teams) + 1), teams, rotation=20)
    ax.set_ylabel("per-case score")
    ax.set_title("Score per case (finite values)")
    fig.tight_layout()
    fig.savefig(out / "score_distribution.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for t in teams:
        pairs = np.array([(_num(r, "ac_pred_mm"), _num(r, "ac_ref_mm")) for r in ok[t]]).reshape(-1, 2)
        pairs = pairs[np.all(np.isfinite(pairs), axis=1)]
        if len(pairs):
            mean, diff = pairs.mean(axis=1), pairs[:, 0] - pairs[:, 1]
            sc = ax.scatter(mean, diff, s=12, label=f"{t}: bias {diff.mean():+.1f} mm, LoA ±{1.96 * diff.std():.1f}")
            ax.axhline(diff.mean(), color=sc.get_facecolor()[0], lw=1)
            for sgn in (-1, 1):
                ax.axhline(diff.mean() + sgn * 1.96 * diff.std(), color=sc.get_facecolor()[0], lw=0.8, ls="--")
    ax.set_xlabel("mean of predicted and reference AC (mm)")
    ax.set_ylabel("predicted - reference AC (mm)")
    ax.set_title("Bland-Altman of AC (cases measured on both sides)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bland_altman.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(teams), 4))
    cats = [("optimal (1)", lambda r: not r["violation"] and _num(r, "wfss") == 1.0),
            ("suboptimal (0.6)", lambda r: not r["violation"] and _num(r, "wfss") == 0.6),
            ("miss (0)", lambda r: not r["violation"] and _num(r, "wfss") == 0.0),
            ("violation", lambda r: bool(r["violation"]) and not r.get("extra"))]
    bottom = np.zeros(len(teams))
    for name, pred in cats:
        counts = np.array([sum(1 for r in rows if r["team"] == t and pred(r)) for t in teams], float)
        ax.bar(teams, counts, bottom=bottom, label=name)
        bottom += counts
    ax.set_ylabel("cases")
    ax.set_title("Frame selection (WFSS) outcomes")
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    fig.savefig(out / "wfss_outcomes.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ this repo's methods
def run_methods(gt_root: Path, model_dirs: list[Path], out: Path, *, device: str = "cpu",
                progress: bool = True) -> dict[str, Path]:
    """Run exported fetaliqa models over the GT images, writing team folders; returns {team: dir}.

    Each model is run once per case over every frame with signal; its per-frame statistics then
    serve three teams (no further model passes except one map per chosen frame):
    ``<model>``: what the container does (calibrated thresholds, fast search replayed on the
    exhaustive statistics: the same frames a real fast run would score, so the same choice);
    ``<model>-published``: the same search under the published thresholds (pixel 0.5, area
    1 %; left out when the model's own thresholds are those); ``<model>-largest-area``: the
    organisers' baseline rule on the same model (the frame with the largest predicted abdomen
    area, same mask post-processing). Needs the GT images (``images/...`` beside the masks).
    """
    import dataclasses

    from fetaliqa.io import read_stack, write_json, write_mask_volume
    from fetaliqa.model import load_exported
    from fetaliqa.model.config import PUBLISHED_THRESHOLDS
    from fetaliqa.pipeline import (FrameScorer, ReplayScorer, conclude, fast_search, frames_with_signal,
                                   largest_area_frame, native_mask)

    gt = discover_ground_truth(gt_root)
    missing = [u for u, g in gt.items() if g.image_path is None]
    if missing:
        raise FileNotFoundError(f"--methods needs the GT images; none for {len(missing)} case(s), e.g. {missing[0]}")
    teams: dict[str, Path] = {}
    for model_dir in model_dirs:
        model = load_exported(model_dir, device=device)
        name = Path(model_dir).resolve().name
        cfg = model.config
        policies = {name: cfg}
        # the published decision: the area rule at 0.5 / 1 % (CLS at 0.5), no calibrated score or frame-head cut
        published = dataclasses.replace(cfg, **PUBLISHED_THRESHOLDS, score_threshold=None, frame_threshold=None)
        if published != cfg:
            policies[f"{name}-published"] = published
        dirs = {t: Path(out) / t for t in [*policies, f"{name}-largest-area"]}
        for u, g in tqdm(gt.items(), desc=f"{name}: cases", unit="case", disable=not progress, file=sys.stderr):
            stack, ref = read_stack(g.image_path)
            signal = frames_with_signal(stack)
            fan = stack.max(axis=0) > 0  # once per case, for every team's mask
            scorer = FrameScorer(stack, model, device=device, progress=False,
                                 also_at=[c.pixel_threshold for c in policies.values()])
            scorer.score(np.flatnonzero(signal))
            probs: dict = {}
            choices = {}
            for team, c in policies.items():
                replay = ReplayScorer(scorer, probs, config=c)
                fast_search(replay, signal)
                a = conclude(replay, fan)
                choices[team] = (a.frame, a.mask)
            frame = largest_area_frame(scorer)
            own = ReplayScorer(scorer, probs)  # the model's config; shares the chosen frames' maps
            choices[f"{name}-largest-area"] = (frame, native_mask(own, frame, fan))
            vol = np.zeros(stack.shape, np.uint8)
            for team, (frame, mask) in choices.items():
                vol[:] = 0
                if frame >= 0:
                    vol[frame] = mask
                (dirs[team] / u / SEG_REL).mkdir(parents=True, exist_ok=True)
                write_mask_volume(dirs[team] / u / SEG_REL / "output.mha", vol, ref)
                write_json(dirs[team] / u / FRAME_REL, int(frame))
        teams.update(dirs)
    return teams


# ------------------------------------------------------------------------------------------- main
def run_benchmark(gt_root: Path, predictions: dict[str, Path], out: Path, *, workers: int = 1,
                  n_boot: int = 1000, seed: int = 0, mode: str = "official",
                  frames_per_sweep: int | None = None, progress: bool = True) -> list[dict]:
    """Score every team on every GT case and write the report; returns the leaderboard (best first)."""
    gt = discover_ground_truth(gt_root)
    team_cases = {t: discover_team(d) for t, d in predictions.items()}
    teams = list(predictions)
    rows: list[dict] = []
    for t, cases in team_cases.items():  # outputs for cases the GT does not have
        rows += [{"team": t, "case": u, "violation": "extra output: no ground-truth case with this uuid", "extra": True}
                 for u in sorted(set(cases) - set(gt))]
    jobs = [(g, {t: team_cases[t].get(u) for t in teams}) for u, g in gt.items()]
    bar = tqdm(total=len(jobs), desc="cases", unit="case", disable=not progress, file=sys.stderr)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(score_gt_case, g, tc, mode, frames_per_sweep) for g, tc in jobs]
            for fut in as_completed(futures):
                rows += fut.result()
                bar.update()
    else:
        for g, tc in jobs:
            rows += score_gt_case(g, tc, mode, frames_per_sweep)
            bar.update()
    bar.close()
    return write_reports(rows, teams, Path(out), n_boot, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fetaliqa.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--ground-truth", type=Path, required=True, help="GT folder (training or evaluator layout)")
    p.add_argument("--predictions", nargs="*", default=[], metavar="NAME=DIR", help="team outputs")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (cases)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (>= 1000 recommended)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("official", "corrected"), default="official")
    p.add_argument("--frames-per-sweep", type=int, default=None, help="default: GT frames / 6")
    p.add_argument("--methods", nargs="*", default=[], metavar="MODEL_DIR",
                   help="exported fetaliqa models to run over the GT images first (one model pass per "
                        "case); each adds the teams MODEL (the container's choice, calibrated thresholds), "
                        "MODEL-published (published thresholds) and MODEL-largest-area (baseline rule)")
    p.add_argument("--device", default="cpu", help="device for --methods")
    args = p.parse_args(argv)
    if args.bootstrap < 1 or args.workers < 1:
        p.error("--bootstrap and --workers must be >= 1")
    if args.frames_per_sweep is not None and args.frames_per_sweep < 1:
        p.error(f"--frames-per-sweep must be >= 1, got {args.frames_per_sweep}")
    try:
        preds: dict[str, Path] = {}
        for spec in args.predictions:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--predictions expects NAME=DIR, got {spec!r}")
            if name in preds:
                raise ValueError(f"team name {name!r} given twice")
            preds[name] = Path(path)
        if args.methods:
            preds.update(run_methods(args.ground_truth, [Path(m) for m in args.methods], args.out / "methods",
                                     device=args.device))
        if not preds:
            raise ValueError("nothing to benchmark: give --predictions NAME=DIR and/or --methods MODEL_DIR")
        board = run_benchmark(args.ground_truth, preds, args.out, workers=args.workers, n_boot=args.bootstrap,
                              seed=args.seed, mode=args.mode, frames_per_sweep=args.frames_per_sweep)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for b in board:
        print(f"{b['rank']:>2}  {b['team']:<24} score {_fmt(b['score_mean'])}  "
              f"[{_fmt(b['score_ci_low'], 3)}, {_fmt(b['score_ci_high'], 3)}]  violations {b['n_violations']}"
              + ("  (would fail on grand-challenge)" if b["fails_submission"] else ""))
    print(f"report: {args.out / 'leaderboard.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
