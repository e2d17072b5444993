"""Scene, probe poses and labels of simulated cases: everything but pixels.

World frame, mm: x = maternal lateral, y = caudo-cranial (+ cranial), z = depth below the
skin. Fetal trunk-local coordinates: t along the fetal axis ``u`` (towards the head, 0 = the
stomach / umbilical-vein level), y1 towards the spine (``v1``), y2 towards the fetal left
(``v2``). A frame is the plane ``O + h*e_h + d*e_d`` (h lateral, d depth below the probe face),
its pixels laid out like the official sector fan (apex above the frame).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..measure import ramanujan_perimeter

SPACING_MM = 0.28
FULL_SHAPE = (562, 744)
SWEEPS = 6
# Sector fan fitted (Nelder-Mead on IoU, 0.9996) to resources/fov_mask.mha, in full-size
# pixels (pixel centres at +0.5): apex row/col, inner/outer radius, half opening angle (rad).
_FAN_APEX = (-184.79, 372.50)
_FAN_R0_MM, _FAN_R1_MM, _FAN_HALF = 213.24 * SPACING_MM, 748.27 * SPACING_MM, 0.52107
# AC distribution: the 553 per-sweep reference ACs of the ACOUSLIC-AI training set (v1.1,
# fetal_abdominal_circumferences_per_sweep.csv) have mean 232.0, sd 45.1, median 229.5,
# range 140.9-350.6 mm, close to symmetric -> a normal truncated to that range.
_AC_MEAN, _AC_SD, _AC_MIN, _AC_MAX = 232.0, 45.1, 140.0, 351.0


@dataclass(frozen=True)
class SimConfig:
    """Knobs of a simulated case; the defaults give the ACOUSLIC-AI format and look."""
    frames_per_sweep: int = 140          # frames per sweep (6 sweeps per case)
    rows: int = 562                      # frame height, pixels (same field of view at any size)
    cols: int = 744                      # frame width, pixels
    noise: float = 1.0                   # speckle strength: 0 none, 1 the speckle contrast of the real frames
    contrast: float = 1.0                # tissue contrast: echogenicities pulled to/away from their mean
    wobble: float = 1.0                  # operator variability: tilt, rotation, drift, speed, contact loss
    gain: float = 1.0                    # overall brightness
    blur: float = 1.0                    # speckle grain size and edge softness (resolution cell) factor
    anatomy_grid: tuple[int, int] = (144, 128)  # coarse polar grid (depth samples, beams) for anatomy
    opt_angle_deg: float = 20.0          # optimal: plane normal within this of the fetal axis
    opt_level: float = 0.3               # optimal: |axis crossing - stomach level| <= this x radius,
    #                                      and the plane cuts both the stomach and the umbilical vein
    opt_inside: float = 0.85             # optimal: fraction of the cross-section inside the fan
    sub_angle_deg: float = 48.0          # suboptimal (transverse abdominal section): same, looser
    sub_level: float = 0.4
    sub_inside: float = 0.75

    def __post_init__(self) -> None:
        if self.frames_per_sweep < 2:
            raise ValueError(f"frames_per_sweep must be >= 2, got {self.frames_per_sweep}")
        if self.rows < 32 or self.cols < 32:
            raise ValueError(f"frame size must be at least 32x32, got {self.rows}x{self.cols}")
        for name in ("noise", "contrast", "wobble", "gain", "blur"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if min(self.anatomy_grid) < 8:
            raise ValueError(f"anatomy_grid must be at least (8, 8), got {self.anatomy_grid}")



# ----------------------------------------------------------------------------- geometry
def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rotate(v: np.ndarray, axis: np.ndarray, ang: np.ndarray) -> np.ndarray:
    """Rodrigues rotation of vectors v (..., 3) about unit axes (..., 3) by angles (...)."""
    c, s = np.cos(ang)[..., None], np.sin(ang)[..., None]
    return v * c + np.cross(axis, v) * s + axis * np.sum(axis * v, -1, keepdims=True) * (1 - c)


def _smooth(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Unit-variance noise correlated over about ``corr`` samples (operator hand motion)."""
    x = rng.standard_normal(n + 64)
    if corr > 0.5:
        k = np.exp(-0.5 * (np.arange(-3 * corr, 3 * corr + 1) / corr) ** 2)
        x = np.convolve(x, k / np.sqrt(np.sum(k * k)), mode="same")
    return x[32:32 + n]


