"""Circumference measurement: hand-made shapes, the official FOV-aware procedure, real HC18/ACOUSLIC masks."""

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from fetaliqa.measure import (
    OFFICIAL_SHAPE, PIXEL_SPACING_MM, ellipse_circumference, fov_from_stack, is_outline,
    load_official_fov, main, official_circumference_mm, ramanujan_perimeter, uncut_circumference_mm,
)
from fetaliqa.postprocess import measurable

FIX = Path(__file__).parent / "fixtures" / "measure"


def disk(shape=OFFICIAL_SHAPE, centre=(281, 372), r=100.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r).astype(np.uint8)


def test_ramanujan_circle_and_ellipse():
    assert ramanujan_perimeter(1, 1) == pytest.approx(2 * math.pi)
    assert ramanujan_perimeter(2, 1) == pytest.approx(9.688421, abs=1e-5)  # exact perimeter 9.688448


def test_official_fov_resource():
    fov = load_official_fov()
    assert fov.dtype == bool and fov.shape == (562, 744)
    assert 0.6 < fov.mean() < 0.7  # the fan covers about 64 % of the frame
    fov[0, 0] = True  # a copy: the cached mask stays read-only and unchanged
    assert not load_official_fov()[0, 0]


def test_fov_from_stack():
    stack = np.zeros((3, 4, 5), np.uint8)
    stack[0, 1, 1] = 7
    stack[2, 3, 4] = 1
    fov = fov_from_stack(stack)
    assert fov.sum() == 2 and fov[1, 1] and fov[3, 4]


def test_disk_radius_100():
    # The official fit runs through the centres of the boundary pixels (mean radius 99.54 px),
    # so it reads 625.46 px for a radius-100 disk (analytic 628.32).
    d = disk()
    assert official_circumference_mm(d, pixel_spacing=1.0) == pytest.approx(625.4605, abs=1e-3)
    assert official_circumference_mm(d) == pytest.approx(625.4605 * PIXEL_SPACING_MM, abs=1e-3)
    assert ellipse_circumference(d) == pytest.approx(625.4605, abs=1e-3)
    assert ellipse_circumference(d, pixel_size=0.5) == pytest.approx(625.4605 / 2, abs=1e-3)
    # The contract's "628.1 px" is a disk drawn by OpenCV with 4-connected boundary steps,
    # slightly fuller than x^2 + y^2 <= 100^2 (cv2.LINE_8 draws exactly that set).
    for line_type, want in ((cv2.LINE_4, 628.12), (cv2.LINE_8, 625.46)):
        m = np.zeros((562, 744), np.uint8)
        cv2.circle(m, (372, 281), 100, 1, -1, lineType=line_type)
        assert official_circumference_mm(m, pixel_spacing=1.0) == pytest.approx(want, abs=0.01)


def test_axis_aligned_ellipse():
    m = np.zeros((300, 400), np.uint8)
    cv2.ellipse(m, (200, 150), (120, 60), 0, 0, 360, 1, -1)
    got = ellipse_circumference(m)
    assert got == pytest.approx(ramanujan_perimeter(120, 60), rel=0.01)


