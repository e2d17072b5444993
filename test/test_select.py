"""Frame statistics, decision, per-case selection and chosen-frame mask (hand-made cases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fetaliqa.postprocess import ellipse_mask, final_mask, largest_component
from fetaliqa.select import (choose_frame, frame_decision, frame_stats, seg_scores, shape_from_moments,
                             sweep_length, temporal_support, window_weights)


def test_frame_stats_by_hand():
    p = torch.zeros(2, 10, 10)
    p[0, :2, :5] = 0.9  # 10 pixels of 100
    p[0, 5, 5] = 0.4    # below threshold
    st = frame_stats(p, 0.5)
    assert np.allclose(st["area"].numpy(), [0.1, 0.0])
    assert np.allclose(st["mean_fg"].numpy(), [0.9, 0.0])
    assert np.allclose(st["peak"].numpy(), [0.9, 0.0])


def _ellipse(a: float, b: float, cy: float = 48, cx: float = 48, size: int = 96) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1


def test_shape_from_moments_by_hand():
    two = _ellipse(10, 10, 20, 20) | _ellipse(10, 10, 75, 75)       # two disks far apart
    ring = _ellipse(30, 30) & ~_ellipse(25, 25)                      # an outline, not a filled section
    few = torch.zeros(96, 96, dtype=torch.bool)
    few[0, :7] = True                                                # 7 pixels: too few to say
    fg = torch.stack([_ellipse(30, 30), _ellipse(40, 20), _ellipse(20, 40), two, ring, few,
                      torch.zeros(96, 96, dtype=torch.bool)])
    s = shape_from_moments(fg).numpy()
    assert s.dtype == np.float32
    assert s[0] == pytest.approx(1.0, abs=0.02)                      # a filled disk
    assert s[1] == pytest.approx(0.5, abs=0.02) and s[2] == pytest.approx(0.5, abs=0.02)  # b/a, any axis
    # two disks: moments of an elongated spread (roundness ~0.2) that the pixels fill poorly
    assert s[3] < 0.1
    assert s[4] < 0.5 and s[5] == 0 and s[6] == 0
    st = frame_stats(torch.stack([_ellipse(30, 30).float() * 0.9, torch.zeros(96, 96)]), 0.5)
    assert st["shape"].numpy() == pytest.approx([1.0, 0.0], abs=0.02)


def test_shape_factor_and_sweep_prior_rank_frames():
    # 6 sweeps of 2 frames; frame 0 (sweep 1): round; frame 8 (sweep 5): larger but elongated
    area, mean, shape = np.full(12, 0.01), np.full(12, 0.9), np.full(12, 0.5)
    area[0], shape[0] = 0.10, 1.0
    area[8], shape[8] = 0.15, 0.4
    plain = seg_scores(area, mean, 0, 2)
    assert int(np.argmax(plain)) == 8
    assert int(np.argmax(seg_scores(area, mean, 0, 2, shape=shape, shape_power=1.0))) == 0
    prior = (0.8, 0.4, 0.3, 0.1, 0.2, 0.05)
    s = seg_scores(area, mean, 0, 2, sweep_prior=prior)
    np.testing.assert_allclose(s, plain * np.repeat(prior, 2), rtol=1e-6)
    assert int(np.argmax(s)) == 0
    # the prior is for 6-sweep protocol stacks only; the shape factor needs the statistic
    np.testing.assert_allclose(seg_scores(area[:10], mean[:10], 0, 10, sweep_prior=prior), plain[:10])
    with pytest.raises(ValueError, match="shape"):
        seg_scores(area, mean, 0, 2, shape_power=1.0)


def test_frame_head_probability_weighs_the_raw_score_before_temporal_support():
    # one sweep of 5 frames: frame 1 has the largest SEG response, the frame head doubts it
    area, mean = np.array([0.0, 0.2, 0.1, 0.1, 0.0]), np.full(5, 0.5)
    prob = np.array([0.5, 0.1, 0.9, 0.8, 0.5])
    raw = area * mean * prob  # 0, 0.01, 0.045, 0.04, 0
    np.testing.assert_allclose(seg_scores(area, mean, 0, 5, frame_prob=prob), raw, rtol=1e-6)
    s = seg_scores(area, mean, 1, 5, frame_prob=prob)
    assert s[2] == pytest.approx((0.045 + (0.01 + 0.045 + 0.04) / 3) / 2, rel=1e-6)
    assert int(np.argmax(seg_scores(area, mean, 1, 5))) == 1 and int(np.argmax(s)) == 2
    prob[2] = np.nan  # a frame the head did not score is not scored
    assert np.isnan(seg_scores(area, mean, 1, 5, frame_prob=prob)[2])


def test_frame_decision_is_the_head_probability_backed_by_its_sweep_neighbours():
    # two sweeps of 5 frames; frame 2 not scored (nan): it is skipped by its neighbours' support
    p = np.array([0.2, 0.8, np.nan, 0.6, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    d = frame_decision(p, 1, 5)
    # frame 0: (0.2 + mean(0.2, 0.8)) / 2; frame 1: (0.8 + mean(0.2, 0.8)) / 2; frame 3: (0.6 + mean(0.6, 0)) / 2;
    # frame 4: (0 + mean(0.6, 0)) / 2; frame 5 (sweep 2 starts: frame 4 does not count): (1 + mean(1, 1)) / 2;
    # frame 6: (1 + mean(1, 1, 0)) / 2; frame 7: (0 + mean(1, 0, 0)) / 2
    np.testing.assert_allclose(d[[0, 1, 3, 4, 5, 6, 7]], [0.35, 0.65, 0.45, 0.15, 1.0, 5 / 6, 1 / 6], rtol=1e-6)
    assert np.isnan(d[2]) and d.dtype == np.float32
    np.testing.assert_allclose(frame_decision(p, 0, 5), p.astype(np.float32))  # window 0: the probability itself


def test_fractional_window_weighs_its_end_frames_in_part():
    # one sweep of 5 frames; a window of 0.5: the frame itself weighs 1, its two neighbours 0.5
    p = np.array([0.0, 1.0, 0.0, 0.0, 1.0])
    s = temporal_support(p, 0.5, 5)
    # frame 0: (0 + 0.5 x 1) / 1.5; frame 2: (0.5 x 1 + 0 + 0.5 x 0) / 2; frame 4 (sweep end): (0.5 x 0 + 1) / 1.5
    np.testing.assert_allclose(s[[0, 2, 4]], [1 / 3, 0.25, 2 / 3])
    np.testing.assert_allclose(frame_decision(p, 0.5, 5)[[0, 2]], [1 / 6, 0.125], rtol=1e-6)
    # 1.5: +-1 weigh 1, +-2 weigh 0.5 (frame 2: (0.5 x 0 + 1 + 0 + 0 + 0.5 x 1) / 4)
    assert temporal_support(p, 1.5, 5)[2] == pytest.approx(1.5 / 4)
    # whole windows are the plain mean over +-window; 0 leaves the values alone
    np.testing.assert_allclose(temporal_support(p, 1.0, 5), [0.5, 1 / 3, 1 / 3, 1 / 3, 0.5])
    np.testing.assert_allclose(frame_decision(p, 0.0, 5), p)
    # a nan neighbour (not scored) weighs nothing
    q = np.array([0.0, np.nan, 1.0, 0.0, 0.0])
    assert temporal_support(q, 0.5, 5)[2] == pytest.approx(1 / 1.5)


def test_sweep_length():
    assert sweep_length(840) == 140 and sweep_length(12) == 2 and sweep_length(7) == 7


def test_temporal_support_stays_in_sweep_and_skips_nan():
    raw = np.array([1.0, 0.0, np.nan, 3.0, 5.0, 7.0])
    s = temporal_support(raw, 1, 3)  # sweeps [0,1,2] and [3,4,5]
    assert np.allclose(s[[0, 1, 3, 4, 5]], [0.5, 0.5, 4.0, 5.0, 6.0]) and np.isnan(s[2])


def test_isolated_blob_ranks_below_a_run():
    area = np.array([0, 0, 0.2, 0, 0, 0.1, 0.15, 0.15, 0.1, 0])
    mean = np.full(10, 0.9)
    s = seg_scores(area, mean, window=2, frames_per_sweep=10)
    assert s.dtype == np.float32
    assert int(np.argmax(s)) in (6, 7)  # not the lone frame 2 despite its larger area
    assert int(np.argmax(seg_scores(area, mean, window=0, frames_per_sweep=10))) == 2


def test_choose_frame_rules():
    scores = np.array([np.nan, 0.5, 0.9, 0.2], np.float32)
    assert choose_frame(scores, np.array([0, 1, 0, 1], bool)) == 1   # best among good
    assert choose_frame(scores, np.zeros(4, bool)) == 2              # none good: best anyway
    assert choose_frame(np.full(3, np.nan), np.zeros(3, bool)) == -1  # nothing scored
    z = np.zeros(3, np.float32)
    assert choose_frame(z, np.zeros(3, bool), tiebreak=np.array([0.1, 0.4, 0.3])) == 1


def test_final_mask_cleanup_and_fan():
    prob = np.zeros((60, 80), np.float32)
    prob[10:40, 10:40] = 0.9
    prob[20:25, 20:25] = 0.1  # hole
    prob[50:55, 70:75] = 0.9  # small distractor
    fov = np.ones((60, 80), bool)
    fov[:, 35:] = False
    m = final_mask(prob, 0.5, fov)
    assert m.dtype == np.uint8 and m[22, 22] == 1 and m[52, 72] == 0
    assert m[:, 35:].sum() == 0 and m.sum() == 30 * 25


def test_final_mask_never_empty():
    prob = np.full((30, 30), 0.05, np.float32)
    prob[10:14, 10:14] = 0.2
    m = final_mask(prob, 0.5)
    assert m.sum() == 16  # region >= half the peak
    assert final_mask(np.zeros((30, 30), np.float32), 0.5).sum() == 1


def test_ellipse_option_fits_and_fills():
    y, x = np.mgrid[:200, :200]
    ell = ((y - 100) / 60.0) ** 2 + ((x - 100) / 80.0) ** 2 <= 1
    jagged = ell.copy()
    jagged[95:105, 170:181] = False  # notch in the boundary
    out = ellipse_mask(jagged.astype(np.uint8))
    dice = 2 * (out.astype(bool) & ell).sum() / (out.sum() + ell.sum())
    assert dice > 0.98 and out[100, 175] == 1
    assert largest_component(np.zeros((4, 4), np.uint8)).sum() == 0


def test_window_weights():
    """A frame's temporal window: whole frames weigh 1, a fractional window's end frames its
    fractional part, never past its sweep or the stack."""
    idx, w = window_weights(12, 2, 10, 40)
    assert idx.tolist() == [10, 11, 12, 13, 14] and w.tolist() == [1] * 5
    idx, w = window_weights(12, 0.5, 10, 40)
    assert idx.tolist() == [11, 12, 13] and w.tolist() == [0.5, 1, 0.5]
    idx, w = window_weights(10, 1.5, 10, 40)  # first frame of sweep 2: nothing from sweep 1
    assert idx.tolist() == [10, 11, 12] and w.tolist() == [1, 1, 0.5]
    idx, w = window_weights(38, 3, 100, 40)  # a short last sweep
    assert idx.tolist() == [35, 36, 37, 38, 39]
    idx, w = window_weights(7, 0, 10, 40)
    assert idx.tolist() == [7] and w.tolist() == [1]
