"""FetalIQAModel: FetalCLIP vision tower + SEG decoder and/or CLS head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_vision_tower
from .config import ModelConfig
from .decoder import SegDecoder


class FetalIQAModel(nn.Module):
    """``model(x)`` with x float (B, 3, S, S) normalised -> {"seg": (B, 1, S, S), "cls": (B,)} logits.

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
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads_forward(self.encode(x), x)
