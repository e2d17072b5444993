"""Official ACOUSLIC-AI metrics on tiny hand-computed cases (MONAI style), quirks, ITK parity."""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from fetaliqa.measure import official_circumference_mm
from fetaliqa.metrics import (
    OFFICIAL_EMPTY_HAUSDORFF, CaseScore, aggregate, challenge_score, dice, frame_metrics, hausdorff_px, score_case,
    summarise_gt,
)

R, C, FPS = 40, 50, 20  # tiny frames; 2 sweeps of 20 frames unless said otherwise


def square(r0, c0, n, shape=(R, C)):
    m = np.zeros(shape, np.uint8)
    m[r0:r0 + n, c0:c0 + n] = 1
    return m


def volume(frames=2 * FPS, **labelled):
    gt = np.zeros((frames, R, C), np.uint8)
    for f, (label, mask) in labelled.items():
        gt[int(f[1:])][mask != 0] = label
    return gt


def itk(a):
    return sitk.GetImageFromArray(np.ascontiguousarray(a).astype(np.uint8))


def test_dice_hand_computed():
    a = np.array([[1, 1], [1, 1]])
    b = np.array([[1, 1], [0, 0]])
    assert dice(a, b) == pytest.approx(2 * 2 / 6)  # 2|A&B| / (|A|+|B|)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == math.inf  # ITK's 0/0
    assert dice(np.zeros((2, 2)), np.zeros((2, 2)), empty=1.0) == 1.0


def test_hausdorff_hand_computed():
    a, b = np.zeros((6, 6)), np.zeros((6, 6))
    a[0, 0] = 1
    b[3, 4] = 1
    assert hausdorff_px(a, b) == 5.0
    b[0, 1] = 1  # a's pixel is now 1 away, but b's (3, 4) is still 5 away from a
    assert hausdorff_px(a, b) == 5.0
    assert hausdorff_px(a, np.zeros((6, 6))) == math.inf


@pytest.mark.parametrize("seed", range(4))
def test_dice_and_hausdorff_match_itk(seed):
    rng = np.random.default_rng(seed)
    a = (rng.random((30, 40)) < 0.2).astype(np.uint8)
    b = (rng.random((30, 40)) < 0.2 + 0.1 * seed).astype(np.uint8)
    lom = sitk.LabelOverlapMeasuresImageFilter()
    lom.Execute(itk(a), itk(b))
    assert dice(a, b) == lom.GetDiceCoefficient()  # bit-exact
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(itk(a), itk(b))
    assert hausdorff_px(a, b) == pytest.approx(hd.GetHausdorffDistance(), abs=1e-9)


def test_ring_vs_disk_hausdorff_uses_all_pixels_like_itk():
    # Surface-only Hausdorff would differ here (the disk's centre is far from the ring).
    yy, xx = np.mgrid[:41, :41]
    rr = np.hypot(yy - 20, xx - 20)
    ring, full = (np.abs(rr - 15) < 1).astype(np.uint8), (rr <= 16).astype(np.uint8)
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(itk(ring), itk(full))
    assert hausdorff_px(ring, full) == pytest.approx(hd.GetHausdorffDistance(), abs=1e-9)
    assert hausdorff_px(ring, full) > 13


@pytest.mark.parametrize("frame, gt_labels, expected", [
    (3, {"f3": 1, "f9": 2}, 1.0),      # optimal chosen
    (9, {"f3": 1, "f9": 2}, 0.6),      # suboptimal chosen while an optimal exists
    (9, {"f9": 2}, 1.0),               # suboptimal chosen, no optimal anywhere
    (5, {"f3": 1, "f9": 2}, 0.0),      # unannotated frame
    (-1, {"f3": 1}, 0.0),              # no frame although one exists
    (4, {}, 0.0),                      # nothing annotated at all: 0 whatever is chosen
    (-1, {}, 0.0),
])
def test_wfss_table(frame, gt_labels, expected):
    gt = volume(**{f: (label, square(10, 10, 8)) for f, label in gt_labels.items()})
    s = score_case(gt, [None] * 2, frame, np.zeros((2 * FPS, R, C), np.uint8), frames_per_sweep=FPS)
    assert s.wfss == expected


def test_wfss_frame_with_both_labels_counts_optimal():
    gt = volume(f3=(2, square(5, 5, 10)))
    gt[3, 20:25, 20:25] = 1  # frame max is 2, label 1 hides inside
    assert summarise_gt(gt).has_optimal
    gt2 = volume(f8=(2, square(5, 5, 10)), f3=(2, square(5, 5, 10)))
    gt2[3, 20:25, 20:25] = 1
    assert score_case(gt2, [None] * 2, 8, np.zeros((R, C)), frames_per_sweep=FPS).wfss == 0.6


