"""Stage 3: three keypoints (middle fingertip, thumb tip, capitate) per radiograph.

Two sources:

- `geometric_keypoints(mask)`: no annotation needed. On the hand mask (downscaled to a working
  size): the palm centre is the centre of the largest inscribed circle (distance transform
  maximum, radius r); an opening with a disc of about 0.35 r removes the fingers but keeps the
  palm and forearm, so mask minus opening leaves one component per free finger. Each finger's
  tip is its point farthest from the palm centre. The thumb is the finger at the end of the angular
  order with the larger angular gap to its neighbour (the thumb stands apart from the other four);
  the middle finger is the second of the other four counted from the thumb's side (or, when fingers
  are merged, the one farthest out along the hand axis). The tips are stepped a little inside the
  soft tissue (`tip_inset_frac` of the tip-to-palm distance) toward the bone tip. The capitate is
  placed along the hand axis from the palm centre away from the fingers, at proportions of the
  tip-to-palm distance (`capitate_along`, `capitate_across`, fitted on real radiographs).
  Confidence is 0..1 from the number of separated fingers, the thumb's angular gap, the axis'
  agreement with the forearm and the points lying inside the mask.
- the VGG-style regression CNN of the paper (`KeypointNet`): VGG modules (two 3x3 convolutions,
  each with ELU and batch norm, then 2x2 max pooling), global pooling to 4x4, two fully connected
  layers, 6 outputs = (x, y) of the three points in [0, 1] of the padded square input. MSE over
  the marked points only (`masked_mse`), Adam. Trained on manual points plus confident geometric
  pseudo-labels.

Points are always (3, 2) arrays in the original radiograph's pixels, rows `POINTS`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np

from boneage.masks import invert_affine, rotate_expanded

log = logging.getLogger(__name__)

POINTS = ("middle_tip", "thumb_tip", "capitate")
GEOM_WORK_PX = 320  # long side of the mask the geometric guess works on

# Fitted on rsna-half (see bench/notes/keypoints.md); used when the config does not say otherwise.
GEOM_DEFAULTS = {"tip_inset_frac": 0.03, "capitate_along": 0.21, "capitate_across": -0.02}


# ------------------------------------------------------------------------------------- geometry
def _largest_component(m: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n <= 1:
        return m.astype(bool)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return lab == k


def _fill_holes(m: np.ndarray) -> np.ndarray:
    m8 = m.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(m8)
    cv2.drawContours(out, contours, -1, 1, thickness=-1)
    return out.astype(bool)


def _angle(v: np.ndarray) -> float:
    return math.atan2(float(v[1]), float(v[0]))


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _fail(mask_shape) -> tuple[np.ndarray, float]:
    return np.full((3, 2), np.nan), 0.0


def geometric_keypoints(mask: np.ndarray, tip_inset_frac: float | None = None, capitate_along: float | None = None,
                        capitate_across: float | None = None, return_debug: bool = False):
    """(3, 2) points in the mask's pixels (rows middle_tip, thumb_tip, capitate) and a confidence.

    NaN points with confidence 0 when the mask is empty or shows no fingers.
    """
    inset = GEOM_DEFAULTS["tip_inset_frac"] if tip_inset_frac is None else tip_inset_frac
    along = GEOM_DEFAULTS["capitate_along"] if capitate_along is None else capitate_along
    across = GEOM_DEFAULTS["capitate_across"] if capitate_across is None else capitate_across
    m0 = np.asarray(mask) > 0
    if m0.ndim != 2 or m0.sum() < 50:
        return _fail(m0.shape) if not return_debug else (*_fail(m0.shape), {})
    H, W = m0.shape
    s = GEOM_WORK_PX / max(H, W)
    if s < 1:
        m = cv2.resize(m0.astype(np.uint8) * 255, (max(1, round(W * s)), max(1, round(H * s))),
                       interpolation=cv2.INTER_AREA) > 127
    else:
        s, m = 1.0, m0.copy()
    m = _fill_holes(_largest_component(m))
    h, w = m.shape
    # the image border counts as background, so a forearm cut by the edge does not look like a palm
    dist = cv2.distanceTransform(np.pad(m.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    r = float(dist.max())
    if r < 3:
        return _fail(m0.shape) if not return_debug else (*_fail(m0.shape), {})
    cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
    c = np.array([cx, cy], np.float64)
    k = max(3, int(round(0.7 * r)) | 1)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    body = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, disc).astype(bool)
    body = _largest_component(body) if body.any() else body
    fingers = m & ~body
    n, lab, stats, cents = cv2.connectedComponentsWithStats(fingers.astype(np.uint8), connectivity=8)
    ys, xs = np.nonzero(lab)
    labs = lab[ys, xs]
    cand = []
    for j in range(1, n):
        area = stats[j, cv2.CC_STAT_AREA]
        if area < 0.15 * r * r:
            continue
        sel = labs == j
        px = np.stack([xs[sel], ys[sel]], 1).astype(np.float64)
        d = np.hypot(px[:, 0] - c[0], px[:, 1] - c[1])
        i = int(np.argmax(d))
        tip = px[i]
        dmax = d[i]
        if dmax < 1.3 * r or dmax > 4.2 * r:  # not a finger: too short, or a wire / ruler running off
            continue
        # finger length along its own direction: extent of the component projected on (tip - c)
        u = (tip - c) / max(dmax, 1e-6)
        proj = (px - c) @ u
        length = proj.max() - proj.min()
        width = area / max(length, 1.0)
        if length < 1.2 * width:  # a stub, not a finger
            continue
        # does this component touch the image border far from the tip? then it is forearm, not finger
        touches = (px[:, 0] <= 0).any() or (px[:, 1] <= 0).any() or (px[:, 0] >= w - 1).any() or \
            (px[:, 1] >= h - 1).any()
        if (touches and width > 0.8 * r) or width < 0.18 * r or width > 2.2 * r:
            continue  # forearm, a ruler line or a wire, a blob
        cand.append({"tip": tip, "d": dmax, "ang": _angle(tip - c), "area": area, "width": width,
                     "base": px[int(np.argmin(d))],
                     "merged": width > 0.75 * r, "touches": bool(touches)})
    # forearm direction: the palm-and-forearm body's pixels well beyond the palm circle
    ys_b, xs_b = np.nonzero(body)
    far = np.hypot(xs_b - c[0], ys_b - c[1]) > 1.6 * r
    forearm_dir = None
    if far.sum() > 0.3 * r * r:
        v = np.array([xs_b[far].mean(), ys_b[far].mean()]) - c
        if np.hypot(*v) > 0.5 * r:
            forearm_dir = _angle(v)
    if not cand:
        return _fail(m0.shape) if not return_debug else (*_fail(m0.shape), {"r": r / s, "c": c / s})
    # the hand's axis: the direction whose +-85 degree sector holds the most (and longest) fingers,
    # a sector opposite the forearm preferred; candidates outside it (wires, panels) are dropped
    best = None
    for a0 in np.linspace(-math.pi, math.pi, 72, endpoint=False):
        members = [f for f in cand if abs(_wrap(f["ang"] - a0)) <= math.radians(85)]
        score = len(members) + 0.1 * sum(f["d"] / r for f in members)
        if forearm_dir is not None and abs(_wrap(a0 - forearm_dir - math.pi)) < math.radians(50):
            score += 1.0
        if best is None or score > best[0] + 1e-9:
            best = (score, a0, members)
    cand = best[2]
    vs = np.array([[math.cos(f["ang"]), math.sin(f["ang"])] for f in cand]) * np.array([f["d"] for f in cand])[:, None]
    axis = _angle(vs.sum(0))
    for f in cand:
        f["rel"] = _wrap(f["ang"] - axis)
    cand.sort(key=lambda f: f["rel"])
    # re-centre the axis on the longest fingers (robust to a thumb pulling the mean)
    nf = len(cand)
    conf = {5: 1.0, 4: 0.75, 3: 0.5, 2: 0.3, 1: 0.15}.get(nf, 0.5 if nf > 5 else 0.1)
    thumb = middle = None
    gap_deg = 0.0
    if nf >= 2:
        g_lo = cand[1]["rel"] - cand[0]["rel"]
        g_hi = cand[-1]["rel"] - cand[-2]["rel"]
        # the thumb: the end with the larger gap; it is also shorter than its neighbour
        # ... and it leaves the hand lower down (its base is nearer the wrist along the axis)
        ua = np.array([math.cos(axis), math.sin(axis)])
        base_lo = float(np.dot(cand[0]["base"] - c, ua)) / r
        base_hi = float(np.dot(cand[-1]["base"] - c, ua)) / r
        score_lo = g_lo + 0.3 * (cand[1]["d"] - cand[0]["d"]) / r + 0.3 * (base_hi - base_lo)
        score_hi = g_hi + 0.3 * (cand[-2]["d"] - cand[-1]["d"]) / r + 0.3 * (base_lo - base_hi)
        if score_lo >= score_hi:
            thumb, others, gap_deg = cand[0], cand[1:], math.degrees(g_lo)
        else:
            thumb, others, gap_deg = cand[-1], cand[:-1][::-1], math.degrees(g_hi)
        # others ordered from the thumb's side: index, middle, ring, little
        if len(others) >= 4:
            middle = others[1]
        elif len(others) == 3:
            # one merged pair; the middle is the farther of the first two
            middle = max(others[:2], key=lambda f: f["d"])
        else:
            middle = max(others, key=lambda f: f["d"])
        conf *= float(np.clip((gap_deg - 8) / 20, 0.2, 1.0))
    else:
        middle = cand[0]
        conf *= 0.3
    tip = middle["tip"].astype(np.float64)
    L = float(np.hypot(*(tip - c)))
    u_tip = (c - tip) / max(L, 1e-6)  # from tip toward the palm
    tip_in = tip + u_tip * inset * L
    if thumb is not None:
        t = thumb["tip"]
        ut = (c - t) / max(np.hypot(*(c - t)), 1e-6)
        thumb_in = t + ut * inset * L
    else:
        thumb_in = np.array([np.nan, np.nan])
    # capitate: beyond the palm centre on the tip->palm line, across toward the thumb side
    perp = np.array([-u_tip[1], u_tip[0]])
    if thumb is not None and np.dot(thumb["tip"] - c, perp) < 0:
        perp = -perp
    cap = c + u_tip * along * L + perp * across * L
    cap[0] = np.clip(cap[0], 0, w - 1)
    cap[1] = np.clip(cap[1], 0, h - 1)
    # agreement of the finger axis with the forearm
    if forearm_dir is not None:
        dev = abs(_wrap(_angle(tip - c) - axis))
        conf *= float(np.clip(1.2 - dev / math.radians(45), 0.3, 1.0))
    else:
        conf *= 0.7
    # plausibility: the middle finger is the longest of the non-thumb fingers, the thumb shorter
    if thumb is not None and thumb["d"] > middle["d"] * 1.05:
        conf *= 0.6
    if not m[int(round(cap[1])), int(round(cap[0]))]:
        conf *= 0.5
    # back to the mask's pixels, pixel centre to pixel centre (x / s alone moved every point (1 / s - 1) / 2 px to
    # the top left, so a mirrored film's points came back 2-3 px off the mirror of the film's: stress test, flip)
    full = np.array([W / w, H / h])

    def back(q):
        return (np.asarray(q, np.float64) + 0.5) * full - 0.5

    pts = back(np.stack([tip_in, thumb_in, cap]))
    if return_debug:
        return pts, float(np.clip(conf, 0, 1)), {"r": r / s, "c": back(c), "n_fingers": nf, "gap_deg": gap_deg,
                                                    "tips": [back(f["tip"]) for f in cand],
                                                    "tip_raw": back(tip), "perp": perp, "L": L / s}
    return pts, float(np.clip(conf, 0, 1))


def geometric_from_cfg(mask: np.ndarray, cfg, props: dict | None = None) -> tuple[np.ndarray, float]:
    """`geometric_keypoints` with the proportions of `cfg` (a KeypointsConfig), or of `props`
    (from `fit_geometric_proportions`) where given."""
    pr = {k: getattr(cfg, k, GEOM_DEFAULTS[k]) for k in GEOM_DEFAULTS}
    pr.update(props or {})
    return geometric_keypoints(mask, pr["tip_inset_frac"], pr["capitate_along"], pr["capitate_across"])


def fit_geometric_proportions(pairs, min_n: int = 5, min_conf: float = 0.5) -> dict | None:
    """Refit the geometric guess's proportions on manually marked radiographs.

    pairs: iterable of (mask, points (3, 2) with NaN where not marked). Per radiograph with a
    confident geometric layout: the capitate's position beyond the palm centre (along / across,
    in tip-to-palm lengths) and how far inside the contour tip the manual middle tip lies. The
    medians over at least `min_n` radiographs replace the defaults (each separately)."""
    along, across, inset = [], [], []
    for mask, pts in pairs:
        pts = np.asarray(pts, float)
        _, conf, dbg = geometric_keypoints(mask, 0.0, 0.0, 0.0, return_debug=True)
        if conf < min_conf or "tip_raw" not in dbg:
            continue
        L, c, tip = dbg["L"], dbg["c"], dbg["tip_raw"]
        u = (c - tip) / max(L, 1e-6)
        if np.isfinite(pts[2]).all():
            along.append(float(np.dot(pts[2] - c, u)) / L)
            across.append(float(np.dot(pts[2] - c, dbg["perp"])) / L)
        if np.isfinite(pts[0]).all() and np.hypot(*(pts[0] - tip)) < 0.15 * L:
            inset.append(float(np.dot(pts[0] - tip, u)) / L)
    out = {}
    if len(along) >= min_n:
        out["capitate_along"] = float(np.median(along))
        out["capitate_across"] = float(np.median(across))
    if len(inset) >= min_n:
        out["tip_inset_frac"] = float(np.clip(np.median(inset), 0.0, 0.1))
    return out or None


# ------------------------------------------------------------------------------------- network
def _torch():
    import torch

    return torch


def build_model(cfg):
    """The paper's VGG-style keypoint regressor (see module docstring)."""
    torch = _torch()
    nn = torch.nn

    class KeypointNet(nn.Module):
        def __init__(self, filters: list[int], fc: int = 256):
            super().__init__()
            layers, cin = [], 1
            for f in filters:
                layers += [nn.Conv2d(cin, f, 3, padding=1), nn.ELU(inplace=True), nn.BatchNorm2d(f),
                           nn.Conv2d(f, f, 3, padding=1), nn.ELU(inplace=True), nn.BatchNorm2d(f),
                           nn.MaxPool2d(2)]
                cin = f
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * 16, fc), nn.ELU(inplace=True),
                                      nn.Dropout(0.2), nn.Linear(fc, 6))

        def forward(self, x):
            return torch.sigmoid(self.head(self.pool(self.features(x))))  # (x, y) in [0, 1]

    return KeypointNet(list(cfg.filters), int(getattr(cfg, "fc_units", 256)))


