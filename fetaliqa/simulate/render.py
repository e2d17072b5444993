"""Image formation of simulated cases: echogenicity of the scene along the beams of the fan.

Echogenicity and attenuation are evaluated on a coarse polar grid (depth samples x beams) per
frame; acoustic shadows are the transmission accumulated along each beam; depth attenuation
with time-gain compensation, then a precomputed bank of log-compressed Rayleigh speckle is
multiplied on a fine polar grid (about one sample per pixel) and the result is scan-converted
to the frame with OpenCV ``remap``. Masks are the trunk cross-section, exact per pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .geometry import (_FAN_HALF, _FAN_R0_MM, _FAN_R1_MM, _STOMACH, _UV, FULL_SHAPE, SPACING_MM, SimConfig,
                       _in_fan_mm, _pixel_mm, _Plan, _Scene, _section_maps)


@dataclass(frozen=True)
class _Grids:
    """Fan geometry of one frame size: coarse polar anatomy grid, fine polar grid, scan conversion."""
    h: np.ndarray        # (nd, na) coarse polar samples: lateral mm
    d: np.ndarray        # (nd, na) depth below the probe face, mm
    rd: np.ndarray       # (nd,) radial depth below the probe face, mm
    fine: tuple[int, int]  # (depth samples, beams) of the fine polar grid (~1 sample per pixel)
    map_x: np.ndarray    # (rows, cols) float32 fine-grid beam index of each pixel (-9 outside)
    map_y: np.ndarray    # (rows, cols) float32 fine-grid depth index
    fan: np.ndarray      # (rows, cols) bool
    ph: np.ndarray       # (rows, cols) float32 lateral mm of each pixel
    pd: np.ndarray       # (rows, cols) float32 depth mm of each pixel


@lru_cache(maxsize=4)
def _grids(rows: int, cols: int, nd: int, na: int) -> _Grids:
    rho = np.linspace(_FAN_R0_MM, _FAN_R1_MM, nd)
    th = np.linspace(-_FAN_HALF, _FAN_HALF, na)
    h = (rho[:, None] * np.sin(th)[None]).astype(np.float32)
    d = (rho[:, None] * np.cos(th)[None] - _FAN_R0_MM).astype(np.float32)
    px = SPACING_MM * FULL_SHAPE[0] / rows
    fine = (max(8, round((_FAN_R1_MM - _FAN_R0_MM) / px)), max(8, round(2 * _FAN_HALF * _FAN_R1_MM / px)))
    ph, py = _pixel_mm(rows, cols)
    prho, pth = np.hypot(ph, py), np.arctan2(ph, py)
    fan = _in_fan_mm(ph, py - _FAN_R0_MM)
    map_x = np.where(fan, (pth + _FAN_HALF) / (2 * _FAN_HALF) * (fine[1] - 1), -9).astype(np.float32)
    map_y = np.where(fan, (prho - _FAN_R0_MM) / (_FAN_R1_MM - _FAN_R0_MM) * (fine[0] - 1), -9).astype(np.float32)
    return _Grids(h, d, (rho - _FAN_R0_MM).astype(np.float32), fine, map_x, map_y, fan,
                  ph.astype(np.float32), (py - _FAN_R0_MM).astype(np.float32))


def _ellipsoid(p: tuple, c: tuple, s: tuple) -> np.ndarray:
    """Normalised radius of points p=(t, y1, y2) arrays in an axis-aligned ellipsoid (c, s)."""
    return np.sqrt(sum(((pi - ci) / si) ** 2 for pi, ci, si in zip(p, c, s)))


def _capsule(p: tuple, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of points p=(x, y, z) arrays to the segment a-b."""
    ab = b - a
    t = np.clip(sum((pi - ai) * bi for pi, ai, bi in zip(p, a, ab)) / float(ab @ ab), 0, 1)
    return np.sqrt(sum((pi - ai - t * bi) ** 2 for pi, ai, bi in zip(p, a, ab)))


_BOX = (np.array([-220.0, -260.0, -30.0]), np.array([220.0, 260.0, 230.0]))  # world extent of fields


def _field(rng: np.random.Generator, step: float, sigma: float) -> np.ndarray:
    """A smooth unit-variance random field on a grid of ``step`` mm over ``_BOX`` (float32)."""
    from scipy.ndimage import gaussian_filter

    shape = tuple(int(v) for v in np.ceil((_BOX[1] - _BOX[0]) / step) + 1)
    f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f / f.std()).astype(np.float32), step


