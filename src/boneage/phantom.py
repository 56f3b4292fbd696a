"""Synthetic paediatric left-hand radiographs ("phantoms") with exact ground truth.

A pure numpy/OpenCV renderer after `../shared/docs/phantom.md` (the spec; section numbers below
refer to it). Bones are small polygons in the hand frame (u, v) (unit = hand length L, origin at
the distal radius articular surface, +u towards the thumb, +v towards the fingertips); each bone's
appearance (presence, size, epiphysis shape, growth plate width and closure) is a continuous
function of its own maturity age m_b = BA + k(BA) * (g + e_group + e_bone) (§3.4). The hand is
drawn once, upright, at its final pixel scale on a canvas just large enough for it; one composed
affine (rotation, mirror, translation) then moves image, mask and keypoints together (§5), and
the intensity artefacts follow in the order of §6.

Public API: `PhantomConfig`, `PhantomSample`, `render_phantom`, `sample_labels`, `make_phantom`,
`bone_centres`. Every draw comes from `np.random.default_rng([seed, index])` (the label from
`default_rng([seed, index, 7])`), so a (seed, index) pair always gives identical bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

# ----------------------------------------------------------------------------------------------
# Tables of the spec (defaults of PhantomConfig)
# ----------------------------------------------------------------------------------------------

# §2.2 bone sizes (fraction of L): len, mid-shaft width, broad-end width[, tuft width]
_BONE_SIZES = {
    "MC1": [0.215, 0.050, 0.075], "MC2": [0.335, 0.042, 0.068], "MC3": [0.320, 0.042, 0.068],
    "MC4": [0.285, 0.035, 0.058], "MC5": [0.265, 0.037, 0.060],
    "PP1": [0.160, 0.045, 0.068], "PP2": [0.205, 0.040, 0.062], "PP3": [0.220, 0.040, 0.062],
    "PP4": [0.205, 0.038, 0.060], "PP5": [0.165, 0.034, 0.052],
    "MP2": [0.120, 0.034, 0.052], "MP3": [0.130, 0.034, 0.052], "MP4": [0.125, 0.033, 0.050],
    "MP5": [0.095, 0.028, 0.044],
    "DP1": [0.120, 0.032, 0.055, 0.045], "DP2": [0.080, 0.022, 0.042, 0.032],
    "DP3": [0.087, 0.022, 0.042, 0.032], "DP4": [0.085, 0.022, 0.040, 0.030],
    "DP5": [0.075, 0.020, 0.036, 0.028],
}
# §2.2 ray layout: MC base u, v, MC angle (deg), phalanx angle (deg), jitter SD (deg)
_RAYS = {
    "1": [0.135, 0.180, 38.0, 30.0, 6.0], "2": [0.080, 0.190, 8.0, 10.0, 3.0],
    "3": [0.000, 0.195, 0.0, 0.0, 2.0], "4": [-0.070, 0.190, -7.0, -9.0, 3.0],
    "5": [-0.130, 0.175, -15.0, -18.0, 4.0],
}
# §2.3 carpals: centre u, v, semi-axis a (along u), b (along v), tilt (deg), adult superellipse n
_CARPALS = {
    "capitate": [0.000, 0.132, 0.040, 0.057, 0.0, 3.0],
    "hamate": [-0.070, 0.140, 0.036, 0.050, -10.0, 2.6],
    "triquetrum": [-0.095, 0.065, 0.032, 0.028, 20.0, 2.5],
    "pisiform": [-0.110, 0.055, 0.020, 0.022, 0.0, 2.0],
    "lunate": [-0.020, 0.045, 0.034, 0.032, 0.0, 2.2],
    "scaphoid": [0.060, 0.055, 0.026, 0.050, 45.0, 2.0],
    "trapezium": [0.115, 0.135, 0.032, 0.032, 30.0, 3.0],
    "trapezoid": [0.060, 0.150, 0.025, 0.030, 0.0, 3.5],
}
# §3.2 onset / adult ages (years): appears F, appears M, adult F, adult M
_CARPAL_AGES = {
    "capitate": [0.17, 0.30, 13.0, 15.0], "hamate": [0.25, 0.35, 13.0, 15.0],
    "triquetrum": [1.75, 2.5, 13.0, 15.0], "lunate": [2.75, 4.0, 13.0, 15.0],
    "trapezium": [4.0, 5.5, 13.0, 15.0], "trapezoid": [4.3, 5.8, 13.0, 15.0],
    "scaphoid": [4.6, 6.0, 13.0, 15.0], "pisiform": [9.25, 11.5, 14.0, 16.0],
    "sesamoid": [11.0, 13.0, 14.0, 16.0],
}
# §3.3 tubular epiphyses (years): a F, a M, b F, b M, c F, c M (-1: no capping), d1 F, d1 M, d2 F, d2 M
_EPIPHYSIS_AGES = {
    "PP": [1.0, 1.35, 7.0, 8.5, 11.0, 13.0, 13.75, 15.25, 14.5, 16.0],
    "MC": [1.25, 1.75, 8.0, 9.5, -1, -1, 14.0, 15.5, 14.75, 16.25],
    "MP": [1.4, 2.0, 7.5, 9.0, 11.0, 13.0, 14.25, 15.75, 15.0, 16.5],
    "MP5": [2.0, 2.8, 8.0, 9.5, 11.3, 13.3, 14.25, 15.75, 15.0, 16.5],
    "DP": [1.6, 2.3, 6.5, 8.0, 10.5, 12.5, 13.0, 14.5, 13.75, 15.25],
    "ulna": [5.5, 6.5, 10.5, 12.0, -1, -1, 15.0, 16.75, 16.25, 18.0],
    "radius": [0.9, 1.1, 9.0, 10.5, 12.0, 14.0, 15.5, 17.0, 16.75, 18.5],
}
# §2.4 hand length (mm) by age (years)
_HAND_LENGTH = {
    "age": [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18],
    "F": [64, 85, 95, 110, 123, 135, 147, 160, 168, 170, 171],
    "M": [65, 86, 96, 111, 124, 136, 147, 158, 173, 185, 189],
}
# §4 RSNA histogram by completed year (% of that sex), years 0..19
_LABEL_HIST = {
    "F": [0.12, 0.54, 1.61, 2.16, 2.06, 5.94, 7.81, 10.44, 10.25, 1.28, 13.29, 13.90, 10.96, 10.90, 3.12,
          3.76, 1.11, 0.50, 0.28, 0.00],
    "M": [0.09, 0.69, 1.20, 1.55, 2.71, 2.75, 4.21, 4.01, 4.45, 5.41, 6.47, 12.62, 11.22, 19.27, 12.03,
          5.33, 2.12, 2.74, 0.85, 0.28],
}
_GP_VALUES = {
    "F": [24, 30, 36, 42, 50, 60, 69, 72, 76, 82, 84, 88, 94, 96, 100, 106, 113, 120, 126, 132, 138, 144, 150,
          156, 159, 162, 168, 180, 192, 204],
    "M": [24, 42, 48, 54, 60, 72, 78, 84, 90, 96, 102, 108, 114, 120, 126, 132, 138, 144, 150, 153, 156, 162,
          165, 168, 174, 180, 186, 192, 204, 216],
}

CARPAL_NAMES = ["capitate", "hamate", "triquetrum", "lunate", "trapezium", "trapezoid", "scaphoid", "pisiform"]
KEYPOINT_NAMES = ["middle_tip", "thumb_tip", "capitate"]


def _copy(d):
    return lambda: {k: list(v) for k, v in d.items()}


@dataclass
class PhantomConfig:
    """Every parameter of the phantom generator (spec defaults; the tables are editable too)."""

    # --- output
    long_side_px: int = 1024
    aspect_hw: float = 1.25  # H:W of the default portrait image
    size_mode: str = "fixed"  # fixed | rsna (random aspect and long side, §5 #15)
    # --- labels (§4)
    label_dist: str = "rsna"  # rsna | uniform | fixed
    label_quantize: str = ""  # "" or "gp": snap to the Greulich-Pyle values of that sex (ints)
    p_male: float = 0.5418
    # months within the year bin ~ 12 * U^power: 1 = uniform (spec); 3 puts mass near whole years, where the
    # Greulich-Pyle standards cluster, which brings mean/SD to the RSNA values (127.4 / 42.2 vs 127.3 / 41.2)
    month_in_year_power: float = 3.0
    fixed_ages_months: list[float] = field(default_factory=list)  # label_dist=fixed: cycled by index
    fixed_sexes: list[str] = field(default_factory=list)
    # --- maturity jitter (§3.4), years
    maturity_noise_scale: float = 1.0
    sd_global_y: float = 0.45
    sd_group_y: float = 0.40
    sd_bone_y: float = 0.60
    # --- pose jitter (§2.2, kept when artefacts are off)
    spread_range: list[float] = field(default_factory=lambda: [0.8, 1.3])
    wrist_deviation_sd_deg: float = 4.0
    flexion_max_deg: float = 20.0
    forearm_range: list[float] = field(default_factory=lambda: [0.15, 0.45])  # stub length F (L)
    hand_length_log_sd: float = 0.06
    # --- master switch: False = clean, upright, unmirrored, centred, no intensity artefacts
    artefacts: bool = True
    # geometric (§5 #1-5)
    rotation_sd_deg: float = 8.0
    rotation_clip_deg: float = 20.0
    p_rotate_90: float = 0.04
    p_rotate_180: float = 0.01
    p_mirror: float = 0.07
    scale_mean: float = 0.62  # L_px / H
    scale_sd: float = 0.12
    scale_range: list[float] = field(default_factory=lambda: [0.40, 0.90])
    shift_sd: float = 0.05
    p_partial: float = 0.02
    partial_cut_range: list[float] = field(default_factory=lambda: [0.02, 0.12])
    p_forearm_to_edge: float = 0.85  # forearm long enough to be cut by the image edge (else a stub of F)
    # intensity (§5 #6-14)
    p_collimation: float = 0.6
    collimation_width_range: list[float] = field(default_factory=lambda: [0.02, 0.15])
    p_letters: float = 0.7
    p_marker: float = 0.6
    p_wrong_marker: float = 0.05
    p_free_text: float = 0.3
    p_ruler: float = 0.10
    p_invert: float = 0.03
    gamma_range: list[float] = field(default_factory=lambda: [0.6, 1.6])  # log-uniform
    gain_range: list[float] = field(default_factory=lambda: [0.7, 1.3])
    offset_range: list[float] = field(default_factory=lambda: [-0.1, 0.1])
    background_range: list[float] = field(default_factory=lambda: [0.0, 0.25])
    clean_background: float = 0.08  # background level with artefacts off
    ramp_max: float = 0.15
    p_vignette: float = 0.3
    vignette_max: float = 0.15
    noise_sigma_range: list[float] = field(default_factory=lambda: [0.005, 0.03])
    p_poisson: float = 0.5
    poisson_n0_range: list[float] = field(default_factory=lambda: [300.0, 5000.0])  # log-uniform
    p_blur: float = 0.3
    blur_sigma_range: list[float] = field(default_factory=lambda: [0.3, 1.2])  # px at 1024
    jpeg: bool = False
    p_jpeg: float = 0.2
    jpeg_quality_range: list[int] = field(default_factory=lambda: [40, 95])
    # --- rendering (§6)
    soft_density: float = 0.20  # spec 0.30; lowered (with display_k 2.0) to match RSNA soft tissue (~0.35)
    medullary_density: float = 0.25
    cortical_density: float = 0.60  # spec 0.45; raised so cortex reads ~0.8 after display mapping
    epiphysis_core_density: float = 0.27
    epiphysis_rim_density: float = 0.40
    carpal_core_density: float = 0.22  # carpals read like the metacarpal shafts in RSNA images
    carpal_rim_density: float = 0.38
    carpal_scale: float = 1.12  # adult carpal size x this (table 2.3 leaves gaps wider than real carpi)
    scatter: float = 0.15
    texture_amp: float = 0.08
    young_bone_density: float = 0.65  # bone densities x this at birth, linear to 1.0 at 8 y (thin infant bones)
    display_k: float = 2.0  # spec 1.6
    # --- anatomy tables (§2-3)
    bone_sizes: dict[str, list[float]] = field(default_factory=_copy(_BONE_SIZES))
    rays: dict[str, list[float]] = field(default_factory=_copy(_RAYS))
    carpals: dict[str, list[float]] = field(default_factory=_copy(_CARPALS))
    carpal_ages: dict[str, list[float]] = field(default_factory=_copy(_CARPAL_AGES))
    epiphysis_ages: dict[str, list[float]] = field(default_factory=_copy(_EPIPHYSIS_AGES))
    hand_length_mm: dict[str, list[float]] = field(default_factory=_copy(_HAND_LENGTH))
    label_hist_pct: dict[str, list[float]] = field(default_factory=_copy(_LABEL_HIST))
    gp_values: dict[str, list[float]] = field(default_factory=_copy(_GP_VALUES))


@dataclass
class PhantomSample:
    image: np.ndarray  # uint8 (H, W)
    mask: np.ndarray  # uint8 {0,255} (H, W)
    keypoints: np.ndarray  # float32 (3, 3): rows middle_tip, thumb_tip, capitate; cols x, y, visible
    bone_age_months: float
    sex: str  # "F" | "M"
    params: dict  # JSON-able: every drawn parameter


# ----------------------------------------------------------------------------------------------
# Labels (§4)
# ----------------------------------------------------------------------------------------------


def _draw_label(cfg: PhantomConfig, rng: np.random.Generator, index: int) -> tuple[float, str]:
    mode = cfg.label_dist
    if mode == "fixed":
        if not cfg.fixed_ages_months or not cfg.fixed_sexes:
            raise ValueError("label_dist=fixed needs phantom.fixed_ages_months and phantom.fixed_sexes")
        ba = float(cfg.fixed_ages_months[index % len(cfg.fixed_ages_months)])
        sex = str(cfg.fixed_sexes[index % len(cfg.fixed_sexes)]).upper()[:1]
        return ba, sex
    if mode == "uniform":
        sex = "M" if rng.random() < 0.5 else "F"
        ba = float(rng.uniform(0.0, 228.0 if sex == "M" else 216.0))
    elif mode == "rsna":
        sex = "M" if rng.random() < cfg.p_male else "F"
        p = np.asarray(cfg.label_hist_pct[sex], dtype=float)
        year = int(rng.choice(len(p), p=p / p.sum()))
        ba = float(np.clip(12.0 * year + 12.0 * rng.random() ** cfg.month_in_year_power, 1.0, 228.0))
    else:
        raise ValueError(f"unknown phantom.label_dist '{mode}' (rsna, uniform, fixed)")
    if cfg.label_quantize == "gp":
        vals = np.asarray(cfg.gp_values[sex], dtype=float)
        # below the first standard (24 mo) the atlas has no values: keep whole months there
        ba = float(round(ba)) if ba < vals[0] - 6 else float(vals[np.argmin(np.abs(vals - ba))])
    else:
        ba = round(ba, 2)
    return ba, sex


def sample_labels(n: int, cfg: PhantomConfig, seed: int) -> list[tuple[float, str]]:
    """Labels of indices 0..n-1: exactly the labels `make_phantom(cfg, seed, index)` renders."""
    return [_draw_label(cfg, np.random.default_rng([seed, i, 7]), i) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Small geometry helpers
# ----------------------------------------------------------------------------------------------


def _interp(x: float, xs, ys) -> float:
    return float(np.interp(x, xs, ys))


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3 - 2 * x)


def _dir(angle_deg: float) -> np.ndarray:
    """Unit axis at `angle_deg` from +v towards +u."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a), math.cos(a)])


