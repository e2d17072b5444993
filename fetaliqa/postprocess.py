"""Chosen-frame mask on the native grid: threshold, largest component, fill holes, fan only;
optionally its fitted ellipse; then ``measurable``: the official AC measurement must read the
mask as it is meant.

Arrays are (rows, cols); masks uint8 {0, 1}. ``final_mask`` never returns an empty mask for
a frame that has any fan pixel, so the official evaluator never sees an empty prediction.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from .measure import MISREAD_TOLERANCE, measurement_fov, official_circumference_mm, uncut_circumference_mm


def largest_component(mask: np.ndarray) -> np.ndarray:
    """uint8 mask of the largest 8-connected component (empty stays empty)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, np.uint8)
    return (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)


def clean_mask(prob: np.ndarray, threshold: float, fov: np.ndarray | None = None) -> np.ndarray:
    """prob (rows, cols) -> uint8 mask: > threshold, in the fan, largest component, holes filled."""
    m = prob > threshold
    if fov is not None:
        m &= fov
    m = ndimage.binary_fill_holes(largest_component(m)).astype(np.uint8)
    return m & fov.astype(np.uint8) if fov is not None else m


def ellipse_mask(mask: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
    """The filled ellipse fitted (cv2.fitEllipse) to the mask's largest outer contour, cut to
    the fan; the mask itself when no ellipse can be fitted or the ellipse is empty."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return mask
    c = max(contours, key=cv2.contourArea)
    if len(c) < 5:
        return mask
    (cx, cy), (w, h), angle = cv2.fitEllipse(c)
    out = np.zeros(mask.shape, np.uint8)
    # fitEllipse returns full axes; ellipse() wants half axes. Sub-pixel via shift=4.
    cv2.ellipse(out, (round(cx * 16), round(cy * 16)), (round(w * 8), round(h * 8)), angle, 0, 360, 1, -1,
                lineType=cv2.LINE_8, shift=4)
    if fov is not None:
        out &= fov.astype(np.uint8)
    return out if out.any() else mask


def final_mask(prob: np.ndarray, threshold: float, fov: np.ndarray | None = None,
               ellipse: bool = False) -> np.ndarray:
    """Mask of the chosen frame from its native-grid probability map; never empty when the
    fan (or, without a fan, the frame) has a pixel. Fallbacks when nothing exceeds the
    threshold: half the threshold, then the region >= half the in-fan peak probability,
    then the in-fan peak pixel itself."""
    fov = None if fov is None else fov.astype(bool)
    m = clean_mask(prob, threshold, fov)
    if not m.any():
        m = clean_mask(prob, threshold / 2, fov)
    if not m.any():
        inside = prob if fov is None else np.where(fov, prob, -np.inf)
        peak = float(inside.max())
        if np.isfinite(peak):  # the fan has at least one pixel
            if peak > 0:
                m = clean_mask(inside, peak / 2, fov)
            if not m.any():
                m = np.zeros(prob.shape, np.uint8)
                m[np.unravel_index(int(np.argmax(inside)), prob.shape)] = 1
    return ellipse_mask(m, fov) if ellipse and m.any() else m


def measurable(mask: np.ndarray, tolerance: float | None = None, margins: tuple[int, ...] = (2, 4, 6, 8)) -> np.ndarray:
    """``mask``, or where the official AC measurement would misread it, the same mask kept a few
    pixels inside the evaluator's FOV (``fetaliqa.measure.measurement_fov``).

    The official measurement (``measure.official_circumference_mm``) fits one piece of the
    mask's boundary; a mask that runs along the fan edge a few pixels inside it leaves stray
    pieces and may be measured on a few pixels, or not at all (NAE 1), however good the mask
    (``measure.uncut_circumference_mm``). When the official AC is missing or differs from the
    uncut one by more than ``tolerance`` (relative; None: ``measure.MISREAD_TOLERANCE``, what
    ``fetaliqa.metrics`` flags as ``ac_boundary_piece``), the mask is cut to the FOV eroded by each
    of ``margins`` pixels in turn (largest component, holes filled): the first that the
    official measurement reads within tolerance, else the one it reads closest (the mask itself
    on ties). A mask cut cleanly by the fan edge is read right and stays as it is.
    """
    tolerance = MISREAD_TOLERANCE if tolerance is None else tolerance
    mask = (np.asarray(mask) != 0).astype(np.uint8)
    want = uncut_circumference_mm(mask) if mask.any() else None
    if want is None:
        return mask

    def error(m: np.ndarray) -> float:
        got = official_circumference_mm(m)
        return math.inf if got is None else abs(got - want) / want

    best, best_err = mask, error(mask)
    if best_err <= tolerance:
        return mask
    fov = measurement_fov(mask.shape).astype(np.uint8)
    for k in margins:  # outside the frame is outside the FOV, as the measurement pads with zeros
        inner = cv2.erode(fov, np.ones((3, 3), np.uint8), iterations=k, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        m = mask & inner
        if not m.any():
            break
        m = ndimage.binary_fill_holes(largest_component(m)).astype(np.uint8)
        err = error(m)
        if err <= tolerance:
            return m
        if err < best_err:
            best, best_err = m, err
    return best
