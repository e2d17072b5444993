"""Frame cache: preprocessed square frames, label masks and indices in memory-mapped .npy files.

Layout of a cache folder:
    meta.json   format version, fingerprint of the inputs, preprocessing config, cases
                (uuid, subject_id, first row, row count, frames per sweep, reference ACs)
    frames.npy  uint8 (N, S, S): the frame zero-padded to a centred square and resized to S
                (bicubic, rounded to 0..255); CLIP normalisation happens at training time
    masks.npy   uint8 (N, S, S): labels 0 bg, 1 optimal, 2 suboptimal (nearest resize)
    index.npy   structured (N,): case (row in meta cases), sweep (0-based), frame (0-based
                index in the case's stack), label (per-frame 0/1/2: 1 if any optimal pixel)

The cache is rebuilt only when its fingerprint changes: the names, sizes and modification
times of the inputs plus the preprocessing config. It is written to a temporary folder and
renamed, so an interrupted build never leaves a cache that looks complete.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from .data import CaseRecord, frame_labels, frames_per_sweep, load_sweeps, stack_shape

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype([("case", "<i4"), ("sweep", "<i2"), ("frame", "<i4"), ("label", "u1")])
SELECTIONS = ("published", "all")
POLICIES = ("any", "optimal")


@dataclass(frozen=True)
class CacheConfig:
    """size: square side in pixels (the model's image_size). resize_mode: torch
    interpolation of frames. selection: "published" = only sweeps that have a reference AC
    (all their frames), "all" = whole stacks."""
    size: int = 224
    resize_mode: str = "bicubic"
    selection: str = "published"

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")


def fingerprint(files: Iterable[Path], config: dict) -> str:
    """sha256 of (name, size, mtime) of every input file and the config."""
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "config": config}, sort_keys=True).encode())
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _frames_to_square(frames: np.ndarray, size: int, mode: str) -> np.ndarray:
    from fetaliqa.preprocess import pad_resize
    out = pad_resize(torch.from_numpy(np.ascontiguousarray(frames)), size=size, mode=mode)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def _masks_to_square(masks: np.ndarray, size: int) -> np.ndarray:
    from fetaliqa.preprocess import masks_to_square
    return masks_to_square(torch.from_numpy(np.ascontiguousarray(masks)), size=size).to(torch.uint8).numpy()


class FrameCache:
    """Read-only random access to a built cache (memory-mapped; cheap to open in workers)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.root}: not a frame cache (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{self.root}: cache format {self.meta.get('version')} != {FORMAT_VERSION}; rebuild it")
        self.frames = np.load(self.root / "frames.npy", mmap_mode="r")
        self.masks = np.load(self.root / "masks.npy", mmap_mode="r")
        self.index = np.load(self.root / "index.npy")
        self.cases: list[dict] = self.meta["cases"]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def size(self) -> int:
        return int(self.frames.shape[-1])

    def uuids(self) -> list[str]:
        return [c["uuid"] for c in self.cases]

    def rows_of(self, uuids: Iterable[str]) -> np.ndarray:
        """Row indices (int64) of all cached frames of these cases."""
        pos = {u: i for i, u in enumerate(self.uuids())}
        missing = [u for u in uuids if u not in pos]
        if missing:
            raise KeyError(f"{self.root}: cases not in the cache: {missing[:5]}")
        want = np.zeros(len(self.cases), bool)
        want[[pos[u] for u in uuids]] = True
        return np.flatnonzero(want[self.index["case"]])

    def binary_labels(self, policy: str = "any") -> np.ndarray:
        """Per-frame positive (bool (N,)): "any" annotation (published) or "optimal" only."""
        lab = self.index["label"]
        if policy == "any":
            return lab > 0
        if policy == "optimal":
            return lab == 1
        raise ValueError(f"label policy must be one of {POLICIES}, got {policy!r}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class CacheWriter:
    """Fill a new cache folder case by case; `close()` makes it visible atomically."""

    def __init__(self, root: Path, n_frames: int, size: int, meta: dict):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / "meta.json").exists():
            raise ValueError(f"{self.root} holds files but is not a frame cache (no meta.json): building one "
                             "there would delete them; give a new or empty folder")
        for old in self.root.parent.glob(f"{glob.escape(self.root.name)}.tmp-*"):  # builds that were killed
            pid = old.name.rsplit("-", 1)[-1]  # (an hour untouched: not another host's build on shared storage)
            if pid.isdigit() and not _alive(int(pid)) and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        self.tmp = self.root.with_name(self.root.name + f".tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        open_mm = np.lib.format.open_memmap
        self.frames = open_mm(self.tmp / "frames.npy", mode="w+", dtype=np.uint8, shape=(n_frames, size, size))
        self.masks = open_mm(self.tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n_frames, size, size))
        self.index = np.zeros(n_frames, INDEX_DTYPE)
        self.meta = dict(meta, version=FORMAT_VERSION, n_frames=n_frames, cases=[])
        self.row = 0

    def add(self, case: dict, frames_sq: np.ndarray, masks_sq: np.ndarray, sweeps: np.ndarray,
            frame_idx: np.ndarray, labels: np.ndarray) -> None:
        n = len(frames_sq)
        r = self.row
        self.frames[r:r + n], self.masks[r:r + n] = frames_sq, masks_sq
        self.index[r:r + n] = list(zip(np.full(n, len(self.meta["cases"])), sweeps, frame_idx, labels))
        self.meta["cases"].append(dict(case, start=r, count=n))
        self.row += n

    def abort(self) -> None:
        """Drop the half-written folder (a failed or interrupted build)."""
        self.frames = self.masks = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> FrameCache:
        if self.row != len(self.index):
            raise RuntimeError(f"cache writer got {self.row} frames, expected {len(self.index)}")
        self.frames.flush(), self.masks.flush()
        del self.frames, self.masks
        np.save(self.tmp / "index.npy", self.index)
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1))
        shutil.rmtree(self.root, ignore_errors=True)
        self.tmp.rename(self.root)
        return FrameCache(self.root)