@dataclass
class _Scene:
    ac: float        # perimeter of the trunk cross-section, mm
    a: float         # trunk semi-axis towards the spine (v1), mm
    b: float         # trunk semi-axis across (v2), mm
    c: np.ndarray    # stomach-level point on the fetal axis (world, mm)
    u: np.ndarray    # fetal axis, towards the head
    v1: np.ndarray   # towards the spine
    v2: np.ndarray   # towards the fetal left
    wall: tuple[float, float, float, float]  # depths of skin/fat/muscle/uterine-wall ends, mm
    uterus_bottom: float
    placenta: tuple[np.ndarray, np.ndarray]  # centre, semi-axes (world-aligned)
    limbs: list[tuple[np.ndarray, np.ndarray, float]]  # trunk-local segments (A, B, radius)
    cord: list[tuple[np.ndarray, np.ndarray, float]]   # world segments
    blobs: list[tuple[np.ndarray, np.ndarray, float, bool]]  # confusers: centre, semi-axes, echo, bone
    head_r: float

    @property
    def r(self) -> float:
        return self.ac / (2 * math.pi)


@dataclass
class _Plan:
    scene: _Scene
    origin: np.ndarray   # (F, 3) probe face centre
    e_h: np.ndarray      # (F, 3) image lateral direction
    e_d: np.ndarray      # (F, 3) image depth direction
    contact: np.ndarray  # (F,) 1 probe in contact, 0 contact lost
    labels: np.ndarray   # (F,) uint8 0/1/2


