"""training/: data reader, splits, frame cache, augmentation, loop, resume, export, DDP, FetalCLIP path.

Tiny release-layout data (6 cases x 6 sweeps x 4 frames of 60x80) written with SimpleITK;
small model geometry (fetalclip-small, decoder width 4); CPU only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_helpers import write_fetalclip_checkpoint, write_tiny_release  # noqa: E402

from fetaliqa.model import ModelConfig, load_exported  # noqa: E402
from fetaliqa.preprocess import masks_to_square, normalize, pad_resize  # noqa: E402
from training import train as T  # noqa: E402
from training.augment import AugmentConfig, augment_batch  # noqa: E402
from training.cache import CacheConfig, FrameCache, build_cache  # noqa: E402
from training.calibrate import (best_area_cut, best_cut, calibrate_score_threshold, case_frame_decision,  # noqa: E402
                                case_scores)
from training.data import DataError, frame_labels, load_case, load_sweeps, read_release  # noqa: E402
from training.splits import Split, make_split  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--backbone", "fetalclip-small", "--decoder-width", "4", "--num-workers", "0", "--no-progress",
         "--folds", "3", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_release(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory) -> FrameCache:
    return build_cache(read_release(tiny), tmp_path_factory.mktemp("c") / "cache", progress=False)


@pytest.fixture(scope="module")
def cache112(tiny, tmp_path_factory) -> FrameCache:
    """112x112 frames for the small random-init geometry at --image-size 112 (4x cheaper)."""
    return build_cache(read_release(tiny), tmp_path_factory.mktemp("c") / "cache112", CacheConfig(size=112),
                       progress=False)


# ----------------------------------------------------------------------------- data and splits
def test_reader_and_errors(tiny, tmp_path):
    recs = read_release(tiny)
    assert [r.uuid for r in recs] == [f"case{i:03d}" for i in range(6)]
    assert all(len(r.sweeps_with_ac) == 2 for r in recs)
    stack, mask = load_case(recs[0])
    assert stack.shape == mask.shape == (24, 60, 80) and stack.dtype == np.uint8
    bad = write_tiny_release(tmp_path / "bad", n_cases=2)
    (bad / "masks/stacked_fetal_abdomen/case001.mha").unlink()
    with pytest.raises(DataError, match="no mask"):
        read_release(bad)
    bad2 = write_tiny_release(tmp_path / "bad2", n_cases=2)
    m = np.full((24, 60, 80), 3, np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(m), str(bad2 / "masks/stacked_fetal_abdomen/case000.mha"))
    with pytest.raises(DataError, match="unknown labels"):
        load_case(read_release(bad2)[0])
    # one stray value in one pixel of one sweep, and a negative one in a signed mask: both named,
    # by the whole-stack reader and by the per-sweep one
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny / "masks/stacked_fetal_abdomen/case001.mha")))
    m = m.astype(np.int16)
    m[5, 10, 10], m[6, 0, 0] = 7, -1
    sitk.WriteImage(sitk.GetImageFromArray(m), str(bad2 / "masks/stacked_fetal_abdomen/case001.mha"))
    rec = read_release(bad2)[1]
    for read in (lambda: load_case(rec), lambda: load_sweeps(rec, [1])):
        with pytest.raises(DataError, match=r"unknown labels \[-1, 7\]"):
            read()
    load_sweeps(rec, [0, 2])  # the sweeps without the stray values read
    m = np.zeros((24, 60, 80), np.float32)
    m[5, 10:20, 10:20] = 0.5  # a soft mask would be truncated to background
    sitk.WriteImage(sitk.GetImageFromArray(m), str(bad2 / "masks/stacked_fetal_abdomen/case001.mha"))
    with pytest.raises(DataError, match=r"non-integer label values \[0.5\]"):
        load_case(read_release(bad2)[1])


def test_reader_refuses_csv_rows_it_would_misread(tmp_path):
    root = write_tiny_release(tmp_path / "r", n_cases=2)
    csv_path = root / "circumferences/fetal_abdominal_circumferences_per_sweep.csv"
    header, *lines = csv_path.read_text().splitlines()
    good = [r.ac_mm for r in read_release(root)]
    # a spreadsheet's byte-order mark is not part of the first column's name
    csv_path.write_text("\ufeff" + "\n".join([header, *lines]) + "\n", encoding="utf-8")
    assert [r.ac_mm for r in read_release(root)] == good
    cells = lines[1].split(",")
    for bad, match in ((",".join(cells + ["59"]), "line 3: 9 fields, the header has 8"),  # "17,59" for 17.59
                       (",".join(cells[:-1]), "line 3: 7 fields, the header has 8"),
                       (lines[0], "line 3: uuid case000 already has a row above")):
        csv_path.write_text("\n".join([header, lines[0], bad]) + "\n")
        with pytest.raises(DataError, match=match):
            read_release(root)
    blank = [lines[0].split(","), lines[1].split(",")]
    blank[1][1] = ""
    csv_path.write_text("\n".join([header, *map(",".join, blank)]) + "\n")
    with pytest.warns(UserWarning, match=r"1 rows without a subject_id \(first: \['case001'\]\)"):
        assert [r.subject_id for r in read_release(root)][1] == "case001"
    # separators-only and blank lines are skipped; a row without a uuid, or an infinite AC, is named
    csv_path.write_text("\n".join([header, *lines, ",,,,,,,", ",,,,,,,", "   "]) + "\n")
    assert [r.ac_mm for r in read_release(root)] == good
    cells0 = lines[0].split(",")
    for bad, match in ((",".join(["", *cells0[1:]]), "line 3: no uuid"),
                       (",".join([cells0[0] + "x", cells0[1], "inf", *cells0[3:]]), "line 3: expected a finite")):
        csv_path.write_text("\n".join([header, lines[1], bad]) + "\n")
        with pytest.raises(DataError, match=match):
            read_release(root)
    csv_path.write_text("uuid;subject_id\n")
    with pytest.raises(DataError, match=r"found \['uuid;subject_id'\]"):
        read_release(root)


def test_split_groups_subjects(tmp_path):
    rng = np.random.default_rng(1)
    subject_of = {f"u{i:03d}": f"s{int(rng.integers(0, 40)):02d}" for i in range(120)}
    sp = make_split(subject_of, k=5, seed=3, val_fold=1, test_fold=4)
    assert sorted(u for f in sp.folds for u in f) == sorted(subject_of)
    fold_of_subject: dict[str, set[int]] = {}
    for i, f in enumerate(sp.folds):
        for u in f:
            fold_of_subject.setdefault(subject_of[u], set()).add(i)
    assert all(len(v) == 1 for v in fold_of_subject.values())  # no subject in two folds
    assert max(map(len, sp.folds)) - min(map(len, sp.folds)) <= max(
        sum(1 for s in subject_of.values() if s == x) for x in set(subject_of.values()))
    assert not set(sp.train) & (set(sp.val) | set(sp.test)) and not set(sp.val) & set(sp.test)
    assert make_split(subject_of, 5, 3).folds == sp.folds and make_split(subject_of, 5, 4).folds != sp.folds
    sp.save(tmp_path / "split.json")
    back = Split.load(tmp_path / "split.json")
    assert back.folds == sp.folds and back.train == sp.train and back.test == sp.test


# ----------------------------------------------------------------------------- cache
def test_cache_matches_direct_computation_and_rebuilds_only_on_change(tiny, tmp_path):
    recs = read_release(tiny)
    root = tmp_path / "cache"
    c = build_cache(recs, root, CacheConfig(selection="published"), progress=False)
    assert len(c) == sum(len(r.sweeps_with_ac) * 4 for r in recs)
    for r in (recs[0], recs[3]):
        stack, mask = load_case(r)
        rows = c.rows_of([r.uuid])
        idx = c.index["frame"][rows]
        assert sorted(set(idx // 4)) == r.sweeps_with_ac and list(c.index["sweep"][rows]) == list(idx // 4)
        want = pad_resize(torch.from_numpy(stack[idx])).round().clamp(0, 255).to(torch.uint8).numpy()
        np.testing.assert_array_equal(c.frames[rows], want)
        np.testing.assert_array_equal(c.masks[rows], masks_to_square(torch.from_numpy(mask[idx])).numpy())
        np.testing.assert_array_equal(c.index["label"][rows], frame_labels(mask[idx]))
    assert c.binary_labels("any").sum() == (c.index["label"] > 0).sum() > c.binary_labels("optimal").sum() > 0
    stamp = (root / "frames.npy").stat().st_mtime_ns
    build_cache(recs, root, CacheConfig(selection="published"), progress=False)
    assert (root / "frames.npy").stat().st_mtime_ns == stamp  # same inputs: reused
    os.utime(recs[2].mask, ns=(1, 1))  # an input changed: rebuilt
    build_cache(recs, root, CacheConfig(selection="published"), progress=False)
    assert (root / "frames.npy").stat().st_mtime_ns != stamp
    whole = build_cache(recs, root, CacheConfig(selection="all"), progress=False)  # config changed
    assert len(whole) == 6 * 24
    par = build_cache(recs, tmp_path / "par", CacheConfig(selection="all"), progress=False, workers=2)
    for k in ("frames", "masks", "index"):  # cases preprocessed in parallel, written in order
        np.testing.assert_array_equal(getattr(par, k), getattr(whole, k))


def test_cache_build_never_deletes_a_foreign_folder_nor_leaves_a_half_build(tiny, tmp_path, monkeypatch):
    from training import cache as cache_mod
    recs = read_release(tiny)[:2]
    notes = tmp_path / "runs"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a frame cache"):
        build_cache(recs, notes, CacheConfig(size=32), progress=False)
    assert (notes / "notes.txt").read_text() == "mine"
    dead = tmp_path / "c.tmp-999999999"  # a killed build's leftover (no such process), hours old
    dead.mkdir()
    os.utime(dead, (1, 1))
    fresh = tmp_path / "c.tmp-999999998"  # as dead here, but just written: maybe another host's build
    fresh.mkdir()
    real = cache_mod._preprocess_case
    calls = []

    def fail_second(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)
    monkeypatch.setattr(cache_mod, "_preprocess_case", fail_second)
    with pytest.raises(KeyboardInterrupt):
        build_cache(recs, tmp_path / "c", CacheConfig(size=32), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tmp-999999998", "runs"]  # no other leftover


@pytest.mark.parametrize("policy", ["any", "optimal"])
def test_frame_head_mask_supervision_follows_the_label_policy(cache112, monkeypatch, policy):
    from training import frame_head as fh
    masks = np.asarray(cache112.masks)
    sub_only = np.flatnonzero([(m == 2).any() and not (m == 1).any() for m in masks])
    assert len(sub_only)  # the tiny set has suboptimal-only frames
    targets = []
    real = fh.F.binary_cross_entropy_with_logits

    def record(logits, target):
        if target.ndim == 4:
            targets.append(target.detach().clone())
        return real(logits, target)
    monkeypatch.setattr(fh.F, "binary_cross_entropy_with_logits", record)
    net = torch.nn.Conv2d(1, 1, 1)
    forward = lambda x: (net(x[:, None] / 255).mean((1, 2, 3)), net(x[:, None] / 255)[:, :, ::16, ::16])  # noqa: E731
    labels = cache112.binary_labels(policy)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    fh.fit_frame_classifier(net, forward, cache112, pos, neg, steps=1, batch_size=len(pos) + len(neg), lr=1e-3,
                            weight_decay=0.0, warmup=0, neg_ratio=-1, seed=0, augment=None, mask_weight=1.0,
                            label_policy=policy, progress=False)
    covered = targets[0].flatten(1).amax(1) > 0  # rows in sorted order: every cache row
    assert covered[sub_only].all() == (policy == "any") and covered[sub_only].any() == (policy == "any")


# ----------------------------------------------------------------------------- augmentation
def test_augmentation_keeps_frame_and_mask_aligned():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    masks = torch.stack([((yy - 100 - 5 * i) ** 2 / 40 ** 2 + (xx - 120) ** 2 / 60 ** 2 <= 1) for i in range(6)])
    masks = masks.to(torch.uint8)
    frames = 50.0 + 150.0 * masks
    geo = AugmentConfig(p_affine=1.0, p_intensity=0, p_noise=0, p_blur=0)
    f2, m2 = augment_batch(frames, masks, geo, g)
    assert m2.dtype == torch.uint8 and (m2 != masks).any()  # something moved
    for a, b in zip(f2 > 125, m2 > 0):
        iou = (a & b).sum() / (a | b).sum()
        assert iou > 0.95
    f3, m3 = augment_batch(frames, masks, AugmentConfig(), torch.Generator().manual_seed(1))  # full pipeline
    assert f3.min() >= 0 and f3.max() <= 255 and set(m3.unique().tolist()) <= {0, 1}
    assert (f3[m3 == 1].mean() > f3[(m3 == 0) & (f3 > 0)].mean() + 50)


def test_bad_selection_option_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--shape-power", "-1"])
    assert "--shape-power must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # whole-case choice without whole cases: refused before training
        T.parse_args(["--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--pixel-threshold-by", "case-score"])
    assert "needs --data" in capsys.readouterr().err
    for extra, says in ((["--heads", "seg,frame"], "add it with --frame-steps"),
                        (["--heads", "cls", "--frame-steps", "10"], "it needs --heads with seg"),
                        (["--frame-steps", "-1"], "--frame-warmup and --frame-mask-weight must be >= 0"),
                        (["--frame-mask-weight", "-0.5"], "--frame-mask-weight must be >= 0"),
                        (["--good-by", "frame"], "it needs --frame-steps > 0"),
                        (["--frame-views", "0,6"], "they need --frame-steps > 0"),
                        (["--frame-steps", "5", "--frame-views", "0,six"], "'six' is not a rotation in degrees"),
                        (["--frame-steps", "5", "--frame-views", "0,inf"], "the rotation must be finite"),
                        (["--frame-steps", "5", "--frame-views", "0m,0m"], "repeats a view"),
                        (["--batch-size", "0"], "--batch-size, --accum, --epochs"),
                        (["--accum", "0"], "--accum, --epochs, --val-every and --ckpt-every must be >= 1"),
                        (["--epochs", "0"], "--epochs, --val-every and --ckpt-every must be >= 1"),
                        (["--max-steps", "-1"], "--max-steps must be >= 0"),
                        (["--neg-ratio", "inf"], "--neg-ratio must be a finite number"),
                        (["--neg-ratio", "nan"], "--neg-ratio must be a finite number"),
                        (["--warmup", "3"], "--warmup is a fraction of all optimiser steps, in [0, 1)"),
                        (["--lr", "0"], "--lr must be > 0"),
                        (["--folds", "1"], "--folds must be >= 2"),
                        (["--folds", "3", "--val-fold", "3"], "--val-fold 3 is outside 0..2 (--folds 3)"),
                        (["--test-fold", "5"], "--test-fold 5 is outside 0..4"),
                        (["--test-fold", "0"], "--test-fold and --val-fold must differ")):
        with pytest.raises(SystemExit):
            T.parse_args(["--cache", str(tmp_path), "--out", str(tmp_path / "o"), *extra])
        assert says in capsys.readouterr().err, extra


def test_bad_data_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    argv = ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *SMALL]
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("[train] error: ") and "missing image folder" in err
    assert "Traceback" not in err
    monkeypatch.setenv("FETALIQA_DEBUG", "1")  # the traceback, for whoever debugs
    with pytest.raises(DataError, match="missing image folder"):
        T.main(argv)


def test_frame_views_are_parsed_from_rotations_with_m_for_mirrored(tmp_path):
    assert T.parse_views("0, 6,-6.5,0m") == ((0.0, False), (6.0, False), (-6.5, False), (0.0, True))
    assert T.parse_views([[0, False], [3, True]]) == ((0.0, False), (3.0, True))  # a preset's or args.json's list
    args = T.parse_args(["--cache", str(tmp_path), "--out", str(tmp_path / "o")])
    assert args.frame_views == ((0.0, False),) and T.model_config(args).frame_views == ((0.0, False),)
    args = T.parse_args(["--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--frame-steps", "5",
                         "--frame-views", "0,0m"])
    assert T.model_config(args).frame_views == ((0.0, False), (0.0, True))


def test_epoch_sampling_with_hard_negatives(tmp_path, capsys):
    from training.cache import INDEX_DTYPE
    # two cases x two sweeps x 10 frames; positives in case 0 sweep 0 and case 1 sweep 1
    index = np.zeros(40, INDEX_DTYPE)
    index["case"], index["sweep"] = np.repeat([0, 1], 20), np.tile(np.repeat([0, 1], 10), 2)
    lab = np.zeros(40, bool)
    lab[[3, 4, 35]] = True
    pos, neg = np.flatnonzero(lab), np.flatnonzero(~lab)
    hard = T.same_sweep_negatives(index, pos, neg)
    assert hard.tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 30, 31, 32, 33, 34, 36, 37, 38, 39]
    rows = T.epoch_rows(pos, neg, 4.0, 7, 0, hard, 0.5)
    assert len(rows) == len(set(rows.tolist())) == 3 + 12 and set(pos) <= set(rows.tolist())
    drawn = [r for r in rows if not lab[r]]
    assert sum(r in set(hard.tolist()) for r in drawn) >= 6  # 6 from the hard pool, 6 from all the rest
    assert (T.epoch_rows(pos, neg, 4.0, 7, 0, hard, 0.5) == rows).all()  # pure function of (seed, epoch)
    assert not (T.epoch_rows(pos, neg, 4.0, 7, 1, hard, 0.5) == rows).all()
    only_hard = T.epoch_rows(pos, neg, 2.0, 7, 0, hard, 1.0)
    assert set(only_hard.tolist()) - set(pos) <= set(hard.tolist()) and len(only_hard) == 9
    big = T.epoch_rows(pos, neg, 10.0, 7, 0, hard, 1.0)  # more asked than the pool holds: all of it, then the rest
    assert len(big) == 3 + 30 and set(hard.tolist()) <= set(big.tolist())
    assert sorted(T.epoch_rows(pos, neg, -1, 7, 0).tolist()) == list(range(40))  # all negatives
    for bad, msg in (("1.5", "must be in [0, 1]"), ("0.5", "needs --neg-ratio >= 0")):
        with pytest.raises(SystemExit):
            T.parse_args(["--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--hard-neg-frac", bad])
        assert msg in capsys.readouterr().err


def test_sweep_prior_counts_annotated_sweeps_of_the_given_cases():
    from training.calibrate import sweep_prior
    from training.data import CaseRecord
    rec = lambda u, ac: CaseRecord(u, u, Path("i"), Path("m"), tuple(ac))  # noqa: E731
    recs = [rec("a", [200.0, None, None, None, 180.0, None]), rec("b", [210.0, 190.0, None, None, None, None]),
            rec("c", [None] * 6), rec("d", [1.0] * 6)]
    assert sweep_prior(recs, ["a", "b", "c"]) == (0.6667, 0.3333, 0.0, 0.0, 0.3333, 0.0)
    assert sweep_prior(recs, ["c"]) is None and sweep_prior(recs, []) is None


def test_area_cut_is_exact():
    counts = np.array([0, 5, 10, 10, 40, 60, 0, 70], float)
    labels = np.array([0, 0, 1, 0, 1, 1, 0, 1], bool)
    f1, area = best_area_cut(counts, labels)
    # cut at >= 10 keeps 5 frames with 4 positives: F1 = 8 / 9; midway to the next smaller count
    assert f1 == pytest.approx(8 / 9) and area == 7.5
    assert best_area_cut(counts, np.zeros(8, bool)) == (0.0, 71.0)  # no positive: nothing is good


def test_score_threshold_is_the_f1_best_cut_of_quality_scores():
    scores = np.array([0.0, 0.002, 0.01, 0.01, 0.04, 0.06, np.nan, 0.07])
    labels = np.array([0, 0, 1, 0, 1, 1, 1, 1], bool)
    # >= 0.04: 3 frames, 3 of 5 positives (F1 6/8); >= 0.01: 5 frames, 4 positives (F1 8/10)
    assert best_cut(np.nan_to_num(scores), labels, 1e-30) == (pytest.approx(0.8), pytest.approx(0.006))
    cal = calibrate_score_threshold(scores, labels)  # nan (not scored) counts as 0: never good
    assert cal["score_threshold"] == pytest.approx(0.006) and cal["f1"] == pytest.approx(0.8)
    assert (cal["precision"], cal["recall"]) == (pytest.approx(0.8), pytest.approx(0.8))
    only_zero = calibrate_score_threshold(np.zeros(4), np.array([1, 0, 0, 0], bool))
    assert only_zero["score_threshold"] > 0 and only_zero["f1"] == 0.0  # a cut at 0 would pass every frame


def test_pixel_threshold_by_case_score_and_policies():
    from training.calibrate import PUBLISHED, choose_by_case_score, grid_name, threshold_policy
    grid = [{"pixel_threshold": t, "area_threshold": a, "score_decision": {"score_threshold": c}}
            for t, a, c in ((0.2, 0.05, 0.01), (0.3, 0.04, 0.02), (0.5, 0.03, 0.03), (0.7, 0.02, 0.04))]
    checks = {grid_name(0.2): {"score": 0.40}, grid_name(0.3): {"score": 0.52}, grid_name(0.5): {"score": 0.52},
              grid_name(0.7): {"score": 0.1}}
    assert choose_by_case_score({"pixel_threshold": 0.2, "grid": grid}, checks) == 0.5  # tie: nearer 0.5
    assert choose_by_case_score({"pixel_threshold": 0.3, "grid": grid}, checks) == 0.5
    # the one-standard-error rule on per-case scores: 0.3 leads 0.5 by 0.02 on average, but its
    # paired differences over four cases (0, 0, 0, 0.08) have a standard error of 0.02: as good, and 0.5
    # is the published threshold; a lead beyond that (0.08 on every case) moves the choice
    per_case = {0.2: [0.3, 0.4, 0.5, 0.4], 0.3: [0.5, 0.5, 0.5, 0.62], 0.5: [0.5, 0.5, 0.5, 0.54],
                0.7: [0.1, 0.1, 0.1, 0.1]}
    noisy = {grid_name(t): {"score": float(np.mean(v)), "per_case": v} for t, v in per_case.items()}
    assert choose_by_case_score({"pixel_threshold": 0.3, "grid": grid}, noisy) == 0.5
    per_case[0.3] = [0.58, 0.58, 0.58, 0.62]
    clear = {grid_name(t): {"score": float(np.mean(v)), "per_case": v} for t, v in per_case.items()}
    assert choose_by_case_score({"pixel_threshold": 0.5, "grid": grid}, clear) == 0.3
    del checks[grid_name(0.5)], checks[grid_name(0.3)]
    assert choose_by_case_score({"pixel_threshold": 0.7, "grid": grid}, checks) == 0.2  # unchecked ones skipped
    base = ModelConfig(backbone="fetalclip-small")
    sel = {"choose_from": "all", "shape_power": 1.0, "sweep_prior": (0.5,) * 6}
    p = threshold_policy(base, grid[1], sel)
    assert (p.pixel_threshold, p.area_threshold, p.score_threshold, p.sweep_prior) == (0.3, 0.04, 0.02, (0.5,) * 6)
    pub = threshold_policy(base, PUBLISHED, sel)  # no score cut: the published area rule decides
    assert (pub.pixel_threshold, pub.area_threshold, pub.score_threshold) == (0.5, 0.01, None)
    # moving the choice to another grid entry keeps the frame head's cut (the same at every pixel threshold)
    from training.calibrate import at_pixel_threshold
    n = 6
    pred = {"labels": np.array([1, 0, 0, 1, 0, 0], bool), "counts": np.zeros((n, 7)),
            "dice_by_pixel_threshold": [0.0] * 7}
    cache = type("C", (), {"size": 8})()
    cal = {"pixel_threshold": 0.2, "grid": grid, "frame_decision": {"frame_threshold": 0.4}}
    moved = at_pixel_threshold(cal, cache, pred, 0.5, chosen_by="case score")
    assert moved["frame_decision"] == {"frame_threshold": 0.4} and moved["pixel_threshold"] == 0.5
    assert moved["score_decision"] == {"score_threshold": 0.03} and moved["chosen_by"] == "case score"


def test_validation_dice_over_all_frames_and_over_annotated_frames(cache112):
    """A model marking every pixel: pooled Dice over all frames = 2T / (N S^2 + T), over the
    annotated frames only = 2T / (P S^2 + T) (T annotated pixels, P annotated frames)."""
    class Everything(torch.nn.Module):
        config = ModelConfig(backbone="fetalclip-small")

        def forward(self, x):
            return {"seg": torch.full((x.shape[0], 1, *x.shape[2:]), 10.0)}

    cache = cache112
    rows = np.arange(len(cache.index))[::-1].copy()  # any order in; sorted out
    pred = T.predict_rows(Everything(), cache, rows, device=torch.device("cpu"), batch_size=7, amp=None,
                          policy="any", frame_stats=True)
    masks = np.asarray(cache.masks[:]) > 0
    t, n, p, s2 = masks.sum(), len(rows), int(cache.binary_labels().sum()), cache.size ** 2
    assert p > 0 and np.array_equal(pred["rows"], np.sort(rows))
    np.testing.assert_allclose(pred["dice_by_pixel_threshold"], 2 * t / (n * s2 + t))
    np.testing.assert_allclose(pred["dice_on_positives_by_pixel_threshold"], 2 * t / (p * s2 + t))
    assert np.all(pred["stats"][0.5]["area"] == 1.0) and np.all(pred["counts"] == s2)


def test_seg_loss_selection_ignores_an_auxiliary_cls_head(cache112):
    """With SEG + CLS the validation loss adds the CLS BCE; --select-metric seg_loss ranks
    checkpoints by the SEG part alone (the head that decides frames). A CLS logit of 0 costs
    exactly ln 2 per frame, so loss - seg_loss = ln 2."""
    class Both(torch.nn.Module):
        config = ModelConfig(backbone="fetalclip-small", heads=("seg", "cls"))

        def forward(self, x):
            return {"seg": torch.full((x.shape[0], 1, *x.shape[2:]), 10.0), "cls": torch.zeros(x.shape[0])}

    rows = np.arange(len(cache112.index))
    pred = T.predict_rows(Both(), cache112, rows, device=torch.device("cpu"), batch_size=5, amp=None, policy="any")
    assert pred["seg_loss"] is not None
    np.testing.assert_allclose(pred["loss"] - pred["seg_loss"], np.log(2), rtol=1e-6)
    summary = T.summarise_validation(pred, Both.config, cache112.size)
    assert summary["val_seg_loss"] == pred["seg_loss"] and summary["val_loss"] == pred["loss"]
    # an overfitting CLS head lifts the total loss while the SEG loss still falls (the seg,cls
    # run's epochs 13 and 26, docs/training.md)
    ep13, ep26 = {"val_loss": 1.3816, "val_seg_loss": 0.9800}, {"val_loss": 1.3882, "val_seg_loss": 0.9737}
    assert T.selection_value(ep13, "loss") > T.selection_value(ep26, "loss")
    assert T.selection_value(ep26, "seg_loss") > T.selection_value(ep13, "seg_loss")
    assert T.selection_value({"val_loss": 0.5}, "seg_loss") == -0.5  # CLS-only models: the loss


def test_case_scores_put_cached_frames_back_at_their_stack_positions():
    """Calibration scores cached frames as the pipeline scores the whole stack: temporal
    support within the sweep and the sweep prior, frames not cached counting as unscored."""
    from fetaliqa.select import seg_scores
    cfg = ModelConfig(backbone="fetalclip-small", shape_power=1.0, temporal_window=2,
                      sweep_prior=(1.0, 0.5, 0.25, 0.1, 0.1, 0.05))
    rng = np.random.default_rng(0)
    fps = 5
    full = {k: rng.random(30).astype(np.float32) for k in ("area", "mean_fg", "shape")}
    keep = np.r_[0:5, 10:15, 25:30]  # case 7: sweeps 1, 3 and 6 cached (published selection)
    other = {k: rng.random(30).astype(np.float32) for k in full}  # case 2: the whole stack
    stats = {k: np.r_[other[k], full[k][keep]] for k in full}
    case, frame = np.r_[np.full(30, 2), np.full(15, 7)], np.r_[np.arange(30), keep]
    got = case_scores(cfg, stats, case, frame, {2: fps, 7: fps})
    sparse = {k: np.where(np.isin(np.arange(30), keep), v, np.nan) for k, v in full.items()}
    want_2 = seg_scores(other["area"], other["mean_fg"], 2, fps, shape=other["shape"], shape_power=1.0,
                        sweep_prior=cfg.sweep_prior)
    want_7 = seg_scores(sparse["area"], sparse["mean_fg"], 2, fps, shape=sparse["shape"], shape_power=1.0,
                        sweep_prior=cfg.sweep_prior)[keep]
    np.testing.assert_allclose(got[:30], want_2, rtol=1e-6)
    np.testing.assert_allclose(got[30:], want_7, rtol=1e-6)
    # frame 14, the last of sweep 3: support from frames 12-14 only (the window stops at the sweep's end)
    raw = sparse["area"] * sparse["mean_fg"] * sparse["shape"]
    assert got[39] == pytest.approx(0.25 * (raw[14] + raw[12:15].mean()) / 2, rel=1e-5)


def test_case_scores_with_a_frame_head():
    from fetaliqa.select import seg_scores
    cfg = ModelConfig(backbone="fetalclip-small", heads=("seg", "frame"), temporal_window=1)
    rng = np.random.default_rng(1)
    stats = {k: rng.random(12).astype(np.float32) for k in ("area", "mean_fg", "shape")}
    prob = rng.random(12).astype(np.float32)
    case, frame = np.zeros(12, int), np.arange(12)
    got = case_scores(cfg, stats, case, frame, {0: 2}, prob)
    np.testing.assert_allclose(got, seg_scores(stats["area"], stats["mean_fg"], 1, 2, frame_prob=prob), rtol=1e-6)
    assert not np.allclose(got, seg_scores(stats["area"], stats["mean_fg"], 1, 2), rtol=1e-3)
    with pytest.raises(ValueError, match="needs its frame_prob"):
        case_scores(cfg, stats, case, frame, {0: 2})


# ----------------------------------------------------------------------------- loop
@pytest.mark.parametrize("stem", [[], ["--stem", "conv", "--patch-size", "16"]], ids=["patch", "conv"])
def test_few_steps_lower_the_loss(cache112, stem):
    cache = cache112
    torch.manual_seed(0)
    args = T.parse_args(["--cache", str(cache.root), "--out", "x", "--encoder", "full", "--image-size", "112", *SMALL,
                         *stem])
    model = T.make_model(args)
    rows = np.flatnonzero(cache.binary_labels())[:2]
    x = normalize(torch.from_numpy(np.asarray(cache.frames[rows])).float())
    seg_t, cls_t = T.targets(torch.from_numpy(np.asarray(cache.masks[rows])),
                             torch.from_numpy(cache.index["label"][rows].astype(np.int64)), "any")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        loss = T.compute_loss(model(x), seg_t, cls_t, "dice_bce")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.02, losses


def _steps(out: Path) -> list[tuple]:
    rows = map(json.loads, (out / "steps.jsonl").read_text().splitlines())
    return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in rows]


RUN = ["--image-size", "112", "--encoder", "full", "--epochs", "2", "--batch-size", "4", "--neg-ratio", "0",
       "--label-policy", "optimal", "--val-max-frames", "4", "--case-check", "0", "--lr", "1e-3", "--loss", "dice_bce"]


def test_resume_continues_exactly_and_export_round_trip(tiny, cache112, tmp_path, capsys):
    cache = cache112
    common = ["--data", str(tiny), "--cache", str(cache.root), *SMALL, *RUN]
    assert T.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert T.main([*common, "--out", str(tmp_path / "b"), "--max-steps", "3", "--no-export"]) == 0
    assert len(_steps(tmp_path / "b")) == 3 and not (tmp_path / "b/model").exists()
    assert T.main([*common, "--out", str(tmp_path / "b"), "--resume", "--no-export"]) == 0
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert len(a) == 4 and a == b  # same losses and learning rates, bit for bit
    # a --resume under other training settings, or another split, is refused in one line, the run untouched
    last, args_json = (tmp_path / "b/last.pt").read_bytes(), (tmp_path / "b/args.json").read_text()
    for extra, says in ((["--lr", "5e-4", "--batch-size", "2"], "written with --batch-size 4 (now 2); --lr 0.001 "
                                                                "(now 0.0005): give the same settings"),
                        (["--seed", "7", "--run-seed", "0"], "split.json was made with --seed 0 (now 7); give the "
                                                             "same split options"),
                        (["--seed", "7"], "--run-seed 0 (now 7)"),
                        (["--folds", "4", "--val-fold", "1"], "made with --folds 3 (now 4), --val-fold 0 (now 1);")):
        assert T.main([*common, "--out", str(tmp_path / "b"), "--resume", "--no-export", *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert (tmp_path / "b/last.pt").read_bytes() == last and _steps(tmp_path / "b") == b
    assert (tmp_path / "b/args.json").read_text() == args_json  # the run's record names what it ran with
    # export -> load -> same predictions as the best checkpoint in memory
    args = T.parse_args([*common, "--out", str(tmp_path / "a")])
    model = T.make_model(args)
    T.load_trainable_state(model, torch.load(tmp_path / "a/best.pt", weights_only=False)["model"])
    model.eval()
    exported = load_exported(tmp_path / "a/model")
    x = normalize(torch.from_numpy(np.array(cache.frames[:3])).float())
    with torch.no_grad():
        torch.testing.assert_close(exported(x)["seg"], model(x)["seg"], atol=1e-5, rtol=0)
    meta = json.loads((tmp_path / "a/model/model.json").read_text())
    cal = json.loads((tmp_path / "a/calibration.json").read_text())
    assert meta["config"]["pixel_threshold"] == cal["pixel_threshold"]
    assert meta["config"]["area_threshold"] == cal["area_threshold"]
    # the frame decision by quality score, its cut calibrated on the same validation frames;
    # the pixel threshold then serves the masks: best Dice on the annotated frames
    dec = cal["score_decision"]
    best = max(cal["grid"], key=lambda g: (round(g["mask_dice"], 6), -abs(g["pixel_threshold"] - 0.5)))
    assert meta["config"]["pixel_threshold"] == best["pixel_threshold"]
    assert meta["config"]["area_threshold"] == best["area_threshold"]
    assert meta["config"]["score_threshold"] == dec["score_threshold"] > 0 and 0 <= dec["f1"] <= 1
    # selection stored with the model: shape factor on, sweep prior = the training cases' annotated sweeps
    train_uuids = set(json.loads((tmp_path / "a/split.json").read_text())["train"])
    acs = [r.ac_mm for r in read_release(tiny) if r.uuid in train_uuids]
    expect = [round(float(np.mean([a[k] is not None for a in acs])), 4) for k in range(6)]
    assert meta["config"]["shape_power"] == 1.0 and meta["config"]["sweep_prior"] == expect
    assert exported.config.sweep_prior == tuple(expect)
    prov = meta["provenance"]
    assert prov["training"]["encoder"] == "full" and prov["split"]["val_cases"] == 2
    assert (tmp_path / "a/model.tar.gz").stat().st_size > 0 and (tmp_path / "a/epochs.csv").exists()


def test_frame_head_stage_trains_calibrates_exports_and_is_reused_on_resume(tiny, cache112, tmp_path, capsys):
    """--frame-steps: after the SEG head, a FrameHead is fitted on the training cases, joins the
    exported model, and the quality-score cut is calibrated with its probability; a --resume of
    the finished run loads it from OUT/frame_head.pt instead of training it again."""
    from fetaliqa.metrics import frame_metrics
    cache, out = cache112, tmp_path / "f"
    common = ["--data", str(tiny), "--cache", str(cache.root), *SMALL, *RUN, "--label-policy", "any",
              "--neg-ratio", "1", "--frame-steps", "40", "--frame-batch-size", "8", "--frame-warmup", "5"]
    assert T.main([*common, "--out", str(out)]) == 0
    assert "frame head: 40 steps in" in capsys.readouterr().err
    m = load_exported(out / "model")
    assert m.config.heads == ("seg", "frame")
    saved = torch.load(out / "frame_head.pt", weights_only=False)
    assert all(torch.equal(v, m.frame_head.state_dict()[k]) for k, v in saved["state"].items())
    prov = json.loads((out / "model/model.json").read_text())["provenance"]["training"]["frame_head"]
    assert prov["steps"] == 40 and prov["settings"]["batch_size"] == 8 and prov["settings"]["positives"] == 16
    x = normalize(torch.from_numpy(np.array(cache.frames[:])).float())
    with torch.no_grad():
        prob = torch.sigmoid(m.frame_head(x)).numpy()
    assert frame_metrics(prob, cache.binary_labels("any"), 0.5)["auroc"] > 0.9  # the tiny set's bright disks
    # the exported score cut is the F1-best cut of quality scores that include the head's probability
    rows = cache.rows_of(Split.load(out / "split.json").val)
    pred = T.predict_rows(m, cache, rows, device=torch.device("cpu"), batch_size=8, amp=None, policy="any",
                          frame_stats=True)
    idx = cache.index[pred["rows"]]
    fps = {int(c): int(cache.cases[int(c)]["frames_per_sweep"]) for c in np.unique(idx["case"])}
    q = case_scores(m.config, pred["stats"][m.config.pixel_threshold], idx["case"], idx["frame"], fps,
                    pred["frame_prob"])
    cut = calibrate_score_threshold(q, pred["labels"])["score_threshold"]
    assert cut == pytest.approx(m.config.score_threshold, rel=1e-5)
    weights = (out / "model/model.safetensors").read_bytes()
    assert T.main([*common, "--out", str(out), "--resume"]) == 0
    assert "frame head: loaded" in capsys.readouterr().err
    assert (out / "model/model.safetensors").read_bytes() == weights
    assert T.main([*common, "--out", str(out), "--resume", "--frame-steps", "20"]) == 0  # other settings: trained
    assert "frame head: 20 steps in" in capsys.readouterr().err
    # mask supervision: its cell convolution trains with the head and is not exported
    assert T.main([*common, "--out", str(out), "--resume", "--frame-steps", "20", "--frame-mask-weight", "1"]) == 0
    assert "mask supervision x 1" in capsys.readouterr().err
    supervised = load_exported(out / "model")
    assert supervised.state_dict().keys() == m.state_dict().keys()
    prov = json.loads((out / "model/model.json").read_text())["provenance"]["training"]["frame_head"]
    assert prov["settings"]["mask_weight"] == 1.0 and prov["steps"] == 20
    # --good-by frame: the same head (loaded), and frames are good by its smoothed probability above the
    # F1-best cut of the validation frames, put back at their stack positions; the score cut stays beside it
    assert T.main([*common, "--out", str(out), "--resume", "--frame-steps", "20", "--frame-mask-weight", "1",
                   "--good-by", "frame", "--mask-window", "1", "--ellipse-mask", "--frame-views", "0,0m"]) == 0
    err = capsys.readouterr().err
    assert "frame head: loaded" in err and "good by frame head >= " in err  # views do not retrain the head
    by_head = load_exported(out / "model")
    assert by_head.config.mask_window == 1 and by_head.config.ellipse_mask  # the mask settings are exported
    # the head's views too; calibration below cut the frame probabilities those views give
    assert by_head.config.frame_views == ((0.0, False), (0.0, True))
    assert torch.equal(by_head.frame_head[-2].weight, supervised.frame_head[-2].weight)
    cal = json.loads((out / "calibration.json").read_text())
    pred = T.predict_rows(by_head, cache, rows, device=torch.device("cpu"), batch_size=8, amp=None, policy="any",
                          frame_stats=True)
    # the window counts frames at the challenge's 140 per sweep: these 4-frame sweeps are smoothed over
    # 2 x 4 / 140 frames (their neighbours weigh 0.057), not +-2 frames
    assert by_head.config.window_frames_per_sweep == 140 and by_head.config.window_at(4) == pytest.approx(2 / 35)
    values = case_frame_decision(by_head.config, pred["frame_prob"], idx["case"], idx["frame"], fps)
    unscaled = case_frame_decision(dataclasses.replace(by_head.config, window_frames_per_sweep=None),
                                   pred["frame_prob"], idx["case"], idx["frame"], fps)
    assert not np.allclose(values, unscaled, equal_nan=True)
    want = calibrate_score_threshold(values, pred["labels"], key="frame_threshold")
    assert cal["frame_decision"] == pytest.approx(want) and by_head.config.frame_threshold == pytest.approx(
        want["frame_threshold"])
    assert by_head.config.score_threshold == pytest.approx(cal["score_decision"]["score_threshold"])


def test_run_seed_replicates_on_the_same_split(tiny, cache112, tmp_path):
    """--run-seed reseeds initialisation, sampling and augmentation, not the split: replicates of
    one recipe on the same data; without it everything follows --seed, as before."""
    common = ["--data", str(tiny), "--cache", str(cache112.root), *SMALL, *RUN, "--max-steps", "2", "--no-export"]
    for name, extra in (("a", []), ("same", ["--run-seed", "0"]), ("other", ["--run-seed", "1"]),
                        ("split", ["--seed", "1"])):
        assert T.main([*common, "--out", str(tmp_path / name), *extra]) == 0
    split = {n: json.loads((tmp_path / n / "split.json").read_text()) for n in ("a", "same", "other", "split")}
    steps = {n: _steps(tmp_path / n) for n in ("a", "same", "other")}
    assert steps["same"] == steps["a"] and split["same"] == split["a"]
    assert split["other"] == split["a"] and [s[2] for s in steps["other"]] != [s[2] for s in steps["a"]]
    assert split["split"] != split["a"]  # --seed alone still draws another split
    assert json.loads((tmp_path / "other/args.json").read_text())["run_seed"] == 1


def test_cls_threshold_is_calibrated_not_the_published_half(tiny, cache112, tmp_path, capsys):
    out = tmp_path / "cls"
    common = ["--data", str(tiny), "--cache", str(cache112.root), *SMALL, *RUN, "--label-policy", "any",
              "--neg-ratio", "1", "--heads", "seg,cls", "--epochs", "1"]
    assert T.main([*common, "--out", str(out)]) == 0
    assert "CLS good >= " in capsys.readouterr().err
    m, cal = load_exported(out / "model"), json.loads((out / "calibration.json").read_text())
    rows = cache112.rows_of(Split.load(out / "split.json").val)
    pred = T.predict_rows(m, cache112, rows, device=torch.device("cpu"), batch_size=8, amp=None, policy="any")
    want = calibrate_score_threshold(pred["cls_prob"], pred["labels"], key="cls_threshold")
    assert cal["cls_decision"] == pytest.approx(want)
    assert m.config.cls_threshold == pytest.approx(want["cls_threshold"]) != 0.5
    from training.calibrate import PUBLISHED, threshold_policy
    assert threshold_policy(m.config, PUBLISHED).cls_threshold == 0.5  # the published baseline stays published


def test_torchrun_two_processes(cache112, tmp_path):
    cache = cache112
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--cache", str(cache.root), "--out", str(out), *SMALL, *RUN,
           "--max-steps", "2", "--no-export", "--neg-ratio", "1", "--hard-neg-frac", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s[0] for s in _steps(out)] == [1, 2] and " hard)" in res.stderr
    ck = torch.load(out / "last.pt", weights_only=False)
    assert len(ck["rng"]) == 2 and ck["step"] == 2


def test_fetalclip_checkpoint_path_lora(tiny, cache, tmp_path):
    """The real path's arguments (--weights, LoRA r=8/alpha=16) with a random checkpoint in
    FetalCLIP's key format (module./visual. prefixes, text keys, state_dict wrapper)."""
    from fetaliqa.model.backbone import build_vision_tower
    torch.manual_seed(5)
    visual = build_vision_tower(ModelConfig(backbone="fetalclip-small")).state_dict()
    write_fetalclip_checkpoint(tmp_path / "FetalCLIP_weights.pt", visual)
    out = tmp_path / "lora"
    assert T.main(["--data", str(tiny), "--cache", str(cache.root), *SMALL, "--weights",
                   str(tmp_path / "FetalCLIP_weights.pt"), "--epochs", "1", "--batch-size", "8",
                   "--neg-ratio", "0", "--val-max-frames", "4", "--case-check", "1", "--pixel-threshold-by",
                   "case-score", "--out", str(out)]) == 0
    args = json.loads((out / "args.json").read_text())
    assert (args["encoder"], args["lora_r"], args["lora_alpha"], args["lr"]) == ("lora", 8, 16, 3e-4)
    ck = torch.load(out / "last.pt", weights_only=False)
    assert any("lora_B" in k for k in ck["model"]) and not any(k.endswith("conv1.weight") for k in ck["model"])
    assert len(_steps(out)) == 2
    # merged export: base weights + trained adapters; the frozen patch embedding is the file's
    m = load_exported(out / "model")
    torch.testing.assert_close(m.encoder.conv1.weight, visual["conv1.weight"])
    lora_b = [v for k, v in ck["model"].items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # adapters trained
    # pixel threshold by whole-case challenge score: every grid value replayed on the checked case
    cal = json.loads((out / "calibration.json").read_text())
    names = {f"pixel {g['pixel_threshold']:.1f}" for g in cal["grid"]}
    assert set(cal["case_check"]) == {"published", "calibrated"} | names and cal["chosen_by"] == "case score"
    best = max(cal["case_check"][n]["score"] for n in names)
    chosen = cal["case_check"][f"pixel {cal['pixel_threshold']:.1f}"]["score"]
    assert chosen == best == cal["case_check"]["calibrated"]["score"]
    assert m.config.pixel_threshold == cal["pixel_threshold"] and m.config.area_threshold == cal["area_threshold"]
    assert m.config.score_threshold == cal["score_decision"]["score_threshold"]


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_and_compare_rules_on_simulated_cases(tmp_path, capsys):
    from fetaliqa.model import build_model, export_model
    from training import evaluate

    torch.manual_seed(0)
    model_dir = tmp_path / "m"
    export_model(build_model(ModelConfig(backbone="fetalclip-small", decoder_width=8, area_threshold=0.05)).eval(),
                 model_dir, {"simulation": {"seed": 5, "cases": 3}})
    common = ["--model", str(model_dir), "--cases", "2", "--frames-per-sweep", "6", "--seed", "77"]
    assert evaluate.main([*common, "--seed", "5"]) == 2  # training seeds are refused
    assert "reuses training cases" in capsys.readouterr().err
    for bad, says in ((["--cases", "0"], "--cases, --batch-size and --workers must be >= 1"),
                      (["--frames-per-sweep", "1"], "--frames-per-sweep must be >= 2"),
                      (["--model", str(tmp_path / "nope")], "not an exported fetaliqa model"),
                      (["--out", str(model_dir / "model.json" / "x")], "cannot write there")):
        with pytest.raises(SystemExit):  # refused before any case is evaluated
            evaluate.main([*common, *bad])
        assert says in capsys.readouterr().err
    assert evaluate.main([*common, "--data", str(tmp_path)]) == 2  # not the release layout: one line
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert evaluate.main([*common, "--compare", "--out", str(tmp_path / "one")]) == 0
    assert evaluate.main([*common, "--workers", "2", "--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one/summary.json").read_text())
    two = json.loads((tmp_path / "two/summary.json").read_text())
    assert one["frames"] == 2 * 36 and one["challenge"] == two["challenge"] and one["frame"] == two["frame"]
    assert (tmp_path / "one/per_case.csv").read_text().splitlines()[1].split(",")[:9] == \
        (tmp_path / "two/per_case.csv").read_text().splitlines()[1].split(",")[:9]
    table = {t["rule"]: t for t in one["compare"]}
    assert set(table) == set(evaluate.RULES)
    own = table["model"]  # the rule "model" is the pipeline's own choice, replayed
    assert own["same_frame_or_wfss"] == 1.0 and own["score"] == pytest.approx(one["challenge"]["score"])
    assert own["frames_scored"] == 36 and table["fast search (default)"]["frames_scored"] <= 36
    out = capsys.readouterr().out
    assert "| selection rule |" in out and "| largest area |" in out
    rows = (tmp_path / "one/compare_per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(evaluate.RULES) and rows[0].startswith("case,rule,frame")
    fr = np.load(tmp_path / "one/frames.npz")  # per-frame statistics behind the frame metrics
    assert len(fr["label"]) == 72 and list(fr["case"][[0, 36]]) == [0, 1] and fr["sweep"][35] == 5
    lab, good = fr["label"] > 0, fr["good"]
    f1 = 2 * (lab & good).sum() / max(1, lab.sum() + good.sum())
    assert f1 == pytest.approx(one["frame"]["f1"])
    assert np.array_equal(good, fr["area"] >= 0.05)  # good = area above the model's area threshold
    assert "frame_area_rule" not in one
    # a model deciding by quality score: good = q >= its cut; the area rule reported beside it.
    # At pixel threshold 0.2 every pixel of this untrained model is foreground, so the score
    # follows the sweep prior: only sweep 1 passes the cut, while every frame passes the area rule.
    meta = json.loads((model_dir / "model.json").read_text())
    meta["config"].update(pixel_threshold=0.2, sweep_prior=[1, 0.5, 0.25, 0.1, 0.1, 0.05], score_threshold=0.3)
    (model_dir / "model.json").write_text(json.dumps(meta))
    assert evaluate.main([*common, "--out", str(tmp_path / "three")]) == 0
    fr3, three = np.load(tmp_path / "three/frames.npz"), json.loads((tmp_path / "three/summary.json").read_text())
    assert np.array_equal(fr3["good"], fr3["q"] >= 0.3) and set(fr3["sweep"][fr3["good"]]) == {0}
    by_area = fr3["area"] >= 0.05
    assert by_area.sum() > fr3["good"].sum() > 0
    lab = fr3["label"] > 0
    assert three["frame_area_rule"]["f1"] == pytest.approx(2 * (by_area & lab).sum() / (by_area.sum() + lab.sum()))
    # the hindsight bound: the best F1 of any cut on q over these frames, by brute force
    ceiling = max(2 * (lab & (fr3["q"] >= t)).sum() / (lab.sum() + (fr3["q"] >= t).sum())
                  for t in np.unique(fr3["q"][fr3["q"] > 0]))
    assert three["frame"]["f1_best_cut"] == pytest.approx(ceiling) and ceiling >= three["frame"]["f1"]
    out = capsys.readouterr().out
    assert "frame decision by area alone" in out and f"best cut on the decision's value for these very frames " \
        f"(hindsight; no cut on it does better): {ceiling:.3f}" in out
    assert np.array_equal(fr3["decision"], fr3["q"])  # the quality score is what this model's decision cuts
    # where the false positives lie, from the simulator's geometry of the same frames
    fp = fr3["good"] & ~lab
    w = three["false_positives"]
    assert w["frames"] == fp.sum() > 0 and w["near_miss"] == pytest.approx(fr3["near_miss"][fp].mean())
    assert w["level_ge_1"] == pytest.approx(np.mean(fr3["level"][fp] >= 1))
    assert w["in_annotated_sweep"] == pytest.approx(np.mean([lab[fr3["case"] == c].reshape(6, -1)[0].any()
                                                             for c in fr3["case"][fp]]))  # all in sweep 1
    # a model with a frame head deciding by its smoothed probability: good, the ranking metrics and the
    # hindsight cut follow that value; the quality-score decision is reported beside it
    from fetaliqa.metrics import frame_metrics
    from fetaliqa.select import frame_decision
    torch.manual_seed(1)
    export_model(build_model(ModelConfig(backbone="fetalclip-small", decoder_width=8, heads=("seg", "frame"),
                                         score_threshold=0.3, frame_threshold=0.5)).eval(),
                 tmp_path / "mf", {"simulation": {"seed": 5, "cases": 3}})
    assert evaluate.main(["--model", str(tmp_path / "mf"), *common[2:], "--out", str(tmp_path / "four")]) == 0
    fr4 = np.load(tmp_path / "four/frames.npz")
    want = np.concatenate([np.nan_to_num(frame_decision(fr4["frame_prob"][fr4["case"] == c], 2, 6), nan=-1)
                           for c in (0, 1)])
    np.testing.assert_allclose(fr4["decision"], want, rtol=1e-6)
    assert np.array_equal(fr4["good"], fr4["decision"] >= 0.5)
    cut = float(np.median(fr4["decision"]))  # random weights: every frame near one probability; cut among them
    meta = json.loads((tmp_path / "mf/model.json").read_text())
    meta["config"]["frame_threshold"] = cut
    (tmp_path / "mf/model.json").write_text(json.dumps(meta))
    assert evaluate.main(["--model", str(tmp_path / "mf"), *common[2:], "--out", str(tmp_path / "four")]) == 0
    fr4, four = np.load(tmp_path / "four/frames.npz"), json.loads((tmp_path / "four/summary.json").read_text())
    lab4 = fr4["label"] > 0
    assert np.array_equal(fr4["good"], fr4["decision"] >= cut) and 0 < fr4["good"].sum() < len(lab4)
    assert four["frame"]["auroc"] == pytest.approx(frame_metrics(fr4["decision"], lab4, np.inf)["auroc"])
    by_q = fr4["q"] >= 0.3
    assert four["frame_score_rule"]["f1"] == pytest.approx(2 * (by_q & lab4).sum() / (by_q.sum() + lab4.sum()))
    assert "frame decision by quality score (score >= 0.3)" in capsys.readouterr().out


def test_geometry_options_rebuild_random_init_backbones_only(tmp_path):
    base = ["--backbone", "fetalclip-small", "--cache", str(tmp_path), "--out", str(tmp_path / "o")]
    cfg = T.model_config(T.parse_args([*base, "--image-size", "112", "--patch-size", "8"]))
    assert cfg.image_size == 112 and cfg.vision_cfg()["patch_size"] == 8 and cfg.vision_cfg()["image_size"] == 112
    model = T.make_model(T.parse_args([*base, "--image-size", "112", "--patch-size", "8", "--decoder-width", "8"]))
    assert model.encoder.conv1.kernel_size == (8, 8)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 112, 112))["seg"].shape == (1, 1, 112, 112)
    with pytest.raises(ValueError, match="pretrained"):
        T.model_config(T.parse_args([*base, "--patch-size", "8", "--weights", str(tmp_path / "w.pt")]))
    conv = T.make_model(T.parse_args([*base, "--image-size", "112", "--patch-size", "16", "--stem", "conv",
                                      "--decoder-width", "8", "--encoder", "full"]))
    assert conv.config.stem == "conv" and conv.encoder.grid_size == (7, 7)
    assert all(p.requires_grad for p in conv.encoder.conv1.parameters())  # trained from scratch with the rest
    with torch.no_grad():
        assert conv(torch.zeros(1, 3, 112, 112))["seg"].shape == (1, 1, 112, 112)
    with pytest.raises(ValueError, match="--stem conv: pretrained"):
        T.model_config(T.parse_args([*base, "--stem", "conv", "--patch-size", "16", "--weights", str(tmp_path)]))
