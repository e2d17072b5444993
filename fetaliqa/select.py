"""Per-frame decision and per-case frame selection (arrays of per-frame statistics in).

Quality score of a scored frame i (SEG):
    raw_i   = mean foreground probability_i x foreground area fraction_i x shape_i ** shape_power
              [x frame_i]
              (foreground = 224x224 pixels with probability > pixel_threshold)
    score_i = (raw_i + support_i) / 2 x sweep_prior[sweep of i],  support_i = mean raw over
              the scored frames within +-temporal_window of i in the same sweep (i included)
so an isolated confident blob ranks below a frame inside a run of abdomen views. The window
is ``ModelConfig.window_at``: temporal_window frames, or, for a model that counts them at a
frame density (``window_frames_per_sweep``), the same stretch of sweep at the stack's own.
shape_i (``frame_stats``) is 1 for a filled disk and falls for elongated, ragged or
scattered foreground: the abdominal plane is measured on a near-round section, while a
sagittal sweep shows the trunk lengthwise. frame_i, only when the model has a frame head
(``model.heads.FrameHead``), is that head's probability that frame i is annotated.
sweep_prior (6 weights, one per protocol sweep: 1-3 transverse, 4-6 sagittal) is how often
each sweep held an annotation in the training cases; it applies to 6-sweep stacks only.
shape_power 0, no frame head and no prior give the plain rule.
Frames not scored (blank frames, or skipped by a coarse search) are nan and never chosen.
A frame is good when its area fraction >= area_threshold, or, when the config has a
score_threshold (calibrated in training), when its score >= score_threshold, or, when it
has a frame_threshold (a model with a frame head), when its head's smoothed probability
(``frame_decision``: (frame_i + mean frame over +-temporal_window in the same sweep) / 2)
>= frame_threshold: the head alone ranks annotated frames better than any product with
the SEG statistics (docs/training.md), so it decides which frames are good. The chosen
frame is the best score among good frames; if none is good the best score anyway (ties
and all-zero scores broken by the peak probability); -1 only when nothing was scored (no
signal). A config with ``choose_from="all"`` takes the best score over all scored frames
(the pipeline's ``FrameScorer.ranking``): the score already weighs area and confidence, and
a frame just below the area cut in a likely sweep should not lose to any good frame
elsewhere.

Coarse-to-fine search helpers (``coarse_frames``, ``sweep_candidates``, ``neighbourhood``)
pick which frames to score; the driver is ``fetaliqa.pipeline.fast_search``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def frame_stats(prob: torch.Tensor, pixel_threshold: float) -> dict[str, torch.Tensor]:
    """(B, S, S) probabilities -> per-frame float32 (B,): "area" (foreground fraction of
    S*S), "mean_fg" (mean probability over foreground, 0 if none), "peak" (max probability)
    and "shape" (``shape_from_moments`` of the foreground pixels)."""
    fg = prob > pixel_threshold
    n = fg.flatten(1).sum(1).float()
    mean_fg = torch.where(fg, prob, torch.zeros_like(prob)).flatten(1).sum(1).float() / n.clamp(min=1)
    return {"area": n / fg[0].numel(), "mean_fg": mean_fg, "peak": prob.flatten(1).amax(1).float(),
            "shape": shape_from_moments(fg)}


def shape_from_moments(fg: torch.Tensor, min_pixels: int = 8) -> torch.Tensor:
    """(B, H, W) bool foreground -> float32 (B,) in [0, 1]: roundness x ellipse fill, from
    the second moments of the foreground pixels (covariance eigenvalues l1 >= l2):
    roundness = sqrt(l2 / l1) (b/a of the ellipse with those moments) and fill =
    pixels / (4 pi sqrt(l1 l2)) capped at 1 (a filled ellipse has area 4 pi sqrt(l1 l2);
    the same moments from ragged or scattered pixels cover less). 1 for a filled disk,
    b/a for a filled ellipse; 0 below ``min_pixels`` pixels."""
    b, h, w = fg.shape
    yy, xx = torch.meshgrid(torch.arange(h, device=fg.device, dtype=torch.float64),
                            torch.arange(w, device=fg.device, dtype=torch.float64), indexing="ij")
    basis = torch.stack([torch.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], -1).reshape(h * w, 6)
    m = fg.reshape(b, h * w).to(torch.float64) @ basis  # (B, 6): n, sums and sums of products
    n = m[:, 0].clamp(min=1)
    cx, cy = m[:, 1] / n, m[:, 2] / n
    vxx, vyy, vxy = m[:, 3] / n - cx * cx, m[:, 4] / n - cy * cy, m[:, 5] / n - cx * cy
    half_tr = (vxx + vyy) / 2
    det = (vxx * vyy - vxy * vxy).clamp(min=0)
    disc = (half_tr * half_tr - det).clamp(min=0).sqrt()
    l1, l2 = half_tr + disc, (half_tr - disc).clamp(min=0)
    roundness = (l2 / l1.clamp(min=1e-12)).sqrt()
    fill = (m[:, 0] / (4 * torch.pi * det.sqrt()).clamp(min=1e-12)).clamp(max=1.0)
    return torch.where(m[:, 0] >= min_pixels, roundness * fill, torch.zeros_like(n)).float()


def sweep_length(n_frames: int) -> int:
    """Frames per sweep: n // 6 for a 6-sweep protocol stack (n divisible by 6), else n."""
    return n_frames // 6 if n_frames % 6 == 0 and n_frames >= 6 else n_frames


