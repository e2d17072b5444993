"""Speed, memory and selection quality of the inference path (issue 7; figures in docs/bench.md).

    python -m fetaliqa.bench [--device auto] [--batch-size 16] [--exhaustive-frames 16]
        [--model DIR] [--image PATH.mha | --case-seed 900000] [--geometry fetalclip default]
        [--out DIR]
    python -m fetaliqa.bench --compare-search --cases 30 --seed 900000 [--data DIR] [--out DIR]

Default mode, for each geometry (``fetalclip``: FetalCLIP's ViT-L/14 with random weights,
exported in the deployable format into a temp dir; ``default``: the embedded model in
``resources/model``, or a random-weights small model, labelled so, when there is none):

1. per-frame model cost (ms/frame: preprocessing, model, per-frame statistics) for each
   option: the model as built ("plain"), BatchNorm folded + fast upsampling ("fused"),
   + channels_last, + attention through SDPA (what the pipeline runs on the CPU), int8
   dynamic quantisation of the encoder's linear layers (CPU, FetalCLIP geometry; opt-in),
   batch sizes and threads (small model), ``torch.compile`` (--compile);
2. one full-size 840-frame case as inference.py runs it (read .mha, load the model, analyse,
   write the 3D mask and the frame JSON), exhaustive vs fast, each configuration in its own
   process so its peak RSS (VmHWM; and peak anonymous memory, RssAnon) is its own. With ``--exhaustive-frames N`` > 0 an
   exhaustive pass of the FetalCLIP geometry on the CPU times N frames only and is
   extrapolated to every frame with signal (printed as "extrapolated").

``--compare-search``: selection quality of the fast search against the exhaustive pass on
simulated full-size cases with the embedded default: every case is scored exhaustively once
(per-frame statistics cached in OUT/stats), the fast search is replayed on those statistics
(``pipeline.ReplayScorer``; checked against real fast runs on ``--verify`` cases) for the
default ``FastSearch`` and a few variants, and both choices are scored with
``fetaliqa.metrics``. Writes OUT/compare_search.csv (one row per case and search) and
OUT/compare_search.json (summary). Seeds: pick ones never used for training (900000 by
default; the default model trains on its own seed range).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .model import ModelConfig, build_model, export_model, is_exported_model, load_exported
from .model.fuse import inference_view, quantize_encoder_linears
from .pipeline import (SEG_STATS, FastSearch, FrameScorer, ReplayScorer, analyse_stack, conclude, fast_search,
                       frames_with_signal)

RESOURCES_MODEL = Path(__file__).resolve().parent.parent / "resources" / "model"
# fast-search variants replayed by --compare-search besides the default FastSearch()
VARIANTS: dict[str, FastSearch] = {
    "s8-gate0": FastSearch(stride=8, gate=0.0),
    "s12": FastSearch(stride=12),
    "s12-gate0": FastSearch(stride=12, gate=0.0),
    "s12-gate0.5": FastSearch(stride=12, gate=0.5),
    "s16": FastSearch(stride=16),
    "s16-gate0.5": FastSearch(stride=16, gate=0.5),
    "s16-r4": FastSearch(stride=16, radius=4),
    "s24-r12": FastSearch(stride=24, radius=12),
    "s12-climb": FastSearch(stride=12, refine="climb"),
    "s16-climb": FastSearch(stride=16, refine="climb"),
    "s16-climb-gate0.5": FastSearch(stride=16, refine="climb", gate=0.5),
    "s24-climb": FastSearch(stride=24, refine="climb"),
}


def _say(*a) -> None:
    print(*a, flush=True)


def _rss_mb() -> float:
    """Peak RSS of this process, MB: VmHWM (Linux; ru_maxrss of a process started by a big
    parent can report the parent's size at fork time), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux kB; macOS reports bytes


class AnonPeak:
    """Peak anonymous memory (RssAnon: allocations, not the shared libraries that ru_maxrss
    also counts) of this process, sampled every 20 ms on a thread; Linux only (else nan)."""

    def __init__(self) -> None:
        import threading

        self.peak_mb, self._stop = float("nan"), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with open("/proc/self/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
            except (OSError, StopIteration, ValueError):
                return
            self.peak_mb = max(kb / 1024, 0 if self.peak_mb != self.peak_mb else self.peak_mb)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- models and case
def fetalclip_random_model(out_dir: Path) -> Path:
    """FetalCLIP-SEG geometry with random weights, exported in the deployable format."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="FetalCLIP", heads=("seg",))).eval()
    export_model(model, out_dir, {"data": "random weights (fetaliqa.bench)"})
    return out_dir


def default_model(out_dir: Path, model: Path | None) -> tuple[Path, str]:
    """(folder, label) of ``model`` (which must be an exported model), else the embedded default,
    else a random-weights small model."""
    if model is not None:
        if not is_exported_model(model):
            raise SystemExit(f"--model {model}: not an exported fetaliqa model (model.json + model.safetensors)")
        return model, f"model {model}"
    if is_exported_model(RESOURCES_MODEL):
        return RESOURCES_MODEL, f"embedded default ({RESOURCES_MODEL})"
    torch.manual_seed(0)
    small = build_model(ModelConfig(backbone="fetalclip-small", heads=("seg",))).eval()
    export_model(small, out_dir, {"data": "random weights (fetaliqa.bench)"})
    return out_dir, "RANDOM-WEIGHTS small model (no resources/model yet)"


def case_image(tmp: Path, image: Path | None, seed: int) -> Path:
    """A full-size simulated case written as .mha (inference.py's input), or ``image``."""
    if image is not None:
        return image
    from .simulate import case_seed, simulate_case, write_case

    _say(f"simulating case {seed}/0 (840 x 562 x 744) ...")
    case = simulate_case(case_seed(seed, 0))
    write_case(case, tmp / "case", layout="training")
    return next((tmp / "case" / "images" / "stacked_fetal_ultrasound").glob("*.mha"))


# ----------------------------------------------------------------------------- per-frame cost
def frame_cost(stack: np.ndarray, model, *, device: torch.device, batch: int, frames: int, amp: bool,
               net=None, reps: int = 1, warmup: int | None = None) -> float:
    """Seconds per frame of FrameScorer (preprocess + model + statistics) on ``frames``
    frames with signal, after ``warmup`` frames (default one batch); ``net`` replaces the
    inference view."""
    warmup = batch if warmup is None else warmup
    idx = np.flatnonzero(frames_with_signal(stack))
    idx = idx[np.linspace(0, len(idx) - 1, frames + warmup).round().astype(int)]
    best = np.inf
    for _ in range(reps):
        sc = FrameScorer(stack, model, device=device, batch_size=batch, amp=amp, progress=False)
        if net is not None:
            sc.net = net
        sc.score(idx[:warmup])  # warm-up (allocator, oneDNN primitives, cuDNN autotune)
        _sync(device)
        t = time.perf_counter()
        sc.score(idx[warmup:])
        _sync(device)
        best = min(best, (time.perf_counter() - t) / frames)
    return best


def frame_section(name: str, model_dir: Path, stack: np.ndarray, args, device: torch.device) -> list[dict]:
    amp = device.type == "cuda"
    model = load_exported(model_dir, device=device)
    big = model.config.backbone == "FetalCLIP"
    n = args.exhaustive_frames if big else 64
    rows = []

    def run(option: str, *, batch: int = args.batch_size, threads: int | None = None, net=None, frames: int = n,
            reps: int = 1 if big else 2) -> None:
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            s = frame_cost(stack, model, device=device, batch=batch, frames=frames, amp=amp, net=net, reps=reps,
                           warmup=2 if big and device.type == "cpu" else None)
        finally:
            torch.set_num_threads(old)
        row = {"geometry": name, "option": option, "batch": batch, "threads": threads or old,
               "frames": frames, "ms_per_frame": round(1000 * s, 1)}
        rows.append(row)
        _say(f"  {option:28s} batch {batch:3d} threads {row['threads']}: {row['ms_per_frame']:8.1f} ms/frame")

    _say(f"\n[per-frame cost] {name} on {device} ({'fp16 autocast' if amp else 'fp32'}), {n} frames per figure")
    run("plain", net=model.eval())
    run("fused (BN folded, fast upsample)", net=inference_view(model))
    if device.type == "cpu":
        run("fused + channels_last", net=inference_view(model, channels_last=True))
        run("fused + cl + sdpa (pipeline)")  # FrameScorer's own view
        if not big:
            for b in (1, 4, 32):
                run("fused + cl + sdpa (pipeline)", batch=b)
            if torch.get_num_threads() > 1:
                run("fused + cl + sdpa (pipeline)", threads=1)
        if args.compile:
            view = inference_view(model, channels_last=True, sdpa_attention=True)
            t = time.perf_counter()
            compiled = torch.compile(view, dynamic=False)
            frame_cost(stack, model, device=device, batch=args.batch_size, frames=args.batch_size, amp=amp,
                       net=compiled)
            _say(f"  torch.compile: {time.perf_counter() - t:.0f} s to compile and run one batch")
            run("pipeline + torch.compile", net=compiled)
        if big or args.int8_small:
            ref = FrameScorer(stack, model, device=device, batch_size=args.batch_size, progress=False)
            probe = np.flatnonzero(frames_with_signal(stack))[::97][:4]
            ref.score(probe)
            quantize_encoder_linears(model)  # in place: last
            run("pipeline + int8 encoder linears")
            q = FrameScorer(stack, model, device=device, batch_size=args.batch_size, progress=False)
            q.score(probe)
            rows[-1]["int8_max_abs_diff_area"] = float(np.nanmax(np.abs(q.area - ref.area)))
            rows[-1]["int8_max_abs_diff_mean_fg"] = float(np.nanmax(np.abs(q.mean_fg - ref.mean_fg)))
            _say(f"    int8 vs fp32 on {len(probe)} frames: max |d area| {rows[-1]['int8_max_abs_diff_area']:.2e}, "
                 f"max |d mean_fg| {rows[-1]['int8_max_abs_diff_mean_fg']:.2e}")
    del model
    return rows


# ----------------------------------------------------------------------------- full case (child)
def run_case(spec: dict) -> dict:
    """One configuration end to end as inference.py runs it; called in a fresh process."""
    from .io import read_stack, write_json, write_mask_volume

    anon = AnonPeak()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    amp = device.type == "cuda"
    out = Path(spec["out"])
    t0 = time.perf_counter()
    tm: dict[str, float] = {}
    t = time.perf_counter()
    stack, ref = read_stack(Path(spec["image"]))
    tm["read"] = time.perf_counter() - t
    t = time.perf_counter()
    model = load_exported(Path(spec["model"]), device=device)
    if spec.get("int8"):
        quantize_encoder_linears(model)
    tm["load"] = time.perf_counter() - t
    signal = frames_with_signal(stack)
    res = {"n_frames": len(stack), "n_signal": int(signal.sum())}
    limit = spec.get("limit_frames") or 0
    t = time.perf_counter()
    if limit and spec["search"] == "exhaustive":
        # time `limit` frames, then what the rest (select + chosen-frame mask) costs for real
        sc = FrameScorer(stack, model, device=device, batch_size=spec["batch"], amp=amp, progress=False)
        idx = np.flatnonzero(signal)
        idx = idx[np.linspace(0, len(idx) - 1, limit).round().astype(int)]
        sc.score(idx[:min(spec["batch"], limit)])  # first batch pays warm-up like a real run
        sc.score(idx)
        _sync(device)
        per_frame = (time.perf_counter() - t) / limit
        a = conclude(sc)
        tm["analyse"] = per_frame * res["n_signal"] + sum(a.timings.values())
        res.update(extrapolated=True, per_frame_s=per_frame, frames_scored=res["n_signal"], frames_timed=limit)
    else:
        a = analyse_stack(stack, model, device=device, batch_size=spec["batch"], amp=amp, search=spec["search"],
                          progress=False)
        tm["analyse"] = time.perf_counter() - t
        n_scored = int(np.isfinite(a.scores).sum())
        res.update(extrapolated=False, frames_scored=n_scored, per_frame_s=a.timings["model"] / max(1, n_scored))
    # release the model before building the 3D output (FetalCLIP: its 1.2 GB of weights would
    # otherwise sit beside the output volume and SimpleITK's copy of it; inference.py should too)
    del model
    sc = None
    gc.collect()
    t = time.perf_counter()
    volume = np.zeros(stack.shape, np.uint8)
    if a.frame >= 0:
        volume[a.frame] = a.mask
    write_mask_volume(out / "mask.mha", volume, ref)
    write_json(out / "frame.json", int(a.frame))
    tm["write"] = time.perf_counter() - t
    tm["total"] = (time.perf_counter() - t0) if not res["extrapolated"] else sum(tm.values())
    res.update(frame=int(a.frame), seconds={k: round(v, 2) for k, v in tm.items()}, peak_rss_mb=round(_rss_mb()),
               peak_anon_mb=round(anon.stop()))
    return res


def case_section(name: str, model_dir: Path, image: Path, args, device: torch.device, tmp: Path) -> list[dict]:
    big = load_config(model_dir).backbone == "FetalCLIP"
    configs = [("exhaustive", False), ("fast", False)]
    if device.type == "cpu" and big:
        configs += [("exhaustive", True), ("fast", True)]
    rows = []
    _say(f"\n[full case] {name} on {device}: read .mha, load model, analyse, write mask + frame "
         f"(each in its own process)")
    for search, int8 in configs:
        limit = args.exhaustive_frames if (search == "exhaustive" and big and device.type == "cpu") else 0
        spec = {"image": str(image), "model": str(model_dir), "device": str(device),
                "batch": args.case_batch_size or args.batch_size,
                "search": search, "int8": int8, "limit_frames": limit, "threads": args.threads,
                "out": str(tmp / f"out-{name}-{search}-{int8}")}
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fetaliqa.bench", "--child", json.dumps(spec)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        wall = time.perf_counter() - t
        if proc.returncode:
            _say(f"  {search} {'int8' if int8 else 'fp32'}: FAILED\n{proc.stderr[-2000:]}")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["process_s"] = round(wall if not res["extrapolated"] else
                                 wall - res["per_frame_s"] * res["frames_timed"] + res["seconds"]["analyse"], 1)
        res.update(geometry=name, search=search, precision="int8" if int8 else ("fp16" if device.type == "cuda"
                                                                               else "fp32"))
        rows.append(res)
        s = res["seconds"]
        label = f"{search} {res['precision']}"
        extra = (f"EXTRAPOLATED from {res['frames_timed']} frames at {res['per_frame_s']:.2f} s/frame"
                 if res["extrapolated"] else f"{res['per_frame_s']:.3f} s/frame")
        _say(f"  {label:16s} process {res['process_s']:7.1f} s, of which stages {s['total']:.1f} s "
             f"(read {s['read']:.1f}, load {s['load']:.1f}, "
             f"analyse {s['analyse']:.1f}, write {s['write']:.1f}); frames scored {res['frames_scored']}/"
             f"{res['n_signal']}; {extra}; peak RSS {res['peak_rss_mb'] / 1024:.2f} GB (anonymous "
             f"{res['peak_anon_mb'] / 1024:.2f} GB); frame {res['frame']}")
    return rows


def load_config(model_dir: Path) -> ModelConfig:
    from .model.export import read_model_json

    return read_model_json(model_dir)[0]


# ----------------------------------------------------------------------------- compare searches
def _read_release(data: Path):
    """Yield (uuid, stack, masks, ac_mm) from a release-layout folder (simulate's training layout)."""
    from .io import read_ac_table, read_mask_volume, read_stack

    rows = {uuid: list(ac) for uuid, (_, ac) in
            read_ac_table(data / "circumferences" / "fetal_abdominal_circumferences_per_sweep.csv").items()}
    for uuid in sorted(rows):
        stack, _ = read_stack(data / "images" / "stacked_fetal_ultrasound" / f"{uuid}.mha")
        masks = read_mask_volume(data / "masks" / "stacked_fetal_abdomen" / f"{uuid}.mha")
        yield uuid, stack, masks, rows[uuid]


def _simulated(seed: int, cases: int):
    from .simulate import case_seed, simulate_case

    for i in range(cases):
        c = simulate_case(case_seed(seed, i))
        yield c.uuid, c.stack, c.masks, c.ac_mm


def compare_search(args, device: torch.device) -> int:
    with tempfile.TemporaryDirectory(prefix="fetaliqa-bench-") as td:  # a random model, when there is no default
        return _compare_search(args, device, Path(td))


def _compare_search(args, device: torch.device, tmp: Path) -> int:
    from .metrics import score_case

    model_dir, label = default_model(tmp, args.model)
    fingerprint = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    out = args.out or Path("bench_results") / f"compare-search-seed{args.seed}"
    (out / "stats").mkdir(parents=True, exist_ok=True)
    model = load_exported(model_dir, device=device)
    amp = device.type == "cuda"
    searches = {"fast": FastSearch(), **VARIANTS}
    _say(f"[compare-search] {label} (weights {fingerprint}) on {device}; {args.cases} cases, seed {args.seed}; "
         f"searches: exhaustive, {', '.join(searches)}")
    source = _read_release(args.data) if args.data else _simulated(args.seed, args.cases)
    rows, verified = [], []
    for i, (uuid, stack, masks, ac) in enumerate(tqdm(source, total=args.cases, desc="cases", file=sys.stderr)):
        if i >= args.cases:
            break
        signal = frames_with_signal(stack)
        full = FrameScorer(stack, model, device=device, batch_size=args.batch_size, amp=amp,
                           progress=sys.stderr.isatty())
        cache = out / "stats" / f"{uuid}-{fingerprint}.npz"
        keys = (*SEG_STATS, "cls_prob", "frame_prob", "scored")
        z = np.load(cache) if cache.is_file() else None
        if z is not None and all(k in z for k in keys):  # a cache from before a statistic existed is stale
            for k in keys:
                getattr(full, k)[:] = z[k]
        else:
            t = time.perf_counter()
            full.score(np.flatnonzero(signal))
            np.savez(cache, **{k: getattr(full, k) for k in keys}, seconds=time.perf_counter() - t)
        fps = len(stack) // 6
        probs: dict[int, torch.Tensor] = {}
        every = ReplayScorer(full, probs)
        every.score(np.flatnonzero(full.scored))
        results = {"exhaustive": conclude(every)}
        for name, params in searches.items():
            rep = ReplayScorer(full, probs)
            fast_search(rep, signal, params)
            results[name] = conclude(rep)
            if name == "fast" and i < args.verify:  # a real fast run must make the same choice
                real = analyse_stack(stack, model, device=device, batch_size=args.batch_size, amp=amp,
                                     search="fast", progress=False)
                same = (real.frame == results[name].frame
                        and np.array_equal(np.isfinite(real.scores), np.isfinite(results[name].scores)))
                verified.append({"uuid": uuid, "replay_frame": results[name].frame, "real_frame": real.frame,
                                 "same_frame_and_frames_scored": bool(same)})
                _say(f"  verify {uuid}: replay frame {results[name].frame}, real fast run frame {real.frame}, "
                     f"same frames scored: {same}")
        for name, a in results.items():
            sc = score_case(masks, ac, a.frame, a.mask, frames_per_sweep=fps)
            label_at = int(masks[a.frame].max()) if a.frame >= 0 else -1
            rows.append({"case": i, "uuid": uuid, "search": name, "frame": a.frame, "frame_label": label_at,
                         "frames_scored": int(np.isfinite(a.scores).sum()), "n_signal": int(signal.sum()),
                         "wfss": sc.wfss, "dice_soft": sc.dice_soft, "nae_ac": sc.nae_ac, "_score": sc})
    return _summarise_compare(rows, verified, out, args, label, fingerprint)


def _summarise_compare(rows, verified, out: Path, args, label: str, fingerprint: str) -> int:
    from .metrics import aggregate

    by = {}
    for r in rows:
        by.setdefault(r["search"], []).append(r)
    ex = {r["uuid"]: r for r in by["exhaustive"]}
    summary = {"model": label, "weights_sha256_16": fingerprint, "seed": args.seed, "cases": len(ex),
               "verify": verified, "searches": {}}
    _say(f"\n{'search':16s} {'frames':>7s} {'same frame':>10s} {'same WFSS':>9s} {'same/WFSS':>9s} "
         f"{'WFSS':>6s} {'score':>7s} {'d score':>8s}")
    base = aggregate([r["_score"] for r in by["exhaustive"]])["score"]["mean"]
    for name, rs in by.items():
        agg = aggregate([r["_score"] for r in rs])
        same_f = np.mean([r["frame"] == ex[r["uuid"]]["frame"] for r in rs])
        same_w = np.mean([r["wfss"] == ex[r["uuid"]]["wfss"] for r in rs])
        either = np.mean([r["frame"] == ex[r["uuid"]]["frame"] or r["wfss"] == ex[r["uuid"]]["wfss"] for r in rs])
        s = {"params": dataclasses.asdict(FastSearch() if name == "fast" else VARIANTS[name])
             if name != "exhaustive" else None,
             "mean_frames_scored": float(np.mean([r["frames_scored"] for r in rs])),
             "same_frame": float(same_f), "same_wfss": float(same_w), "same_frame_or_wfss": float(either),
             "wfss": agg["wfss"]["mean"], "dice_soft": agg["dice_soft"]["mean"], "nae_ac": agg["nae_ac"]["mean"],
             "score": agg["score"]["mean"], "score_minus_exhaustive": agg["score"]["mean"] - base}
        summary["searches"][name] = s
        _say(f"{name:16s} {s['mean_frames_scored']:7.1f} {100 * same_f:9.1f}% {100 * same_w:8.1f}% "
             f"{100 * either:8.1f}% {s['wfss']:6.3f} {s['score']:7.4f} {s['score_minus_exhaustive']:+8.4f}")
    with open(out / "compare_search.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if not k.startswith("_")])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if not k.startswith("_")} for r in rows)
    (out / "compare_search.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    fa = summary["searches"]["fast"]
    ok = fa["same_frame_or_wfss"] >= 0.95 and fa["score_minus_exhaustive"] >= -0.01
    _say(f"\nfast (default FastSearch): same frame or WFSS on {100 * fa['same_frame_or_wfss']:.1f}% of cases "
         f"(target >= 95%), score {fa['score_minus_exhaustive']:+.4f} vs exhaustive (target >= -0.01): "
         f"{'PASS' if ok else 'FAIL'}; written {out / 'compare_search.csv'}, {out / 'compare_search.json'}")
    return 0


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fetaliqa.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--case-batch-size", type=int, default=None, help="batch of the full-case runs "
                                                                     "(default: --batch-size)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--model", type=Path, default=None, help="exported model for the 'default' geometry "
                                                             "(default: resources/model)")
    p.add_argument("--geometry", nargs="+", choices=["fetalclip", "default"], default=["fetalclip", "default"])
    p.add_argument("--image", type=Path, default=None, help="full-case .mha (default: simulate one)")
    p.add_argument("--case-seed", type=int, default=900000, help="seed of the simulated full case")
    p.add_argument("--exhaustive-frames", type=int, default=16,
                   help="FetalCLIP geometry on CPU: frames timed for the extrapolated exhaustive pass and the "
                        "per-frame figures (0: run it whole)")
    p.add_argument("--skip-frame", action="store_true", help="skip the per-frame option figures")
    p.add_argument("--skip-case", action="store_true", help="skip the full-case runs")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    p.add_argument("--int8-small", action="store_true", help="also measure int8 on the small model")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    c = p.add_argument_group("--compare-search")
    c.add_argument("--compare-search", action="store_true")
    c.add_argument("--cases", type=int, default=30)
    c.add_argument("--seed", type=int, default=900000, help="run seed of the simulated cases (case_seed(seed, i))")
    c.add_argument("--data", type=Path, default=None, help="release-layout folder instead of simulating")
    c.add_argument("--verify", type=int, default=2, help="cases also run for real through the fast path")
    c.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench_results/compare-search-seed<SEED>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image is not None and not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    if args.model is not None and not is_exported_model(args.model):
        parser.error(f"--model {args.model}: not an exported fetaliqa model (model.json + model.safetensors)")
    if args.cases < 1 or args.batch_size < 1 or args.exhaustive_frames < 1 or args.verify < 0:
        parser.error("--cases, --batch-size and --exhaustive-frames must be >= 1, --verify >= 0")
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available here")
        _say(f"device: {torch.cuda.get_device_name(device)}, fp16 autocast")
    else:
        _say(f"device: CPU, {torch.get_num_threads()} threads, fp32; load {os.getloadavg()[0]:.1f} "
             f"(1-min average: figures are only comparable on a quiet machine)")
    if args.compare_search:
        return compare_search(args, device)
    from .io import read_stack

    figures: dict = {"device": str(device), "threads": torch.get_num_threads(), "frame": [], "case": []}
    with tempfile.TemporaryDirectory(prefix="fetaliqa-bench-") as td:
        tmp = Path(td)
        image = case_image(tmp, args.image, args.case_seed)
        stack, _ = read_stack(image)
        for geo in args.geometry:
            if geo == "fetalclip":
                _say("\nexporting FetalCLIP-SEG with random weights (deployable format) ...")
                model_dir, label = fetalclip_random_model(tmp / "fetalclip"), "FetalCLIP geometry (random weights)"
            else:
                model_dir, label = default_model(tmp / "small", args.model)
            if not args.skip_frame:
                figures["frame"] += frame_section(label, model_dir, stack, args, device)
            if not args.skip_case:
                figures["case"] += case_section(label, model_dir, image, args, device, tmp)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
