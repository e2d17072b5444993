"""Fast path: the coarse-to-fine search picks the exhaustive pass's frame when the signal is
clear while scoring a fraction of the frames, replaying it on cached statistics equals a real
run, BatchNorm folding keeps the model's outputs, and streaming never holds a full-stack
float array (torch or numpy)."""

from __future__ import annotations

import csv
import json
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fetaliqa.model import ModelConfig, build_model
from fetaliqa.model.fuse import fold_batchnorm, inference_view, quantize_encoder_linears
from fetaliqa.pipeline import FastSearch, FrameScorer, ReplayScorer, analyse_stack, fast_search, resolve_search
from fetaliqa.select import choose_frame, coarse_frames, neighbourhood, sweep_candidates

torch.set_num_threads(2)
FPS, ROWS, COLS = 40, 48, 64  # 6 sweeps x 40 frames


class BrightIsAbdomen(nn.Module):
    """SEG logits rise with intensity: the bright disks drawn below are the foreground, so the
    per-frame response is known in advance. Records the largest batch it was given."""

    def __init__(self, **kw):
        super().__init__()
        self.config = ModelConfig(backbone="fetalclip-small", heads=("seg",), **kw)
        self.max_batch = 0

    def forward(self, x):
        self.max_batch = max(self.max_batch, x.shape[0])
        return {"seg": (x[:, :1] - 0.1) * 20}


def _disk(scale: float, cy: float = 24, cx: float = 32) -> np.ndarray:
    y, x = np.mgrid[:ROWS, :COLS]
    return ((y - cy) / (14 * scale)) ** 2 + ((x - cx) / (18 * scale)) ** 2 <= 1


def _case(seed: int = 0) -> tuple[np.ndarray, int]:
    """A 240-frame stack: an abdomen run in sweep 3 (frames 93..105, largest at 99), a
    weaker run in sweep 5, an isolated blob in sweep 1, blank frames; -> (stack, peak frame)."""
    rng = np.random.default_rng(seed)
    st = (rng.random((6 * FPS, ROWS, COLS)) * 60).astype(np.uint8)
    st[40:44] = 0  # contact loss
    for f in range(93, 106):
        st[f][_disk(1.0 - abs(f - 99) / 9)] = 250
    for f in range(170, 176):
        st[f][_disk(0.45)] = 250
    st[15][_disk(0.7, 20, 28)] = 250
    return st, 99


def test_auto_search_is_exhaustive_for_small_models_and_on_cuda_fast_for_wide_ones_on_the_cpu(monkeypatch):
    """"auto" resolves by the encoder's width and the kind of device alone (never by timing);
    the explicit searches pass through; analyse_stack runs what it resolves to and says so."""
    import fetaliqa.pipeline as pipeline

    small = ModelConfig(backbone="fetalclip-small")  # width 128, the embedded default's geometry
    wide = ModelConfig(backbone="FetalCLIP")  # FetalCLIP's ViT-L/14, width 1024 (config only, no weights)
    assert small.vision_cfg()["width"] < pipeline.LARGE_ENCODER_WIDTH <= wide.vision_cfg()["width"]
    assert resolve_search("auto", small, "cpu") == "exhaustive"
    assert resolve_search("auto", wide, "cpu") == "fast"
    assert resolve_search("auto", wide, torch.device("cuda:1")) == "exhaustive"
    assert resolve_search("auto", small, "cuda") == "exhaustive"
    assert resolve_search("fast", small, "cpu") == "fast" and resolve_search("exhaustive", wide, "cpu") == "exhaustive"
    with pytest.raises(ValueError, match="available: auto, exhaustive, fast"):
        resolve_search("quick", small, "cpu")
    st, peak = _case()
    model = BrightIsAbdomen(temporal_window=2)
    ex = analyse_stack(st, model, batch_size=8, progress=False)
    auto = analyse_stack(st, model, batch_size=8, search="auto", progress=False)
    assert ex.search == auto.search == "exhaustive" and auto.frame == ex.frame == peak
    assert np.array_equal(np.isfinite(auto.scores), np.isfinite(ex.scores))
    monkeypatch.setattr(pipeline, "LARGE_ENCODER_WIDTH", 128)  # this model now counts as wide
    fa = analyse_stack(st, model, batch_size=8, search="fast", progress=False)
    auto = analyse_stack(st, model, batch_size=8, search="auto", progress=False)
    assert fa.search == auto.search == "fast"
    assert np.array_equal(np.isfinite(auto.scores), np.isfinite(fa.scores)) and auto.frame == fa.frame
    assert np.isfinite(auto.scores).sum() < np.isfinite(ex.scores).sum()