def test_nae_and_reference_sweep():
    mask = np.zeros((R, C), np.uint8)
    mask[8:30, 10:40] = 1
    ac = official_circumference_mm(mask)  # whole-frame FOV for a 40x50 frame
    gt = volume(f25=(1, mask))
    s = score_case(gt, [100.0, 2 * ac], 25, mask, frames_per_sweep=FPS)  # frame 25 -> sweep 2
    assert s.ac_ref_mm == 2 * ac and s.ac_pred_mm == pytest.approx(ac)
    assert s.nae_ac == pytest.approx(0.5)
    assert s.dice == 1.0 and s.dice_soft == 1.0 and s.hausdorff == 0.0 and s.wfss == 1.0
    assert s.score == pytest.approx(0.5 * 0.5 + 0.25 + 0.25)
    assert score_case(gt, [100.0, ac / 2], 25, mask, frames_per_sweep=FPS).nae_ac == pytest.approx(0.5)  # / ac_pred
    assert score_case(gt, [100.0, None], 25, mask, frames_per_sweep=FPS).nae_ac == 1.0
    assert score_case(gt, [100.0, 120.0], 25, np.zeros_like(mask), frames_per_sweep=FPS).nae_ac == 1.0
    vol = np.zeros_like(gt)
    vol[25] = mask
    assert score_case(gt, [100.0, 2 * ac], 25, vol, frames_per_sweep=FPS) == s  # 3D == 2D


def test_soft_dice_earlier_side_quirk():
    pred = square(10, 10, 10)
    gt = volume(f2=(1, square(10, 10, 10)), f6=(1, square(10, 15, 10)))
    s = score_case(gt, [None] * 2, 5, pred, frames_per_sweep=FPS)
    assert s.dice == 0.0 and s.soft_frame == 2  # frame 6 is closer, but the earlier side wins
    assert s.dice_soft == pytest.approx(1.0 * (1 - 3 / 15))
    assert "soft_earlier_side" in s.flags
    c = score_case(gt, [None] * 2, 5, pred, frames_per_sweep=FPS, mode="corrected")
    assert c.soft_frame == 6 and c.dice_soft == pytest.approx(0.5 * (1 - 1 / 15))
    assert c.flags == []
    # only a later frame: no quirk
    s = score_case(volume(f6=(1, square(10, 10, 10))), [None] * 2, 5, pred, frames_per_sweep=FPS)
    assert s.soft_frame == 6 and s.dice_soft == pytest.approx(14 / 15) and s.flags == []


def test_soft_dice_window_and_sweep_bounds():
    pred = square(10, 10, 10)
    for dist, weight in [(14, 1 / 15), (15, 0.0)]:
        s = score_case(volume(f1=(1, pred)), [None] * 2, 1 + dist, pred, frames_per_sweep=FPS)
        assert s.dice_soft == pytest.approx(weight)
    # annotated frame 21 belongs to sweep 2: not searched from frame 18 (sweep 1)
    s = score_case(volume(f21=(1, pred)), [None] * 2, 18, pred, frames_per_sweep=FPS)
    assert s.soft_frame is None and s.dice_soft == 0.0
    # GT present on f: no search, soft = hard
    gt = volume(f5=(1, square(10, 15, 10)), f4=(1, pred))
    s = score_case(gt, [None] * 2, 5, pred, frames_per_sweep=FPS)
    assert s.dice_soft == s.dice == pytest.approx(0.5)


def test_soft_dice_uses_unmasked_gt_and_masked_pred():
    fov = np.ones((R, C), bool)
    fov[:, 30:] = False
    gt = volume(f5=(1, square(10, 30, 10)), f4=(1, square(10, 20, 20)))  # f5 lies outside the FOV
    pred = square(10, 20, 20)
    s = score_case(gt, [None] * 2, 5, pred, fov=fov, frames_per_sweep=FPS)
    # GT on f5 is empty inside the FOV -> soft search finds f4, compared unmasked with the masked pred
    assert s.dice == 0.0 and s.soft_frame == 4
    assert s.dice_soft == pytest.approx(2 * 200 / (400 + 200) * (14 / 15))


def test_empty_vs_empty_is_inf_and_propagates():
    gt = volume(f3=(1, square(10, 10, 10)))
    s = score_case(gt, [None] * 2, 10, np.zeros((R, C)), frames_per_sweep=FPS)
    assert s.dice == math.inf and s.dice_soft == math.inf and s.hausdorff == OFFICIAL_EMPTY_HAUSDORFF == 744 * 15
    assert s.flags == ["dice_inf_empty"]
    agg = aggregate([s, score_case(gt, [None] * 2, 3, square(10, 10, 10), frames_per_sweep=FPS)])
    assert agg["dice"]["mean"] == math.inf and agg["score"]["mean"] == math.inf
    assert agg["flags"] == {"dice_inf_empty": 1}
    c = score_case(gt, [None] * 2, 10, np.zeros((R, C)), frames_per_sweep=FPS, mode="corrected")
    assert c.dice == 1.0 and math.isnan(c.hausdorff) and c.flags == []


