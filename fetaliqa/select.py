"""Per-frame decision and per-case frame selection (arrays of per-frame statistics in).

Quality score of a scored frame i (SEG):
    raw_i   = mean foreground probability_i x foreground area fraction_i
              (foreground = 224x224 pixels with probability > pixel_threshold)
    score_i = (raw_i + support_i) / 2,  support_i = mean raw over the scored frames within
              +-temporal_window of i in the same sweep (i included)
so an isolated confident blob ranks below a frame inside a run of abdomen views. Frames not
scored (blank frames, or skipped by a coarse search) are nan and never chosen.
A frame is good when its area fraction >= area_threshold. The chosen frame is the best
score among good frames; if none is good the best score anyway (ties and all-zero scores
broken by the peak probability); -1 only when nothing was scored (no signal).
"""

from __future__ import annotations

import numpy as np
import torch


def frame_stats(prob: torch.Tensor, pixel_threshold: float) -> dict[str, torch.Tensor]:
    """(B, S, S) probabilities -> per-frame "area" (foreground fraction of S*S), "mean_fg"
    (mean probability over foreground, 0 if none) and "peak" (max probability), float32 (B,)."""
    fg = prob > pixel_threshold
    n = fg.flatten(1).sum(1).float()
    mean_fg = torch.where(fg, prob, torch.zeros_like(prob)).flatten(1).sum(1).float() / n.clamp(min=1)
    return {"area": n / fg[0].numel(), "mean_fg": mean_fg, "peak": prob.flatten(1).amax(1).float()}


def sweep_length(n_frames: int) -> int:
    """Frames per sweep: n // 6 for a 6-sweep protocol stack (n divisible by 6), else n."""
    return n_frames // 6 if n_frames % 6 == 0 and n_frames >= 6 else n_frames


def temporal_support(raw: np.ndarray, window: int, frames_per_sweep: int) -> np.ndarray:
    """Mean of ``raw`` over the finite values within +-window in the same sweep (nan where
    raw is nan)."""
    raw = np.asarray(raw, dtype=np.float64)
    out = np.full(raw.shape, np.nan)
    for i in np.flatnonzero(np.isfinite(raw)):
        s0 = (i // frames_per_sweep) * frames_per_sweep
        lo, hi = max(s0, i - window), min(s0 + frames_per_sweep, i + window + 1)
        out[i] = np.nanmean(raw[lo:hi])
    return out


def seg_scores(area: np.ndarray, mean_fg: np.ndarray, window: int, frames_per_sweep: int) -> np.ndarray:
    """Quality score per frame (module docstring), float32, nan where not scored."""
    raw = np.asarray(mean_fg, np.float64) * np.asarray(area, np.float64)
    if window <= 0:
        return raw.astype(np.float32)
    return ((raw + temporal_support(raw, window, frames_per_sweep)) / 2).astype(np.float32)


def choose_frame(scores: np.ndarray, good: np.ndarray, tiebreak: np.ndarray | None = None) -> int:
    """0-based index of the best-scoring good frame, else the best-scoring frame, else -1
    (no finite score at all). ``tiebreak`` (e.g. peak probability) orders equal scores."""
    scores = np.asarray(scores, np.float64)
    finite = np.isfinite(scores)
    if not finite.any():
        return -1
    pool = finite & np.asarray(good, bool)
    if not pool.any():
        pool = finite
    tb = np.zeros_like(scores) if tiebreak is None else np.nan_to_num(np.asarray(tiebreak, np.float64), nan=-np.inf)
    cand = np.flatnonzero(pool)
    order = np.lexsort((-cand, tb[cand], scores[cand]))  # last = best score, then tiebreak, then earliest
    return int(cand[order[-1]])
