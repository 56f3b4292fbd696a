"""Classical hand masks, mask quality, post-processing, polarity and contrast (stages 1-2).

Everything here works on plain numpy arrays (uint8 radiographs, bool masks) and is shared by the
stage scripts, the U-Net bootstrap in `boneage.segmentation` and `src/predict.py`.

- `detect_inverted`: a radiograph with a white background (inverted polarity).
- `classical_mask`: the first guess without any network: contrast normalisation, a sweep of
  thresholds, morphology, and per threshold the component that looks most like a hand; the
  threshold whose mask scores best on `mask_quality` wins.
- `mask_quality`: 0..1 from area fraction, solidity (area / convex hull area), the number of
  deep convexity defects (gaps between fingers) and contact with the image border.
- `postprocess_mask`: keep the hand's component, fill holes, smooth the border.
- `clean_radiograph`: stage 2 on one radiograph.
"""

from __future__ import annotations

import cv2
import numpy as np

FLAG_QUALITY = 0.5  # mask_quality flags masks below this
TIE_AREA_RANK = 0.85  # rank (0 smallest .. 1 largest) of the chosen mask among near-best candidates
OPEN_PX = 5  # opening kernel of the classical guess at 256 px: cuts thin bridges to collimation edges
# a straight edge deviates from its chord by at most this share of the long side (3 px at 256 px). Stage 1 picks
# candidate masks and the film's polarity with it: at 1.5 px a film rotated by 10 degrees lost its polarity (3 of 40
# hold-out films in the stress test). The self-check scores the final hand mask at predict.mask_straight_tol_frac
STRAIGHT_TOL_FRAC = 0.012


