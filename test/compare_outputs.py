"""Check an output folder against the ACOUSLIC-AI contract and, if given, expected outputs.

    python test/compare_outputs.py --output OUT [--input IN] [--expected EXP] [--min-dice 0.95]

Contract (what crashes the official evaluation otherwise): exactly one image file,
`images/fetal-abdomen-segmentation/output.mha`, a 3D uint8 volume of the input's shape and
geometry, values {0,1}, non-zero only on the chosen frame, never empty unless the frame is
-1; `fetal-abdomen-frame-number.json` a bare JSON int in -1..frames-1. Against expected
outputs: same frame number, JSON type, dtype and shape, and Dice of the chosen frame's
masks >= --min-dice (fp16 on a GPU may move a few boundary pixels).
Exit 0 when everything holds, 1 with one line per problem otherwise. Used by
test/docker/test_run.sh and the pytest end-to-end tests (`check_outputs`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SEG = Path("images/fetal-abdomen-segmentation")
FRAME_JSON = Path("fetal-abdomen-frame-number.json")
INPUT = Path("images/stacked-fetal-ultrasound")


def load_outputs(out: Path) -> tuple[sitk.Image | None, object, list[str]]:
    """(mask image, frame JSON value, problems) of an output folder."""
    problems, image, frame = [], None, None
    seg_dir = out / SEG
    files = sorted(p.name for p in seg_dir.iterdir()) if seg_dir.is_dir() else []
    if files != ["output.mha"]:
        problems.append(f"{seg_dir} must hold exactly output.mha, holds {files}")
    if (seg_dir / "output.mha").is_file():
        try:
            image = sitk.ReadImage(str(seg_dir / "output.mha"))
        except RuntimeError:
            problems.append(f"{seg_dir / 'output.mha'} is unreadable")
    try:
        frame = json.loads((out / FRAME_JSON).read_text())
    except (OSError, ValueError) as err:
        problems.append(f"{out / FRAME_JSON}: {err}")
    return image, frame, problems


def input_info(path: Path) -> tuple[tuple[int, ...], dict | None]:
    """(shape the output must have, geometry it must copy) from an input image's header.
    A 2D input is one frame; its geometry is not compared (z is made up)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    shape = tuple(reader.GetSize()[::-1])
    if len(shape) != 3:
        return (1, *shape), None
    return shape, {"spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
                   "direction": reader.GetDirection()}


def check_outputs(out: Path, input_shape: tuple[int, ...] | None = None,
                  geometry: dict | None = None) -> list[str]:
    """Problems with one output folder against the contract (empty list = valid)."""
    image, frame, problems = load_outputs(out)
    if frame is not None and type(frame) is not int:  # bool/float/str all crash the evaluator
        problems.append(f"frame number {frame!r} is a JSON {type(frame).__name__}, must be an int")
        frame = None
    if image is None:
        return problems
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return problems + [f"mask must be a 3D scalar volume, is {image.GetDimension()}D "
                           f"with {image.GetNumberOfComponentsPerPixel()} components"]
    if image.GetPixelID() != sitk.sitkUInt8:
        problems.append(f"mask pixel type {image.GetPixelIDTypeAsString()}, must be 8-bit unsigned")
    vol = sitk.GetArrayViewFromImage(image)
    if input_shape is not None and vol.shape != tuple(input_shape):
        problems.append(f"mask shape {vol.shape} differs from the input's {tuple(input_shape)}")
    values = np.unique(vol)
    if not set(values.tolist()) <= {0, 1}:
        problems.append(f"mask values {values.tolist()[:10]}, only 0 and 1 allowed")
    for what, want in (geometry or {}).items():
        got = getattr(image, f"Get{what.capitalize()}")()
        if not np.allclose(got, want, atol=1e-6):
            problems.append(f"mask {what} {got} differs from the input's {want}")
    if frame is not None:
        if not -1 <= frame < vol.shape[0]:
            problems.append(f"frame number {frame} outside -1..{vol.shape[0] - 1}")
        else:
            on = np.flatnonzero(vol.reshape(vol.shape[0], -1).any(axis=1)).tolist()
            if frame == -1 and on:
                problems.append(f"frame -1 but mask non-zero on frames {on[:5]}")
            if frame >= 0 and on != [frame]:
                problems.append(f"mask must be non-zero on frame {frame} only, is on {on[:5]}")
    header = (out / SEG / "output.mha").read_bytes()[:2048]
    if b"CompressedData = True" not in header:
        problems.append("output.mha is not compressed")
    return problems


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def compare(out: Path, expected: Path, min_dice: float = 0.95) -> tuple[list[str], str]:
    """(problems, summary) of an output folder against expected outputs."""
    image, frame, problems = load_outputs(out)
    exp_image, exp_frame, exp_problems = load_outputs(expected)
    if exp_problems:
        return [f"expected outputs: {p}" for p in exp_problems], ""
    if image is None or frame is None:
        return problems, ""
    if type(frame) is not type(exp_frame):
        problems.append(f"frame JSON type {type(frame).__name__}, expected {type(exp_frame).__name__}")
    if frame != exp_frame:
        problems.append(f"frame {frame}, expected {exp_frame}")
    vol, exp = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(exp_image)
    if vol.dtype != exp.dtype or vol.shape != exp.shape:
        return problems + [f"mask {vol.dtype} {vol.shape}, expected {exp.dtype} {exp.shape}"], ""
    if not set(np.unique(vol).tolist()) <= set(np.unique(exp).tolist()) | {0, 1}:
        problems.append(f"mask values {np.unique(vol).tolist()}, expected {np.unique(exp).tolist()}")
    d = dice(vol[frame], exp[exp_frame]) if isinstance(frame, int) and 0 <= frame < len(vol) \
        and isinstance(exp_frame, int) and exp_frame >= 0 else float(not vol.any() and not exp.any())
    if d < min_dice:
        problems.append(f"Dice of the masks {d:.4f} < {min_dice}")
    return problems, f"frame {frame} (expected {exp_frame}), Dice {d:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="output root written by inference.py")
    p.add_argument("--input", type=Path, help="input root (shape and geometry check)")
    p.add_argument("--expected", type=Path, help="expected output root (comparison)")
    p.add_argument("--min-dice", type=float, default=0.95)
    args = p.parse_args(argv)
    shape = geometry = None
    if args.input is not None:
        files = [f for f in sorted((args.input / INPUT).iterdir()) if f.suffix in (".mha", ".tif", ".tiff")] \
            if (args.input / INPUT).is_dir() else []
        if len(files) != 1:
            print(f"compare: expected one input image in {args.input / INPUT}, found {len(files)}")
            return 1
        shape, geometry = input_info(files[0])
    problems = check_outputs(args.output, shape, geometry)
    summary = ""
    if args.expected is not None:
        if (args.expected / FRAME_JSON).is_file():
            more, summary = compare(args.output, args.expected, args.min_dice)
            problems += more
        else:
            print(f"compare: no expected outputs in {args.expected} yet; contract checks only")
    for q in dict.fromkeys(problems):
        print(f"compare: FAIL {q}")
    if problems:
        return 1
    print(f"compare: OK {args.output}" + (f": {summary}" if summary else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
