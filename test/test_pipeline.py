"""analyse_stack end to end: contract of Analysis with a random small model, and selection +
native-grid mask with a transparent model whose foreground is the bright pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fetaliqa.model import ModelConfig, build_model
from fetaliqa.pipeline import Analysis, FrameScorer, analyse_stack, native_mask

torch.set_num_threads(2)


class BrightIsAbdomen(nn.Module):
    """SEG logits = (normalised intensity - 1) * 20: pixels brighter than ~0.5 of full scale
    (after CLIP normalisation) are foreground. Exercises preprocessing, the inverse mapping,
    scoring and selection without trained weights."""

    heads = ("seg",)

    def __init__(self, **kw):
        super().__init__()
        self.config = ModelConfig(backbone="fetalclip-small", heads=self.heads, **kw)

    def forward(self, x):
        return {"seg": (x[:, :1] - 0.1) * 20}


def _stack(n=12, rows=56, cols=74):  # needs n >= 11
    rng = np.random.default_rng(0)
    st = (rng.random((n, rows, cols)) * 60).astype(np.uint8)
    st[0] = 0  # blank frame
    y, x = np.mgrid[:rows, :cols]
    disk = ((y - 28) / 14) ** 2 + ((x - 40) / 18) ** 2 <= 1
    for f, scale in ((5, 0.6), (6, 1.0), (7, 0.8)):  # a run of growing/shrinking abdomen
        d = ((y - 28) / (14 * scale)) ** 2 + ((x - 40) / (18 * scale)) ** 2 <= 1
        st[f][d] = 250
    st[10][((y - 20) / 15) ** 2 + ((x - 30) / 19) ** 2 <= 1] = 250  # isolated, larger blob
    return st, disk


def test_random_small_model_contract():
    st = _stack()[0][:6]
    model = build_model(ModelConfig(backbone="fetalclip-small", decoder_width=8))
    a = analyse_stack(st, model, batch_size=4, progress=False)
    assert isinstance(a, Analysis) and isinstance(a.frame, int) and 1 <= a.frame < 6
    assert a.mask.shape == st.shape[1:] and a.mask.dtype == np.uint8 and set(np.unique(a.mask)) <= {0, 1}
    assert a.mask.any()
    assert a.scores.shape == (6,) and a.scores.dtype == np.float32 and np.isnan(a.scores[0])
    assert np.isfinite(a.scores[1:]).all()
    assert a.good.shape == (6,) and a.good.dtype == bool and not a.good[0]
    assert {"signal", "model", "select", "mask", "total"} <= a.timings.keys()


def test_selection_and_native_mask_with_transparent_model():
    st, disk = _stack()
    a = analyse_stack(st, BrightIsAbdomen(temporal_window=1), batch_size=5, progress=False)
    assert a.frame == 6  # best of the supported run beats the isolated larger blob
    dice = 2 * (a.mask.astype(bool) & disk).sum() / (a.mask.sum() + disk.sum())
    assert dice > 0.9, dice
    assert a.good[[5, 6, 7, 10]].all() and not a.good[[1, 2, 3]].any()
    b = analyse_stack(st, BrightIsAbdomen(temporal_window=0), batch_size=5, progress=False)
    assert b.frame == 10  # without temporal support the bigger isolated blob wins
    ell = analyse_stack(st, BrightIsAbdomen(ellipse_mask=True), progress=False)
    assert ell.mask.any() and ell.mask.dtype == np.uint8


def test_fov_restricts_mask_and_none_pass_still_chooses():
    st, _ = _stack()
    fov = np.zeros(st.shape[1:], bool)
    fov[:, :40] = True
    a = analyse_stack(st, BrightIsAbdomen(temporal_window=1), fov=fov, progress=False)
    assert a.mask[:, 40:].sum() == 0 and a.mask.any()
    dim = st.copy()
    dim[dim > 100] = 90  # nothing bright: no frame passes, one is still chosen, mask non-empty
    b = analyse_stack(dim, BrightIsAbdomen(), progress=False)
    assert not b.good.any() and b.frame >= 1 and b.mask.any()


def test_no_signal_and_errors():
    model = BrightIsAbdomen()
    a = analyse_stack(np.zeros((6, 20, 30), np.uint8), model, progress=False)
    assert a.frame == -1 and not a.mask.any() and np.isnan(a.scores).all() and not a.good.any()
    with pytest.raises(ValueError, match="search"):
        analyse_stack(np.ones((2, 20, 30), np.uint8), model, search="warp", progress=False)
    with pytest.raises(ValueError, match="cannot produce"):
        analyse_stack(np.ones((2, 20, 30), np.uint8),
                      build_model(ModelConfig(backbone="fetalclip-small", heads=("cls",))), progress=False)
    with pytest.raises(ValueError, match="fov shape"):
        analyse_stack(np.ones((2, 20, 30), np.uint8), model, fov=np.ones((3, 3), bool), progress=False)


def test_cls_selection_uses_cls_head():
    model = build_model(ModelConfig(backbone="fetalclip-small", heads=("seg", "cls"), decoder_width=8,
                                    select_by="cls"))
    st = _stack()[0][:6]
    a = analyse_stack(st, model, progress=False)
    probs = a.scores
    assert np.all((probs[1:] >= 0) & (probs[1:] <= 1)) and a.frame == int(np.nanargmax(probs))
    assert np.array_equal(a.good[1:], probs[1:] >= 0.5) and a.mask.any()



class BrightWithFrameHead(BrightIsAbdomen):
    """BrightIsAbdomen plus a frame head whose logit falls with the frame's mean intensity."""

    heads = ("seg", "frame")

    def forward(self, x):
        return {**super().forward(x), "frame": -8 * (x.mean((1, 2, 3)) + 1.2)}


