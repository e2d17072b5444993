"""Reading stacks and writing the challenge's outputs (.mha via SimpleITK).

Axis order everywhere is numpy's `(frames, rows, cols)` (SimpleITK's size is the reverse).
Input stacks are uint8 gray; other inputs are converted with an `InputConversionWarning`.
Outputs are written atomically: a temporary name in the destination folder, then
`os.replace`, so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

# Frames converted at a time, so a float/uint16/RGB stack never gets a second full-size copy.
_CHUNK = 32
# ITU-R BT.601 luma, the usual gray conversion of RGB ultrasound screen captures.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class InputConversionWarning(UserWarning):
    """The input was not a uint8 gray 3D stack and was converted to one."""


class _Pinned:
    """Exposes an image's pixel buffer to numpy and keeps the image alive with it.

    `sitk.GetArrayViewFromImage` does not hold a reference to the image, so its view
    dangles once the image is garbage-collected; arrays made from this object do not.
    """

    def __init__(self, image: sitk.Image):
        view = sitk.GetArrayViewFromImage(image)  # MakeUnique(): the buffer is ours to write
        iface = dict(view.__array_interface__)
        iface["data"] = (iface["data"][0], False)
        self.__array_interface__ = iface
        self._image = image


def read_stack(path: Path) -> tuple[np.ndarray, sitk.Image]:
    """Read an ultrasound stack as uint8 `(frames, rows, cols)` plus its SimpleITK image.

    The image carries the geometry (spacing, origin, direction) to copy onto outputs.
    A uint8 gray 3D file is returned without copying its pixels. Otherwise, with an
    `InputConversionWarning`: 2D -> 1 frame, RGB/vector -> gray (luma; mean of the
    components when not 3/4), uint16/int/float -> uint8 (values already in 0..255 are kept,
    floats in 0..1 are scaled by 255, anything else is scaled linearly from
    min(0, minimum)..maximum to 0..255; NaN -> 0).
    Raises `ValueError` naming the file when it cannot be read or is not 2D/3D.
    """
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:  # ITK's own text (kept as __cause__) is long and often misleading
        raise ValueError(f"cannot read image {path}: unreadable, truncated or not an image") from err
    dim, comps = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dim not in (2, 3):
        raise ValueError(f"image {path} has {dim} dimensions, expected a 3D stack "
                         "(frames, rows, cols) or a single 2D frame")
    pixel = image.GetPixelIDTypeAsString()
    notes = []
    if dim == 2:
        notes.append("2D image read as a stack of 1 frame")
    if comps > 1:
        notes.append(f"{comps}-component pixels ({pixel}) converted to gray")
    src = np.asarray(_Pinned(image))
    if dim == 2:
        src = src[None]
    if comps == 1 and src.dtype == np.uint8:
        stack = src
    else:
        stack, how = _to_uint8_gray(src, comps)
        if how:
            notes.append(f"{src.dtype} pixels converted to 8-bit ({how})")
    if notes:
        warnings.warn(f"{path.name}: " + "; ".join(notes) + f"; processed as uint8 {stack.shape}",
                      InputConversionWarning, stacklevel=2)
    return stack, image


def _to_uint8_gray(src: np.ndarray, comps: int) -> tuple[np.ndarray, str]:
    """Chunked conversion of (F, R, C[, K]) any-dtype pixels to uint8 gray (F, R, C)."""
    def gray(block: np.ndarray) -> np.ndarray:
        block = block.astype(np.float32, copy=False)
        if comps == 1:
            return block
        if comps in (3, 4):
            return block[..., :3] @ _LUMA
        return block.mean(axis=-1)

    frames = src.shape[0]
    lo, hi, integral = 0.0, 0.0, np.issubdtype(src.dtype, np.integer)
    for i in range(0, frames, _CHUNK):  # the range of the finite values: one inf must not blacken the rest
        g = gray(src[i:i + _CHUNK])
        g = g[np.isfinite(g)] if not integral else g
        if g.size:
            lo, hi = min(lo, float(g.min())), max(hi, float(g.max()))
    if src.dtype == np.uint8:
        scale, offset, how = 1.0, 0.0, ""
    elif lo >= 0 and hi <= 1 and not integral:
        scale, offset, how = 255.0, 0.0, "range 0..1 scaled by 255"
    elif lo >= 0 and hi <= 255 and (integral or hi > 2):  # floats up to 2: normalised, overshooting
        scale, offset, how = 1.0, 0.0, "values already within 0..255"
    else:
        scale, offset = 255.0 / (hi - lo), lo
        how = f"range {lo:g}..{hi:g} scaled linearly to 0..255"
    out = np.empty(src.shape[:3], dtype=np.uint8)
    for i in range(0, frames, _CHUNK):
        g = (gray(src[i:i + _CHUNK]) - offset) * scale
        out[i:i + _CHUNK] = np.clip(np.nan_to_num(np.rint(g), nan=0.0, posinf=255.0, neginf=0.0), 0, 255)
    return out, how


def write_mask_volume(path: Path, volume: np.ndarray, reference: sitk.Image) -> None:
    """Write a uint8 {0,1} `(frames, rows, cols)` volume, compressed, atomically.

    Geometry (spacing, origin, direction) comes from `reference`, the input image; a 2D
    reference (a 1-frame input) is extended with z spacing 1. Raises `ValueError` when the
    volume is not 3D, holds values other than 0 and 1, or does not match the reference's size.
    """
    path = Path(path)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"mask volume for {path} must be 3D (frames, rows, cols), got {volume.shape}")
    if volume.dtype != np.uint8:
        if not (np.issubdtype(volume.dtype, np.integer) or volume.dtype == bool):
            raise ValueError(f"mask volume for {path} must be integer/bool, got {volume.dtype}")
        volume = volume.astype(np.uint8)
    if volume.max(initial=0) > 1:
        raise ValueError(f"mask volume for {path} holds values {np.unique(volume).tolist()}, "
                         "only 0 and 1 are allowed")
    ref_size = tuple(reference.GetSize())[::-1]
    want = ref_size if reference.GetDimension() == 3 else (1, *ref_size)
    if volume.shape != want:
        raise ValueError(f"mask volume for {path} has shape {volume.shape}, "
                         f"the input image has {want}")
    out = sitk.GetImageFromArray(volume)
    if reference.GetDimension() == 3:
        out.SetSpacing(reference.GetSpacing())
        out.SetOrigin(reference.GetOrigin())
        out.SetDirection(reference.GetDirection())
    else:
        d = reference.GetDirection()
        out.SetSpacing((*reference.GetSpacing(), 1.0))
        out.SetOrigin((*reference.GetOrigin(), 0.0))
        out.SetDirection((d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))
    atomic_write(path, lambda tmp: sitk.WriteImage(out, str(tmp), True))


def write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON atomically (numpy scalars are refused: convert them first)."""
    text = json.dumps(value, allow_nan=False)

    def dump(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
    atomic_write(Path(path), dump)


def read_mask_volume(path: Path) -> np.ndarray:
    """Read a mask/label volume as a numpy array `(frames, rows, cols)` of its stored dtype."""
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as err:
        raise ValueError(f"cannot read mask volume {path}: unreadable or truncated file") from err


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Run `write(tmp)` on a hidden temporary name beside `path`, then rename it into place.

    The project's one way to write a file that must never be seen half-written (outputs,
    exported models, checkpoints, figures); the file gets the permissions of a plain open()."""
    # The temporary keeps the suffix: SimpleITK picks its writer from the extension.
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        # Some writers make 0600 files (safetensors does): a model or output written by root
        # would be unreadable to the container's non-root user. Use a plain open()'s mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(folder: Path) -> None:
    """Create ``folder`` if need be and write and remove a probe file there: an OSError now,
    before the expensive part, instead of after it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe-{os.getpid()}"
    probe.touch()
    probe.unlink()


