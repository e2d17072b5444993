"""Circumference of a 2D mask by ellipse fitting: the ACOUSLIC-AI official measurement and a plain one.

Masks are 2D ``(rows, cols)`` arrays, non-zero = foreground. Results are perimeters of the
fitted ellipse (Ramanujan's first approximation) in the unit of the pixel size; the challenge
measures in mm with the constant 0.28 mm/pixel whatever the image spacing says.

The official measurement (``official_circumference_mm``) follows the organisers' evaluation
(``acouslic-contract.md``): the mask is clipped to the ultrasound fan (FOV), the part of its
boundary that runs along the fan edge is dropped (that edge is where the fan cut the abdomen,
not where the abdomen ends) and an ellipse is fitted by OpenCV to the rest of the boundary.

``ellipse_circumference`` is the plain API for other data: filled masks are measured like the
official code (with the image border, or a given FOV, as the cut edge), thin outlines such as
the HC18 annotations (rings ~2 px thick) along their centre line, by fitting the ring's pixels.

CLI: ``python -m fetaliqa.measure MASK [--pixel-size MM] [--fov FOV.mha|official|none]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

PIXEL_SPACING_MM: float = 0.28
OFFICIAL_SHAPE: tuple[int, int] = (562, 744)  # (rows, cols) of an ACOUSLIC-AI frame
_PAD = 200  # the official code pads so that fitted ellipses may extend past the frame
_RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def load_official_fov() -> np.ndarray:
    """The official ACOUSLIC-AI field-of-view mask: bool ``(562, 744)``, True inside the fan."""
    return _official_fov().copy()


@lru_cache(maxsize=1)
def _official_fov() -> np.ndarray:
    import SimpleITK as sitk

    path = _RESOURCES / "fov_mask.mha"
    if not path.is_file():
        raise FileNotFoundError(f"official FOV mask missing: {path} (ships with fetaliqa in resources/)")
    fov = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) != 0
    if fov.shape != OFFICIAL_SHAPE:
        raise ValueError(f"{path}: FOV mask has shape {fov.shape}, expected {OFFICIAL_SHAPE}")
    fov.setflags(write=False)
    return fov


def fov_from_stack(stack: np.ndarray) -> np.ndarray:
    """FOV of another probe: bool ``(rows, cols)``, True where any frame of ``stack`` is non-zero.

    ``stack`` is ``(frames, rows, cols)`` (or one 2D frame); the fan's outside is 0 in every frame.
    """
    stack = np.asarray(stack)
    if stack.ndim == 2:
        return stack != 0
    if stack.ndim != 3:
        raise ValueError(f"expected a (frames, rows, cols) stack, got shape {stack.shape}")
    return np.any(stack, axis=0)


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ramanujan's first approximation of the perimeter of an ellipse with semi-axes a, b."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def _binary255(a: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(a) != 0, 255, 0).astype(np.uint8)


@lru_cache(maxsize=8)
def _fov_edge_cached(key: bytes, shape: tuple[int, int]) -> np.ndarray:
    fov = np.frombuffer(key, dtype=np.uint8).reshape(shape)
    return _fov_edge(fov)


def _fov_edge(fov_padded: np.ndarray) -> np.ndarray:
    """The FOV's contours drawn as 1-px lines, dilated 3x3 three times: the zone where the fan cut."""
    contours, _ = cv2.findContours(fov_padded, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    edge = np.zeros_like(fov_padded)
    cv2.drawContours(edge, contours, -1, 255, 1)
    return cv2.dilate(edge, np.ones((3, 3), np.uint8), iterations=3)


def _padded_in_fov(mask: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask as 0/255 padded by _PAD and clipped to the FOV, the padded FOV's edge zone), as
    the official measurement prepares them."""
    m = np.pad(_binary255(mask), _PAD)
    f = np.pad(_binary255(fov), _PAD)
    m &= f  # the official code multiplies; for 0/255 images that is a logical AND
    return m, _fov_edge_cached(f.tobytes(), f.shape)


def _untruncated_contour(mask: np.ndarray, fov: np.ndarray) -> np.ndarray | None:
    """Largest contour (by contourArea) of the mask boundary that is not along the FOV edge."""
    m, edge = _padded_in_fov(mask, fov)
    if not m.any():
        return None
    contours, _ = cv2.findContours(m, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    outline = np.zeros_like(m)
    cv2.drawContours(outline, contours, -1, 255, 1)
    outline[edge != 0] = 0
    contours, _ = cv2.findContours(outline, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    return max(contours, key=cv2.contourArea)  # first of equal areas, like Python's max


def _fit_perimeter_px(points: np.ndarray) -> float | None:
    """Ramanujan perimeter in pixels of ``cv2.fitEllipse`` on points; None if it cannot fit."""
    if len(points) <= 5:  # fitEllipse needs 5 points; the official code asks for more than 5
        return None
    (_, _), (width, height), _ = cv2.fitEllipse(points)
    if not (math.isfinite(width) and math.isfinite(height)):
        return None
    return ramanujan_perimeter(width / 2, height / 2)


def _check_2d(mask: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D (rows, cols) mask, got shape {mask.shape}")
    if fov is not None and np.shape(fov) != mask.shape:
        raise ValueError(f"FOV shape {np.shape(fov)} does not match mask shape {mask.shape}")
    return mask


def official_circumference_mm(mask: np.ndarray, fov: np.ndarray | None = None,
                              pixel_spacing: float = PIXEL_SPACING_MM) -> float | None:
    """Abdominal circumference as the official ACOUSLIC-AI evaluation measures it.

    ``mask``: 2D ``(rows, cols)``, non-zero = foreground. ``fov``: bool ``(rows, cols)``; None ->
    the official FOV if the mask is ``(562, 744)``, else the whole frame. Returns the perimeter of
    the ellipse fitted to the boundary left after dropping the part along the fan edge, times
    ``pixel_spacing`` (mm), or None when nothing (or fewer than 6 boundary points) is left.
    """
    mask = _check_2d(mask, fov)
    contour = _untruncated_contour(mask, measurement_fov(mask.shape) if fov is None else fov)
    if contour is None:
        return None
    perimeter = _fit_perimeter_px(contour)
    return None if perimeter is None else perimeter * pixel_spacing


def uncut_circumference_mm(mask: np.ndarray, fov: np.ndarray | None = None,
                           pixel_spacing: float = PIXEL_SPACING_MM) -> float | None:
    """What the official measurement sets out to measure: the ellipse fitted to every point of
    the outer boundary of the mask's largest region (clipped to the FOV; ``fov`` as in
    ``official_circumference_mm``) that lies outside the zone where the fan cut, in mm; None
    when fewer than 6 such points are left.

    The official code instead fits the one piece of that boundary which OpenCV's contourArea
    ranks first. Where the fan edge cuts the boundary cleanly there is one piece and the two
    agree. Where a mask runs along the fan edge a few pixels inside it, the cut leaves stray
    pieces of a few pixels; open pieces all have about zero area, the first one found wins, and
    the official AC is then far off or missing (NAE 1). ``fetaliqa.postprocess.measurable``
    compares the two on the container's output.
    """
    mask = _check_2d(mask, fov)
    m, edge = _padded_in_fov(mask, measurement_fov(mask.shape) if fov is None else fov)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    points = max(contours, key=cv2.contourArea)[:, 0, :]
    points = points[edge[points[:, 1], points[:, 0]] == 0]
    perimeter = _fit_perimeter_px(points)
    return None if perimeter is None else perimeter * pixel_spacing


MISREAD_TOLERANCE = 0.05


def misread(official: float | None, uncut: float | None, tolerance: float = MISREAD_TOLERANCE) -> bool:
    """True when the official AC misreads a mask: it has an uncut AC and the official one is
    missing or differs from it by more than ``tolerance`` (relative)."""
    return uncut is not None and (official is None or abs(official - uncut) > tolerance * uncut)


def measurement_fov(shape: tuple[int, int]) -> np.ndarray:
    """The FOV the evaluator measures frames of this shape in: the official one for
    ``(562, 744)`` frames, else the whole frame (bool)."""
    return _official_fov() if tuple(shape) == OFFICIAL_SHAPE else np.ones(shape, bool)


def is_outline(mask: np.ndarray) -> bool:
    """True for a thin drawn outline (e.g. an HC18 ellipse ring), False for a filled region.

    A region whose every pixel lies within 3 px of the background is a line, not an area.
    """
    m = (np.asarray(mask) != 0).astype(np.uint8)
    if not m.any():
        return False
    dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, 3)
    return float(dist.max()) <= 3.0


def ellipse_circumference(mask: np.ndarray, pixel_size: float = 1.0,
                          fov: np.ndarray | None = None) -> float | None:
    """Perimeter of the ellipse fitted to a filled mask or a thin outline, in units of ``pixel_size``.

    ``mask``: 2D ``(rows, cols)``, non-zero = foreground. ``fov``: bool ``(rows, cols)`` or None
    (= the whole frame, so that a boundary cut by the image border is dropped as truncated).
    Filled masks: the official procedure (boundary not along the FOV edge, ``cv2.fitEllipse``).
    Outlines (see ``is_outline``): a least-squares ellipse through the outline's pixels inside
    the FOV, i.e. along the line's centre; its outer edge would add ~0.7 mm on HC18.
    None when no ellipse can be fitted.
    """
    mask = _check_2d(mask, fov)
    if fov is None:
        fov = np.ones(mask.shape, bool)
    if is_outline(mask):
        ys, xs = np.nonzero((mask != 0) & (np.asarray(fov) != 0))
        perimeter = _fit_perimeter_px(np.stack([xs, ys], axis=1).astype(np.float32))
    else:
        contour = _untruncated_contour(mask, fov)
        perimeter = None if contour is None else _fit_perimeter_px(contour)
    return None if perimeter is None else perimeter * pixel_size


def read_mask_2d(path: Path) -> tuple[np.ndarray, float | None]:
    """Read a 2D mask from .png (or any OpenCV image) or .mha; returns (mask, spacing or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    if path.suffix.lower() in {".mha", ".mhd", ".nii", ".gz", ".nrrd", ".tif", ".tiff"}:
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise ValueError(f"{path}: expected a 2D mask, got array shape {arr.shape}")
        return arr, float(img.GetSpacing()[0])
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"{path}: OpenCV cannot read this image")
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fetaliqa.measure",
        description="Print the ellipse circumference (mm) of a 2D mask (.png or .mha; non-zero = "
                    "foreground). Filled masks and thin outlines (e.g. HC18 rings) alike.")
    p.add_argument("mask", type=Path)
    p.add_argument("--pixel-size", type=float, default=None,
                   help=f"mm per pixel (default {PIXEL_SPACING_MM}, the ACOUSLIC-AI constant)")
    p.add_argument("--fov", default="auto",
                   help="FOV mask .mha/.png; 'official' (ACOUSLIC-AI fan), 'none' (whole frame) or "
                        "'auto' (default: official for 562x744 masks, else none)")
    args = p.parse_args(argv)
    if args.pixel_size is not None and not (args.pixel_size > 0 and math.isfinite(args.pixel_size)):
        p.error(f"--pixel-size must be a positive number of mm, got {args.pixel_size}")
    if args.fov not in ("auto", "official", "none") and not Path(args.fov).is_file():
        p.error(f"--fov {args.fov}: no such file (or give official, none or auto)")
    try:
        mask, _ = read_mask_2d(args.mask)
        if args.fov == "auto":
            fov = load_official_fov() if mask.shape == OFFICIAL_SHAPE else None
        elif args.fov == "official":
            fov = load_official_fov()
        elif args.fov == "none":
            fov = None
        else:
            fov = read_mask_2d(Path(args.fov))[0] != 0
        pixel = PIXEL_SPACING_MM if args.pixel_size is None else args.pixel_size
        mm = ellipse_circumference(mask, pixel_size=pixel, fov=fov)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if mm is None:
        print(f"error: no ellipse can be fitted to {args.mask} (empty or too small)", file=sys.stderr)
        return 1
    print(f"{mm:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
