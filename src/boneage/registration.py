"""Stage 4: registration into the standard canvas and the three region crops.

The canvas is `canvas_h_px` x `canvas_w_px` (2080 x 1600) times `canvas_scale`. From the three
keypoints a similarity transform (uniform zoom, rotation, translation), preceded by a mirror flip
when the thumb is on the wrong side, puts the middle fingertip at (W/2, tip_y) and the capitate at
(W/2, H - capitate_from_bottom). Convention (checked on rsna-half, whose `hand_boxes.csv` marks
the 4 mirrored radiographs): a left hand in the standard PA view, fingers up, has its thumb on the
image's RIGHT; in image coordinates (y down) that is cross(tip - capitate, thumb - capitate) > 0.
Any other hand is flipped, so every registered hand looks like a left hand.

When the points are missing or implausible (wrong order, thumb where no thumb can be, hand length
far outside the data set's spread, low confidence) the mask gives the alignment instead: principal
axis, the fingers' end (the end that does not run into the image border and carries less area),
the hand's width mapped to a typical width and its distal end to the fingertip row. Such rows get
`method=mask` and a flag; nothing is dropped.

`registration.csv` columns: id, scale, angle_deg, tx, ty, mirrored, residual_px, method, flag.
`scale`, `angle_deg`, `tx`, `ty` describe the 2x3 affine from radiograph pixels to canvas pixels
(scale = |det|^0.5, angle of the rotation part after any mirror). `residual_px` is the distance,
in full-size canvas pixels, between the registered thumb tip and its typical canvas position
(`thumb_canvas_xy`): the thumb is not used for the fit, so it is an independent check.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from boneage.errors import ConfigError
from boneage.keypoints import points_plausible

REG_COLUMNS = ["id", "scale", "angle_deg", "tx", "ty", "mirrored", "residual_px", "method", "flag"]


def canvas_size(cfg) -> tuple[int, int]:
    """(height, width) of the canvas in pixels at `canvas_scale`."""
    return (max(1, round(cfg.canvas_h_px * cfg.canvas_scale)), max(1, round(cfg.canvas_w_px * cfg.canvas_scale)))


def canvas_targets(cfg) -> tuple[np.ndarray, np.ndarray]:
    """Canvas positions of the middle fingertip and the capitate (scaled)."""
    s = cfg.canvas_scale
    w = cfg.canvas_w_px * s
    tip = np.array([w / 2.0, cfg.tip_y_px * s])
    cap = np.array([w / 2.0, (cfg.canvas_h_px - cfg.capitate_from_bottom_px) * s])
    return tip, cap


def is_mirrored(points: np.ndarray) -> bool | None:
    """True when the thumb is on the left of the tip-capitate axis (seen with the fingers up), i.e.
    not a left hand in PA view; None when the thumb (or the axis) is missing."""
    p = np.asarray(points, float)
    if not np.isfinite(p).all():
        return None
    v = p[0] - p[2]
    d = p[1] - p[2]
    cross = v[0] * d[1] - v[1] * d[0]
    if abs(cross) < 1e-9:
        return None
    return bool(cross < 0)


def transform_points(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, float).reshape(-1, 2)
    return p @ M[:, :2].T + M[:, 2]


def _info_from_matrix(M: np.ndarray, mirrored: bool) -> dict:
    A = M[:, :2].copy()
    if mirrored:
        A = A @ np.diag([-1.0, 1.0])  # remove the flip to read off the rotation
    scale = float(math.sqrt(abs(np.linalg.det(M[:, :2]))))
    angle = float(math.degrees(math.atan2(A[1, 0], A[0, 0])))
    return {"scale": scale, "angle_deg": angle, "tx": float(M[0, 2]), "ty": float(M[1, 2]), "mirrored": bool(mirrored)}


def similarity_from_points(points: np.ndarray, cfg) -> tuple[np.ndarray, dict]:
    """2x3 affine from radiograph pixels to canvas pixels and its info
    {scale, angle_deg, tx, ty, mirrored, residual_px}. Uses the tip and capitate for the fit and the
    thumb for the side (and the residual). Raises ValueError when the tip or capitate is missing."""
    p = np.asarray(points, float).reshape(3, 2)
    if not (np.isfinite(p[0]).all() and np.isfinite(p[2]).all()):
        raise ValueError("middle tip and capitate are needed for a similarity transform")
    mirrored = bool(is_mirrored(p))
    F = np.diag([-1.0, 1.0]) if mirrored else np.eye(2)
    src_tip, src_cap = F @ p[0], F @ p[2]
    tip_t, cap_t = canvas_targets(cfg)
    zs = complex(*(src_tip - src_cap))
    if abs(zs) < 1e-9:
        raise ValueError("middle tip and capitate coincide")
    a = complex(*(tip_t - cap_t)) / zs
    R = np.array([[a.real, -a.imag], [a.imag, a.real]])
    A = R @ F
    t = tip_t - A @ p[0]
    M = np.hstack([A, t[:, None]])
    info = _info_from_matrix(M, mirrored)
    info["residual_px"] = thumb_residual(M, p, cfg)
    return M, info


def thumb_residual(M: np.ndarray, points: np.ndarray, cfg) -> float:
    """Full-canvas pixels between the registered thumb tip and its typical position (NaN if no thumb)."""
    thumb = np.asarray(points, float).reshape(3, 2)[1]
    if not np.isfinite(thumb).all():
        return float("nan")
    q = transform_points(M, thumb)[0] / cfg.canvas_scale
    return float(np.hypot(*(q - np.asarray(cfg.thumb_canvas_xy, float))))


def hand_length_stats(points: np.ndarray) -> dict | None:
    """Robust spread of log hand length (tip to capitate, px) over (N, 3, 2) points: {median_px, log_sd}."""
    p = np.asarray(points, float).reshape(-1, 3, 2)
    L = np.hypot(*(p[:, 0] - p[:, 2]).T)
    L = L[np.isfinite(L) & (L > 0)]
    if len(L) < 5:
        return None
    logs = np.log(L)
    med = float(np.median(logs))
    mad = float(np.median(np.abs(logs - med))) * 1.4826
    return {"median_px": float(math.exp(med)), "log_sd": max(mad, 0.05)}


def check_points(points, confidence: float, mask, cfg, stats: dict | None, manual: bool = False) -> str:
    """'' when the points can be used for registration, else the reason (becomes the flag). Points a person
    marked (`manual`) are not checked against the mask: where they disagree, the mask is the one at fault."""
    p = np.asarray(points, float).reshape(3, 2)
    if not np.isfinite(p).all():
        return "missing_points"
    if confidence is not None and np.isfinite(confidence) and confidence < cfg.min_confidence:
        return f"low_confidence:{confidence:.2f}"
    ok, why = points_plausible(p, None if manual else mask)
    if not ok:
        return why
    if stats:
        L = float(np.hypot(*(p[0] - p[2])))
        z = (math.log(L) - math.log(stats["median_px"])) / stats["log_sd"]
        if z > cfg.max_hand_length_z or -z > cfg.max_hand_length_z_short:
            return f"hand_length_z:{abs(z):.1f}"
    return ""


def fingers_sign(m: np.ndarray, P: np.ndarray, mu: np.ndarray, e1: np.ndarray) -> int:
    """+1 when the fingers lie towards +e1 of the mask `m` (P: a sample of its pixels as (x, y), mu their mean), else
    -1. Rows across the hand near the fingers' end cross several fingers (runs of mask), rows near the forearm end
    cross one; where they cannot tell, the end with less mask and away from the image border is the fingers'."""
    sign = finger_end_sign(m, e1, mu)
    if sign != 0:
        return sign
    h, w = m.shape
    a = (P - mu) @ e1
    lo, hi = np.percentile(a, [0.5, 99.5])
    ext = hi - lo
    area_hi = np.mean(a > hi - 0.15 * ext)
    area_lo = np.mean(a < lo + 0.15 * ext)
    border = (P[:, 0] <= 1) | (P[:, 1] <= 1) | (P[:, 0] >= w - 2) | (P[:, 1] >= h - 2)
    border_hi = np.mean(border & (a > hi - 0.15 * ext))
    border_lo = np.mean(border & (a < lo + 0.15 * ext))
    return 1 if (area_lo - area_hi) + 5.0 * (border_lo - border_hi) >= 0 else -1


