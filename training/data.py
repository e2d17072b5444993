"""Reader for the ACOUSLIC-AI release layout (the simulator writes the same layout).

    ROOT/images/stacked_fetal_ultrasound/<uuid>.mha      uint8 (frames, rows, cols)
    ROOT/masks/stacked_fetal_abdomen/<uuid>.mha          uint8 same shape, 0 bg, 1 optimal, 2 suboptimal
    ROOT/circumferences/fetal_abdominal_circumferences_per_sweep.csv
        uuid,subject_id,sweep_1_ac_mm,...,sweep_6_ac_mm   (empty cell = no reference AC)

A stack holds 6 sweeps of equal length in protocol order (sweep k = frames
[k*F/6, (k+1)*F/6), 0-based k). Paths live here, at the training edge; arrays go on.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fetaliqa.io import read_ac_table

N_SWEEPS = 6
IMAGES_DIR = Path("images/stacked_fetal_ultrasound")
MASKS_DIR = Path("masks/stacked_fetal_abdomen")
AC_CSV = Path("circumferences/fetal_abdominal_circumferences_per_sweep.csv")
LABELS = (0, 1, 2)


class DataError(ValueError):
    """The data folder does not follow the release layout; the message says where and what."""


@dataclass(frozen=True)
class CaseRecord:
    """One case of the release: its files and per-sweep reference ACs (mm, None = no AC)."""
    uuid: str
    subject_id: str
    image: Path
    mask: Path
    ac_mm: tuple[float | None, ...]

    @property
    def sweeps_with_ac(self) -> list[int]:
        """0-based sweep indices that have a reference AC (the published selection)."""
        return [k for k, v in enumerate(self.ac_mm) if v is not None]


def read_release(root: Path | str) -> list[CaseRecord]:
    """Index a release-layout folder (no pixel data read). Cases sorted by uuid.

    Every image must have a mask and a CSV row; CSV rows without an image are an error
    too (a partial download would otherwise train silently on less data)."""
    root = Path(root)
    img_dir, mask_dir, csv_path = root / IMAGES_DIR, root / MASKS_DIR, root / AC_CSV
    for p, what in ((img_dir, "image folder"), (mask_dir, "mask folder"), (csv_path, "circumference CSV")):
        if not p.exists():
            raise DataError(f"{root}: missing {what} {p.relative_to(root)} "
                            "(expected the ACOUSLIC-AI release layout: images/stacked_fetal_ultrasound/, "
                            "masks/stacked_fetal_abdomen/, circumferences/"
                            "fetal_abdominal_circumferences_per_sweep.csv)")
    try:
        table = read_ac_table(csv_path, require=("subject_id",))
    except ValueError as err:
        raise DataError(str(err)) from None
    rows = {uuid: (subject or uuid, ac) for uuid, (subject, ac) in table.items()}
    no_subject = [uuid for uuid, (subject, _) in table.items() if not subject]
    if no_subject:  # each then counts as its own subject: cases of one mother could straddle folds
        warnings.warn(f"{csv_path}: {len(no_subject)} rows without a subject_id (first: {no_subject[:3]}) are "
                      "split as subjects of their own", stacklevel=2)
    images = sorted(img_dir.glob("*.mha"))
    if not images:
        raise DataError(f"{img_dir}: no .mha images found")
    records = []
    for img in images:
        uuid = img.name[:-len(".mha")]
        mask = mask_dir / img.name
        if not mask.exists():
            raise DataError(f"{img}: no mask {mask} (every image needs a mask of the same name)")
        if uuid not in rows:
            raise DataError(f"{img}: uuid {uuid} has no row in {csv_path}")
        subject, ac = rows[uuid]
        records.append(CaseRecord(uuid, subject, img, mask, ac))
    orphans = sorted(set(rows) - {r.uuid for r in records})
    if orphans:
        raise DataError(f"{csv_path}: {len(orphans)} rows have no image in {img_dir} "
                        f"(first: {orphans[:3]}); is the download complete?")
    return records


def stack_shape(path: Path) -> tuple[int, int, int]:
    """(frames, rows, cols) of an .mha from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()  # SimpleITK order (cols, rows, frames)
    if len(size) == 2:
        return 1, size[1], size[0]
    return size[2], size[1], size[0]


