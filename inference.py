"""ACOUSLIC-AI algorithm entrypoint (grand-challenge.org container): one case per run.

Reads the single stack in /input/images/stacked-fetal-ultrasound/, picks the frame fit for
measuring the abdominal circumference with FetalCLIP-SEG, and writes the two output
sockets exactly as the challenge's evaluator reads them:
  /output/images/fetal-abdomen-segmentation/output.mha  3D uint8 {0,1}, the input's shape,
      the mask on the chosen frame only, input geometry, compressed (the folder's only file)
  /output/fetal-abdomen-frame-number.json               a bare int, 0-based, -1 = none
Model: /opt/ml/model (an uploaded tarball) when it holds an exported model, else the
default baked into resources/model/. Local use:
  python inference.py --input DIR --output DIR [--model DIR] [--extras] [--device cpu]
Bad input exits non-zero with one line saying what and where (--debug: traceback too).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from fetaliqa import io as fio

INPUT_PATH = Path("/input")
OUTPUT_PATH = Path("/output")
MODEL_PATH = Path("/opt/ml/model")
RESOURCE_PATH = Path(__file__).resolve().parent / "resources"

INPUT_SLUG = "stacked-fetal-ultrasound"
SEGMENTATION_SLUG = "fetal-abdomen-segmentation"
FRAME_NUMBER_SLUG = "fetal-abdomen-frame-number"
IMAGE_SUFFIXES = (".mha", ".tif", ".tiff")
CHALLENGE_SHAPE = (840, 562, 744)  # 6 sweeps x 140 frames of 562 x 744
MODEL_FILES = ("model.json", "model.safetensors")

log = logging.getLogger("fetaliqa")


class UserError(Exception):
    """Something the user can fix (input, model files, output folder): one line, exit 1."""


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    debug = args.debug or os.environ.get("FETALIQA_DEBUG") == "1"
    _setup_logging(debug)
    try:
        with warnings.catch_warnings():
            # Library conversions (fetaliqa.io) warn through `warnings`: one log line each.
            warnings.simplefilter("always", fio.InputConversionWarning)
            warnings.showwarning = lambda msg, *a, **k: log.warning("warning: %s", msg)
            _run(args, debug)
        return 0
    except UserError as err:
        log.error("error: %s", err, exc_info=debug)
    except Exception as err:  # a bug, not bad input: still one line unless debugging
        log.error("unexpected error: %s: %s (rerun with --debug or FETALIQA_DEBUG=1 for the "
                  "traceback)", type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                  exc_info=debug)
    return 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=INPUT_PATH, help="input root (default /input)")
    p.add_argument("--output", type=Path, default=OUTPUT_PATH, help="output root (default /output)")
    p.add_argument("--model", type=Path, default=None,
                   help="exported model folder (default: /opt/ml/model if it holds one, else "
                        "resources/model)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=0,
                   help="frames per model batch (default: 16 on CUDA; on the CPU 16 for small models and "
                        "4 for FetalCLIP-size ones, whose activations at 16 cost about 1.3 GB more)")
    p.add_argument("--int8", action="store_true",
                   help="CPU only: int8 dynamic quantisation of the encoder's linear layers (about 1.4x "
                        "faster for FetalCLIP, smaller weights; or FETALIQA_INT8=1); see docs/bench.md")
    p.add_argument("--search", default=None,
                   help="frame search: auto (default: exhaustive on CUDA and for small models such as "
                        "the embedded default, fast for FetalCLIP-size ones on the CPU), exhaustive "
                        "(every frame) or fast (coarse-to-fine, about 100-160 of 840 frames); or "
                        "FETALIQA_SEARCH; see docs/bench.md")
    p.add_argument("--extras", action="store_true",
                   help="also write scores, curve, AC and overlay to OUTPUT/extras "
                        "(or FETALIQA_EXTRAS=1)")
    p.add_argument("--debug", action="store_true", help="log tracebacks and ITK's own messages")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch-size must be >= 1 (or 0: automatic)")
    args.extras = args.extras or os.environ.get("FETALIQA_EXTRAS", "") not in ("", "0")
    args.int8 = args.int8 or os.environ.get("FETALIQA_INT8", "") not in ("", "0")
    args.search_from = "--search" if args.search else "FETALIQA_SEARCH"
    args.search = args.search or os.environ.get("FETALIQA_SEARCH") or "auto"
    return args


def _setup_logging(debug: bool) -> None:
    """INFO to stdout, warnings and errors to stderr (the platform shows stderr as warnings)."""
    fmt = logging.Formatter("fetaliqa: %(message)s")
    out = _StdHandler("stdout")
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = _StdHandler("stderr")
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(fmt)
    log.handlers[:] = [out, err]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


class _StdHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout/sys.stderr is now (redirections and tests swap them)."""

    def __init__(self, name: str):
        self._which = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, _):
        pass


