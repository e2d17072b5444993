"""One call from a (frames, rows, cols) uint8 stack to (frame, 2D mask, per-frame scores).

``analyse_stack`` streams batches of frames through preprocessing and the model on the
model's device (one batch in memory at a time), turns each frame's probability map into a
few statistics (``select.frame_stats``), picks one frame (``select``), and builds the
chosen frame's native-resolution mask (``native_mask``: its probability map, averaged with its
neighbours' over the config's mask window, through ``postprocess.final_mask`` and
``postprocess.measurable``). ``FrameScorer`` scores
any list of frame indices and remembers the results, so a coarse-to-fine search can score
a subset, then refine around the best.

Searches: "exhaustive" scores every frame with signal; "fast" (``fast_search``) scores
every ``stride``-th frame of each sweep (halving the stride while no frame is good), then
refines around the best few coarse frames that can win (a pattern search by default,
or every frame nearby), then walks until the chosen frame's temporal
neighbourhood is scored, so its score (which takes support from +-temporal_window
neighbours) is the one the exhaustive pass gives it; "auto" (``resolve_search``) the
exhaustive pass where it is cheap (small encoders, CUDA), the fast search for FetalCLIP-width
encoders on the CPU.
Its choice depends only on the statistics of the frames it asked for, so replaying it on
an exhaustive pass's statistics (``ReplayScorer``) gives the choice a real fast run makes.
The model runs through ``fetaliqa.model.fuse.inference_view`` (BatchNorm folded, depthwise
upsampling as one multiply-add; on the CPU also the decoder in channels_last and attention
through scaled_dot_product_attention), which shares the weights: no copy of the model.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .model.fuse import inference_view
from .postprocess import final_mask, measurable
from .preprocess import frames_to_model_input, iter_frame_batches, square_to_native
from .select import (best_of, choose_frame, coarse_frames, frame_decision, frame_stats, neighbourhood, seg_scores,
                     sweep_candidates, sweep_length, window_weights)

SEARCHES = ("auto", "exhaustive", "fast")
# encoders this wide or wider are FetalCLIP-size (1024; the embedded default: 128): "auto" searches
# fast for them on the CPU, and inference.py gives them smaller CPU batches
LARGE_ENCODER_WIDTH = 512
SEG_STATS = ("area", "mean_fg", "peak", "shape")  # per-frame SEG statistics (select.frame_stats)


@dataclass(frozen=True)
class FastSearch:
    """Knobs of the coarse-to-fine search (defaults chosen with ``python -m training.evaluate
    --compare`` on 50 simulated cases; see docs/bench.md).

    stride: coarse step, in frames with signal, within each sweep; halved (not below
        min_stride) while no scored frame is good: an abdomen run can fall between coarse
        frames, and a stack with no abdomen at all should not cost an exhaustive pass.
    per_sweep: best coarse frames of each sweep refined.
    max_candidates: at most this many candidates refined in all, best first (None: no
        cap): bounds the cost when many sweeps look alike (e.g. nothing is good).
    radius: frames scored on each side of a refined candidate (None: stride // 2).
    gate: refine only candidates that are good and score >= gate x the best good score
        (0, or no good frame at all: refine every sweep's candidates); with the config's
        ``choose_from="all"`` every scored frame counts as good here.
    settle: the chosen frame's +-settle neighbours must be scored before the search stops
        (None: 2 x the temporal window in frames (``ModelConfig.window_at``, rounded up), at
        least 1: the chosen frame's score and its neighbours' scores are then exact).
    refine: "dense" scores every frame within +-radius of a candidate; "climb" a pattern
        search: the frames at +-radius, move to the best, then +-radius/2, ... down to +-1
        (2 frames per halving instead of 2 x radius).
    """

    stride: int = 16
    min_stride: int = 4
    per_sweep: int = 6
    max_candidates: int | None = 6
    radius: int | None = None
    gate: float = 0.3
    settle: int | None = None
    refine: str = "climb"

    def __post_init__(self) -> None:
        if self.refine not in ("dense", "climb"):
            raise ValueError(f"refine must be 'dense' or 'climb', got {self.refine!r}")


@dataclass
class Analysis:
    """frame: 0-based chosen frame, -1 only when the stack holds no signal (all zero).
    mask: uint8 (rows, cols) {0, 1} of the chosen frame; never empty when frame >= 0.
    scores: float32 (frames,) per-frame quality score (nan = not scored).
    good: bool (frames,) per-frame decision.
    timings: seconds per stage ("signal", "model", "select", "mask", "total").
    search: the search that ran ("exhaustive" or "fast"; "auto" resolved)."""

    frame: int
    mask: np.ndarray
    scores: np.ndarray
    good: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    search: str = "exhaustive"


def resolve_search(search: str, config, device: str | torch.device) -> str:
    """The search that runs for ``search`` with a model of ``config`` on ``device``: "auto" is
    "exhaustive" on CUDA and for encoders narrower than ``LARGE_ENCODER_WIDTH`` (the embedded
    default: 840 frames in about 13 s on 2 CPU cores, and on the held-out and development sets
    a higher score than the fast search on four of five; docs/bench.md), "fast" for
    FetalCLIP-width encoders on the CPU (about 110 s per case instead of about 950 s). It
    depends on the model and the kind of device only, never on timing, so a machine's speed
    never changes the output. Other searches are returned as they are (unknown: ValueError)."""
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; available: {', '.join(SEARCHES)}")
    if search != "auto":
        return search
    if torch.device(device).type == "cuda":
        return "exhaustive"
    return "fast" if int(config.vision_cfg()["width"]) >= LARGE_ENCODER_WIDTH else "exhaustive"


class FrameScorer:
    """Runs ``model`` over chosen frames of ``stack``; per-frame results in float32 arrays
    (nan = not scored yet): ``area``, ``mean_fg``, ``peak``, ``shape`` (SEG, at the config's
    pixel threshold), ``cls_prob`` (CLS) and ``frame_prob`` (frame head). ``also_at``: further
    pixel thresholds whose SEG statistics are kept in ``stats_at[t]`` from the same model pass
    (``ReplayScorer`` with another config replays them: several threshold policies for the
    price of one)."""

    def __init__(self, stack: np.ndarray, model: torch.nn.Module, *, device: str | torch.device = "cpu",
                 batch_size: int = 16, amp: bool = False, progress: bool = True,
                 also_at: Sequence[float] = ()) -> None:
        self.stack, self.model, self.cfg = stack, model, model.config
        self.device = torch.device(device)
        # layout and attention rewrites measured on the CPU only (fetaliqa.bench): CUDA keeps the
        # model's own; BN folding and the upsampling rewrite are exact on any device
        cpu = self.device.type == "cpu"
        self.net = inference_view(model, channels_last=cpu, sdpa_attention=cpu) if hasattr(model, "decoder") \
            else model.eval()
        self.batch_size, self.progress = max(1, int(batch_size)), progress
        self.amp = amp and self.device.type == "cuda"  # fp16 autocast only where it pays (T4 has no bf16)
        n = stack.shape[0]
        self._allocate(n)
        self.stats_at = {float(self.cfg.pixel_threshold): tuple(getattr(self, k) for k in SEG_STATS)}
        for t in also_at:
            self.stats_at.setdefault(float(t), tuple(np.full(n, np.nan, np.float32) for _ in SEG_STATS))

    def _allocate(self, n: int) -> None:
        """The per-frame results of an n-frame stack, nothing scored yet."""
        for k in (*SEG_STATS, "cls_prob", "frame_prob"):
            setattr(self, k, np.full(n, np.nan, np.float32))
        self.scored = np.zeros(n, bool)

    @torch.inference_mode()
    def _run(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        x = frames_to_model_input(frames, self.cfg)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = self.net(x)
        return {k: torch.sigmoid(v.float()) for k, v in out.items()}

    def score(self, indices: Sequence[int]) -> None:
        """Score the given frames (already scored ones are skipped)."""
        todo = [int(i) for i in indices if not self.scored[int(i)]]
        bar = tqdm(total=len(todo), desc="frames", unit="frame", file=sys.stderr, disable=not self.progress,
                   leave=False)
        for idx, frames in iter_frame_batches(self.stack, todo, self.batch_size, self.device):
            out = self._run(frames)
            if "seg" in out:
                for t, arrays in self.stats_at.items():
                    st = frame_stats(out["seg"][:, 0], t)
                    for a, k in zip(arrays, SEG_STATS):
                        a[idx] = st[k].cpu().numpy()
            if "cls" in out:
                self.cls_prob[idx] = out["cls"].cpu().numpy()
            if "frame" in out:
                self.frame_prob[idx] = out["frame"].cpu().numpy()
            self.scored[idx] = True
            bar.update(len(idx))
        bar.close()

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    def _by_cls(self) -> bool:
        return self.cfg.select_by == "cls" and "cls" in self.cfg.heads or "seg" not in self.cfg.heads

    def scores_and_good(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(scores float32, good bool, tiebreak or None) under the config's selection head."""
        cfg = self.cfg
        if self._by_cls():
            return self.cls_prob.copy(), self._cut(*self.decision()), None
        fps = sweep_length(len(self.area))
        scores = seg_scores(self.area, self.mean_fg, cfg.window_at(fps), fps,
                            shape=self.shape, shape_power=cfg.shape_power, sweep_prior=cfg.sweep_prior,
                            frame_prob=self.frame_prob if "frame" in cfg.heads else None)
        return scores, self._cut(*self.decision(scores)), self.peak

    def decision(self, scores: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """(per-frame value, cut): a frame is good when its value reaches the cut (nan: not
        scored, never good). The CLS probability; or, in this order of precedence, the frame
        head's smoothed probability (``frame_threshold``), the quality score
        (``score_threshold``; ``scores``: computed here unless given), the foreground area."""
        cfg = self.cfg
        if self._by_cls():
            return self.cls_prob, cfg.cls_threshold
        if cfg.frame_threshold is not None:  # ModelConfig refuses it without the frame head
            fps = sweep_length(len(self.area))
            return frame_decision(self.frame_prob, cfg.window_at(fps), fps), cfg.frame_threshold
        if cfg.score_threshold is not None:
            return (self.scores_and_good()[0] if scores is None else scores), cfg.score_threshold
        return self.area, cfg.area_threshold

    @staticmethod
    def _cut(values: np.ndarray, cut: float) -> np.ndarray:
        return np.nan_to_num(np.asarray(values, np.float64), nan=-1.0) >= cut

    def ranking(self, scores_and_good: tuple | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``scores_and_good`` (computed here unless given) as the frame choice ranks it: with
        ``choose_from="all"`` every scored frame counts as good, so the score alone orders them."""
        scores, good, tiebreak = self.scores_and_good() if scores_and_good is None else scores_and_good
        if self.cfg.choose_from == "all":
            good = np.isfinite(scores)
        return scores, good, tiebreak

    def seg_prob(self, frame: int) -> torch.Tensor:
        """(S, S) float32 SEG probability map of one frame (CPU)."""
        _, frames = next(iter_frame_batches(self.stack, [frame], 1, self.device))
        return self._run(frames)["seg"][0, 0].cpu()


class ReplayScorer(FrameScorer):
    """A FrameScorer that answers from another (exhaustive) scorer's statistics instead of
    running a model: the fast search's choice on it is the choice a real fast run makes,
    at no model cost. ``scored`` marks the frames the search asked for."""

    def __init__(self, source: FrameScorer, prob_cache: dict[int, torch.Tensor] | None = None,
                 config=None) -> None:
        """prob_cache: chosen-frame probability maps shared between replays of one source.
        config: another ModelConfig (thresholds, selection rule) to replay under; its pixel
        threshold must be one the source kept (``FrameScorer(also_at=...)``)."""
        self.stack, self.model, self.source = source.stack, source.model, source
        self.cfg = source.cfg if config is None else config
        t = float(self.cfg.pixel_threshold)
        if "seg" in self.cfg.heads and t not in source.stats_at:
            raise ValueError(f"pixel threshold {t} was not kept by the source scorer "
                             f"(kept: {sorted(source.stats_at)}); create it with also_at=[{t}]")
        self._src = dict(zip(SEG_STATS, source.stats_at.get(t, (None,) * len(SEG_STATS))),
                         cls_prob=source.cls_prob, frame_prob=source.frame_prob)
        self.prob_cache = {} if prob_cache is None else prob_cache
        self._allocate(len(source.scored))

    def score(self, indices: Sequence[int]) -> None:
        idx = np.asarray([int(i) for i in indices], int)
        if not self.source.scored[idx].all():
            raise ValueError(f"frames {idx[~self.source.scored[idx]][:8].tolist()} were not scored by the source")
        for k, src in self._src.items():
            if src is not None:
                getattr(self, k)[idx] = src[idx]
        self.scored[idx] = True

    def seg_prob(self, frame: int) -> torch.Tensor:
        if frame not in self.prob_cache:
            self.prob_cache[frame] = self.source.seg_prob(frame)
        return self.prob_cache[frame]


def fast_search(scorer: FrameScorer, signal: np.ndarray, params: FastSearch = FastSearch()) -> None:
    """Coarse-to-fine: score frames of ``scorer`` until its choice is settled (module docstring).
    signal: bool (frames,) frames that hold any signal (the others are never scored)."""
    signal = np.asarray(signal, bool)
    n, cfg = len(signal), scorer.cfg
    fps = sweep_length(n)
    radius = params.stride // 2 if params.radius is None else params.radius
    settle = max(1, 2 * math.ceil(cfg.window_at(fps))) if params.settle is None else params.settle

    def score(frames: np.ndarray) -> None:
        frames = np.asarray(frames, int)
        scorer.score(frames[signal[frames] & ~scorer.scored[frames]])

    stride = max(1, params.stride)
    score(coarse_frames(signal, fps, stride))
    while stride // 2 >= params.min_stride and not np.any(scorer.scores_and_good()[1]):  # nothing good yet
        stride //= 2
        score(coarse_frames(signal, fps, stride))
    cands = sweep_candidates(*scorer.ranking(), fps, params.per_sweep, params.gate)[:params.max_candidates]
    if cands and params.refine == "dense":
        score(np.unique(np.concatenate([neighbourhood(c, radius, fps, n) for c in cands])))
    for c in cands if params.refine == "climb" else ():
        step = radius
        while step >= 1:
            near = neighbourhood(c, step, fps, n)
            side = near[(near == c - step) | (near == c + step)]
            score(side)
            ranked = scorer.ranking()
            side = side[np.isfinite(ranked[0][side])]
            c = best_of(*ranked, np.concatenate([[c], side]).astype(int))
            step //= 2
    while True:  # settle: each pass scores at least one new frame, so this ends
        frame = choose_frame(*scorer.ranking())
        if frame < 0:
            return
        near = neighbourhood(frame, settle, fps, n)
        near = near[signal[near] & ~scorer.scored[near]]
        if not len(near):
            return
        score(near)


def analyse_stack(stack: np.ndarray, model, *, device="cpu", batch_size: int = 16,
                  amp: bool = False, fov: np.ndarray | None = None,
                  search: str = "exhaustive", progress: bool = True) -> Analysis:
    """Choose the frame to measure the abdominal circumference on and segment it.

    stack: (frames, rows, cols) uint8 (any integer/float grey values 0..255 work).
    model: a FetalIQAModel with a SEG head (``load_exported``); moved to ``device``, eval mode.
    amp: fp16 autocast on CUDA (ignored on CPU). fov: bool (rows, cols) fan mask restricting
    the output mask; None -> pixels non-zero in any frame of the stack.
    search: "exhaustive" scores every frame that holds any signal; "fast" the coarse-to-fine
    search (``fast_search`` with ``FastSearch()``), about 100 of 840 frames with the embedded
    default; "auto" one of them by model and device (``resolve_search``; the container's default).
    A model without a SEG head (FetalCLIP-CLS alone) cannot produce the required mask:
    ValueError.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    stack = np.asarray(stack)
    if stack.ndim != 3 or 0 in stack.shape:
        raise ValueError(f"stack must be a non-empty (frames, rows, cols) array, got shape {stack.shape}")
    cfg = model.config
    if "seg" not in cfg.heads:
        raise ValueError(f"model heads {cfg.heads}: FetalCLIP-CLS alone chooses frames but cannot produce "
                         "the abdomen mask the challenge needs; use a model with a 'seg' head")
    search = resolve_search(search, cfg, device)
    n, rows, cols = stack.shape
    if fov is not None and fov.shape != (rows, cols):
        raise ValueError(f"fov shape {fov.shape} does not match the frames' ({rows}, {cols})")
    model.to(device).eval()

    signal = frames_with_signal(stack)
    timings["signal"] = time.perf_counter() - t0

    t = time.perf_counter()
    scorer = FrameScorer(stack, model, device=device, batch_size=batch_size, amp=amp, progress=progress)
    if search == "fast":
        fast_search(scorer, signal)
    else:
        scorer.score(np.flatnonzero(signal))
    timings["model"] = time.perf_counter() - t

    analysis = conclude(scorer, fov)
    analysis.timings = {**timings, **analysis.timings, "total": time.perf_counter() - t0}
    analysis.search = search
    return analysis


def frames_with_signal(stack: np.ndarray) -> np.ndarray:
    """bool (frames,): frames holding any non-zero pixel (a reduction: no full-size temporary)."""
    stack = np.asarray(stack)
    return stack.reshape(len(stack), -1).max(axis=1) > 0


def native_mask(scorer: FrameScorer, frame: int, fov: np.ndarray | None = None) -> np.ndarray:
    """uint8 (rows, cols) {0, 1} mask of ``frame`` on the native grid (all zero for -1), from
    the scorer's probability map (averaged over the config's mask window: the frames with
    signal within ``ModelConfig.mask_window_at`` of it in its sweep, weighted like the
    temporal window) and config, made ``measurable``; fov as in ``analyse_stack``."""
    stack, cfg = scorer.stack, scorer.cfg
    rows, cols = stack.shape[1:]
    if frame < 0:
        return np.zeros((rows, cols), np.uint8)
    fps = sweep_length(len(stack))
    idx, weights = window_weights(frame, cfg.mask_window_at(fps), fps, len(stack))
    keep = (idx == frame) | frames_with_signal(stack[idx[0]:idx[-1] + 1])  # idx is a contiguous run
    square = sum(w * scorer.seg_prob(int(j)) for j, w in zip(idx[keep], weights[keep])) / weights[keep].sum()
    prob = square_to_native(square[None], rows, cols)[0].numpy()
    fan = fov.astype(bool) if fov is not None else stack.max(axis=0) > 0
    mask = final_mask(prob, cfg.pixel_threshold, fan, ellipse=cfg.ellipse_mask)
    if not mask.any():  # fan has no pixel at all: fall back to the frame's non-zero pixels
        mask = final_mask(prob, cfg.pixel_threshold, stack[frame] > 0, ellipse=cfg.ellipse_mask)
    return measurable(mask)


def largest_area_frame(scorer: FrameScorer) -> int:
    """The organisers' baseline rule on the scorer's statistics: the scored frame with the
    largest predicted foreground area (earliest on ties), -1 when nothing was scored."""
    if not np.isfinite(scorer.area).any():
        return -1
    return int(np.argmax(np.nan_to_num(scorer.area, nan=-1.0)))


def conclude(scorer: FrameScorer, fov: np.ndarray | None = None) -> Analysis:
    """The Analysis of whatever ``scorer`` has scored: choose the frame, build its mask on the
    native grid (timings "select" and "mask"). fov as in ``analyse_stack``."""
    t = time.perf_counter()
    scored = scorer.scores_and_good()
    scores, good = scored[0], scored[1]
    frame = choose_frame(*scorer.ranking(scored))
    timings = {"select": time.perf_counter() - t}
    t = time.perf_counter()
    mask = native_mask(scorer, frame, fov)
    timings["mask"] = time.perf_counter() - t
    return Analysis(frame=frame, mask=mask, scores=scores.astype(np.float32), good=good.astype(bool),
                    timings=timings)