# ----------------------------------------------------------------------------------------- polarity
def _border_and_centre(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape
    b = max(2, round(0.06 * min(h, w)))
    ring = np.concatenate([image[:b].ravel(), image[-b:].ravel(), image[b:-b, :b].ravel(), image[b:-b, -b:].ravel()])
    centre = image[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    return ring, centre


def polarity_score(image: np.ndarray) -> float:
    """Positive for a normal radiograph (dark background, bright hand), negative for an inverted one.

    The hand fills the middle of a radiograph and the bones are its brightest (normal) or darkest
    (inverted) structures. We compare the darkest and brightest tails of the centre with the
    border: in a normal radiograph the centre's bright tail (bone) stands out above the border
    more than its dark tail falls below it.
    """
    img = _small(image, 256)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    ring, centre = _border_and_centre(img)
    c_lo, c_hi = np.percentile(centre, [5, 95])
    r_med = float(np.median(ring))
    return float((c_hi - r_med) - (r_med - c_lo)) / 255.0


def polarity_from_mask(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Median inside the hand minus median of the band just outside it, in 0..1 units (positive:
    normal polarity, the hand brighter than the background around it); None without a usable mask."""
    if mask is None or mask.shape != image.shape or not mask.any() or mask.all():
        return None
    img = _small(image, 256)
    m = mask
    if m.shape != img.shape:
        m = cv2.resize(m.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    r = max(2, round(0.03 * max(img.shape)))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    mu8 = m.astype(np.uint8)
    ring = (cv2.dilate(mu8, k) > 0) & ~m
    core = (cv2.erode(mu8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))) > 0)
    if ring.sum() < 10 or core.sum() < 10:
        return None
    return float(np.median(img[core]) - np.median(img[ring])) / 255.0


def detect_inverted(image: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """True when the radiograph has inverted polarity (white background, dark bones).

    The hand's soft tissue is brighter than the background right around it in a normal
    radiograph. With a `mask` (the hand) that comparison decides; without one the classical
    first guess (`classical_mask`, which tries both polarities) provides the mask. A bright border
    alone (unexposed film outside the collimation) does not make a radiograph inverted.
    """
    if mask is None:
        small = _small(image, 128)
        mask, _, _, inv = _classical(small, 128)
        if mask.any():
            return inv
    d = polarity_from_mask(image, mask)
    if d is None:
        return polarity_score(image) < 0.0
    return d < 0.0


def normal_polarity(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """The radiograph turned to normal polarity and whether it was inverted."""
    inv = detect_inverted(image)
    return (255 - image if inv else image), inv


# ----------------------------------------------------------------------------------------- helpers
def _small(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = long_side / max(h, w)
    if s >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every hole of a bool mask (background not connected to the image border)."""
    m = mask.astype(np.uint8)
    h, w = m.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = m
    flood = pad.copy()
    ff = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask.astype(bool) | holes


def components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(number of components, label image, stats) of a bool mask, background excluded from the count."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n - 1, labels, stats


def count_components(mask: np.ndarray, min_frac: float = 0.001) -> int:
    """Components larger than `min_frac` of the image."""
    n, _, stats = components(mask)
    if n == 0:
        return 0
    return int((stats[1:, cv2.CC_STAT_AREA] >= min_frac * mask.size).sum())


# ----------------------------------------------------------------------------------------- quality
def defect_depths(contour: np.ndarray) -> np.ndarray:
    """Depths in pixels of a contour's convexity defects (empty when OpenCV finds none or refuses the contour).
    OpenCV 4 returns them as (N, 1, 4), OpenCV 5 as (N, 4); the depth is the last field, in 1/256 px."""
    try:
        defects = cv2.convexityDefects(contour, np.sort(cv2.convexHull(contour, returnPoints=False), axis=0))
    except cv2.error:
        defects = None
    if defects is None:
        return np.zeros(0)
    return np.asarray(defects).reshape(-1, 4)[:, 3] / 256.0


def deep_gaps(contour: np.ndarray, depth_frac: float) -> int:
    """The convexity defects of an outline deeper than `depth_frac` x sqrt(its hull's area): the gaps between
    fingers (a hand shows 4, a mitten or a tray's rim none)."""
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    if len(contour) < 5 or hull_area <= 0:
        return 0
    return int((defect_depths(contour) > depth_frac * np.sqrt(hull_area)).sum())


def finger_gaps(mask: np.ndarray, depth_frac: float = 0.06, work_px: int = 256) -> int:
    """`deep_gaps` of a bool mask's largest outline, computed at <= `work_px`."""
    m = (_small(np.asarray(mask).astype(np.uint8) * 255, work_px) > 127).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return deep_gaps(max(contours, key=cv2.contourArea), depth_frac) if contours else 0


def shape_features(mask: np.ndarray, straight_tol_frac: float = STRAIGHT_TOL_FRAC) -> dict:
    """Geometry of the largest component of a bool mask (computed at <= 256 px for speed); `straight_tol_frac`: how
    straight a side must be to count as a straight edge (share of the long side)."""
    m = mask.astype(np.uint8)
    if max(m.shape) > 256:
        m = (_small(m * 255, 256) > 127).astype(np.uint8)
    h, w = m.shape
    total = float(m.sum())
    feats = {"area_frac": total / m.size, "solidity": 0.0, "straight": 0.0, "defects": 0, "border_frac": 0.0,
             "n_components": count_components(m > 0), "largest_frac": 0.0}
    if total == 0:
        return feats
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(c)
    feats["largest_frac"] = area / max(total, 1.0)
    hull_pts = cv2.convexHull(c)
    hull_area = cv2.contourArea(hull_pts)
    feats["solidity"] = float(area / hull_area) if hull_area > 0 else 0.0
    # finger gaps: convexity defects deeper than a share of the hand's size
    if len(c) >= 5 and area > 0:
        depth = defect_depths(c)
        feats["defects"] = int((depth > 0.12 * np.sqrt(hull_area)).sum())
    # straight edges (collimation borders, rulers, tray rims): polygon sides longer than 0.35 of the long side,
    # straight within straight_tol_frac of it and not lying on the image border, summed and divided by the long
    # side. A hand filling its film has finger and palm sides that long, straight within 3 px but not 1.5
    long_side = max(h, w)
    poly = cv2.approxPolyDP(c, straight_tol_frac * long_side, True)[:, 0, :].astype(np.float32)
    straight = 0.0
    for p0, p1 in zip(poly, np.roll(poly, -1, axis=0)):
        seg = float(np.hypot(*(p1 - p0)))
        if seg < 0.35 * long_side:
            continue
        on_border = (max(p0[0], p1[0]) <= 1 or min(p0[0], p1[0]) >= w - 2
                     or max(p0[1], p1[1]) <= 1 or min(p0[1], p1[1]) >= h - 2)
        if not on_border:
            straight += seg
    feats["straight"] = straight / long_side
    # border contact: share of the image border covered by the mask
    border = np.concatenate([m[0], m[-1], m[1:-1, 0], m[1:-1, -1]])
    feats["border_frac"] = float(border.mean())
    return feats


def _ramp(x: float, lo0: float, lo1: float, hi1: float, hi0: float) -> float:
    """1 on [lo1, hi1], linear down to 0 at lo0 and hi0."""
    if x < lo1:
        return float(np.clip((x - lo0) / max(lo1 - lo0, 1e-9), 0.0, 1.0))
    if x > hi1:
        return float(np.clip((hi0 - x) / max(hi0 - hi1, 1e-9), 0.0, 1.0))
    return 1.0


def quality_from_features(f: dict, flag_below: float = FLAG_QUALITY) -> tuple[float, str]:
    if f["area_frac"] <= 0:
        return 0.0, "empty"
    s_area = _ramp(f["area_frac"], 0.03, 0.10, 0.70, 0.90)
    s_sol = _ramp(f["solidity"], 0.30, 0.45, 0.86, 0.97)
    d = f["defects"]
    s_fing = 1.0 if 3 <= d <= 6 else (0.65 if d in (2, 7) else (0.35 if d == 1 or d == 8 else 0.15))
    s_border = _ramp(f["border_frac"], -1.0, 0.0, 0.12, 0.40)
    s_frag = _ramp(f["largest_frac"], 0.5, 0.9, 1.0, 1.1)
    s_straight = _ramp(f["straight"], -1.0, 0.0, 0.7, 1.6)
    q = float((s_area * s_sol * s_fing * s_border * s_frag * s_straight) ** (1.0 / 3.0))
    reasons = []
    if s_area < 0.5:
        reasons.append("area" + ("_small" if f["area_frac"] < 0.1 else "_large"))
    if s_sol < 0.5:
        reasons.append("blob" if f["solidity"] > 0.86 else "ragged")
    if s_fing < 0.5:
        reasons.append("fingers")
    if s_border < 0.5:
        reasons.append("border")
    if s_straight < 0.5:
        reasons.append("straight_edges")
    if s_frag < 0.5:
        reasons.append("fragmented")
    flag = ""
    if q < flag_below:
        flag = "low_quality:" + "+".join(reasons) if reasons else "low_quality"
    return q, flag


def mask_quality(mask: np.ndarray, straight_tol_frac: float = STRAIGHT_TOL_FRAC) -> tuple[float, str]:
    """Quality 0..1 of a hand mask and a flag ('' when fine, else a short reason for a person)."""
    if mask is None or mask.size == 0 or not mask.any():
        return 0.0, "empty"
    return quality_from_features(shape_features(mask > 0, straight_tol_frac))


# ----------------------------------------------------------------------------------------- post-processing
def select_hand_component(mask: np.ndarray) -> np.ndarray:
    """The component most like a hand: among components of at least 15 % of the largest, the best
    quality x sqrt(area); drops letters, markers, rulers and collimation bands that are separate."""
    n, labels, stats = components(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas)
    if n == 1:
        return labels == 1
    best, best_score = None, -1.0
    for k in order[:4]:
        if areas[k] < 0.15 * areas[order[0]]:
            break
        comp = labels == (k + 1)
        q, _ = mask_quality(comp)
        score = (q + 0.05) * np.sqrt(areas[k])
        if score > best_score:
            best, best_score = comp, score
    return best


def smooth_mask(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.3:
        return mask.astype(bool)
    f = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma_px)
    return f > 0.5


def hand_scale_px(mask: np.ndarray, ratio: float) -> float:
    """The length (px) that the post-processing's shares refer to: `ratio` x the hand's length along its axis
    (`hand_length`) when `ratio` > 0 and the mask holds a hand, else the image's long side. The long side grows when
    a radiograph is rotated onto a larger canvas and shrinks when it is cropped, the hand does not: border smoothing,
    dilation and the edge band scaled by the hand give a rotated or cropped film the same mask (issue 11). On the
    rsna-half masks the long side is 1.16 x the hand length (median; p10-p90 1.09-1.32)."""
    m = np.asarray(mask)
    if ratio > 0 and m.any():
        length = hand_length(m)
        if length > 0:
            return float(ratio) * length
    return float(max(m.shape))


def postprocess_mask(mask: np.ndarray, smooth_sigma_frac: float = 0.004, dilate_frac: float = 0.0,
                     scale_px: float | None = None) -> np.ndarray:
    """Keep the hand's component, fill its holes, smooth its border (sigma a share of `scale_px`, by default the
    long side), optionally grow it by `dilate_frac` of it."""
    m = mask.astype(bool)
    if not m.any():
        return m
    scale = float(max(m.shape)) if scale_px is None else float(scale_px)
    m = select_hand_component(m)
    m = fill_holes(m)
    m = smooth_mask(m, smooth_sigma_frac * scale)
    return grow_mask(m, dilate_frac, scale)


def grow_mask(mask: np.ndarray, dilate_frac: float, scale_px: float | None = None) -> np.ndarray:
    """Dilate by `dilate_frac` of `scale_px` (default the long side; nothing below one pixel), keeping the hand's
    component."""
    m = mask.astype(bool)
    r = round(dilate_frac * (max(m.shape) if scale_px is None else scale_px))
    if r >= 1:
        m = cv2.dilate(m.astype(np.uint8), _disk(r)) > 0
    if m.any():
        m = select_hand_component(m)
    return m


# ----------------------------------------------------------------------------------------- classical guess
def normalise_contrast(image: np.ndarray) -> np.ndarray:
    """Percentile stretch then CLAHE with large tiles: flattens exposure differences between films."""
    lo, hi = np.percentile(image, [1, 99.5])
    img = np.clip((image.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0)), 0, 255).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(img)


def classical_candidates(image: np.ndarray, work_px: int = 256, n_thresholds: int = 12) -> list[np.ndarray]:
    """Candidate masks at `work_px` from a sweep of thresholds (normal polarity assumed)."""
    img = _small(image, work_px)
    norm = normalise_contrast(img)
    blur = cv2.GaussianBlur(norm, (0, 0), 1.2).astype(np.float32)
    # local background: subtract a strongly blurred copy of the image with the bright tail clipped,
    # which removes slow exposure gradients (heel effect) but keeps the hand's edge.
    long_side = max(img.shape)
    k_open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (OPEN_PX, OPEN_PX))
    cands = []
    lo, hi = np.percentile(blur, [25, 95])
    otsu, _ = cv2.threshold(blur.astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ts = list(np.linspace(lo, hi, n_thresholds)) + [float(otsu)]
    for t in ts:
        m = blur > t
        m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, k_open) > 0
        if m.sum() < 0.02 * m.size:
            continue
        comp = select_hand_component(m)
        comp = fill_holes(comp)
        comp = smooth_mask(comp, 0.004 * long_side)
        if comp.any():
            cands.append(comp)
    return cands


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def refine_boundary(img: np.ndarray, mask: np.ndarray, band_px: int = 3, iterations: int = 2) -> np.ndarray:
    """Move a rough mask's border to the mid-level between the hand's soft tissue and the background:
    levels from bands 3-6 px inside and outside the border, a threshold between them applied only
    within `band_px` of the border."""
    if not mask.any():
        return mask
    sm = cv2.GaussianBlur(img, (0, 0), 0.7).astype(np.float32)

    for _ in range(iterations):
        mu8 = mask.astype(np.uint8)
        ring_in = (cv2.erode(mu8, _disk(2)) > 0) & ~(cv2.erode(mu8, _disk(5)) > 0)
        ring_out = (cv2.dilate(mu8, _disk(5)) > 0) & ~(cv2.dilate(mu8, _disk(2)) > 0)
        if ring_out.sum() < 10 or ring_in.sum() < 10:
            return mask
        t = 0.5 * (np.median(sm[ring_in]) + np.median(sm[ring_out]))
        outer = cv2.dilate(mu8, _disk(band_px)) > 0
        inner = cv2.erode(mu8, _disk(band_px)) > 0
        refined = inner | (outer & (sm > t))
        refined = cv2.morphologyEx(refined.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)) > 0
        refined = fill_holes(select_hand_component(refined))
        if not refined.any():
            return mask
        mask = refined
    return mask


