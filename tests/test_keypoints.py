"""Stage 3: partial-annotation loss, geometric bootstrap, the VGG regressor, augmentation that moves
the points, the stage script end to end on phantoms (smoke profile), phantom keypoint accuracy."""

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from boneage import keypoints as K
from boneage.config import load_config
from boneage.keypoints import (
    INPUT_VIEW,
    augmenter,
    build_model,
    combine_model_geometric,
    fit_geometric_proportions,
    geometric_keypoints,
    load_keypoint_model,
    masked_mse,
    points_plausible,
    predict_keypoints,
    save_model,
    snap_to_mask,
    to_square,
    train_model,
)

REPO = Path(__file__).resolve().parents[1]


def kcfg(**kw):
    return load_config(None, [f"keypoints.{k}={v}" for k, v in kw.items()]).keypoints


def hand_mask(h=1000, w=800):
    """Forearm to the bottom edge, palm, four fingers up (middle the longest), a thumb to the right."""
    m = np.zeros((h, w), np.uint8)
    cv2.rectangle(m, (300, 700), (500, h - 1), 255, -1)
    cv2.ellipse(m, (400, 560), (170, 190), 0, 0, 360, 255, -1)
    for k, x in enumerate((270, 350, 430, 510)):
        top = (230, 160, 120, 180)[k]  # little, ring, middle, index: the thumb is on the right
        cv2.rectangle(m, (x - 25, top), (x + 25, 500), 255, -1)
        cv2.circle(m, (x, top), 25, 255, -1)
    cv2.line(m, (540, 620), (690, 430), 255, 55)
    cv2.circle(m, (690, 430), 27, 255, -1)
    return m


MIDDLE_SOFT_TIP = np.array([430.0, 95.0])
THUMB_SOFT_TIP = np.array([707.0, 409.0])


# ---------------------------------------------------------------------------------------- loss
def test_masked_mse_ignores_missing_points():
    pred = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], requires_grad=True)
    target = torch.tensor([[0.1, 0.2, float("nan"), float("nan"), 0.0, 0.0]])
    vis = torch.tensor([[True, False, True]])
    loss = masked_mse(pred, target, vis)
    # only the middle tip (exact) and capitate (0.5, 0.6 off) count: (0.25 + 0.36) / 4 coordinates
    assert loss.item() == pytest.approx((0.25 + 0.36) / 4)
    loss.backward()
    assert pred.grad[0, 2].item() == 0.0 and pred.grad[0, 3].item() == 0.0  # the thumb gets no gradient
    assert pred.grad[0, 4].item() > 0
    # another value for the missing point changes nothing
    target2 = target.clone()
    target2[0, 2:4] = torch.tensor([5.0, -5.0])
    assert masked_mse(pred, target2, vis).item() == pytest.approx(loss.item())
    # a batch with no marked point: zero, not NaN
    none = masked_mse(pred, target, torch.zeros(1, 3, dtype=torch.bool))
    assert none.item() == 0.0 and torch.isfinite(none)


# ---------------------------------------------------------------------------------- geometric
@pytest.mark.parametrize("deg", [0, 90, 180, 270])
@pytest.mark.parametrize("flip", [False, True])
def test_geometric_keypoints_on_a_constructed_hand(deg, flip):
    m = hand_mask()
    truth = np.stack([MIDDLE_SOFT_TIP, THUMB_SOFT_TIP])
    if flip:
        m = m[:, ::-1].copy()
        truth[:, 0] = m.shape[1] - 1 - truth[:, 0]
    k = deg // 90
    for _ in range(k):  # rotate 90 degrees clockwise: (x, y) -> (h - 1 - y, x)
        h = m.shape[0]
        m = np.ascontiguousarray(np.rot90(m, -1))
        truth = np.stack([h - 1 - truth[:, 1], truth[:, 0]], 1)
    pts, conf = geometric_keypoints(m)
    L = 700.0
    assert np.hypot(*(pts[0] - truth[0])) < 0.06 * L, (pts[0], truth[0])
    assert np.hypot(*(pts[1] - truth[1])) < 0.06 * L, (pts[1], truth[1])
    assert conf > 0.5
    assert m[int(pts[2][1]), int(pts[2][0])] > 0  # the capitate lies on the hand


