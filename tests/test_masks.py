"""Classical masks, quality, post-processing, polarity and stage-2 cleaning on constructed shapes."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from boneage.config import CleanConfig
from boneage.masks import (
    classical_mask,
    clean_radiograph,
    detect_inverted,
    equalise,
    exposed_field,
    fill_holes,
    mask_quality,
    postprocess_mask,
    refine_edges,
    shape_features,
    shed_tray,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RSNA = REPO_ROOT.parent / "shared" / "data" / "rsna-half"


def hand_mask(h: int = 320, w: int = 256) -> np.ndarray:
    """A hand-like silhouette: forearm from the bottom edge, palm, four fingers and a thumb."""
    m = np.zeros((h, w), np.uint8)
    cv2.rectangle(m, (100, 230), (160, h - 1), 1, -1)  # forearm, cut by the bottom edge
    cv2.ellipse(m, (130, 190), (55, 50), 0, 0, 360, 1, -1)  # palm
    for x, top in ((88, 60), (116, 40), (144, 45), (170, 75)):  # fingers
        cv2.rectangle(m, (x - 8, top), (x + 8, 170), 1, -1)
        cv2.circle(m, (x, top), 8, 1, -1)
    cv2.line(m, (80, 200), (40, 130), 1, 16)  # thumb
    return m > 0


def radiograph(mask: np.ndarray, seed: int = 0, letters: bool = True, band: bool = True) -> np.ndarray:
    """Dark background, soft tissue, bright 'bones' inside, noise; a burned-in letter and a bright band."""
    rng = np.random.default_rng(seed)
    img = np.full(mask.shape, 30.0)
    img[mask] = 110.0
    inner = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    bones = np.zeros(mask.shape, np.uint8)
    for x in (88, 116, 144, 170):
        cv2.line(bones, (x, 70), (x, 230), 1, 4)
    cv2.line(bones, (120, 230), (120, 319), 1, 8)
    img[(bones > 0) & inner] = 190.0
    img += rng.normal(0, 4, mask.shape)
    if letters:
        text = np.zeros(mask.shape, np.uint8)  # OpenCV 5 draws text on 8-bit images only
        cv2.putText(text, "L", (200, 300), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 3)
        cv2.putText(text, "R2", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
        img[text > 0] = 235.0
    if band:
        img[:, -10:] = 250.0  # unexposed film outside the collimation
    return np.clip(img, 0, 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_straight_edges_at_the_self_checks_tolerance_are_ruler_straight_sides_not_a_hands_kinked_sides():
    """A finger side running into the palm's side is one line straight within 3 px as long as the film (rsna-half
    5916, 14175: right masks that the self-check scored 0); straight within 1.5 px (the self-check's
    `predict.mask_straight_tol_frac`) it is four pieces, none long enough to count. The other sides lie on the image
    border, which never counts. Stage 1 keeps 3 px (`STRAIGHT_TOL_FRAC`)."""
    from boneage.config import PredictConfig

    tol = PredictConfig().mask_straight_tol_frac
    kinked = np.zeros((256, 256), np.uint8)
    side = [[40, 0], [43, 64], [40, 128], [43, 192], [40, 255]]  # kinks of 3 px, every quarter of the side
    cv2.fillPoly(kinked, [np.array(side + [[255, 255], [255, 0]], np.int32)], 1)
    assert shape_features(kinked > 0, tol)["straight"] == 0.0
    assert shape_features(kinked > 0)["straight"] > 0.95  # stage 1's looser rule counts it
    field = np.zeros((256, 256), np.uint8)
    cv2.fillPoly(field, [np.array([[40, 0], [40, 255], [255, 255], [255, 0]], np.int32)], 1)
    assert shape_features(field > 0, tol)["straight"] > 0.95  # a collimation field's inner side counts whole


def test_quality_hand_vs_implausible_shapes():
    q, flag = mask_quality(hand_mask())
    assert q > 0.8 and flag == ""
    assert mask_quality(np.zeros((100, 80), bool)) == (0.0, "empty")
    rect = np.zeros((320, 256), bool)
    rect[20:300, 20:236] = True  # a collimation field, not a hand
    q_rect, flag_rect = mask_quality(rect)
    assert q_rect < 0.3 and flag_rect.startswith("low_quality")
    everything = np.ones((320, 256), bool)
    q_all, flag_all = mask_quality(everything)
    assert q_all < 0.3 and flag_all
    blob = np.zeros((320, 256), bool)
    cv2.circle(blob.view(np.uint8), (128, 160), 5, 1, -1)
    assert mask_quality(blob)[0] < 0.3


def test_fill_holes_and_postprocess_drops_letters_and_bands():
    hand = hand_mask()
    noisy = hand.copy()
    noisy[180:190, 120:135] = False  # a hole in the palm
    letter = np.zeros_like(hand, np.uint8)
    cv2.putText(letter, "L", (200, 300), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1, 3)
    noisy |= letter > 0
    noisy[:, -10:] = True  # a bright collimation band segmented with the hand
    assert fill_holes(noisy)[185, 127]
    out = postprocess_mask(noisy, smooth_sigma_frac=0.004)
    assert iou(out, hand) > 0.97
    assert not (out & (letter > 0)).any()
    assert not out[:, -10:].any()
    assert out[185, 127]


def test_postprocess_empty_and_smoothing_keep_shape():
    assert not postprocess_mask(np.zeros((50, 40), bool)).any()
    jag = hand_mask()
    rng = np.random.default_rng(1)
    edge = (cv2.dilate(jag.astype(np.uint8), np.ones((3, 3))) > 0) & ~jag
    jag = jag | (edge & (rng.random(jag.shape) < 0.5))
    smooth = postprocess_mask(jag, smooth_sigma_frac=0.006)
    assert iou(smooth, hand_mask()) > 0.95


def test_classical_mask_on_synthetic_radiograph():
    hand = hand_mask()
    img = radiograph(hand)
    m, q, flag = classical_mask(img)
    assert m.shape == img.shape and m.dtype == bool
    assert iou(m, hand) > 0.93, iou(m, hand)
    assert q > 0.6 and flag == ""
    letter = np.zeros_like(hand, np.uint8)
    cv2.putText(letter, "L", (200, 300), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1, 3)
    assert not (m & (letter > 0)).any()  # burned-in letters stay outside
    assert not m[:, -10:].any()  # the bright band too
    # an inverted radiograph is segmented as well
    m_inv, _, _ = classical_mask(255 - img)
    assert iou(m_inv, hand) > 0.9


def test_detect_inverted_synthetic():
    hand = hand_mask()
    img = radiograph(hand)
    assert not detect_inverted(img)
    assert detect_inverted(255 - img)
    assert not detect_inverted(img, hand)
    assert detect_inverted(255 - img, hand)
    plain = radiograph(hand, letters=False, band=False)
    assert not detect_inverted(plain) and detect_inverted(255 - plain)


def test_detect_inverted_real_radiographs():
    if not RSNA.exists():
        pytest.skip(f"real radiographs not found at {RSNA}")
    for sid in ("1377", "1563", "1604", "1829"):
        img = cv2.imread(str(RSNA / "images" / f"{sid}.jpg"), cv2.IMREAD_GRAYSCALE)
        assert not detect_inverted(img), sid
        assert detect_inverted(255 - img), sid


def test_clean_radiograph_black_background_and_inversion():
    hand = hand_mask()
    img = radiograph(hand)
    cfg = CleanConfig()
    noisy = hand.copy()
    cv2.putText(noisy.view(np.uint8), "L", (200, 300), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1, 3)
    clean, info = clean_radiograph(img, noisy, cfg)
    assert clean.shape == img.shape and clean.dtype == np.uint8
    assert info["flag"] == "" and info["inverted"] is False
    assert (clean[~info["mask"]] == 0).all()
    assert iou(info["mask"], hand) > 0.97
    assert abs(info["kept_area_frac"] - hand.mean()) < 0.01
    assert clean[info["mask"]].std() > img[hand].std()  # contrast equalised inside the hand
    clean_inv, info_inv = clean_radiograph(255 - img, noisy, cfg)
    assert info_inv["inverted"] is True
    assert np.abs(clean_inv.astype(int) - clean.astype(int)).mean() < 3.0


def test_clean_radiograph_empty_or_implausible_mask_never_crashes():
    hand = hand_mask()
    img = radiograph(hand)
    cfg = CleanConfig()
    for bad in (None, np.zeros(img.shape, bool), np.pad(np.ones((3, 3), bool), ((0, 317), (0, 253)))):
        clean, info = clean_radiograph(img, bad, cfg)
        assert clean.shape == img.shape
        assert info["flag"] != ""
        assert info["kept_area_frac"] == 1.0 and info["mask"].all()
    field = np.zeros(img.shape, bool)
    field[20:300, 20:236] = True  # a mask that swallowed the collimation field
    clean, info = clean_radiograph(img, field, cfg)
    assert info["flag"].startswith("implausible_mask") and info["mask"].all()
    clean, info = clean_radiograph(255 - img, None, cfg)
    assert info["inverted"] is True and info["flag"] == "empty_mask"
    assert clean.mean() < 128  # turned right: dark background


def test_equalise_inside_only():
    hand = hand_mask()
    img = radiograph(hand)
    out = equalise(img, hand, 2.0, 8)
    assert (out[~hand] == 0).all()
    assert out[hand].mean() > 0


def test_exposed_field_removes_tilted_bright_bands_and_nothing_else():
    truth = hand_mask()
    img = radiograph(truth, band=False).astype(np.float32)
    h, w = truth.shape
    yy, xx = np.mgrid[:h, :w]
    left = xx < 18 + 0.05 * yy  # a band tilted by about 3 degrees
    top = yy < 12
    img[left | top] = 245.0
    field = exposed_field(np.clip(img, 0, 255).astype(np.uint8))
    assert (~field[left | top]).mean() > 0.97  # the bands are out of the field ...
    assert field[~(left | top)].mean() > 0.99  # ... and nothing else, the forearm at the bottom edge included
    assert field[truth & ~(left | top)].all()
    assert exposed_field(radiograph(truth, band=False)).all()  # no band: the whole image


@pytest.mark.parametrize("inverted", [False, True])
def test_refine_edges_moves_a_too_wide_border_onto_the_soft_tissue(inverted):
    truth = hand_mask()
    img = radiograph(truth, letters=False, band=False)
    if inverted:
        img = 255 - img
    wide = cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0  # off by 4 px, like an upsampled mask
    assert iou(wide, truth) < 0.85
    assert iou(refine_edges(img, wide, band_px=6), truth) > 0.95
    flat = np.full(truth.shape, 100, np.uint8)  # no edge to find: the mask is left as it was
    assert (refine_edges(flat, wide, band_px=6) == wide).all()


def test_refine_edges_carves_filled_webs_between_fingers_but_not_the_hand():
    truth = hand_mask()
    img = radiograph(truth, letters=False, band=False)
    webbed = truth.copy()
    webbed[60:171, 80:179] = True  # the gaps between the fingers filled down to the palm, up to 110 px deep
    assert iou(webbed, truth) < 0.9
    band_only = refine_edges(img, webbed, band_px=4)
    carved = refine_edges(img, webbed, band_px=4, carve_frac=0.2)
    assert iou(band_only, truth) < 0.92  # the band cannot reach the webs' depth ...
    assert iou(carved, truth) > 0.95 and iou(carved, truth) > iou(band_only, truth) + 0.04  # ... the carve does
    dark = img.copy()
    dark[200:320] = np.minimum(dark[200:320], 35)  # wrist and forearm at the background's level (a cast, a heel)
    kept = refine_edges(dark, webbed, band_px=4, carve_frac=0.2)
    assert kept[230:320][truth[230:320]].mean() > 0.8  # carving the forearm away is refused ...
    assert (kept == refine_edges(dark, webbed, band_px=4)).all()  # ... the band's refinement stands


def test_prob_to_masks_clips_bands_and_refines_at_full_size():
    from boneage.config import load_config
    from boneage.segmentation import prob_to_masks, to_work

    hand = hand_mask()
    img = radiograph(hand, letters=False, band=False)
    band = np.zeros(hand.shape, bool)
    band[-14:] = True  # a bright band across the bottom, joined to the hand through the forearm
    img[band] = 250
    truth = hand & ~band  # outside the exposed field is not hand
    wi = to_work(img, 64)
    nh, nw = wi.inner
    prob = np.zeros((64, 64), np.float32)
    prob[:nh, :nw] = cv2.resize((hand | band).astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
    plain = load_config(None, ["segment.dilate_frac=0", "segment.clip_bright_bands=false",
                               "segment.refine_edge_work_px=0"]).segment
    fixed = load_config(None, ["segment.dilate_frac=0.01", "segment.clip_bright_bands=true",
                               "segment.refine_edge_work_px=1.5"]).segment
    before = prob_to_masks(prob, wi.inner, wi.size, plain, img)[1]
    raw, after = prob_to_masks(prob, wi.inner, wi.size, fixed, img)
    assert before[-10:].mean() > 0.5  # the band joined the hand
    assert not after[-12:].any()
    assert iou(after, truth) > iou(before, truth) + 0.05 and iou(after, truth) > 0.93
    assert raw[-10:].mean() > 0.5  # the raw mask (for the self-check) is what the network said


def tray_film(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small hand X-rayed in a tray (rsna-half 1422): (radiograph, true hand mask, a network mask that took in the
    tray's left half and the rims along its top and bottom, the way the U-Net does on such films)."""
    h, w, y0, x0 = 420, 360, 40, 52
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 30.0)
    img[20:400, 20:340] = 55.0  # the tray, a little brighter than the film around it
    cv2.rectangle(img, (20, 20), (340, 400), 160.0, 3)  # its rim
    truth = np.zeros((h, w), bool)
    hand = hand_mask()
    truth[y0:y0 + 320, x0:x0 + 256] = hand
    img[truth] = radiograph(hand, seed, letters=False, band=False)[hand]
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    swallowed = truth.copy()
    swallowed[18:402, 18:150] = True  # the tray's left half ...
    swallowed[18:32, 18:342] = True  # ... and its rims
    swallowed[388:402, 18:342] = True
    return img, truth, swallowed


