"""Stage 4 maths: similarity from constructed point sets (mirrored, rotated 90/180 degrees), the
mask fallback, region crops; on phantoms: mirror detection and crops that contain their bones."""

import math

import cv2
import numpy as np
import pytest

from boneage.config import load_config
from boneage.errors import ConfigError
from boneage.registration import (
    baseline_crops,
    canvas_size,
    canvas_targets,
    check_baseline_inputs,
    check_points,
    crop_regions,
    hand_length_stats,
    input_hw,
    is_mirrored,
    mask_alignment,
    region_box,
    register_radiograph,
    similarity_from_points,
    transform_points,
)

# an upright left hand in PA view (image coordinates, y down): thumb on the image's right
LEFT = np.array([[400.0, 100.0], [640.0, 520.0], [410.0, 800.0]])


def rcfg(scale=0.25, **kw):
    return load_config(None, [f"register.canvas_scale={scale}"] + [f"register.{k}={v}" for k, v in kw.items()]).register


def rotate(points, deg, centre=(500.0, 500.0)):
    M = cv2.getRotationMatrix2D(centre, deg, 1.0)
    return transform_points(M, points)


def mirror(points, width=1000.0):
    p = np.asarray(points, float).copy()
    p[:, 0] = width - p[:, 0]
    return p


def test_canvas_targets_scale():
    c = rcfg(1.0)
    assert canvas_size(c) == (2080, 1600)
    tip, cap = canvas_targets(c)
    np.testing.assert_allclose(tip, [800, 100])
    np.testing.assert_allclose(cap, [800, 1600])
    c = rcfg(0.25)
    assert canvas_size(c) == (520, 400)
    np.testing.assert_allclose(canvas_targets(c)[1], [200, 400])


@pytest.mark.parametrize("deg", [0, 90, 180, -90, 33])
@pytest.mark.parametrize("flip", [False, True])
def test_similarity_maps_tip_and_capitate_home(deg, flip):
    c = rcfg(0.5)
    pts = rotate(mirror(LEFT) if flip else LEFT, deg)
    M, info = similarity_from_points(pts, c)
    q = transform_points(M, pts)
    tip, cap = canvas_targets(c)
    np.testing.assert_allclose(q[0], tip, atol=1e-6)
    np.testing.assert_allclose(q[2], cap, atol=1e-6)
    assert info["mirrored"] is flip
    # the thumb always ends up on the canvas' right: every registered hand looks like a left hand
    assert q[1][0] > tip[0] + 50
    # uniform zoom: tip-capitate 700 px -> 1500 full-canvas px * 0.5
    assert info["scale"] == pytest.approx(750 / math.hypot(*(LEFT[0] - LEFT[2])), rel=1e-9)
    # determinant sign tells the flip
    assert bool(np.linalg.det(M[:, :2]) < 0) is flip
    # the rotation read off the matrix differs from the unrotated case's by the constructed angle
    _, info0 = similarity_from_points(mirror(LEFT) if flip else LEFT, c)
    diff = (info["angle_deg"] - info0["angle_deg"]) % 360
    assert min(abs(diff - deg % 360), abs(diff - (-deg) % 360), 360 - abs(diff - deg % 360)) < 1e-6, diff
    assert info["tx"] == M[0, 2] and info["ty"] == M[1, 2]


def test_is_mirrored_convention_and_missing_thumb():
    assert is_mirrored(LEFT) is False
    assert is_mirrored(mirror(LEFT)) is True
    assert is_mirrored(rotate(LEFT, 180)) is False  # upside down is a rotation, not a flip
    p = LEFT.copy()
    p[1] = np.nan
    assert is_mirrored(p) is None


def test_residual_is_zero_at_the_typical_thumb_position():
    c = rcfg(1.0)
    M, _ = similarity_from_points(LEFT, c)
    thumb_canvas = transform_points(M, LEFT[1])[0]
    c2 = rcfg(1.0, thumb_canvas_xy=f"[{thumb_canvas[0]},{thumb_canvas[1]}]")
    _, info = similarity_from_points(LEFT, c2)
    assert info["residual_px"] == pytest.approx(0.0, abs=1e-6)
    _, info = similarity_from_points(rotate(mirror(LEFT), 90), c2)
    assert info["residual_px"] == pytest.approx(0.0, abs=1e-6)


def hand_mask(h=1000, w=800, fingers_up=True):
    """A crude hand: forearm to the bottom edge, palm, four fingers up, a thumb to the right."""
    m = np.zeros((h, w), np.uint8)
    cv2.rectangle(m, (300, 700), (500, h - 1), 255, -1)  # forearm
    cv2.ellipse(m, (400, 560), (170, 190), 0, 0, 360, 255, -1)  # palm
    for k, x in enumerate((270, 350, 430, 510)):
        top = (200, 120, 160, 240)[k]
        cv2.rectangle(m, (x - 25, top), (x + 25, 500), 255, -1)
        cv2.circle(m, (x, top), 25, 255, -1)
    cv2.line(m, (540, 600), (680, 420), 255, 55)  # thumb
    if not fingers_up:
        m = m[::-1].copy()
    return m


