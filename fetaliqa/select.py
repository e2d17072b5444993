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

Coarse-to-fine search helpers (``coarse_frames``, ``sweep_candidates``, ``neighbourhood``)
pick which frames to score; the driver is ``fetaliqa.pipeline.fast_search``.
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


def coarse_frames(signal: np.ndarray, frames_per_sweep: int, stride: int) -> np.ndarray:
    """Every ``stride``-th frame with signal within each sweep, starting ``stride // 2`` in
    (so no sampled frame sits on a sweep's first or last frame), sorted. Counting only frames
    with signal keeps the spacing even across blank gaps (contact loss)."""
    signal = np.asarray(signal, bool)
    out = []
    for s0 in range(0, len(signal), frames_per_sweep):
        sig = s0 + np.flatnonzero(signal[s0:s0 + frames_per_sweep])
        out.append(sig[min(stride // 2, max(len(sig) - 1, 0))::max(1, stride)])
    return np.concatenate(out).astype(int) if out else np.zeros(0, int)


def _order(scores: np.ndarray, good: np.ndarray, tiebreak: np.ndarray | None, cand: np.ndarray) -> np.ndarray:
    """``cand`` sorted best first by (good, score, tiebreak, earliest): ``choose_frame``'s order."""
    s = np.asarray(scores, np.float64)[cand]
    g = np.asarray(good, bool)[cand]
    tb = np.zeros(len(cand)) if tiebreak is None else np.nan_to_num(np.asarray(tiebreak, np.float64)[cand],
                                                                      nan=-np.inf)
    return cand[np.lexsort((-cand, tb, s, g))[::-1]]


def best_of(scores: np.ndarray, good: np.ndarray, tiebreak: np.ndarray | None, cand: np.ndarray) -> int:
    """The best of the frames ``cand`` in ``choose_frame``'s order."""
    return int(_order(scores, good, tiebreak, np.asarray(cand, int))[0])


def sweep_candidates(scores: np.ndarray, good: np.ndarray, tiebreak: np.ndarray | None, frames_per_sweep: int,
                     per_sweep: int, gate: float = 0.0) -> list[int]:
    """The best ``per_sweep`` scored frames of each sweep (``choose_frame``'s order), best
    sweep first. gate > 0 drops a sweep's candidates that cannot plausibly win: not good
    while some frame is, or scoring below ``gate`` x the best good score."""
    scores = np.asarray(scores, np.float64)
    finite = np.isfinite(scores)
    good = np.asarray(good, bool) & finite
    best_good = scores[good].max() if good.any() else None
    out = []
    for s0 in range(0, len(scores), frames_per_sweep):
        cand = s0 + np.flatnonzero(finite[s0:s0 + frames_per_sweep])
        for c in _order(scores, good, tiebreak, cand)[:per_sweep]:
            if gate > 0 and best_good is not None and not (good[c] and scores[c] >= gate * best_good):
                continue
            out.append(int(c))
    return [int(c) for c in _order(scores, good, tiebreak, np.array(out, int))] if out else []


def neighbourhood(frame: int, radius: int, frames_per_sweep: int, n_frames: int) -> np.ndarray:
    """Frames within +-radius of ``frame`` in the same sweep (``frame`` included)."""
    s0 = (frame // frames_per_sweep) * frames_per_sweep
    return np.arange(max(s0, frame - radius), min(s0 + frames_per_sweep, n_frames, frame + radius + 1))


def choose_frame(scores: np.ndarray, good: np.ndarray, tiebreak: np.ndarray | None = None) -> int:
    """0-based index of the best-scoring good frame, else the best-scoring frame, else -1
    (no finite score at all). ``tiebreak`` (e.g. peak probability) orders equal scores."""
    finite = np.flatnonzero(np.isfinite(np.asarray(scores, np.float64)))
    return best_of(scores, good, tiebreak, finite) if len(finite) else -1
