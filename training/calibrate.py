"""Threshold calibration on the validation split and a per-case challenge-score check.

A SEG frame is "good" when at least `area_threshold` of its S x S pixels have probability
above `pixel_threshold` (published: 0.5 and 1 %, set by hand). Here both are chosen to
maximise frame-level F1 on the validation frames: for each pixel threshold of a grid the
best area cut is found exactly (frames sorted by foreground area); the area threshold is
put midway between the chosen cut and the next smaller observed area, for margin.

With the frame decision by quality score (``--good-by score``, the default) the pixel
threshold is chosen for the masks instead (best pooled Dice on the annotated validation
frames: it binarises the output mask and defines the area in the score), and the decision
is the F1-best cut of the quality score, computed as the container computes it. With
``--good-by frame`` (a model with a frame head) the decision is instead the F1-best cut of
the frame head's probability smoothed over the temporal window (``frame_threshold``), and
the quality score only ranks frames for the case's choice.

Pooled Dice favours low pixel thresholds (big masks), which the AC error pays for; with
``--pixel-threshold-by case-score`` every grid threshold, with its own area and score cuts,
is replayed on whole validation cases (one model pass per case) and the one with the best
mean challenge score (WFSS, soft Dice, NAE together) is exported.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from tqdm import tqdm

from fetaliqa.model.config import PUBLISHED_THRESHOLDS

PIXEL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PUBLISHED = PUBLISHED_THRESHOLDS


def frame_f1_table(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Frame-level F1/precision/recall of boolean decisions (prefix val_)."""
    pred, labels = np.asarray(pred, bool), np.asarray(labels, bool)
    tp = int((pred & labels).sum())
    fp, fn = int((pred & ~labels).sum()), int((~pred & labels).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"val_f1": f1, "val_precision": prec, "val_recall": rec}