def frames_per_sweep(n_frames: int, where: str = "") -> int:
    if n_frames % N_SWEEPS:
        raise DataError(f"{where}: {n_frames} frames is not {N_SWEEPS} sweeps of equal length")
    return n_frames // N_SWEEPS


def load_case(record: CaseRecord) -> tuple[np.ndarray, np.ndarray]:
    """-> (stack uint8 (frames, rows, cols), labels uint8 same shape in {0, 1, 2})."""
    stack = sitk.GetArrayFromImage(sitk.ReadImage(str(record.image)))
    if stack.ndim != 3 or stack.dtype != np.uint8:
        raise DataError(f"{record.image}: expected a 3D uint8 stack, got {stack.dtype} {stack.shape}")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(record.mask)))
    if mask.shape != stack.shape:
        raise DataError(f"{record.mask}: shape {mask.shape} differs from its image {stack.shape}")
    _check_labels(mask, record.mask)
    frames_per_sweep(stack.shape[0], str(record.image))
    return stack, mask.astype(np.uint8, copy=False)


def _check_labels(mask: np.ndarray, path: Path) -> None:
    """DataError unless every value of the label stack is one of LABELS (0, 1, 2, a range): its
    minimum and maximum decide (a fiftieth of np.unique's time on a whole stack); the values
    are listed only to say what is wrong."""
    if mask.dtype.kind == "f" and mask.size and not np.array_equal(mask, np.rint(mask)):
        odd = np.unique(mask[mask != np.rint(mask)])[:5].tolist()
        raise DataError(f"{path}: non-integer label values {odd}; expected 0 (background), 1 (optimal), "
                        "2 (suboptimal)")
    if mask.size and (mask.min() < min(LABELS) or mask.max() > max(LABELS)):
        bad = [int(v) for v in np.unique(mask) if int(v) not in LABELS]
        raise DataError(f"{path}: unknown labels {bad}; expected 0 (background), 1 (optimal), 2 (suboptimal)")


def _read_frames(path: Path, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) of a 3D .mha, read as a region (MetaImage streams uncompressed data)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    cols, rows, _ = reader.GetSize()
    reader.SetExtractIndex([0, 0, int(start)])
    reader.SetExtractSize([cols, rows, int(stop - start)])
    return sitk.GetArrayFromImage(reader.Execute())


def load_sweeps(record: CaseRecord, sweeps: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Only the given 0-based sweeps of a case (the published selection reads about a third
    of each stack). -> (frames uint8 (n, rows, cols), labels uint8 (n, rows, cols), 0-based
    frame indices (n,)), same checks as load_case."""
    shape = stack_shape(record.image)
    if stack_shape(record.mask) != shape:
        raise DataError(f"{record.mask}: shape {stack_shape(record.mask)} differs from its image {shape}")
    fps = frames_per_sweep(shape[0], str(record.image))
    if not sweeps:
        return np.zeros((0, *shape[1:]), np.uint8), np.zeros((0, *shape[1:]), np.uint8), np.zeros(0, np.int64)
    if sorted(sweeps) == list(range(N_SWEEPS)):  # whole stack: one read each (masks are compressed)
        stack, mask = load_case(record)
        return stack, mask, np.arange(shape[0])
    imgs, masks = [], []
    for k in sweeps:
        img = _read_frames(record.image, k * fps, (k + 1) * fps)
        if img.dtype != np.uint8:
            raise DataError(f"{record.image}: expected a uint8 stack, got {img.dtype}")
        imgs.append(img)
        masks.append(_read_frames(record.mask, k * fps, (k + 1) * fps))
    mask = np.concatenate(masks)
    _check_labels(mask, record.mask)
    idx = np.concatenate([np.arange(k * fps, (k + 1) * fps) for k in sweeps])
    return np.concatenate(imgs), mask.astype(np.uint8, copy=False), idx


def frame_labels(mask: np.ndarray) -> np.ndarray:
    """Per-frame label of a label stack (frames, rows, cols): 1 if any optimal pixel,
    else 2 if any suboptimal pixel, else 0. -> uint8 (frames,)."""
    flat = mask.reshape(mask.shape[0], int(np.prod(mask.shape[1:])))
    has1 = (flat == 1).any(1)
    has2 = (flat == 2).any(1)
    return np.where(has1, 1, np.where(has2, 2, 0)).astype(np.uint8)