def _otsu(values: np.ndarray, bins: int = 64) -> tuple[float, float]:
    """(threshold, share of the variance between the two classes) of a 1-D sample."""
    lo, hi = np.percentile(values, [1, 99])
    if hi - lo < 1e-6:
        return float(lo), 0.0
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    p = hist / max(1, hist.sum())
    c = 0.5 * (edges[:-1] + edges[1:])
    w0, mu = np.cumsum(p), np.cumsum(p * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1.0 - w0))
    j = int(np.nanargmax(np.nan_to_num(between, nan=-1.0)))
    return float(c[j]), float(between[j] / max(float(np.var(values)), 1e-9))


def refine_edges(image: np.ndarray, mask: np.ndarray, band_px: int, min_separation: float = 0.5,
                 smooth_sigma_frac: float = 0.002, carve_frac: float = 0.0,
                 scale_px: float | None = None) -> np.ndarray:
    """Put a mask's border (upsampled from the U-Net's working resolution, so off by a working pixel or
    two) on the radiograph's own soft-tissue edge: within `band_px` of the border, pixels are reassigned by
    an Otsu threshold of the band's intensities, on the side of the hand's polarity (soft tissue brighter
    or darker than the background, whichever the band shows). Where the band does not split into two
    clear levels (between-class variance share below `min_separation`: faint soft tissue, a cast) the
    mask is returned unchanged. With `carve_frac` > 0 the threshold also applies deeper than the band (the
    webs between the fingers, which a coarse network fills), when that removes at most `carve_frac` of the
    band-refined mask (more would be soft tissue at the background's level, not a web). The border is smoothed
    with a sigma of `smooth_sigma_frac` x `scale_px` (default the long side; `hand_scale_px`)."""
    m = mask.astype(bool)
    if band_px < 1 or not m.any():
        return m
    mu8 = m.astype(np.uint8)
    inner = cv2.erode(mu8, _disk(band_px)) > 0
    outer = cv2.dilate(mu8, _disk(band_px)) > 0
    band = outer & ~inner
    inside, outside = image[band & m], image[band & ~m]
    if inside.size < 50 or outside.size < 50:
        return m
    sign = 1.0 if np.median(inside) >= np.median(outside) else -1.0
    v = image.astype(np.float32) * sign
    t, separation = _otsu(v[band])
    if separation < min_separation:
        return m
    refined = fill_holes(select_hand_component(inner | (band & (v > t))))
    if not refined.any():
        return m
    if carve_frac > 0:
        carved = fill_holes(select_hand_component(outer & (v > t)))
        if carved.sum() >= (1.0 - carve_frac) * refined.sum():
            refined = carved
    return smooth_mask(refined, smooth_sigma_frac * (max(m.shape) if scale_px is None else scale_px))


