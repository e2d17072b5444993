"""FetalCLIP-SEG / FetalCLIP-CLS models.

>>> cfg = ModelConfig(backbone="fetalclip-small", heads=("seg",))
>>> model = build_model(cfg)                # weights=FetalCLIP checkpoint path for the real one
>>> out = model(x)                          # x (B, 3, 224, 224) -> {"seg": (B, 1, 224, 224)}
>>> export_model(model, out_dir, {"data": ...}); load_exported(out_dir)
"""

from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_TAPS, LoraSettings, ModelConfig, register_configs
from .export import export_model, is_exported_model, load_exported
from .heads import FetalIQAModel
from .lora import adapter_parameters, merged_state_dict

register_configs()

__all__ = ["DEFAULT_TAPS", "FetalIQAModel", "LoraSettings", "ModelConfig", "adapter_parameters", "build_model",
           "count_parameters", "export_model", "is_exported_model", "load_exported", "merged_state_dict"]


def build_model(cfg: ModelConfig, weights: str | Path | None = None, *, adapters: bool = True) -> FetalIQAModel:
    """Build a FetalIQAModel (train mode, CPU; use ``with torch.device("meta")`` to count only).

    weights: a FetalCLIP checkpoint (any form, see ``backbone.read_checkpoint``) loaded
    strictly into the vision tower before adapters are injected; None = random init.
    adapters: inject LoRA when ``cfg.encoder_mode == "lora"`` (False for merged exports).
    Frozen mode: encoder parameters do not require grad; lora mode: only adapters do.
    """
    from .backbone import load_fetalclip_weights
    from .lora import apply_lora

    if weights is not None and cfg.stem != "patch":
        raise ValueError(f"stem {cfg.stem!r}: FetalCLIP weights exist only for its patch embedding "
                         "(stem 'patch'); train a 'conv' stem from random weights")
    model = FetalIQAModel(cfg)
    if weights is not None:
        load_fetalclip_weights(model.encoder, weights)
    for p in model.encoder.parameters():
        p.requires_grad = False
    if cfg.encoder_mode == "lora" and adapters:
        model.encoder = apply_lora(model.encoder, cfg.lora)
    return model


def count_parameters(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
