"""ACOUSLIC-AI scoring on numpy arrays: per-case WFSS, Dice, soft Dice, NAE_AC, Hausdorff; aggregates;
frame-level IQA metrics.

``mode="official"`` reproduces the organisers' evaluator (``acouslic-contract.md``, code of
2024-07-24) to floating-point precision, quirks included, and names in ``CaseScore.flags`` each
quirk that decided a number:

- ``dice_inf_empty``: GT and prediction both empty on the scored frame -> Dice = +inf (ITK's
  0/0), which makes the team's mean Dice and score infinite;
- ``frame_minus1_last_gt``: frame -1 is scored (Dice) against GT frame F-1 (``stack[-1]``) with
  an empty prediction;
- ``soft_earlier_side``: soft Dice took the nearest annotated frame *before* f although one after
  f was as close or closer;
- ``spacing_ignored``: the image spacing differs from the constant 0.28 mm the evaluator uses;
- ``ac_boundary_piece``: the AC was fitted to a stray piece of the predicted mask's boundary:
  where a mask runs along the fan edge a few pixels inside it, the evaluator's deletion of the
  fan-edge zone leaves several open pieces, all of about zero contourArea, and the first one
  found is fitted; the AC is then missing (NAE 1) or off the one of the whole boundary outside
  that zone (``measure.uncut_circumference_mm``) by more than 5 % (``measure.misread``).

``mode="corrected"`` gives the numbers those quirks were meant to give: Dice 1 for agreeing empty
frames, frame -1 scored as "no frame" (Dice 1 if the case has no annotation, else 0; Hausdorff
nan), soft Dice from the nearest annotated frame (earlier on ties), the given spacing, the AC of
the mask's whole boundary outside the fan-edge zone.

Only the chosen frame, the +-15 frame soft-Dice window and one per-frame max over the GT volume are
touched, so a full (840, 562, 744) case scores in well under a second (the official code takes
about 10 s). Hausdorff is in pixels (the evaluator builds ITK images without spacing) and, like
the evaluator's, not ranked; its official value follows the evaluator's own rules, not flagged:
an empty prediction (frame -1 included) gives 744 x 15 = 11160; an empty GT frame under a
non-empty prediction gives the distance to the soft Dice's GT frame n (unmasked) times the signed
offset n - f (negative when n lies before f), or 11160 when the window holds none.
``corrected`` gives nan wherever a side is empty.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from evalutils.stats import hausdorff_distance
from scipy.ndimage import distance_transform_edt

from fetaliqa.measure import (PIXEL_SPACING_MM, measurement_fov, misread, official_circumference_mm,
                              uncut_circumference_mm)

SOFT_WINDOW = 15  # frames searched on each side for the soft Dice
# the evaluator's Hausdorff when it has nothing to compare: "maximum sweep width (744) scaled by the
# frame tolerance", whatever the frame's width
OFFICIAL_EMPTY_HAUSDORFF = 744 * SOFT_WINDOW
SUBOPTIMAL_WEIGHT = 0.6
MODES = ("official", "corrected")
METRICS = ("wfss", "dice", "dice_soft", "nae_ac", "hausdorff")


@dataclass
class CaseScore:
    """Scores of one case. ``frame``: 0-based, -1 = none. ``hausdorff`` in pixels (the evaluator's
    stand-ins when a side is empty, module docstring; nan in ``corrected`` mode). ``ac_*_mm``:
    None when unmeasurable / no reference for that sweep.
    ``soft_frame``: GT frame the soft Dice compared against (None: none searched or found)."""

    frame: int
    wfss: float
    dice: float
    dice_soft: float
    nae_ac: float
    hausdorff: float
    ac_pred_mm: float | None
    ac_ref_mm: float | None
    flags: list[str] = field(default_factory=list)
    soft_frame: int | None = None

    @property
    def score(self) -> float:
        return challenge_score(self.nae_ac, self.dice_soft, self.wfss)

    def to_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


@dataclass(frozen=True)
class GtSummary:
    """What scoring needs from a whole GT volume, computed once per case (one pass over it)."""

    frame_max: np.ndarray  # uint8 (frames,): largest label per frame (0 = not annotated)
    has_optimal: bool      # label 1 anywhere in the case


def summarise_gt(gt: np.ndarray) -> GtSummary:
    """One pass over ``gt`` uint8 ``(frames, rows, cols)`` labels {0, 1, 2}."""
    if gt.ndim != 3:
        raise ValueError(f"ground truth must be (frames, rows, cols), got shape {gt.shape}")
    frame_max = gt.reshape(gt.shape[0], -1).max(axis=1)
    # a frame whose max is 2 may still hold label 1; only those few frames need a second look
    has_opt = bool(np.any(frame_max == 1)) or any(bool(np.any(gt[i] == 1)) for i in np.flatnonzero(frame_max > 1))
    return GtSummary(frame_max=frame_max, has_optimal=has_opt)


def challenge_score(nae_mean: float, dice_soft_mean: float, wfss_mean: float) -> float:
    """0.5 (1 - NAE) + 0.25 DSC_soft + 0.25 WFSS (means over cases)."""
    return 0.5 * (1 - nae_mean) + 0.25 * dice_soft_mean + 0.25 * wfss_mean


def dice(a: np.ndarray, b: np.ndarray, empty: float = math.inf) -> float:
    """Dice of two binary masks, bit-identical to ITK's LabelOverlapMeasures; ``empty`` if both empty.

    ITK derives Dice from the Jaccard index J = |A and B| / |A or B| as 2J / (1 + J), which rounds
    differently from 2|A&B| / (|A|+|B|) in the last bit. (``evalutils.stats.dice_from_confusion_matrix``
    is float32 and loops over labels, so it cannot reproduce ITK.)
    """
    a, b = a != 0, b != 0
    inter = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(a)) + int(np.count_nonzero(b)) - inter
    if union == 0:
        return empty
    jaccard = inter / union
    return 2.0 * jaccard / (1.0 + jaccard)


def hausdorff_px(a: np.ndarray, b: np.ndarray, empty: float = math.inf) -> float:
    """Symmetric Hausdorff distance (pixels) between the pixel sets of two 2D masks, as ITK's
    HausdorffDistanceImageFilter (all foreground pixels, exact EDT); ``empty`` if either is empty.

    ``evalutils.stats.hausdorff_distance`` with ``connectivity=0`` (no surface extraction) and a
    float64 EDT is that definition; the images are cropped to the union's bounding box first,
    which does not change any distance between the two sets.
    """
    a, b = a != 0, b != 0
    if not a.any() or not b.any():
        return empty
    rows, cols = np.nonzero(a | b)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return float(hausdorff_distance(a[box], b[box], connectivity=0, edt_method=distance_transform_edt))


def wfss(summary: GtSummary, gt_frame: np.ndarray | None, frame: int) -> float:
    """Weighted frame selection score, the official rule order (``gt_frame`` = GT labels at ``frame``)."""
    if not np.any(summary.frame_max):
        return 0.0
    if frame == -1 or gt_frame is None:
        return 0.0
    has_opt, has_sub = bool(np.any(gt_frame == 1)), bool(np.any(gt_frame == 2))
    if not summary.has_optimal and has_sub:
        return 1.0
    if has_opt:
        return 1.0
    if has_sub:
        return SUBOPTIMAL_WEIGHT
    return 0.0


def _resolve_fov(fov: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if fov is None:
        return measurement_fov(shape)
    fov = np.asarray(fov) != 0
    if fov.shape != shape:
        raise ValueError(f"FOV shape {fov.shape} does not match frame shape {shape}")
    return fov


def _soft_search(frame_max: np.ndarray, f: int, lo: int, hi: int, mode: str) -> tuple[int | None, bool]:
    """Annotated GT frame for the soft Dice within +-15 of f inside [lo, hi); (frame, quirk decided)."""
    before = [n for n in range(f - 1, max(lo, f - SOFT_WINDOW) - 1, -1) if frame_max[n]]
    after = [n for n in range(f + 1, min(hi - 1, f + SOFT_WINDOW) + 1) if frame_max[n]]
    b = before[0] if before else None
    a = after[0] if after else None
    if b is None or a is None:
        return (b if b is not None else a), False
    if mode == "official":  # the earlier side is searched first and wins
        return b, (a - f) <= (f - b)
    return (b if f - b <= a - f else a), False


def score_case(gt: np.ndarray, ac_ref_mm: Sequence[float | None], frame: int, pred: np.ndarray,
               *, fov: np.ndarray | None = None, frames_per_sweep: int = 140, mode: str = "official",
               spacing_mm: float | None = None, summary: GtSummary | None = None) -> CaseScore:
    """Score one case.

    ``gt``: uint8 ``(F, R, C)`` labels 0 bg / 1 optimal / 2 suboptimal. ``ac_ref_mm``: one reference
    AC (mm) or None per sweep. ``frame``: 0-based chosen frame, -1 = none. ``pred``: ``(F, R, C)``
    volume or the 2D ``(R, C)`` mask of the chosen frame, values {0, 1}. ``fov``: bool ``(R, C)``;
    None -> the official FOV for 562x744 frames, else the whole frame. ``spacing_mm``: the image
    spacing, only used by ``corrected`` mode (the evaluator uses 0.28 mm). ``summary``: reuse
    ``summarise_gt(gt)`` when scoring several teams on one case.
    Raises ValueError where the official evaluator would crash (frame outside -1..F-1, values
    outside {0, 1} on the scored frame, shapes that do not match).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise ValueError(f"frame must be an int, got {frame!r} ({type(frame).__name__})")
    frame = int(frame)
    n_frames, shape = gt.shape[0], gt.shape[1:]
    if not -1 <= frame < n_frames:
        raise ValueError(f"frame {frame} outside -1..{n_frames - 1}")
    if pred.shape not in (gt.shape, shape):
        raise ValueError(f"prediction shape {pred.shape} matches neither {gt.shape} nor {shape}")
    summary = summary or summarise_gt(gt)
    fov = _resolve_fov(fov, shape)
    flags: list[str] = []

    p = np.zeros(shape, np.uint8) if frame < 0 else (pred[frame] if pred.ndim == 3 else pred)
    if mode == "official" and p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"prediction values outside {{0, 1}} on frame {frame}: {np.unique(p)[:10]}")
    p = (p != 0) & fov
    gt_frame = gt[frame]  # frame -1 reads the last GT frame, as the official code does
    g = (gt_frame != 0) & fov

    n_sweeps = max(1, n_frames // frames_per_sweep)
    sweep = frame // frames_per_sweep if 0 <= frame < n_sweeps * frames_per_sweep else None
    ac_ref = None if sweep is None or sweep >= len(ac_ref_mm) else ac_ref_mm[sweep]
    ac_ref = None if ac_ref is None or (isinstance(ac_ref, float) and math.isnan(ac_ref)) else float(ac_ref)
    odd_spacing = spacing_mm is not None and abs(spacing_mm - PIXEL_SPACING_MM) > 1e-9
    pixel = spacing_mm if odd_spacing and mode == "corrected" else PIXEL_SPACING_MM
    ac_pred = official_circumference_mm(p, fov=fov, pixel_spacing=pixel) if p.any() else None
    if p.any():
        uncut = uncut_circumference_mm(p, fov=fov, pixel_spacing=pixel)
        if misread(ac_pred, uncut):
            flags.append("ac_boundary_piece")
            if mode == "corrected":
                ac_pred = uncut
    if odd_spacing and mode == "official" and ac_pred is not None:
        flags.append("spacing_ignored")
    if ac_pred is None or ac_ref is None:
        nae = 1.0
    else:
        nae = abs(ac_ref - ac_pred) / max(ac_ref, ac_pred, 1e-6)

    if frame == -1 and mode == "official":
        flags.append("frame_minus1_last_gt")
    if frame == -1 and mode == "corrected":
        d = 1.0 if not np.any(summary.frame_max) else 0.0
    else:
        d = dice(g, p, empty=math.inf if mode == "official" else 1.0)
        if math.isinf(d):
            flags.append("dice_inf_empty")

    d_soft, soft_frame = d, None
    if not g.any() and p.any() and sweep is not None:
        lo = sweep * frames_per_sweep
        soft_frame, quirk = _soft_search(summary.frame_max, frame, lo, lo + frames_per_sweep, mode)
        if soft_frame is None:
            d_soft = 0.0
        else:
            d_soft = dice(gt[soft_frame], p) * (1 - abs(soft_frame - frame) / SOFT_WINDOW)
            if quirk:
                flags.append("soft_earlier_side")

    if mode == "corrected":
        hd = math.nan if frame == -1 else hausdorff_px(g, p, empty=math.nan)
    elif g.any() and p.any():
        hd = hausdorff_px(g, p)
    elif p.any() and soft_frame is not None:  # GT empty on f: the soft Dice's frame, times the signed offset
        hd = hausdorff_px(gt[soft_frame], p) * (soft_frame - frame)
    else:
        hd = float(OFFICIAL_EMPTY_HAUSDORFF)

    return CaseScore(frame=frame, wfss=wfss(summary, None if frame < 0 else gt_frame, frame), dice=d,
                     dice_soft=d_soft, nae_ac=float(nae), hausdorff=hd, ac_pred_mm=ac_pred,
                     ac_ref_mm=ac_ref, flags=flags, soft_frame=soft_frame)


def aggregate(scores: Sequence[CaseScore]) -> dict:
    """Population mean and std (numpy defaults, inf propagates as in the evaluator) of each metric,
    the challenge ``score`` from the means, and its ``std`` combined the evaluator's way
    (0.5 (1 - std NAE) + 0.25 std DSC_soft + 0.25 std WFSS: not a standard deviation, kept for parity).
    """
    out: dict = {"n_cases": len(scores)}
    with np.errstate(invalid="ignore", over="ignore"):
        for name in METRICS:
            values = np.array([getattr(s, name) for s in scores], dtype=float)
            out[name] = {"mean": float(np.mean(values)) if len(values) else math.nan,
                         "std": float(np.std(values)) if len(values) else math.nan}
        out["score"] = {
            "mean": challenge_score(out["nae_ac"]["mean"], out["dice_soft"]["mean"], out["wfss"]["mean"]),
            "std": challenge_score(out["nae_ac"]["std"], out["dice_soft"]["std"], out["wfss"]["std"]),
        }
    out["flags"] = {}
    for s in scores:
        for f in s.flags:
            out["flags"][f] = out["flags"].get(f, 0) + 1
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def frame_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Frame-level IQA metrics from per-frame scores (higher = better frame) and binary labels.

    A frame is called positive when ``score >= threshold``; nan scores (frames not scored) are left
    out. Ratios with a zero denominator are nan. AUROC: Mann-Whitney with tied scores counted half;
    AUPRC: average precision (sum over thresholds of recall gain times precision). Returns f1,
    precision, recall, specificity, auroc, auprc, and the counts tp, fp, tn, fn, n.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    pred = s >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    n_pos, n_neg = int(y.sum()), int((~y).sum())
    auroc = math.nan
    if n_pos and n_neg:
        auroc = (_average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auprc = math.nan
    if n_pos:
        order = np.argsort(-s, kind="mergesort")
        ss, yy = s[order], y[order]
        last = np.r_[ss[1:] != ss[:-1], True]  # last index of each distinct score
        ctp = np.cumsum(yy)[last]
        cpp = (np.arange(1, len(ss) + 1))[last]
        recall = ctp / n_pos
        auprc = float(np.sum(np.diff(np.r_[0.0, recall]) * (ctp / cpp)))
    return {"f1": ratio(2 * tp, 2 * tp + fp + fn), "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "auroc": float(auroc), "auprc": auprc,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": int(len(s))}
