"""Single-radiograph assessment (boneage.assess) and src/predict.py, with stand-ins for the stage modules.

The stand-ins make the numbers known: each model predicts a fixed age, so the blend, the uncertainty,
the Z-score, the self-check and every refusal can be checked exactly. The real modules are tied
together by the lead's end-to-end run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from boneage import masks as real_masks
from boneage.assess import (
    LoadedModels,
    assess_image,
    assess_image_full,
    overall_quality,
    quality_parts,
    render_assessment_png,
)
from boneage.config import load_config
from boneage.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PREDS = {"reg_A_sex_input_vgg": (120.0, 2.0, None), "cls_C_sex_input_vgg": (130.0, 4.0, 6.0),
         "reg_B_female_vgg": (110.0, 1.0, None)}
BLEND = {"method": "nnls", "sexes": {
    "F": {"models": ["reg_A_sex_input_vgg", "cls_C_sex_input_vgg", "reg_B_female_vgg"],
          "coef": {"reg_A_sex_input_vgg": 0.5, "cls_C_sex_input_vgg": 0.3, "reg_B_female_vgg": 0.2},
          "intercept": 2.0},
    "M": {"models": ["reg_A_sex_input_vgg", "cls_C_sex_input_vgg"],
          "coef": {"reg_A_sex_input_vgg": 0.6, "cls_C_sex_input_vgg": 0.4}, "intercept": -1.0}}}


class Knobs:
    mask_quality = 0.9
    kp_conf = 0.95
    method = "keypoints"


@pytest.fixture
def fakes(monkeypatch):
    """Stand-in stage modules: the hand mask is the bright pixels; quality and confidence are knobs."""
    knobs = Knobs()
    seg = types.ModuleType("boneage.segmentation")
    seg.load_unet = lambda d, c, dev: "unet"
    seg.predict_mask = lambda model, image, c, dev: image > 60
    seg.predict_mask_and_raw = lambda model, image, c, dev: (image > 60, image > 60)
    masks = types.ModuleType("boneage.masks")
    masks.deep_gaps = real_masks.deep_gaps  # plain geometry, used by the self-check's shape part
    masks.detect_inverted = lambda image, m=None: False  # the phantoms' polarity is normal
    masks.polarity_from_mask = real_masks.polarity_from_mask  # plain image statistics

    def mask_quality(m, straight_tol_frac=None):
        knobs.straight_tol_frac = straight_tol_frac  # the self-check's own tolerance (predict.mask_straight_tol_frac)
        return knobs.mask_quality, "" if knobs.mask_quality >= 0.5 else "low_quality"

    masks.mask_quality = mask_quality
    masks.clean_radiograph = lambda image, m, c: (np.where(m, image, 0).astype(np.uint8),
                                                  {"inverted": False, "kept_area_frac": float(m.mean()), "flag": "",
                                                   "mask": m})
    kps = types.ModuleType("boneage.keypoints")
    kps.load_keypoint_model = lambda d, c, dev: None
    kps.predict_keypoints = lambda model, clean, m, c, dev: (np.array([[100.0, 30], [150, 120], [100, 200]]),
                                                              knobs.kp_conf, "model")
    reg = types.ModuleType("boneage.registration")
    reg.register_radiograph = lambda clean, pts, conf, m, c: (
        cv2.resize(clean, (160, 208)), {"method": knobs.method, "flag": "", "mirrored": False, "residual_px": 0.0})
    reg.crop_regions = lambda canvas, c: {"A": canvas, "B": canvas[130:, 40:120], "C": canvas[60:150]}
    reg.BASELINE_INPUTS = ("raw", "clean")  # no blend here reads them
    tr = types.ModuleType("boneage.training")

    class ModelSpec(types.SimpleNamespace):
        def __init__(self, name, region, head, sex_mode, backbone):
            super().__init__(name=name, region=region, head=head, sex_mode=sex_mode, backbone=backbone)

    tr.ModelSpec = ModelSpec
    tr.list_model_specs = lambda cfg: []
    tr.load_fold_models = lambda work, spec, cfg, dev: [spec.name]
    tr.predict_crop = lambda models, crop, male, spec, cfg, dev: dict(zip(("pred", "pred_std", "pred_width"),
                                                                          PREDS[spec.name]))
    for name, mod in (("segmentation", seg), ("masks", masks), ("keypoints", kps), ("registration", reg),
                      ("training", tr)):
        monkeypatch.setitem(sys.modules, f"boneage.{name}", mod)
    return knobs


def _models(blend=BLEND) -> LoadedModels:
    from boneage.blending import parse_model_name

    specs = {n: types.SimpleNamespace(**{k: getattr(parse_model_name(n), k)
                                         for k in ("name", "region", "head", "sex_mode", "backbone")}) for n in PREDS}
    return LoadedModels(Path("."), "cpu", "unet", None, specs, {n: [n] for n in PREDS}, blend,
                        Path("blend.json") if blend else None)


def hand_image() -> np.ndarray:
    """A palm with four fingers and a thumb (the self-check counts the gaps between fingers)."""
    img = np.full((256, 200), 20, np.uint8)
    cv2.ellipse(img, (100, 170), (55, 60), 0, 0, 360, 180, -1)
    for x in (62, 88, 114, 140):
        cv2.rectangle(img, (x - 8, 40), (x + 8, 150), 180, -1)
    cv2.line(img, (150, 190), (185, 130), 180, 16)
    return img


@pytest.fixture
def cfg():
    return load_config(None, ["register.canvas_scale=0.1"])


def test_assess_blends_known_predictions(fakes, cfg):
    r = assess_image(hand_image(), False, _models(), cfg, chronological_age_months=100.0, image_id="x1")
    assert r["status"] == "ok" and r["sex"] == "F" and r["id"] == "x1"
    assert r["bone_age_months"] == pytest.approx(2.0 + 0.5 * 120 + 0.3 * 130 + 0.2 * 110)  # 123.0
    parts = r["uncertainty_parts_months"]
    assert parts["fold_sd"] == pytest.approx(0.5 * 2 + 0.3 * 4 + 0.2 * 1)
    assert parts["width_sd"] == pytest.approx(6.0)
    mean = 0.5 * 120 + 0.3 * 130 + 0.2 * 110
    sd = np.sqrt(0.5 * (120 - mean) ** 2 + 0.3 * (130 - mean) ** 2 + 0.2 * (110 - mean) ** 2)
    assert parts["model_sd"] == pytest.approx(sd, abs=0.01)
    assert r["uncertainty_months"] == pytest.approx(np.sqrt(2.4 ** 2 + sd ** 2 + 36), abs=0.01)
    assert set(r["per_model"]) == set(PREDS) and r["per_model"]["cls_C_sex_input_vgg"]["width_months"] == 6.0
    assert r["per_region_months"] == {"A": 120.0, "B": 110.0, "C": 130.0}
    # GP: females 8 y (96 mo, SD 10.23) .. 9 y (108, 10.74): at 100 months 10.40
    assert r["difference_months"] == pytest.approx(23.0)
    assert r["gp_sd_months"] == pytest.approx(10.40, abs=0.005)
    assert r["z_score"] == pytest.approx(23.0 / 10.40, abs=0.01)
    assert r["interpretation"] == "advanced"
    qc = r["qc"]
    for key in ("mask_quality", "keypoint_confidence", "registration_method", "flags", "quality"):
        assert key in qc
    assert qc["registration_method"] == "keypoints" and qc["quality"] >= cfg.predict.min_quality
    assert fakes.straight_tol_frac == cfg.predict.mask_straight_tol_frac  # stricter than stage 1's
    json.dumps(r)


def test_male_uses_male_blend_and_no_blend_falls_back(fakes, cfg):
    r = assess_image(hand_image(), True, _models(), cfg)
    assert r["bone_age_months"] == pytest.approx(-1.0 + 0.6 * 120 + 0.4 * 130)
    assert "z_score" not in r and "reg_B_female_vgg" not in r["per_model"]
    r = assess_image(hand_image(), True, _models(blend=None), cfg)
    assert r["blend"]["kind"] == "equal-weight mean" and r["bone_age_months"] == pytest.approx(125.0)


def test_quality_parts_and_geometric_mean(cfg):
    p = quality_parts(0.9, 0.8, {"method": "keypoints", "residual_px": 0.0}, 0.0, cfg)
    assert p == {"mask": 0.9, "keypoints": 0.8, "registration": 1.0, "agreement": 1.0}
    assert overall_quality(p) == pytest.approx((0.9 * 0.8 * 1.0 * 1.0) ** 0.25)
    assert overall_quality({**p, "mask": 0.0}) == 0.0
    # registration fell back to the mask with confident points (off the mask, implausible): the points were not
    # used, the fallback is scored instead; a network that found no hand (confidence below register.min_confidence,
    # the fallback's own threshold) keeps its confidence as the keypoints part
    p = quality_parts(0.9, 0.5, {"method": "mask", "residual_px": float("nan")}, 0.0, cfg)
    assert p == {"mask": 0.9, "keypoints": 1.0, "registration": cfg.predict.mask_method_quality, "agreement": 1.0}
    assert quality_parts(0.9, 0.1, {"method": "mask", "residual_px": float("nan")}, 0.0, cfg)["keypoints"] == 0.1
    pc = cfg.predict
    canvas_h = cfg.register.canvas_h_px  # residual in full-size canvas pixels
    res = canvas_h * (pc.residual_ok_frac + pc.residual_scale_frac)
    p = quality_parts(1, 1, {"method": "keypoints", "residual_px": res}, pc.agreement_ok_months + 24, cfg)
    assert p["registration"] == pytest.approx(np.exp(-1)) and p["agreement"] == pytest.approx(np.exp(-1))
    p = quality_parts(1, 1, {"method": "keypoints", "residual_px": 0.5 * canvas_h * pc.residual_ok_frac},
                      pc.agreement_ok_months, cfg)
    assert p["registration"] == 1.0 and p["agreement"] == 1.0


def test_low_quality_rejected_unless_forced(fakes, cfg, tmp_path):
    fakes.mask_quality, fakes.kp_conf = 0.2, 0.3
    r, arrays = assess_image_full(hand_image(), False, _models(), cfg)
    assert render_assessment_png(r, arrays, tmp_path / "rejected.png").stat().st_size > 5000
    assert r["status"] == "rejected" and r["bone_age_months"] is None and r["uncertainty_months"] is None
    assert any("mask quality 0.20" in x for x in r["rejection_reasons"])
    assert any("keypoints quality 0.30" in x for x in r["rejection_reasons"])
    assert all(v["pred_months"] is None for v in r["per_model"].values())
    r = assess_image(hand_image(), False, _models(), cfg, chronological_age_months=100.0, force=True)
    assert r["status"] == "forced" and r["bone_age_months"] == pytest.approx(123.0)
    assert r["warning"].startswith("FORCED") and "z_score" in r


def test_no_hand_rejected_even_forced(fakes, cfg):
    r = assess_image(np.full((200, 160), 10, np.uint8), True, _models(), cfg, force=True)
    assert r["status"] == "rejected" and r["hard_reject"] and r["bone_age_months"] is None
    assert "no hand found" in r["rejection_reasons"][0]


# ----------------------------------------------------------------------------- the command line


def _predict():
    spec = importlib.util.spec_from_file_location("predict_cli", REPO / "src" / "predict.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dicom(path: Path, image: np.ndarray, sex: str = "F", body_part: str = "HAND") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientSex, ds.BodyPartExamined = "CR", sex, body_part
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = image.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture
def cli(fakes, monkeypatch, tmp_path):
    import boneage.assess

    monkeypatch.setattr(boneage.assess, "load_models", lambda d, cfg, dev, blend=None: _models())
    monkeypatch.setattr(boneage.assess, "warm_up", lambda models, cfg: None)
    mod = _predict()

    def run(*argv):
        return mod.main([*map(str, argv), "--out", str(tmp_path / "out"), "--set", "register.canvas_scale=0.1"])
    return run


def test_cli_png_writes_json_and_page(cli, tmp_path, capsys):
    img = tmp_path / "hand1.png"
    cv2.imwrite(str(img), hand_image())
    assert cli(img, "--sex", "F", "--chronological-age", "100") == 0
    r = json.loads((tmp_path / "out" / "hand1.json").read_text())
    assert r["bone_age_months"] == pytest.approx(123.0) and r["interpretation"] == "advanced"
    assert r["file"] == str(img)
    assert (tmp_path / "out" / "hand1.png").stat().st_size > 10000
    assert "bone age 123.0" in capsys.readouterr().out


def test_cli_dicom_sex_from_header(cli, tmp_path):
    p = _dicom(tmp_path / "d1.dcm", hand_image(), sex="M", body_part="HAND")
    assert cli(p) == 0
    r = json.loads((tmp_path / "out" / "d1.json").read_text())
    assert r["sex"] == "M" and r["bone_age_months"] == pytest.approx(-1.0 + 0.6 * 120 + 0.4 * 130)


@pytest.mark.parametrize("case", ["not_image", "chest_dicom", "no_sex", "no_sex_dicom", "no_hand", "missing"])
def test_cli_bad_inputs_name_the_file_and_give_no_number(cli, tmp_path, capsys, case):
    if case == "not_image":
        p = tmp_path / "notes.png"
        p.write_text("this is not an image")
        args, want, code = [p, "--sex", "F"], "cannot decode", 2
    elif case == "chest_dicom":
        p = _dicom(tmp_path / "chest.dcm", hand_image(), body_part="CHEST")
        args, want, code = [p], "another body part (BodyPartExamined 'CHEST')", 2
    elif case == "no_sex":
        p = tmp_path / "hand.jpg"
        cv2.imwrite(str(p), hand_image())
        args, want, code = [p], "sex unknown", 2
    elif case == "no_sex_dicom":
        p = _dicom(tmp_path / "nosex.dcm", hand_image(), sex="O")
        args, want, code = [p], "sex unknown", 2
    elif case == "no_hand":
        p = tmp_path / "blank.png"
        cv2.imwrite(str(p), np.full((200, 160), 10, np.uint8))
        args, want, code = [p, "--sex", "M", "--force"], "no hand found", 3
    else:
        p = tmp_path / "nowhere.png"
        args, want, code = [p, "--sex", "M"], "not found", 2
    assert cli(*args) == code
    err = capsys.readouterr()
    assert str(p) in err.err and want in err.err
    assert "bone age" not in err.out
    out = tmp_path / "out" / f"{p.stem}.json"
    if out.exists():
        assert json.loads(out.read_text())["bone_age_months"] is None


def test_cli_folder_mixed(cli, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), hand_image())
    (d / "b.jpg").write_bytes(b"\xff\xd8 broken")
    (d / "readme.txt").write_text("ignored")
    assert cli(d, "--sex", "F") == 2
    assert json.loads((tmp_path / "out" / "a.json").read_text())["status"] == "ok"
    assert json.loads((tmp_path / "out" / "b.json").read_text())["status"] == "error"
    assert not (tmp_path / "out" / "readme.json").exists()


def test_regions_part_calibrated_on_the_blends_out_of_fold_spread(fakes, cfg):
    """The spread between the region estimates (F: A 120, B 110, C 130 -> 20 months) is scored against the
    quantiles of the same spread over the out-of-fold rows that stage 7 stored in blend.json: part 1 up to the
    0.9 quantile, 0.5 at the 0.995 quantile. Without them, the fixed months of the config (24 / 36) apply."""
    import copy
    import math

    def with_ref(q90, q995):
        b = copy.deepcopy(BLEND)
        b["sexes"]["F"]["region_spread_oof_quantiles"] = {"0.5": 2.0, "0.9": q90, "0.995": q995}
        return _models(b)

    r = assess_image(hand_image(), False, _models(), cfg)
    assert r["qc"]["region_spread_months"] == pytest.approx(20.0) and r["qc"]["quality_parts"]["regions"] == 1.0
    assert r["qc"]["region_spread_ok_scale_months"] == [24.0, 36.0]
    tight = assess_image(hand_image(), False, with_ref(5.0, 16.0), cfg)  # 20 months is beyond this blend's 99.5 %
    assert tight["qc"]["quality_parts"]["regions"] == pytest.approx(math.exp(-15 * math.log(2) / 11), abs=1e-3)
    assert tight["status"] == "rejected" and any("regions" in x for x in tight["rejection_reasons"])
    loose = assess_image(hand_image(), False, with_ref(5.0, 40.0), cfg)
    assert loose["status"] == "ok"
    assert loose["qc"]["quality_parts"]["regions"] == pytest.approx(math.exp(-15 * math.log(2) / 35), abs=1e-3)
    fixed = load_config(None, ["register.canvas_scale=0.1", "predict.region_spread_calibrated=false"])
    assert assess_image(hand_image(), False, with_ref(5.0, 16.0), fixed)["qc"]["quality_parts"]["regions"] == 1.0
    bad = load_config(None, ["register.canvas_scale=0.1", "predict.region_spread_half_quantile=0.97"])
    with pytest.raises(ConfigError, match="region_spread"):
        assess_image(hand_image(), False, with_ref(5.0, 16.0), bad)
