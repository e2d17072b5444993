"""Evaluate an exported model on simulated cases (or a release-layout folder) with the
project's metrics: frame-level F1/precision/recall/AUROC and the challenge score.

    python -m training.evaluate --model resources/model --cases 20 --seed 2026
    python -m training.evaluate --model runs/x/model --data /path/to/acouslic --cases 30
    python -m training.evaluate --cases 30 --seed 2026 --workers 2 --compare   # selection rules

Simulated cases use seeds `fetaliqa.simulate.case_seed(seed, i)`; when the model's
provenance lists its training seeds, overlapping evaluation seeds are refused.
Frame level: a frame is positive when it holds any annotation; the model's decision is the
pipeline's per-frame `good` (the frame head's smoothed probability above its calibrated cut,
or the quality score above its cut, or for older models the area above the calibrated
thresholds); AUROC, AUPRC and the hindsight cut rank frames by the value that decision cuts
(`FrameScorer.decision`). Case level: `fetaliqa.metrics.score_case` on the chosen frame
and mask (WFSS, soft Dice, NAE of the AC), aggregated as the challenge does.
--compare replays other selection rules (RULES) on the same model outputs: the measured basis
of the defaults (temporal window, mask vs ellipse, shape factor, sweep prior, the fast search).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fetaliqa.io import check_writable, strict_json
from fetaliqa.metrics import aggregate, frame_metrics, score_case
from fetaliqa.model import is_exported_model, load_exported
from fetaliqa.model.config import PUBLISHED_THRESHOLDS
from fetaliqa.pipeline import FastSearch

from .calibrate import calibrate_score_threshold


# Selection rules compared by --compare (one exhaustive model pass per case, each rule replayed
# on its statistics): name -> ModelConfig changes; "search": a FastSearch replayed instead of
# the exhaustive pass (FastSearch() is the container's search); "rule": "largest_area".
RULES: dict[str, dict] = {
    "model": {},
    "fast search (default)": {"search": FastSearch()},
    "fast, 1 per sweep, gate 0.01, no cap (previous default)": {"search": FastSearch(per_sweep=1, gate=0.01,
                                                                                     max_candidates=None)},
    "fast, 4 per sweep, gate 0.5, no cap": {"search": FastSearch(per_sweep=4, gate=0.5, max_candidates=None)},
    "fast, 4 per sweep, gate 0.5, 6 in all": {"search": FastSearch(per_sweep=4, gate=0.5)},
    "fast, 3 in all": {"search": FastSearch(max_candidates=3)},
    "fast, 10 in all": {"search": FastSearch(max_candidates=10)},
    "fast, stride 12": {"search": FastSearch(stride=12)},
    "fast, stride 20": {"search": FastSearch(stride=20)},
    "fast, stride 8, dense, 1 per sweep, gate 0.01": {"search": FastSearch(stride=8, refine="dense", per_sweep=1,
                                                                          gate=0.01, max_candidates=None)},
    "window 0": {"temporal_window": 0},
    "window 1": {"temporal_window": 1},
    "window 3": {"temporal_window": 3},
    "ellipse mask": {"ellipse_mask": True},
    "mask window 2": {"mask_window": 2},
    "ellipse mask, mask window 2": {"ellipse_mask": True, "mask_window": 2},
    "the frame's own mask (no ellipse, mask window 0)": {"ellipse_mask": False, "mask_window": 0},
    "largest area": {"rule": "largest_area"},
    "best good frame only (choose_from good)": {"choose_from": "good"},
    "best good frame only, fast search": {"choose_from": "good", "search": FastSearch()},
    "no shape factor": {"shape_power": 0.0},
    "shape power 2": {"shape_power": 2.0},
    "no sweep prior": {"sweep_prior": None},
    "plain score among good frames (previous default)": {"shape_power": 0.0, "sweep_prior": None,
                                                         "choose_from": "good"},
    "published thresholds (0.5 / 1 %)": dict(PUBLISHED_THRESHOLDS, score_threshold=None, frame_threshold=None),
}


def _case(args, i: int, rec=None):
    """(name, stack, gt labels, per-sweep ACs) of case i (simulated) or of a release record."""
    if rec is not None:
        from .data import load_case
        stack, gt = load_case(rec)
        return rec.uuid, stack, gt, list(rec.ac_mm)
    from fetaliqa.simulate import SimConfig, case_seed, simulate_case
    c = simulate_case(case_seed(args.seed, i), SimConfig(frames_per_sweep=args.frames_per_sweep))
    return c.uuid, c.stack, c.masks, list(c.ac_mm)


_WORKER: dict = {}


def _init_worker(args) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _WORKER["args"], _WORKER["model"] = args, load_exported(args.model, device=args.device)


def _evaluate_case(job) -> dict:
    """Score one case: the pipeline's choice (exhaustive search, as ``analyse_stack``) and, with
    --compare, every rule of RULES replayed on the same per-frame statistics."""
    import dataclasses

    from fetaliqa.pipeline import (FrameScorer, ReplayScorer, conclude, fast_search, frames_with_signal,
                                   largest_area_frame, native_mask)

    i, rec = job
    args, model = _WORKER["args"], _WORKER["model"]
    name, stack, gt, ac = _case(args, i, rec)
    fps = stack.shape[0] // 6
    t = time.perf_counter()
    signal = frames_with_signal(stack)
    fan = stack.max(axis=0) > 0
    also = sorted({r["pixel_threshold"] for r in RULES.values() if "pixel_threshold" in r}) if args.compare else []
    full = FrameScorer(stack, model, device=args.device, batch_size=args.batch_size, progress=False, also_at=also)
    full.score(np.flatnonzero(signal))
    a = conclude(full, fan)
    cs = score_case(gt, ac, a.frame, a.mask, frames_per_sweep=fps)
    lab_k = gt.reshape(gt.shape[0], -1).max(1)
    lab = lab_k > 0
    row = {"case": name, "frame": a.frame, "frame_label": int(gt[a.frame].max()) if a.frame >= 0 else -1,
           "wfss": cs.wfss, "dice": cs.dice, "dice_soft": cs.dice_soft, "nae_ac": cs.nae_ac,
           "ac_pred_mm": cs.ac_pred_mm, "ac_ref_mm": cs.ac_ref_mm, "score": cs.score,
           "seconds": round(time.perf_counter() - t, 1)}
    out = {"row": row, "score": cs, "good": a.good, "q": np.nan_to_num(a.scores, nan=-1.0),
           "decision": np.nan_to_num(np.asarray(full.decision(a.scores)[0], np.float32), nan=-1.0), "lab": lab,
           "rules": {},
           "frames": {"label": lab_k.astype(np.uint8), "area": full.area, "mean_fg": full.mean_fg,
                      "peak": full.peak, "shape": full.shape}}
    if "frame" in model.config.heads:
        out["frames"]["frame_prob"] = full.frame_prob
    if rec is None:  # simulated: where each frame's plane lies, to locate false positives
        from fetaliqa.simulate import SimConfig, case_seed, frame_geometry
        geo = frame_geometry(case_seed(args.seed, i), SimConfig(frames_per_sweep=args.frames_per_sweep))
        out["frames"] |= {"level": geo["level"].astype(np.float32), "near_miss": geo["near_miss"]}
    if not args.compare:
        return out
    probs: dict = {}
    for rule, change in RULES.items():
        change = dict(change)
        search, kind = change.pop("search", None), change.pop("rule", "score")
        cfg = dataclasses.replace(model.config, **change)
        rep = ReplayScorer(full, probs, config=cfg)
        if search is not None:
            fast_search(rep, signal, search)
        else:
            rep.score(np.flatnonzero(signal))
        if kind == "largest_area":
            frame = largest_area_frame(rep)
            mask = native_mask(rep, frame, fan)
        else:
            r = conclude(rep, fan)
            frame, mask = r.frame, r.mask
        out["rules"][rule] = {"score": score_case(gt, ac, frame, mask, frames_per_sweep=fps), "frame": frame,
                              "label": int(gt[frame].max()) if frame >= 0 else -1, "scored": int(rep.n_scored)}
    return out


def false_positives(results: list[dict]) -> dict | None:
    """Where the frames called good without an annotation lie (simulated cases only): how many,
    the share that are near misses (transverse trunk sections near the stomach level,
    ``geometry.near_misses``), the share in a sweep that holds an annotation, and where their
    planes cross the fetal axis (trunk radii from the stomach level; quartiles, and the share
    at least one radius away: thorax, pelvis, or planes that miss the axis)."""
    if not results or "level" not in results[0]["frames"]:
        return None
    fp, near, in_ann, level = 0, 0, 0, []
    for r in results:
        lab, f = r["lab"], r["frames"]
        sweep_ann = lab.reshape(6, -1).any(1).repeat(len(lab) // 6)
        m = r["good"] & ~lab
        fp += int(m.sum())
        near += int(f["near_miss"][m].sum())
        in_ann += int(sweep_ann[m].sum())
        level.append(f["level"][m])
    lv = np.concatenate(level)
    q = np.percentile(lv, [25, 50, 75], method="lower") if fp else []
    return {"frames": fp, "near_miss": near / fp if fp else 0.0, "in_annotated_sweep": in_ann / fp if fp else 0.0,
            "level_quartiles": [float(x) if np.isfinite(x) else None for x in q],  # None: misses the axis
            "level_ge_1": float(np.mean(lv >= 1)) if fp else 0.0}


def compare_table(results: list[dict]) -> list[dict]:
    """Per rule: challenge means, frames scored, and agreement with the model's own choice."""
    table = []
    for rule in RULES:
        per = [r["rules"][rule] for r in results]
        agg = aggregate([p["score"] for p in per])
        own = [r["rules"]["model"] for r in results]
        same = [p["frame"] == o["frame"] or p["score"].wfss == o["score"].wfss for p, o in zip(per, own)]
        table.append({"rule": rule, **{k: agg[k]["mean"] for k in ("wfss", "dice_soft", "nae_ac", "score")},
                      "frames_scored": float(np.mean([p["scored"] for p in per])),
                      "same_frame_or_wfss": float(np.mean(same))})
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "resources" / "model")
    p.add_argument("--data", type=Path, help="release-layout folder instead of simulated cases")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=2026, help="simulation seed (must differ from training seeds)")
    p.add_argument("--frames-per-sweep", type=int, default=140)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write per_case.csv, summary.json and frames.npz (per-frame statistics) here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: default; 1 with --workers)")
    p.add_argument("--workers", type=int, default=1, help="cases evaluated in parallel processes")
    p.add_argument("--compare", action="store_true",
                   help="also compare selection rules (temporal window, ellipse mask, largest area, fast "
                        "search) replayed on one exhaustive model pass per case")
    args = p.parse_args(argv)
    if args.cases < 1 or args.batch_size < 1 or args.workers < 1:
        p.error("--cases, --batch-size and --workers must be >= 1")
    if args.frames_per_sweep < 2:
        p.error(f"--frames-per-sweep must be >= 2, got {args.frames_per_sweep}")
    if not is_exported_model(args.model):
        p.error(f"--model {args.model}: not an exported fetaliqa model (model.json + model.safetensors)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.workers > 1 and args.threads <= 0:
        args.threads = 1
    if args.out is not None:  # before the cases, not after them
        try:
            check_writable(args.out)
        except OSError as err:
            p.error(f"--out {args.out}: cannot write there ({err.strerror or err})")
    try:
        return _evaluate(args)
    except (ValueError, OSError) as err:  # DataError included: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    model = load_exported(args.model, device=args.device)
    sim = model.provenance.get("simulation") or {}
    if args.data is None and sim:
        from fetaliqa.simulate import case_seed
        used = {case_seed(sim["seed"], i) for i in range(sim["cases"])}
        clash = [i for i in range(args.cases) if case_seed(args.seed, i) in used]
        if clash:
            print(f"error: evaluation seed {args.seed} reuses training cases {clash[:5]} of {args.model}; "
                  "choose another --seed", file=sys.stderr)
            return 2
    cfg = model.config
    print(f"[evaluate] {args.model}: {cfg.backbone} f={cfg.decoder_width} pixel_threshold={cfg.pixel_threshold:.2f} "
          f"area_threshold={cfg.area_threshold:.4f}"
          + (f" score_threshold={cfg.score_threshold:.4g}" if cfg.score_threshold is not None else "")
          + (f" frame_threshold={cfg.frame_threshold:.4g}" if cfg.frame_threshold is not None else ""), file=sys.stderr)
    if args.data is not None:
        from .data import read_release
        jobs = [(i, rec) for i, rec in enumerate(read_release(args.data)[:args.cases])]
    else:
        jobs = [(i, None) for i in range(args.cases)]
    t0 = time.time()
    if args.workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
            results = list(tqdm(pool.map(_evaluate_case, jobs), total=len(jobs), desc="cases", file=sys.stderr))
    else:
        _init_worker(args)
        results = [_evaluate_case(j) for j in tqdm(jobs, desc="cases", file=sys.stderr)]
    rows, scores = [r["row"] for r in results], [r["score"] for r in results]
    good, q, dv, lab = (np.concatenate([r[k] for r in results]) for k in ("good", "q", "decision", "lab"))

    def decided(values: np.ndarray, cut: float) -> dict:  # frame metrics of "good = value >= cut" (nan: never)
        fm = frame_metrics((np.nan_to_num(values, nan=-1.0) >= cut).astype(float), lab, 0.5)
        return {k: fm[k] for k in ("f1", "precision", "recall", "specificity")}

    fm_rank = frame_metrics(dv, lab, np.inf)
    agg = aggregate(scores)
    summary = {"model": str(args.model), "cases": args.cases, "seed": None if args.data else args.seed,
               "frames": int(len(lab)), "positive_frames": int(lab.sum()),
               "frame": decided(good.astype(float), 0.5)
               | {"auroc": fm_rank["auroc"], "auprc": fm_rank["auprc"],
                  "f1_best_cut": calibrate_score_threshold(dv, lab)["f1"]},  # calibration's cut, in hindsight
               "challenge": {k: agg[k]["mean"] for k in ("wfss", "dice", "dice_soft", "nae_ac", "score")},
               "seconds": round(time.time() - t0, 1)}
    other_rules = {}  # the decisions the model does not use, on the same frames, for comparison
    if cfg.frame_threshold is not None and cfg.score_threshold is not None:
        other_rules["frame_score_rule"] = (f"quality score (score >= {cfg.score_threshold:.4g})",
                                           decided(q, cfg.score_threshold))
    if cfg.score_threshold is not None:
        other_rules["frame_area_rule"] = (f"area alone (area >= {cfg.area_threshold:.4f})",
                                          decided(np.concatenate([r["frames"]["area"] for r in results]),
                                                  cfg.area_threshold))
    summary |= {k: m for k, (_, m) in other_rules.items()}
    fps_where = false_positives(results)
    if fps_where is not None:
        summary["false_positives"] = fps_where
    if args.compare:
        summary["compare"] = compare_table(results)
    print("\n| case | frame | label | WFSS | soft Dice | NAE | AC pred | AC ref | score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"| {r['case'][:8]} | {r['frame']} | {r['frame_label']} | {fmt(r['wfss'])} | {fmt(r['dice_soft'])} | "
              f"{fmt(r['nae_ac'])} | {fmt(r['ac_pred_mm'])} | {fmt(r['ac_ref_mm'])} | {fmt(r['score'])} |")
    f, c = summary["frame"], summary["challenge"]
    print(f"\nframes: {summary['frames']} ({summary['positive_frames']} positive)")
    print("| frame F1 | precision | recall | AUROC | WFSS | soft Dice | NAE | score |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {f['f1']:.3f} | {f['precision']:.3f} | {f['recall']:.3f} | {f['auroc']:.3f} | {c['wfss']:.3f} | "
          f"{c['dice_soft']:.3f} | {c['nae_ac']:.3f} | {c['score']:.3f} |")
    print(f"frame F1 of the best cut on the decision's value for these very frames (hindsight; no cut on "
          f"it does better): {f['f1_best_cut']:.3f}")
    for what, a in other_rules.values():
        print(f"frame decision by {what}: F1 {a['f1']:.3f}, precision {a['precision']:.3f}, recall {a['recall']:.3f}")
    if fps_where is not None and fps_where["frames"]:
        w = fps_where
        quart = " / ".join("off-axis" if x is None else f"{x:.2f}" for x in w["level_quartiles"])
        print(f"false positives: {w['frames']}, near misses {100 * w['near_miss']:.0f} %, in an annotated sweep "
              f"{100 * w['in_annotated_sweep']:.0f} %; plane level (trunk radii from the stomach) quartiles "
              f"{quart}, >= 1 radius {100 * w['level_ge_1']:.0f} %")
    if args.compare:
        _print_compare(summary["compare"])
    if args.out:
        import csv
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "per_case.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (args.out / "summary.json").write_text(strict_json(summary, indent=1))  # "nan" for nan
        write_frames(args.out / "frames.npz", results, model.config.pixel_threshold)
        if args.compare:  # one row per case and rule: which frame, what it scored, frames it cost
            with open(args.out / "compare_per_case.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["case", "rule", "frame", "frame_label", "frames_scored", "wfss", "dice_soft", "nae_ac",
                            "score"])
                for r in results:
                    for rule, v in r["rules"].items():
                        sc = v["score"]
                        w.writerow([r["row"]["case"], rule, v["frame"], v["label"], v["scored"], sc.wfss,
                                    sc.dice_soft, sc.nae_ac, sc.score])
    return 0


