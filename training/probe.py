"""Learnability probe: can a frame classifier trained from scratch tell annotated frames apart?

``python -m training.probe --run RUN --arch cnn|vit|vit-conv|stem`` trains a small binary frame
classifier on a training run's own frame cache and training cases (``RUN/args.json``,
``RUN/split.json``), with the run's augmentation and epoch sampling (all positives plus
``--neg-ratio`` x as many negatives), BCE, AdamW with warmup and cosine decay, for a fixed
number of steps (the loop of ``training.frame_head``), then scores every frame of the run's
validation cases and reports frame AUROC, AUPRC and the F1 of the best cut chosen in
hindsight on those frames (an upper bound for that classifier's per-frame decision). Beside
it, the same figures of the run's own model from its ``calibration.json``.

It is a diagnostic, not part of the product: it separates what the labels demand from what
a given encoder learns in a given budget. Architectures:

- ``cnn``: five stages of two 3x3 convolutions with batch norm (widths w, 2w, 4w, 8w, 8w),
  max-pooling between them, global average pooling, a linear head; a convolutional bias.
- ``vit``: the run's own vision tower (geometry and stem from ``RUN/args.json``) with
  FetalCLIP-CLS's linear head on the pooled token, every weight trained.
- ``vit-conv``: that tower with 8-pixel tokens embedded by three stride-2 3x3 convolutions
  with batch norm and a 1x1 projection in place of the patch embedding (early convolutions,
  Xiao et al. 2021: ``ConvStem`` with one convolution per stage).
- ``stem``: the convolutional stem of ``--stem conv`` (``fetaliqa.model.backbone.ConvStem``,
  16-pixel tokens of width 128, the default's) with global average pooling and a linear head:
  that tower without its transformer, and the product's frame head
  (``fetaliqa.model.heads.FrameHead``, ``training.train --frame-steps``).

Options that vary the stem probe as the frame-head stage can be varied: ``--channels-last``
(the stage's memory layout), ``--mask-weight W`` (its mask supervision, ``--frame-mask-weight``),
``--stem-convs 1`` (one convolution per stage); and for any arch ``--hard-neg-frac F``
(``train.epoch_rows``' hard negatives: that fraction of the negatives from annotated sweeps).

Writes ``OUT/probe.json`` (figures, settings, the mean training loss of every 50 steps) and
``OUT/val_scores.npy`` (one probability per validation frame, in cache row order).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fetaliqa.metrics import frame_metrics
from fetaliqa.model import build_model
from fetaliqa.model.backbone import ConvStem
from fetaliqa.model.heads import FrameHead
from fetaliqa.preprocess import normalize

from .augment import AugmentConfig
from .cache import FrameCache
from .calibrate import calibrate_score_threshold
from .frame_head import MaskSupervised, fit_frame_classifier
from .splits import Split
from .train import same_sweep_negatives

ARCHS = ("cnn", "vit", "vit-conv", "stem")


def _cbr(i: int, o: int) -> list[nn.Module]:
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


def small_cnn(width: int = 32) -> nn.Module:
    """(B, 1, S, S) standardised grey frames -> (B,) logits."""
    w = [width, 2 * width, 4 * width, 8 * width, 8 * width]
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip([1] + w[:-1], w)):
        layers += (_cbr(i, o) + _cbr(o, o)) + ([nn.MaxPool2d(2)] if k < len(w) - 1 else [])
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w[-1], 1), nn.Flatten(0))


def run_model_config(run_args: dict, *, heads: str = "seg", patch_size: int | None = None):
    """The ModelConfig a run's args.json describes (geometry only: random init), via train's own parser."""
    from .train import build_parser, model_config

    args = build_parser().parse_args(["--out", "unused", "--cache", "unused"])
    for k in ("backbone", "image_size", "patch_size", "stem", "decoder_width"):
        if run_args.get(k) is not None:
            setattr(args, k, run_args[k])
    args.heads, args.encoder, args.weights = heads, "full", None
    if patch_size is not None:  # another token size: the plain patch embedding of that size
        args.patch_size, args.stem = patch_size, "patch"
    return model_config(args)


class ViTClassifier(nn.Module):
    """A run's vision tower + CLS head on (B, 1, S, S) grey frames in 0..255 -> (B,) logits."""

    def __init__(self, run_args: dict, conv_stem: bool) -> None:
        super().__init__()
        cfg = run_model_config(run_args, heads="cls", patch_size=8 if conv_stem else None)
        self.model = build_model(cfg, adapters=False)
        if conv_stem:
            self.model.encoder.conv1 = ConvStem(int(cfg.vision_cfg()["width"]), 8, convs_per_stage=1)
        for p in self.model.parameters():
            p.requires_grad = True
        self.mean, self.std = cfg.mean, cfg.std

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(grey.squeeze(1), self.mean, self.std))["cls"]