def _make_scene(rng: np.random.Generator) -> _Scene:
    ac = _AC_MEAN + _AC_SD * rng.standard_normal()
    while not _AC_MIN <= ac <= _AC_MAX:
        ac = _AC_MEAN + _AC_SD * rng.standard_normal()
    k = rng.uniform(0.82, 1.0)
    a = ac / ramanujan_perimeter(1.0, k)
    b = a * k
    r = ac / (2 * math.pi)
    skin, fat, muscle, uwall = 1.5, rng.uniform(4, 14), rng.uniform(4, 9), rng.uniform(4, 7)
    wall = (skin, skin + fat, skin + fat + muscle, skin + fat + muscle + uwall)
    lie = rng.choice(3, p=[0.76, 0.1, 0.14])  # longitudinal, transverse, oblique
    if lie == 0:
        phi = rng.normal(0, 0.2) + (0 if rng.random() < 0.8 else math.pi)  # cephalic 80 %
    elif lie == 1:
        phi = rng.normal(0, 0.2) + rng.choice([-1, 1]) * math.pi / 2
    else:
        phi = rng.normal(0, 0.12) + rng.choice([-1, 1]) * math.pi / 4 + rng.choice([0, math.pi])
    pitch = rng.normal(0, 0.14)
    u = np.array([math.sin(phi) * math.cos(pitch), math.cos(phi) * math.cos(pitch), math.sin(pitch)])
    w1 = _unit(np.cross(u, [0.0, 0.0, 1.0]))
    w2 = np.cross(u, w1)
    psi = rng.uniform(0, 2 * math.pi)
    v1 = math.cos(psi) * w1 + math.sin(psi) * w2
    v2 = np.cross(u, v1)
    anterior = rng.random() < 0.5
    thick = rng.uniform(18, 32)
    top = wall[3] + (thick if anterior else 0) + 4
    uterus_bottom = rng.uniform(150, 185)
    zc = rng.uniform(top + 0.9 * r, max(top + 0.9 * r + 1, 128 - 0.4 * r))
    c = np.array([np.clip(rng.normal(-12, 30), -70, 70), np.clip(rng.normal(0, 25), -70, 70), zc])
    pz = wall[3] + thick / 2 if anterior else uterus_bottom - thick / 2
    placenta = (np.array([rng.normal(0, 40), rng.normal(0, 40), pz]),
                np.array([rng.uniform(60, 85), rng.uniform(70, 95), thick / 2]))
    limbs = []
    for side in (-1, 1):  # legs flexed at the pelvis, arms at the shoulders (trunk-local t, y1, y2)
        hip = np.array([-1.75 * r, -0.1 * r, side * 0.55 * b])
        knee = hip + r * np.array([rng.uniform(0.3, 0.9), -rng.uniform(0.7, 1.1), side * rng.uniform(0, 0.4)])
        foot = knee + r * np.array([-rng.uniform(0.6, 1.0), rng.uniform(-0.2, 0.3), side * rng.uniform(-0.2, 0.2)])
        sh = np.array([2.05 * r, -0.2 * r, side * 0.8 * b])
        elbow = sh + r * np.array([-rng.uniform(0.2, 0.7), -rng.uniform(0.5, 0.8), side * rng.uniform(0, 0.3)])
        hand = elbow + r * np.array([rng.uniform(0.1, 0.6), -rng.uniform(0.0, 0.3), -side * rng.uniform(0, 0.5)])
        limbs += [(hip, knee, 0.26 * r), (knee, foot, 0.2 * r), (sh, elbow, 0.18 * r), (elbow, hand, 0.15 * r)]
    cord, p = [], c - 1.3 * r * v1 + rng.normal(0, 0.4 * r, 3)
    for _ in range(4):  # cord loops floating in front of the abdomen
        q = p + _unit(rng.standard_normal(3)) * rng.uniform(0.6, 1.2) * r
        cord.append((p, q, rng.uniform(0.09, 0.12) * r))
        p = q
    blobs = []  # round-ish sections that are not the abdomen (small parts, maternal bowel)
    for _ in range(rng.integers(6, 14)):
        cen = np.array([rng.uniform(-130, 130), rng.uniform(-150, 150), rng.uniform(30, 150)])
        if np.linalg.norm(np.cross(cen - c, u)) < 1.4 * r:
            continue
        blobs.append((cen, rng.uniform(0.3, 1.0, 3) * r, rng.uniform(0.12, 0.5), bool(rng.random() < 0.4)))
    return _Scene(ac, a, b, c, u, v1, v2, wall, uterus_bottom, placenta, limbs, cord, blobs,
                  head_r=r * rng.uniform(0.95, 1.1))


def _sweep_poses(rng: np.random.Generator, n: int, wobble: float):
    """Probe poses of the 6 protocol sweeps: origin, e_h, e_d (each (6n, 3)) and contact (6n,)."""
    origins, ehs, eds, contact = [], [], [], []
    deg = math.pi / 180
    corr = max(1.0, n / 12)
    for k in range(SWEEPS):
        transverse = k < 3
        length = rng.uniform(260, 360) if transverse else rng.uniform(200, 280)
        offset = ([0.0, -85.0, 85.0] if transverse else [50.0, 0.0, -70.0])[k % 3] + rng.normal(0, 30)
        speed = np.exp(0.45 * wobble * _smooth(rng, n, corr))
        s = np.concatenate([[0.0], np.cumsum(speed[:-1])])
        s = (s / s[-1] - 0.5) * length + rng.normal(0, 10)
        drift = offset + 6 * wobble * _smooth(rng, n, corr)
        o = np.zeros((n, 3))
        along, across = (1, 0) if transverse else (0, 1)
        o[:, along], o[:, across] = s, drift
        o[:, 2] = 1.5 * wobble * _smooth(rng, n, corr)  # pressing harder / lighter
        e_h0 = np.array([1.0, 0, 0]) if transverse else np.array([0, 1.0, 0])
        e_d0 = np.array([0, 0, 1.0])
        tilt = wobble * deg * (rng.normal(0, 10) + 3 * _smooth(rng, n, corr))   # about e_h (rocking)
        rot = wobble * deg * (rng.normal(0, 6) + 3 * _smooth(rng, n, corr))    # about e_d
        roll = wobble * deg * (rng.normal(0, 4) + 2 * _smooth(rng, n, corr))   # about the normal
        e_h = np.broadcast_to(e_h0, (n, 3)).copy()
        e_d = np.broadcast_to(e_d0, (n, 3)).copy()
        e_h = _rotate(e_h, np.broadcast_to(e_d0, (n, 3)), rot)
        normal = np.cross(e_h, e_d)
        e_d = _rotate(e_d, e_h, tilt)
        normal = np.cross(e_h, e_d)
        e_h, e_d = _rotate(e_h, normal, roll), _rotate(e_d, normal, roll)
        c = np.ones(n)
        if rng.random() < 0.35 * min(wobble, 2):  # lift-off: a few frames without contact
            m = max(1, round(rng.uniform(2, 10) * n / 140))
            i = rng.integers(0, n - m + 1)
            c[i:i + m] = 0.0
        origins.append(o), ehs.append(e_h), eds.append(e_d), contact.append(c)
    return np.concatenate(origins), np.concatenate(ehs), np.concatenate(eds), np.concatenate(contact)