def test_truncated_by_fov_is_not_shrunk():
    # A disk cut by a straight FOV edge: fitting only the remaining arc recovers the circle,
    # fitting the cut (chord included) would not.
    d = disk((400, 400), (200, 200), 100)
    fov = np.ones((400, 400), bool)
    fov[:, 260:] = False
    cut = official_circumference_mm(d, fov=fov, pixel_spacing=1.0)
    assert cut == pytest.approx(official_circumference_mm(d, pixel_spacing=1.0), rel=0.01)
    naive = d * fov
    c, _ = cv2.findContours(naive.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    e = cv2.fitEllipse(c[0])
    assert ramanujan_perimeter(e[1][0] / 2, e[1][1] / 2) < cut - 20


def test_unmeasurable():
    assert official_circumference_mm(np.zeros(OFFICIAL_SHAPE, np.uint8)) is None
    tiny = np.zeros((50, 50), np.uint8)
    tiny[10, 10:13] = 1  # 3 boundary points: fewer than the 6 the official code asks for
    assert official_circumference_mm(tiny) is None
    assert ellipse_circumference(tiny) is None
    outside = disk()
    assert official_circumference_mm(outside, fov=np.zeros(OFFICIAL_SHAPE, bool)) is None
    with pytest.raises(ValueError, match="2D"):
        official_circumference_mm(np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="FOV shape"):
        official_circumference_mm(np.zeros((5, 5)), fov=np.ones((4, 4), bool))


def test_real_acouslic_mask_cut_by_fan():
    m = cv2.imread(str(FIX / "real_frame_a_mask.png"), cv2.IMREAD_GRAYSCALE)
    official = official_circumference_mm(m)
    assert official == pytest.approx(269.16, abs=0.05)
    # without the fan the cut edge stays in the fit: the naive ~266.7 mm
    assert official_circumference_mm(m, fov=np.ones(m.shape, bool)) == pytest.approx(266.66, abs=0.05)
    b = cv2.imread(str(FIX / "real_mask_b.png"), cv2.IMREAD_GRAYSCALE)
    assert official_circumference_mm(b) == pytest.approx(235.67, abs=0.05)
    assert not is_outline(m) and not is_outline(b)


def test_hc18_outlines_reproduce_sonographer_hc():
    rows = list(csv.DictReader(open(FIX / "hc18_pixel_size_and_HC.csv")))
    assert len(rows) == 9
    for row in rows:
        ring = cv2.imread(str(FIX / row["filename"].replace(".png", "_Annotation.png")), cv2.IMREAD_GRAYSCALE)
        assert is_outline(ring)
        hc = ellipse_circumference(ring, pixel_size=float(row["pixel size(mm)"]))
        assert hc == pytest.approx(float(row["head circumference (mm)"]), abs=0.1), row["filename"]


def test_hc18_filled_outline_measures_outer_edge():
    # Filling the ring and fitting its boundary measures the outer edge: larger than the HC.
    row = next(csv.DictReader(open(FIX / "hc18_pixel_size_and_HC.csv")))
    ring = cv2.imread(str(FIX / "000_HC_Annotation.png"), cv2.IMREAD_GRAYSCALE)
    filled = ring.copy()
    cv2.floodFill(filled, None, (0, 0), 255)
    filled = ((filled == 0) | (ring > 0)).astype(np.uint8)
    mm = ellipse_circumference(filled, pixel_size=float(row["pixel size(mm)"]))
    assert mm > float(row["head circumference (mm)"]) + 0.05


def test_cli(tmp_path, capsys):
    assert main([str(FIX / "real_frame_a_mask.png")]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(269.16, abs=0.01)
    assert main([str(FIX / "real_frame_a_mask.png"), "--fov", "none"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(266.66, abs=0.01)
    assert main([str(FIX / "000_HC_Annotation.png"), "--pixel-size", "0.0691358041432"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(44.3, abs=0.1)
    import SimpleITK as sitk
    sitk.WriteImage(sitk.GetImageFromArray(disk()), str(tmp_path / "d.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(load_official_fov().astype(np.float32)), str(tmp_path / "fov.mha"))
    assert main([str(tmp_path / "d.mha"), "--fov", str(tmp_path / "fov.mha"), "--pixel-size", "1"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(625.46, abs=0.01)
    assert main([str(tmp_path / "missing.png")]) == 2
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.uint8)), str(tmp_path / "e.mha"))
    assert main([str(tmp_path / "e.mha")]) == 1
    capsys.readouterr()
    for bad, says in ((["--pixel-size", "0"], "--pixel-size must be a positive number"),
                      (["--pixel-size", "-1"], "--pixel-size must be a positive number"),
                      (["--fov", str(tmp_path / "nofov.mha")], "nofov.mha: no such file")):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "d.mha"), *bad])
        assert says in capsys.readouterr().err


def test_mask_grazing_the_fan_edge_and_measurable():
    """The official code fits one piece of the boundary left after the fan edge's zone is
    dropped: a disk grazing the fan edge leaves stray pieces, and the official AC goes missing;
    the uncut AC (every boundary point outside that zone) is the disk's. ``measurable`` keeps
    such a mask 2 px further inside the fan, where the official AC is right; masks cut cleanly,
    or clear of the edge, stay as they are."""
    fov = load_official_fov()
    true = 2 * math.pi * 80 * PIXEL_SPACING_MM
    grazing = disk(centre=(300, 190), r=80) & fov
    assert official_circumference_mm(grazing) is None
    assert uncut_circumference_mm(grazing) == pytest.approx(true, rel=0.01)
    fixed = measurable(grazing)
    assert fixed.dtype == np.uint8 and 0 < (grazing != fixed).sum() < 100 and not (fixed & ~grazing).any()
    assert official_circumference_mm(fixed) == pytest.approx(true, rel=0.01)
    for centre in ((300, 100), (281, 372)):  # cut deep by the fan edge; inside
        m = disk(centre=centre, r=80) & fov
        assert uncut_circumference_mm(m) == pytest.approx(official_circumference_mm(m), rel=0.001)
        assert np.array_equal(measurable(m), m)
    real = cv2.imread(str(FIX / "real_frame_a_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert uncut_circumference_mm(real) == pytest.approx(269.16, abs=0.05)
    assert np.array_equal(measurable(real), real > 0)
    assert uncut_circumference_mm(np.zeros(OFFICIAL_SHAPE, np.uint8)) is None
    assert not measurable(np.zeros(OFFICIAL_SHAPE, np.uint8)).any()