def test_helpers_by_hand():
    sig = np.ones(24, bool)
    sig[[4, 5]] = False
    # sweeps of 12: frames with signal 0..3, 6..11 -> every 4th starting at the 2nd (index 2)
    assert coarse_frames(sig, 12, 4).tolist() == [2, 8, 14, 18, 22]
    assert coarse_frames(np.zeros(5, bool), 5, 2).size == 0
    assert neighbourhood(13, 3, 12, 24).tolist() == [12, 13, 14, 15, 16]  # stays in its sweep
    scores = np.array([np.nan, 0.2, 0.9, np.nan, 0.1, 0.5])
    good = np.array([0, 1, 1, 0, 1, 1], bool)
    assert sweep_candidates(scores, good, None, 3, 1) == [2, 5]  # best sweep first
    assert sweep_candidates(scores, good, None, 3, 2) == [2, 5, 1, 4]
    assert sweep_candidates(scores, good, None, 3, 1, gate=0.6) == [2]  # 0.5 < 0.6 x 0.9


def test_fast_picks_exhaustive_frame_with_a_fraction_of_the_frames():
    st, peak = _case()
    model = BrightIsAbdomen(temporal_window=2)
    ex = analyse_stack(st, model, batch_size=8, progress=False)
    fa = analyse_stack(st, model, batch_size=8, search="fast", progress=False)
    assert ex.frame == peak and fa.frame == ex.frame
    assert np.array_equal(fa.mask, ex.mask)
    n_ex, n_fa = np.isfinite(ex.scores).sum(), np.isfinite(fa.scores).sum()
    assert n_ex == 240 - 4 and n_fa <= 0.35 * n_ex, (n_fa, n_ex)
    # the chosen frame's score is exact: its +-2 neighbours were scored
    assert np.isfinite(fa.scores[peak - 4:peak + 5]).all()
    assert fa.scores[peak] == pytest.approx(ex.scores[peak], abs=1e-6)
    assert not np.isfinite(fa.scores[40:44]).any()  # blank frames never scored
    # a coarse stride wider than the run still finds it through refinement and settling
    sc = FrameScorer(st, model, batch_size=8, progress=False)
    fast_search(sc, st.reshape(len(st), -1).max(1) > 0, FastSearch(stride=16, radius=8, refine="dense"))
    assert choose_frame(*sc.scores_and_good()) == peak and sc.n_scored < 0.25 * n_ex, sc.n_scored
    # the pattern search (climb) reaches the same peak with fewer frames than dense refinement
    climb = FrameScorer(st, model, batch_size=8, progress=False)
    fast_search(climb, st.reshape(len(st), -1).max(1) > 0, FastSearch(stride=16, radius=8, refine="climb"))
    assert choose_frame(*climb.scores_and_good()) == peak and climb.n_scored < sc.n_scored, climb.n_scored
    # a cap on the candidates refined in all bounds the cost; the best candidate is refined first
    sig = st.reshape(len(st), -1).max(1) > 0
    counts = {}
    for cap in (None, 1):
        capped = FrameScorer(st, model, batch_size=8, progress=False)
        fast_search(capped, sig, FastSearch(per_sweep=3, gate=0.0, max_candidates=cap))
        assert choose_frame(*capped.scores_and_good()) == peak
        counts[cap] = capped.n_scored
    assert counts[1] < counts[None], counts
    with pytest.raises(ValueError, match="refine"):
        FastSearch(refine="sparse")


def test_replay_on_cached_statistics_equals_a_real_fast_run():
    st, _ = _case(1)
    signal = st.reshape(len(st), -1).max(1) > 0
    model = BrightIsAbdomen(temporal_window=2)
    full = FrameScorer(st, model, batch_size=16, progress=False)
    full.score(np.flatnonzero(signal))
    for params in (FastSearch(), FastSearch(stride=12, per_sweep=2, gate=0.5)):
        real = FrameScorer(st, model, batch_size=5, progress=False)
        fast_search(real, signal, params)
        replay = ReplayScorer(full)
        fast_search(replay, signal, params)
        assert np.array_equal(real.scored, replay.scored)
        a, b = real.scores_and_good(), replay.scores_and_good()
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)  # batch composition differs: float noise only