def test_geometric_keypoints_empty_and_fingerless():
    pts, conf = geometric_keypoints(np.zeros((200, 200), np.uint8))
    assert np.isnan(pts).all() and conf == 0.0
    blob = np.zeros((300, 300), np.uint8)
    cv2.circle(blob, (150, 150), 100, 255, -1)
    pts, conf = geometric_keypoints(blob)
    assert conf < 0.2


def test_fit_geometric_proportions_recovers_the_capitate():
    m = hand_mask()
    _, _, dbg = geometric_keypoints(m, 0.0, 0.0, 0.0, return_debug=True)
    u = (dbg["c"] - dbg["tip_raw"]) / dbg["L"]
    cap = dbg["c"] + u * 0.3 * dbg["L"]
    pts = np.stack([dbg["tip_raw"] + u * 0.02 * dbg["L"], [np.nan, np.nan], cap])
    props = fit_geometric_proportions([(m, pts)] * 5)
    assert props["capitate_along"] == pytest.approx(0.3, abs=1e-6)
    assert props["capitate_across"] == pytest.approx(0.0, abs=1e-6)
    assert props["tip_inset_frac"] == pytest.approx(0.02, abs=1e-6)
    assert fit_geometric_proportions([(m, pts)] * 2) is None


def test_points_plausible():
    good = np.array([[430.0, 120.0], [680.0, 420.0], [410.0, 640.0]])
    assert points_plausible(good)[0]
    assert points_plausible(good, hand_mask())[0]
    assert points_plausible(good[[2, 1, 0]], hand_mask())[1] == "wrong_order"  # tip and capitate swapped
    bad = good.copy()
    bad[1] = [np.nan, np.nan]
    assert points_plausible(bad)[1] == "missing_points"


def test_combine_prefers_agreeing_geometric_tips():
    m = hand_mask()
    geo, gconf = geometric_keypoints(m)
    model = geo + np.array([[3.0, 2.0], [-2.0, 1.0], [20.0, 0.0]])
    assert gconf > 0.5
    out, conf, src = combine_model_geometric(model, geo, gconf, m)
    np.testing.assert_allclose(out[:2], geo[:2])
    np.testing.assert_allclose(out[2], geo[2] + [10.0, 0.0])
    assert src == "geometric" and conf > 0.8
    # an implausible network answer with a confident geometric one: the geometric one
    junk = np.array([[10.0, 10.0], [12.0, 12.0], [11.0, 11.0]])
    out, conf, src = combine_model_geometric(junk, geo, gconf, m)
    assert src == "geometric"
    np.testing.assert_allclose(out, geo)


def test_network_points_just_off_the_mask_are_snapped_not_discarded():
    """Soft-tissue tips a little past the mask's edge (low-contrast films): the points are moved onto the
    hand and used with a middling confidence, instead of a confidence of 0.1 that sends the radiograph to the
    mask fallback; a point far off the hand still fails."""
    m = hand_mask()
    pts = np.array([MIDDLE_SOFT_TIP + [0.0, -20.0], THUMB_SOFT_TIP + [25.0, 0.0], [410.0, 640.0]])
    assert points_plausible(pts, m)[1] == "point_off_hand"
    snapped = snap_to_mask(pts, m, 0.1)
    assert snapped is not None and points_plausible(snapped, m)[0]
    for q in snapped:
        assert m[int(round(q[1])), int(round(q[0]))] > 0
    assert np.hypot(*(snapped[0] - [430.0, 95.0])) < 3  # the middle tip lands on the fingertip's top
    assert snapped[1][0] > 690  # the thumb tip stays at the thumb
    np.testing.assert_allclose(snapped[2], pts[2])  # a point on the hand is not moved
    no_geo = np.full((3, 2), np.nan)
    out, conf, src = combine_model_geometric(pts, no_geo, 0.0, m)
    np.testing.assert_allclose(out, snapped)
    assert src == "model" and 0.3 < conf < 0.6
    far = pts.copy()
    far[1] = [790.0, 40.0]  # ~50 % of the hand length from the mask
    assert snap_to_mask(far, m, 0.1) is None
    assert combine_model_geometric(far, no_geo, 0.0, m)[1] == pytest.approx(0.1)
    # a point outside the image is moved from the image's border
    edge = pts - [0.0, 60.0]  # the same hand with the image's top 60 rows cut: the middle tip 35 px from the top
    edge[0] = [430.0, -20.0]
    got = snap_to_mask(edge, m[60:], 0.1)
    assert got is not None and np.hypot(*(got[0] - [430.0, 35.0])) < 3


