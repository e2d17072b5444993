"""Generate the sample case (a full-size simulated ACOUSLIC-AI input) deterministically.

    python test/sample/make_sample.py [--out test/sample/input] [--write-checksum]

Writes OUT/images/stacked-fetal-ultrasound/<name from inputs.json>.mha (uint8
(840, 562, 744), spacing 0.28 mm, compressed) and OUT/inputs.json, the platform's /input
layout. The stack is too large to commit (351 MB raw), so it is regenerated with
fetaliqa.simulate (seed SEED) and its pixels are checked against the committed
test/sample/input.sha256. An existing sample whose pixels match is left alone.
--write-checksum records a new checksum (after an intended simulator change; the expected
outputs in test/sample/expected/ must then be regenerated too). --no-check writes the case
even when its pixels differ (other numpy/SciPy/OpenCV versions than the pinned ones; the
expected outputs then need not apply). --ground-truth DIR also writes the case's reference
masks and ACs in the evaluator layout, for scoring.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from fetaliqa import io as fio  # noqa: E402

SEED = 20240724
CHECKSUM = HERE / "input.sha256"
INPUTS_JSON = HERE / "inputs.json"


def stack_digest(stack) -> str:
    """sha256 of the pixels and shape (not of the .mha bytes: zlib versions differ)."""
    h = hashlib.sha256(repr((str(stack.dtype), tuple(stack.shape))).encode())
    for frame in stack:
        h.update(frame.tobytes())
    return h.hexdigest()


def image_name() -> str:
    entries = json.loads(INPUTS_JSON.read_text())
    return next(e["image"]["name"] for e in entries if e["interface"]["slug"] == "stacked-fetal-ultrasound")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "input", help="input root to write")
    p.add_argument("--write-checksum", action="store_true", help=f"record the checksum in {CHECKSUM.name}")
    p.add_argument("--ground-truth", type=Path, help="also write masks and ACs (evaluator layout) here")
    p.add_argument("--no-check", action="store_true",
                   help="write the case even if its pixels differ from the checksum (numpy/SciPy/OpenCV "
                        "other than the pinned ones; test/sample/expected/ then need not apply)")
    args = p.parse_args(argv)
    want = CHECKSUM.read_text().split()[0] if CHECKSUM.is_file() else None
    target = args.out / "images" / "stacked-fetal-ultrasound" / image_name()

    if target.is_file() and not args.write_checksum and not args.ground_truth:
        try:
            got = stack_digest(fio.read_stack(target)[0])
        except ValueError:
            got = None
        if got is not None and got == want:
            print(f"[sample] {target} present, checksum ok")
            return 0
        print(f"[sample] {target} differs from the committed checksum: regenerating", file=sys.stderr)

    from fetaliqa.simulate import simulate_case
    import SimpleITK as sitk

    print(f"[sample] simulating the sample case (seed {SEED}) ...", file=sys.stderr)
    case = simulate_case(SEED)
    got = stack_digest(case.stack)
    if args.write_checksum:
        CHECKSUM.write_text(f"{got}  sample stack {case.stack.dtype} {tuple(case.stack.shape)} seed {SEED}\n")
        print(f"[sample] wrote {CHECKSUM}")
    elif got != want and args.no_check:
        print(f"[sample] warning: the simulated sample's checksum {got[:16]}... differs from the committed "
              f"{(want or 'none')[:16]}...; writing it anyway (--no-check)", file=sys.stderr)
    elif got != want:
        print(f"[sample] error: the simulated sample's checksum {got[:16]}... differs from the committed "
              f"{(want or 'none')[:16]}... in {CHECKSUM}: the simulator changed, or numpy/SciPy/OpenCV "
              "differ from the pinned ones. If intended, rerun with --write-checksum and regenerate "
              "test/sample/expected/ (--no-check writes the case anyway)", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(case.stack)
    image.SetSpacing((case.spacing_mm, case.spacing_mm, 1.0))
    tmp = target.with_name(f".{target.stem}.partial.mha")
    sitk.WriteImage(image, str(tmp), True)
    tmp.replace(target)
    shutil.copyfile(INPUTS_JSON, args.out / "inputs.json")
    print(f"[sample] wrote {target} {case.stack.shape} and {args.out / 'inputs.json'}")
    if args.ground_truth:
        gt = args.ground_truth / target.stem
        (gt / "fetal_abdomen_stacked_masks").mkdir(parents=True, exist_ok=True)
        masks = sitk.GetImageFromArray(case.masks)
        masks.CopyInformation(image)
        sitk.WriteImage(masks, str(gt / "fetal_abdomen_stacked_masks" / target.name), True)
        fio.write_json(gt / "fetal_abdominal_circumference.json",
                       {f"sweep_{k + 1}_ac_mm": ac for k, ac in enumerate(case.ac_mm)})
        print(f"[sample] wrote ground truth to {gt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