def _rot_uv(p: np.ndarray, deg: float) -> np.ndarray:
    """Rotate (u, v) points about the origin by `deg` (positive: towards +u, i.e. radial deviation)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    p = np.asarray(p, dtype=float)
    return np.stack([c * p[..., 0] + s * p[..., 1], -s * p[..., 0] + c * p[..., 1]], axis=-1)


def _circle(c, r, n=8) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], axis=1)


# ----------------------------------------------------------------------------------------------
# Anatomy: maturity and layout in the hand frame
# ----------------------------------------------------------------------------------------------

_RAY_ORDER = {"3": 0.0, "2": 1 / 3, "4": 2 / 3, "5": 1.0}


def _tubular_specs() -> list[tuple[str, str, str, str]]:
    """(bone, noise group, milestone row, ray) for every tubular bone of the hand."""
    out = []
    for r in "12345":
        out.append((f"MC{r}", "MC", "MC", r))
        out.append((f"PP{r}", "PP", "PP", r))
        if r != "1":
            out.append((f"MP{r}", "MP", "MP5" if r == "5" else "MP", r))
        out.append((f"DP{r}", "DP", "DP", r))
    return out


def _milestones(cfg: PhantomConfig, row: str, ray: str | None, sex: str) -> list[float]:
    """[a, b, c, d1, d2] in years for one epiphysis (c = -1: no capping), ray offsets applied."""
    t = cfg.epiphysis_ages[row]
    j = 1 if sex == "M" else 0
    a, b, c, d1, d2 = t[j], t[2 + j], t[4 + j], t[6 + j], t[8 + j]
    if ray is not None:
        if ray == "1":
            oa = ol = 0.15
        else:
            oa, ol = 0.1 * _RAY_ORDER[ray], 0.2 * _RAY_ORDER[ray]
        a, b, d1, d2 = a + oa, b + ol, d1 + ol, d2 + ol
        c = c + ol if c >= 0 else c
    return [a, b, c, d1, d2]


def _maturity(cfg: PhantomConfig, ba_months: float, sex: str, rng: np.random.Generator) -> dict:
    """Per-bone maturity ages m_b (years) and the offsets drawn (§3.4)."""
    ba_y = ba_months / 12.0
    k = min(1.0, 0.2 + ba_y / 5.0)
    sc = cfg.maturity_noise_scale
    g = float(rng.normal(0, cfg.sd_global_y * sc)) if sc > 0 else 0.0
    groups = ["carpals", "forearm", "MC", "PP", "MP", "DP"]
    e_grp = {gname: (float(rng.normal(0, cfg.sd_group_y * sc)) if sc > 0 else 0.0) for gname in groups}
    names = [(n, "carpals") for n in CARPAL_NAMES + ["sesamoid"]]
    names += [("radius", "forearm"), ("ulna", "forearm")]
    names += [(b, grp) for b, grp, _, _ in _tubular_specs()]
    e_b, m = {}, {}
    for name, grp in names:
        e = float(rng.normal(0, cfg.sd_bone_y * sc)) if sc > 0 else 0.0
        e_b[name] = e
        m[name] = max(0.0, ba_y + k * (g + e_grp[grp] + e))
    return {"k": k, "g": g, "e_group": e_grp, "e_bone": e_b, "m": m,
            "appearance_age_months": 12.0 * (ba_y + k * g)}


def _ossification(cfg: PhantomConfig, m: dict, sex: str) -> dict[str, bool]:
    """Which centres are ossified (visible) given the per-bone maturity ages m (years)."""
    j = 1 if sex == "M" else 0
    out = {}
    for name in CARPAL_NAMES + ["sesamoid"]:
        out[name] = m[name] >= cfg.carpal_ages[name][j]
    for b, _, row, ray in _tubular_specs():
        out[f"{b}_epiphysis"] = m[b] >= _milestones(cfg, row, ray, sex)[0]
    for b in ("radius", "ulna"):
        out[f"{b}_epiphysis"] = m[b] >= _milestones(cfg, b, None, sex)[0]
    return out


def _epiphysis_state(m: float, ms: list[float], L_unit: float = 1.0) -> dict | None:
    """Width ratio, height ratio, plate gap (L), closure fraction, horn fraction, scar (§3.5)."""
    a, b, c, d1, d2 = ms
    if m < a:
        return None
    has_cap = c >= 0
    cc = c if has_cap else 0.5 * (b + d1)
    wr = _interp(m, [a, b, cc, d2], [0.15, 1.0, 1.08, 1.10])
    hr = _interp(m, [a, b, cc], [1.0, 0.45, 0.40])
    gap = _interp(m, [a, b, cc, d1], [0.020, 0.008, 0.005, 0.005])
    closure = min(1.0, max(0.0, (m - d1) / max(1e-6, d2 - d1)))
    horn = min(1.0, max(0.0, (m - c) / max(1e-6, d1 - c))) if has_cap else 0.0
    flat = min(1.0, max(0.0, (m - b) / max(1e-6, cc - b)))
    scar = max(0.0, 1.0 - (m - d2)) if m >= d2 else 0.0
    return {"wr": wr, "hr": hr, "gap": gap, "closure": closure, "horn": horn, "flat": flat,
            "scar": scar, "fused": m >= d2}


def _profile(name: str, length: float, ws: float, we: float, tuft: float) -> list[tuple[float, float]]:
    """Adult outline widths (t from proximal 0 to distal 1, width in L)."""
    kind = name[:2]
    if kind == "MC":
        if name == "MC1":
            return [(0, 0.95 * we), (0.12, 0.85 * we), (0.3, ws), (0.7, ws), (0.9, we), (1, 0.8 * we)]
        return [(0, 0.85 * we), (0.1, 0.8 * we), (0.25, ws), (0.7, ws), (0.88, 0.95 * we), (0.96, we),
                (1, 0.75 * we)]
    if kind in ("PP", "MP"):
        return [(0, we), (0.1, 0.9 * we), (0.3, ws), (0.7, ws), (0.9, 0.85 * we), (1, 0.7 * we)]
    if kind == "DP":
        return [(0, we), (0.12, 0.85 * we), (0.35, ws), (0.65, 0.9 * ws), (0.85, 0.8 * tuft), (0.95, tuft),
                (1, 0.6 * tuft)]
    # radius / ulna: distal flare over the last 0.13 L
    f1 = max(0.0, 1 - 0.18 / length)
    f2 = max(0.0, 1 - 0.09 / length)
    f3 = max(0.0, 1 - 0.04 / length)
    return [(0, ws), (f1, ws), (f2, ws + 0.3 * (we - ws)), (f3, ws + 0.75 * (we - ws)), (1 - 0.01 / length, we),
            (1, we)]


def _layout(cfg: PhantomConfig, ba_months: float, sex: str, rng: np.random.Generator, mat: dict) -> dict:
    """All bones and envelope pieces as polygons in the hand frame (u, v), plus keypoints."""
    age_y = ba_months / 12.0
    wf = 1.0 + 0.15 * max(0.0, 1.0 - age_y / 5.0)  # infant hands are broader
    cortex_f = 0.6 + 0.4 * min(1.0, age_y / 10.0)
    spread = float(rng.uniform(*cfg.spread_range))
    dev = float(rng.normal(0, cfg.wrist_deviation_sd_deg))
    F = float(rng.uniform(*cfg.forearm_range))
    pose = {"finger_spread": spread, "wrist_deviation_deg": dev, "forearm_len_L": F, "ray_jitter_deg": {},
            "flexion_deg": {}}
    m = mat["m"]
    bones = []  # tubular records
    centres: dict[str, np.ndarray] = {}
    ossified = _ossification(cfg, mat["m"], sex)

    # --- rays
    tips = {}
    mcp = {}
    sizes = cfg.bone_sizes
    for r in "12345":
        bu, bv, mc_ang, ph_ang, jit = cfg.rays[r]
        jj = float(rng.normal(0, jit))
        pose["ray_jitter_deg"][r] = jj
        mc_a = mc_ang + 0.3 * jj
        ph_a = ph_ang * spread + jj
        p = np.array([bu, bv])
        chain = [f"MC{r}", f"PP{r}"] + ([f"MP{r}"] if r != "1" else []) + [f"DP{r}"]
        for i, name in enumerate(chain):
            sz = sizes[name]
            length = sz[0]
            ang = mc_a if i == 0 else ph_a
            if i > 0:
                flex = float(rng.uniform(0, cfg.flexion_max_deg))
                pose["flexion_deg"][name] = flex
                length *= math.cos(math.radians(flex))
                gapj = 0.008 if name.startswith("DP") else 0.010
                p = p + _dir(ang) * gapj
            d = _dir(ang)
            p1 = p + d * length
            bones.append({"name": name, "ray": r, "p0": p.copy(), "p1": p1.copy(), "len": length,
                          "ws": sz[1] * wf, "we": sz[2] * wf, "tuft": (sz[3] if len(sz) > 3 else sz[2]) * wf})
            if i == 0:
                mcp[r] = p1.copy()
            p = p1
        tips[r] = p.copy()

    # --- forearm (vertical axes; the radius is sheared afterwards for its 22-degree tilt)
    fbot = -2.05  # bones and envelope run far down; the canvas's bottom edge makes the cut (render_phantom)
    rad = {"name": "radius", "ray": None, "p0": np.array([0.040, fbot]), "p1": np.array([0.040, 0.005]),
           "ws": 0.08 * wf, "we": 0.16 * wf, "tuft": 0.16 * wf}
    rad["len"] = float(rad["p1"][1] - rad["p0"][1])
    uln = {"name": "ulna", "ray": None, "p0": np.array([-0.088, fbot]), "p1": np.array([-0.088, -0.045]),
           "ws": 0.055 * wf, "we": 0.072 * wf, "tuft": 0.072 * wf}
    uln["len"] = float(uln["p1"][1] - uln["p0"][1])

    # --- epiphysis and shaft polygons of every tubular bone
    polys = {"tub": [], "carp": [], "extra": []}  # (outer, inner, outer value, inner value)
    spec_by_name = {b: (grp, row, ray) for b, grp, row, ray in _tubular_specs()}
    d_core, d_rim = cfg.epiphysis_core_density, cfg.epiphysis_rim_density
    d_med, d_cort = cfg.medullary_density, cfg.cortical_density
    for bone in bones + [rad, uln]:
        name = bone["name"]
        if name in spec_by_name:
            _, row, ray = spec_by_name[name]
            ep_end = "dist" if (name.startswith("MC") and name != "MC1") else "prox"
        else:
            row, ray, ep_end = name, None, "dist"
        ms = _milestones(cfg, row, ray, sex)
        st = _epiphysis_state(m[name], ms)
        outer, inner, ep_polys, ep_centre = _tubular_polys(bone, ep_end, st, cortex_f, name)
        layer = "carp" if name == "ulna" else "tub"
        polys[layer].append((outer, inner, d_cort, d_med))
        for ep_o, ep_i, v_o, v_i in ep_polys:
            polys[layer].append((ep_o, ep_i, d_rim * v_o, d_core * v_i))
        centres[name] = 0.5 * (bone["p0"] + bone["p1"]) if name not in ("radius", "ulna") else \
            np.array([bone["p1"][0], bone["p1"][1] - 0.06])
        centres[f"{name}_epiphysis"] = ep_centre

    # radius tilt: shear v by tan(22 deg) about its axis (radial side distal) + styloid
    sh = math.tan(math.radians(22.0))
    for key in ("tub",):
        new = []
        for item in polys[key]:
            o, i, vo, vi = item
            if isinstance(o, _Tagged) and o.tag == "radius":
                o = _shear(o, sh, 0.040)
                i = _shear(i, sh, 0.040) if i is not None else None
            new.append((o, i, vo, vi))
        polys[key] = new
    centres["radius_epiphysis"] = _shear(centres["radius_epiphysis"][None], sh, 0.040)[0]
    centres["radius"] = _shear(centres["radius"][None], sh, 0.040)[0]

    # --- carpals, pisiform, sesamoid
    for cname in CARPAL_NAMES:
        cu, cv, ca, cb, tilt, n_ad = cfg.carpals[cname]
        j = 1 if sex == "M" else 0
        ta, tad = cfg.carpal_ages[cname][j], cfg.carpal_ages[cname][2 + j]
        c = np.array([cu, cv])
        centres[cname] = c
        mb = m[cname]
        if mb < ta:
            continue
        x = min(1.0, max(0.0, (mb - ta) / max(1e-6, tad - ta)))
        fgrow = _smoothstep(x)  # shape (angularity) follows the spec's smoothstep
        size = 0.15 + 0.85 * (1.0 - (1.0 - x) ** 2)  # size grows fast early (ease-out; spec: smoothstep)
        n = 2.0 + (n_ad - 2.0) * fgrow
        size *= cfg.carpal_scale
        outer = _carpal_poly(cname, c, ca * size * wf, cb * size * wf, tilt, n, fgrow)
        rim = 0.08 * min(ca, cb) * size * wf
        inner = _carpal_poly(cname, c, ca * size * wf - rim, cb * size * wf - rim, tilt, n, fgrow)
        layer = "extra" if cname == "pisiform" else "carp"
        op = 0.6 if cname == "pisiform" else 1.0
        polys[layer].append((outer, inner, cfg.carpal_rim_density * op, cfg.carpal_core_density * op))
        if cname == "hamate" and mb >= (10.0 if sex == "F" else 12.0):
            hook = _circle(c + np.array([0.012, 0.008]), 0.012 * wf, 10)
            polys["extra"].append((hook, _circle(c + np.array([0.012, 0.008]), 0.008 * wf, 10), 0.15, 0.05))
    # thumb sesamoid: ulnar side of the MC1 head, 0.02 L proximal to the MCP joint
    mc1 = next(b for b in bones if b["name"] == "MC1")
    ax = (mc1["p1"] - mc1["p0"]) / mc1["len"]
    perp_uln = np.array([-ax[1], ax[0]])  # rotate axis +90 deg: towards -u (ulnar) for a thumb axis
    ses_c = mc1["p1"] - ax * 0.02 + perp_uln * 0.022 * wf
    centres["sesamoid"] = ses_c
    j = 1 if sex == "M" else 0
    ta, tad = cfg.carpal_ages["sesamoid"][j], cfg.carpal_ages["sesamoid"][2 + j]
    if ossified["sesamoid"]:
        s = 0.3 + 0.7 * _smoothstep((m["sesamoid"] - ta) / max(1e-6, tad - ta))
        outer = _carpal_poly("sesamoid", ses_c, 0.012 * s * wf, 0.010 * s * wf, 40.0, 2.0, 0.0)
        polys["extra"].append((outer, None, d_rim, d_rim))

    # --- soft-tissue envelope pieces (convex polygons)
    env = []
    for r in "2345":
        rb = [b for b in bones if b["ray"] == r]
        ax = (rb[-1]["p1"] - rb[1]["p0"])
        ax = ax / np.linalg.norm(ax)
        tip_c = rb[-1]["p1"] + ax * (0.02 - 0.033 * wf)
        env.append(np.vstack([_circle(mcp[r], 0.043 * wf, 10), _circle(tip_c, 0.033 * wf, 10)]))
    rb = [b for b in bones if b["ray"] == "1"]
    ax = (rb[-1]["p1"] - rb[1]["p0"]) / np.linalg.norm(rb[-1]["p1"] - rb[1]["p0"])
    env.append(np.vstack([_circle(mcp["1"], 0.050 * wf, 10),
                          _circle(rb[-1]["p1"] + ax * (0.02 - 0.040 * wf), 0.040 * wf, 10)]))
    mc = {b["ray"]: b for b in bones if b["name"].startswith("MC")}
    palm = [mc["2"]["p1"] + np.array([0.030, 0.025]) * wf, mc["3"]["p1"] + np.array([0, 0.035]),
            mc["4"]["p1"] + np.array([0, 0.03]), mc["5"]["p1"] + np.array([-0.035, 0.02]) * wf,
            mc["5"]["p0"] + np.array([-0.050, 0.0]) * wf, np.array([-0.165 * wf, 0.10]),
            np.array([0.175 * wf, 0.10]), mc["2"]["p0"] + np.array([0.05, 0.0]) * wf]
    env.append(np.array(palm))
    env.append(np.vstack([_circle(mc["1"]["p0"], 0.060 * wf, 10), _circle(mc["1"]["p1"], 0.052 * wf, 10),
                          _circle(mc["2"]["p0"] + np.array([0.02, 0.05]), 0.05 * wf, 10)]))  # thenar
    env.append(np.vstack([_circle(mc["5"]["p0"] + np.array([-0.01, 0]), 0.055 * wf, 10),
                          _circle(mc["5"]["p1"] + np.array([-0.005, -0.02]), 0.045 * wf, 10)]))  # hypothenar
    env.append(np.array([[-0.158 * wf, 0.12], [0.165 * wf, 0.12], [0.148 * wf, 0.0], [0.132 * wf, -0.12],
                         [0.137 * wf, fbot], [-0.137 * wf, fbot], [-0.132 * wf, -0.12],
                         [-0.142 * wf, 0.0]]))  # wrist + forearm (narrower than the palm, as in RSNA images)

    # wrist deviation: rotate the hand (everything distal to the radiocarpal joint) about the origin
    def dv(p):
        return _rot_uv(p, dev)

    for key in ("tub", "carp", "extra"):
        polys[key] = [(dv(o) if not _is_forearm(o) else o, (dv(i) if i is not None and not _is_forearm(o) else i),
                       vo, vi) for o, i, vo, vi in polys[key]]
    env = [dv(e) if k < len(env) - 1 else e for k, e in enumerate(env)]
    for nme in list(centres):
        if nme not in ("radius", "ulna", "radius_epiphysis", "ulna_epiphysis"):
            centres[nme] = dv(centres[nme])
    keypoints_uv = np.array([dv(tips["3"]), dv(tips["1"]), centres["capitate"]])
    mc_bases = np.array([dv(mc[r]["p0"]) for r in "2345"])
    soft_tip = dv(tips["3"] + _dir(0) * 0.02)
    return {"polys": polys, "env": env, "centres": centres, "ossified": ossified, "pose": pose,
            "keypoints_uv": keypoints_uv, "mc_bases_uv": mc_bases, "soft_tip_uv": soft_tip, "F": F,
            "forearm_bottom_v": fbot, "wf": wf,
            "density_factor": cfg.young_bone_density + (1.0 - cfg.young_bone_density) * min(1.0, age_y / 8.0),
            # radius articular ends (ulnar, radial) and the ulnar edge of the ulna head
            "forearm_ends_uv": np.array([[0.040 - 0.080 * wf, 0.005 - sh * 0.080 * wf],
                                         [0.040 + 0.080 * wf, 0.005 + sh * 0.080 * wf],
                                         [-0.088 - 0.036 * wf, -0.045]])}


class _Tagged(np.ndarray):
    """A polygon array carrying a tag (which bone it belongs to)."""

    tag = ""


def _tag(a: np.ndarray, tag: str) -> np.ndarray:
    t = np.asarray(a, dtype=float).view(_Tagged)
    t.tag = tag
    return t


def _is_forearm(o) -> bool:
    return isinstance(o, _Tagged) and o.tag in ("radius", "ulna")


def _shear(p: np.ndarray, sh: float, uc: float) -> np.ndarray:
    tag = getattr(p, "tag", "")
    q = np.array(p, dtype=float)
    q[:, 1] = q[:, 1] + sh * (q[:, 0] - uc)
    return _tag(q, tag) if tag else q


def _tubular_polys(bone: dict, ep_end: str, st: dict | None, cortex_f: float, name: str):
    """Shaft outer/inner polygon, epiphysis polygons (outer, inner, rim factor, core factor), epiphysis centre."""
    p0, p1, length = bone["p0"], bone["p1"], bone["len"]
    ax = (p1 - p0) / length
    nrm = np.array([ax[1], -ax[0]])  # perpendicular (towards +u for an upright bone)
    prof = _profile(name, length, bone["ws"], bone["we"], bone["tuft"])
    ts = np.array([t for t, _ in prof])
    wsv = np.array([w for _, w in prof])
    # metaphysis face: distance z_m from the epiphyseal end
    w_meta_end = wsv[0] if ep_end == "prox" else wsv[-1]
    hfac = 0.65 if name == "radius" else 1.0
    z_m = 0.44 * w_meta_end * hfac + 0.002
    if ep_end == "prox":
        t_lo, t_hi = z_m / length, 1.0
    else:
        t_lo, t_hi = 0.0, 1.0 - z_m / length
    sel = (ts > t_lo) & (ts < t_hi)
    tt = np.concatenate([[t_lo], ts[sel], [t_hi]])
    ww = np.interp(tt, ts, wsv)
    w_meta = float(ww[0] if ep_end == "prox" else ww[-1])
    cort = 0.18 * bone["ws"] * cortex_f
    pts = p0[None] + (tt * length)[:, None] * ax[None]
    # the distal radius flares mostly radially: shift its outline's centre line towards +u with the flare
    asym = 0.35 if name == "radius" else 0.0
    if asym:
        pts = pts + nrm[None] * (asym * (ww - bone["ws"]) / 2)[:, None]
    left = pts + nrm[None] * (ww / 2)[:, None]
    right = pts - nrm[None] * (ww / 2)[:, None]
    cap = []
    if ep_end == "prox" and name != "radius":  # rounded distal end (head/tuft)
        cap = [p1 + ax * 0.004]
    outer = np.vstack([left, cap, right[::-1]]) if cap else np.vstack([left, right[::-1]])
    wi = np.maximum(ww - 2 * cort, 0.35 * ww)
    dz = 0.35 * cort / length  # cortex thin at the bone ends
    tti = np.clip(tt, t_lo + dz, t_hi - dz)
    ptsi = p0[None] + (tti * length)[:, None] * ax[None]
    if asym:
        ptsi = ptsi + nrm[None] * (asym * (np.interp(tti, ts, wsv) - bone["ws"]) / 2)[:, None]
    inner = np.vstack([ptsi + nrm[None] * (wi / 2)[:, None], (ptsi - nrm[None] * (wi / 2)[:, None])[::-1]])
    tag = name if name in ("radius", "ulna") else ""
    if tag:
        outer, inner = _tag(outer, tag), _tag(inner, tag)
    # epiphysis
    into = ax if ep_end == "prox" else -ax  # from the joint into the bone
    joint = p0 if ep_end == "prox" else p1
    if asym:
        joint = joint + nrm * (asym * (w_meta - bone["ws"]) / 2)
    ep_centre = joint + into * (z_m * 0.5)
    eps = []
    if st is None:
        return outer, inner, eps, ep_centre
    w = st["wr"] * w_meta
    h = st["hr"] * w * hfac if st["wr"] < 1.0 else st["hr"] * w_meta * hfac
    h = min(h, z_m - 0.001)
    gap = min(st["gap"], max(0.0, z_m - h)) if not st["fused"] else 0.0
    zf = z_m - gap  # metaphysis-side face of the epiphysis, from the joint
    q = 1.0 - 0.75 * st["flat"]
    horn = 0.25 * h * st["horn"]
    wedge = 0.35 if name == "radius" else 0.0
    ep_o = _epiphysis_poly(joint, into, nrm, w, h, zf, q, horn, wedge, st["flat"])
    rim = 0.08 * min(w, h)
    ep_i = _epiphysis_poly(joint, into, nrm, w - 2 * rim, max(h - 2 * rim, 0.3 * h), zf - rim, q, horn * 0.5,
                           wedge, st["flat"])
    if tag:
        ep_o, ep_i = _tag(ep_o, tag), _tag(ep_i, tag)
    eps.append((ep_o, ep_i, 1.0, 1.0))
    ep_centre = joint + into * (zf - h / 2)
    # growth plate closure: a central bridge of width p * w_meta (or the whole plate when fused)
    if gap > 1e-5 and st["closure"] > 0:
        bw = st["closure"] * w_meta
        c0, c1 = joint + into * (zf - 0.0005), joint + into * (z_m + 0.0005)
        br = np.array([c0 + nrm * bw / 2, c1 + nrm * bw / 2, c1 - nrm * bw / 2, c0 - nrm * bw / 2])
        if tag:
            br = _tag(br, tag)
        eps.append((br, br, 0.9, 0.9))
    if st["fused"]:
        bw = w_meta
        c0, c1 = joint + into * (zf - 0.002), joint + into * (z_m + 0.002)
        br = np.array([c0 + nrm * bw * 0.45, c1 + nrm * bw * 0.45, c1 - nrm * bw * 0.45, c0 - nrm * bw * 0.45])
        if tag:
            br = _tag(br, tag)
        eps.append((br, None, 1.0 - 0.35 * st["scar"], 1.0))
    return outer, inner, eps, ep_centre


def _epiphysis_poly(joint, into, nrm, w, h, zf, q, horn, wedge, flat) -> np.ndarray:
    th = np.linspace(0, np.pi, 9)
    x = (w / 2) * np.cos(th)
    # joint side (z smaller): dome, flattening a little with maturity; wedge: thicker on the +nrm side
    zj = zf - h / 2 - (h / 2) * np.abs(np.sin(th)) ** (1.0 - 0.4 * flat)
    if wedge:
        zj = zf - (zf - zj) * (1 + wedge * x / max(w / 2, 1e-9))
    th2 = np.linspace(np.pi, 2 * np.pi, 9)[1:-1]
    x2 = (w / 2) * np.cos(th2)
    zm = zf - h / 2 + (h / 2) * np.abs(np.sin(th2)) ** q + horn * np.abs(np.cos(th2)) ** 6
    xs = np.concatenate([x, x2])
    zs = np.concatenate([zj, zm])
    return joint[None] + zs[:, None] * into[None] + xs[:, None] * nrm[None]


def _carpal_poly(name, c, a, b, tilt_deg, n, fgrow) -> np.ndarray:
    th = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    ct, st_ = np.cos(th), np.sin(th)
    x = a * np.sign(ct) * np.abs(ct) ** (2.0 / n)
    y = b * np.sign(st_) * np.abs(st_) ** (2.0 / n)
    if name == "scaphoid":  # waist in the middle of the long axis
        x = x * (1 - 0.15 * fgrow * (1 - (y / b) ** 2))
    elif name == "hamate":  # triangular taper distally
        x = x * (1 - 0.3 * fgrow * (y / b))
    elif name == "lunate":  # distal notch
        y = np.where(y > 0, y - 0.35 * b * fgrow * np.exp(-((x / (0.45 * a)) ** 2)), y)
    elif name == "capitate":  # rounded head proximally
        x = np.where(y < 0, x * (1 - 0.15 * fgrow * (-y / b) ** 2), x)
    ang = math.radians(tilt_deg)
    ca, sa = math.cos(ang), math.sin(ang)
    pts = np.stack([c[0] + ca * x + sa * y, c[1] - sa * x + ca * y], axis=1)
    return pts


# ----------------------------------------------------------------------------------------------
# Texture bank (§6.6)
# ----------------------------------------------------------------------------------------------

_TEXTURES: list[np.ndarray] = []


def _texture_bank() -> list[np.ndarray]:
    if not _TEXTURES:
        rng = np.random.default_rng(12345)
        for _ in range(16):
            w = rng.standard_normal((256, 256)).astype(np.float32)
            t = cv2.GaussianBlur(w, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT) \
                - cv2.GaussianBlur(w, (0, 0), 3.0, borderType=cv2.BORDER_REFLECT)
            t = (t - t.mean()) / (t.std() + 1e-6)
            _TEXTURES.append(t.astype(np.float32))
    return _TEXTURES


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _to_px(p: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    return np.stack([cx + s * p[..., 0], cy - s * p[..., 1]], axis=-1)


_SHIFT = 4


def _fill(img: np.ndarray, pts_px: np.ndarray, value: float) -> None:
    q = np.round(np.asarray(pts_px) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(img, [q], float(value), lineType=cv2.LINE_8, shift=_SHIFT)


def _canvas_frame(lay: dict, s: float) -> tuple[float, float, int, float]:
    """Canonical canvas: x = cx + s u, y = cy - s v; width and top from the hand (the forearm is cut later)."""
    pts = np.vstack([np.asarray(e) for e in lay["env"]])
    pts = pts[pts[:, 1] > -0.5]
    pad = 0.03
    umin, umax = pts[:, 0].min() - pad, pts[:, 0].max() + pad
    vmax = pts[:, 1].max() + pad
    return -umin * s, vmax * s, int(math.ceil((umax - umin) * s)) + 1, vmax


def _render_canonical(cfg: PhantomConfig, lay: dict, s: float, rng: np.random.Generator, F_eff: float) -> dict:
    """Density canvas (float32), envelope mask (uint8 0/255) and bone-only layer of the upright hand."""
    cx, cy, Wc, vmax = _canvas_frame(lay, s)
    Hc = int(math.ceil((vmax + F_eff) * s)) + 1  # the forearm cut (v = -F_eff) is the canvas's bottom edge
    # envelope at half resolution: fill, blur (sigma 0.01 L), threshold
    h2, w2 = (Hc + 1) // 2, (Wc + 1) // 2
    envs = np.zeros((h2, w2), np.float32)
    for e in lay["env"]:
        q = _to_px(e, cx, cy, s) * 0.5
        hull = cv2.convexHull(np.round(q * (1 << _SHIFT)).astype(np.int32))
        cv2.fillConvexPoly(envs, hull, 1.0, lineType=cv2.LINE_8, shift=_SHIFT)
    sig = max(0.5, 0.01 * s * 0.5)
    envs = cv2.GaussianBlur(envs, (0, 0), sig)
    env = cv2.resize(envs, (Wc, Hc), interpolation=cv2.INTER_LINEAR)
    mask = np.where(env > 0.5, np.uint8(255), np.uint8(0))
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    soft = cfg.soft_density * (0.7 + 0.3 * np.clip(dist * (1.0 / (0.04 * s)), 0, 1))
    soft *= (mask > 0)
    # bones: three overwrite layers that add up
    layers = {}
    for key in ("tub", "carp", "extra"):
        lay_img = np.zeros((Hc, Wc), np.float32)
        for o, i, vo, vi in lay["polys"][key]:
            _fill(lay_img, _to_px(o, cx, cy, s), vo)
            if i is not None:
                _fill(lay_img, _to_px(i, cx, cy, s), vi)
        layers[key] = lay_img
    bone = layers["tub"] + layers["carp"] + layers["extra"]
    # trabecular texture (multiplies bone density)
    tex = _texture_bank()[int(rng.integers(16))]
    oy, ox = int(rng.integers(256)), int(rng.integers(256))
    reps = (Hc // 256 + 2, Wc // 256 + 2)
    T = np.tile(tex, reps)[oy:oy + Hc, ox:ox + Wc]
    bone_raw = bone
    bone = bone * ((1.0 + cfg.texture_amp * T) * lay["density_factor"])
    bone *= mask > 0  # safety: never outside the envelope (checked unclipped in the tests)
    D = soft + bone
    # scatter (large blur at quarter resolution) and a light blur
    small = cv2.resize(D, (max(1, Wc // 4), max(1, Hc // 4)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), max(0.5, 0.02 * s / 4))
    D += cfg.scatter * cv2.resize(small, (Wc, Hc), interpolation=cv2.INTER_LINEAR)
    D = cv2.GaussianBlur(D, (0, 0), 0.7 * s / (0.62 * 1024))
    return {"D": D, "mask": mask, "bone": bone_raw, "cx": cx, "cy": cy, "W": Wc, "H": Hc}


def _hand_length_mm(cfg: PhantomConfig, ba_months: float, sex: str, rng: np.random.Generator) -> float:
    t = cfg.hand_length_mm
    return _interp(ba_months / 12.0, t["age"], t[sex]) * float(np.exp(rng.normal(0, cfg.hand_length_log_sd)))


def _image_size(cfg: PhantomConfig, rng: np.random.Generator) -> tuple[int, int, dict]:
    if cfg.artefacts and cfg.size_mode == "rsna":
        ar = float(np.clip(rng.normal(1.27, 0.08), 1.0, 1.6))
        long_side = int(round(cfg.long_side_px * rng.uniform(0.8, 2.5)))
        landscape = bool(rng.random() < 0.03)
        H, W = long_side, int(round(long_side / ar))
        if landscape:
            H, W = W, H
        return H, W, {"aspect_hw": H / W, "landscape": landscape}
    H = int(cfg.long_side_px)
    return H, int(round(H / cfg.aspect_hw)), {"aspect_hw": cfg.aspect_hw, "landscape": False}


def render_phantom(bone_age_months: float, sex: str, cfg: PhantomConfig, seed: int, index: int) -> PhantomSample:
    """Render one radiograph of the given bone age (months) and sex ("F"/"M")."""
    sex = str(sex).upper()[:1]
    if sex not in ("F", "M"):
        raise ValueError(f"sex must be 'F' or 'M', got {sex!r}")
    ba = float(np.clip(bone_age_months, 0.0, 240.0))
    rng = np.random.default_rng([seed, index])
    art = cfg.artefacts
    # 1. label-dependent anatomy
    L_mm = _hand_length_mm(cfg, ba, sex, rng)
    mat = _maturity(cfg, ba, sex, rng)
    lay = _layout(cfg, ba, sex, rng, mat)
    H, W, size_p = _image_size(cfg, rng)
    scale_ref = min(H, W * 1.25)
    # 2. geometry draws (§5 #1-5)
    if art:
        r = rng.random()
        if r < cfg.p_rotate_180:
            rot = 180.0 + rng.normal(0, 5)
        elif r < cfg.p_rotate_180 + cfg.p_rotate_90:
            rot = (90.0 if rng.random() < 0.5 else -90.0) + rng.normal(0, 5)
        else:
            rot = float(np.clip(rng.normal(0, cfg.rotation_sd_deg), -cfg.rotation_clip_deg, cfg.rotation_clip_deg))
        mirrored = bool(rng.random() < cfg.p_mirror)
        frac = float(np.clip(rng.normal(cfg.scale_mean, cfg.scale_sd), *cfg.scale_range))
        partial = bool(rng.random() < cfg.p_partial)
    else:
        rot, mirrored, frac, partial = 0.0, False, cfg.scale_mean, False
    rot = float(rot)
    s = frac * scale_ref
    if abs(abs(rot) - 90) < 30:  # sideways hands must fit across the short side too
        s = min(s, 0.75 * min(H, W))
    cx, cy, _, vmax = _canvas_frame(lay, s)
    # affine canonical px -> image px: p' = R M (p - c0) + t, c0 = centre of the hand's box (with its stub)
    a = math.radians(rot)
    R = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    M = np.diag([-1.0, 1.0]) if mirrored else np.eye(2)
    RM = R @ M
    env_pts = np.vstack([np.asarray(e) for e in lay["env"]])
    env_pts = env_pts[env_pts[:, 1] > -lay["F"]]
    c_uv = np.array([0.5 * (env_pts[:, 0].min() + env_pts[:, 0].max()), 0.5 * (vmax - lay["F"])])
    c0 = _to_px(c_uv, cx, cy, s)
    kp_c = _to_px(lay["keypoints_uv"], cx, cy, s)
    margin = 0.02 * min(H, W)

    def place(t):
        return (RM @ (kp_c - c0).T).T + t

    centre = np.array([(W - 1) / 2.0, (H - 1) / 2.0])
    t = centre.copy()
    shift_draw = [0.0, 0.0]
    if art:
        for _ in range(30):
            off = rng.normal(0, cfg.shift_sd, 2) * np.array([W, H])
            kp = place(centre + off)
            if (kp[:, 0] >= margin).all() and (kp[:, 0] <= W - 1 - margin).all() and \
                    (kp[:, 1] >= margin).all() and (kp[:, 1] <= H - 1 - margin).all():
                t = centre + off
                shift_draw = [float(off[0] / W), float(off[1] / H)]
                break
    tip_soft_c = _to_px(lay["soft_tip_uv"][None], cx, cy, s)
    cut = 0.0
    if partial:
        # the fingertips are cut by the image edge the fingers point at (the top edge of an upright hand; a
        # sideways hand shifted up would lose its thumb side instead, with the fingertips still in the image)
        cut = float(rng.uniform(*cfg.partial_cut_range))
        tip = ((RM @ (tip_soft_c - c0).T).T + t)[0]
        d = RM @ np.array([0.0, -1.0])  # the fingers' direction in the image
        k = int(np.argmax(np.abs(d)))
        edge = -cut * s if d[k] < 0 else (W - 1, H - 1)[k] + cut * s
        t = t.copy()
        t[k] += edge - tip[k]
    # forearm stub: F ~ U(0.15, 0.45) L, or (usually) long enough to be cut by the image edge
    F_eff = lay["F"]
    to_edge = (not art) or bool(rng.random() < cfg.p_forearm_to_edge)
    if to_edge:
        o = RM @ (_to_px(np.zeros(2), cx, cy, s) - c0) + t
        d = RM @ np.array([0.0, s])
        t_exit = []
        for k, lim in ((0, W - 1), (1, H - 1)):
            if d[k] > 1e-9:
                t_exit.append((lim - o[k]) / d[k])
            elif d[k] < -1e-9:
                t_exit.append(-o[k] / d[k])
        te = max(0.0, min(t_exit)) if t_exit else 0.0
        F_eff = float(min(2.0, max(F_eff, te + 0.15)))
    canon = _render_canonical(cfg, lay, s, rng, F_eff)
    A = np.hstack([RM, (t - RM @ c0)[:, None]]).astype(np.float64)
    # 3. warp (one per array); density border 0 = background
    D = cv2.warpAffine(canon["D"], A, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(canon["mask"], A, (W, H), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
    kp = cv2.transform(kp_c[None].astype(np.float64), A)[0]
    # 4. display mapping (§6.7)
    bg = float(rng.uniform(*cfg.background_range)) if art else cfg.clean_background
    img = D
    img *= -cfg.display_k
    cv2.exp(img, img)
    img *= -(1.0 - bg)
    img += 1.0  # = bg + (1 - bg) * (1 - exp(-k D))
    params_art: dict = {}
    field_ok = np.ones((H, W), bool)
    if art:
        img, field_ok, params_art = _intensity_artefacts(cfg, img, mask, kp, rng, H, W, s, L_mm, bg, partial)
        mask[~field_ok] = 0
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    img8 = img.astype(np.uint8)
    # 5. keypoint visibility
    vis = np.zeros(3, np.float32)
    for k in range(3):
        x, y = kp[k]
        xi, yi = int(round(x)), int(round(y))
        if 0 <= xi < W and 0 <= yi < H and field_ok[yi, xi]:
            vis[k] = 1.0
    keypoints = np.concatenate([kp.astype(np.float32), vis[:, None]], axis=1)
    # 6. params
    uv_to_img = A @ np.array([[s, 0, cx], [0, -s, cy], [0, 0, 1]])
    cent = {k: [float(x) for x in (uv_to_img[:, :2] @ np.asarray(v) + uv_to_img[:, 2])]
            for k, v in lay["centres"].items()}
    mcb = (uv_to_img[:, :2] @ lay["mc_bases_uv"].T).T + uv_to_img[:, 2]
    rad_img = (uv_to_img[:, :2] @ lay["forearm_ends_uv"].T).T + uv_to_img[:, 2]
    params = {
        "seed": int(seed), "index": int(index), "bone_age_months": ba, "sex": sex,
        "appearance_age_months": float(mat["appearance_age_months"]),
        "maturity_k": float(mat["k"]), "maturity_global_y": float(mat["g"]),
        "maturity_group_y": {k: float(v) for k, v in mat["e_group"].items()},
        "maturity_bone_y": {k: float(v) for k, v in mat["e_bone"].items()},
        "maturity_age_y": {k: float(v) for k, v in mat["m"].items()},
        "ossified": {k: bool(v) for k, v in lay["ossified"].items()},
        "n_carpals_ossified": int(sum(lay["ossified"][c] for c in CARPAL_NAMES)),
        "capitate_ossified": bool(lay["ossified"]["capitate"]),
        "hand_length_mm": float(L_mm), "hand_length_px": float(s), "px_per_mm": float(s / L_mm),
        "pose": lay["pose"], "width_factor": float(lay["wf"]),
        "image_h": H, "image_w": W, **{k: v for k, v in size_p.items()},
        "artefacts": bool(art), "rotation_deg": rot, "mirrored": mirrored, "flipped": mirrored,
        "scale_L_over_H": float(s / H), "shift_frac": shift_draw, "forearm_to_edge": to_edge,
        "forearm_len_drawn_L": F_eff,
        "partial": partial, "partial_cut_L": cut, "background": bg,
        "affine": A.tolist(), "uv_to_image": uv_to_img.tolist(),
        "keypoints_uv": lay["keypoints_uv"].tolist(), "keypoint_names": KEYPOINT_NAMES,
        "keypoints": keypoints.tolist(),
        "mc_bases_image": mcb.tolist(), "forearm_articular_ends_image": rad_img.tolist(),
        "bone_centres": cent,
        "inverted": bool(params_art.get("inverted", False)),
        **{k: v for k, v in params_art.items() if k != "inverted"},
    }
    return PhantomSample(image=img8, mask=mask, keypoints=keypoints, bone_age_months=ba, sex=sex, params=params)


def _stamp(img: np.ndarray, draw, y0: int, y1: int, x0: int, x1: int, value: float) -> None:
    """Draw with `draw(overlay_u8, ox, oy)` (OpenCV text/lines need 8-bit images) into a small ROI of the
    float image and blend `value` in with the anti-aliased coverage."""
    H, W = img.shape
    y0, y1, x0, x1 = max(0, int(y0)), min(H, int(y1)), max(0, int(x0)), min(W, int(x1))
    if y1 <= y0 or x1 <= x0:
        return
    ov = np.zeros((y1 - y0, x1 - x0), np.uint8)
    draw(ov, x0, y0)
    alpha = ov.astype(np.float32) * (1.0 / 255.0)
    roi = img[y0:y1, x0:x1]
    roi *= 1.0 - alpha
    roi += value * alpha


def _intensity_artefacts(cfg, img, mask, kp, rng, H, W, s, L_mm, bg, partial):
    """§5 #6-14 in the order of §6.9. Returns image, exposed-field boolean map and the params drawn."""
    p: dict = {}
    yy = np.arange(H, dtype=np.float32)[:, None]
    xx = np.arange(W, dtype=np.float32)[None, :]
    field_ok = np.ones((H, W), bool)
    # 6. collimation
    bands = []
    if rng.random() < cfg.p_collimation:
        edges = rng.permutation(4)[: int(rng.integers(1, 5))]
        for e in edges:
            e = int(e)
            side = H if e in (0, 1) else W
            width = float(rng.uniform(*cfg.collimation_width_range)) * side
            tilt = float(rng.uniform(-4, 4))
            bright = bool(rng.random() < 0.6)
            val = float(rng.uniform(0.85, 1.0) if bright else rng.uniform(0.0, 0.1))
            soft = float(rng.uniform(1, 3))
            tt = math.tan(math.radians(tilt))
            # signed distance into the field (negative = in the band); keep keypoints exposed
            if e == 0:
                kd = kp[:, 1] - (width + tt * (kp[:, 0] - W / 2))
            elif e == 1:
                kd = (H - 1 - width + tt * (kp[:, 0] - W / 2)) - kp[:, 1]
            elif e == 2:
                kd = kp[:, 0] - (width + tt * (kp[:, 1] - H / 2))
            else:
                kd = (W - 1 - width + tt * (kp[:, 1] - H / 2)) - kp[:, 0]
            inside = (kp[:, 0] >= 0) & (kp[:, 0] < W) & (kp[:, 1] >= 0) & (kp[:, 1] < H)
            if not partial and (kd[inside] < 0.02 * side).any():
                width = max(0.0, width + float(kd[inside].min()) - 0.02 * side)
            if width < 2:
                continue
            reach = int(math.ceil(width + abs(tt) * max(H, W) / 2 + 3 * soft)) + 2
            if e == 0:
                sl = (slice(0, min(H, reach)), slice(None))
                d = yy[sl[0]] - (width + tt * (xx - W / 2))
            elif e == 1:
                sl = (slice(max(0, H - reach), H), slice(None))
                d = (H - 1 - width + tt * (xx - W / 2)) - yy[sl[0]]
            elif e == 2:
                sl = (slice(None), slice(0, min(W, reach)))
                d = xx[:, sl[1]] - (width + tt * (yy - H / 2))
            else:
                sl = (slice(None), slice(max(0, W - reach), W))
                d = (W - 1 - width + tt * (yy - H / 2)) - xx[:, sl[1]]
            alpha = np.clip(0.5 - d / (2.5 * soft), 0.0, 1.0)
            sub = img[sl]
            sub *= 1 - alpha
            sub += val * alpha
            field_ok[sl] &= d >= 0
            bands.append({"edge": ["top", "bottom", "left", "right"][e], "width_px": width, "tilt_deg": tilt,
                          "value": val, "soft_px": soft})
    p["collimation"] = bands
    # 7. letters
    letters = []
    if rng.random() < cfg.p_letters:
        texts = []
        if rng.random() < cfg.p_marker:
            texts.append(("R" if rng.random() < cfg.p_wrong_marker else "L", bool(rng.random() < 0.3)))
        if rng.random() < cfg.p_free_text:
            alph = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
            n = int(rng.integers(3, 13))
            txt = "".join(rng.choice(alph, n))
            if rng.random() < 0.4 and n > 5:
                txt = txt[: n // 2] + "\n" + txt[n // 2:]
            texts.append((txt, False))
        fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_PLAIN,
                 cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX]
        for txt, boxed in texts:
            font = fonts[int(rng.integers(len(fonts)))]
            hgt = float(rng.uniform(0.02, 0.06)) * H
            val = float(rng.uniform(0.9, 1.0) if rng.random() < 0.7 else rng.uniform(0.0, 0.1))
            lines = txt.split("\n")
            (tw1, th1), _ = cv2.getTextSize("L", font, 1.0, 1)
            scale = hgt / max(th1, 1)
            thick = max(1, int(round(hgt / 12)))
            sizes = [cv2.getTextSize(li, font, scale, thick)[0] for li in lines]
            bw = max(sz[0] for sz in sizes) + 4
            bh = int(len(lines) * hgt * 1.4) + 4
            for _ in range(20):
                if bw >= W - 4 or bh >= H - 4:
                    break
                x0 = int(rng.integers(2, W - bw - 1))
                y0 = int(rng.integers(2, H - bh - 1))
                if (mask[y0:y0 + bh, x0:x0 + bw] > 0).mean() <= 0.05:
                    def draw(ov, ox, oy, lines=lines, x0=x0, y0=y0, font=font, scale=scale, thick=thick,
                             hgt=hgt, boxed=boxed, bw=bw, bh=bh):
                        for li_i, li in enumerate(lines):
                            org = (x0 + 2 - ox, int(y0 + 2 + hgt * (1 + 1.4 * li_i)) - oy)
                            cv2.putText(ov, li, org, font, scale, 255, thick, cv2.LINE_AA)
                        if boxed:
                            cv2.rectangle(ov, (x0 - 2 - ox, y0 - 2 - oy), (x0 + bw + 2 - ox, y0 + bh + 2 - oy), 255,
                                          thick)

                    pad = 4 + 2 * thick
                    _stamp(img, draw, y0 - pad, y0 + bh + pad, x0 - pad, x0 + bw + pad, val)
                    letters.append({"text": txt, "x": x0, "y": y0, "height_px": hgt, "value": val,
                                    "boxed": boxed})
                    break
    p["letters"] = letters
    # 8. ruler
    ruler = None
    if rng.random() < cfg.p_ruler:
        px_mm = s / L_mm
        edge = ["bottom", "right", "left", "top"][int(rng.integers(4))]
        val = float(rng.uniform(0.8, 1.0))
        length_mm = int(min(H, W) * 0.8 / px_mm)
        start = int(rng.integers(2, max(3, int(min(H, W) * 0.15))))
        short_t, long_t = max(3, int(0.012 * H)), max(6, int(0.028 * H))
        def draw_ruler(ov, ox, oy):
            for mm in range(length_mm + 1):
                q = int(round(start + mm * px_mm))
                ln = long_t if mm % 10 == 0 else (int(0.7 * long_t) if mm % 5 == 0 else short_t)
                if edge == "bottom":
                    cv2.line(ov, (q - ox, H - 3 - oy), (q - ox, H - 3 - ln - oy), 255, 1)
                elif edge == "top":
                    cv2.line(ov, (q - ox, 2 - oy), (q - ox, 2 + ln - oy), 255, 1)
                elif edge == "left":
                    cv2.line(ov, (2 - ox, q - oy), (2 + ln - ox, q - oy), 255, 1)
                else:
                    cv2.line(ov, (W - 3 - ox, q - oy), (W - 3 - ln - ox, q - oy), 255, 1)

        reach = long_t + 4
        box = {"bottom": (H - reach, H, 0, W), "top": (0, reach, 0, W), "left": (0, H, 0, reach),
               "right": (0, H, W - reach, W)}[edge]
        _stamp(img, draw_ruler, *box, val)
        ruler = {"edge": edge, "px_per_mm": px_mm, "length_mm": length_mm, "value": val}
    p["ruler"] = ruler
    # 11. gradient + vignette (separable: added as a row and a column profile)
    amp = float(rng.uniform(0, cfg.ramp_max))
    phi = float(rng.uniform(0, 2 * np.pi))
    diag = math.hypot(H, W)
    img += (xx - W / 2) * (math.cos(phi) * amp / diag)
    img += (yy - H / 2) * (math.sin(phi) * amp / diag)
    vig = 0.0
    if rng.random() < cfg.p_vignette:
        vig = float(rng.uniform(0, cfg.vignette_max))
        img -= ((xx - W / 2) / (W / 2)) ** 2 * (0.5 * vig)
        img -= ((yy - H / 2) / (H / 2)) ** 2 * (0.5 * vig)
    p["gradient"] = {"amplitude": amp, "direction_rad": phi, "vignette": vig}
    # 10. gamma / exposure
    gamma = float(np.exp(rng.uniform(math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1]))))
    gain = float(rng.uniform(*cfg.gain_range))
    offset = float(rng.uniform(*cfg.offset_range))
    np.clip(img, 0.0, 1.0, out=img)
    cv2.pow(img, gamma, img)
    img *= gain
    img += offset
    p["gamma"], p["gain"], p["offset"] = gamma, gain, offset
    # 12. noise (Poisson as its Gaussian approximation: one normal draw)
    sigma = float(rng.uniform(*cfg.noise_sigma_range))
    n0 = None
    z = rng.standard_normal((H, W), dtype=np.float32)
    if rng.random() < cfg.p_poisson:
        n0 = float(np.exp(rng.uniform(math.log(cfg.poisson_n0_range[0]), math.log(cfg.poisson_n0_range[1]))))
        sd = np.maximum(img, 0.0)
        sd *= 1.0 / n0
        sd += sigma * sigma
        cv2.sqrt(sd, sd)
        z *= sd
    else:
        z *= sigma
    img += z
    p["noise_sigma"], p["poisson_n0"] = sigma, n0
    # 13. blur
    blur = None
    if rng.random() < cfg.p_blur:
        blur = float(rng.uniform(*cfg.blur_sigma_range)) * max(H, W) / 1024.0
        img = cv2.GaussianBlur(img, (0, 0), blur)
    p["blur_sigma_px"] = blur
    # 9. polarity
    inverted = bool(rng.random() < cfg.p_invert)
    if inverted:
        img = 1.0 - img
    p["inverted"] = inverted
    # 14. JPEG
    jq = None
    if cfg.jpeg and rng.random() < cfg.p_jpeg:
        jq = int(rng.integers(cfg.jpeg_quality_range[0], cfg.jpeg_quality_range[1] + 1))
        u8 = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, jq])
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    p["jpeg_quality"] = jq
    return img.astype(np.float32, copy=False), field_ok, p


def make_phantom(cfg: PhantomConfig, seed: int, index: int) -> PhantomSample:
    """Draw the label of `index` (as `sample_labels` does) and render it."""
    ba, sex = _draw_label(cfg, np.random.default_rng([seed, index, 7]), index)
    return render_phantom(ba, sex, cfg, seed, index)


def bone_centres(sample: PhantomSample) -> dict[str, tuple[float, float]]:
    """Image-space centres of the named bones ("capitate", "MC3", "PP3", "radius_epiphysis", ...)."""
    return {k: (float(v[0]), float(v[1])) for k, v in sample.params["bone_centres"].items()}
