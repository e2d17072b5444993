"""The deployable model: one ``model.safetensors`` (LoRA merged) + one ``model.json``.

``model.json`` = {"format": "fetaliqa-model", "version": 1, "config": ModelConfig.to_dict()
(with the open_clip geometry filled in), "provenance": {...}}. Loading needs neither peft
nor ``training/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_write
from .backbone import state_dict_mismatch
from .config import ModelConfig
from .lora import merged_state_dict

FORMAT, VERSION = "fetaliqa-model", 1
WEIGHTS, CONFIG = "model.safetensors", "model.json"


def export_model(model: nn.Module, out_dir: Path, provenance: dict[str, Any]) -> None:
    """Write ``out_dir/model.safetensors`` (fp32, LoRA merged) and ``out_dir/model.json``.

    provenance: JSON-serialisable facts about how the model was made (data, split, epochs,
    validation figures, commit, ...). ``model.config.encoder_mode`` records whether the
    encoder was frozen or LoRA-tuned. ``model`` is not modified.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config.with_geometry()
    sd = {k: v.to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.to("cpu").contiguous()
          for k, v in merged_state_dict(model).items()}
    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "provenance": provenance}
    text = json.dumps(meta, indent=2, allow_nan=False)
    atomic_write(out_dir / WEIGHTS, lambda p: save_file(sd, str(p), metadata={"format": FORMAT}))
    atomic_write(out_dir / CONFIG, lambda p: p.write_text(text + "\n"))


def is_exported_model(path: Path) -> bool:
    """True when ``path`` is a folder holding model.safetensors and a fetaliqa model.json."""
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT and (path / WEIGHTS).is_file()


def read_model_json(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    cfg_path = Path(path) / CONFIG
    try:
        meta = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"exported model config {cfg_path} does not exist "
                                f"(an exported model is a folder with {CONFIG} and {WEIGHTS})") from None
    except ValueError as e:
        raise ValueError(f"exported model config {cfg_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{cfg_path} is not a fetaliqa model config (expected a JSON object with "
                         f'"format": "{FORMAT}", "config" and "provenance")')
    if meta.get("version") != VERSION:
        raise ValueError(f"{cfg_path}: unsupported format version {meta.get('version')!r} (expected {VERSION})")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid model config: {e}") from e
    return cfg, dict(meta.get("provenance") or {})


def load_exported(out_dir: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model (eval mode, on ``device``); ``m.config``, ``m.provenance``."""
    from . import build_model

    out_dir = Path(out_dir)
    cfg, provenance = read_model_json(out_dir)
    w_path = out_dir / WEIGHTS
    if not w_path.is_file():
        raise FileNotFoundError(f"exported model weights {w_path} do not exist")
    try:
        sd = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read exported model weights {w_path}: {e}") from e
    with torch.device("meta"):  # shapes only: no random init, and the file's tensors become the weights
        model = build_model(cfg, adapters=False)
    missing, unexpected, shapes = state_dict_mismatch(model.state_dict(), sd)
    if missing or unexpected or shapes:
        raise ValueError(
            f"exported weights {w_path} do not match the geometry in {out_dir / CONFIG} "
            f"(backbone {cfg.backbone!r}, heads {cfg.heads}, decoder_width {cfg.decoder_width}): "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, "
            f"shape mismatches {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
    model.load_state_dict(sd, strict=True, assign=True)  # no second copy (FetalCLIP: 1.2 GB)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor the file does not hold
        model = build_model(cfg, adapters=False)
        model.load_state_dict(sd, strict=True)
    model.provenance = provenance
    return model.to(device).eval()