def test_mask_alignment_puts_fingers_up():
    c = rcfg(0.25)
    for up in (True, False):
        m = hand_mask(fingers_up=up)
        M, info = mask_alignment(m, c)
        canvas = cv2.warpAffine(m, M, (canvas_size(c)[1], canvas_size(c)[0]))
        ys, xs = np.nonzero(canvas)
        H = canvas.shape[0]
        # the fingers (thin, at the top) and the forearm (at the bottom)
        assert ys.min() < 0.15 * H
        top_rows = canvas[: H // 3] > 0
        assert top_rows.sum() < (canvas[H // 3:] > 0).sum()
        # flipping the image upside down is a reflection: the fallback must undo it with a mirror
        assert info["mirrored"] is (not up)
        # the thumb (the extra mass beside the palm) ends on the canvas' right, as for a left hand
        mid = canvas[H // 3: 2 * H // 3] > 0
        cols = np.nonzero(mid)[1]
        forearm_centre = np.median(np.nonzero(canvas[int(0.9 * H):] > 0)[1])
        assert (cols > forearm_centre).sum() > (cols < forearm_centre).sum()


def test_register_falls_back_to_the_mask_and_flags(tmp_path):
    c = rcfg(0.25)
    m = hand_mask()
    img = np.where(m > 0, 180, 0).astype(np.uint8)
    good = np.array([[350.0, 120.0], [680.0, 420.0], [400.0, 640.0]])
    canvas, row = register_radiograph(img, good, 0.9, m, c)
    assert row["method"] == "keypoints" and canvas.shape == canvas_size(c)
    cases = {
        "missing_points": np.array([[np.nan, np.nan], [680.0, 420.0], [400.0, 640.0]]),
        "thumb_implausible": np.array([[350.0, 120.0], [352.0, 300.0], [400.0, 640.0]]),  # on the axis
        "thumb_beyond_tip": np.array([[350.0, 120.0], [400.0, 30.0], [400.0, 640.0]]),
        "point_off_hand": np.array([[350.0, 120.0], [720.0, 640.0], [400.0, 640.0]]),
    }
    for why, pts in cases.items():
        canvas, row = register_radiograph(img, pts, 0.9, m, c)
        assert row["method"] == "mask", why
        assert row["flag"].startswith("fallback:") and why in row["flag"], (why, row["flag"])
        assert canvas.shape == canvas_size(c) and canvas.any()
    canvas, row = register_radiograph(img, good, 0.05, m, c)
    assert row["method"] == "mask" and "low_confidence" in row["flag"]
    # hand length far outside the data set's spread
    stats = {"median_px": 2000.0, "log_sd": 0.1}
    canvas, row = register_radiograph(img, good, 0.9, m, c, stats)
    assert row["method"] == "mask" and "hand_length_z" in row["flag"]
    # points a person marked are not vetoed by a mask that misses part of the hand; they still get the
    # anatomical checks, and their mirror decision is the points' (a right hand, thumb on the image's left)
    off = cases["point_off_hand"]
    canvas, row = register_radiograph(img, off, 0.9, m, c, manual=True)
    assert row["method"] == "keypoints" and "fallback" not in row["flag"] and row["mirrored"] is False
    right = off.copy()
    right[1, 0] = 2 * 350.0 - 720.0
    canvas, row = register_radiograph(img, right, 0.9, m, c, manual=True)
    assert row["method"] == "keypoints" and row["mirrored"] is True
    canvas, row = register_radiograph(img, cases["thumb_beyond_tip"], 0.9, m, c, manual=True)
    assert row["method"] == "mask" and "thumb_beyond_tip" in row["flag"]
    # no mask at all: the whole image, still a canvas and a row
    canvas, row = register_radiograph(img, None, 0.0, np.zeros_like(m), c)
    assert row["method"] == "mask" and "no_mask" in row["flag"] and canvas.shape == canvas_size(c)


def test_hand_length_stats_and_check_points():
    pts = np.stack([LEFT * s for s in np.linspace(0.8, 1.2, 20)])
    st = hand_length_stats(pts)
    assert st["median_px"] == pytest.approx(math.hypot(*(LEFT[0] - LEFT[2])), rel=0.02)
    assert check_points(LEFT, 0.9, None, rcfg(), st) == ""
    assert check_points(LEFT * 3, 0.9, None, rcfg(), st).startswith("hand_length_z")
    # the short side is more lenient: an infant's hand is far shorter than the median, not wrong
    log_sd = st["log_sd"]
    small = LEFT * math.exp(-5.0 * log_sd)  # z = -5: above the long side's limit of 4, within the short side's
    assert check_points(LEFT * math.exp(5.0 * log_sd), 0.9, None, rcfg(), st).startswith("hand_length_z")
    assert check_points(small, 0.9, None, rcfg(), st) == ""
    assert check_points(LEFT * math.exp(-8.0 * log_sd), 0.9, None, rcfg(), st).startswith("hand_length_z")
    assert hand_length_stats(pts[:3]) is None


def test_crop_regions_sizes_and_content():
    c = rcfg(0.25)
    H, W = canvas_size(c)
    canvas = np.zeros((H, W), np.uint8)
    x0, y0, x1, y1 = region_box(c, "B")
    canvas[y0:y1, x0:x1] = 200
    crops = crop_regions(canvas, c)
    assert set(crops) == {"A", "B", "C"}
    for k, (h, w) in c.crop_sizes.items():
        assert crops[k].shape == (h, w)
    assert crops["B"].min() == 200  # B is exactly the bright box
    assert 0 < crops["A"].mean() < 200


def test_ablation_inputs_keep_the_whole_radiograph_and_its_aspect():
    c = rcfg(0.25)
    c.baseline_inputs = ["raw", "clean"]
    check_baseline_inputs(c)
    assert input_hw(c, "raw") == tuple(c.crop_sizes["A"])  # same size as region A unless named
    raw = np.full((300, 100), 255, np.uint8)  # a tall, narrow radiograph: black bands left and right
    clean = np.zeros((100, 300), np.uint8)  # a wide one: black bands above and below
    clean[40:60, :] = 200
    out = baseline_crops(raw, clean, c)
    assert set(out) == {"raw", "clean"}
    h, w = c.crop_sizes["A"]
    assert out["raw"].shape == out["clean"].shape == (h, w)
    cols = np.flatnonzero(out["raw"].mean(0) > 128)
    assert (cols[-1] - cols[0] + 1) / h == pytest.approx(100 / 300, abs=0.03)  # aspect kept, centred
    assert abs((cols[0] + cols[-1]) / 2 - (w - 1) / 2) <= 1
    rows = np.flatnonzero(out["clean"].mean(1) > 100)
    assert (rows[-1] - rows[0] + 1) / w == pytest.approx(20 / 300, abs=0.03)
    c.baseline_inputs = ["registered"]
    with pytest.raises(ConfigError, match="baseline_inputs"):
        check_baseline_inputs(c)


def test_default_regions_hold_the_reference_landmarks():
    c = rcfg(1.0)
    x0, y0, x1, y1 = c.regions["B"]
    assert y0 < 1450 < 1600 < 1900 < y1 and x0 < 800 < x1  # MC bases, capitate, radius/ulna epiphyses
    x0, y0, x1, y1 = c.regions["C"]
    assert y0 <= 650 and 1450 <= y1  # PIP joints to MC bases


# ------------------------------------------------------------------------------------- phantoms
def _phantom_mod():
    ph = pytest.importorskip("boneage.phantom")
    if not hasattr(ph, "make_phantom"):
        pytest.skip("boneage.phantom.make_phantom not available yet")
    return ph


def test_phantom_mirror_detection_and_crops_contain_bones():
    ph = _phantom_mod()
    from boneage.keypoints import geometric_keypoints

    pcfg = ph.PhantomConfig(long_side_px=256, p_mirror=0.3)
    c = rcfg(0.25)
    boxes = {k: region_box(c, k) for k in ("B", "C")}
    wanted = {"B": ["capitate", "hamate", "lunate", "radius_epiphysis", "ulna_epiphysis"],
              "C": ["MC2", "MC3", "MC4", "MC5", "PP2", "PP3", "PP4", "PP5"]}
    n_mirrored = wrong = 0
    for i in range(30):
        s = ph.make_phantom(pcfg, 123, i)
        truth = bool(s.params["mirrored"])
        n_mirrored += truth
        assert is_mirrored(s.keypoints[:, :2]) is truth  # the convention matches the generator's
        pts, conf = geometric_keypoints(s.mask)
        wrong += is_mirrored(pts) is not truth
        M, info = similarity_from_points(s.keypoints[:, :2], c)
        assert info["mirrored"] is truth
        for region, names in wanted.items():
            x0, y0, x1, y1 = boxes[region]
            for n in names:
                centre = s.params["bone_centres"].get(n)
                if centre is None:
                    continue
                q = transform_points(M, np.asarray(centre, float))[0]
                assert x0 <= q[0] <= x1 and y0 <= q[1] <= y1, (i, region, n, q / c.canvas_scale)
    assert n_mirrored >= 3
    assert wrong == 0