def test_official_hausdorff_stand_ins():
    # the evaluator's own rules where a side is empty (not ranked, not flagged)
    gt = volume(f2=(1, square(10, 10, 10)), f6=(1, square(10, 15, 10)))
    assert score_case(gt, [None] * 2, 2, np.zeros((R, C)), frames_per_sweep=FPS).hausdorff == 11160.0
    # GT empty on f=5, prediction two columns right of f2's square: HD 2 to the soft frame 2, times 2 - 5
    s = score_case(gt, [None] * 2, 5, square(10, 12, 10), frames_per_sweep=FPS)
    assert s.soft_frame == 2 and s.hausdorff == pytest.approx(2.0 * (2 - 5))
    # the soft frame after f: positive offset; 1 row down -> HD 1
    s = score_case(volume(f6=(1, square(10, 10, 10))), [None] * 2, 5, square(11, 10, 10), frames_per_sweep=FPS)
    assert s.soft_frame == 6 and s.hausdorff == pytest.approx(1.0)
    # no annotated frame within the window
    assert score_case(gt, [None] * 2, 30, square(10, 10, 10), frames_per_sweep=FPS).hausdorff == 11160.0
    assert score_case(gt, [None] * 2, -1, np.ones((2 * FPS, R, C), np.uint8), frames_per_sweep=FPS).hausdorff == 11160.0
    c = score_case(gt, [None] * 2, 5, square(10, 12, 10), frames_per_sweep=FPS, mode="corrected")
    assert math.isnan(c.hausdorff)


def test_frame_minus1_scored_against_last_frame():
    last = 2 * FPS - 1
    gt = volume(f3=(1, square(10, 10, 10)))
    s = score_case(gt, [100.0, 100.0], -1, np.ones((2 * FPS, R, C), np.uint8), frames_per_sweep=FPS)
    assert s.dice == math.inf  # GT frame 39 is empty, the prediction is ignored for -1
    assert set(s.flags) == {"dice_inf_empty", "frame_minus1_last_gt"}
    assert s.wfss == 0.0 and s.nae_ac == 1.0 and s.ac_ref_mm is None
    gt[last] = square(0, 0, 5)
    s = score_case(gt, [100.0, 100.0], -1, np.zeros((R, C)), frames_per_sweep=FPS)
    assert s.dice == 0.0 and s.flags == ["frame_minus1_last_gt"]
    c = score_case(gt, [100.0, 100.0], -1, np.zeros((R, C)), frames_per_sweep=FPS, mode="corrected")
    assert c.dice == 0.0 and c.flags == []
    c = score_case(volume(), [None] * 2, -1, np.zeros((R, C)), frames_per_sweep=FPS, mode="corrected")
    assert c.dice == 1.0 and c.wfss == 0.0


def test_spacing_quirk():
    mask = np.zeros((R, C), np.uint8)
    mask[8:30, 10:40] = 1
    gt = volume(f5=(1, mask))
    s = score_case(gt, [100.0] * 2, 5, mask, frames_per_sweep=FPS, spacing_mm=0.5)
    assert s.flags == ["spacing_ignored"]
    c = score_case(gt, [100.0] * 2, 5, mask, frames_per_sweep=FPS, spacing_mm=0.5, mode="corrected")
    assert c.ac_pred_mm == pytest.approx(s.ac_pred_mm / 0.28 * 0.5)


def test_contract_violations_raise():
    gt = volume(f3=(1, square(10, 10, 10)))
    pred = np.zeros((R, C), np.uint8)
    for bad in (64.0, True, "3"):
        with pytest.raises(ValueError, match="int"):
            score_case(gt, [None] * 2, bad, pred, frames_per_sweep=FPS)
    for bad in (-2, 2 * FPS):
        with pytest.raises(ValueError, match="outside"):
            score_case(gt, [None] * 2, bad, pred, frames_per_sweep=FPS)
    with pytest.raises(ValueError, match="values"):
        score_case(gt, [None] * 2, 3, square(10, 10, 10) * 255, frames_per_sweep=FPS)
    s = score_case(gt, [None] * 2, 3, square(10, 10, 10) * 255, frames_per_sweep=FPS, mode="corrected")
    assert s.dice == 1.0
    with pytest.raises(ValueError, match="shape"):
        score_case(gt, [None] * 2, 3, np.zeros((R, C + 1)), frames_per_sweep=FPS)
    assert score_case(gt, [None] * 2, np.int64(3), square(10, 10, 10), frames_per_sweep=FPS).dice == 1.0