def test_shed_tray_cuts_a_mask_back_to_the_hand_in_its_tray():
    img, truth, swallowed = tray_film()
    assert iou(swallowed, truth) < 0.6 and mask_quality(swallowed)[0] < 0.9
    cut = shed_tray(img, swallowed)
    assert cut is not None and iou(cut, truth) > 0.85 and (cut & truth).sum() > 0.97 * truth.sum()
    near = cv2.dilate(truth.astype(np.uint8), np.ones((17, 17), np.uint8)) > 0  # the margin: 1.5 % of 420 px
    assert not (cut & ~near).any()  # nothing left farther from the hand than the margin
    assert not cut[18:32, 160:342].any()  # the rim is gone
    hull = cv2.convexHull(np.argwhere(truth)[:, ::-1].astype(np.int32))
    blob = cv2.dilate(cv2.fillConvexPoly(np.zeros(truth.shape, np.uint8), hull, 1), np.ones((19, 19), np.uint8)) > 0
    assert mask_quality(blob)[0] < 0.9  # a mitten into the tray, no straight side (1402 in predict.py's stretch)
    cut = shed_tray(img, blob)  # the webs narrower than twice the margin stay (stage 1's carve takes them first)
    assert cut is not None and not (cut & ~near).any() and (cut & truth).sum() > 0.97 * truth.sum()
    assert iou(cut, truth) > iou(blob, truth) + 0.1
    assert shed_tray(img, truth) is None  # a hand-like mask is left alone
    assert shed_tray(img, np.zeros_like(truth)) is None
    flat = np.full(img.shape, 30, np.uint8)  # nothing for the classical guess to find: the mask stays as it was
    assert shed_tray(flat, swallowed) is None


