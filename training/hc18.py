"""Real-image check of the SEG training path on HC18 (fetal head ultrasound, CC BY 4.0).

    python -m training.hc18 --data ../shared/data/hc18 --out runs/hc18 [training.train options]

The sonographer's ellipse outline (`NNN_HC_Annotation.png`) is turned into a filled mask
(an ellipse fitted to the outline pixels, drawn filled: robust where the line runs off the
image). Images go into the same frame cache format as ACOUSLIC (one "case" per image,
subject = the 3-digit prefix, so repeat scans never straddle the split) and train with the
same loop (`training.train`: 5 subject-grouped folds, fold 0 validation, fold 1 held out).
The pixel threshold is chosen on the validation fold (lowest HC MAE), then the held-out
fold is scored at native resolution: Dice of the thresholded, cleaned mask against the
filled annotation, and |HC predicted - HC reference| in mm, where the prediction is the
ellipse fitted to the mask (`fetaliqa.measure.ellipse_circumference`).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from fetaliqa.measure import ellipse_circumference
from fetaliqa.metrics import dice
from fetaliqa.model import load_exported
from fetaliqa.postprocess import final_mask
from fetaliqa.preprocess import frames_to_model_input, square_to_native

from .cache import CacheWriter, FrameCache, _frames_to_square, _masks_to_square, fingerprint
from .splits import Split

# 80 epochs of batch 2 x 8 (two processes, --procs 2): 22 min on our 2 cores; validation
# figures better than after 40 or 10 epochs (docs/training.md).
DEFAULTS = ["--backbone", "fetalclip-small", "--image-size", "112", "--encoder", "full", "--decoder-width", "16",
            "--epochs", "80", "--batch-size", "8", "--lr", "2e-3", "--loss", "dice_bce", "--select-metric", "dice",
            "--val-every", "10", "--folds", "5", "--val-fold", "0", "--test-fold", "1", "--case-check", "0",
            "--num-workers", "0"]


def read_hc18(root: Path) -> list[dict]:
    """Rows of pixel_size_and_HC.csv whose image and annotation exist: name, subject, paths, mm."""
    csv_path = root / "pixel_size_and_HC.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found (expected the HC18 layout: images/, pixel_size_and_HC.csv)")
    out = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["filename"].strip()
            img = root / "images" / name
            ann = img.with_name(name.replace(".png", "_Annotation.png"))
            if img.exists() and ann.exists():
                out.append({"name": name[:-4], "subject": name[:3], "image": img, "annotation": ann,
                            "pixel_mm": float(row["pixel size(mm)"]), "hc_mm": float(row["head circumference (mm)"])})
    if not out:
        raise FileNotFoundError(f"{root}: no image/annotation pairs listed in {csv_path}")
    return out


def filled_mask(outline: np.ndarray) -> np.ndarray:
    """uint8 {0,1}: the ellipse fitted to the outline's pixels, filled."""
    ys, xs = np.nonzero(outline)
    (cx, cy), (w, h), ang = cv2.fitEllipse(np.stack([xs, ys], 1).astype(np.float32))
    m = np.zeros(outline.shape, np.uint8)
    cv2.ellipse(m, ((cx, cy), (w, h), ang), 1, thickness=-1)
    return m


def build_hc18_cache(items: list[dict], root: Path, size: int) -> FrameCache:
    files = [p for it in items for p in (it["image"], it["annotation"])]
    fp = fingerprint(files, {"hc18": True, "size": size})
    if (root / "meta.json").exists() and FrameCache(root).meta.get("fingerprint") == fp:
        return FrameCache(root)
    w = CacheWriter(root, len(items), size, {"fingerprint": fp, "config": {"size": size, "selection": "hc18"}})
    try:
        for it in tqdm(items, desc="HC18 cache", unit="image", file=sys.stderr):
            img = cv2.imread(str(it["image"]), cv2.IMREAD_GRAYSCALE)
            m = filled_mask(cv2.imread(str(it["annotation"]), cv2.IMREAD_GRAYSCALE))
            w.add({"uuid": it["name"], "subject_id": it["subject"], "frames_per_sweep": 1, "shape": [1, *img.shape],
                   "ac_mm": [it["hc_mm"]]}, _frames_to_square(img[None], size, "bicubic"),
                  _masks_to_square(m[None], size), np.zeros(1, int), np.zeros(1, int), np.ones(1, np.uint8))
    except BaseException:
        w.abort()
        raise
    return w.close()


THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@torch.no_grad()
def score_images(model, items: list[dict], thresholds=THRESHOLDS, desc: str = "HC18") -> dict[float, list[dict]]:
    """Per threshold, per image: Dice of the cleaned mask against the filled annotation and the
    HC of the ellipse fitted to it (one model pass per image, every threshold on its map)."""
    rows: dict[float, list[dict]] = {t: [] for t in thresholds}
    for it in tqdm(items, desc=desc, unit="image", file=sys.stderr):
        img = cv2.imread(str(it["image"]), cv2.IMREAD_GRAYSCALE)
        gt = filled_mask(cv2.imread(str(it["annotation"]), cv2.IMREAD_GRAYSCALE))
        prob = torch.sigmoid(model(frames_to_model_input(torch.from_numpy(img)[None], model.config))["seg"])
        prob = square_to_native(prob[:, 0], *img.shape)[0].numpy()
        for t in thresholds:
            pred = final_mask(prob, t)
            hc = ellipse_circumference(pred, it["pixel_mm"])
            rows[t].append({"image": it["name"], "dice": dice(pred, gt, empty=0.0), "hc_pred_mm": hc,
                            "hc_ref_mm": it["hc_mm"],
                            "abs_err_mm": None if hc is None else abs(hc - it["hc_mm"])})
    return rows


def summarise(rows: list[dict]) -> dict:
    errs = [r["abs_err_mm"] for r in rows if r["abs_err_mm"] is not None]
    return {"images": len(rows), "subjects": len({r["image"][:3] for r in rows}),
            "dice_mean": float(np.mean([r["dice"] for r in rows])),
            "hc_mae_mm": float(np.mean(errs)) if errs else None,
            "hc_median_ae_mm": float(np.median(errs)) if errs else None,
            "hc_unmeasurable": len(rows) - len(errs)}


def choose_threshold(summaries: dict[float, dict]) -> float:
    """Of `summarise` results per threshold: the fewest unmeasurable images, then the lowest
    HC MAE, then the lower threshold."""
    def key(t):
        s = summaries[t]
        return s["hc_unmeasurable"], np.inf if s["hc_mae_mm"] is None else s["hc_mae_mm"], t
    return min(summaries, key=key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.hc18", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared/data/hc18")
    p.add_argument("--out", type=Path, default=Path("runs/hc18"))
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (quick checks)")
    p.add_argument("--procs", type=int, default=2, help="training processes (torchrun, gloo, 1 thread each)")
    p.add_argument("--pixel-threshold", type=float, default=None,
                   help="score the held-out fold at this threshold (default: the one of %s with the lowest "
                        "HC MAE on the validation fold)" % "/".join(map(str, THRESHOLDS)))
    p.add_argument("--image-size", type=int, default=112, help="model input side (passed on to training.train)")
    a, rest = p.parse_known_args(argv)
    if a.image_size < 16:
        p.error(f"--image-size must be >= 16, got {a.image_size}")
    items = read_hc18(a.data)[:a.limit or None]
    t0 = time.time()
    size = a.image_size
    rest = [*rest, "--image-size", str(size)]  # the cache and the model agree, however it was written
    cache = build_hc18_cache(items, a.out / f"cache{size}", size)
    from . import train
    rc = train.run_training([*DEFAULTS, "--cache", str(cache.root), "--out", str(a.out / "run"), *rest,
                     "--provenance", json.dumps({"data": "HC18 training set subset (CC BY 4.0)"})], a.procs)
    if rc:
        return rc
    t_train = time.time() - t0
    split = Split.load(a.out / "run" / "split.json")
    if "--threads" in rest:  # train.main restores the thread count; keep it for scoring too
        torch.set_num_threads(int(rest[rest.index("--threads") + 1]))
    model = load_exported(a.out / "run" / "model")
    by_name = {it["name"]: it for it in items}
    mm = lambda v: "n/a" if v is None else f"{v:.2f} mm"  # noqa: E731
    if a.pixel_threshold is None:  # calibration on an all-positive set says nothing about pixels: use HC
        val = {t: summarise(r) for t, r in
               score_images(model, [by_name[u] for u in split.val], desc="HC18 validation").items()}
        thr, chosen_by = choose_threshold(val), "validation fold: fewest unmeasurable, then lowest HC MAE"
        val_table = {str(t): s for t, s in val.items()}
        v = val[thr]
        print(f"HC18 validation fold: pixel threshold {thr:g} of {'/'.join(map(str, val))} "
              f"(HC MAE {mm(v['hc_mae_mm'])}, Dice {v['dice_mean']:.3f})", flush=True)
    else:
        thr, chosen_by, val_table = a.pixel_threshold, "--pixel-threshold", {}
    rows = score_images(model, [by_name[u] for u in split.test], (thr,), desc="HC18 held-out")[thr]
    held = summarise(rows)
    summary = {"held_out_images": held.pop("images"), **held, "pixel_threshold": thr, "chosen_by": chosen_by,
               "validation": val_table, "train_minutes": round(t_train / 60, 1)}
    (a.out / "hc18_summary.json").write_text(json.dumps(summary, indent=1))
    with open(a.out / "hc18_per_image.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"HC18 held-out fold: {summary['held_out_images']} images ({summary['subjects']} subjects), "
          f"pixel threshold {thr:g}: Dice {summary['dice_mean']:.3f}, HC MAE {mm(summary['hc_mae_mm'])} "
          f"(median {mm(summary['hc_median_ae_mm'])}), unmeasurable {summary['hc_unmeasurable']}; "
          f"training {summary['train_minutes']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