def selected_frames(record: CaseRecord, n_frames: int, selection: str) -> np.ndarray:
    """0-based stack indices of the frames a case contributes under `selection`."""
    fps = frames_per_sweep(n_frames, str(record.image))
    sweeps = range(6) if selection == "all" else record.sweeps_with_ac
    return np.concatenate([np.arange(k * fps, (k + 1) * fps) for k in sweeps] or [np.zeros(0, int)]).astype(np.int64)


def _preprocess_case(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's selected frames -> (square frames, square label masks, frame labels)."""
    rec, shape, idx, config, chunk = job
    fps = shape[0] // 6
    stack, mask, _ = load_sweeps(rec, sorted(set((idx // fps).tolist())))
    frames_sq = np.empty((len(idx), config.size, config.size), np.uint8)
    masks_sq = np.empty_like(frames_sq)
    with torch.inference_mode():
        for s in range(0, len(idx), chunk):
            frames_sq[s:s + chunk] = _frames_to_square(stack[s:s + chunk], config.size, config.resize_mode)
            masks_sq[s:s + chunk] = _masks_to_square(mask[s:s + chunk], config.size)
    return frames_sq, masks_sq, frame_labels(mask)


def build_cache(records: list[CaseRecord], root: Path | str, config: CacheConfig = CacheConfig(),
                *, progress: bool = True, chunk: int = 64, workers: int = 1) -> FrameCache:
    """Open the cache at `root` if its fingerprint matches these inputs and config, else
    (re)build it, preprocessing `workers` cases at a time. Progress (frames) on stderr."""
    root = Path(root)
    files = [p for r in records for p in (r.image, r.mask)]
    csvs = {r.image.parent.parent.parent / "circumferences" for r in records}
    files += [p for d in csvs for p in d.glob("*.csv")]
    fp = fingerprint(files, asdict(config) | {"uuids": [r.uuid for r in records]})
    if (root / "meta.json").exists():
        try:
            cache = FrameCache(root)
            if cache.meta.get("fingerprint") == fp:
                return cache
        except (ValueError, OSError):
            pass  # unreadable or old format: rebuild
    shapes = [stack_shape(r.image) for r in records]
    plan = [selected_frames(r, s[0], config.selection) for r, s in zip(records, shapes)]
    total = int(sum(len(p) for p in plan))
    if total == 0:
        raise ValueError(f"no frames selected from {len(records)} cases (selection={config.selection!r}: "
                         "no sweep has a reference AC?)")
    writer = CacheWriter(root, total, config.size, {"fingerprint": fp, "config": asdict(config)})
    bar = tqdm(total=total, desc="frame cache", unit="frame", disable=not progress)
    jobs = [(rec, shape, idx, config, chunk) for rec, shape, idx in zip(records, shapes, plan)]
    pool = None
    if workers > 1 and len(jobs) > 1:  # one torch thread per worker: the workers are the parallelism
        pool = ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))
    try:  # cases are preprocessed in parallel but written in order: the cache is the same either way
        results = pool.map(_preprocess_case, jobs) if pool else map(_preprocess_case, jobs)
        for (rec, shape, idx, _, _), (frames_sq, masks_sq, labels) in zip(jobs, results):
            fps = shape[0] // 6
            writer.add({"uuid": rec.uuid, "subject_id": rec.subject_id, "frames_per_sweep": fps,
                        "shape": list(shape), "ac_mm": list(rec.ac_mm)},
                       frames_sq, masks_sq, idx // fps, idx, labels)
            bar.update(len(idx))
    except BaseException:  # KeyboardInterrupt too: no multi-GB leftover beside the cache
        writer.abort()
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    bar.close()
    return writer.close()