def exposed_field(image: np.ndarray, min_cover: float = 0.85, max_tilt: float = 0.08,
                  max_depth_frac: float = 0.3) -> np.ndarray:
    """True where the film was exposed: the radiograph minus bright collimation bands along its sides
    (a uniformly bright strip from an edge, at least `min_cover` of that side long, with a straight inner
    edge tilted at most `max_tilt`). The U-Net tends to take such bands for soft tissue; dark bands look
    like background and need nothing. Returns all True when no band is found."""
    g = cv2.medianBlur(image, 5).astype(np.float32)
    lo, hi = np.percentile(g, [2, 99.5])
    bright = g >= lo + 0.8 * (hi - lo)
    field = np.ones(g.shape, bool)
    if hi - lo < 20:
        return field
    views = ((lambda a: a, lambda b: b), (lambda a: a[:, ::-1], lambda b: b[:, ::-1]),  # left, right
             (lambda a: a.T, lambda b: b.T), (lambda a: a[::-1].T, lambda b: b.T[::-1]))  # top, bottom
    for to_side, back in views:
        b = to_side(bright)
        n, depth_max = b.shape
        run = np.where((~b).any(1), (~b).argmax(1), depth_max)  # bright run from the edge, per row
        if (run > 0).mean() < min_cover:
            continue
        y = np.arange(n)
        near = (run > 0) & (np.abs(run - np.median(run[run > 0])) <= max_tilt * n / 2 + 3)
        if near.sum() < 0.5 * n:
            continue
        A = np.stack([y[near], np.ones(int(near.sum()))], 1)
        coef = np.linalg.lstsq(A, run[near].astype(float), rcond=None)[0]
        inl = np.abs(A @ coef - run[near]) < max(3.0, 0.01 * depth_max)
        if inl.sum() < 0.5 * n or abs(coef[0]) > max_tilt:
            continue
        coef = np.linalg.lstsq(A[inl], run[near][inl].astype(float), rcond=None)[0]
        depth = np.clip(np.round(coef[0] * y + coef[1] + 1), 0, depth_max).astype(int)
        if np.median(depth) > max_depth_frac * depth_max:
            continue
        field &= ~back(np.arange(depth_max)[None, :] < depth[:, None])
    return field


def hand_length(mask: np.ndarray) -> float:
    """Extent (px) of a bool mask along its principal axis, 1st to 99th percentile of the projections; 0 when empty.
    Where the forearm is cut by the image border this is the visible hand and forearm."""
    ys, xs = np.nonzero(np.asarray(mask)[::2, ::2])
    if len(xs) < 10:
        return 0.0
    a = axis_tilt(mask)
    # axis_tilt turns the long axis vertical: the axis itself is the direction (sin a, cos a)
    proj = np.sin(a) * xs + np.cos(a) * ys
    lo, hi = np.percentile(proj, [1, 99])
    return float(2.0 * (hi - lo))


def _prominent_peaks(d: np.ndarray, min_prominence: float, half_window: int) -> list[int]:
    """Indices of the local maxima of a closed (circular) profile whose topographic prominence is at least
    `min_prominence`: the drop to the higher of the two lowest points met on the way to a higher value either way."""
    n = len(d)
    peaks = []
    for i in range(n):
        win = d[np.arange(i - half_window, i + half_window + 1) % n]
        if d[i] < win.max() or (d[i] == win.max() and np.argmax(win) != half_window):
            continue
        lows = []
        for step in (1, -1):
            lo, j = d[i], i
            for _ in range(n - 1):
                j = (j + step) % n
                if d[j] > d[i]:
                    break
                lo = min(lo, d[j])
            lows.append(lo)
        if d[i] - max(lows) >= min_prominence:
            peaks.append(i)
    return peaks


