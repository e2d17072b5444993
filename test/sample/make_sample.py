"""Generate the sample case (a full-size simulated ACOUSLIC-AI input) deterministically.

    python test/sample/make_sample.py [--out test/sample/input] [--write-checksum]

Writes OUT/images/stacked-fetal-ultrasound/<name from inputs.json>.mha (uint8
(840, 562, 744), spacing 0.28 mm, compressed) and OUT/inputs.json, the platform's /input
layout. The stack is too large to commit (351 MB raw), so it is regenerated with
fetaliqa.simulate (seed SEED) and its pixels are checked against the committed
test/sample/input.fingerprint.json: the sha256 of the pixels, or, where that differs, every
frame's pixel sum within FRAME_SUM_TOLERANCE. The second test exists because the same
pinned numpy renders a few pixels one grey level apart on CPUs with AVX-512: its AVX-512
code paths round some results differently from the AVX2 ones (145 of 351 million pixels on
an AMD EPYC host; NPY_DISABLE_CPU_FEATURES="AVX512F AVX512CD AVX512_SKX AVX512_CLX
AVX512_CNL AVX512_ICL" there gives the exact pixels back). A change of the simulator or of
the seed moves frame sums by thousands. An existing sample that passes is left alone.
--write-checksum records a new fingerprint (after an intended simulator change; the
expected outputs in test/sample/expected/ must then be regenerated too). --no-check writes
the case even when it fails the check (other numpy/SciPy/OpenCV versions than the pinned
ones; the expected outputs then need not apply). --ground-truth DIR also writes the case's
reference masks and ACs in the evaluator layout, for scoring.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from fetaliqa import io as fio  # noqa: E402

SEED = 20240724
CHECKSUM = HERE / "input.fingerprint.json"
INPUTS_JSON = HERE / "inputs.json"
# Largest |difference| of one frame's pixel sum from the committed one that still counts as the
# same sample: one grey level on 1 in 10,000 pixels of a 562x744 frame (42).
FRAME_SUM_TOLERANCE = 42


def stack_digest(stack) -> str:
    """sha256 of the pixels and shape (not of the .mha bytes: zlib versions differ)."""
    h = hashlib.sha256(repr((str(stack.dtype), tuple(stack.shape))).encode())
    for frame in stack:
        h.update(frame.tobytes())
    return h.hexdigest()


def fingerprint(stack) -> dict:
    """The exact digest plus each frame's pixel sum (which survives one-grey-level rounding)."""
    return {"seed": SEED, "dtype": str(stack.dtype), "shape": list(stack.shape), "sha256": stack_digest(stack),
            "frame_sums": [int(s) for s in stack.reshape(len(stack), -1).sum(axis=1, dtype=np.int64)]}


def check(got: dict, want: dict | None) -> tuple[bool, str]:
    """(same sample?, what was found), comparing two fingerprints."""
    if want is None:
        return False, f"no committed fingerprint ({CHECKSUM})"
    if got["sha256"] == want["sha256"]:
        return True, "checksum ok"
    if (got["dtype"], got["shape"]) != (want["dtype"], want["shape"]):
        return False, f"{got['dtype']} {tuple(got['shape'])} instead of {want['dtype']} {tuple(want['shape'])}"
    drift = np.abs(np.asarray(got["frame_sums"], np.int64) - np.asarray(want["frame_sums"], np.int64))
    n, worst = int((drift > 0).sum()), int(drift.max())
    if worst <= FRAME_SUM_TOLERANCE:
        return True, (f"pixels not bit-identical, frame sums within rounding ({n} frames differ, by at most "
                      f"{worst} grey levels, as numpy's AVX-512 paths round): same sample")
    return False, (f"{n} frame sums differ, by up to {worst} grey levels (tolerance {FRAME_SUM_TOLERANCE}), "
                   f"first in frame {int(np.argmax(drift > FRAME_SUM_TOLERANCE))}")


def load_fingerprint() -> dict | None:
    return json.loads(CHECKSUM.read_text()) if CHECKSUM.is_file() else None


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
    want = load_fingerprint()
    target = args.out / "images" / "stacked-fetal-ultrasound" / image_name()

    if target.is_file() and not args.write_checksum and not args.ground_truth:
        try:
            ok, what = check(fingerprint(fio.read_stack(target)[0]), want)
        except ValueError as e:
            ok, what = False, f"unreadable ({e})"
        if ok:
            print(f"[sample] {target} present, {what}")
            return 0
        print(f"[sample] {target} is not the committed sample ({what}): regenerating", file=sys.stderr)

    from fetaliqa.simulate import simulate_case
    import SimpleITK as sitk

    print(f"[sample] simulating the sample case (seed {SEED}) ...", file=sys.stderr)
    case = simulate_case(SEED)
    got = fingerprint(case.stack)
    ok, what = check(got, want)
    if args.write_checksum:
        CHECKSUM.write_text(json.dumps(got) + "\n")
        print(f"[sample] wrote {CHECKSUM}")
    elif not ok and args.no_check:
        print(f"[sample] warning: the simulated sample is not the committed one ({what}); writing it anyway "
              "(--no-check)", file=sys.stderr)
    elif not ok:
        print(f"[sample] error: the simulated sample is not the committed one ({what}; {CHECKSUM}): the "
              "simulator changed, or numpy/SciPy/OpenCV differ from the pinned ones. If intended, rerun with "
              "--write-checksum and regenerate test/sample/expected/ (--no-check writes the case anyway)",
              file=sys.stderr)
        return 1
    elif got["sha256"] != want["sha256"]:  # passed by frame sums, not bit for bit: say so
        print(f"[sample] {what}", file=sys.stderr)
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