def test_official_parity_with_itk_pipeline():
    # The evaluator's overlap path: cast to uint8, sitk.Mask by the FOV, LabelOverlapMeasures.
    rng = np.random.default_rng(1)
    fov = rng.random((R, C)) < 0.8
    gt = volume(f7=(2, (rng.random((R, C)) < 0.3).astype(np.uint8)))
    pred = (rng.random((R, C)) < 0.3).astype(np.uint8)
    s = score_case(gt, [None] * 2, 7, pred, fov=fov, frames_per_sweep=FPS)
    g = sitk.Mask(itk(gt[7] > 0), itk(fov))
    p = sitk.Mask(itk(pred), itk(fov))
    lom = sitk.LabelOverlapMeasuresImageFilter()
    lom.Execute(g, p)
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(g, p)
    assert s.dice == lom.GetDiceCoefficient()
    assert s.hausdorff == pytest.approx(hd.GetHausdorffDistance(), abs=1e-9)


def test_aggregate_population_std_and_score():
    a = CaseScore(frame=1, wfss=1.0, dice=1.0, dice_soft=1.0, nae_ac=0.0, hausdorff=0.0, ac_pred_mm=1.0, ac_ref_mm=1.0)
    b = CaseScore(frame=2, wfss=0.0, dice=0.0, dice_soft=0.0, nae_ac=1.0, hausdorff=2.0, ac_pred_mm=None, ac_ref_mm=1.0)
    agg = aggregate([a, b])
    assert agg["wfss"] == {"mean": 0.5, "std": 0.5}  # population std, not sample (0.707)
    assert agg["score"]["mean"] == pytest.approx(challenge_score(0.5, 0.5, 0.5)) == pytest.approx(0.5)
    assert agg["score"]["std"] == pytest.approx(0.5 * (1 - 0.5) + 0.25 * 0.5 + 0.25 * 0.5)
    assert a.score == 1.0 and b.score == 0.0 and agg["n_cases"] == 2


def test_frame_metrics_hand_computed():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, np.nan])
    y = np.array([1, 1, 0, 1, 0, 0, 1])
    m = frame_metrics(s, y, threshold=0.65)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n"]) == (2, 1, 1, 2, 6)
    for k in ("precision", "recall", "f1", "specificity"):
        assert m[k] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["auprc"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_frame_metrics_ties_and_degenerate():
    m = frame_metrics(np.array([0.5, 0.5]), np.array([1, 0]), threshold=0.5)
    assert m["auroc"] == 0.5 and m["auprc"] == 0.5 and m["precision"] == 0.5 and m["specificity"] == 0.0
    m = frame_metrics(np.array([0.2, 0.1]), np.array([0, 0]), threshold=0.5)
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"]) and math.isnan(m["recall"])
    assert m["specificity"] == 1.0
    with pytest.raises(ValueError):
        frame_metrics(np.zeros(3), np.zeros(2), 0.5)


def test_ac_fitted_to_a_stray_boundary_piece_is_flagged():
    """A mask grazing the fan edge: the evaluator fits a stray piece of its boundary and finds no
    AC (NAE 1), flagged ac_boundary_piece; corrected mode measures the whole boundary outside
    the fan-edge zone, the disk's own circumference."""
    from fetaliqa.measure import OFFICIAL_SHAPE, PIXEL_SPACING_MM, load_official_fov

    yy, xx = np.mgrid[:OFFICIAL_SHAPE[0], :OFFICIAL_SHAPE[1]]
    grazing = (((yy - 300) ** 2 + (xx - 190) ** 2 <= 80 ** 2) & load_official_fov()).astype(np.uint8)
    gt = np.stack([grazing, np.zeros_like(grazing)])
    true = 2 * math.pi * 80 * PIXEL_SPACING_MM
    s = score_case(gt, [true, None], 0, grazing, frames_per_sweep=1)
    assert s.ac_pred_mm is None and s.nae_ac == 1.0 and s.dice == 1.0 and s.flags == ["ac_boundary_piece"]
    c = score_case(gt, [true, None], 0, grazing, frames_per_sweep=1, mode="corrected")
    assert c.ac_pred_mm == pytest.approx(true, rel=0.01) and c.nae_ac < 0.01
    inside = (((yy - 281) ** 2 + (xx - 372) ** 2) <= 80 ** 2).astype(np.uint8)  # clear of the edge: no flag
    assert score_case(np.stack([inside, inside * 0]), [true, None], 0, inside, frames_per_sweep=1).flags == []