def _turn(points, centre, ang):
    """Points turned about `centre` so that their axis_upright_angle grows by `ang` (radians)."""
    c, s_ = math.cos(ang), math.sin(ang)
    d = np.asarray(points, float) - centre
    return centre + d @ np.array([[c, s_], [-s_, c]]).T


def fake_reader(truth, centre, reads_within_deg=20.0, upside_down=False):
    """A stand-in for the keypoint network turned by each angle: it reads the hand (the true points, off by a
    pixel) only in views within `reads_within_deg` of upright; elsewhere it answers an upright-looking layout
    that is not the hand and tilts with the view. With `upside_down` it also reads the hand turned 180 degrees,
    answering the mirror-free upside-down reading (tip and capitate swapped) there."""
    u = K.axis_upright_angle(truth)

    def read(model, image, mask, angles, cfg, device):
        out = []
        for a in angles:
            off = math.degrees(K._wrap(a - u))
            if abs(off) < reads_within_deg:
                out.append(truth + 1.0)
            elif upside_down and abs(abs(off) - 180.0) < reads_within_deg:
                out.append(truth[[2, 1, 0]] + 1.0)
            else:
                junk = np.array([[0.0, -250.0], [150.0, -50.0], [0.0, 120.0]]) + centre  # upright at angle 0
                out.append(_turn(junk, centre, K._wrap(a + math.radians(35.0))))
        return out
    return read


@pytest.mark.parametrize("turn_deg", [0.0, 45.0, 150.0, -100.0])
def test_consistent_view_points_finds_the_view_the_network_reads(monkeypatch, turn_deg):
    """A first answer that comes back on a second reading is kept; one that does not (the geometric axis
    turned the hand where the network cannot read it) is replaced by the reading of the view that comes back;
    an upside-down fixed point is refused by the mask's finger end; a network that reads nothing leaves the first."""
    m = np.zeros((1400, 1400), np.uint8)
    m[200:1000, 300:1100] = hand_mask(800, 800)  # room to turn: the forearm ends 200 px inside the image
    centre = np.array([700.0, 650.0])
    R = cv2.getRotationMatrix2D(tuple(centre), turn_deg, 1.0)
    m = cv2.warpAffine(m, R, (m.shape[1], m.shape[0]), flags=cv2.INTER_NEAREST)
    truth = np.array([[730.0, 320.0], [990.0, 630.0], [710.0, 840.0]]) @ R[:, :2].T + R[:, 2]
    cfg = kcfg()
    assert len(cfg.view_angles_deg) >= 8
    monkeypatch.setattr(K, "_read_turned", fake_reader(truth, centre, upside_down=True))
    pts, searched = K.consistent_view_points(None, m, m, truth + 1.0, cfg, "cpu")
    assert not searched and np.allclose(pts, truth + 1.0)
    junk = K._read_turned(None, m, m, [K.axis_upright_angle(truth) + 2.0], cfg, "cpu")[0]
    pts, searched = K.consistent_view_points(None, m, m, junk, cfg, "cpu")
    assert searched and np.abs(pts - truth).max() < 2.0
    assert K.fingers_behind(truth[[2, 1, 0]], m) and not K.fingers_behind(truth, m)
    monkeypatch.setattr(K, "_read_turned", fake_reader(truth, centre, reads_within_deg=0.0))
    pts, searched = K.consistent_view_points(None, m, m, junk, cfg, "cpu")
    assert not searched and np.allclose(pts, junk)
    assert K.consistent_view_points(None, m, m, junk, kcfg(view_angles_deg="[]"), "cpu") == (junk, False)


