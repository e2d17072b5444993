"""Frames -> model input and model output -> native grid, batched in torch on any device.

Geometry: a (rows, cols) frame is zero-padded to a centred square of side max(rows, cols)
(562x744 -> 744x744: 91 rows above, 91 below), resized to ``size`` (224). The inverse
resizes back to the padded square and crops the padding. Work on one batch at a time: a
float copy of a whole 840-frame stack at 224x224x3 is never needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model.config import CLIP_MEAN, CLIP_STD, ModelConfig


def _pads(rows: int, cols: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that centres a rows x cols frame in a square."""
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    return left, side - cols - left, top, side - rows - top


def pad_resize(frames: torch.Tensor, size: int = 224, mode: str = "bicubic") -> torch.Tensor:
    """(B, rows, cols) uint8/float grey frames -> (B, size, size) float32 in 0..255.

    Bicubic with antialiasing (as PIL's resize that CLIP preprocessing uses), clamped to
    0..255 because bicubic overshoots. The antialiased modes resize the columns first, on the
    frame's own rows (the padding rows are zeros and stay zeros), and then the rows of the
    padded height: the values of resizing the padded square in one call, bit for bit on the
    CPU (test_preprocess), for about three quarters of the work on a 562x744 frame.
    """
    rows = frames.shape[-2]
    left, right, top, bottom = _pads(*frames.shape[-2:])
    x = frames.float()[:, None]
    if mode not in ("bilinear", "bicubic"):
        x = F.interpolate(F.pad(x, (left, right, top, bottom)), size=(size, size), mode=mode)
        return x[:, 0].clamp_(0.0, 255.0)
    x = F.interpolate(F.pad(x, (left, right, 0, 0)), size=(rows, size), mode=mode, antialias=True,
                      align_corners=False)
    x = F.interpolate(F.pad(x, (0, 0, top, bottom)), size=(size, size), mode=mode, antialias=True,
                      align_corners=False)
    return x[:, 0].clamp_(0.0, 255.0)


def normalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(B, size, size) in 0..255 -> (B, 3, size, size): grey copied to 3 channels, CLIP-normalised."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float()[:, None] / 255.0 - m) / s


def frames_to_model_input(frames: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, rows, cols) uint8/float frames on any device -> float32 (B, 3, S, S) model input."""
    return normalize(pad_resize(frames, cfg.image_size, cfg.resize_mode), cfg.mean, cfg.std)


def masks_to_square(masks: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(B, rows, cols) label masks -> (B, size, size) same dtype, nearest neighbour (pixel centres).
    uint8 masks are resized as they are (nearest copies values: the same result as through
    float, a tenth of the time); other dtypes go through float32."""
    x = masks[:, None] if masks.dtype == torch.uint8 else masks[:, None].float()
    x = F.interpolate(F.pad(x, _pads(*masks.shape[-2:])), size=(size, size), mode="nearest-exact")
    return x[:, 0].to(masks.dtype)


def square_to_native(prob: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, size, size) probabilities/logits -> (B, rows, cols) float32 on the native grid
    (bilinear to the padded square, padding cropped)."""
    left, right, top, bottom = _pads(rows, cols)
    side = max(rows, cols)
    x = F.interpolate(prob[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    return x[:, 0, top:top + rows, left:left + cols]


def iter_frame_batches(stack: np.ndarray, indices: Sequence[int], batch_size: int,
                       device: str | torch.device = "cpu") -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (frame indices, uint8/native-dtype (b, rows, cols) tensor on ``device``) batches
    of ``stack[indices]``; only one batch is ever copied."""
    indices = list(indices)
    for i in range(0, len(indices), batch_size):
        idx = indices[i:i + batch_size]
        yield idx, torch.from_numpy(np.ascontiguousarray(stack[idx])).to(device, non_blocking=True)