def best_cut(values: np.ndarray, labels: np.ndarray, minimum: float) -> tuple[float, float]:
    """(best F1, threshold) for "good = value >= threshold" with threshold >= ``minimum``: the
    cut is tried after each distinct value >= minimum (frames sorted by value) and put midway
    between the chosen value and the next smaller one, for margin."""
    values, labels = np.asarray(values, np.float64), np.asarray(labels, bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return 0.0, float(max(minimum, values.max() + 1))  # above every frame: none is good
    order = np.argsort(-values, kind="stable")
    c, lab = values[order], labels[order]
    tp, fp = np.cumsum(lab), np.cumsum(~lab)
    last = np.r_[c[1:] != c[:-1], True] & (c >= minimum)  # cut after the last frame of each distinct value
    if not last.any():
        return 0.0, float(minimum)
    idx = np.flatnonzero(last)
    f1 = 2 * tp[idx] / (tp[idx] + fp[idx] + n_pos)
    j = int(np.argmax(f1))
    cut = float(c[idx[j]])
    below = c[idx[j] + 1] if idx[j] + 1 < len(c) else 0.0
    return float(f1[j]), max(float(minimum), (cut + float(below)) / 2) if below < cut else cut


def best_area_cut(counts: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1, area threshold in pixels) for "good = count >= threshold", threshold >= 1."""
    return best_cut(counts, labels, 1.0)


def case_scores(cfg, stats: dict[str, np.ndarray], case: np.ndarray, frame: np.ndarray,
                frames_per_sweep: dict[int, int], frame_prob: np.ndarray | None = None) -> np.ndarray:
    """The pipeline's quality score (``fetaliqa.select.seg_scores`` under ``cfg``) of cached
    frames: per case, the frames are put back at their stack positions (6 x frames per sweep;
    frames not cached are nan, as unscored frames at inference) so that the temporal support
    and the sweep prior are those of the container. stats: per-frame "area", "mean_fg",
    "shape" at cfg's pixel threshold; case, frame: the cache index columns; frame_prob: the frame
    head's per-frame probabilities (used when cfg has the head)."""
    from fetaliqa.select import seg_scores

    if "frame" in cfg.heads and frame_prob is None:
        raise ValueError("the config has a frame head: case_scores needs its frame_prob")
    per_frame = {**stats, "frame_prob": frame_prob} if "frame" in cfg.heads else stats
    return _at_stack_positions(
        {k: per_frame[k] for k in ("area", "mean_fg", "shape", "frame_prob") if k in per_frame}, case, frame,
        frames_per_sweep,
        lambda full, fps: seg_scores(full["area"], full["mean_fg"], cfg.window_at(fps), fps, shape=full["shape"],
                                     shape_power=cfg.shape_power, sweep_prior=cfg.sweep_prior,
                                     frame_prob=full.get("frame_prob")))


def case_frame_decision(cfg, frame_prob: np.ndarray, case: np.ndarray, frame: np.ndarray,
                        frames_per_sweep: dict[int, int]) -> np.ndarray:
    """The value a frame threshold cuts (``fetaliqa.select.frame_decision``: the frame head's
    probability smoothed over cfg's temporal window, ``ModelConfig.window_at``) of cached
    frames, put back at their stack positions per case as ``case_scores`` does."""
    from fetaliqa.select import frame_decision

    return _at_stack_positions({"frame_prob": frame_prob}, case, frame, frames_per_sweep,
                               lambda full, fps: frame_decision(full["frame_prob"], cfg.window_at(fps), fps))


def _at_stack_positions(per_frame: dict[str, np.ndarray], case: np.ndarray, frame: np.ndarray,
                        frames_per_sweep: dict[int, int], fn) -> np.ndarray:
    """Per case: the rows' arrays put back at their stack positions (6 x frames per sweep; nan
    where not cached, as unscored frames at inference), ``fn(full arrays, frames per sweep)``
    -> per-position values, read back at the rows. float32 (len(case),)."""
    out = np.full(len(case), np.nan, np.float32)
    for c in np.unique(case):
        rows = np.flatnonzero(case == c)
        fps = frames_per_sweep[int(c)]
        full = {k: np.full(6 * fps, np.nan, np.float32) for k in per_frame}
        for k, a in full.items():
            a[frame[rows]] = per_frame[k][rows]
        out[rows] = fn(full, fps)[frame[rows]]
    return out


def calibrate_score_threshold(scores: np.ndarray, labels: np.ndarray, key: str = "score_threshold") -> dict:
    """The quality-score cut maximising frame F1 (``ModelConfig.score_threshold``; any value
    a positive cut applies to, e.g. the frame decision's, under ``key``), with the precision
    and recall it gives on these frames."""
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
    f1, cut = best_cut(scores, labels, float(np.finfo(np.float32).tiny))
    m = frame_f1_table(scores >= cut, labels)
    return {key: cut, "f1": f1, "precision": m["val_precision"], "recall": m["val_recall"]}


def calibrate_thresholds(counts: np.ndarray, labels: np.ndarray, size: int) -> dict:
    """counts (N, len(PIXEL_GRID)): pixels above each grid threshold per frame; labels (N,).
    -> {"pixel_threshold", "area_threshold" (fraction of size^2), "f1", "grid": per threshold}."""
    grid = []
    for t, col in zip(PIXEL_GRID, np.asarray(counts).T):
        f1, area = best_area_cut(col.astype(np.float64), labels)
        grid.append({"pixel_threshold": t, "f1": f1, "area_threshold": area / size ** 2})
    best = max(grid, key=lambda g: (round(g["f1"], 6), -abs(g["pixel_threshold"] - 0.5)))
    return {**best, "grid": grid}


def calibrate_model(model: torch.nn.Module, cache, rows: np.ndarray, *, device, batch_size: int, amp,
                    policy: str, progress: bool = True, selection: dict | None = None,
                    by_frame_head: bool = False) -> dict:
    """Calibrate on cache rows: one model pass (``predict_rows``), then ``summarise_calibration``
    (its docstring says what is chosen); with a CLS head also its F1-best probability cut
    ("cls_decision": ``ModelConfig.cls_threshold``, not the published hand-set 0.5). The pass
    itself is kept under "_pred" for callers that move the choice (``at_pixel_threshold``; pop
    it before serialising)."""
    from .train import predict_rows

    pred = predict_rows(model, cache, rows, device=device, batch_size=batch_size, amp=amp, policy=policy,
                        progress=progress, frame_stats=selection is not None)
    cls = {} if pred["cls_prob"] is None else {
        "cls_decision": calibrate_score_threshold(pred["cls_prob"], pred["labels"], key="cls_threshold")}
    if pred["counts"] is None:  # CLS-only model: nothing to calibrate on masks
        return {"pixel_threshold": model.config.pixel_threshold, "area_threshold": model.config.area_threshold,
                "f1": cls["cls_decision"]["f1"], "frames": int(len(rows)), **cls}
    return {**summarise_calibration(model.config, cache, pred, selection, by_frame_head), **cls, "_pred": pred}


def summarise_calibration(config, cache, pred: dict, selection: dict | None = None,
                          by_frame_head: bool = False) -> dict:
    """Thresholds and frame metrics from ``predict_rows`` output (config: the model's).
    Without ``selection``: the pixel and area thresholds of the best frame F1 (the area rule).
    selection: the exported config's selection fields (shape_power, sweep_prior, ...); when
    given, every grid entry also gets the F1-best quality-score cut at its pixel threshold
    ("score_decision", computed as the container scores frames), and the pixel threshold is
    the one whose masks match the annotated frames best (pooled Dice; the grid's
    "mask_dice"); ``at_pixel_threshold`` moves the choice to another grid entry.
    by_frame_head (with selection, a model with a frame head): also the F1-best cut of the
    frame head's smoothed probability ("frame_decision": ``ModelConfig.frame_threshold``,
    the same at every pixel threshold). Frame metrics ("published", "calibrated") at the
    published and the chosen thresholds (area rule)."""
    cal = calibrate_thresholds(pred["counts"], pred["labels"], cache.size)
    dice_pos = np.asarray(pred["dice_on_positives_by_pixel_threshold"])
    for g, d in zip(cal["grid"], dice_pos):
        g["mask_dice"] = float(d)
    chosen_by = "frame f1"
    if selection is not None:
        idx = cache.index[pred["rows"]]
        fps = {int(c): int(cache.cases[int(c)]["frames_per_sweep"]) for c in np.unique(idx["case"])}
        for g in cal["grid"]:
            cfg = dataclasses.replace(config, pixel_threshold=g["pixel_threshold"], **selection)
            scores = case_scores(cfg, pred["stats"][g["pixel_threshold"]], idx["case"], idx["frame"], fps,
                                 pred.get("frame_prob"))
            g["score_decision"] = calibrate_score_threshold(scores, pred["labels"])
        if pred["labels"].any():
            # the frame decision is the score cut; the pixel threshold serves the mask (and the
            # score's area): by default the best pooled Dice on the annotated validation frames
            best = max(cal["grid"], key=lambda g: (round(g["mask_dice"], 6), -abs(g["pixel_threshold"] - 0.5)))
            cal, chosen_by = {**best, "grid": cal["grid"]}, "mask dice"
        if by_frame_head:
            if pred.get("frame_prob") is None:
                raise ValueError("a frame decision by the frame head needs a model with one")
            values = case_frame_decision(dataclasses.replace(config, **selection), pred["frame_prob"], idx["case"],
                                         idx["frame"], fps)
            cal["frame_decision"] = calibrate_score_threshold(values, pred["labels"], key="frame_threshold")
    return _with_frame_metrics({"chosen_by": chosen_by, **cal}, cache, pred)


def at_pixel_threshold(cal: dict, cache, pred: dict, pixel_threshold: float, chosen_by: str) -> dict:
    """``summarise_calibration``'s result with the choice moved to the grid entry at
    ``pixel_threshold`` (its area and score cuts; chosen, e.g., by whole-case challenge score:
    ``choose_by_case_score``); the grid itself is not recomputed, the frame metrics are; the
    frame head's cut ("frame_decision", the same at every pixel threshold) is kept."""
    chosen = [g for g in cal["grid"] if g["pixel_threshold"] == pixel_threshold]
    if not chosen:
        raise ValueError(f"pixel threshold {pixel_threshold} is not on the grid {PIXEL_GRID}")
    kept = {k: cal[k] for k in ("frame_decision", "cls_decision") if k in cal}
    return _with_frame_metrics({"chosen_by": chosen_by, **chosen[0], **kept, "grid": cal["grid"]}, cache, pred)


def _with_frame_metrics(cal: dict, cache, pred: dict) -> dict:
    """cal plus the frame counts and the frame metrics (fetaliqa.metrics, area rule) at the
    published and at cal's thresholds."""
    from fetaliqa.metrics import frame_metrics

    out = {**cal, "frames": int(len(pred["labels"])), "positives": int(pred["labels"].sum())}
    for name, th in (("published", PUBLISHED), ("calibrated", cal)):
        t_idx = PIXEL_GRID.index(th["pixel_threshold"])
        area = pred["counts"][:, t_idx] / cache.size ** 2
        m = frame_metrics(area, pred["labels"].astype(np.uint8), th["area_threshold"])
        out[name] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float, np.floating))}
        out[name]["dice"] = float(pred["dice_by_pixel_threshold"][t_idx])
    return out


