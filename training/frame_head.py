"""The frame head's training stage (``training.train --frame-steps N``) and the frame-classifier
loop it shares with ``training.probe``.

A vision transformer trained from random weights on a few hundred annotated frames does not
learn the frame label (docs/training.md, the probe), while a few convolutions pooled into a
linear layer do, and cheaply: ``fetaliqa.model.heads.FrameHead``. After the SEG head has
trained, and before calibration, this stage fits a FrameHead alone (the SEG model untouched)
on the training cases: every epoch all annotated frames plus ``neg_ratio`` x as many others
(``train.epoch_rows``), the training augmentation, binary cross-entropy, AdamW with warmup
steps and cosine decay, gradient norm clipped at 1. With ``--frame-mask-weight w`` the loss
adds w x a per-cell BCE: a 1x1 convolution on the stem's cells (7x7 at 112), trained with the
head and then dropped, predicts how much of each cell the (augmented) label mask covers. That
deep supervision says where the annotated section lies, not only whether: the frame loss then
leaves its base-rate plateau after a few hundred steps instead of about 1,500 (docs/training.md).
The head's probability then multiplies each frame's quality score (``fetaliqa.select``), and
calibration sets the score cut with it; with ``--good-by frame`` (the default preset's) its
probability alone, smoothed over the temporal window, decides which frames are good, at a cut
calibrated the same way (``ModelConfig.frame_threshold``).

The trained head is kept in ``OUT/frame_head.pt`` with the settings it was trained under; a
``--resume`` that finds the same settings (and the same cache) loads it instead of training it
again. The stage itself restarts from its first step if interrupted (minutes on a CPU).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fetaliqa.model.heads import FrameHead
from fetaliqa.preprocess import normalize

from .augment import AugmentConfig, augment_batch

FRAME_HEAD_FILE = "frame_head.pt"


class MaskSupervised(nn.Module):
    """A FrameHead with a 1x1 convolution on its stem's cells, for mask supervision
    (``--frame-mask-weight``): ``forward(x)`` -> (frame logits (B,), cell logits (B, 1, g, g)),
    what ``fit_frame_classifier(mask_weight > 0)`` wants. Only ``head`` outlives training."""

    def __init__(self, head: FrameHead) -> None:
        super().__init__()
        self.head = head
        self.cells = nn.Conv2d(head[0][-1].out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.head.forward_features(x)
        return logits, self.cells(feats)


def fit_frame_classifier(net: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], cache, pos: np.ndarray,
                         neg: np.ndarray, *, steps: int, batch_size: int, lr: float, weight_decay: float,
                         warmup: int, neg_ratio: float, seed: int, augment: AugmentConfig | None,
                         hard: np.ndarray | None = None, hard_frac: float = 0.0, mask_weight: float = 0.0,
                         label_policy: str = "any", device: torch.device | str = "cpu", channels_last: bool = False,
                         progress: bool = True, desc: str = "frame head") -> dict:
    """Train ``net`` (all its parameters) as a binary frame classifier for ``steps`` steps of
    ``batch_size`` cache rows; ``forward`` maps augmented frames (B, S, S) float 0..255 to (B,)
    logits through ``net`` (on ``device``). pos, neg: annotated and other training rows.
    Augmentation (on the CPU) from a generator seeded with ``seed`` (None: off). hard, hard_frac:
    that fraction of each epoch's negatives drawn from ``hard`` (``train.epoch_rows``).
    mask_weight > 0: deep supervision; ``forward`` returns (logits, cell logits (B, 1, g, g)) and
    the loss adds mask_weight x the BCE of the cells against the fraction of each cell the
    (augmented) label mask covers: where the annotated abdomen lies, not only whether; under
    ``label_policy`` "optimal" only the optimal label (1) covers, as the frame labels say.
    channels_last: ``net`` trains in that memory format (back to the default after) and
    ``forward`` should feed it NHWC-strided input: the CPU's convolutions run about 30 % faster
    so (the same maths up to float reassociation).
    Returns {"steps", "epochs_started", "minutes", "loss_curve": mean frame loss (and mask loss)
    of every 50 steps}."""
    from .train import epoch_rows, lr_factor

    labels = np.zeros(int(max(pos.max(initial=-1), neg.max(initial=-1))) + 1, bool)
    labels[pos] = True
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    net.train()
    losses, mask_losses, curve, t0, step, epoch = [], [], [], time.time(), 0, 0
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    while step < steps:
        rows = epoch_rows(pos, neg, neg_ratio, seed, epoch, hard, hard_frac)
        if len(rows) < batch_size:
            raise ValueError(f"an epoch holds {len(rows)} frames, fewer than the batch size {batch_size}")
        for k in range(0, len(rows) - batch_size + 1, batch_size):
            batch = np.sort(rows[k:k + batch_size])
            x = torch.from_numpy(cache.frames[batch].astype(np.float32))
            m = torch.from_numpy(cache.masks[batch]) if augment is not None or mask_weight > 0 else None
            if augment is not None:
                x, m = augment_batch(x, m, augment, gen)
            x, y = x.to(device), torch.from_numpy(labels[batch].astype(np.float32)).to(device)
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, steps, warmup, "cosine")
            if mask_weight > 0:
                logits, cells = forward(x)
                covered = (m == 1) if label_policy == "optimal" else (m > 0)
                cover = F.adaptive_avg_pool2d(covered.float()[:, None].to(device), cells.shape[-2:])
                mask_loss = F.binary_cross_entropy_with_logits(cells, cover)
                mask_losses.append(mask_loss.item())
            else:
                logits, mask_loss = forward(x), 0.0
            loss = F.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            (loss + mask_weight * mask_loss).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update()
            if step % 50 == 0:
                curve.append({"step": step, "loss": float(np.mean(losses[-50:]))})
                if mask_losses:
                    curve[-1]["mask_loss"] = float(np.mean(mask_losses[-50:]))
                bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
            if step == steps:
                break
        epoch += 1
    bar.close()
    net.to(memory_format=torch.contiguous_format).eval()
    return {"steps": step, "epochs_started": epoch, "minutes": (time.time() - t0) / 60, "loss_curve": curve}


def add_frame_head(model: nn.Module, args, cache, pos: np.ndarray, neg: np.ndarray, out: Path) -> dict:
    """Fit a FrameHead on the training rows (or load the one ``out/frame_head.pt`` holds for the
    same settings) and attach it to ``model`` (``model.frame_head``; "frame" joins
    ``model.config.heads``). Returns the stage's settings and figures for the provenance."""
    from .train import atomic_save

    path, device = out / FRAME_HEAD_FILE, next(model.parameters()).device
    settings = {"steps": args.frame_steps, "batch_size": args.frame_batch_size, "lr": args.frame_lr,
                "mask_weight": args.frame_mask_weight,
                "weight_decay": args.weight_decay, "warmup_steps": args.frame_warmup, "neg_ratio": args.neg_ratio,
                "seed": args.run_seed, "augment": not args.no_augment, "label_policy": args.label_policy,
                "cache_fingerprint": cache.meta.get("fingerprint"), "positives": int(len(pos)),
                "training_frames": int(len(pos) + len(neg)), "channels_last": True}
    if args.label_policy == "optimal" and args.frame_mask_weight > 0:  # heads saved before this covered label 2 too
        settings["mask_cover"] = "optimal label only"
    saved = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
    reuse = saved is not None and saved.get("settings") == settings
    if reuse:
        head = FrameHead()
        head.load_state_dict(saved["state"])
        info = saved["info"]
        print(f"[train] frame head: loaded {path} ({info['steps']} steps)", file=sys.stderr)
    else:
        torch.manual_seed(args.run_seed)
        head, cfg = FrameHead().to(device), model.config
        net = MaskSupervised(head).to(device) if args.frame_mask_weight > 0 else head
        print(f"[train] frame head: {sum(p.numel() for p in head.parameters()):,} parameters, {args.frame_steps} "
              f"steps of {args.frame_batch_size} ({len(pos)} annotated of {len(pos) + len(neg)} training frames"
              + (f"; mask supervision x {args.frame_mask_weight:g}" if net is not head else "") + ")",
              file=sys.stderr)
        info = fit_frame_classifier(
            net, lambda x: net(normalize(x, cfg.mean, cfg.std).contiguous(memory_format=torch.channels_last)),
            cache, pos, neg, steps=args.frame_steps, batch_size=args.frame_batch_size, lr=args.frame_lr,
            weight_decay=args.weight_decay, warmup=args.frame_warmup, neg_ratio=args.neg_ratio, seed=args.run_seed,
            augment=None if args.no_augment else AugmentConfig(), mask_weight=args.frame_mask_weight,
            label_policy=args.label_policy, device=device,
            channels_last=True, progress=args.progress)
        atomic_save({"settings": settings, "state": {k: v.cpu() for k, v in head.state_dict().items()},
                     "info": info}, path)
    final_loss = info["loss_curve"][-1]["loss"] if info["loss_curve"] else None
    if not reuse:
        print(f"[train] frame head: {info['steps']} steps in {info['minutes']:.1f} min, training loss "
              f"{final_loss if final_loss is not None else float('nan'):.3f} (mean of the last 50 steps)",
              file=sys.stderr)
    model.frame_head = head.to(device).eval()
    if "frame" not in model.config.heads:
        model.config = dataclasses.replace(model.config, heads=(*model.config.heads, "frame"))
    return {"settings": settings, "steps": info["steps"], "minutes": round(info["minutes"], 2),
            "final_loss": final_loss}
