"""Synthetic inputs that are not a readable hand radiograph, for testing the self-check.

    images = make_negatives(size_px=256, seed=0)   # {name: uint8 image}

Every image is uint8, grey (H, W) except `photo` (H, W, 3, BGR as OpenCV writes it). The long side is
`size_px`. Built from the phantom generator (`boneage.phantom`) where a hand is involved, drawn by hand
otherwise:

- `blank`: an empty detector (flat dark grey with faint noise);
- `saturated`: an over-exposed, all-white frame with a faint gradient;
- `photo`: a colour "photograph": smooth random colour blobs with fine texture;
- `chest`: a chest radiograph drawing: body outline, two dark lung fields, rib arcs, spine, heart;
- `knee`: femur and tibia meeting at a joint inside a leg's soft tissue;
- `foot`: a foot outline with five short toes and metatarsal rays;
- `two_hands`: two phantom hands side by side on one film;
- `forearm`: a phantom with everything distal to the wrist removed (forearm only).
"""

from __future__ import annotations

import cv2
import numpy as np

from boneage.phantom import PhantomConfig, make_phantom

NAMES = ("blank", "saturated", "photo", "chest", "knee", "foot", "two_hands", "forearm")


def _portrait(size_px: int) -> tuple[int, int]:
    return int(size_px), int(round(size_px / 1.25))


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 4.0, blur: float = 1.0) -> np.ndarray:
    """Blur, add noise and convert a float image (0..255) to uint8."""
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), blur) if blur > 0 else img.astype(np.float32)
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _phantom_cfg(size_px: int) -> PhantomConfig:
    cfg = PhantomConfig()
    cfg.long_side_px = int(size_px)
    cfg.artefacts = False  # upright, centred, unmirrored: the parts are easy to cut out
    return cfg


def blank(size_px: int, rng: np.random.Generator) -> np.ndarray:
    h, w = _portrait(size_px)
    return _finish(np.full((h, w), 40.0), rng, noise=1.5)


