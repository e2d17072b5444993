"""FetalIQAModel: FetalCLIP vision tower + SEG decoder and/or CLS head (+ a convolutional frame head)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ConvStem, build_vision_tower
from .config import ModelConfig
from .decoder import SegDecoder


class FrameHead(nn.Sequential):
    """A frame classifier beside the encoder, on the model's input: ``ConvStem(width, patch_size)``
    (log2(patch) stages of a stride-2 and, by default, a stride-1 3x3 convolution with batch
    norm: ``convs_per_stage`` 2; the probe's --stem-convs varies it), global
    average pooling, a linear layer. (B, 3, S, S) normalised -> (B,) logits, S divisible by
    patch_size. It exists because a vision transformer trained from random weights on a few
    hundred annotated frames does not learn the frame label, while these convolutions do
    (``training.probe --arch stem``; docs/training.md); with FetalCLIP's pretrained encoder
    the published heads need no such help."""

    def __init__(self, width: int = 128, patch_size: int = 16, convs_per_stage: int = 2) -> None:
        super().__init__(ConvStem(width, patch_size, convs_per_stage), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 1), nn.Flatten(0))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B,), the stem's features (B, width, S/patch, S/patch)): for training that
        also supervises the features (``training.frame_head``, --frame-mask-weight)."""
        feats = out = self[0](x)
        for layer in list(self)[1:]:
            out = layer(out)
        return out, feats


class FetalIQAModel(nn.Module):
    """``model(x)`` with x float (B, 3, S, S) normalised -> {"seg": (B, 1, S, S), "cls": (B,),
    "frame": (B,)} logits, one entry per configured head.

    ``encode`` and ``heads_forward`` split the forward so a frozen encoder's features can be
    cached by training. Attributes: ``config`` (ModelConfig), ``provenance`` (dict, filled by
    ``load_exported``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.provenance: dict[str, Any] = {}
        self.encoder = build_vision_tower(cfg)
        width = int(cfg.vision_cfg()["width"])
        self.decoder = SegDecoder(width, cfg.decoder_width) if "seg" in cfg.heads else None
        self.cls_head = nn.Linear(cfg.embed_dim, 1) if "cls" in cfg.heads else None
        self.frame_head = FrameHead() if "frame" in cfg.heads else None
        # open_clip returns each requested block once, in depth order: ask for the distinct
        # blocks and map them back to the configured (possibly repeated) taps
        self._indices = sorted({t - 1 for t in cfg.taps})
        self._take = [self._indices.index(t - 1) for t in cfg.taps]

    def encode(self, x: torch.Tensor) -> dict[str, Any]:
        """{"feats": [tapped block outputs, (B, width, g, g) with g = S // 16], "pooled": (B, embed_dim) or None}."""
        frozen = self.config.encoder_mode == "frozen"
        need_pooled = self.cls_head is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.encoder.forward_intermediates(
                x, indices=self._indices if self.decoder is not None else [len(self.encoder.transformer.resblocks) - 1],
                stop_early=not need_pooled, intermediates_only=not need_pooled, output_fmt="NCHW")
        g = x.shape[-1] // 16
        inter = out["image_intermediates"]
        feats = [inter[j] if inter[j].shape[-1] == g else
                 F.interpolate(inter[j], size=(g, g), mode="bilinear", align_corners=False)
                 for j in self._take] if self.decoder is not None else []
        return {"feats": feats, "pooled": out.get("image_features")}

    def heads_forward(self, enc: dict[str, Any], x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.decoder is not None:
            out["seg"] = self.decoder(enc["feats"], x)
        if self.cls_head is not None:
            out["cls"] = self.cls_head(enc["pooled"]).squeeze(-1)
        if self.frame_head is not None:
            out["frame"] = self.frame_logits(x)
        return out

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) frame-head logits, averaged over ``config.frame_views`` of x (normalised input):
        each view rotated about the centre and/or mirrored left-right, bilinear, black (the
        normalised value of pixel 0) where the view leaves the frame."""
        logits = []
        black = (-torch.tensor(self.config.mean, dtype=x.dtype, device=x.device)
                 / torch.tensor(self.config.std, dtype=x.dtype, device=x.device)).view(1, -1, 1, 1)
        for deg, mirror in self.config.frame_views:
            v = x.flip(-1) if mirror else x
            if deg:
                a = math.radians(deg)
                theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                                     dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
                grid = F.affine_grid(theta, list(x.shape), align_corners=False)
                v = F.grid_sample(v - black, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + black
            logits.append(self.frame_head(v))
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads_forward(self.encode(x), x)
