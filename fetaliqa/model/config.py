"""Typed configuration of a fetaliqa model: everything that is not backbone geometry.

The backbone geometry is open_clip data (``configs/*.json``, registered with
``open_clip.add_model_config``); a ModelConfig names it and, once exported, carries a copy
of it in ``geometry`` so an exported model rebuilds without the registry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_registered = False


def register_configs() -> None:
    """Register the package's open_clip model configs (FetalCLIP, fetalclip-small) once."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


# Tapped blocks (1-based) per backbone. FetalCLIP's are the published 6, 8, 12, 24; the
# small geometry keeps the same relative depths (1/4, 1/3, 1/2, last) of its 6 blocks.
DEFAULT_TAPS: dict[str, tuple[int, ...]] = {"FetalCLIP": (6, 8, 12, 24), "fetalclip-small": (2, 3, 4, 6)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS = ("seg", "cls", "frame")
ENCODER_MODES = ("frozen", "lora")
CHOOSE_FROM = ("good", "all")
STEMS = ("patch", "conv")


@dataclass
class LoraSettings:
    """peft LoRA on the vision tower (used when ``encoder_mode == "lora"``).

    targets: module-name suffixes. ``"attn"`` is the whole ``nn.MultiheadAttention`` of each
    block: peft then adapts both the q/k/v in-projection and the out-projection, merged into
    the weights around each forward pass (so ``dropout`` applies to the other targets only;
    ``lora.apply_lora`` keeps peft from counting the out-projection twice). (Targeting
    ``attn.out_proj`` alone, as published, does nothing: MultiheadAttention reads its weight
    without calling the module, so the adapter never sees a forward pass.)
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    targets: tuple[str, ...] = ("attn", "mlp.c_fc", "mlp.c_proj")

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if any(t == "out_proj" or t.endswith(".out_proj") for t in self.targets):
            raise ValueError(f"LoRA target {self.targets!r}: an nn.MultiheadAttention's out_proj is never called, "
                             "so its adapter would learn nothing (the published defect); target 'attn' instead")

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraSettings":
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**_known(cls, d, "lora"))


# The published FetalCLIP-SEG decision: a pixel is foreground above 0.5 and a frame is good
# when its foreground covers at least 1 % of the model input; FetalCLIP-CLS's: a probability
# of at least 0.5 (hand-set; training calibrates its own, stored in the exported config).
PUBLISHED_THRESHOLDS = {"pixel_threshold": 0.5, "area_threshold": 0.01, "cls_threshold": 0.5}


@dataclass
class ModelConfig:
    """Everything that builds, feeds and reads a FetalCLIP-SEG / -CLS model.

    backbone: open_clip model name ("FetalCLIP", or "fetalclip-small" for CPU tests/default).
    heads: ("seg",), ("cls",) or ("seg", "cls"); "frame" may join a SEG model: a small
        convolutional frame classifier beside the encoder (``heads.FrameHead``, its own
        weights), whose probability multiplies each frame's SEG quality score (and, with
        frame_threshold, alone decides which frames are good), for encoders trained from
        random weights (training fits it after the SEG head).
    taps: 1-based transformer blocks feeding the SEG decoder (deepest last); None -> the
        backbone's default (DEFAULT_TAPS).
    decoder_width: base width f of the SEG decoder (32 as published).
    encoder_mode: "frozen" (no gradient through the encoder; features can be cached) or
        "lora" (peft adapters in the encoder, trained through the head losses).
    image_size, mean, std, resize_mode: preprocessing (centred zero-pad to square, resize,
        gray -> 3 channels, CLIP normalisation).
    pixel_threshold: sigmoid probability above which a 224x224 pixel is foreground.
    area_threshold: a frame is "good" when its foreground covers at least this fraction of
        the image_size x image_size pixels (1 % = 502 pixels at 224).
    score_threshold: when set (> 0), a SEG frame is "good" when its quality score (the
        ranking score: area x mean probability, shape factor, temporal support, sweep
        prior) reaches it, instead of the area rule; training calibrates it on validation.
    frame_threshold: when set (> 0; a model with a frame head), a frame is "good" when the
        frame head's probability, smoothed over +-temporal_window frames
        (``fetaliqa.select.frame_decision``), reaches it; it takes precedence over
        score_threshold and the area rule (training calibrates it on validation, --good-by
        frame). Only the decision moves: the frame choice still ranks by the quality score.
    cls_threshold: CLS probability at/above which a frame is "good".
    select_by: head that ranks frames when both exist ("seg" or "cls").
    temporal_window: frames on each side (same sweep) that support a frame's quality score
        and the frame head's decision.
    window_frames_per_sweep: when set, temporal_window counts frames at this many frames per
        sweep (the challenge's 140), and a stack sampled at another density is smoothed over the
        same stretch of its sweeps (``window_at``; fractional windows weigh their end frames
        in part): cuts calibrated on sparser validation sweeps (the simulated default's 35
        frames) then hold on the stacks the container serves. None: temporal_window frames
        at any density.
    ellipse_mask: replace the chosen frame's mask by its fitted ellipse.
    mask_window: the chosen frame's mask is cut from its probability map averaged with its
        neighbours' within +-mask_window frames of the same sweep, counted like temporal_window
        (``mask_window_at``): at 140 frames per sweep the neighbouring planes are nearly the same
        section, and their mean map is less ragged. 0: the frame's own map.
    choose_from: "good": the case's frame is the best-scoring good frame (the best-scoring
        frame only when none is good); "all": the best-scoring frame, good or not (the
        decision then only labels frames).
    shape_power: the quality score is multiplied by the foreground's shape statistic
        (roundness x ellipse fill, ``fetaliqa.select.shape_from_moments``) to this power;
        0 = off (the published-style rule).
    sweep_prior: six weights, one per protocol sweep, multiplying the quality score of a
        6-sweep stack's frames (training stores how often each sweep held an annotation in
        its training cases); None = off.
    geometry: the open_clip model config (embed_dim, vision_cfg, ...); None -> looked up
        from the registry by ``backbone`` (filled in on export).
    frame_views: the views of each frame whose frame-head logits are averaged into its
        probability, each (rotation in degrees, mirrored left-right), applied to the model
        input about its centre (black beyond the frame): test-time augmentation of the frame
        head (``heads.FetalIQAModel.frame_logits``); ((0.0, False),) = the frame alone.
    stem: how pixels become tokens. "patch": FetalCLIP's patch embedding (one patch_size x
        patch_size convolution; the only stem FetalCLIP weights exist for); "conv": early
        convolutions (``backbone.ConvStem``, same token grid; a power-of-2 patch size), for
        encoders trained from random weights.
    """

    backbone: str = "FetalCLIP"
    heads: tuple[str, ...] = ("seg",)
    taps: tuple[int, ...] | None = None
    decoder_width: int = 32
    encoder_mode: str = "frozen"
    lora: LoraSettings = field(default_factory=LoraSettings)
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: str = "bicubic"
    pixel_threshold: float = 0.5
    area_threshold: float = 0.01
    cls_threshold: float = 0.5
    select_by: str = "seg"
    temporal_window: int = 2
    window_frames_per_sweep: int | None = None
    ellipse_mask: bool = False
    mask_window: int = 0
    choose_from: str = "good"
    shape_power: float = 0.0
    sweep_prior: tuple[float, ...] | None = None
    score_threshold: float | None = None
    frame_threshold: float | None = None
    geometry: dict[str, Any] | None = None
    stem: str = "patch"
    frame_views: tuple[tuple[float, bool], ...] = ((0.0, False),)

    def __post_init__(self) -> None:
        self.heads = tuple(self.heads)
        if not self.heads or any(h not in HEADS for h in self.heads) or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {self.heads!r}")
        if self.encoder_mode not in ENCODER_MODES:
            raise ValueError(f"encoder_mode must be one of {ENCODER_MODES}, got {self.encoder_mode!r}")
        if "frame" in self.heads and "seg" not in self.heads:
            raise ValueError(f"the frame head weighs the SEG quality score: heads {self.heads!r} need 'seg'")
        if self.select_by not in ("seg", "cls"):
            raise ValueError(f"select_by must be 'seg' or 'cls', got {self.select_by!r}")
        if self.choose_from not in CHOOSE_FROM:
            raise ValueError(f"choose_from must be one of {CHOOSE_FROM}, got {self.choose_from!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if not self.shape_power >= 0:
            raise ValueError(f"shape_power must be >= 0, got {self.shape_power!r}")
        if self.score_threshold is not None:
            self.score_threshold = float(self.score_threshold)
            if not self.score_threshold > 0:  # every unscored or empty frame scores 0
                raise ValueError(f"score_threshold must be > 0 or None, got {self.score_threshold!r}")
        if self.frame_threshold is not None:
            self.frame_threshold = float(self.frame_threshold)
            if not self.frame_threshold > 0:
                raise ValueError(f"frame_threshold must be > 0 or None, got {self.frame_threshold!r}")
            if "frame" not in self.heads:
                raise ValueError(f"frame_threshold cuts the frame head's probability: heads {self.heads!r} "
                                 f"need 'frame'")
        if isinstance(self.mask_window, bool) or not isinstance(self.mask_window, int) or self.mask_window < 0:
            raise ValueError(f"mask_window must be an integer >= 0, got {self.mask_window!r}")
        if self.window_frames_per_sweep is not None:
            if int(self.window_frames_per_sweep) != self.window_frames_per_sweep or self.window_frames_per_sweep < 1:
                raise ValueError(f"window_frames_per_sweep must be a positive integer or None, "
                                 f"got {self.window_frames_per_sweep!r}")
            self.window_frames_per_sweep = int(self.window_frames_per_sweep)
        if self.sweep_prior is not None:
            self.sweep_prior = tuple(float(w) for w in self.sweep_prior)
            if len(self.sweep_prior) != 6 or not all(w >= 0 for w in self.sweep_prior) or not max(self.sweep_prior) > 0:
                raise ValueError(f"sweep_prior must be 6 non-negative weights, not all 0, got {self.sweep_prior!r}")
        try:
            self.frame_views = tuple((float(deg), mirror) for deg, mirror in self.frame_views)
        except (TypeError, ValueError):
            raise ValueError(f"frame_views must be (degrees, mirrored) pairs, got {self.frame_views!r}") from None
        if not self.frame_views or not all(math.isfinite(d) and isinstance(m, bool) for d, m in self.frame_views):
            raise ValueError(f"frame_views must be a non-empty list of (finite degrees, bool mirrored) pairs, "
                             f"got {self.frame_views!r}")
        if isinstance(self.lora, dict):
            self.lora = LoraSettings.from_dict(self.lora)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        layers = int(self.vision_cfg()["layers"])
        if self.taps is None:
            self.taps = DEFAULT_TAPS.get(self.backbone) or tuple(
                max(1, round(layers * q)) for q in (1 / 4, 1 / 3, 1 / 2, 1))
        self.taps = tuple(int(t) for t in self.taps)
        if "seg" in self.heads and len(self.taps) != 4:
            raise ValueError(f"the SEG decoder needs exactly 4 tapped blocks, got taps={self.taps}")
        if any(not 1 <= t <= layers for t in self.taps):
            raise ValueError(f"taps {self.taps} must lie in 1..{layers} (1-based blocks of {self.backbone})")
        if any(a > b for a, b in zip(self.taps, self.taps[1:])):
            raise ValueError(f"taps {self.taps} must not decrease (shallowest first; the last, deepest, feeds "
                             "the decoder's bottom)")
        if self.image_size % 16 or self.image_size % int(self.vision_cfg()["patch_size"]):
            raise ValueError(f"image_size {self.image_size} must be divisible by 16 and by the patch size")
        patch = int(self.vision_cfg()["patch_size"])
        if self.stem == "conv" and (patch < 4 or patch & (patch - 1)):
            raise ValueError(f"stem 'conv' halves the resolution per convolution: the patch size must be a "
                             f"power of 2 >= 4, got {patch}")

    def window_at(self, frames_per_sweep: int) -> float:
        """The temporal window, in frames, for sweeps of ``frames_per_sweep`` frames."""
        return self._frames_at(self.temporal_window, frames_per_sweep)

    def mask_window_at(self, frames_per_sweep: int) -> float:
        """The mask window, in frames, for sweeps of ``frames_per_sweep`` frames."""
        return self._frames_at(self.mask_window, frames_per_sweep)

    def _frames_at(self, frames: int, frames_per_sweep: int) -> float:
        if self.window_frames_per_sweep is None:
            return float(frames)
        return frames * frames_per_sweep / self.window_frames_per_sweep

    def open_clip_config(self) -> dict[str, Any]:
        """The open_clip model config (``geometry`` if set, else the registered one)."""
        if self.geometry is not None:
            return self.geometry
        register_configs()
        cfg = open_clip.get_model_config(self.backbone)
        if cfg is None:
            raise ValueError(f"unknown backbone {self.backbone!r}: not an open_clip model config "
                             f"(package configs in {CONFIG_DIR}) and no geometry given")
        return cfg

    def vision_cfg(self) -> dict[str, Any]:
        return self.open_clip_config()["vision_cfg"]

    @property
    def embed_dim(self) -> int:
        return int(self.open_clip_config()["embed_dim"])

    def with_geometry(self) -> "ModelConfig":
        """A copy whose ``geometry`` is filled in (self-describing, for export)."""
        return dataclasses.replace(self, geometry=self.open_clip_config())

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["lora"] = self.lora.to_dict()
        for k in ("heads", "taps", "mean", "std", "sweep_prior"):
            d[k] = None if d[k] is None else list(d[k])
        d["frame_views"] = [list(v) for v in self.frame_views]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = _known(cls, d, "model")
        if "lora" in d:
            d["lora"] = LoraSettings.from_dict(d["lora"])
        for k in ("heads", "taps", "mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def _known(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; expected some of {sorted(names)}")
    return dict(d)
