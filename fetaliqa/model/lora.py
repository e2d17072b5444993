"""peft LoRA on the vision tower, and merging it back into plain weights for export.

peft is imported lazily: an exported (merged) model loads without it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import LoraSettings


def apply_lora(encoder: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into ``encoder`` in place; only adapter tensors stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.targets), bias="none")
    encoder = inject_adapter_in_model(cfg, encoder)
    for name, p in encoder.named_parameters():
        p.requires_grad = "lora_" in name
    return encoder


def adapter_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of ``model`` with every LoRA adapter merged, in the plain (peft-free) key
    names; ``model`` itself is left untouched (a copy is merged)."""
    if not has_lora(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for m in merged.modules():
        if isinstance(m, LoraLayer) and not m.merged:
            m.merge()
    out = {}
    for k, v in merged.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer", "")] = v.detach().clone()
    return out
