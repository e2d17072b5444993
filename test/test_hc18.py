"""training/hc18.py: the HC18 layout reader, outline -> filled mask, threshold choice on the
validation fold, and the whole command on a tiny synthetic set in HC18's layout."""
from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest
import torch

from fetaliqa.measure import ramanujan_perimeter
from training import hc18
from training.splits import Split

torch.set_num_threads(2)


def write_hc18(root, subjects: int = 10, seed: int = 0):
    """HC18's layout: images/NNN_[k]HC.png, NNN_[k]HC_Annotation.png (a 1-pixel ellipse
    outline), pixel_size_and_HC.csv. A bright skull ring on speckle; two scans per subject."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for s in range(subjects):
        for k, suffix in enumerate(("HC", "2HC")):
            cx, cy = rng.uniform(70, 90), rng.uniform(55, 65)
            a, b, ang = rng.uniform(28, 40), rng.uniform(20, 27), rng.uniform(0, 180)
            box = ((cx, cy), (2 * a, 2 * b), ang)
            img = rng.integers(0, 50, (120, 160)).astype(np.uint8)
            cv2.ellipse(img, box, 220, thickness=4)
            ann = np.zeros((120, 160), np.uint8)
            cv2.ellipse(ann, box, 255, thickness=1)
            name = f"{s:03d}_{suffix}"
            cv2.imwrite(str(root / "images" / f"{name}.png"), img)
            cv2.imwrite(str(root / "images" / f"{name}_Annotation.png"), ann)
            px = 0.1 + 0.02 * k
            rows.append({"filename": f"{name}.png", "pixel size(mm)": px,
                         "head circumference (mm)": round(px * ramanujan_perimeter(a, b), 2)})
    with open(root / "pixel_size_and_HC.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_read_hc18_pairs_and_errors(tmp_path):
    root = write_hc18(tmp_path / "hc18", subjects=2)
    (root / "images" / "001_2HC_Annotation.png").unlink()  # a pair without its annotation is skipped
    items = hc18.read_hc18(root)
    assert [it["name"] for it in items] == ["000_HC", "000_2HC", "001_HC"]
    assert [it["subject"] for it in items] == ["000", "000", "001"]
    assert items[1]["pixel_mm"] == pytest.approx(0.12)
    with pytest.raises(FileNotFoundError, match="pixel_size_and_HC.csv"):
        hc18.read_hc18(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pixel_size_and_HC.csv").write_text("filename,pixel size(mm),head circumference (mm)\n"
                                                            "009_HC.png,0.1,100\n")
    with pytest.raises(FileNotFoundError, match="no image/annotation pairs"):
        hc18.read_hc18(tmp_path / "empty")


def test_filled_mask_matches_the_outlined_ellipse():
    out = np.zeros((200, 300), np.uint8)
    cv2.ellipse(out, ((150, 100), (160, 100), 30), 255, thickness=1)
    m = hc18.filled_mask(out)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert m.sum() == pytest.approx(math.pi * 80 * 50, rel=0.03)
    assert m[100, 150] == 1 and m[0, 0] == 0


def _row(err, dice=0.9):
    return {"image": "000_HC", "dice": dice, "hc_pred_mm": None if err is None else 100 + err, "hc_ref_mm": 100.0,
            "abs_err_mm": err}


def test_choose_threshold_fewest_unmeasurable_then_lowest_mae():
    by_t = {0.3: [_row(1.0), _row(None)],      # best MAE but one image unmeasurable
            0.5: [_row(4.0), _row(2.0)],       # MAE 3
            0.7: [_row(2.5), _row(2.5)]}       # MAE 2.5: chosen
    summaries = {t: hc18.summarise(r) for t, r in by_t.items()}
    assert hc18.choose_threshold(summaries) == 0.7
    s = summaries[0.3]
    assert (s["images"], s["hc_unmeasurable"], s["hc_mae_mm"], s["dice_mean"]) == (2, 1, 1.0, 0.9)
    summaries[0.5] = hc18.summarise([_row(2.5), _row(2.5)])  # a tie goes to the lower threshold
    assert hc18.choose_threshold(summaries) == 0.5


def test_hc18_command_end_to_end(tmp_path, capsys):
    root = write_hc18(tmp_path / "hc18")
    out = tmp_path / "run"
    assert hc18.main(["--data", str(root), "--out", str(out), "--procs", "1", "--threads", "1", "--epochs", "2",
                      "--val-every", "1", "--decoder-width", "4", "--batch-size", "4", "--device", "cpu",
                      "--no-progress", "--image-size=224"]) == 0  # the = form reaches the cache too
    assert (out / "cache224").is_dir() and not (out / "cache112").exists()
    summary = json.loads((out / "hc18_summary.json").read_text())
    split = Split.load(out / "run" / "split.json")
    assert len(split.folds) == 5 and split.test and split.val
    subjects = [{u[:3] for u in f} for f in split.folds]  # repeat scans never straddle folds
    assert all(not (subjects[i] & subjects[j]) for i in range(5) for j in range(i + 1, 5))
    # threshold chosen on the validation fold, by the rule, from that fold's own figures
    val = summary["validation"]
    assert sorted(map(float, val)) == list(hc18.THRESHOLDS)
    assert all(v["images"] == len(split.val) for v in val.values())
    mae = {t: np.inf if v["hc_mae_mm"] is None else v["hc_mae_mm"] for t, v in val.items()}
    best = min(val, key=lambda t: (val[t]["hc_unmeasurable"], mae[t], float(t)))
    assert summary["pixel_threshold"] == float(best)
    # held-out figures are those of the per-image table, on the held-out fold only
    rows = list(csv.DictReader(open(out / "hc18_per_image.csv")))
    assert sorted(r["image"] for r in rows) == sorted(split.test) and summary["held_out_images"] == len(rows)
    errs = [float(r["abs_err_mm"]) for r in rows if r["abs_err_mm"]]
    assert summary["hc_unmeasurable"] == len(rows) - len(errs)
    if errs:
        assert summary["hc_mae_mm"] == pytest.approx(np.mean(errs))
        assert all(float(r["abs_err_mm"]) == pytest.approx(abs(float(r["hc_pred_mm"]) - float(r["hc_ref_mm"])))
                   for r in rows if r["abs_err_mm"])
    assert 0 <= summary["dice_mean"] <= 1
    printed = capsys.readouterr().out
    assert f"HC18 validation fold: pixel threshold {summary['pixel_threshold']:g} of 0.3/" in printed
    assert f"HC18 held-out fold: {len(rows)} images" in printed