def saturated(size_px: int, rng: np.random.Generator) -> np.ndarray:
    h, w = _portrait(size_px)
    ramp = np.linspace(0, 6, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
    return _finish(255.0 - ramp, rng, noise=1.0, blur=0)


def photo(size_px: int, rng: np.random.Generator) -> np.ndarray:
    """Colour 'photograph': low-frequency colour fields (sky, foliage-like) plus fine texture."""
    h, w = _portrait(size_px)
    out = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        coarse = rng.uniform(0, 255, (4, 4)).astype(np.float32)
        mid = rng.normal(0, 40, (16, 16)).astype(np.float32)
        out[..., c] = (cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
                       + cv2.resize(mid, (w, h), interpolation=cv2.INTER_CUBIC))
    # a warm object in the middle (a face, a fruit): strongly coloured
    cv2.ellipse(out, (w // 2, h // 2), (w // 5, h // 6), 0, 0, 360, (40.0, 120.0, 230.0), -1)
    out += rng.normal(0, 6, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def chest(size_px: int, rng: np.random.Generator) -> np.ndarray:
    """A PA chest drawing: bright body, dark lungs, rib arcs, spine and heart shadow."""
    h = w = int(size_px)
    img = np.full((h, w), 15.0, np.float32)
    cx = w // 2
    cv2.ellipse(img, (cx, int(0.62 * h)), (int(0.46 * w), int(0.55 * h)), 0, 0, 360, 150.0, -1)  # body
    for side in (-1, 1):  # lungs
        cv2.ellipse(img, (cx + side * int(0.19 * w), int(0.52 * h)), (int(0.15 * w), int(0.30 * h)), 0, 0, 360,
                    60.0, -1)
    for k in range(9):  # ribs: arcs over both lungs
        y = int(0.28 * h + k * 0.055 * h)
        for side in (-1, 1):
            cv2.ellipse(img, (cx + side * int(0.05 * w), y), (int(0.33 * w), int(0.09 * h)), 0,
                        200 if side < 0 else 270, 270 if side < 0 else 340, 175.0, max(2, h // 80))
    cv2.rectangle(img, (cx - int(0.035 * w), int(0.15 * h)), (cx + int(0.035 * w), h), 200.0, -1)  # spine
    cv2.ellipse(img, (cx + int(0.06 * w), int(0.66 * h)), (int(0.13 * w), int(0.12 * h)), 20, 0, 360, 170.0, -1)
    cv2.line(img, (int(0.15 * w), int(0.20 * h)), (int(0.45 * w), int(0.24 * h)), 190.0, max(2, h // 60))  # clavicles
    cv2.line(img, (int(0.85 * w), int(0.20 * h)), (int(0.55 * w), int(0.24 * h)), 190.0, max(2, h // 60))
    return _finish(img, rng, blur=max(1.0, size_px / 256))


def knee(size_px: int, rng: np.random.Generator) -> np.ndarray:
    """An AP knee: leg soft tissue, femur from the top and tibia/fibula from the bottom, a joint space."""
    h, w = _portrait(size_px)
    img = np.full((h, w), 10.0, np.float32)
    cx = w // 2
    cv2.rectangle(img, (cx - int(0.30 * w), 0), (cx + int(0.30 * w), h), 80.0, -1)  # soft tissue to both edges
    cv2.rectangle(img, (cx - int(0.10 * w), 0), (cx + int(0.10 * w), int(0.40 * h)), 190.0, -1)  # femur shaft
    cv2.ellipse(img, (cx, int(0.44 * h)), (int(0.20 * w), int(0.08 * h)), 0, 0, 360, 200.0, -1)  # condyles
    cv2.ellipse(img, (cx, int(0.57 * h)), (int(0.19 * w), int(0.05 * h)), 0, 0, 360, 200.0, -1)  # tibial plateau
    cv2.rectangle(img, (cx - int(0.09 * w), int(0.57 * h)), (cx + int(0.09 * w), h), 190.0, -1)  # tibia
    cv2.rectangle(img, (cx + int(0.14 * w), int(0.60 * h)), (cx + int(0.18 * w), h), 160.0, -1)  # fibula
    return _finish(img, rng, blur=max(1.0, size_px / 256))


def foot(size_px: int, rng: np.random.Generator) -> np.ndarray:
    """A DP foot: a long sole outline, five short toes, metatarsal rays and a heel."""
    h, w = _portrait(size_px)
    img = np.full((h, w), 12.0, np.float32)
    cx = w // 2
    cv2.ellipse(img, (cx, int(0.58 * h)), (int(0.24 * w), int(0.34 * h)), 0, 0, 360, 85.0, -1)  # sole
    toe_r = int(0.05 * w)
    for k, dx in enumerate((-0.16, -0.07, 0.02, 0.10, 0.17)):
        r = int(toe_r * (1.4 if k == 0 else 1.0))
        cv2.circle(img, (cx + int(dx * w), int(0.22 * h)), r, 85.0, -1)
        cv2.line(img, (cx + int(dx * w), int(0.24 * h)), (cx + int(dx * 0.6 * w), int(0.62 * h)), 180.0,
                 max(2, w // 40))
    cv2.ellipse(img, (cx, int(0.82 * h)), (int(0.13 * w), int(0.09 * h)), 0, 0, 360, 185.0, -1)  # calcaneus
    return _finish(img, rng, blur=max(1.0, size_px / 256))


def two_hands(size_px: int, rng: np.random.Generator, seed: int = 0) -> np.ndarray:
    """Two phantom hands side by side, the right one mirrored, on one film of the usual size."""
    cfg = _phantom_cfg(size_px)
    a = make_phantom(cfg, seed, 0).image
    b = make_phantom(cfg, seed, 1).image[:, ::-1]
    hh = min(a.shape[0], b.shape[0])
    both = np.concatenate([b[:hh], a[:hh]], axis=1)
    h, w = _portrait(size_px)
    s = min(h / both.shape[0], w / both.shape[1])
    small = cv2.resize(both, (max(1, round(both.shape[1] * s)), max(1, round(both.shape[0] * s))),
                       interpolation=cv2.INTER_AREA)
    out = np.full((h, w), int(np.median(both[:4])), np.uint8)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return out


def forearm(size_px: int, rng: np.random.Generator, seed: int = 0) -> np.ndarray:
    """A phantom cut just proximal to the carpus: the hand replaced by background (forearm only)."""
    s = make_phantom(_phantom_cfg(size_px), seed, 2)
    img = s.image.copy()
    cap_y = float(s.keypoints[2, 1])
    tip_y = float(s.keypoints[0, 1])
    cut = int(round(cap_y + 0.12 * abs(cap_y - tip_y)))  # just below the carpal bones
    bg = int(np.median(img[s.mask == 0])) if (s.mask == 0).any() else 0
    img[:max(cut, 0)] = bg
    return img


def make_negatives(size_px: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """{name: uint8 image} of every negative (see the module docstring), deterministic for a seed."""
    rng = np.random.default_rng([seed, 4711])
    out = {
        "blank": blank(size_px, rng),
        "saturated": saturated(size_px, rng),
        "photo": photo(size_px, rng),
        "chest": chest(size_px, rng),
        "knee": knee(size_px, rng),
        "foot": foot(size_px, rng),
        "two_hands": two_hands(size_px, rng, seed),
        "forearm": forearm(size_px, rng, seed),
    }
    assert tuple(out) == NAMES
    return out