def _run(args: argparse.Namespace, debug: bool) -> None:
    t0, timings = time.perf_counter(), {}
    image_path = locate_input_image(input_root=args.input)
    seg_dir = args.output / "images" / SEGMENTATION_SLUG
    frame_json = args.output / f"{FRAME_NUMBER_SLUG}.json"
    extras_dir = args.output / "extras" if args.extras else None
    check_writable(*(d for d in (seg_dir, args.output, extras_dir) if d is not None))
    model_dir, origin = resolve_model_dir(args.model)  # imports torch and open_clip: seconds
    check_search(args.search, args.search_from)
    timings["setup"] = time.perf_counter() - t0

    t = time.perf_counter()
    # ITK's reader talks to fd 2 directly, so fd 2 is silenced while it runs; the input's
    # conversion warnings raised meanwhile are held back and logged once it is restored
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always", fio.InputConversionWarning)
        with contextlib.nullcontext() if debug else _quiet_stderr():
            stack, reference = load_image_file_as_array(location=image_path)
    for w in held:
        log.warning("warning: %s", w.message)
    timings["read"] = time.perf_counter() - t
    log.info("input %s: %s %s, %.0f MB (read without a copy when uint8), spacing %s, "
             "peak RSS so far %.0f MB", image_path, stack.dtype, stack.shape, stack.nbytes / 2**20,
             tuple(round(s, 4) for s in reference.GetSpacing()), _peak_rss_mb())

    t = time.perf_counter()
    device, amp = select_device(args.device)
    device_name = _device_name(device)  # starts CUDA where asked
    timings["setup"] += time.perf_counter() - t
    t = time.perf_counter()
    model = load_model(model_dir, origin, device)
    if args.int8:
        model = quantize_for_cpu(model, device)
    timings["model_load"] = time.perf_counter() - t
    batch_size = args.batch_size or default_batch_size(model, device)
    log.info("device %s (%s), batch %d", device, device_name, batch_size)

    t = time.perf_counter()
    if stack.shape != CHALLENGE_SHAPE:
        log.warning("warning: %s", unusual_geometry(stack.shape))
    if not stack.any():
        frame = guess_frame(len(stack))
        mask = fallback_mask(stack[frame])
        log.warning("warning: %s holds no signal (all pixels 0): nothing to find; writing a guess, frame "
                    "%d and a central ellipse (the evaluator would score frame -1 against the last GT "
                    "frame, and an empty mask on an empty GT frame as Dice 0/0 = +inf)", image_path.name, frame)
        analysis = None
    else:
        analysis, device, batch = analyse_with_fallback(
            stack, model, device=device, batch_size=batch_size, amp=amp, search=args.search)
        frame, mask = checked_result(analysis, stack)
        for k, v in analysis.timings.items():
            timings[f"analyse.{k}"] = v
        log.info("analysed on %s, batch %d, %s search%s (%d of %d frames scored): frame %d, mask %d pixels",
                 device, batch, analysis.search, " (auto)" if args.search == "auto" else "",
                 int(np.isfinite(analysis.scores).sum()), len(stack), frame, int(mask.sum()))
    timings["analyse"] = time.perf_counter() - t
    # the weights (1.2 GB for FetalCLIP) are not needed any more: release them before the
    # output volume and SimpleITK's copy of it exist, so the three never add up
    del model
    gc.collect()

    t = time.perf_counter()
    volume = np.zeros(stack.shape, np.uint8)
    if frame >= 0:
        volume[frame] = mask
    write_array_as_image_file(location=seg_dir, array=volume, reference=reference)
    del volume
    write_json_file(location=frame_json, content=frame)
    timings["write"] = time.perf_counter() - t
    log.info("wrote %s and %s (frame %d)", seg_dir / "output.mha", frame_json, frame)

    try:  # an earlier run's extras never pass for this one's
        clear_extras(args.output / "extras", keep_folder=extras_dir is not None)
    except OSError as err:  # extras are for people; they never fail the job
        log.warning("warning: an earlier run's extras in %s could not be removed: %s", args.output / "extras", err)
    if extras_dir is not None:
        t = time.perf_counter()
        try:
            write_extras(extras_dir, stack, frame, mask, analysis, model_dir)
        except Exception as err:  # extras are for people; they never fail the job
            log.warning("warning: extras not written: %s: %s", type(err).__name__, err)
        timings["extras"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t0
    log.info("timings (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    log.info("peak memory: %.0f MB RSS", _peak_rss_mb())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- input ---------------------------------------------------------------------------

def locate_input_image(*, input_root: Path) -> Path:
    """The single *.mha/*.tif(f) of the input socket; inputs.json may name its folder."""
    folder = input_root / "images" / INPUT_SLUG
    inputs_json = input_root / "inputs.json"
    if inputs_json.is_file():
        try:
            entries = load_json_file(location=inputs_json)
            for entry in entries if isinstance(entries, list) else []:
                iface = entry.get("interface") or {}
                rel = iface.get("relative_path")
                if iface.get("slug") != INPUT_SLUG or not rel:
                    continue
                named = input_root / rel if isinstance(rel, str) else None
                if named is not None and named.is_dir():
                    folder = named
                    log.info("inputs.json: %s -> %s", INPUT_SLUG, folder)
                else:
                    log.warning("warning: inputs.json names %r for %s, %s; looking in %s", rel, INPUT_SLUG,
                                "not a folder name" if named is None else "no such folder", folder)
        except (OSError, ValueError, AttributeError) as err:
            log.warning("warning: ignoring unreadable %s (%s)", inputs_json, err)
    if not folder.is_dir():
        raise UserError(f"no input folder {folder} (expected one *.mha or *.tif(f) stack there)")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserError(f"no input image in {folder} (expected one *.mha or *.tif(f) file)")
    if len(files) > 1:
        raise UserError(f"{len(files)} input images in {folder} "
                        f"({', '.join(p.name for p in files[:5])}), expected exactly one")
    return files[0]


def load_image_file_as_array(*, location: Path):
    """uint8 (frames, rows, cols) stack and the SimpleITK image (for geometry)."""
    try:
        return fio.read_stack(location)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from err


def load_json_file(*, location: Path):
    with open(location, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def _quiet_stderr():
    """ITK prints reader complaints straight to fd 2; our own one-line error says it better."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --- model and device ----------------------------------------------------------------

def resolve_model_dir(model: Path | None) -> tuple[Path, str]:
    """(folder, where it came from). An explicit --model must hold an exported model; the
    platform folder wins when it holds one, is refused when it holds a broken one (an
    uploaded model must never be silently replaced), and is skipped when empty."""
    from fetaliqa.model import is_exported_model

    if model is not None:
        if not is_exported_model(model):
            raise UserError(_model_problem(model) + " (given by --model)")
        return model, "--model"
    if MODEL_PATH.is_dir() and any(MODEL_PATH.iterdir()):
        folder = MODEL_PATH
        subdirs = [p for p in MODEL_PATH.iterdir() if p.is_dir()]
        if len(subdirs) == 1 and not any((MODEL_PATH / n).exists() for n in MODEL_FILES):
            folder = subdirs[0]  # a tarball made without -C: the files sit one folder deeper
        if not is_exported_model(folder):
            raise UserError(_model_problem(folder) + " (uploaded model tarball)")
        if folder != MODEL_PATH:
            log.warning("warning: using %s (model files one folder too deep in the tarball)", folder)
        return folder, "uploaded model tarball"
    default = RESOURCE_PATH / "model"
    if not is_exported_model(default):
        raise UserError(f"no model: nothing in {MODEL_PATH} and the embedded default {default} "
                        f"does not hold {' + '.join(MODEL_FILES)} (train and export one, or pass --model)")
    return default, "embedded default"


def _model_problem(folder: Path) -> str:
    missing = [n for n in MODEL_FILES if not (folder / n).is_file()]
    if not folder.is_dir():
        return f"model folder {folder} does not exist"
    if missing:
        return f"model folder {folder} lacks {', '.join(missing)} (expected an exported fetaliqa model)"
    return f"model folder {folder} does not hold a valid exported fetaliqa model"


def select_device(name: str) -> tuple[str, bool]:
    """(device, amp): CUDA with fp16 autocast when available, else CPU fp32."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r} (expected auto, cpu, cuda or cuda:N)")
    return name, name.startswith("cuda")


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, fp16 autocast"
    return f"{torch.get_num_threads()} threads, fp32"


def check_search(search: str, origin: str = "--search") -> None:
    from fetaliqa.pipeline import SEARCHES

    if search not in SEARCHES:
        raise UserError(f"unknown {origin} {search!r} (available: {', '.join(SEARCHES)})")


def load_model(folder: Path, origin: str, device: str):
    from fetaliqa.model import load_exported

    try:
        model = load_exported(folder, device=device)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load the model in {folder} ({origin}): {first}") from err
    prov = getattr(model, "provenance", None) or {}
    cfg = getattr(model, "config", None)
    log.info("model: %s (%s), backbone %s, provenance %s", folder, origin,
             getattr(cfg, "backbone", "?"), json.dumps(prov, default=str)[:400])
    return model


def default_batch_size(model, device: str) -> int:
    """16 on CUDA and for small models; 4 on the CPU for encoders of FetalCLIP's width, where
    batch 16 holds about 1.3 GB more activations (docs/bench.md) and the 3 GB budget is tight."""
    from fetaliqa.pipeline import LARGE_ENCODER_WIDTH

    if device.startswith("cuda"):
        return 16
    cfg = getattr(model, "config", None)
    width = int(cfg.vision_cfg()["width"]) if cfg is not None else 0
    return 4 if width >= LARGE_ENCODER_WIDTH else 16


def quantize_for_cpu(model, device: str):
    """--int8: the encoder's linear layers quantised (CPU only; on CUDA a warning, fp16 stays)."""
    if device != "cpu":
        log.warning("warning: --int8 is for the CPU; running %s with fp16 autocast instead", device)
        return model
    from fetaliqa.model.fuse import quantize_encoder_linears

    log.info("int8 dynamic quantisation of the encoder's linear layers")
    return quantize_encoder_linears(model)


def analyse_with_fallback(stack: np.ndarray, model, *, device: str, batch_size: int,
                          amp: bool, search: str | None = None, analyse=None):
    """`fetaliqa.pipeline.analyse_stack` that survives CUDA running out of memory: halve the
    batch down to 1, then move the model to the CPU (fp32). -> (analysis, device, batch)."""
    import torch

    if analyse is None:
        from fetaliqa.pipeline import analyse_stack as analyse
    extra = {"search": search} if search else {}
    batch = batch_size
    while True:
        try:
            result = analyse(stack, model, device=device, batch_size=batch, amp=amp,
                             progress=sys.stderr.isatty(), **extra)
            return result, device, batch
        except torch.cuda.OutOfMemoryError:
            if not str(device).startswith("cuda"):
                raise
            torch.cuda.empty_cache()
            if batch > 1:
                log.warning("warning: CUDA out of memory at batch %d, retrying with %d", batch, batch // 2)
                batch //= 2
            else:
                log.warning("warning: CUDA out of memory at batch 1, falling back to CPU (fp32)")
                model.to("cpu")
                device, amp, batch = "cpu", False, batch_size


def checked_result(analysis, stack: np.ndarray) -> tuple[int, np.ndarray]:
    """(frame, mask) that honour the contract whatever the pipeline returned: an int frame
    in range and, for a stack with signal, never -1 and never an empty mask."""
    n, shape = stack.shape[0], stack.shape[1:]
    frame = int(analysis.frame)
    mask = (np.asarray(analysis.mask) > 0).astype(np.uint8)
    if not -1 <= frame < n or mask.shape != shape:
        raise RuntimeError(f"pipeline returned frame {frame} / mask {mask.shape} "
                           f"for a stack of {stack.shape}")
    if frame == -1:
        scores = np.nan_to_num(np.asarray(analysis.scores, np.float64), nan=-np.inf)
        frame = int(np.argmax(scores)) if np.isfinite(scores).any() else \
            int(np.argmax(stack.reshape(n, -1).sum(axis=1, dtype=np.int64)))
        log.warning("warning: the model found no frame in a stack with signal; taking frame %d", frame)
    if not mask.any():
        log.warning("warning: empty mask for frame %d; writing a central ellipse in the fan", frame)
        mask = fallback_mask(stack[frame])
    return frame, mask


def fallback_mask(frame: np.ndarray) -> np.ndarray:
    """A plausible abdomen (ellipse of AC ~ 230 mm at 0.28 mm/px) centred on the frame's
    signal, inside it (or, on a frame without any, inside the official measurement fan):
    an empty mask scores Dice +inf/0 officially, any guess does better."""
    import cv2

    from fetaliqa.measure import measurement_fov

    rows, cols = frame.shape
    ys, xs = np.nonzero(frame)
    cy, cx = (int(ys.mean()), int(xs.mean())) if ys.size else (rows // 2, cols // 2)
    r = max(1, min(130, rows // 4, cols // 4))
    mask = np.zeros((rows, cols), np.uint8)
    cv2.ellipse(mask, (cx, cy), (r, int(r * 0.9)), 0, 0, 360, 1, -1)
    inside = mask & ((frame > 0) if ys.size else measurement_fov((rows, cols)).astype(np.uint8))
    return inside if inside.any() else mask


def guess_frame(n_frames: int) -> int:
    """The frame written when there is nothing to choose from: the middle of the first sweep
    (a transverse one, where annotations are most often found) of a 6-sweep stack, else the
    middle frame."""
    from fetaliqa.select import sweep_length

    return sweep_length(n_frames) // 2


def unusual_geometry(shape: tuple[int, ...]) -> str:
    """What a stack of another shape than the challenge's means for the analysis."""
    from fetaliqa.select import sweep_length

    n, rows, cols = shape
    fps = sweep_length(n)
    sweeps = (f"read as 6 sweeps of {fps} frame{'s' if fps > 1 else ''}" if fps != n else
              "not 6 equal sweeps: read as one sweep (no per-sweep prior; temporal windows run across "
              "what may be sweep boundaries)")
    return (f"{n} frames of {rows}x{cols}, not the challenge's {CHALLENGE_SHAPE[0]} of "
            f"{CHALLENGE_SHAPE[1]}x{CHALLENGE_SHAPE[2]}: {sweeps}; processed as it is")


# --- output --------------------------------------------------------------------------

def check_writable(*folders: Path) -> None:
    """Fail before the expensive part when an output folder cannot be created or written."""
    for folder in folders:
        try:
            fio.check_writable(folder)
        except OSError as err:
            raise UserError(f"cannot write to output folder {folder}: {err.strerror or err}") from err


def write_array_as_image_file(*, location: Path, array: np.ndarray, reference) -> None:
    """`location`/output.mha, then remove every other file there: the socket holds one."""
    target = location / "output.mha"
    try:
        fio.write_mask_volume(target, array, reference)
        for stale in location.iterdir():
            if stale.name != target.name:
                log.warning("warning: removing stale %s", stale)
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
    except OSError as err:
        raise UserError(f"cannot write {target}: {err.strerror or err}") from err


def write_json_file(*, location: Path, content) -> None:
    try:
        fio.write_json(location, content)
    except OSError as err:
        raise UserError(f"cannot write {location}: {err.strerror or err}") from err


EXTRAS_RESULT, EXTRAS_CURVE, EXTRAS_OVERLAY = EXTRAS_FILES = ("result.json", "quality-curve.png", "overlay.png")


def clear_extras(folder: Path, keep_folder: bool) -> None:
    """Remove the files ``write_extras`` writes (an earlier run's), and unless ``keep_folder``
    the folder too when that leaves it empty."""
    stale = [folder / name for name in EXTRAS_FILES if (folder / name).is_file()]
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed an earlier run's extras from %s", folder)
        if not keep_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()


def write_extras(folder: Path, stack: np.ndarray, frame: int, mask: np.ndarray,
                 analysis, model_dir: Path) -> None:
    """What a sonographer looks at: scores JSON, quality curve per sweep, AC, overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fetaliqa.measure import official_circumference_mm

    n = stack.shape[0]
    scores = np.asarray(analysis.scores, np.float64) if analysis is not None else np.full(n, np.nan)
    good = np.asarray(analysis.good, bool) if analysis is not None else np.zeros(n, bool)
    ac = official_circumference_mm(mask) if frame >= 0 else None
    fio.write_json(folder / EXTRAS_RESULT, {
        "frame": frame, "ac_mm": None if ac is None else round(float(ac), 2),
        "mask_pixels": int(mask.sum()), "model": str(model_dir),
        "scores": [None if not np.isfinite(s) else round(float(s), 5) for s in scores],
        "good": [bool(g) for g in good]})

    sweeps = 6 if n % 6 == 0 else 1
    per = n // sweeps
    fig, axes = plt.subplots(sweeps, 1, figsize=(8, 1.4 * sweeps + 0.6), sharey=True, squeeze=False)
    for k, ax in enumerate(axes[:, 0]):
        idx = np.arange(k * per, (k + 1) * per)
        ax.plot(idx, scores[idx], lw=1, color="tab:blue")
        ax.fill_between(idx, 0, 1, where=good[idx], color="tab:green", alpha=0.2,
                        transform=ax.get_xaxis_transform(), label="good")
        if k * per <= frame < (k + 1) * per:
            ax.axvline(frame, color="tab:red", lw=1.5, label=f"chosen {frame}")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel(f"sweep {k + 1}" if sweeps > 1 else "score", fontsize=8)
    axes[-1, 0].set_xlabel("frame")
    fig.suptitle("per-frame quality score (green: frames judged good)", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, folder / EXTRAS_CURVE)

    shown = frame if frame >= 0 else 0
    fig, ax = plt.subplots(figsize=(7.44, 5.62), dpi=100)
    ax.imshow(stack[shown], cmap="gray", vmin=0, vmax=255)
    if mask.any():
        ax.contour(mask, levels=[0.5], colors="yellow", linewidths=1.2)
    ax.set_title(f"frame {frame}" + (f", AC {ac:.1f} mm" if ac else ""), fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    _save_fig(fig, folder / EXTRAS_OVERLAY)
    plt.close("all")
    log.info("extras in %s: result.json (AC %s mm), quality-curve.png, overlay.png", folder,
             "none" if ac is None else f"{ac:.1f}")


def _save_fig(fig, path: Path) -> None:
    fio.atomic_write(path, fig.savefig)  # the temporary keeps .png: matplotlib picks the format by it


if __name__ == "__main__":
    raise SystemExit(run())