def test_replay_under_other_thresholds_equals_a_run_with_them():
    """One pass keeping statistics at several pixel thresholds serves every threshold policy:
    the replay's choice and mask are a real run's under that policy."""
    import dataclasses

    from fetaliqa.pipeline import conclude

    st, _ = _case(2)
    signal = st.reshape(len(st), -1).max(1) > 0
    model = BrightIsAbdomen(pixel_threshold=0.5, area_threshold=0.01)
    full = FrameScorer(st, model, batch_size=16, progress=False, also_at=[0.9])
    full.score(np.flatnonzero(signal))
    shaped = dict(shape_power=1.0, sweep_prior=(0.2, 0.3, 0.1, 0.1, 1.0, 0.1))  # favours the weak sweep-5 run
    for px, area, kw in ((0.9, 0.2, {}), (0.5, 0.3, {}), (0.5, 0.01, shaped)):
        other = BrightIsAbdomen(pixel_threshold=px, area_threshold=area, **kw)
        real = FrameScorer(st, other, batch_size=7, progress=False)
        fast_search(real, signal)
        replay = ReplayScorer(full, config=other.config)
        fast_search(replay, signal)
        assert np.array_equal(real.scored, replay.scored)
        a, b = conclude(real), conclude(replay)
        assert a.frame == b.frame >= 0 and np.array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        if kw:  # exhaustively, the prior moves the choice to the sweep-5 run (the coarse grid misses it)
            every = ReplayScorer(full, config=other.config)
            every.score(np.flatnonzero(signal))
            assert 170 <= conclude(every).frame <= 175
    with pytest.raises(ValueError, match="also_at"):
        ReplayScorer(full, config=dataclasses.replace(model.config, pixel_threshold=0.7))


def test_choose_from_all_ranks_every_frame_by_score():
    """choose_from="good": a good frame beats any frame below the area cut; "all": the best
    score wins (here a run just below the cut in a sweep the prior favours), and the frames
    keep their per-frame decision either way."""
    from fetaliqa.pipeline import conclude

    st, peak = _case(3)
    signal = st.reshape(len(st), -1).max(1) > 0
    kw = dict(area_threshold=0.1, sweep_prior=(0.05, 0.05, 0.05, 0.05, 1.0, 0.05))  # sweep-5 run: not good
    runs = {}
    for choose in ("good", "all"):
        sc = FrameScorer(st, BrightIsAbdomen(choose_from=choose, **kw), batch_size=16, progress=False)
        sc.score(np.flatnonzero(signal))
        runs[choose] = conclude(sc)
    assert runs["good"].frame == peak and runs["good"].good[peak]
    assert 170 <= runs["all"].frame <= 175 and not runs["all"].good[runs["all"].frame]
    np.testing.assert_array_equal(runs["good"].good, runs["all"].good)


def test_good_by_score_threshold_labels_frames_by_quality_score():
    """With score_threshold set a frame is good when its quality score (sweep prior
    included) reaches it, whatever its area; the choice (choose_from="all") is unchanged."""
    import dataclasses

    from fetaliqa.pipeline import conclude

    st, _ = _case(3)
    signal = st.reshape(len(st), -1).max(1) > 0
    kw = dict(area_threshold=0.1, choose_from="all", sweep_prior=(0.05, 0.05, 0.05, 0.05, 1.0, 0.05))
    by_area = FrameScorer(st, BrightIsAbdomen(**kw), batch_size=16, progress=False)
    by_area.score(np.flatnonzero(signal))
    a = conclude(by_area)
    cut = float(np.nanmax(a.scores)) / 2
    by_score = ReplayScorer(by_area, config=dataclasses.replace(by_area.cfg, score_threshold=cut))
    by_score.score(np.flatnonzero(signal))
    b = conclude(by_score)
    assert a.frame == b.frame and np.array_equal(a.scores, b.scores, equal_nan=True)
    np.testing.assert_array_equal(b.good, np.nan_to_num(b.scores, nan=-1) >= cut)
    assert b.good[b.frame] and not a.good[a.frame]  # the sweep-5 run: below the area cut, best score
    # by area: the large disks of sweep 3; by score: the prior demotes them below the sweep-5 run
    assert set(np.flatnonzero(a.good)) <= set(range(93, 106)) and set(np.flatnonzero(b.good)) <= set(range(170, 176))
    assert a.good.any() and b.good.sum() >= 2