def mask_alignment(mask: np.ndarray, cfg) -> tuple[np.ndarray, dict]:
    """Affine from the mask alone: principal axis, fingers' end, width and distal extent."""
    m = np.asarray(mask) > 0
    ys, xs = np.nonzero(m)
    if len(xs) < 20:
        raise ValueError("empty mask")
    step = max(1, len(xs) // 20000)
    P = np.stack([xs[::step], ys[::step]], 1).astype(np.float64)
    mu = P.mean(0)
    cov = np.cov((P - mu).T)
    evals, evecs = np.linalg.eigh(cov)
    e1 = evecs[:, int(np.argmax(evals))]
    a = (P - mu) @ e1
    lo, hi = np.percentile(a, [0.5, 99.5])
    f = e1 * fingers_sign(m, P, mu, e1)
    g = np.array([-f[1], f[0]])
    # a left hand has its thumb on the canvas' right (+g); the thumb's side of the hand carries more
    # mask beside the forearm's axis, so a hand whose extra mass lies on -g is mirrored
    mirrored = thumb_side_sign(m, f, g, mu) < 0
    if mirrored:
        g = -g
    af = (P - mu) @ f
    bg = (P - mu) @ g
    a_max = np.percentile(af, 99.8)
    b_lo, b_hi = np.percentile(bg, [1, 99])
    width = max(b_hi - b_lo, 1.0)
    s = cfg.canvas_scale
    Hc, Wc = canvas_size(cfg)
    a_min = np.percentile(af, 0.2)
    # the hand's width to a typical width, but never so large that the hand overruns the canvas' height
    k = min(cfg.fallback_hand_width_px * s / width, (Hc - cfg.tip_y_px * s * 0.5) / max(a_max - a_min, 1.0))
    # x' = k g.(p - mu) + Wc/2 - k b_mid ; y' = -k f.(p - mu) + tip_y + k a_max
    b_mid = 0.5 * (b_lo + b_hi)
    A = np.vstack([k * g, -k * f])
    t = np.array([Wc / 2.0 - k * b_mid, cfg.tip_y_px * s * 0.5 + k * a_max]) - A @ mu
    M = np.hstack([A, t[:, None]])
    info = _info_from_matrix(M, mirrored)
    info["residual_px"] = float("nan")
    return M, info


def _mask_coords(m: np.ndarray, long_side_px: int = 256) -> tuple[np.ndarray, float]:
    """Pixel centres of the mask at a coarse resolution, in the original image's coordinates."""
    h, w = m.shape
    k = min(1.0, long_side_px / max(h, w))
    small = cv2.resize(m.astype(np.uint8), (max(1, round(w * k)), max(1, round(h * k))),
                       interpolation=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(small)
    return np.stack([xs, ys], 1).astype(np.float64) / k, 1.0 / k


def _occupancy(m: np.ndarray, along: np.ndarray, across: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """The mask resampled on a grid whose rows run along `along` (row 0 at the low end)."""
    P, px = _mask_coords(m)
    a = (P - mu) @ along
    b = (P - mu) @ across
    ai = ((a - a.min()) / px).astype(int)
    bi = ((b - b.min()) / px).astype(int)
    grid = np.zeros((ai.max() + 1, bi.max() + 1), np.uint8)
    grid[ai, bi] = 1
    # pixel centres turned off the image's axes leave empty cells between them (at 45 degrees, every other
    # cell): close those one-cell holes, or every row seems to cross several fingers
    return cv2.morphologyEx(grid, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)) > 0


def finger_end_sign(m: np.ndarray, e1: np.ndarray, mu: np.ndarray) -> int:
    """+1 when the fingers lie towards +e1, -1 towards -e1, 0 when the rows cannot tell."""
    e2 = np.array([-e1[1], e1[0]])
    grid = _occupancy(m, e1, e2, mu)
    n = grid.shape[0]
    if n < 20:
        return 0
    runs = (np.diff(grid.astype(np.int8), axis=1) == 1).sum(1) + grid[:, 0]
    lo = runs[int(0.04 * n):int(0.22 * n)].mean()
    hi = runs[int(0.78 * n):int(0.96 * n)].mean()
    if abs(hi - lo) < 0.5:
        return 0
    return 1 if hi > lo else -1


def thumb_side_sign(m: np.ndarray, f: np.ndarray, g: np.ndarray, mu: np.ndarray) -> int:
    """+1 when the thumb lies towards +g, -1 towards -g, 0 when undecided. Fingers point along +f.
    The forearm's centre line (median of the rows at the proximal end) splits the hand; the thumb's
    side carries more mask in the proximal half of the hand (thumb and thenar)."""
    grid = _occupancy(m, f, g, mu)  # row 0: proximal end (forearm), last row: fingertips
    n = grid.shape[0]
    if n < 20:
        return 0
    cols = np.arange(grid.shape[1])
    base = grid[:int(0.15 * n)]
    if base.sum() == 0:
        return 0
    centre = (base * cols).sum() / base.sum()
    band = grid[int(0.25 * n):int(0.65 * n)]
    right = (band[:, cols > centre]).sum()
    left = (band[:, cols < centre]).sum()
    if abs(right - left) < 0.05 * max(1, right + left):
        return 0
    return 1 if right > left else -1


def _full_image_alignment(shape, cfg) -> tuple[np.ndarray, dict]:
    h, w = shape[:2]
    Hc, Wc = canvas_size(cfg)
    k = min(Hc / h, Wc / w)
    M = np.array([[k, 0, (Wc - k * w) / 2], [0, k, (Hc - k * h) / 2]], float)
    info = _info_from_matrix(M, False)
    info["residual_px"] = float("nan")
    return M, info


def warp_to_canvas(image: np.ndarray, M: np.ndarray, cfg) -> np.ndarray:
    """The radiograph on the canvas through M (2x3, image px -> canvas px).

    `cv2.warpAffine` samples bilinearly and does not average when it shrinks (INTER_AREA is not supported
    there), so a radiograph shrunk 3-5x onto the canvas kept its pixel noise, JPEG blocks and aliasing, and the
    same hand at another resolution gave other crops (issue 11). A shrinking transform therefore first
    area-averages the image down by its scale (`cv2.resize`, INTER_AREA), then warps at about 1:1."""
    Hc, Wc = canvas_size(cfg)
    M = np.asarray(M, float)
    s = float(np.sqrt(abs(np.linalg.det(M[:, :2]))))
    h, w = image.shape[:2]
    if 0 < s < 0.8:
        sw, sh = max(1, round(w * s)), max(1, round(h * s))
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        a = np.array([w / sw, h / sh])  # small px u is original px (u + 0.5) * a - 0.5 (pixel centres)
        M = np.hstack([M[:, :2] * a, (M[:, 2] + M[:, :2] @ (0.5 * (a - 1)))[:, None]])
    return cv2.warpAffine(image, M, (Wc, Hc), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def register_radiograph(clean_image, points, confidence, mask, cfg, hand_length_stats=None,
                        manual: bool = False) -> tuple[np.ndarray, dict]:
    """Canvas (uint8) and the registration row (without id): scale, angle_deg, tx, ty, mirrored,
    residual_px, method (`keypoints` or `mask`), flag; plus `matrix` (2x3 list) for callers. `manual`: the
    points were marked by a person (keypoints.csv source `manual`), so the mask does not veto them."""
    pts = None if points is None else np.asarray(points, float).reshape(3, 2)
    reason = "missing_points" if pts is None else check_points(pts, confidence, mask, cfg, hand_length_stats,
                                                               manual)
    flag = ""
    if not reason:
        M, info = similarity_from_points(pts, cfg)
        method = "keypoints"
        if np.isfinite(info["residual_px"]) and info["residual_px"] > cfg.max_thumb_residual_px:
            flag = f"thumb_residual:{info['residual_px']:.0f}"
    else:
        method = "mask"
        try:
            if mask is None:
                raise ValueError("no mask")
            M, info = mask_alignment(mask, cfg)
            flag = f"fallback:{reason}"
        except ValueError:
            M, info = _full_image_alignment(clean_image.shape, cfg)
            flag = f"fallback:{reason};no_mask"
    canvas = warp_to_canvas(clean_image, M, cfg)
    row = {**info, "method": method, "flag": flag, "matrix": M.tolist()}
    return canvas, row


def region_box(cfg, name: str) -> tuple[int, int, int, int]:
    """Region box in (scaled) canvas pixels: x0, y0, x1, y1."""
    x0, y0, x1, y1 = cfg.regions[name]
    s = cfg.canvas_scale
    return round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s)


def crop_regions(canvas: np.ndarray, cfg) -> dict[str, np.ndarray]:
    """{region: crop resized to crop_sizes (height, width)}; parts of a box outside the canvas are black."""
    out = {}
    H, W = canvas.shape[:2]
    for name in cfg.regions:
        x0, y0, x1, y1 = region_box(cfg, name)
        crop = np.zeros((max(1, y1 - y0), max(1, x1 - x0)) + canvas.shape[2:], canvas.dtype)
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        if sx1 > sx0 and sy1 > sy0:
            crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = canvas[sy0:sy1, sx0:sx1]
        hw = cfg.crop_sizes.get(name, [crop.shape[0], crop.shape[1]])
        th, tw = int(hw[0]), int(hw[1])
        interp = cv2.INTER_AREA if th < crop.shape[0] else cv2.INTER_LINEAR
        out[name] = cv2.resize(crop, (tw, th), interpolation=interp)
    return out


# ----------------------------------------------------------------------------- ablation inputs (issue 8)

BASELINE_INPUTS = ("raw", "clean")  # whole radiographs without registration: what each stage is worth


def input_hw(cfg, name: str) -> tuple[int, int]:
    """(height, width) of a region crop or ablation input; an ablation input without its own size takes A's."""
    hw = cfg.crop_sizes.get(name) or cfg.crop_sizes["A"]
    return int(hw[0]), int(hw[1])


def check_baseline_inputs(cfg) -> None:
    unknown = [n for n in cfg.baseline_inputs if n not in BASELINE_INPUTS]
    if unknown:
        raise ConfigError(f"register.baseline_inputs: {', '.join(map(str, unknown))} not one of "
                          f"{', '.join(BASELINE_INPUTS)}")


def fit_whole(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The whole image, centred on a black background of the target's aspect, resized to (height, width)."""
    th, tw = int(hw[0]), int(hw[1])
    h, w = image.shape[:2]
    ph, pw = max(h, int(np.ceil(w * th / tw))), max(w, int(np.ceil(h * tw / th)))
    pad = np.zeros((ph, pw), np.uint8)
    y0, x0 = (ph - h) // 2, (pw - w) // 2
    pad[y0:y0 + h, x0:x0 + w] = image
    interp = cv2.INTER_AREA if th < ph else cv2.INTER_LINEAR
    return cv2.resize(pad, (tw, th), interpolation=interp)


def baseline_crops(raw: np.ndarray, clean: np.ndarray, cfg) -> dict[str, np.ndarray]:
    """{name: input} for every name in `cfg.baseline_inputs` (raw: the radiograph as read, 8-bit grey)."""
    source = {"raw": raw, "clean": clean}
    return {n: fit_whole(source[n], input_hw(cfg, n)) for n in cfg.baseline_inputs}