def masked_mse(pred, target, visible):
    """MSE over marked points only. pred, target (N, 6); visible (N, 3) bool/float. A batch without
    any marked point gives 0 (with a gradient), never NaN."""
    torch = _torch()
    w = visible.float().repeat_interleave(2, dim=1)
    diff = (pred - torch.nan_to_num(target, nan=0.0)) ** 2 * w
    return diff.sum() / w.sum().clamp_min(1.0)


def to_square(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Pad to a square (bottom/right, black) and resize to `size`. Returns (image, scale) with
    input px = original px * scale."""
    h, w = image.shape[:2]
    side = max(h, w)
    sq = np.zeros((side, side), image.dtype)
    sq[:h, :w] = image
    scale = size / side
    out = cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return out, scale


def upright_angle(geo: np.ndarray, gconf: float, cfg) -> float:
    """Rotation (radians, image coordinates) that turns the geometric capitate-to-middle-tip axis straight up, or 0
    when the geometric guess is missing or below `cfg.upright_min_confidence`, or the hand is within
    `cfg.upright_min_deg` of upright already."""
    geo = np.asarray(geo, float).reshape(3, 2)
    if gconf < cfg.upright_min_confidence or not np.isfinite(geo[[0, 2]]).all():
        return 0.0
    v = geo[0] - geo[2]
    if np.hypot(*v) < 1e-6:
        return 0.0
    ang = _wrap(-math.pi / 2 - math.atan2(v[1], v[0]))
    return ang if abs(np.degrees(ang)) >= cfg.upright_min_deg else 0.0


def network_view(image: np.ndarray, mask: np.ndarray | None, geo: np.ndarray, gconf: float,
                 cfg) -> tuple[np.ndarray, np.ndarray]:
    """The keypoint network's square input and the 2x3 matrix taking its pixels back to the image's.

    The hand is turned upright along the geometric axis (`upright_angle`; unturned when that guess is not
    confident) and framed: a square around the mask's bounding box with `view_margin` of its long side on each
    side. So the network sees every hand at the same angle and size whatever the film's rotation, size and
    framing (issue 11, the stress test); training (stage 3) uses the same views."""
    return view_at_angle(image, mask, upright_angle(geo, gconf, cfg), cfg)


def view_at_angle(image: np.ndarray, mask: np.ndarray | None, ang: float, cfg) -> tuple[np.ndarray, np.ndarray]:
    """`network_view` with the image turned by `ang` (radians, `upright_angle`'s convention) instead."""
    size = int(cfg.input_size_px)
    rot, M = rotate_expanded(image, ang) if ang != 0.0 else (image, np.array([[1, 0, 0], [0, 1, 0]], float))
    rh, rw = rot.shape[:2]
    m = None if mask is None else np.asarray(mask)
    if m is not None and m.shape == image.shape[:2] and m.any():
        # the mask's outline, every pixel of it: a subsampled mask framed a mirrored film up to 2 px differently
        outline = np.vstack(cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0])
        q = outline.reshape(-1, 2).astype(np.float64) @ M[:, :2].T + M[:, 2]
        (x0, y0), (x1, y1) = q.min(0) - 0.5, q.max(0) + 0.5
    else:
        x0, y0, x1, y1 = 0.0, 0.0, float(rw), float(rh)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * float(cfg.view_margin))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    k = size / max(side, 1.0)
    # one more affine step: rotated px -> square px; shrink by area averaging first (no aliasing)
    pre = min(1.0, 2 * k)
    if pre < 1.0:
        rot = cv2.resize(rot, (max(1, round(rw * pre)), max(1, round(rh * pre))), interpolation=cv2.INTER_AREA)
        pre_x, pre_y = rot.shape[1] / rw, rot.shape[0] / rh
    else:
        pre_x = pre_y = 1.0
    # the frame's centre onto the square's centre pixel, (size - 1) / 2, so that the view of a mirrored film is the
    # mirror of the film's view; a pre-shrunk pixel's centre is at x_rot = (x_pre + 0.5) / pre_x - 0.5
    mid = (size - 1) / 2
    S = np.array([[k / pre_x, 0, mid - k * cx + 0.5 * k * (1 / pre_x - 1)],
                  [0, k / pre_y, mid - k * cy + 0.5 * k * (1 / pre_y - 1)]])
    sq = cv2.warpAffine(rot, S, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    fwd = np.vstack([[[k, 0, mid - k * cx], [0, k, mid - k * cy]], [0, 0, 1]]) @ np.vstack([M, [0, 0, 1]])
    return sq, invert_affine(fwd[:2])


def to_view(points: np.ndarray, back: np.ndarray) -> np.ndarray:
    """(3, 2) image px -> network-input px (the inverse of `from_view`); NaN stays NaN."""
    fwd = invert_affine(back)
    return np.asarray(points, float) @ fwd[:, :2].T + fwd[:, 2]


def from_view(points: np.ndarray, back: np.ndarray) -> np.ndarray:
    """(3, 2) network-input px -> image px through `network_view`'s matrix."""
    return np.asarray(points, float) @ back[:, :2].T + back[:, 2]


def _tensor(images: list[np.ndarray], device):
    torch = _torch()
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)[:, None]
    return x.to(device)