def test_second_readings_in_batches_match_one_by_one():
    """Stage 3 batches the fixed-point check's second readings; they equal reading each hand on its own."""
    cfg = kcfg(input_size_px=64, filters="[8, 8, 16]")
    net = build_model(cfg).eval()
    m = hand_mask()
    img = (m // 2).astype(np.uint8)
    firsts = [np.array([[430.0, 120.0], [690.0, 430.0], [410.0, 640.0]]) + d for d in (0.0, 15.0, -20.0)]
    firsts.append(np.full((3, 2), np.nan))  # no axis: no second reading
    got = K.second_readings(net, [img] * 4, [m] * 4, firsts, cfg, "cpu", batch=2)
    for f, g in zip(firsts[:3], got[:3]):
        one = K._read_turned(net, img, m, [K.axis_upright_angle(f)], cfg, "cpu")[0]
        np.testing.assert_allclose(g, one, atol=1e-3)
    assert got[3] is None
    assert K.second_readings(net, [img], [m], firsts[:1], kcfg(view_angles_deg="[]"), "cpu") == [None]


# ------------------------------------------------------------------------------------ network
def test_model_shapes_and_to_square():
    cfg = kcfg(input_size_px=64, filters="[8, 8, 16]")
    net = build_model(cfg).eval()
    y = net(torch.zeros(2, 1, 64, 64))
    assert y.shape == (2, 6) and (y >= 0).all() and (y <= 1).all()
    img = np.full((100, 50), 7, np.uint8)
    sq, s = to_square(img, 64)
    assert sq.shape == (64, 64) and s == pytest.approx(0.64)
    assert sq[:, 40:].max() == 0 and sq[10, 10] == 7  # padded right, not stretched


def test_augmentation_moves_points_with_the_image():
    cfg = kcfg(aug_rotate_deg=30, aug_zoom=0.2, aug_shift=0.1)
    aug = augmenter(cfg)
    img = np.zeros((128, 128), np.uint8)
    pts = np.array([[40.0, 30.0], [90.0, 70.0], [60.0, 100.0]], np.float32)
    for p in pts:
        cv2.circle(img, (int(p[0]), int(p[1])), 3, 255, -1)
    np.random.seed(0)
    moved = 0
    for _ in range(10):
        out = aug(image=img, keypoints=pts)
        kp = np.asarray(out["keypoints"], float).reshape(3, 2)
        moved += np.abs(kp - pts).max() > 1
        for p in kp:
            x, y = int(round(p[0])), int(round(p[1]))
            if 3 <= x < 125 and 3 <= y < 125:
                assert out["image"][y - 2:y + 3, x - 2:x + 3].max() > 100  # the dot is under the point
    assert moved >= 5


def test_training_shows_mirrored_hands_with_their_points(monkeypatch):
    """`keypoints.aug_hflip_p`: RSNA hands are nearly all left hands; the network also learns right hands, the
    thumb staying the thumb, so that a flipped film is registered mirrored back (issue 11's flip)."""
    img = np.zeros((64, 64), np.uint8)
    pts = np.array([[40.0, 8.0], [56.0, 30.0], [30.0, 50.0]], np.float32)
    for x, y in pts.astype(int):
        img[y, x] = 255
    flipped, fp = K.mirror_sample(img, pts)
    for (x, y) in fp.astype(int):
        assert flipped[y, x] == 255  # the dots moved with their points
    assert fp[1, 0] == pytest.approx(63 - 56) and np.array_equal(fp[:, 1], pts[:, 1])
    seen = []

    def recorder(cfg):
        return lambda image, keypoints: seen.append((image, np.asarray(keypoints))) or {"image": image,
                                                                                          "keypoints": keypoints}

    monkeypatch.setattr(K, "augmenter", recorder)
    for p_flip, want in ((1.0, 8), (0.0, 0)):
        seen.clear()
        cfg = kcfg(input_size_px=64, filters="[8, 8]", epochs=1, batch_size=4, fc_units=16, aug_hflip_p=p_flip)
        train_model([img] * 8, [pts] * 8, [np.ones(3, bool)] * 8, cfg, torch.device("cpu"))
        n_mirrored = sum(np.array_equal(im, flipped) and np.allclose(kp, fp) for im, kp in seen)
        assert len(seen) == 8 and n_mirrored == want


def test_train_save_load_predict(tmp_path):
    torch.manual_seed(0)
    cfg = kcfg(input_size_px=64, filters="[8, 8, 16]", epochs=2, batch_size=4, fc_units=32)
    m = hand_mask()
    sq, s = to_square(np.where(m > 0, 150, 0).astype(np.uint8), 64)
    geo, _ = geometric_keypoints(m)
    imgs = [sq] * 8
    pts = [geo * s] * 8
    vis = [np.array([True, True, i % 2 == 0]) for i in range(8)]  # partial labels train too
    model = train_model(imgs, pts, vis, cfg, torch.device("cpu"))
    assert load_keypoint_model(tmp_path / "none", cfg, "cpu") is None
    # a network trained on another input (before the upright framed views) is not used
    save_model(model, tmp_path / "old", {"geometric_proportions": {"capitate_along": 0.25}})
    assert load_keypoint_model(tmp_path / "old", cfg, "cpu") is None
    save_model(model, tmp_path / "kp", {"geometric_proportions": {"capitate_along": 0.25}, "input_view": INPUT_VIEW})
    loaded = load_keypoint_model(tmp_path / "kp", cfg, "cpu")
    assert loaded is not None and loaded.geometric_props == {"capitate_along": 0.25}
    img = np.where(m > 0, 150, 0).astype(np.uint8)
    p, conf, src = predict_keypoints(loaded, img, m > 0, cfg, "cpu")
    assert p.shape == (3, 2) and 0 <= conf <= 1 and src in ("model", "geometric")
    p0, conf0, src0 = predict_keypoints(None, img, m > 0, cfg, "cpu")
    assert src0 == "geometric" and conf0 > 0.5
    # a network with other filters does not load: None, not a crash
    assert load_keypoint_model(tmp_path / "kp", kcfg(input_size_px=64, filters="[4, 4]"), "cpu") is None


# ----------------------------------------------------------------------------------- phantoms
def _phantom_mod():
    ph = pytest.importorskip("boneage.phantom")
    if not hasattr(ph, "make_phantom"):
        pytest.skip("boneage.phantom.make_phantom not available yet")
    return ph


def test_phantom_geometric_keypoint_error():
    """Geometric points on phantom masks, proportions refitted on 10 'annotated' phantoms, measured
    on 30 others, in % of the phantom's hand length (middle tip to capitate)."""
    ph = _phantom_mod()
    pcfg = ph.PhantomConfig(long_side_px=384)
    train = [ph.make_phantom(pcfg, 7, i) for i in range(10)]
    props = fit_geometric_proportions([(s.mask, s.keypoints[:, :2]) for s in train])
    assert props is not None
    errs = []
    for i in range(100, 130):
        s = ph.make_phantom(pcfg, 7, i)
        pts, conf = geometric_keypoints(s.mask, props.get("tip_inset_frac"), props.get("capitate_along"),
                                        props.get("capitate_across"))
        kp = s.keypoints[:, :2]
        L = np.hypot(*(kp[0] - kp[2]))
        errs.append(np.hypot(*(pts - kp).T) / L * 100)
    med = np.nanmedian(np.array(errs), 0)
    assert med[0] < 1.5 and med[1] < 2.0 and med[2] < 3.0, med


# ------------------------------------------------------------------------------------- stages
def _phantom_input(root: Path, n_train=16, n_test=4, px=192, seed=5):
    ph = _phantom_mod()
    pcfg = ph.PhantomConfig(long_side_px=px)
    inp, work = root / "input", root / "work"
    for d in (inp / "boneage-training-dataset", inp / "boneage-test-dataset", work / "masks", work / "clean",
              inp / "annotations"):
        d.mkdir(parents=True, exist_ok=True)
    tr, te, ann = [], [], []
    truth = {}
    for k in range(n_train + n_test):
        s = ph.make_phantom(pcfg, seed, k)
        i = str(2000 + k)
        sub = "boneage-training-dataset" if k < n_train else "boneage-test-dataset"
        cv2.imwrite(str(inp / sub / f"{i}.png"), s.image)
        cv2.imwrite(str(work / "masks" / f"{i}.png"), s.mask)
        cv2.imwrite(str(work / "clean" / f"{i}.png"), np.where(s.mask > 0, s.image, 0).astype(np.uint8))
        male = s.sex in ("M", "male", True)
        truth[i] = s
        if k < n_train:
            tr.append((i, float(s.bone_age_months), male))
            if k % 3 == 0:
                kp = s.keypoints[:, :2].ravel().tolist()
                if k % 6 == 0:
                    kp[2:4] = [None, None]  # a partial annotation: thumb not marked
                ann.append([i, *kp])
        else:
            te.append((i, "M" if male else "F"))
    pd.DataFrame(tr, columns=["id", "boneage", "male"]).to_csv(inp / "boneage-training-dataset.csv", index=False)
    pd.DataFrame(te, columns=["Case ID", "Sex"]).to_csv(inp / "boneage-test-dataset.csv", index=False)
    cols = ["id", "middle_tip_x", "middle_tip_y", "thumb_tip_x", "thumb_tip_y", "capitate_x", "capitate_y"]
    pd.DataFrame(ann, columns=cols).to_csv(inp / "annotations" / "keypoints.csv", index=False)
    return truth


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _run(script, root, *extra):
    """Run a stage script's main in this process (saves the interpreter and torch start-up)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"stage_{script[:2]}", REPO / "src" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--config", str(REPO / "configs" / "smoke.yaml"), "--set", f"input_dir={root / 'input'}",
            "--set", f"work_dir={root / 'work'}", "--set", "keypoints.epochs=1",
            "--set", "keypoints.min_train_images=4", *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        from boneage.cli import run_stage

        code = run_stage(script[:-3], "test", mod.main, argv=argv)
    log = root / "work" / "logs" / f"{script[:-3]}.log"
    return _Result(code, err.getvalue() + (log.read_text() if log.exists() else ""))


def test_stages_3_and_4_end_to_end_on_phantoms(tmp_path):
    truth = _phantom_input(tmp_path)
    r = _run("03_keypoints.py", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "work"
    kp = pd.read_csv(work / "keypoints.csv", dtype={"id": str})
    assert list(kp.columns) == ["id", "middle_tip_x", "middle_tip_y", "thumb_tip_x", "thumb_tip_y", "capitate_x",
                                "capitate_y", "confidence", "source"]
    assert len(kp) == 20 and set(kp["source"]) <= {"manual", "model", "geometric"}
    assert (work / "models" / "keypoints" / "model.pt").exists()
    assert (work / "qc" / "03_keypoints.png").exists()
    row = kp[kp["id"] == "2003"].iloc[0]  # a complete manual annotation is kept as it is
    assert row["source"] == "manual" and row["confidence"] == 1.0
    np.testing.assert_allclose([row["middle_tip_x"], row["middle_tip_y"]], truth["2003"].keypoints[0, :2], atol=0.01)
    row = kp[kp["id"] == "2000"].iloc[0]  # partial: the thumb comes from a prediction, the rest stays manual
    assert np.isfinite(row["thumb_tip_x"])
    np.testing.assert_allclose([row["capitate_x"], row["capitate_y"]], truth["2000"].keypoints[2, :2], atol=0.01)

    r = _run("04_register.py", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    reg = pd.read_csv(work / "registration.csv", dtype={"id": str}, keep_default_na=False)
    assert list(reg.columns) == ["id", "scale", "angle_deg", "tx", "ty", "mirrored", "residual_px", "method", "flag"]
    assert len(reg) == 20 and set(reg["method"]) <= {"keypoints", "mask"}
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    h, w = round(2080 * cfg.register.canvas_scale), round(1600 * cfg.register.canvas_scale)
    for i in ("2000", "2019"):
        assert cv2.imread(str(work / "registered" / f"{i}.png"), 0).shape == (h, w)
        for name, (ch, cw) in cfg.register.crop_sizes.items():
            assert cv2.imread(str(work / "crops" / name / f"{i}.png"), 0).shape == (ch, cw)
    # the registered mirror decision matches the phantom's truth wherever keypoints were used
    for rec in reg.to_dict("records"):
        if rec["method"] == "keypoints":
            assert str(rec["mirrored"]) == str(bool(truth[rec["id"]].params["mirrored"])), rec
    assert (work / "qc" / "04_registered.png").exists()

    # resume: a second run keeps everything and is quick; a missing canvas is redone
    (work / "registered" / "2005.png").unlink()
    r = _run("04_register.py", tmp_path)
    assert r.returncode == 0 and (work / "registered" / "2005.png").exists()
    r = _run("03_keypoints.py", tmp_path)
    assert r.returncode == 0 and "already covers" in r.stderr


def test_stage_4_without_keypoints_is_a_clear_error(tmp_path):
    _phantom_input(tmp_path, n_train=4, n_test=1)
    r = _run("04_register.py", tmp_path)
    assert r.returncode == 2
    assert "keypoints.csv not found" in r.stderr and "Traceback" not in r.stderr


class _CentroidPlusBias(torch.nn.Module):
    """A stand-in keypoint network that is not mirror-symmetric: tip, thumb tip and capitate 20 px apart on a
    vertical line through the bright pixels' centroid, moved `bias` input px in x."""

    def __init__(self, bias: float):
        super().__init__()
        self.bias = bias

    def forward(self, x):
        n, _, h, w = x.shape
        wsum = x.sum((1, 2, 3)).clamp_min(1e-6)
        xs = (x * torch.arange(w, dtype=x.dtype)).sum((1, 2, 3)) / wsum + self.bias
        ys = (x * torch.arange(h, dtype=x.dtype)[:, None]).sum((1, 2, 3)) / wsum
        return torch.stack([xs, ys - 20, xs, ys, xs, ys + 20], 1) / w


def test_flip_average_reads_a_mirrored_view_as_the_mirror_of_the_view():
    from boneage.keypoints import FLIP_AGREE_FRAC, predict_batch

    img = np.zeros((64, 64), np.uint8)
    cv2.circle(img, (20, 30), 6, 255, -1)  # centroid at x = 20, y = 30
    mirrored = np.ascontiguousarray(img[:, ::-1])
    small = 0.4 * FLIP_AGREE_FRAC * 40  # the readings, 2 x bias apart, agree within FLIP_AGREE_FRAC of 40 px
    for flip in (False, True):
        p, q = predict_batch(_CentroidPlusBias(small), [img, mirrored], "cpu", flip_average=flip)
        assert np.allclose(p[:, 1], [10, 30, 50], atol=0.01) and np.allclose(q[:, 1], [10, 30, 50], atol=0.01)
        if flip:  # the bias cancels: the centroid itself, and exactly mirrored on the mirror image
            assert np.allclose(p[:, 0], 20.0, atol=0.01) and np.allclose(q[:, 0], 63 - p[:, 0], atol=1e-4)
        else:
            assert np.allclose(p[:, 0], 20 + small, atol=0.01) and np.allclose(q[:, 0], 63 - 20 + small, atol=0.01)
    # readings that disagree (a thumb on opposite sides) are not averaged: the direct one stays
    large = 2.0 * FLIP_AGREE_FRAC * 40
    p, _ = predict_batch(_CentroidPlusBias(large), [img, mirrored], "cpu", flip_average=True)
    assert np.allclose(p[:, 0], 20 + large, atol=0.01)


@pytest.mark.parametrize("shape", [(1000, 800), (333, 517)])
def test_the_view_and_the_geometric_points_of_a_mirrored_film_are_the_mirror_of_the_films(shape):
    """Pixel centre to pixel centre through every resize: a mirrored film must not come back shifted (before, the
    geometric points of a mirrored rsna-half film came back 2-3 px off, and its view up to a pixel)."""
    from boneage.keypoints import view_at_angle

    h, w = shape
    mask = cv2.resize(hand_mask().astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    rng = np.random.default_rng(0)
    img = np.where(mask, 150, 20).astype(np.uint8) + rng.integers(0, 60, mask.shape, dtype=np.uint8)
    m_img, m_mask = np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    geo, _ = geometric_keypoints(mask)
    geo_m, _ = geometric_keypoints(m_mask)
    assert np.abs(geo_m[:, 0] - (w - 1 - geo[:, 0])).max() < 0.3 and np.abs(geo_m[:, 1] - geo[:, 1]).max() < 0.3
    cfg = kcfg()
    sq, back = view_at_angle(img, mask, 0.0, cfg)
    sq_m, back_m = view_at_angle(m_img, m_mask, 0.0, cfg)
    assert np.abs(sq_m[:, ::-1].astype(int) - sq).max() <= 3  # rounding only: the noise is 60 grey levels
    p = np.array([[10.0, 20.0], [100.0, 50.0], [150.0, 180.0]])  # view px back to the film: mirrored exactly
    q = K.from_view(p, back)
    q_m = K.from_view(np.c_[cfg.input_size_px - 1 - p[:, 0], p[:, 1]], back_m)
    assert np.allclose(q_m[:, 0], w - 1 - q[:, 0], atol=1e-6) and np.allclose(q_m[:, 1], q[:, 1], atol=1e-6)