AC_SWEEP_COLUMNS = tuple(f"sweep_{k}_ac_mm" for k in range(1, 7))


def _parse_ac(text: str, where: str) -> float | None:
    text = text.strip()
    if text == "" or text.lower() in {"nan", "none", "null"}:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a number or an empty cell, got {text!r}") from None
    if math.isinf(value):
        raise ValueError(f"{where}: expected a finite number or an empty cell, got {text!r}")
    return None if math.isnan(value) else value


def read_ac_table(path: Path, require: tuple[str, ...] = ()) -> dict[str, tuple[str, tuple[float | None, ...]]]:
    """The release's circumference CSV (``fetal_abdominal_circumferences_per_sweep.csv``): uuid ->
    (subject_id, '' when absent or blank; the six sweeps' reference ACs in mm, None where empty).

    ValueError naming the file and line for what would otherwise be misread: missing columns
    (``uuid``, the six ``sweep_k_ac_mm`` and ``require``), a row with more or fewer fields than
    the header (a decimal comma shifts every later AC), a uuid given twice, a cell that is not a
    number. A spreadsheet's byte-order mark is read as such."""
    path = Path(path)
    rows: dict[str, tuple[str, tuple[float | None, ...]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        need = ["uuid", *require, *AC_SWEEP_COLUMNS]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {need}, found {reader.fieldnames}")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if not any((v or "").strip() for k, v in row.items() if k is not None) and not row.get(None):
                continue  # a blank or separators-only line (spreadsheet exports end with some)
            extra = row.get(None) or []  # DictReader's marks of too many / too few fields
            short = sum(v is None for k, v in row.items() if k is not None)
            if extra or short:
                raise ValueError(f"{where}: {len(reader.fieldnames) + len(extra) - short} fields, the header has "
                                 f"{len(reader.fieldnames)} (a decimal comma, or a missing or extra separator?)")
            uuid = row["uuid"].strip()
            if not uuid:
                raise ValueError(f"{where}: no uuid")
            if uuid in rows:
                raise ValueError(f"{where}: uuid {uuid} already has a row above")
            rows[uuid] = ((row.get("subject_id") or "").strip(),
                          tuple(_parse_ac(row[c], where) for c in AC_SWEEP_COLUMNS))
    return rows


def strict_json(obj: Any, indent: int = 2) -> str:
    """JSON without the non-standard Infinity/NaN tokens (which strict parsers refuse):
    non-finite floats become the strings "inf", "-inf", "nan"; numpy scalars become numbers,
    anything else JSON has no form for (paths, ...) its str."""
    def clean(v: Any) -> Any:
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), indent=indent, allow_nan=False, default=str)
