"""Fingertip extension of predicted masks (`masks.fingertips`, `masks.extend_fingertips`) on constructed shapes."""

import cv2
import numpy as np
import pytest

from boneage.masks import extend_fingertips, fingertips, hand_length

FINGER_TIPS = [(88, 52), (116, 32), (144, 37), (170, 67)]  # top of each finger's round end
THUMB_TIP = (34, 122)


def hand_mask(h: int = 320, w: int = 256) -> np.ndarray:
    """A hand-like silhouette: forearm from the bottom edge, palm, four fingers and a thumb (as in test_masks)."""
    m = np.zeros((h, w), np.uint8)
    cv2.rectangle(m, (100, 230), (160, h - 1), 1, -1)
    cv2.ellipse(m, (130, 190), (55, 50), 0, 0, 360, 1, -1)
    for x, top in ((88, 60), (116, 40), (144, 45), (170, 75)):
        cv2.rectangle(m, (x - 8, top), (x + 8, 170), 1, -1)
        cv2.circle(m, (x, top), 8, 1, -1)
    cv2.line(m, (80, 200), (40, 130), 1, 16)
    return m > 0


def cut_fingertips(mask: np.ndarray, depth: int) -> np.ndarray:
    """The mask with the top `depth` px of each of the four fingers removed (a network that stopped short)."""
    m = mask.copy()
    for x, top in FINGER_TIPS:
        m[: top + depth, x - 12: x + 13] = False
    return m


def radiograph(mask: np.ndarray, tissue: float, background: float = 40.0, noise: float = 3.0, seed: int = 0,
               inverted: bool = False) -> np.ndarray:
    """Background, faint soft tissue (`tissue` grey level), brighter bones, a slow exposure gradient, noise."""
    rng = np.random.default_rng(seed)
    h, w = mask.shape
    img = np.full(mask.shape, background) + np.linspace(0, 12, w)[None, :]  # heel effect across the film
    img[mask] += tissue - background
    inner = cv2.erode(mask.astype(np.uint8), np.ones((11, 11), np.uint8)) > 0
    bones = np.zeros(mask.shape, np.uint8)
    for x in (88, 116, 144, 170):
        cv2.line(bones, (x, 75), (x, 230), 1, 5)
    img[(bones > 0) & inner] += 70.0
    img = cv2.GaussianBlur(img, (0, 0), 1.0) + rng.normal(0, noise, mask.shape)
    img = np.clip(img, 0, 255)
    return (255 - img if inverted else img).astype(np.uint8)


def near(points: np.ndarray, xy: tuple[int, int], r: float) -> bool:
    return bool(len(points)) and bool((np.hypot(points[:, 0] - xy[0], points[:, 1] - xy[1]) <= r).any())


def test_fingertips_are_the_extremities_not_the_forearm_cut_by_the_border():
    m = hand_mask()
    tips = fingertips(m)
    assert len(tips) == 5
    for xy in FINGER_TIPS + [THUMB_TIP]:
        assert near(tips, xy, 8), xy
    assert (tips[:, 1] < 200).all()  # nothing at the forearm's corners on the bottom edge
    assert 250 < hand_length(m) < 320
    # a finger the mask cut short is still an extremity, at its new end
    short = cut_fingertips(m, 25)
    assert near(fingertips(short), (116, 57), 8)
    # rotation: the same tips, rotated
    rot = cv2.rotate(m.astype(np.uint8), cv2.ROTATE_90_CLOCKWISE) > 0
    rt = fingertips(rot)
    assert len(rt) == 5 and near(rt, (320 - 1 - 32, 116), 8)
    assert len(fingertips(np.zeros((64, 64), bool))) == 0