def write_frames(path: Path, results: list[dict], pixel_threshold: float) -> None:
    """Per-frame model statistics of every case (for studying frame decisions offline):
    case (index into ``cases``), frame, sweep, label (0/1/2), area, mean_fg, peak, shape (at the
    model's pixel threshold; nan where not scored), q (the pipeline's quality score), decision (the
    value the frame decision cuts, -1 where not scored), good; with a
    frame head also frame_prob; for simulated cases also level and near_miss
    (``fetaliqa.simulate.frame_geometry``)."""
    cols: dict[str, list] = {k: [] for k in ("case", "frame", "sweep", "label", "area", "mean_fg", "peak", "shape",
                                             "q", "decision", "good")}
    for i, r in enumerate(results):
        f = r["frames"]
        n = len(f["label"])
        cols["case"].append(np.full(n, i, np.int32))
        cols["frame"].append(np.arange(n, dtype=np.int32))
        cols["sweep"].append(np.arange(n, dtype=np.int32) // max(1, n // 6))
        for k in ("label", "area", "mean_fg", "peak", "shape", "frame_prob", "level", "near_miss"):
            if k in f:
                cols.setdefault(k, []).append(np.asarray(f[k]))
        cols["q"].append(np.asarray(r["q"], np.float32))
        cols["decision"].append(np.asarray(r["decision"], np.float32))
        cols["good"].append(np.asarray(r["good"], bool))
    np.savez_compressed(path, cases=np.array([r["row"]["case"] for r in results]),
                        pixel_threshold=np.float32(pixel_threshold), **{k: np.concatenate(v) for k, v in cols.items()})


def _print_compare(table: list[dict]) -> None:
    print("\n| selection rule | WFSS | soft Dice | NAE | score | frames scored | same frame or WFSS as model |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['rule']} | {t['wfss']:.3f} | {t['dice_soft']:.3f} | {t['nae_ac']:.3f} | {t['score']:.3f} | "
              f"{t['frames_scored']:.0f} | {100 * t['same_frame_or_wfss']:.0f} % |")


if __name__ == "__main__":
    raise SystemExit(main())