def _in_fan_mm(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    y = d + _FAN_R0_MM
    rho = np.hypot(h, y)
    return (rho >= _FAN_R0_MM) & (rho <= _FAN_R1_MM) & (np.abs(np.arctan2(h, y)) <= _FAN_HALF)


def _section_maps(sc: _Scene, o: np.ndarray, e_h: np.ndarray, e_d: np.ndarray):
    """Per frame, the affine map (h, d) -> normalised trunk coords (x1, x2): x = A @ [h, d] + b."""
    q0 = o - sc.c
    w = np.stack([sc.v1 / sc.a, sc.v2 / sc.b])            # (2, 3)
    A = np.stack([e_h @ w.T, e_d @ w.T], axis=-1)          # (F, 2, 2)
    return A, q0 @ w.T                                     # (F, 2)


# Fixed sample of the unit disk (deterministic) for the inside-the-fan fraction of sections.
_DISK = np.stack(np.meshgrid(np.linspace(-1, 1, 23), np.linspace(-1, 1, 23)), -1).reshape(-1, 2)
_DISK = _DISK[np.sum(_DISK ** 2, 1) <= 1]


# Landmarks of the optimal plane, trunk-local (t, y1, y2) in units of (radius, a, b).
_STOMACH = ((0.08, -0.05, 0.42), (0.35, 0.25, 0.22))           # centre, semi-axes
_UV = ((-0.25, -0.9, 0.05), (0.28, -0.1, -0.2))                # umbilical vein: insertion -> portal sinus


def _local_to_world(sc: _Scene, p) -> np.ndarray:
    return sc.c + p[0] * sc.r * sc.u + p[1] * sc.a * sc.v1 + p[2] * sc.b * sc.v2


def _cuts_landmarks(sc: _Scene, o: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(F,) True where the plane cuts both the stomach and the umbilical vein."""
    dist = lambda p: np.sum((_local_to_world(sc, p) - o) * n, 1)  # noqa: E731
    (c, s) = _STOMACH
    half = np.sqrt(sum((n @ v * k) ** 2 for v, k in ((sc.u, s[0] * sc.r), (sc.v1, s[1] * sc.a), (sc.v2, s[2] * sc.b))))
    d0, d1 = dist(_UV[0]), dist(_UV[1])
    return (np.abs(dist(c)) < half) & (np.sign(d0) != np.sign(d1))


def _axis_level(sc: _Scene, o: np.ndarray, n: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """(F,) distance (mm) from where each plane crosses the fetal axis to the stomach level;
    inf where not ``ok`` (planes too oblique to cross it meaningfully)."""
    un = n @ sc.u
    level = np.full(len(o), np.inf)
    level[ok] = np.abs(np.sum((o - sc.c) * n, 1)[ok] / un[ok])
    return level


def _fraction_in_fan(sc: _Scene, o, e_h, e_d, frames: np.ndarray) -> np.ndarray:
    """(F,) fraction of the trunk cross-section inside the fan for the given frames (0 elsewhere)."""
    A, b = _section_maps(sc, o, e_h, e_d)
    inside = np.zeros(len(o))
    for i in frames:
        hd = np.linalg.solve(A[i], (_DISK - b[i]).T)       # disk -> section in the image plane
        inside[i] = np.mean(_in_fan_mm(hd[0], hd[1]))
    return inside


def near_misses(plan: "_Plan", level: float = 0.6, angle_deg: float = 60.0, inside_min: float = 0.5) -> np.ndarray:
    """(F,) bool: unannotated frames in contact that still show a transverse trunk section
    (plane within ``angle_deg`` of transverse, crossing the axis within ``level`` x radius of
    the stomach level, at least ``inside_min`` of the section in the fan): frames that look
    like the annotated ones to a model that cannot resolve the plane's level or tilt."""
    sc, o, e_h, e_d = plan.scene, plan.origin, plan.e_h, plan.e_d
    n = np.cross(e_h, e_d)
    lev = _axis_level(sc, o, n, np.abs(n @ sc.u) >= math.cos(angle_deg * math.pi / 180))
    cand = np.nonzero((plan.labels == 0) & (plan.contact >= 0.5) & (lev <= level * sc.r))[0]
    out = np.zeros(len(o), bool)
    out[cand] = _fraction_in_fan(sc, o, e_h, e_d, cand)[cand] >= inside_min
    return out


def plane_levels(plan: "_Plan") -> np.ndarray:
    """(F,) where each frame's plane crosses the fetal axis, as the distance from the stomach
    level in trunk radii (0: the abdominal plane's level; about 1.3: thorax; inf: planes more
    than ~72 degrees from transverse, which do not cross the axis meaningfully)."""
    sc = plan.scene
    n = np.cross(plan.e_h, plan.e_d)
    return _axis_level(sc, plan.origin, n, np.abs(n @ sc.u) > 0.3) / sc.r


def _labels(sc: _Scene, o, e_h, e_d, contact, cfg: SimConfig) -> np.ndarray:
    n = np.cross(e_h, e_d)
    cosb = np.abs(n @ sc.u)
    ok = cosb > 0.3
    level = _axis_level(sc, o, n, ok)                                # where the plane crosses the axis
    inside = _fraction_in_fan(sc, o, e_h, e_d, np.nonzero(ok & (level <= cfg.sub_level * sc.r))[0])
    r = sc.r
    deg = math.pi / 180
    opt_geom = (cosb >= math.cos(cfg.opt_angle_deg * deg)) & (level <= cfg.opt_level * r) \
        & _cuts_landmarks(sc, o, n)
    sub_geom = (cosb >= math.cos(cfg.sub_angle_deg * deg)) & (level <= cfg.sub_level * r)
    lab = np.zeros(len(o), np.uint8)
    lab[sub_geom & (inside >= cfg.sub_inside)] = 2
    lab[opt_geom & (inside >= cfg.opt_inside)] = 1
    lab[contact < 0.5] = 0
    return lab


def _plan(seed: int, cfg: SimConfig) -> _Plan:
    """Scene, probe poses and labels of a case: everything but pixels (the fast path)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0])
    sc = _make_scene(rng)
    o, e_h, e_d, contact = _sweep_poses(rng, cfg.frames_per_sweep, cfg.wobble)
    return _Plan(sc, o, e_h, e_d, contact, _labels(sc, o, e_h, e_d, contact, cfg))


def _pixel_mm(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Lateral and apex-distance (mm) of pixel centres; the field of view is that of 562x744."""
    pr, pc = SPACING_MM * FULL_SHAPE[0] / rows, SPACING_MM * FULL_SHAPE[1] / cols
    y = (np.arange(rows) + 0.5) * pr - _FAN_APEX[0] * SPACING_MM
    x = (np.arange(cols) + 0.5) * pc - _FAN_APEX[1] * SPACING_MM
    return np.meshgrid(x, y)


def fan_mask(rows: int = FULL_SHAPE[0], cols: int = FULL_SHAPE[1]) -> np.ndarray:
    """The simulated sector fan, bool ``(rows, cols)``; at 562x744 it matches the official FOV."""
    h, y = _pixel_mm(rows, cols)
    return _in_fan_mm(h, y - _FAN_R0_MM)