def test_batchnorm_folding_keeps_outputs_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="fetalclip-small", decoder_width=8)).eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        ref = model(x)["seg"]
        for cl in (False, True):
            view = inference_view(model, channels_last=cl, sdpa_attention=cl)
            out = view(x)["seg"]
            # fp32 reassociation only (logits are O(1)); decisions use sigmoid > 0.5
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert view.decoder is not model.decoder
    blk, vblk = model.encoder.transformer.resblocks[0], view.encoder.transformer.resblocks[0]
    assert type(blk.attn) is nn.MultiheadAttention and vblk.attn.in_proj.weight is blk.attn.in_proj_weight  # shared
    assert vblk.mlp is blk.mlp
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.decoder.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.decoder.modules()) == 34  # all still there
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.BatchNorm2d(2))) == 0  # not adjacent


class _LargestFloat(TorchDispatchMode):
    """Records the largest floating-point tensor any torch op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("search", ["exhaustive", "fast"])
def test_streaming_never_holds_a_full_stack_float_array(search, monkeypatch):
    """No full-stack copy, float or uint8, on the torch or the numpy side. The chosen frame's
    ``measurable`` check is left out of the numpy count: it works on that one 2D mask, padded
    by 200 px on every side as the official measurement does, which on these 48x64 frames
    alone outweighs half the 240-frame stack (on a real 562x744 frame a few MB against
    a 351 MB stack)."""
    import fetaliqa.pipeline as pipeline

    monkeypatch.setattr(pipeline, "measurable", lambda mask: mask)
    st, _ = _case(2)
    batch = 2
    model = BrightIsAbdomen(temporal_window=2)
    full_float = st.size  # elements of a float copy of the whole stack
    bound = batch * 3 * 224 * 224  # one preprocessed batch
    assert bound < full_float / 2
    tracemalloc.start()
    try:
        with _LargestFloat() as mode:
            a = analyse_stack(st, model, batch_size=batch, search=search, progress=False)
        _, peak_numpy = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert a.frame >= 0
    assert model.max_batch <= batch
    assert mode.largest <= bound, (mode.largest, bound)
    assert peak_numpy < st.nbytes / 2, peak_numpy  # numpy side: not even a uint8 copy (float32 = 4x)


def test_int8_encoder_quantisation_stays_close():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="fetalclip-small", decoder_width=8)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        ref = model.encode(x)["feats"]
        quantize_encoder_linears(model)
        got = model.encode(x)["feats"]
    assert not any(type(m) in (nn.Linear, nn.MultiheadAttention) for m in model.encoder.modules())
    for a, b in zip(got, ref):  # int8 weights and activations: ~1 % of the feature range
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_compare_search_cli_on_a_tiny_simulated_case(tmp_path, capsys):
    from fetaliqa.bench import main
    from fetaliqa.model import export_model
    from fetaliqa.simulate import SimConfig, simulate_case, write_case

    write_case(simulate_case(7, SimConfig(frames_per_sweep=10, rows=70, cols=93)), tmp_path / "data")
    torch.manual_seed(0)
    export_model(build_model(ModelConfig(backbone="fetalclip-small", decoder_width=4)).eval(), tmp_path / "m", {})
    out = tmp_path / "out"
    args = ["--compare-search", "--data", str(tmp_path / "data"), "--cases", "1", "--model", str(tmp_path / "m"),
            "--device", "cpu", "--verify", "1", "--out", str(out), "--batch-size", "8"]
    assert main(args) == 0
    summary = json.loads((out / "compare_search.json").read_text())
    assert summary["cases"] == 1 and summary["verify"][0]["same_frame_and_frames_scored"]
    ex, fa = summary["searches"]["exhaustive"], summary["searches"]["fast"]
    assert ex["same_frame"] == 1.0 and fa["mean_frames_scored"] <= ex["mean_frames_scored"] <= 60
    rows = list(csv.DictReader(open(out / "compare_search.csv")))
    assert len(rows) == len(summary["searches"]) and {r["search"] for r in rows} >= {"exhaustive", "fast"}
    assert len(list((out / "stats").glob("*.npz"))) == 1
    assert main(args) == 0  # second run reads the cached exhaustive statistics
    # a --model that is not one, a missing --image, no cases: refused, never replaced by the default
    for bad, says in ((["--model", str(tmp_path / "nope")], "not an exported fetaliqa model"),
                      (["--image", str(tmp_path / "nope.mha")], "no such file"),
                      (["--cases", "0"], "--cases, --batch-size")):
        with pytest.raises(SystemExit):
            main([*args, *bad])
        assert says in capsys.readouterr().err