def test_frame_head_probability_enters_the_quality_score():
    """A SEG model with a frame head: every scored frame's score is the SEG rule's with the
    head's probability multiplying the raw score; a replay keeps it."""
    from fetaliqa.pipeline import FrameScorer, ReplayScorer
    from fetaliqa.select import seg_scores, sweep_length
    model = BrightWithFrameHead(temporal_window=1)
    st = _stack()[0]
    sc = FrameScorer(st, model, batch_size=4, progress=False)
    sc.score(range(1, len(st)))
    p = sc.frame_prob
    assert np.isnan(p[0]) and np.all((p[1:] > 0) & (p[1:] < 1)) and np.ptp(p[1:]) > 0.05
    fps = sweep_length(len(st))
    want = seg_scores(sc.area, sc.mean_fg, 1, fps, frame_prob=p)
    scores = sc.scores_and_good()[0]
    np.testing.assert_array_equal(scores, want)
    plain = seg_scores(sc.area, sc.mean_fg, 1, fps)
    assert np.nanargmax(plain) != np.nanargmax(scores)  # the head moves the choice off the brightest frame
    rep = ReplayScorer(sc)
    rep.score(range(1, len(st)))
    np.testing.assert_array_equal(rep.scores_and_good()[0], scores)
    a = analyse_stack(st, model, batch_size=4, progress=False)
    np.testing.assert_allclose(a.scores, scores, rtol=1e-6)
    assert a.frame == int(np.nanargmax(scores))


def test_window_counts_frames_at_the_models_density():
    """With window_frames_per_sweep set, a stack sampled 4 x more sparsely is smoothed over a
    quarter of temporal_window (the same stretch of sweep), in the quality score and in the
    frame head's decision; at that density itself nothing moves."""
    import dataclasses

    from fetaliqa.pipeline import FrameScorer, ReplayScorer
    from fetaliqa.select import frame_decision, seg_scores, sweep_length
    st = _stack(n=60)[0]
    fps = sweep_length(len(st))  # 10
    plain = FrameScorer(st, BrightWithFrameHead(temporal_window=2, frame_threshold=0.5), batch_size=8,
                        progress=False)
    plain.score(range(len(st)))

    def replay(ref):
        r = ReplayScorer(plain, config=dataclasses.replace(plain.cfg, window_frames_per_sweep=ref))
        r.score(range(len(st)))
        return r

    same, sparse = replay(fps), replay(4 * fps)
    np.testing.assert_array_equal(same.scores_and_good()[0], plain.scores_and_good()[0])
    np.testing.assert_array_equal(same.decision()[0], plain.decision()[0])
    np.testing.assert_allclose(sparse.scores_and_good()[0],
                               seg_scores(plain.area, plain.mean_fg, 0.5, fps, frame_prob=plain.frame_prob), rtol=1e-6)
    np.testing.assert_allclose(sparse.decision()[0], frame_decision(plain.frame_prob, 0.5, fps), rtol=1e-6)
    assert not np.allclose(sparse.decision()[0], plain.decision()[0], equal_nan=True)


