"""peft LoRA on the vision tower, and merging it back into plain weights for export.

peft is imported lazily: an exported (merged) model loads without it.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .config import LoraSettings


def apply_lora(encoder: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into ``encoder`` in place; only adapter tensors stay trainable.

    Every adapter adds alpha / r x B A to its weight, once: where peft adds the out-projection
    delta of an ``nn.MultiheadAttention`` twice (``_out_proj_delta_counted``), that adapter's
    scaling is halved, so forward, merge and export all apply the configured alpha."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.targets), bias="none")
    encoder = inject_adapter_in_model(cfg, encoder)
    attention = [m for m in encoder.modules() if isinstance(m, LoraMHA)]
    times = _out_proj_delta_counted() if attention else 1
    for m in attention:
        scaling = m.base_layer.out_proj.scaling
        for name in scaling:
            scaling[name] /= times
    for name, p in encoder.named_parameters():
        p.requires_grad = "lora_" in name
    return encoder


@functools.lru_cache(maxsize=None)
def _out_proj_delta_counted() -> int:
    """How many times this peft adds an ``nn.MultiheadAttention`` out-projection's LoRA delta when
    it merges the adapters (which it does around every forward pass): peft 0.21 adds it in its
    own merge and again through the out-projection's (huggingface/peft PR #3774), i.e. twice the
    configured alpha there. Measured on a 2-wide attention, so a peft that fixes it gives 1."""
    from collections import OrderedDict

    from peft import LoraConfig, inject_adapter_in_model

    probe = inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=["attn"]),
                                    nn.Sequential(OrderedDict(attn=nn.MultiheadAttention(2, 1))))
    out = probe.attn.base_layer.out_proj
    with torch.no_grad():
        out.lora_A["default"].weight.fill_(1.0)
        out.lora_B["default"].weight.fill_(1.0)  # delta = B A x alpha / r = 1 everywhere
        before = out.get_base_layer().weight.clone()
        probe.attn.merge()
        added = float((out.get_base_layer().weight - before).mean())
    times = round(added)
    if times not in (1, 2) or abs(added - times) > 1e-5:
        raise RuntimeError(f"unexpected peft MultiheadAttention merge: out-projection delta x {added:.3f}")
    return times


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