def fingertips(mask: np.ndarray, min_prominence_frac: float = 0.025) -> np.ndarray:
    """(k, 2) x, y points: the convex extremities of the hand's mask (fingertips, the thumb's tip, also a finger
    the mask cut short): prominent local maxima, along the outer contour, of the distance from the palm's centre
    (the deepest point of the mask), at least `min_prominence_frac` of the hand length above the valleys on either
    side. Contour points on or beside the image border (the forearm cut by it) are not extremities. A fingertip
    the mask joined to its neighbour (a bridged finger gap) is often no extremity and is not found."""
    m = np.asarray(mask).astype(bool)
    length = hand_length(m)
    if length <= 0:
        return np.zeros((0, 2), np.float32)
    h, w = m.shape
    s = min(1.0, 256.0 / max(h, w))
    small = _small(m.astype(np.uint8) * 255, 256) > 127 if s < 1 else m
    dt = cv2.distanceTransform(small.astype(np.uint8), cv2.DIST_L2, 5)
    cy, cx = np.unravel_index(int(np.argmax(dt)), dt.shape)
    centre = np.array([cx, cy], np.float64) / s
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2), np.float32)
    c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)
    step = max(1, len(c) // 600)
    c = c[::step]
    if len(c) < 8:
        return np.zeros((0, 2), np.float32)
    d = np.hypot(c[:, 0] - centre[0], c[:, 1] - centre[1])
    d = np.convolve(np.r_[d[-2:], d, d[:2]], np.ones(5) / 5, mode="valid")  # light smoothing, circular

    def near_border(b: float) -> np.ndarray:
        return (c[:, 0] < b) | (c[:, 1] < b) | (c[:, 0] > w - 1 - b) | (c[:, 1] > h - 1 - b)

    on_border = near_border(max(3.0, 0.01 * length))  # contour on the image border: the forearm (or a finger) cut by it
    d = np.where(on_border, 0.0, d)
    half = max(2, int(round(0.02 * length / step)))
    n = len(c)
    # peaks beside the border are corners where it cuts the mask (the forearm's), or the ragged end of a forearm
    # that stops just short of it
    edge = near_border(max(3.0, 0.03 * length))
    idx = [i for i in _prominent_peaks(d, min_prominence_frac * length, half)
           if not edge[i] and not on_border[np.arange(i - half, i + half + 1) % n].any()]
    return c[idx].astype(np.float32).reshape(-1, 2)


def _level_map(values: np.ndarray, weight: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weighted local mean, weighted local SD, local weight density) with a Gaussian window of `sigma` px."""
    wsum = cv2.GaussianBlur(weight, (0, 0), sigma)
    den = np.maximum(wsum, 1e-6)
    mean = cv2.GaussianBlur(values * weight, (0, 0), sigma) / den
    sq = cv2.GaussianBlur(values * values * weight, (0, 0), sigma) / den
    return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0)), wsum


def extend_fingertips(image: np.ndarray, mask: np.ndarray, max_frac: float = 0.03, k_noise: float = 3.0,
                      tissue_frac: float = 0.25, margin_px: float = 0.0, zone_frac: float = 0.06,
                      smooth_px: float = 1.5, tip_prominence_frac: float = 0.025) -> np.ndarray:
    """Grow a hand mask at its fingertips into the faint soft tissue the network left out (low-contrast films).

    Around each convex extremity of the mask (`fingertips`, within `zone_frac` of the hand length plus the growth
    limit), pixels not farther than `max_frac` of the hand length from the mask join it when their (lightly
    smoothed) intensity, on the side of the hand's polarity, is above the local background level plus the larger
    of `k_noise` x the background's local SD and `tissue_frac` x (local soft-tissue level - background level), and
    they connect to the mask. Levels are local (Gaussian windows of 6 % of the long side): the background from
    pixels more than twice the growth limit outside the mask, the soft tissue from the mask's outer rim. Where
    either level is missing, or the rim is not above the background, nothing grows. Then, with `margin_px` >= 1, a
    cap over each tip of the grown mask (within max(2 x margin, 2 % of the hand length) of it, inside the zones)
    is dilated by `margin_px` (fingertip keypoints are marked at the soft tissue's very tip, where it fades into
    the background). The rest of the mask is unchanged; an empty mask is returned as it is. About 50 ms for a
    half-size RSNA radiograph.
    """
    m = np.asarray(mask).astype(bool)
    if not m.any() or (max_frac <= 0 and margin_px < 0.5) or image is None or image.shape != m.shape:
        return m
    tips = fingertips(m, tip_prominence_frac)
    length = hand_length(m)
    if len(tips) == 0 or length <= 0:
        return m
    h, w = m.shape
    grow = max(1, int(round(max_frac * length))) if max_frac > 0 else 0
    zone = np.zeros((h, w), np.uint8)
    rz = max(2, int(round(zone_frac * length)) + grow)
    for x, y in tips:
        cv2.circle(zone, (int(round(x)), int(round(y))), rz, 1, -1)
    zone = zone > 0
    out = m
    if grow >= 1:
        d_out = cv2.distanceTransform((~m).astype(np.uint8), cv2.DIST_L2, 5)
        d_in = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5)
        rim = m & (d_in <= max(1, grow // 2))
        far = d_out > 2 * grow
        img = image.astype(np.float32)
        sign = -1.0 if far.any() and np.median(img[rim]) < np.median(img[far]) else 1.0
        sm = cv2.GaussianBlur(img * sign, (0, 0), smooth_px) if smooth_px > 0.3 else img * sign
        s = min(1.0, 256.0 / max(h, w))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        down = (lambda a: cv2.resize(a, size, interpolation=cv2.INTER_AREA)) if s < 1 else (lambda a: a)
        up = (lambda a: cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)) if s < 1 else (lambda a: a)
        sig = 0.06 * max(size)
        sm_s = down(sm)
        bg, bg_sd, bg_w = _level_map(sm_s, down(far.astype(np.float32)), sig)
        tis, _, tis_w = _level_map(sm_s, down(rim.astype(np.float32)), sig)
        thr = bg + np.maximum(k_noise * bg_sd, tissue_frac * (tis - bg))
        valid = (bg_w > 0.02) & (tis_w > 0.02) & (tis > bg)
        thr = up(np.where(valid, thr, np.inf).astype(np.float32))
        cand = (sm > thr) & (d_out <= grow) & zone & ~m
        cand = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)) > 0
        if cand.any():
            n, lab = cv2.connectedComponents((cand | m).astype(np.uint8), connectivity=8)
            keep = np.unique(lab[m])
            out = fill_holes(np.isin(lab, keep[keep > 0]))
    r = int(round(margin_px))
    if r >= 1:  # a cap of `margin_px` over each (new) tip, not along the fingers' sides
        cap = np.zeros((h, w), np.uint8)
        rc = max(2 * r, int(round(0.02 * length)))
        for x, y in (fingertips(out, tip_prominence_frac) if out is not m else tips):
            if zone[int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1))]:
                cv2.circle(cap, (int(round(x)), int(round(y))), rc, 1, -1)
        out = out | ((cv2.dilate(out.astype(np.uint8), _disk(r)) > 0) & (cap > 0))
    return out


def _texture_ratio(grad: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient inside the mask (its border excluded) over the mean gradient outside it."""
    mu8 = mask.astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    inner = cv2.erode(mu8, k) > 0
    outer = ~(cv2.dilate(mu8, k) > 0)
    if inner.sum() < 10 or outer.sum() < 10:
        return 0.0
    return float(grad[inner].mean() / max(grad[outer].mean(), 1e-3))


def _edge_strength(grad: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude on the mask's border pixels."""
    mu8 = mask.astype(np.uint8)
    border = (cv2.dilate(mu8, np.ones((3, 3), np.uint8)) > 0) & ~(cv2.erode(mu8, np.ones((3, 3), np.uint8)) > 0)
    return float(grad[border].mean()) if border.any() else 0.0


def _classical(img: np.ndarray, work_px: int) -> tuple[np.ndarray, float, str, bool]:
    """Best candidate over both polarities at <= work_px: (mask at img's size, quality, flag, inverted)."""
    small = _small(img, work_px)
    gx = cv2.Sobel(cv2.GaussianBlur(small, (0, 0), 1.0).astype(np.float32), cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(cv2.GaussianBlur(small, (0, 0), 1.0).astype(np.float32), cv2.CV_32F, 0, 1)
    grad = np.hypot(gx, gy)
    scored = []
    for inv in (False, True):
        view = 255 - small if inv else small
        for c in classical_candidates(view, work_px):
            q, flag = mask_quality(c)
            t = _texture_ratio(grad, c)
            # a hand holds bones (edges inside), a patch of background is flat; the normal
            # polarity wins ties: it is by far the more common one
            s = q * _ramp(t, 0.7, 1.4, 1e9, 2e9) - (0.05 if inv else 0.0)
            scored.append((s, 0.0, c, q, flag, inv))
    if not scored:
        return np.zeros(img.shape, bool), 0.0, "empty", False
    # among the near-best (a stable range of thresholds), a larger-than-median one: the lowest
    # thresholds bridge the gaps between fingers, the highest lose the thin fingertips
    top = max(t[0] for t in scored)
    near = [t for t in scored if t[0] >= top - 0.03]
    near.sort(key=lambda t: t[2].sum())
    _, _, best, q, flag, inv = near[min(len(near) - 1, int(TIE_AREA_RANK * len(near)))]
    best = refine_boundary(255 - small if inv else small, best)
    q, flag = mask_quality(best)
    h, w = img.shape
    if best.shape != (h, w):
        best = cv2.resize(best.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR) > 127
    return best, q, flag, inv


def classical_mask(image: np.ndarray, work_px: int = 256) -> tuple[np.ndarray, float, str]:
    """First guess without a network: (bool mask at the image's size, quality, flag).

    Candidates come from a threshold sweep of the radiograph in both polarities (so an inverted
    radiograph is segmented too); the one with the best `mask_quality` wins (ties: normal
    polarity, then the larger mask, so fingertips stay in); its border is then refined to the
    mid-level between hand and background.
    """
    m, q, flag, _ = _classical(image, work_px)
    return m, q, flag


def shed_tray(image: np.ndarray, mask: np.ndarray, max_quality: float = 0.9, min_gain: float = 0.1,
              max_area_ratio: float = 0.7, margin_frac: float = 0.015, min_inside: float = 0.97) -> np.ndarray | None:
    """A network mask that took in a tray or field box around the hand, cut back to the hand; None when not such.

    Small hands X-rayed in a tray (rsna-half 1402, 1422, 1581, 2058) get a mask that runs along the tray's rim and
    fills part of its inside, or a blob around the hand: a quality below `max_quality` (straight sides, no finger
    gaps). When the classical first guess (`classical_mask`) scores at least `min_gain` better, lies inside the mask
    (`min_inside` of it) and covers at most `max_area_ratio` of it, the mask is cut to within `margin_frac` of the
    long side of the classical one (the network's fingertips stay, the tray goes) and its hand component
    returned."""
    if not mask.any():
        return None
    q_net, _ = mask_quality(mask)
    if q_net >= max_quality:
        return None
    guess, q_guess, _ = classical_mask(image)
    area = int(guess.sum())
    if (area == 0 or q_guess < q_net + min_gain or (guess & mask).sum() < min_inside * area
            or area > max_area_ratio * mask.sum()):
        return None
    r = max(1, round(margin_frac * max(mask.shape)))
    near = cv2.dilate(guess.astype(np.uint8), _disk(r)) > 0
    cut = select_hand_component(mask & near)
    # a hand whose fingers the network parted is no tray: its forearm cut by the film's edge lowers its quality, and
    # a classical guess that lost fingers must not replace it (a film cropped by 5 %, rsna-half 1938: 22 months)
    return None if finger_gaps(cut) < finger_gaps(mask) else cut


# ----------------------------------------------------------------------------------------- stage 2
def interior(mask: np.ndarray, depth_px: float, min_share: float = 0.2) -> np.ndarray:
    """The part of a bool mask at least `depth_px` from its border: a statistic over it does not depend on where the
    border runs within that depth (a mask one segmentation draws a few pixels wider takes in a rim of background,
    which moves low percentiles). The whole mask when `depth_px` < 1 or less than `min_share` of it is that deep."""
    m = np.asarray(mask).astype(bool)
    if depth_px < 1 or not m.any():
        return m
    dist = cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    deep = dist >= depth_px
    return deep if deep.sum() >= min_share * m.sum() else m


def stretch_inside(image: np.ndarray, mask: np.ndarray | None, percentiles) -> tuple[np.ndarray, list[float]]:
    """(image with its grey levels stretched linearly so that the given low/high percentiles of the pixels inside
    `mask` (the whole image without one) span 0..255, [lo, hi] used). Referenced to the hand alone, so that what
    lies outside it (a burned-in letter, a ruler, a cropped border, the film's own range) cannot change the hand's
    grey levels, and a brightness offset or linear contrast change of the whole radiograph is undone inside it.
    `percentiles` empty or None, or a range under 2 grey levels: unchanged."""
    if not percentiles:
        return image, []
    px = image[mask] if mask is not None and mask.any() else image.ravel()
    step = max(1, px.size // 400_000)  # a sample is enough for two percentiles
    lo, hi = (float(v) for v in np.percentile(px[::step], [float(percentiles[0]), float(percentiles[1])]))
    if hi - lo < 2.0:
        return image, [lo, hi]
    lut = np.clip(np.round((np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return lut[image], [round(lo, 1), round(hi, 1)]


def equalise(image: np.ndarray, mask: np.ndarray | None, clip_limit: float = 2.0, tile_grid: int = 8,
             tile_px: float = 0.0) -> np.ndarray:
    """CLAHE inside the hand: the background is set to the hand's median first so it does not
    take part in the tiles' histograms, then set to 0 again. Tiles: a `tile_grid` x `tile_grid` grid over the image,
    or with `tile_px` > 0 square tiles of that size from the top left corner (the image padded with the fill to whole
    tiles, then cropped back), so that the hand is equalised over the same neighbourhoods whatever the canvas around
    it (a cropped film's is smaller, a rotated film's larger)."""
    h, w = image.shape[:2]
    has_mask = mask is not None and mask.any()
    fill = np.uint8(np.median(image[mask])) if has_mask else np.uint8(np.median(image))
    tmp = np.where(mask, image, fill).astype(np.uint8) if has_mask else image
    grid = (int(tile_grid), int(tile_grid))
    if tile_px >= 8:
        t = int(round(tile_px))
        ny, nx = -(-h // t), -(-w // t)
        tmp = cv2.copyMakeBorder(tmp, 0, ny * t - h, 0, nx * t - w, cv2.BORDER_CONSTANT, value=int(fill))
        grid = (nx, ny)
    out = np.ascontiguousarray(cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=grid).apply(tmp)[:h, :w])
    if has_mask:
        out[~mask] = 0
    return out


def rotate_expanded(image: np.ndarray, angle: float,
                    interpolation: int = cv2.INTER_LINEAR) -> tuple[np.ndarray, np.ndarray]:
    """(image rotated by `angle` radians about its centre onto a canvas that keeps every pixel, the 2x3 matrix from
    input px to output px); the new corners are black."""
    h, w = image.shape[:2]
    c, sn = np.cos(angle), np.sin(angle)
    R = np.array([[c, -sn], [sn, c]])
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], float) @ R.T
    lo, hi = corners.min(0), corners.max(0)
    M = np.hstack([R, -lo[:, None]])
    size = (int(np.ceil(hi[0] - lo[0])), int(np.ceil(hi[1] - lo[1])))
    return cv2.warpAffine(image, M, size, flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0), M


def invert_affine(M: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix, as 2x3."""
    return np.linalg.inv(np.vstack([np.asarray(M, float), [0, 0, 1]]))[:2]


def axis_tilt(mask: np.ndarray) -> float:
    """Angle (radians, image coordinates, in (-pi/2, pi/2]) that turns the mask's long (principal) axis vertical;
    0 for an empty mask. The sign of the axis is unknown: turning by this angle + pi is just as upright."""
    ys, xs = np.nonzero(np.asarray(mask)[::4, ::4])
    if len(xs) < 10:
        return 0.0
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    evals, evecs = np.linalg.eigh(cov)
    v = evecs[:, int(np.argmax(evals))]
    a = -np.pi / 2 - np.arctan2(v[1], v[0])
    return float((a + np.pi / 2) % np.pi - np.pi / 2)


_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of additive pixel noise in grey levels (Immerkaer 1996: the mean absolute response
    to a Laplacian-difference kernel that cancels smooth image content), over unsaturated pixels, inside
    `mask` where one is given. Over the whole frame RSNA radiographs give 0.4-2.1 (they are JPEG-smoothed), inside
    the hand after the input stretch 1.3 median and 6.3 at most; added sigma-10 noise gives 10-30 there."""
    img = np.asarray(image)
    r = np.abs(cv2.filter2D(img.astype(np.float32), -1, _NOISE_KERNEL)[1:-1, 1:-1])
    inner = img[1:-1, 1:-1]
    keep = (inner > 5) & (inner < 250)
    if mask is not None and mask.shape == img.shape:
        km = keep & mask[1:-1, 1:-1]
        keep = km if km.sum() >= 1000 else keep
    if keep.sum() < 100:
        return 0.0
    return float(np.sqrt(np.pi / 2) / 6 * r[keep].mean())


def denoise(image: np.ndarray, mask: np.ndarray | None, above_sigma: float,
            strength: float) -> tuple[np.ndarray, float]:
    """(image, estimated noise sigma): non-local means with h = strength x sigma when the estimated noise is above
    `above_sigma` grey levels (else unchanged). CLAHE amplifies pixel noise, and noisy crops moved the bone age by
    18 months median in the stress test (issue 11); ordinary radiographs are below the threshold and untouched."""
    sigma = noise_sigma(image, mask)
    if above_sigma <= 0 or sigma <= above_sigma:
        return image, sigma
    return cv2.fastNlMeansDenoising(image, None, h=float(strength * sigma), templateWindowSize=7,
                                    searchWindowSize=21), sigma


def block_artefacts(image: np.ndarray, mask: np.ndarray | None = None, block: int = 8) -> float:
    """Mean grey-level step across the edges of a JPEG block grid, inside `mask` (the whole image without one): for
    each axis, the mean |difference| between neighbouring pixels in each of the `block` grid phases, the strongest
    phase less the median of the others, averaged over the two axes. Natural content and pixel noise have no phase
    of their own (rsna-half radiographs as read: 0.05-0.44 grey levels, 1.2 and 3.4 for two with a fine periodic
    pattern); heavy compression leaves flat blocks with steps between them (JPEG quality 30: 1.3-3.1). A film
    compressed and then resized has its grid at another period and is not seen."""
    f = np.asarray(image, np.float32)
    m = np.ones(f.shape, bool) if mask is None or not np.asarray(mask).any() else np.asarray(mask).astype(bool)
    steps = []
    for axis in (1, 0):
        d = np.abs(np.diff(f, axis=axis))
        both = (m[:, :-1] & m[:, 1:]) if axis == 1 else (m[:-1] & m[1:])
        other = 1 - axis
        total, count = (d * both).sum(axis=other), both.sum(axis=other).astype(np.float64)
        phase = np.arange(total.size) % block
        s, c = np.bincount(phase, total, block), np.bincount(phase, count, block)
        if (c < 100).any():
            continue
        mean = s / c
        k = int(np.argmax(mean))
        steps.append(float(mean[k] - np.median(np.delete(mean, k))))
    return float(np.mean(steps)) if steps else 0.0


def clean_radiograph(image: np.ndarray, mask: np.ndarray, cfg) -> tuple[np.ndarray, dict]:
    """Stage 2 on one radiograph: polarity corrected, hand only (black background), denoised when noisy, grey
    levels stretched by the hand's own percentiles (`cfg.hand_stretch`, `stretch_inside`), CLAHE inside.

    Returns the clean uint8 image (same size) and {inverted, kept_area_frac, flag, mask, hand_range (the [lo, hi]
    grey levels stretched to 0..255), noise_sigma, denoised, block_artefacts (`block_artefacts` after the stretch,
    clean grey levels), deblocked}. An empty
    or implausible mask never raises: the radiograph is kept whole (polarity corrected and
    equalised) and flagged.
    """
    flag = ""
    m = None if mask is None else (mask > 0)
    if m is not None and m.shape != image.shape:
        m = cv2.resize(m.astype(np.uint8) * 255, (image.shape[1], image.shape[0]),
                       interpolation=cv2.INTER_NEAREST) > 127
    # the hand-vs-surroundings comparison needs a plausible mask; otherwise the classical guess decides
    usable = m is not None and m.any() and mask_quality(m)[0] >= 0.5
    inverted = detect_inverted(image, m if usable else None)
    img = 255 - image if inverted else image
    scale = 0.0
    if m is None or not m.any():
        flag = "empty_mask"
    else:
        scale = hand_scale_px(m, float(getattr(cfg, "hand_scale_ratio", 0.0)))
        m = postprocess_mask(m, cfg.smooth_sigma_frac, getattr(cfg, "dilate_frac", 0.0), scale)
        frac = float(m.mean())
        if frac < cfg.min_area_frac:
            flag = f"mask_too_small:{frac:.3f}"
        elif frac > getattr(cfg, "max_area_frac", 0.95):
            flag = f"mask_too_large:{frac:.3f}"
        else:
            q, _ = mask_quality(m)
            if q < getattr(cfg, "min_quality", 0.25):
                flag = f"implausible_mask:q{q:.2f}"
    img, sigma = denoise(img, None if flag else m, getattr(cfg, "denoise_above_sigma", 0.0),
                         getattr(cfg, "denoise_strength", 1.0))
    final = np.ones(img.shape, bool) if flag else m
    inside = None if flag else interior(m, float(getattr(cfg, "stretch_erode_frac", 0.0)) * scale)
    img, hand_range = stretch_inside(img, inside, getattr(cfg, "hand_stretch", None))
    # JPEG block edges as the hand's stretch leaves them: a film whose hand spans 15-30 grey levels has them
    # multiplied 8-17 times (issue 11); the self-check refuses what they hide (predict.block_ok_levels)
    block = block_artefacts(img, inside)
    deblock = float(getattr(cfg, "deblock_above", 0.0))
    deblocked = deblock > 0 and block > deblock
    if deblocked:
        img = cv2.GaussianBlur(img, (0, 0), float(getattr(cfg, "deblock_sigma_px", 1.5)))
    tile_px = float(getattr(cfg, "clahe_tile_frac", 0.0)) * scale if not flag else 0.0
    out = equalise(img, None if flag else m, cfg.clahe_clip_limit, cfg.clahe_tile_grid, tile_px)
    info = {"inverted": bool(inverted), "kept_area_frac": float(final.mean()), "flag": flag, "mask": final,
            "hand_range": hand_range,
            "noise_sigma": round(sigma, 2), "denoised": bool(sigma > getattr(cfg, "denoise_above_sigma", 0.0) > 0),
            "block_artefacts": round(block, 2), "deblocked": bool(deblocked)}
    return out, info