@pytest.mark.parametrize("inverted", [False, True])
def test_extend_fingertips_recovers_faint_tips_and_stays_in_the_hand(inverted):
    truth = hand_mask()
    img = radiograph(truth, tissue=52.0, inverted=inverted)  # soft tissue 12 grey levels above the background
    short = cut_fingertips(truth, 8)
    tip_region = truth & ~short
    assert tip_region.sum() > 300
    out = extend_fingertips(img, short, max_frac=0.04, k_noise=3.0, margin_px=0)
    assert (out & tip_region).sum() / tip_region.sum() > 0.85  # the cut tips are back ...
    assert (out & ~truth).sum() < 0.25 * tip_region.sum()  # ... with little beyond the soft tissue
    assert (out >= short).all()  # nothing is taken away
    for x, y in FINGER_TIPS:
        assert out[y + 2, x]


def test_extend_fingertips_limits_and_no_ops():
    truth = hand_mask()
    img = radiograph(truth, tissue=52.0)
    short = cut_fingertips(truth, 25)
    grow = round(0.02 * hand_length(short))
    out = extend_fingertips(img, short, max_frac=0.02, k_noise=3.0, margin_px=0)
    d = cv2.distanceTransform((~short).astype(np.uint8), cv2.DIST_L2, 5)
    assert d[out].max() <= grow + 1  # never further than the growth limit
    assert (out & ~short).sum() > 0
    # no contrast at all (flat film): nothing grows; the margin alone dilates only around the tips
    flat = np.full(truth.shape, 90, np.uint8)
    assert (extend_fingertips(flat, truth, 0.04, 3.0, margin_px=0) == truth).all()
    wide = extend_fingertips(flat, truth, 0.04, 3.0, margin_px=3)
    added = wide & ~truth
    assert added.any() and not added[230:].any()  # the forearm and wrist are left alone
    for x, y in FINGER_TIPS:
        assert wide[y - 2, x] and not truth[y - 2, x]  # the 3 px margin beyond each tip
    # empty mask, switched off
    empty = np.zeros(truth.shape, bool)
    assert not extend_fingertips(img, empty).any()
    assert (extend_fingertips(img, short, max_frac=0.0, margin_px=0) == short).all()


def test_extend_fingertips_does_not_swallow_a_bright_field_beside_the_palm():
    truth = hand_mask()
    img = radiograph(truth, tissue=80.0).astype(np.float32)
    field = np.zeros(truth.shape, bool)
    field[150:, 165:] = True  # a bright collimation field touching the palm's side, away from the fingertips
    field &= ~truth
    img[field] = 200.0
    img = img.astype(np.uint8)
    out = extend_fingertips(img, truth, max_frac=0.05, k_noise=3.0, margin_px=0)
    assert (out & field).sum() < 0.02 * field.sum()


def test_prob_to_masks_extends_fingertips_only_when_configured():
    from boneage.config import load_config
    from boneage.segmentation import prob_to_masks, to_work

    truth = hand_mask()
    img = radiograph(truth, tissue=52.0)
    short = cut_fingertips(truth, 8)
    wi = to_work(img, 64)
    nh, nw = wi.inner
    prob = np.zeros((64, 64), np.float32)
    prob[:nh, :nw] = cv2.resize(short.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
    base = ["segment.dilate_frac=0", "segment.clip_bright_bands=false", "segment.refine_edge_work_px=0"]
    off = load_config(None, base + ["segment.fingertip_grow_frac=0", "segment.fingertip_margin_frac=0"]).segment
    on = load_config(None, base + ["segment.fingertip_grow_frac=0.04", "segment.fingertip_margin_frac=0"]).segment
    before = prob_to_masks(prob, wi.inner, wi.size, off, img)[1]
    after = prob_to_masks(prob, wi.inner, wi.size, on, img)[1]
    tip_region = truth & ~short
    assert (after & tip_region).sum() > (before & tip_region).sum() + 0.4 * tip_region.sum()
    assert (prob_to_masks(prob, wi.inner, wi.size, on, None)[1] == before).all()  # no radiograph: nothing to grow into