def threshold_policy(config, th: dict, selection: dict | None = None):
    """``config`` with one calibration's thresholds (a grid entry or PUBLISHED): its pixel and
    area thresholds, its quality-score cut when it has one (else the area rule decides), its
    CLS cut when it has one (PUBLISHED: 0.5) and the selection fields."""
    cut = th.get("score_decision", {}).get("score_threshold")
    cls = {"cls_threshold": th["cls_threshold"]} if "cls_threshold" in th else {}
    return dataclasses.replace(config, pixel_threshold=th["pixel_threshold"], area_threshold=th["area_threshold"],
                               score_threshold=cut, **cls, **(selection or {}))


def choose_by_case_score(cal: dict, checks: dict) -> float:
    """The grid's pixel threshold for the checked cases' challenge score (``checks``:
    ``case_check`` results under the names ``grid_name(t)``; grid values not checked are
    skipped), by the one-standard-error rule: 29 validation cases rank neighbouring thresholds
    by noise, so the best mean score only sets the bar. A threshold whose per-case scores fall
    short of the best one's by at most one standard error of those paired differences is as
    good on these cases, and of those the one nearest the published 0.5 is taken (equally near:
    the higher mean). Results without per-case scores count as equal only when their means are."""
    checked = [g["pixel_threshold"] for g in cal["grid"] if grid_name(g["pixel_threshold"]) in checks]
    mean = {t: round(checks[grid_name(t)]["score"], 6) for t in checked}
    best = max(checked, key=lambda t: (mean[t], -abs(t - 0.5)))

    def as_good(t: float) -> bool:
        a, b = checks[grid_name(t)].get("per_case"), checks[grid_name(best)].get("per_case")
        if a is None or b is None or len(a) != len(b) or len(a) < 2:
            return mean[t] == mean[best]
        d = np.asarray(b, float) - np.asarray(a, float)
        return d.mean() <= d.std(ddof=1) / np.sqrt(len(d)) + 1e-12

    return min((t for t in checked if as_good(t)), key=lambda t: (abs(t - 0.5), -mean[t]))