def _sample(field, P: np.ndarray) -> np.ndarray:
    """Trilinear sample of a ``_field`` at world points P (..., 3)."""
    from scipy.ndimage import map_coordinates

    grid, step = field
    idx = ((P.reshape(-1, 3) - _BOX[0].astype(np.float32)) / np.float32(step)).T
    return map_coordinates(grid, idx, order=1, mode="nearest").reshape(P.shape[:-1])


def _anatomy(sc: _Scene, P: np.ndarray, rd: np.ndarray, near: np.ndarray, tex: list,
             o: np.ndarray, n: np.ndarray):
    """Echogenicity E and attenuation (1/mm) at world points P (F, nd, na, 3).

    ``near`` (F,) says which frames may cut the fetus (others skip the fetal structures);
    ``o``, ``n`` (F, 3) are the frames' origins and normals.
    """
    X, Y, Z = P[..., 0], P[..., 1], P[..., 2]
    E = np.full(X.shape, 0.30, np.float32)
    ab = np.full(X.shape, 0.016, np.float32)
    skin, fat, muscle, uwall = sc.wall
    rde = rd[None, :, None] - 1.2 * np.sin(0.045 * (X + 0.7 * Y) + 1.0)  # wavy layers
    E[rde < uwall] = 0.36
    E[rde < muscle] = 0.42 + 0.08 * np.sin(2.1 * rde[rde < muscle])  # striated muscle
    E[rde < fat] = 0.2
    E[np.abs(rde - fat) < 0.8] = 0.75   # fascia lines
    E[np.abs(rde - muscle) < 0.8] = 0.65
    E[rde < skin] = 0.85
    uterus = (rde >= uwall) & (Z < sc.uterus_bottom) & ((X / 170) ** 2 + (Y / 190) ** 2 < 1)
    # the rest of the uterus: a smooth random field split into fluid pockets, soft parts of
    # varied echogenicity and bright interfaces between them
    fld = _sample(tex[1], P)
    E[uterus], ab[uterus] = 0.3 + 0.12 * np.clip(-fld[uterus], -0.8, 1.5), 0.012
    E[uterus & (np.abs(fld + 0.9) < 0.05)] = 0.5
    E[uterus & (np.abs(fld - 0.9) < 0.08)] = 0.55
    fl = uterus & (fld > 1.0)
    E[fl], ab[fl] = 0.012, 0.001
    E[uterus & (Z > sc.uterus_bottom - 6)] = 0.4
    pc, ps = sc.placenta
    pl = uterus & (((X - pc[0]) / ps[0]) ** 2 + ((Y - pc[1]) / ps[1]) ** 2 + ((Z - pc[2]) / ps[2]) ** 2 < 1)
    E[pl], ab[pl] = 0.5, 0.007
    for a, b, r in sc.cord:
        f = np.nonzero(np.abs(np.sum((0.5 * (a + b) - o) * n, 1)) < 0.5 * np.linalg.norm(b - a) + r)[0]
        if len(f):
            Q = P[f]
            dist = _capsule((Q[..., 0], Q[..., 1], Q[..., 2]), a, b)
            e, k, ut = E[f], ab[f], uterus[f]
            e[ut & (dist < r)], k[ut & (dist < r)] = 0.45, 0.005
            e[ut & (dist < 0.4 * r)] = 0.015
            E[f], ab[f] = e, k
    for cen, ax, echo, bone in sc.blobs:
        f = np.nonzero(np.abs(np.sum((cen - o) * n, 1)) < ax.max())[0]
        if len(f):
            Q = P[f]
            en = np.sqrt(sum(((Q[..., i] - cen[i]) / ax[i]) ** 2 for i in range(3)))
            e, k = E[f], ab[f]
            e[en < 1.08], k[en < 1.08] = 0.55, 0.01
            e[en < 1] = echo
            if bone:  # a long bone or rib cut along
                m = (en < 0.8) & (np.abs(Q[..., 1] - cen[1]) < 1.5)
                e[m], k[m] = 1.4, 0.25
            E[f], ab[f] = e, k
    if near.any():
        q = P[near].reshape(-1, 3) - sc.c.astype(np.float32)
        t, y1, y2 = (q @ np.stack([sc.u, sc.v1, sc.v2], 1).astype(np.float32)).T
        sel = np.nonzero((y1 * y1 + y2 * y2 < (2.6 * sc.r) ** 2) & (t > -4.5 * sc.r) & (t < 6.5 * sc.r))[0]
        e, k = E[near].reshape(-1), ab[near].reshape(-1)
        es, ks = e[sel], k[sel]
        _fetus(sc, t[sel], y1[sel], y2[sel], es, ks)
        e[sel], k[sel] = es, ks
        E[near], ab[near] = e.reshape(-1, *E.shape[1:]), k.reshape(-1, *E.shape[1:])
    E *= np.exp(0.35 * _sample(tex[0], P))  # coherent tissue heterogeneity (fixed in the world)
    return E, ab


