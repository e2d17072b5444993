"""Evaluate an exported model on simulated cases (or a release-layout folder) with the
project's metrics: frame-level F1/precision/recall/AUROC and the challenge score.

    python -m training.evaluate --model resources/model --cases 20 --seed 2026
    python -m training.evaluate --model runs/x/model --data /path/to/acouslic --cases 30

Simulated cases use seeds `fetaliqa.simulate.case_seed(seed, i)`; when the model's
provenance lists its training seeds, overlapping evaluation seeds are refused.
Frame level: a frame is positive when it holds any annotation; the model's decision is the
pipeline's per-frame `good` (area above the calibrated thresholds); AUROC ranks frames by
the pipeline's quality score. Case level: `fetaliqa.metrics.score_case` on the chosen frame
and mask (WFSS, soft Dice, NAE of the AC), aggregated as the challenge does.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fetaliqa.metrics import aggregate, frame_metrics, score_case
from fetaliqa.model import load_exported
from fetaliqa.pipeline import analyse_stack


def _cases(args):
    """Yield (name, stack, gt labels, per-sweep ACs)."""
    if args.data is not None:
        from .data import load_case, read_release
        for rec in read_release(args.data)[:args.cases]:
            stack, gt = load_case(rec)
            yield rec.uuid, stack, gt, list(rec.ac_mm)
        return
    from fetaliqa.simulate import SimConfig, case_seed, simulate_case
    cfg = SimConfig(frames_per_sweep=args.frames_per_sweep)
    for i in range(args.cases):
        c = simulate_case(case_seed(args.seed, i), cfg)
        yield c.uuid, c.stack, c.masks, list(c.ac_mm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "resources" / "model")
    p.add_argument("--data", type=Path, help="release-layout folder instead of simulated cases")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=2026, help="simulation seed (must differ from training seeds)")
    p.add_argument("--frames-per-sweep", type=int, default=140)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write per_case.csv and summary.json here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)

    model = load_exported(args.model, device=args.device)
    sim = model.provenance.get("simulation") or {}
    if args.data is None and sim:
        from fetaliqa.simulate import case_seed
        used = {case_seed(sim["seed"], i) for i in range(sim["cases"])}
        clash = [i for i in range(args.cases) if case_seed(args.seed, i) in used]
        if clash:
            print(f"error: evaluation seed {args.seed} reuses training cases {clash[:5]} of {args.model}; "
                  "choose another --seed", file=sys.stderr)
            return 2
    cfg = model.config
    print(f"[evaluate] {args.model}: {cfg.backbone} f={cfg.decoder_width} pixel_threshold={cfg.pixel_threshold:.2f} "
          f"area_threshold={cfg.area_threshold:.4f}", file=sys.stderr)
    rows, scores, all_good, all_q, all_lab = [], [], [], [], []
    t0 = time.time()
    for name, stack, gt, ac in tqdm(_cases(args), total=args.cases, desc="cases", file=sys.stderr):
        a = analyse_stack(stack, model, device=args.device, batch_size=args.batch_size, progress=False)
        cs = score_case(gt, ac, a.frame, a.mask, frames_per_sweep=stack.shape[0] // 6)
        lab = gt.reshape(gt.shape[0], -1).max(1) > 0
        all_good.append(a.good), all_q.append(np.nan_to_num(a.scores, nan=-1.0)), all_lab.append(lab)
        scores.append(cs)
        rows.append({"case": name, "frame": a.frame, "frame_label": int(gt[a.frame].max()) if a.frame >= 0 else -1,
                     "wfss": cs.wfss, "dice": cs.dice, "dice_soft": cs.dice_soft, "nae_ac": cs.nae_ac,
                     "ac_pred_mm": cs.ac_pred_mm, "ac_ref_mm": cs.ac_ref_mm, "score": cs.score,
                     "seconds": round(a.timings.get("total", float("nan")), 1)})
    good, q, lab = map(np.concatenate, (all_good, all_q, all_lab))
    fm_decision = frame_metrics(good.astype(float), lab, 0.5)
    fm_rank = frame_metrics(q, lab, np.inf)
    agg = aggregate(scores)
    summary = {"model": str(args.model), "cases": args.cases, "seed": None if args.data else args.seed,
               "frames": int(len(lab)), "positive_frames": int(lab.sum()),
               "frame": {k: fm_decision[k] for k in ("f1", "precision", "recall", "specificity")}
               | {"auroc": fm_rank["auroc"], "auprc": fm_rank["auprc"]},
               "challenge": {k: agg[k]["mean"] for k in ("wfss", "dice", "dice_soft", "nae_ac", "score")},
               "seconds": round(time.time() - t0, 1)}
    print("\n| case | frame | label | WFSS | soft Dice | NAE | AC pred | AC ref | score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"| {r['case'][:8]} | {r['frame']} | {r['frame_label']} | {fmt(r['wfss'])} | {fmt(r['dice_soft'])} | "
              f"{fmt(r['nae_ac'])} | {fmt(r['ac_pred_mm'])} | {fmt(r['ac_ref_mm'])} | {fmt(r['score'])} |")
    f, c = summary["frame"], summary["challenge"]
    print(f"\nframes: {summary['frames']} ({summary['positive_frames']} positive)")
    print("| frame F1 | precision | recall | AUROC | WFSS | soft Dice | NAE | score |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {f['f1']:.3f} | {f['precision']:.3f} | {f['recall']:.3f} | {f['auroc']:.3f} | {c['wfss']:.3f} | "
          f"{c['dice_soft']:.3f} | {c['nae_ac']:.3f} | {c['score']:.3f} |")
    if args.out:
        import csv
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "per_case.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