def grid_name(t: float) -> str:
    return f"pixel {t:.1f}"


def sweep_prior(records: list, uuids) -> tuple[float, ...] | None:
    """Per protocol sweep, the fraction of the cases ``uuids`` (of ``records``) whose sweep
    has a reference AC, i.e. holds an annotation: the selection's ``sweep_prior``. None
    when no such case has 6 sweeps or no sweep is ever annotated."""
    wanted = set(uuids)
    rows = [r.ac_mm for r in records if r.uuid in wanted and len(r.ac_mm) == 6]
    if not rows:
        return None
    freq = np.mean([[a is not None for a in ac] for ac in rows], axis=0)
    return tuple(round(float(f), 4) for f in freq) if freq.max() > 0 else None


def case_check(model: torch.nn.Module, records: list, policies: dict, *, device, progress: bool = True) -> dict:
    """Whole validation cases scored with the challenge metrics under each of ``policies``
    (name -> ModelConfig, as ``threshold_policy`` builds them): one exhaustive model pass per case (as
    ``analyse_stack``), every policy replayed on it. -> name -> mean wfss, dice, dice_soft,
    nae_ac, score, with "cases", "seconds" (the whole check) and "per_case" (each case's score,
    in ``records`` order)."""
    from fetaliqa.metrics import aggregate, score_case
    from fetaliqa.pipeline import FrameScorer, ReplayScorer, conclude, frames_with_signal

    from .data import load_case

    model.to(device).eval()
    scores: dict[str, list] = {name: [] for name in policies}
    t0 = time.time()
    for rec in tqdm(records, desc=f"case check ({len(policies)} policies)", disable=not progress, leave=False):
        stack, gt = load_case(rec)
        full = FrameScorer(stack, model, device=device, progress=False,
                           also_at=sorted({c.pixel_threshold for c in policies.values()}))
        full.score(np.flatnonzero(frames_with_signal(stack)))
        probs: dict = {}
        for name, cfg in policies.items():
            replay = ReplayScorer(full, probs, config=cfg)
            replay.score(np.flatnonzero(full.scored))
            a = conclude(replay)
            scores[name].append(score_case(gt, list(rec.ac_mm), a.frame, a.mask,
                                           frames_per_sweep=stack.shape[0] // 6))
    results = {}
    for name, sc in scores.items():
        agg = aggregate(sc)
        results[name] = {k: agg[k]["mean"] for k in ("wfss", "dice", "dice_soft", "nae_ac", "score")}
        results[name]["cases"], results[name]["seconds"] = len(records), round(time.time() - t0, 1)
        results[name]["per_case"] = [float(c.score) for c in sc]
    return results