class _AffineAugment:
    """Fallback when albumentations is not installed (e.g. a bare GPU box): the same random zoom,
    rotation and shift with cv2, moving the points with the image. Same call signature."""

    def __init__(self, cfg, seed: int = 0):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, image, keypoints):
        c = self.cfg
        h, w = image.shape[:2]
        if self.rng.random() < 0.9:
            ang = self.rng.uniform(-c.aug_rotate_deg, c.aug_rotate_deg)
            sc = self.rng.uniform(1 - c.aug_zoom, 1 + c.aug_zoom)
            M = cv2.getRotationMatrix2D((w / 2, h / 2), ang, sc)
            M[:, 2] += self.rng.uniform(-c.aug_shift, c.aug_shift, 2) * (w, h)
        else:
            M = np.array([[1.0, 0, 0], [0, 1.0, 0]])
        out = cv2.warpAffine(image, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        kp = np.asarray(keypoints, np.float64).reshape(-1, 2) @ M[:, :2].T + M[:, 2]
        return {"image": out, "keypoints": kp}


def mirror_sample(image: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image mirrored left-right and its points with it (pixel x -> width - 1 - x); the names stay (the thumb
    of a mirrored hand is still the thumb)."""
    pts = np.array(points, np.float32, copy=True)
    pts[:, 0] = image.shape[1] - 1 - pts[:, 0]
    return np.ascontiguousarray(image[:, ::-1]), pts


def augmenter(cfg):
    """Rotation, zoom, shift (+ brightness/contrast) moving the points with the image
    (albumentations `KeypointParams`)."""
    try:
        import albumentations as A
    except ImportError:
        log.warning("keypoints: albumentations not installed; using the cv2 affine augmentation")
        return _AffineAugment(cfg)

    return A.Compose(
        [A.Affine(scale=(1 - cfg.aug_zoom, 1 + cfg.aug_zoom), rotate=(-cfg.aug_rotate_deg, cfg.aug_rotate_deg),
                  translate_percent=(-cfg.aug_shift, cfg.aug_shift), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.9),
         A.RandomBrightnessContrast(0.15, 0.15, p=0.5)],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )


def train_model(images: list[np.ndarray], points: list[np.ndarray], visible: list[np.ndarray], cfg, device,
                weights: list[float] | None = None, log_every: int = 1):
    """Train a KeypointNet. images: square inputs at cfg.input_size_px (uint8); points: (3, 2) in input
    px (anything where not visible); visible: (3,) bool. Returns the model (eval mode)."""
    torch = _torch()
    size = cfg.input_size_px
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(images)
    epochs = int(cfg.epochs)
    steps = max(1, epochs * -(-n // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    aug = augmenter(cfg)
    rng = np.random.default_rng(0)
    flip_p = float(getattr(cfg, "aug_hflip_p", 0.0))
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
    for ep in range(epochs):
        model.train()
        order = rng.choice(n, n, replace=p is not None, p=p)
        total, count = 0.0, 0
        for b in range(0, n, cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            if len(idx) < 2:
                continue
            xs, ys, vs = [], [], []
            for i in idx:
                pts = np.where(visible[i][:, None], points[i], size / 2.0).astype(np.float32)
                img = images[i]
                if flip_p > 0 and rng.random() < flip_p:
                    img, pts = mirror_sample(img, pts)
                out = aug(image=img, keypoints=pts)
                kp = np.asarray(out["keypoints"], np.float32).reshape(3, 2)
                vis = visible[i] & (kp >= 0).all(1) & (kp < size).all(1)
                xs.append(out["image"])
                ys.append(kp.reshape(-1) / size)
                vs.append(vis)
            x = _tensor(xs, device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(np.stack(ys)).to(device)
            v = torch.from_numpy(np.stack(vs)).to(device)
            loss = masked_mse(model(x), y, v)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        if log_every and (ep + 1) % log_every == 0:
            log.info("keypoints: epoch %d/%d loss %.5f", ep + 1, epochs, total / max(count, 1))
    model.eval()
    return model


FLIP_AGREE_FRAC = 0.1  # flip averaging: the two readings of a view agree within this share of the tip-capitate length


def predict_batch(model, images: list[np.ndarray], device, flip_average: bool = False) -> np.ndarray:
    """(N, 3, 2) in input px for square inputs. `flip_average`: each image is also read mirrored, in the same
    pass, and the mirrored answer, moved back (x -> size - 1 - x, pixel centres at integers as cv2 warps them),
    is averaged with the direct one where the two agree within `FLIP_AGREE_FRAC` (`KeypointConfig.flip_average`)."""
    torch = _torch()
    size = images[0].shape[0]
    with torch.inference_mode():
        x = _tensor(images, device)
        if flip_average:
            x = torch.cat([x, x.flip(-1)])
        out = model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
    out = out.reshape(-1, 3, 2) * size
    if not flip_average:
        return out
    direct, mirrored = out[:len(images)], out[len(images):].copy()
    mirrored[..., 0] = (size - 1) - mirrored[..., 0]
    # where the two readings disagree (the thumb put on opposite sides: a film turned 10 degrees, rsna-half 1621),
    # their mean is neither; the direct reading is kept there
    length = np.hypot(*(direct[:, 0] - direct[:, 2]).T)
    gap = np.hypot(*(direct - mirrored).transpose(2, 0, 1)).max(1)
    agree = (gap <= FLIP_AGREE_FRAC * np.maximum(length, 1e-6))[:, None, None]
    return np.where(agree, 0.5 * (direct + mirrored), direct)


MODEL_FILE = "model.pt"
INPUT_VIEW = "upright_framed"  # meta.json: which input the network was trained on (network_view)


def save_model(model, model_dir: Path, meta: dict) -> None:
    from boneage.fileio import atomic_write_json

    torch = _torch()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / (MODEL_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(model_dir / MODEL_FILE)
    atomic_write_json(model_dir / "meta.json", meta)


def load_keypoint_model(model_dir: Path, cfg, device):
    """The trained KeypointNet from `model_dir`, or None if none was trained (or it does not fit cfg)."""
    torch = _torch()
    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        return None
    model = build_model(cfg)
    try:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except RuntimeError as exc:
        log.warning("keypoints: %s does not fit the configured network (%s); ignored", path, str(exc)[:120])
        return None
    model = model.to(memory_format=torch.channels_last)  # about 2x faster convolutions on the CPU
    meta_path = Path(model_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("input_view") != INPUT_VIEW:
        # trained on whole-image squares before the upright framed views (network_view): its points would be
        # read through the wrong matrix, so it is not used (stage 3 trains a new one; predict.py falls back to
        # the geometric points)
        log.warning("keypoints: %s was trained on another input view (%s, now %s); ignored", path,
                    meta.get("input_view", "whole-image squares"), INPUT_VIEW)
        return None
    model.geometric_props = meta.get("geometric_proportions") or None
    return model.to(device).eval()


CHECK_GRID_PX = 400  # the mask checks on points need no finer grid than this long side


def _check_grid(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The bool mask on the grid of the point checks (long side at most `CHECK_GRID_PX`) and its scale factor."""
    m = np.asarray(mask) > 0
    h, w = m.shape
    if max(h, w) <= CHECK_GRID_PX:
        return m, 1.0
    f = CHECK_GRID_PX / max(h, w)
    small = cv2.resize(m.astype(np.uint8), (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_NEAREST) > 0
    return small, f


def points_plausible(points: np.ndarray, mask: np.ndarray | None = None) -> tuple[bool, str]:
    """Cheap anatomical checks on (3, 2) points: all finite, distinct, tip farther from the capitate than
    the thumb tip, thumb off the tip-capitate axis but not beyond it, points on (or next to) the hand."""
    p = np.asarray(points, float)
    if p.shape != (3, 2) or not np.isfinite(p).all():
        return False, "missing_points"
    tip, thumb, cap = p
    L = np.hypot(*(tip - cap))
    if L < 1e-3:
        return False, "degenerate"
    lt = np.hypot(*(thumb - cap))
    if lt > 1.0 * L:
        return False, "thumb_beyond_tip"
    u = (tip - cap) / L
    along = np.dot(thumb - cap, u) / L
    across = abs(u[0] * (thumb - cap)[1] - u[1] * (thumb - cap)[0]) / L
    if not (-0.1 < along < 0.85) or across < 0.1 or across > 0.9:
        return False, "thumb_implausible"
    if mask is not None and mask.any():
        m, f = _check_grid(mask)
        h, w = m.shape
        p, tip, cap, L = p * f, tip * f, cap * f, L * f
        # order: the capitate sits in the broad palm/wrist, the middle tip at the end of a thin finger
        ti, ci = np.round(tip).astype(int), np.round(cap).astype(int)
        if 0 <= ti[0] < w and 0 <= ti[1] < h and 0 <= ci[0] < w and 0 <= ci[1] < h:
            x0, x1 = max(0, min(ti[0], ci[0]) - int(0.3 * L)), min(w, max(ti[0], ci[0]) + int(0.3 * L) + 1)
            y0, y1 = max(0, min(ti[1], ci[1]) - int(0.3 * L)), min(h, max(ti[1], ci[1]) + int(0.3 * L) + 1)
            sub = np.pad(m[y0:y1, x0:x1].astype(np.uint8), 1)
            dist = cv2.distanceTransform(sub, cv2.DIST_L2, 3)[1:-1, 1:-1]
            if dist[ti[1] - y0, ti[0] - x0] > dist[ci[1] - y0, ci[0] - x0] + 0.02 * L:
                return False, "wrong_order"
        k = max(1, int(0.015 * L))  # a point may lie this close outside the mask
        for q in p:
            x, y = int(round(q[0])), int(round(q[1]))
            if not (0 <= x < w and 0 <= y < h) or not m[max(0, y - k):y + k + 1, max(0, x - k):x + k + 1].any():
                return False, "point_off_hand"
    return True, ""


SNAP_MAX_FRAC = 0.1  # a network point at most this share of the hand length off the mask is moved onto it
SNAP_CONFIDENCE = 0.45  # the confidence of such snapped points: above registration's min_confidence, below agreement


def snap_to_mask(points: np.ndarray, mask: np.ndarray | None, max_frac: float) -> np.ndarray | None:
    """(3, 2) points with each point off the mask moved to the nearest mask pixel, or None when a point lies
    farther than `max_frac` of the tip-to-capitate length from the mask (or there is no mask).

    The network places fingertips on the soft-tissue tip, which on low-contrast films lies a little past the
    mask's edge; such a point is right for registration once it sits on the hand, while a mask-based fallback
    for the whole radiograph reads these films far worse (session-4 notes, bench/notes/keypoints.md). Works on
    `points_plausible`'s grid (`_check_grid`): a moved point lands on a mask pixel there, at that grid's precision."""
    p = np.asarray(points, float).reshape(3, 2).copy()
    if mask is None or not np.isfinite(p).all() or not np.asarray(mask).any():
        return None
    m, f = _check_grid(mask)
    p *= f
    L = float(np.hypot(*(p[0] - p[2])))
    h, w = m.shape
    inv = np.pad((~m).astype(np.uint8), 1, constant_values=1)
    dist, lab = cv2.distanceTransformWithLabels(inv, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    # the nearest zero pixel (a mask pixel) of each label
    zy, zx = np.nonzero(inv == 0)
    lut = np.zeros(int(lab.max()) + 1, np.int64)
    lut[lab[zy, zx]] = np.arange(len(zy))
    for i, (x, y) in enumerate(p):
        xi, yi = int(round(x)), int(round(y))
        if 0 <= xi < w and 0 <= yi < h and m[yi, xi]:
            continue
        xc, yc = min(max(xi, -1), w), min(max(yi, -1), h)  # outside the image: start from its border
        j = lut[lab[yc + 1, xc + 1]]
        q = np.array([zx[j] - 1.0, zy[j] - 1.0])
        if np.hypot(*(q - p[i])) > max_frac * max(L, 1.0):
            return None
        p[i] = q
    return p / f


def axis_upright_angle(points: np.ndarray) -> float:
    """The rotation (radians, `upright_angle`'s convention) that turns these points' capitate-to-middle-tip axis
    straight up; NaN when they are missing or coincide."""
    p = np.asarray(points, float).reshape(3, 2)
    v = p[0] - p[2]
    if not np.isfinite(v).all() or np.hypot(*v) < 1e-6:
        return float("nan")
    return _wrap(-math.pi / 2 - math.atan2(v[1], v[0]))


def fingers_behind(points: np.ndarray, mask) -> bool:
    """True when the mask says the fingers lie on the capitate's side, not the middle tip's: rows across the hand
    cross several fingers near the finger end and one forearm near the other (`registration.finger_end_sign`).
    A network reading an upside-down hand finds that reading again when turned along it; this tells it apart."""
    from boneage.registration import finger_end_sign  # registration imports this module

    p = np.asarray(points, float).reshape(3, 2)
    m = None if mask is None else np.asarray(mask) > 0
    v = p[0] - p[2]
    if m is None or not m.any() or not np.isfinite(v).all() or np.hypot(*v) < 1e-6:
        return False
    ys, xs = np.nonzero(m[::4, ::4])
    mu = np.array([xs.mean() * 4.0, ys.mean() * 4.0])
    return finger_end_sign(m, v / np.hypot(*v), mu) < 0


def snapped_if_off_hand(points: np.ndarray, mask) -> np.ndarray | None:
    """Points only a little off the hand (`points_plausible`'s `point_off_hand`) moved onto it by `snap_to_mask`,
    when that makes them plausible; else None."""
    ok, why = points_plausible(points, mask)
    if ok or why != "point_off_hand":
        return None
    snapped = snap_to_mask(points, mask, SNAP_MAX_FRAC)
    return snapped if snapped is not None and points_plausible(snapped, mask)[0] else None


HAND_AXIS_MAX_DEG = 60.0  # a reading whose capitate-to-tip axis lies further off the hand's own axis runs across it
HAND_AXIS_MIN_ELONGATION = 1.5  # ... judged only on a mask this much longer than wide (its axis is then clear)


def hand_direction(mask) -> np.ndarray | None:
    """Unit vector (image px) along the mask's long axis towards the fingers (`registration.fingers_sign`), or None
    when the mask is too round for a clear axis (`HAND_AXIS_MIN_ELONGATION`, in standard deviations)."""
    from boneage.registration import fingers_sign  # registration imports this module

    m = None if mask is None else np.asarray(mask) > 0
    if m is None or not m.any():
        return None
    ys, xs = np.nonzero(m[::4, ::4])
    if len(xs) < 10:
        return None
    P = np.stack([xs, ys], 1).astype(np.float64) * 4.0
    evals, evecs = np.linalg.eigh(np.cov(P.T))
    if evals[1] < HAND_AXIS_MIN_ELONGATION ** 2 * max(evals[0], 1e-9):
        return None
    return evecs[:, 1] * fingers_sign(m, P, P.mean(0), evecs[:, 1])


def across_hand(points: np.ndarray, direction: np.ndarray | None) -> bool:
    """True when the points' capitate-to-tip axis lies more than `HAND_AXIS_MAX_DEG` off the hand's direction
    (`hand_direction`): the network found a sideways hand in the view and read it again as such (rsna-half 1938
    turned by 10 degrees: a tip on the little finger's edge, a capitate in the metacarpals; 26 months)."""
    p = np.asarray(points, float).reshape(3, 2)
    v = p[0] - p[2]
    n = float(np.hypot(*v))
    if direction is None or not np.isfinite(v).all() or n < 1e-6:
        return False
    return float(v @ direction) / n < math.cos(math.radians(HAND_AXIS_MAX_DEG))


def _usable(points: np.ndarray, mask, direction: np.ndarray | None = None) -> bool:
    """Plausible points (or points only a little off the hand, which `snap_to_mask` moves on) whose middle tip lies
    at the fingers' end of the hand, along the hand (`across_hand`, with the mask's `direction`)."""
    ok = points_plausible(points, mask)[0] or snapped_if_off_hand(points, mask) is not None
    return ok and not fingers_behind(points, mask) and not across_hand(points, direction)


def _read_turned(model, image, mask, angles: list[float], cfg, device) -> list[np.ndarray]:
    views = [view_at_angle(image, mask, a, cfg) for a in angles]
    out = predict_batch(model, [v[0] for v in views], device, cfg.flip_average)
    return [from_view(o, back) for o, (_, back) in zip(out, views)]


def fixed_point_gap(points: np.ndarray, again: np.ndarray) -> float:
    """Largest distance between two readings of the same hand, in shares of the first's tip-to-capitate length."""
    p, q = np.asarray(points, float).reshape(3, 2), np.asarray(again, float).reshape(3, 2)
    L = float(np.hypot(*(p[0] - p[2])))
    d = np.hypot(*(p - q).T)
    return float(d.max() / L) if L > 1e-6 and np.isfinite(d).all() else float("inf")


def second_readings(model, images: list[np.ndarray], masks: list, firsts: list[np.ndarray], cfg, device,
                    batch: int = 32) -> list[np.ndarray | None]:
    """Each first answer's second reading (the hand turned upright along the answer and read again), in batches:
    stage 3 passes them to `consistent_view_points` (`again`) instead of one forward pass per radiograph. None
    where the answer has no axis or the check is off (`cfg.view_angles_deg` empty)."""
    out: list[np.ndarray | None] = [None] * len(firsts)
    todo = [k for k, f in enumerate(firsts) if cfg.view_angles_deg and not math.isnan(axis_upright_angle(f))]
    for b in range(0, len(todo), batch):
        chunk = todo[b:b + batch]
        views = [view_at_angle(images[k], masks[k], axis_upright_angle(firsts[k]), cfg) for k in chunk]
        for k, o, (_, back) in zip(chunk, predict_batch(model, [v[0] for v in views], device, cfg.flip_average),
                                   views):
            out[k] = from_view(o, back)
    return out


def consistent_view_points(model, image: np.ndarray, mask: np.ndarray | None, first: np.ndarray, cfg,
                           device, again: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """(points, searched). The network, trained on upright hands, puts an upright layout into every view, read or
    not; what it read it finds again. So each answer is checked as a fixed point: the hand is turned exactly
    upright along the answer's own tip-to-capitate axis and read once more; an answer that moves less than
    `cfg.view_consistent_frac` of the hand length is kept. The first view's answer is kept when it passes.
    Otherwise the network reads the hand turned by each of `cfg.view_angles_deg`, and the answer that moves
    least on its second reading wins (its second reading is returned), if it passes; else the first answer.
    A hand the geometric guess turned wrongly (a film at 45 degrees, a mask without the forearm) is still
    read in a view the network knows. `searched`: the first answer failed and the search found another.
    `again`: the first answer's second reading when the caller has it already (`second_readings`)."""
    angles = [math.radians(float(a)) for a in cfg.view_angles_deg]
    limit = float(cfg.view_consistent_frac)
    u = axis_upright_angle(first)
    if not angles or math.isnan(u):
        return first, False
    if again is None:
        again = _read_turned(model, image, mask, [u], cfg, device)[0]
    direction = hand_direction(mask)
    if _usable(first, mask, direction) and fixed_point_gap(first, again) <= limit:
        return first, False
    cands = _read_turned(model, image, mask, angles, cfg, device)
    ok = [c for c in cands if not math.isnan(axis_upright_angle(c))]
    if not ok:
        return first, False
    seconds = _read_turned(model, image, mask, [axis_upright_angle(c) for c in ok], cfg, device)
    scored = sorted(((fixed_point_gap(c, d), k) for k, (c, d) in enumerate(zip(ok, seconds))
                     if _usable(d, mask, direction)), key=lambda t: t[0])
    if not scored or scored[0][0] > limit:
        return first, False
    return seconds[scored[0][1]], True


def predict_keypoints(model, clean_image: np.ndarray, mask: np.ndarray, cfg, device) -> tuple[np.ndarray, float, str]:
    """(3, 2) points in image px, confidence 0..1, source ('model' or 'geometric').

    Without a model: the geometric guess. With one: the network's points; the confidence is high
    when they are plausible and agree with a confident geometric guess (a second opinion from a
    different method), lower when they disagree; an implausible network answer with a plausible
    confident geometric one gives the geometric one.
    """
    props = getattr(model, "geometric_props", None)
    geo, gconf = geometric_from_cfg(mask, cfg, props) if mask is not None else (np.full((3, 2), np.nan), 0.0)
    if model is None:
        return geo, gconf, "geometric"
    sq, back = network_view(clean_image, mask, geo, gconf, cfg)
    pts = from_view(predict_batch(model, [sq], device, cfg.flip_average)[0], back)
    return finish_network_points(model, clean_image, mask, pts, geo, gconf, cfg, device)


def finish_network_points(model, clean_image: np.ndarray, mask, pts: np.ndarray, geo: np.ndarray, gconf: float, cfg,
                          device, again: np.ndarray | None = None) -> tuple[np.ndarray, float, str]:
    """The network's first answer (image px) -> (points, confidence, source), as stage 3 and predict.py both
    finish it: checked as a fixed point with a search over turned views (`consistent_view_points`; `again`: its
    second reading, when batched by the caller), then fused with the geometric guess (`combine_model_geometric`)."""
    pts, searched = consistent_view_points(model, clean_image, mask, pts, cfg, device, again)
    # the geometric axis turned the hand where the network could not read it: its layout is suspect
    return combine_model_geometric(pts, geo, min(gconf, 0.5) if searched else gconf, mask)


def combine_model_geometric(pts: np.ndarray, geo: np.ndarray, gconf: float, mask) -> tuple[np.ndarray, float, str]:
    """Fuse the network's points with the geometric guess.

    The network sees a small image (about 1 % of the image per input pixel) but is robust; the
    geometric tips are sub-pixel accurate on a good mask but fail on merged fingers or bad masks.
    So: where both are plausible and a tip agrees within `agree_frac` of the hand length, the
    geometric tip is kept (source 'geometric' when both tips are), and the capitate is their mean;
    elsewhere the network's points. Confidence: high on agreement, lower on disagreement.
    """
    agree_frac = 0.05
    ok = points_plausible(pts, mask)[0]
    gok = bool(np.isfinite(geo).all()) and points_plausible(geo, mask)[0]
    if not ok:
        if gok and gconf >= 0.5:
            return geo, gconf * 0.8, "geometric"
        snapped = snapped_if_off_hand(pts, mask)
        if snapped is not None:
            return snapped, SNAP_CONFIDENCE, "model"
        return pts, 0.1, "model"
    out = pts.copy()
    L = float(np.hypot(*(pts[0] - pts[2])))
    if not (gok and gconf > 0.3):
        return out, 0.6, "model"
    d = np.hypot(*(pts - geo).T) / max(L, 1e-6)
    if gconf >= 0.7 and d[:2].max() > 3 * agree_frac:
        # a clear disagreement: trust a confident geometric layout over the network
        return geo, gconf * 0.7, "geometric"
    agree = d[:2] < agree_frac
    out[:2][agree] = geo[:2][agree]
    if d[2] < 0.15:
        out[2] = 0.5 * (pts[2] + geo[2])
    frac = float(np.clip(1.0 - (float(d[:2].mean()) - 0.03) / 0.12, 0.0, 1.0))
    conf = 0.5 + 0.5 * frac if gconf >= 0.5 else 0.6 + 0.2 * frac
    if not ok or not points_plausible(out, mask)[0]:
        return pts, conf * 0.8, "model"
    return out, float(np.clip(conf, 0, 1)), "geometric" if agree.all() else "model"