def test_prob_to_masks_sheds_the_tray_unless_switched_off():
    from boneage.config import load_config
    from boneage.segmentation import prob_to_masks, to_work

    img, truth, swallowed = tray_film(1)
    wi = to_work(img, 128)
    nh, nw = wi.inner
    prob = np.zeros((128, 128), np.float32)
    prob[:nh, :nw] = cv2.resize(swallowed.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
    on = prob_to_masks(prob, wi.inner, wi.size, load_config(None, []).segment, img)[1]
    off = prob_to_masks(prob, wi.inner, wi.size, load_config(None, ["segment.tray_fallback=false"]).segment, img)[1]
    assert iou(off, truth) < 0.7
    assert iou(on, truth) > 0.85


def test_hand_scale_is_the_hands_length_not_the_canvas():
    from boneage.masks import hand_length, hand_scale_px

    hand = hand_mask()
    padded = np.pad(hand, ((0, 300), (0, 200)))  # the same hand on a larger canvas (a rotated film's)
    assert hand_scale_px(hand, 1.16) == pytest.approx(1.16 * hand_length(hand))
    assert hand_scale_px(padded, 1.16) == pytest.approx(hand_scale_px(hand, 1.16), rel=0.01)
    assert hand_scale_px(hand, 0.0) == 320 and hand_scale_px(padded, 0.0) == 620  # 0: the long side, as before
    assert hand_scale_px(np.zeros((50, 40), bool), 1.16) == 50  # no hand: the long side


@pytest.mark.parametrize("ratio, at_least", [(1.16, 0.985), (0.0, None)])
def test_prob_to_masks_gives_a_hand_on_a_larger_canvas_the_same_mask(ratio, at_least):
    """Stage 1's smoothing, dilation and edge band were shares of the image's long side: the same hand on a canvas
    twice as long (a film rotated onto a larger one, or a wider field) got a mask dilated twice as far (issue 11's
    rotation stress: IoU 0.90 between a film's mask and its rotated copy's). As shares of the hand's length it gets
    the same mask."""
    from boneage.config import load_config
    from boneage.segmentation import prob_to_masks, to_work

    hand = hand_mask()
    img = radiograph(hand, letters=False, band=False)
    big = np.pad(img, ((0, 320), (0, 200)), constant_values=30)
    cfg = load_config(None, [f"segment.hand_scale_ratio={ratio}", "segment.dilate_frac=0.02",
                             "segment.refine_edge_work_px=1.5"]).segment
    masks = []
    for film, truth in ((img, hand), (big, np.pad(hand, ((0, 320), (0, 200))))):
        wi = to_work(film, 1024)  # fine enough for either film's network outline to be the true one
        nh, nw = wi.inner
        prob = np.zeros((1024, 1024), np.float32)
        prob[:nh, :nw] = cv2.GaussianBlur(cv2.resize(truth.astype(np.float32), (nw, nh)), (0, 0), 2)
        masks.append(prob_to_masks(prob, wi.inner, wi.size, cfg, film)[1][:320, :256])
    same = iou(masks[0], masks[1])
    if at_least is not None:
        assert same >= at_least
    else:  # the long side's shares: the larger canvas's mask is visibly wider
        assert same < 0.96 and masks[1].sum() > masks[0].sum()


def test_shed_tray_keeps_a_hand_whose_fingers_the_network_parted(monkeypatch):
    """A cropped film's forearm runs into its edge, which lowers the mask's quality as a tray's straight rim does; a
    classical guess that lost the fingers must not replace such a mask (rsna-half 1938 cropped by 5 %: the cut
    moved the bone age 22 months)."""
    from boneage import masks

    truth = hand_mask()
    img = radiograph(truth, 0, letters=False, band=False)
    palm = truth.copy()
    palm[:175] = False  # the fingers lost: a palm and a forearm
    assert masks.finger_gaps(truth) >= 4 and masks.finger_gaps(palm) <= 2
    wide = cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    monkeypatch.setattr(masks, "mask_quality", lambda m, *a: (0.5 if m.sum() > palm.sum() else 0.99, ""))
    monkeypatch.setattr(masks, "classical_mask", lambda image, *a: (palm, 0.99, ""))
    assert masks.shed_tray(img, wide) is None  # the cut would lose every finger gap
    hull = cv2.convexHull(np.argwhere(truth)[:, ::-1].astype(np.int32))
    blob = cv2.fillConvexPoly(np.zeros(truth.shape, np.uint8), hull, 1) > 0  # a mitten: no gaps to lose
    assert masks.finger_gaps(blob) == 0
    monkeypatch.setattr(masks, "classical_mask", lambda image, *a: (truth, 0.99, ""))
    cut = masks.shed_tray(img, blob)
    assert cut is not None and iou(cut, truth) > iou(blob, truth) + 0.05  # a tray-like mitten is still cut