def _fetus(sc: _Scene, t, y1, y2, E, ab) -> None:
    """Paint the fetus into flat E / ab (in place) from trunk-local coordinates t, y1, y2 (mm).

    Each structure is evaluated only on the points within its extent along the fetal axis.
    """
    r, a, b = sc.r, sc.a, sc.b
    lo, hi, cap = -2.0 * r, 2.4 * r, 0.6 * r

    def part(tc: float, ext: float, base: np.ndarray | None = None):
        i = np.nonzero(np.abs(t - tc) < ext)[0] if base is None else base[np.abs(t[base] - tc) < ext]
        return i, (t[i], y1[i], y2[i])

    def paint(i, m, e, k=None):
        E[i[m]] = e
        if k is not None:
            ab[i[m]] = k

    i, (tt, z1, z2) = part(0.5 * (lo + hi), 0.5 * (hi - lo))
    sc_ = np.ones_like(tt)
    sc_ = np.where(tt > hi - cap, np.sqrt(np.clip(1 - ((tt - hi + cap) / cap) ** 2, 0, 1)), sc_)
    sc_ = np.where(tt < lo + cap, np.sqrt(np.clip(1 - ((tt - lo - cap) / cap) ** 2, 0, 1)), sc_)
    rn = np.sqrt((z1 / a) ** 2 + (z2 / b) ** 2)
    inside = rn < sc_
    tr = i[inside]                                          # points inside the trunk
    j, (tt2, z12, z22) = part(hi + 0.2 * r, 0.3 * r)
    paint(j, np.hypot(z12, z22) < 0.45 * r, 0.38, 0.008)    # neck
    paint(i, inside, 0.22, 0.008)                           # liver
    paint(i, inside & (tt < -0.5 * r), 0.4)                 # bowel
    paint(i, inside & (tt > 0.65 * r), 0.42)                # lungs
    paint(i, inside & (rn > sc_ - 2.5 / r), 0.75)           # skin line of the abdominal wall
    ribs = inside & (tt > 0.65 * r) & (tt < 2.1 * r) & (rn > 0.86 * sc_) & (rn < 0.96 * sc_) \
        & (np.abs(np.arctan2(z2 / b, z1 / a)) < 2.3) & (np.cos(2 * np.pi * tt / (0.25 * r)) > 0.6)
    j, p = part(1.3 * r, 0.42 * r, tr)
    paint(j, _ellipsoid(p, (1.3 * r, -0.15 * a, 0.15 * b), (0.42 * r,) * 3) < 1, 0.5)   # heart
    for dy1, dy2, s1, s2 in ((-0.14, -0.12, 0.13, 0.1), (-0.14, 0.12, 0.13, 0.1), (0.1, -0.12, 0.1, 0.09),
                             (0.1, 0.12, 0.1, 0.09)):     # ventricles and atria
        paint(j, _ellipsoid(p, (1.3 * r, (-0.15 + dy1) * a, (0.15 + dy2) * b),
                            (0.25 * r, s1 * r * 1.3, s2 * r * 1.3)) < 1, 0.015)
    j, p = part(-0.6 * r, 0.3 * r, tr)
    for side in (-1, 1):                                    # kidneys with a bright sinus
        kd = _ellipsoid(p, (-0.6 * r, 0.5 * a, side * 0.42 * b), (0.3 * r, 0.17 * a, 0.14 * b))
        paint(j, kd < 1, 0.22)
        paint(j, kd < 0.35, 0.5)
    j, p = part(-1.6 * r, 0.2 * r, tr)
    paint(j, _ellipsoid(p, (-1.6 * r, -0.3 * a, 0), (0.2 * r,) * 3) < 1, 0.015)   # bladder
    (sc0, sc1, sc2), (ss0, ss1, ss2) = _STOMACH
    j, p = part(sc0 * r, 1.15 * ss0 * r, tr)
    st = _ellipsoid(p, (sc0 * r, sc1 * a, sc2 * b), (ss0 * r, ss1 * a, ss2 * b))  # stomach
    paint(j, (st < 1.15) & (st >= 1), 0.5)
    paint(j, st < 1, 0.012, 0.001)
    j, p = part(0.015 * r, 0.35 * r, tr)  # umbilical vein: from the cord insertion up to the portal sinus
    uv = _capsule(p, *(np.array(e) * (r, a, b) for e in _UV))
    paint(j, uv < 0.085 * r, 0.65)                          # umbilical vein: bright wall,
    paint(j, uv < 0.055 * r, 0.015)                         # anechoic lumen
    paint(i, ribs, 1.3, 0.2)
    j = np.nonzero((y1 > 0.5 * a) & (t > lo + 0.1 * r) & (t < hi + 0.3 * r))[0]
    tt, z1, z2 = t[j], y1[j], y2[j]
    spine = (np.hypot(z1 - 0.7 * a, z2) < 0.13 * r) | (np.hypot(z1 - 0.88 * a, np.abs(z2) - 0.16 * b) < 0.07 * r)
    E[j[spine]] = 1.5 + 0.4 * np.cos(2 * np.pi * tt[spine] / (0.2 * r))  # vertebrae and discs
    ab[j[spine]] = 0.3
    hr_ = sc.head_r                                         # head: skull, brain, falx, choroid
    hc = hi + 0.2 * r + 0.85 * hr_
    j, p = part(hc, 0.85 * hr_ + 3)
    en = _ellipsoid(p, (hc, 0, 0), (0.85 * hr_, 1.15 * hr_, 0.95 * hr_))
    brain = en < 1
    paint(j, brain, 0.06, 0.002)
    paint(j, brain & (np.abs(p[2]) < 1.3), 0.6)
    for side in (-1, 1):
        paint(j, brain & (_ellipsoid(p, (hc, 0.2 * hr_, side * 0.3 * hr_), (0.2 * hr_, 0.3 * hr_, 0.1 * hr_)) < 1), 0.55)
    paint(j, np.abs(en - 1) < 2.5 / hr_, 1.6, 0.25)
    for a0, b0, rad in sc.limbs:                            # limbs: soft tissue and long bone
        j, p = part(0.5 * (a0[0] + b0[0]), 0.5 * abs(a0[0] - b0[0]) + rad)
        dist = _capsule(p, a0, b0)
        paint(j, dist < rad, 0.38, 0.008)
        paint(j, dist < 0.28 * rad, 1.5, 0.25)


