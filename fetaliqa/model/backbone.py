"""FetalCLIP vision tower: built from open_clip geometry (no text tower), checkpoint loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import LayerNorm, VisionTransformer
from torch import nn

from .config import ModelConfig


def build_vision_tower(cfg: ModelConfig) -> VisionTransformer:
    """open_clip's VisionTransformer for ``cfg``'s geometry, text tower never allocated.

    Mirrors what ``open_clip.create_model`` does for a plain ViT vision_cfg (fp32 LayerNorm,
    plain GELU since FetalCLIP is not quick_gelu), with the default attention block so the
    state dict has FetalCLIP's key names.
    """
    oc = cfg.open_clip_config()
    if oc.get("quick_gelu"):
        raise ValueError(f"backbone {cfg.backbone!r}: quick_gelu geometries are not supported")
    v = CLIPVisionCfg(**oc["vision_cfg"])
    if v.timm_model_name or not isinstance(v.layers, int):
        raise ValueError(f"backbone {cfg.backbone!r}: only plain ViT vision towers are supported")
    visual = VisionTransformer(
        image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
        heads=v.width // v.head_width, mlp_ratio=v.mlp_ratio, ls_init_value=v.ls_init_value,
        output_dim=int(oc["embed_dim"]), pool_type=v.pool_type, no_ln_pre=v.no_ln_pre,
        final_ln_after_pool=v.final_ln_after_pool, act_layer=nn.GELU, norm_layer=LayerNorm,
        block_type=v.block_type)
    if cfg.stem == "conv":
        visual.conv1 = ConvStem(v.width, v.patch_size)
    return visual


class ConvStem(nn.Sequential):
    """Convolutional stages in place of the patch embedding, for encoders trained from random
    weights (early convolutions, after Xiao et al. 2021, by default with a second 3x3
    convolution per stage as in VGG/U-Net encoders): log2(patch_size) stages, each a stride-2
    3x3 convolution followed by ``convs_per_stage - 1`` stride-1 ones, all with batch norm and
    ReLU (24, 48, 96, ... channels), then a 1x1 projection to the token width. Same token grid
    as a patch_size patch embedding, so it drops in as ``conv1``.
    """

    def __init__(self, width: int, patch_size: int, convs_per_stage: int = 2) -> None:
        layers: list[nn.Module] = []
        i = 3
        for k in range(int(patch_size).bit_length() - 1):
            o = 24 << k
            for stride in (2,) + (1,) * (convs_per_stage - 1):
                layers += [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o),
                           nn.ReLU(inplace=True)]
                i = o
        super().__init__(*layers, nn.Conv2d(i, width, 1))


def _truncate(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Visual-tower state dict from a FetalCLIP checkpoint in any of its forms.

    Accepts a raw state dict or one wrapped in ``{"state_dict": ...}``, keys with or without
    ``module.``, full CLIP keys (``visual.*`` kept, text tower and ``logit_scale`` ignored) or
    visual-only keys. Never downloads; loads with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FetalCLIP checkpoint {path} does not exist (download "
                                "FetalCLIP_weights.pt yourself; nothing is downloaded at run time)")
    try:
        try:  # mmap keeps the 1.7 GB file out of RAM; legacy (non-zip) files cannot be mapped
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read FetalCLIP checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"FetalCLIP checkpoint {path} is not a state dict of tensors "
                         "(expected a dict name -> tensor, optionally under 'state_dict')")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def state_dict_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, "key: file shape vs model shape" lines) of loading ``sd``."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    return missing, unexpected, shapes


def load_fetalclip_weights(visual: nn.Module, path: str | Path) -> None:
    """Load FetalCLIP weights strictly into a (LoRA-free) vision tower; clear errors."""
    sd = read_checkpoint(path)
    own = visual.state_dict()
    missing, unexpected, shapes = state_dict_mismatch(own, sd)
    if missing or unexpected or shapes:
        raise ValueError(
            f"FetalCLIP checkpoint {path} does not match the vision tower geometry "
            f"(expected {len(own)} visual keys such as conv1.weight, transformer.resblocks.0.attn.in_proj_weight, "
            f"proj, optionally prefixed 'visual.'/'module.'; the file gave {len(sd)}). "
            f"Missing: [{_truncate(missing)}]. Unexpected: [{_truncate(unexpected)}]. "
            f"Shape mismatches: [{'; '.join(shapes[:5])}{' ...' if len(shapes) > 5 else ''}]. "
            "Is it truncated, or a checkpoint of another model/geometry?")
    visual.load_state_dict(sd, strict=True)