def test_frame_threshold_decides_good_frames_by_the_head_alone():
    """With frame_threshold set a frame is good when the head's smoothed probability reaches
    it, whatever its quality score or area; the scores do not move, nor the choice with
    choose_from="all" (with "good" it is the best score among the head's good frames)."""
    import dataclasses

    from fetaliqa.pipeline import FrameScorer, ReplayScorer, conclude
    from fetaliqa.select import frame_decision, sweep_length
    st = _stack()[0]
    kw = dict(temporal_window=1, score_threshold=1e-4, choose_from="all")
    by_score = FrameScorer(st, BrightWithFrameHead(**kw), batch_size=4, progress=False)
    by_score.score(range(1, len(st)))
    values = frame_decision(by_score.frame_prob, 1, sweep_length(len(st)))
    cut = float(np.nanmedian(values))
    by_head = ReplayScorer(by_score, config=dataclasses.replace(by_score.cfg, frame_threshold=cut))
    by_head.score(range(1, len(st)))
    a, b = conclude(by_score), conclude(by_head)
    np.testing.assert_array_equal(b.good, np.nan_to_num(values, nan=-1) >= cut)
    np.testing.assert_array_equal(by_head.decision()[0], values)
    assert by_head.decision()[1] == cut and by_score.decision()[1] == 1e-4
    assert not b.good[0] and 0 < b.good.sum() < len(st) - 1  # frame 0 (blank, not scored) is never good
    assert not np.array_equal(a.good, b.good)  # the quality-score cut decides otherwise
    assert a.frame == b.frame and np.array_equal(a.scores, b.scores, equal_nan=True)
    full = analyse_stack(st, BrightWithFrameHead(**kw, frame_threshold=cut), batch_size=4, progress=False)
    np.testing.assert_array_equal(full.good, b.good)
    assert full.frame == b.frame
    among_good = ReplayScorer(by_score, config=dataclasses.replace(by_head.cfg, choose_from="good"))
    among_good.score(range(1, len(st)))
    c = conclude(among_good)
    assert c.frame == int(np.nanargmax(np.where(b.good, b.scores, np.nan)))
    assert not b.good[b.frame] and c.frame != b.frame  # here the best score is not a good frame


def test_mask_window_averages_the_neighbours_maps():
    """The chosen frame's mask is cut from the mean probability map over its mask window: with
    the transparent model, frames 2-4 show disks of 0.6, 1.0 and 0.8 times one size, so the
    mean map of frame 3 passes 0.5 exactly inside the 0.8 disk (two of three frames); its own
    map gives the full disk. A blank neighbour (no signal) does not count: at pixel threshold
    0.4, frames 3 and 4 alone pass it in the whole disk (0.5), with a blank third map they would
    not (1/3)."""
    rows, cols = 56, 74
    y, x = np.mgrid[:rows, :cols]

    def disk(scale):
        return ((y - 28) / (20 * scale)) ** 2 + ((x - 37) / (26 * scale)) ** 2 <= 1

    st = np.full((7, rows, cols), 30, np.uint8)  # 7 frames: one sweep
    for f, scale in ((2, 0.6), (3, 1.0), (4, 0.8)):
        st[f][disk(scale)] = 250

    def mask(window, stack=st, **kw):
        return native_mask(FrameScorer(stack, BrightIsAbdomen(mask_window=window, **kw), progress=False), 3)

    def dice(m, ref):
        return 2 * (m.astype(bool) & ref).sum() / (m.sum() + ref.sum())

    assert dice(mask(0), disk(1.0)) > 0.97
    assert dice(mask(1), disk(0.8)) > 0.97 and dice(mask(1), disk(1.0)) < 0.85
    blank = st.copy()
    blank[2] = 0
    assert dice(mask(1, blank, pixel_threshold=0.4), disk(1.0)) > 0.97
    assert dice(mask(1, pixel_threshold=0.4), disk(0.8)) > 0.97