def window_weights(i: int, window: float, frames_per_sweep: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame indices, weights) of frame i's temporal window: the frames within +-window of i
    in its sweep (i included), those within +-floor(window) weighing 1 and the two next ones
    the fractional part (none for a whole window). At 35 frames per sweep, a window of 0.5
    covers the stretch of sweep that 2 frames cover at 140 (``ModelConfig.window_at``)."""
    whole = int(np.floor(window))
    part = float(window) - whole
    s0 = (i // frames_per_sweep) * frames_per_sweep
    lo, hi = max(s0, i - whole - (part > 0)), min(s0 + frames_per_sweep, n_frames, i + whole + 1 + (part > 0))
    idx = np.arange(lo, hi)
    return idx, np.where(np.abs(idx - i) <= whole, 1.0, part)


def temporal_support(raw: np.ndarray, window: float, frames_per_sweep: int) -> np.ndarray:
    """Mean of ``raw`` over the finite values in each frame's temporal window (``window_weights``;
    nan where raw is nan)."""
    raw = np.asarray(raw, dtype=np.float64)
    out = np.full(raw.shape, np.nan)
    for i in np.flatnonzero(np.isfinite(raw)):
        idx, w = window_weights(int(i), window, frames_per_sweep, len(raw))
        vals = raw[idx]
        w = w * np.isfinite(vals)
        out[i] = np.sum(w * np.nan_to_num(vals)) / np.sum(w)
    return out


def smoothed(raw: np.ndarray, window: float, frames_per_sweep: int) -> np.ndarray:
    """(raw + ``temporal_support``) / 2 (float64; raw itself for window <= 0): a frame's value
    backed by its neighbours', so an isolated response counts half."""
    raw = np.asarray(raw, np.float64)
    return raw if window <= 0 else (raw + temporal_support(raw, window, frames_per_sweep)) / 2


def frame_decision(frame_prob: np.ndarray, window: float, frames_per_sweep: int) -> np.ndarray:
    """The value a frame threshold cuts: the frame head's probability, ``smoothed`` over
    +-window frames of the same sweep; float32, nan where not scored."""
    return smoothed(frame_prob, window, frames_per_sweep).astype(np.float32)


def seg_scores(area: np.ndarray, mean_fg: np.ndarray, window: float, frames_per_sweep: int, *,
               shape: np.ndarray | None = None, shape_power: float = 0.0,
               sweep_prior: Sequence[float] | None = None, frame_prob: np.ndarray | None = None) -> np.ndarray:
    """Quality score per frame (module docstring), float32, nan where not scored.
    frame_prob: the frame head's probabilities (None: no frame head)."""
    raw = np.asarray(mean_fg, np.float64) * np.asarray(area, np.float64)
    if frame_prob is not None:
        raw = raw * np.asarray(frame_prob, np.float64)
    if shape_power:
        if shape is None:
            raise ValueError("shape_power needs the per-frame shape statistic")
        raw = raw * np.asarray(shape, np.float64) ** shape_power
    score = smoothed(raw, window, frames_per_sweep)
    n = len(score)
    if sweep_prior is not None and n == 6 * frames_per_sweep:
        score = score * np.repeat(np.asarray(sweep_prior, np.float64), frames_per_sweep)
    return score.astype(np.float32)


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
