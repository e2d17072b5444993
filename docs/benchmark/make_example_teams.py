"""Make three illustrative 'teams' from simulated GT (training layout) for the example benchmark report.

python docs/benchmark/make_example_teams.py GT OUT
- oracle: the GT frame with the largest optimal (else suboptimal) area and its GT mask;
- eroded: the same frame, mask eroded by 6 px (AC too small, lower Dice);
- early: two frames before the oracle frame with the oracle's mask (soft Dice, WFSS misses);
- float-frame: like oracle but writes the frame as 12.0 on every third case (contract violation).
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk


def write(case_dir: Path, frame, vol: np.ndarray, ref: sitk.Image) -> None:
    seg = case_dir / "images" / "fetal-abdomen-segmentation"
    seg.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(vol)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(seg / "output.mha"), True)
    (case_dir / "fetal-abdomen-frame-number.json").write_text(json.dumps(frame))


def main(gt_root: Path, out: Path) -> None:
    for i, p in enumerate(sorted((gt_root / "masks" / "stacked_fetal_abdomen").glob("*.mha"))):
        ref = sitk.ReadImage(str(p))
        gt = sitk.GetArrayFromImage(ref)
        area = gt.reshape(len(gt), -1)
        score = (area == 1).sum(1) * 10**7 + (area == 2).sum(1)
        f = int(np.argmax(score))
        vol = np.zeros_like(gt)
        vol[f] = gt[f] > 0
        write(out / "oracle" / p.stem, f, vol, ref)
        write(out / "float-frame" / p.stem, float(f) if i % 3 == 0 else f, vol, ref)
        eroded = np.zeros_like(gt)
        eroded[f] = cv2.erode(vol[f], np.ones((3, 3), np.uint8), iterations=6)
        write(out / "eroded" / p.stem, f, eroded, ref)
        early = np.zeros_like(gt)
        g = max(f - 2, (f // (len(gt) // 6)) * (len(gt) // 6))
        early[g] = vol[f]
        write(out / "early" / p.stem, g, early, ref)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
