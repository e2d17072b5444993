"""Test inputs in their real formats: tiny release-layout datasets (SimpleITK, no simulator
needed) and random weights in FetalCLIP's checkpoint format."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


def write_tiny_release(root: Path, n_cases: int = 6, frames_per_sweep: int = 4, rows: int = 60, cols: int = 80,
                       seed: int = 0, subjects: list[str] | None = None) -> Path:
    """Cases with a bright disk (label 1 or 2) on some frames of some sweeps, speckle
    elsewhere; sweeps holding an annotation get a reference AC."""
    rng = np.random.default_rng(seed)
    (root / "images/stacked_fetal_ultrasound").mkdir(parents=True, exist_ok=True)
    (root / "masks/stacked_fetal_abdomen").mkdir(parents=True, exist_ok=True)
    (root / "circumferences").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:rows, :cols]
    table = []
    for c in range(n_cases):
        uuid = f"case{c:03d}"
        n = 6 * frames_per_sweep
        stack = rng.integers(0, 60, (n, rows, cols)).astype(np.uint8)
        stack[:, :, :4] = 0  # a black margin, like outside the fan
        mask = np.zeros_like(stack)
        ac = [None] * 6
        for k in rng.choice(6, size=2, replace=False):
            f0 = k * frames_per_sweep + int(rng.integers(0, frames_per_sweep - 1))
            for f in (f0, f0 + 1):
                cy, cx, r = rng.integers(20, rows - 20), rng.integers(25, cols - 25), int(rng.integers(8, 14))
                disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                stack[f][disk] = 200
                mask[f][disk] = 1 if f == f0 else 2
            ac[k] = round(float(2 * np.pi * 10 * 0.28), 2)
        for arr, sub in ((stack, "images/stacked_fetal_ultrasound"), (mask, "masks/stacked_fetal_abdomen")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.28, 0.28, 1.0))
            sitk.WriteImage(img, str(root / sub / f"{uuid}.mha"), True)
        subject = subjects[c] if subjects else f"subj{c // 2:02d}"
        table.append([uuid, subject] + ["" if v is None else v for v in ac])
    with open(root / "circumferences/fetal_abdominal_circumferences_per_sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uuid", "subject_id"] + [f"sweep_{k}_ac_mm" for k in range(1, 7)])
        w.writerows(table)
    return root


def write_fetalclip_checkpoint(path: Path, visual_state: dict[str, torch.Tensor]) -> Path:
    """Save a vision tower's state dict the way FetalCLIP's release stores it: the whole CLIP
    under `state_dict`, keys `module.visual.*`, beside text-tower keys the loader must skip."""
    sd = {f"module.visual.{k}": v for k, v in visual_state.items()}
    sd.update({"module.logit_scale": torch.tensor(4.6052), "module.token_embedding.weight": torch.zeros(3, 2),
               "module.positional_embedding": torch.zeros(117, 768)})
    torch.save({"state_dict": sd}, path)
    return path