class StemClassifier(nn.Module):
    """The product's frame head (``fetaliqa.model.heads.FrameHead``: ``ConvStem`` with 16-pixel
    tokens of width 128, global average pooling, a linear layer) on (B, 1, S, S) grey frames in
    0..255 -> (B,) logits, normalised as the run's model normalises them."""

    def __init__(self, run_args: dict, convs_per_stage: int = 2, channels_last: bool = False,
                 mask_supervised: bool = False) -> None:
        """channels_last: feed the head NHWC-strided input (--channels-last); mask_supervised: a
        ``MaskSupervised`` wrapper of the head for ``forward_with_cells`` (--mask-weight)."""
        super().__init__()
        cfg = run_model_config(run_args, heads="cls")
        self.net = FrameHead(convs_per_stage=convs_per_stage)
        self.mean, self.std = cfg.mean, cfg.std
        self.channels_last = channels_last
        self.supervised = MaskSupervised(self.net) if mask_supervised else None

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.net(self._input(grey))

    def forward_with_cells(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(frame logits, the stem's cell logits (B, 1, g, g)) for --mask-weight."""
        return self.supervised(self._input(grey))

    def _input(self, grey: torch.Tensor) -> torch.Tensor:
        x = normalize(grey.squeeze(1), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def build_probe(arch: str, run_args: dict, width: int, stem_convs: int = 2, channels_last: bool = False,
                mask_supervised: bool = False) -> tuple[nn.Module, str]:
    """The classifier and the input it wants: "standard" ((x - 128) / 64) or "raw" (0..255).
    stem_convs, channels_last, mask_supervised: ``StemClassifier``'s (--arch stem only)."""
    if arch == "cnn":
        return small_cnn(width), "standard"
    if arch in ("vit", "vit-conv"):
        return ViTClassifier(run_args, conv_stem=arch == "vit-conv"), "raw"
    if arch == "stem":
        return StemClassifier(run_args, stem_convs, channels_last, mask_supervised), "raw"
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _inputs(frames: torch.Tensor, kind: str) -> torch.Tensor:
    return ((frames - 128) / 64 if kind == "standard" else frames).unsqueeze(1)


def run_cache(run: Path, run_args: dict) -> Path:
    """The frame cache the run trained on (train.py's default location when it named none)."""
    if run_args.get("cache"):
        return Path(run_args["cache"])
    if not run_args.get("data"):
        raise ValueError(f"{run}/args.json names neither a cache nor a data folder")
    from .train import default_cache_dir

    size = run_args.get("image_size") or run_model_config(run_args).image_size
    return default_cache_dir(run_args["data"], run_args.get("selection", "published"), size)


def run_model_figures(run: Path) -> dict | None:
    """The run's own model on the same validation frames, from its calibration.json: AUROC and
    AUPRC of its foreground area, F1 at its area cut and (when calibrated) at its quality-score cut."""
    path = run / "calibration.json"
    if not path.exists():
        return None
    cal = json.loads(path.read_text())
    ranked = cal.get("calibrated") or {}
    out = {"auroc": ranked.get("auroc"), "auprc": ranked.get("auprc"), "f1_area_cut": cal.get("f1")}
    if isinstance(cal.get("score_decision"), dict):
        out["f1_quality_score_cut"] = cal["score_decision"].get("f1")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a training run folder (args.json, split.json)")
    p.add_argument("--cache", type=Path, help="frame cache (default: the run's)")
    p.add_argument("--arch", choices=ARCHS, default="cnn")
    p.add_argument("--steps", type=int, default=1300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50, help="warmup steps")
    p.add_argument("--neg-ratio", type=float, default=2.0)
    p.add_argument("--hard-neg-frac", type=float, default=0.0,
                   help="this fraction of each epoch's negatives from the sweeps that hold an annotated frame")
    p.add_argument("--width", type=int, default=32, help="first stage width of the cnn")
    p.add_argument("--stem-convs", type=int, default=2,
                   help="stem: 3x3 convolutions per stage (the first strided), 2 as in the frame head's default")
    p.add_argument("--channels-last", action="store_true",
                   help="stem: train in the channels-last layout, as the frame-head stage does (faster on CPUs)")
    p.add_argument("--mask-weight", type=float, default=0.0,
                   help="stem: deep supervision, weight of a per-cell BCE against the label mask's coverage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="default: RUN/probe-ARCH")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.stem_convs < 1:
        sys.exit("--steps, --batch-size and --stem-convs must be >= 1")
    if not 0 <= args.hard_neg_frac <= 1 or not args.mask_weight >= 0:
        sys.exit("--hard-neg-frac must be in [0, 1] and --mask-weight >= 0")
    if (args.channels_last or args.mask_weight or args.stem_convs != 2) and args.arch != "stem":
        sys.exit("--channels-last, --mask-weight and --stem-convs are for --arch stem")
    if args.threads:
        torch.set_num_threads(args.threads)
    for need in ("args.json", "split.json"):
        if not (args.run / need).exists():
            sys.exit(f"{args.run}: no {need}; --run takes the folder `python -m training.train --out` wrote")
    run_args = json.loads((args.run / "args.json").read_text())
    try:
        cache = FrameCache(args.cache or run_cache(args.run, run_args))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{e}\n(paths in args.json are relative to where the run was started; --cache names the cache)")
    split = Split.load(args.run / "split.json")
    labels = cache.binary_labels(run_args.get("label_policy", "any"))
    train_rows, val_rows = cache.rows_of(split.train), cache.rows_of(split.val)
    pos, neg = train_rows[labels[train_rows]], train_rows[~labels[train_rows]]
    if not len(pos) or not labels[val_rows].any():
        sys.exit("the probe needs annotated frames in both the training and the validation cases")

    torch.manual_seed(args.seed)
    net, kind = build_probe(args.arch, run_args, args.width, args.stem_convs, args.channels_last,
                            mask_supervised=args.mask_weight > 0)
    out = args.out or args.run / f"probe-{args.arch}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"probe {args.arch}: {sum(p.numel() for p in net.parameters()):,} parameters; "
          f"{len(pos)} annotated of {len(train_rows)} training frames, {int(labels[val_rows].sum())} of "
          f"{len(val_rows)} validation frames; {args.steps} steps of {args.batch_size}", file=sys.stderr)
    try:
        forward = (lambda x: net.forward_with_cells(_inputs(x, kind))) if args.mask_weight else (
            lambda x: net(_inputs(x, kind)))
        fit = fit_frame_classifier(net, forward, cache, pos, neg, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                                   warmup=args.warmup, neg_ratio=args.neg_ratio, seed=args.seed,
                                   augment=AugmentConfig(), channels_last=args.channels_last,
                                   hard=same_sweep_negatives(cache.index, pos, neg) if args.hard_neg_frac else None,
                                   hard_frac=args.hard_neg_frac, mask_weight=args.mask_weight,
                                   label_policy=run_args.get("label_policy", "any"),
                                   progress=args.progress, desc="probe")
    except ValueError as e:  # an epoch smaller than a batch
        sys.exit(f"{e}: lower --batch-size")
    step, epoch, minutes, curve = fit["steps"], fit["epochs_started"], fit["minutes"], fit["loss_curve"]

    scores = []
    with torch.no_grad():
        for k in range(0, len(val_rows), 256):
            x = torch.from_numpy(cache.frames[val_rows[k:k + 256]].astype(np.float32))
            scores.append(torch.sigmoid(net(_inputs(x, kind))).numpy())
    s, y = np.concatenate(scores), labels[val_rows]
    ranked = frame_metrics(s, y, 0.5)
    best = calibrate_score_threshold(s, y)
    result = {"arch": args.arch, "steps": step, "epochs_started": epoch, "train_minutes": round(minutes, 2),
              "auroc": ranked["auroc"], "auprc": ranked["auprc"], "f1_best_cut": best["f1"],
              "best_cut": best["score_threshold"], "f1_at_0.5": ranked["f1"],
              "validation_frames": int(len(val_rows)), "validation_positives": int(y.sum()),
              "run_model": run_model_figures(args.run), "settings": {k: str(v) if isinstance(v, Path) else v
                                                                     for k, v in vars(args).items()},
              "loss_curve": curve}
    np.save(out / "val_scores.npy", s.astype(np.float32))
    (out / "probe.json").write_text(json.dumps(result, indent=1, allow_nan=True))
    print(f"{args.arch}, {step} steps in {minutes:.1f} min: validation frames AUROC {ranked['auroc']:.3f}, "
          f"AUPRC {ranked['auprc']:.3f}, F1 of the best cut (hindsight) {best['f1']:.3f}")
    rm = result["run_model"]
    if rm and rm.get("auroc") is not None:
        extra = (f", quality-score cut {rm['f1_quality_score_cut']:.3f}"
                 if rm.get("f1_quality_score_cut") is not None else "")
        print(f"the run's own model on these frames (calibration.json): foreground area AUROC {rm['auroc']:.3f}, "
              f"AUPRC {rm['auprc']:.3f}, F1 at its calibrated area cut {rm['f1_area_cut']:.3f}{extra}")
    print(f"wrote {out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
