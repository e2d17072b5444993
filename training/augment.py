"""Online augmentation in torch, applied jointly to a batch of frames and their masks.

Frames are float (B, S, S) in the 0..255 range (before CLIP normalisation), masks (B, S, S)
of any numeric dtype (targets or labels). One affine (translate, rotate, scale) warps both:
bilinear for frames, nearest for masks, zero outside. Intensity changes (contrast, gamma,
brightness, noise, blur) touch only the frame and only inside the warped fan, so pixels
outside the ultrasound sector stay 0 as in real stacks. All randomness comes from one
`torch.Generator` (CPU) so a resumed run reproduces the same augmentations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (each sampled uniformly per frame).

    translate: fraction of the side (0.2 = +-20 %, as published); rotate: degrees;
    scale: log-uniform in [1/scale, scale]; contrast: multiplier 1 +- contrast about the
    fan mean; gamma: exponent in [1/gamma, gamma]; brightness: +- fraction of 255;
    noise: Gaussian std up to this fraction of 255; blur: Gaussian sigma up to this many
    pixels; p_*: probability each group is applied."""
    translate: float = 0.2
    rotate: float = 20.0
    scale: float = 1.15
    contrast: float = 0.25
    gamma: float = 1.3
    brightness: float = 0.1
    noise: float = 0.04
    blur: float = 1.0
    p_affine: float = 0.8
    p_intensity: float = 0.8
    p_noise: float = 0.3
    p_blur: float = 0.2


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _on(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def affine_matrices(n: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) sampling grids' matrices (output -> input, normalised coordinates)."""
    on = _on(n, cfg.p_affine, g).float()
    ang = torch.deg2rad(_u(n, -cfg.rotate, cfg.rotate, g)) * on
    s = torch.exp(_u(n, -math.log(cfg.scale), math.log(cfg.scale), g) * on)
    t = _u(2 * n, -2 * cfg.translate, 2 * cfg.translate, g).view(n, 2) * on[:, None]  # [-1,1] spans 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    return torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)


def warp(frames: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply (B, 2, 3) affines to frames (bilinear) and masks (nearest) alike."""
    theta = theta.to(frames.device, torch.float32)
    grid = F.affine_grid(theta, [frames.shape[0], 1, *frames.shape[-2:]], align_corners=False)
    f = F.grid_sample(frames[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return f[:, 0], m[:, 0].to(masks.dtype)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-frame separable Gaussian blur; sigma (B,) in pixels (0 = unchanged)."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    r = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (r[None] / sigma.clamp_min(1e-3).to(x)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K); sigma ~0 -> a delta
    b = x.shape[0]
    y = F.conv2d(F.pad(x[None], (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b)
    return y[0]


def augment_batch(frames: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """frames float (B, S, S) 0..255, masks (B, S, S) -> augmented copies (same dtypes, device)."""
    n, dev = frames.shape[0], frames.device
    frames, masks = warp(frames, masks, affine_matrices(n, cfg, g))
    fan = frames > 0
    area = fan.sum((1, 2)).clamp_min(1)
    mean = (frames * fan).sum((1, 2)) / area
    on = _on(n, cfg.p_intensity, g).float()
    c = (1 + _u(n, -cfg.contrast, cfg.contrast, g) * on).to(dev)
    gam = torch.exp(_u(n, -math.log(cfg.gamma), math.log(cfg.gamma), g) * on).to(dev)
    br = (_u(n, -cfg.brightness, cfg.brightness, g) * 255 * on).to(dev)
    x = (frames - mean[:, None, None]) * c[:, None, None] + mean[:, None, None]
    x = 255 * (x.clamp(0, 255) / 255) ** gam[:, None, None] + br[:, None, None]
    sig = (_u(n, 0, cfg.noise, g) * 255 * _on(n, cfg.p_noise, g)).to(dev)
    noise = torch.randn(frames.shape, generator=g).to(dev)
    x = x + noise * sig[:, None, None]
    blur = _u(n, 0, cfg.blur, g) * _on(n, cfg.p_blur, g)
    if bool((blur > 0.05).any()):
        x = _gaussian_blur(x, blur.to(dev))
    x = torch.where(fan, x.clamp(0, 255), torch.zeros_like(x))
    return x, masks