_GAMMA = 0.55  # log-like compression of the echo amplitude


def _speckle_bank(rng: np.random.Generator, fine: tuple[int, int], cfg: SimConfig, margin: int,
                  count: int = 8) -> np.ndarray:
    """Compressed Rayleigh speckle on the fine polar grid: (count, nd+2m, na+2m) float32, mean ~1."""
    nd, na = fine[0] + 2 * margin, fine[1] + 2 * margin
    scale = fine[0] / 535  # grain in pixels shrinks with the frame
    sy, sx = max(0.3, 0.9 * cfg.blur * scale), max(0.3, 5.5 * cfg.blur * scale)
    out = np.empty((count, nd, na), np.float32)
    for i in range(count):
        re, im = (cv2.GaussianBlur(rng.standard_normal((nd, na)).astype(np.float32), (0, 0), sx, sigmaY=sy)
                  for _ in range(2))
        amp = np.sqrt(re * re + im * im)
        amp /= np.sqrt(np.mean(amp * amp))
        w = min(1.0, 0.65 * cfg.noise)  # noise 1: the speckle contrast of the real frames
        out[i] = ((1 - w) + w * amp) ** _GAMMA
    return out / out.mean()


def _render(plan: _Plan, seed: int, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels and label masks of a planned case: uint8 stack and masks (frames, rows, cols), and
    per frame the fraction of the trunk cross-section inside the fan (nan where unlabelled)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 1])
    g = _grids(cfg.rows, cfg.cols, *cfg.anatomy_grid)
    sc, nf = plan.scene, len(plan.origin)
    margin = max(4, g.fine[0] // 20)
    bank = _speckle_bank(rng, g.fine, cfg, margin)
    tex = [_field(rng, 5.0, 1.0), _field(rng, 8.0, 2.0)]  # tissue texture, fluid pockets
    offs = rng.integers(0, 2 * margin + 1, size=(nf, 2))
    which = rng.integers(0, len(bank), size=nf)
    stack = np.zeros((nf, cfg.rows, cfg.cols), np.uint8)
    masks = np.zeros_like(stack)
    nd = len(g.rd)
    dr = float(g.rd[1] - g.rd[0])
    th = np.linspace(-1, 1, g.h.shape[1])
    tgc = (np.exp(0.001 * g.rd) * (0.85 + 0.3 * np.exp(-g.rd / 6)))[None, :, None] \
        * (1 - 0.4 * th ** 4 * np.clip(g.rd / 60, 0, 1)[:, None])[None]  # darker deep fan edges
    reverb = (0.25 * np.exp(-g.rd / 12) * (0.5 + 0.5 * np.cos(2 * np.pi * g.rd / 4)))[:, None]
    fan8 = g.fan.astype(np.uint8)
    m1, m2 = cv2.convertMaps(g.map_x, g.map_y, cv2.CV_16SC2)  # fixed point: faster remap
    n_vec = np.cross(plan.e_h, plan.e_d)
    # frames whose plane passes within the fetus' bounding sphere get the fetal structures
    centre = sc.c + sc.u * 1.2 * sc.r
    near = np.abs(np.sum((centre - plan.origin) * n_vec, 1)) < 5.2 * sc.r
    k = cfg.gain * 255 / 1.65
    mean_e = 0.35
    for lo in range(0, nf, 35):
        sl = slice(lo, min(nf, lo + 35))
        P = (plan.origin[sl, None, None, :] + g.h[None, ..., None] * plan.e_h[sl, None, None, :]
             + g.d[None, ..., None] * plan.e_d[sl, None, None, :]).astype(np.float32)
        E, ab = _anatomy(sc, P, g.rd, near[sl], tex, plan.origin[sl], n_vec[sl])
        if cfg.contrast != 1:
            E = np.maximum(mean_e + cfg.contrast * (E - mean_e), 0.005)
        trans = np.exp(-np.concatenate([np.zeros_like(ab[:, :1]), np.cumsum(ab * dr, 1)[:, :-1]], 1))
        V = (E * trans * tgc) ** _GAMMA
        sig = 0.8 * cfg.blur
        for j, f in enumerate(range(sl.start, sl.stop)):
            v = V[j] if plan.contact[f] >= 0.5 else np.broadcast_to(reverb, (nd, V.shape[2])) ** _GAMMA
            if sig > 0:  # finite resolution: soft edges
                v = cv2.GaussianBlur(np.ascontiguousarray(v, np.float32), (0, 0), sig)
            fine = cv2.resize(np.ascontiguousarray(v, np.float32), g.fine[::-1], interpolation=cv2.INTER_LINEAR)
            oy, ox = offs[f]
            fine *= bank[which[f], oy:oy + g.fine[0], ox:ox + g.fine[1]]
            img = cv2.remap(fine, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            stack[f] = np.maximum(cv2.convertScaleAbs(img, alpha=k), fan8)  # >= 1 inside the fan
    A, b = _section_maps(sc, plan.origin, plan.e_h, plan.e_d)
    inside = np.full(nf, np.nan)
    px_area = (SPACING_MM * FULL_SHAPE[0] / cfg.rows) * (SPACING_MM * FULL_SHAPE[1] / cfg.cols)
    for f in np.nonzero(plan.labels)[0]:
        x1 = A[f, 0, 0] * g.ph + A[f, 0, 1] * g.pd + b[f, 0]
        x2 = A[f, 1, 0] * g.ph + A[f, 1, 1] * g.pd + b[f, 1]
        m = (x1 * x1 + x2 * x2 <= 1) & g.fan
        masks[f][m] = plan.labels[f]
        inside[f] = np.count_nonzero(m) * px_area * abs(np.linalg.det(A[f])) / np.pi  # / section area
    return stack, masks, inside
