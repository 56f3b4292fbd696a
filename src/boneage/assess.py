"""One radiograph through every stage with the trained models: bone age, uncertainty, self-check.

Used by `src/predict.py` and usable by a robustness bench:

    models = load_models(work_dir, cfg, device)          # once
    result = assess_image(image, male, models, cfg, chronological_age_months=None)

Where the trained models and the blend are found (`load_models(models_dir, ...)`):
- `models_dir` is a work dir holding `models/` (`models/unet/`, `models/keypoints/`, `models/{model}/fold{k}/`);
  default in predict.py: the config's `work_dir`.
- The blend: an explicit `blend_path`, else the first of `models_dir/blend.json`,
  `models_dir/submissions/blend.json`, `{cfg.submissions_dir}/blend.json`. So a folder to hand to another
  machine is a copy of `work/models/` plus `submissions/blend.json` put next to it. Without any blend.json
  the estimate is the equal-weight mean of the models and the result says so (`blend.kind`).

Input normalisation (`normalise_input`, `predict.normalise_input`): the radiograph is turned to normal polarity
and, for the U-Net, its grey levels stretched to span 0..255; the clean step then stretches the hand by its own
percentiles and equalises inside it, as stage 2 does, so that inversion, brightness and linear contrast changes
of the film, and whatever lies outside the hand, do not reach the bone age networks.

Self-check: `quality_score(qc, cfg) -> (score 0..1, reasons)`, reusable on any dict of the `qc` fields
below (stage 7 can call it on stored rows). Three layers:

1. Image checks before any network (`image_checks`): a colour photograph (Hasler-Suesstrunk colourfulness
   of the file above `predict.max_colourfulness`), a blank or saturated frame (grey levels spanning fewer than
   `predict.min_dynamic_range`, or more than `predict.max_saturated_frac` of the pixels at 0-5 or 250-255).
   These and "no hand found" (mask below `predict.min_hand_area_frac`) are hard rejections: no network
   result exists to show, so even `force` gives no number (`hard_reject`).
2. Mask checks on the U-Net's mask (`mask_checks`): two hand-sized objects (second largest component above
   `predict.max_second_object_ratio` of the largest: two hands, a hand beside another body part), fewer than
   `predict.min_finger_gaps` deep finger gaps in the hand's outline (forearm only, a blob), a hand that spans
   less than `predict.min_hand_span` of the image (a fragment: the mask found a piece of another body part),
   an implausibly elongated object (`predict.max_hand_aspect`), a convex elongated outline (solidity above
   `predict.max_convex_solidity` and aspect above `predict.max_convex_aspect`: a foot, or a mask without
   fingers). Each rejects (score 0) with its reason.
3. Soft parts, each 0..1, each 1 over the range a readable radiograph shows and decaying beyond it; the four
   core parts are combined by a geometric mean: mask quality (`boneage.masks.mask_quality`), keypoint
   confidence (only where registration used the keypoints; 1 when it fell back to the mask), registration
   (1 for keypoint registration, `predict.mask_method_quality` when it fell back to the mask, times
   exp(-(thumb residual - ok) / (full canvas height x `predict.residual_scale_frac`)), ok =
   `predict.residual_ok_frac` of the canvas height) and agreement exp(-(sd - `predict.agreement_ok_months`) /
   `predict.agreement_scale_months`) with sd the spread over folds and models. Where there are several regions
   / cls heads, two penalties multiply the mean: the spread between the regions' estimates, and the cls heads'
   distribution width relative to their median width on validation radiographs (`fold*/pred_val.csv`; in
   months when that is missing). Rejected when the score is below `predict.min_quality` or one part is below
   `predict.min_part_quality`. The defaults were set on rsna-half (bench/notes/robustness.md).

A rejected result has status `rejected`, the reasons and no bone age; with `force` the number is given with
status `forced` and a warning. `assess_image` also takes a colour (H, W, 3) array: its colourfulness is
measured, then it is turned to grey; `predict.py` passes the file's colourfulness because it reads grey.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from boneage.blending import blend_calibration, blend_uncertainty, parse_model_name, region_estimates
from boneage.errors import ConfigError, StageInputError
from boneage.gp import assess_against_gp

log = logging.getLogger(__name__)


def _mod(name: str):
    """The stage module `boneage.{name}`, imported when first needed (they pull in torch)."""
    return importlib.import_module(f"boneage.{name}")


@dataclass
class LoadedModels:
    """Everything a single-radiograph assessment needs, loaded once."""

    models_dir: Path
    device: object
    unet: object
    keypoint_model: object | None
    specs: dict[str, object]  # model name -> spec (.name .region .head .sex_mode .backbone)
    fold_models: dict[str, list]  # model name -> fold modules
    blend: dict | None = None  # blend.json contents
    blend_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    typical_cls_width: dict[str, float] = field(default_factory=dict)  # cls model -> median validation width


def typical_widths(models_dir: Path, names) -> dict[str, float]:
    """Median width (months) of each cls model's validation predictions (`fold*/pred_val.csv`, column
    `width`), where stage 6 wrote them: the self-check compares a radiograph's width with it."""
    import pandas as pd

    out = {}
    for n in names:
        if parse_model_name(n).head != "cls":
            continue
        widths = []
        for f in sorted((Path(models_dir) / "models" / n).glob("fold*/pred_val.csv")):
            try:
                w = pd.read_csv(f, usecols=["width"])["width"].to_numpy(float)
            except (OSError, ValueError, KeyError):
                continue
            widths.append(w[np.isfinite(w)])
        if widths and sum(len(w) for w in widths):
            out[n] = float(np.median(np.concatenate(widths)))
    return out


def find_blend(models_dir: Path, cfg, blend_path: Path | None = None) -> Path | None:
    """The blend.json to use (see the module docstring for the order), or None."""
    if blend_path is not None:
        p = Path(blend_path)
        if not p.exists():
            raise StageInputError(f"{p}: blend file not found")
        return p
    for p in (Path(models_dir) / "blend.json", Path(models_dir) / "submissions" / "blend.json",
              cfg.submissions_path / "blend.json"):
        if p.exists():
            return p
    return None


def _spec_for(name: str, cfg):
    """The training module's spec of a model name; built from the name when the config's grid lacks it."""
    training = _mod("training")
    for s in training.list_model_specs(cfg):
        if s.name == name:
            return s
    m = parse_model_name(name)
    return training.ModelSpec(m.name, m.region, m.head, m.sex_mode, m.backbone)


def load_models(models_dir: Path, cfg, device, blend_path: Path | None = None) -> LoadedModels:
    """Load the U-Net, the keypoint network (None if none was trained), the blend and every fold model
    the blend uses (or, without a blend, every model of the config's grid)."""
    import json

    models_dir = Path(models_dir)
    if not (models_dir / "models").is_dir():
        raise StageInputError(f"{models_dir}: no models/ folder; pass --models WORK_DIR of a trained run")
    notes = []
    bpath = find_blend(models_dir, cfg, blend_path)
    blend = None
    if bpath is not None:
        try:
            blend = json.loads(bpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StageInputError(f"{bpath}: not a readable blend.json ({exc})") from None
        names = sorted({m for s in blend.get("sexes", {}).values() for m in s.get("models", [])})
    else:
        notes.append("no blend.json found: equal-weight mean of the models")
        names = [s.name for s in _mod("training").list_model_specs(cfg)]
    if not names:
        raise StageInputError(f"no bone age models listed ({bpath or 'config grid'})")
    unet = _mod("segmentation").load_unet(models_dir / "models" / "unet", cfg.segment, device)
    kp = _mod("keypoints").load_keypoint_model(models_dir / "models" / "keypoints", cfg.keypoints, device)
    if kp is None:
        notes.append("no keypoint network: geometric keypoints")
    specs = {n: _spec_for(n, cfg) for n in names}
    folds = {n: _mod("training").load_fold_models(models_dir, specs[n], cfg, device) for n in names}
    return LoadedModels(models_dir, device, unet, kp, specs, folds, blend, bpath, notes,
                        typical_widths(models_dir, names))


def warm_up(models: LoadedModels, cfg) -> None:
    """One pass of every network on blank input, so that the first real radiograph is answered at full
    speed (the first call of a torch module pays one-off allocation and kernel selection)."""
    blank = np.zeros((256, 200), np.uint8)
    _mod("segmentation").predict_mask(models.unet, blank, cfg.segment, models.device)
    reg_mod = _mod("registration")
    for n, spec in models.specs.items():
        if n in models.fold_models:
            crop = np.zeros(reg_mod.input_hw(cfg.register, spec.region), np.uint8)
            _mod("training").predict_crop(models.fold_models[n], crop, True, spec, cfg, models.device)


def _sex_weights(models: LoadedModels, sex: str) -> tuple[list[str], np.ndarray, float, np.ndarray, str]:
    """(models, coefficients, intercept, calibration, kind) for one sex."""
    if models.blend is not None and sex in models.blend.get("sexes", {}):
        from boneage.blending import blend_coefficients

        names, coef, icpt = blend_coefficients(models.blend, sex)
        return names, coef, icpt, blend_calibration(models.blend, sex, names), "blend"
    names = [n for n, s in models.specs.items() if parse_model_name(n).covers(sex)]
    if not names:
        raise StageInputError(f"no loaded model covers sex {sex}")
    return names, np.full(len(names), 1.0 / len(names)), 0.0, blend_calibration({}, sex, names), "equal-weight mean"


def _finite(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def _r(v, nd: int = 2):
    v = _finite(v)
    return None if math.isnan(v) else round(v, nd)


CORE_PARTS = ("mask", "keypoints", "registration", "agreement")  # geometric mean; other parts multiply it
# what a weak part means, in a rejection's reason
PART_HINTS = {"compression": " (heavy JPEG compression: its block edges, multiplied by the hand's contrast stretch, "
                             "hide the bones' detail; send the original or a lossless copy)",
              "noise": " (pixel noise inside the hand)"}


def keypoints_found_hand(kp_conf, cfg) -> bool:
    """Whether the keypoint network found a hand to point at: a finite confidence of at least
    `register.min_confidence` (below it, registration falls back to the mask)."""
    conf = _finite(kp_conf)
    return not math.isnan(conf) and conf >= cfg.register.min_confidence


def quality_parts(mask_q: float, kp_conf: float, reg: dict, agree_sd: float, cfg) -> dict[str, float]:
    """The self-check's four core parts, each 0..1 (see the module docstring).

    Each part is 1 over the range a readable radiograph shows and decays beyond it: the registration residual
    beyond `predict.residual_ok_frac` of the canvas height, the spread beyond `predict.agreement_ok_months`.
    The keypoint confidence counts where the keypoints were used, and where registration fell back to the mask
    because the network's confidence was below `register.min_confidence` (it found no hand to point at: a
    knee or foot phantom scores 0.10); when it fell back for another reason (points off the mask, implausible
    geometry), the points played no part in the result and the fallback is scored by the registration part."""
    p = cfg.predict
    method = str(reg.get("method", ""))
    base = 1.0 if method == "keypoints" else p.mask_method_quality
    res = _finite(reg.get("residual_px"))
    canvas_h = cfg.register.canvas_h_px  # residual_px is in full-size canvas pixels (boneage.registration)
    reg_q = base * (_decay(res, canvas_h * p.residual_ok_frac, canvas_h * p.residual_scale_frac)
                    if not math.isnan(res) else 1.0)
    agree_sd = _finite(agree_sd)
    agree = _decay(agree_sd, p.agreement_ok_months, p.agreement_scale_months) if not math.isnan(agree_sd) else 0.0
    no_hand = not math.isnan(_finite(kp_conf)) and not keypoints_found_hand(kp_conf, cfg)
    kp = clip(kp_conf) if method == "keypoints" or not method or no_hand else 1.0
    return {"mask": clip(mask_q), "keypoints": kp, "registration": clip(reg_q), "agreement": clip(agree)}


def clip(x) -> float:
    """A number in 0..1 (NaN and None count as 0)."""
    v = _finite(x)
    return 0.0 if math.isnan(v) else float(min(max(v, 0.0), 1.0))


def overall_quality(parts: dict[str, float]) -> float:
    """Geometric mean of the parts (one part at 0 makes the whole 0)."""
    vals = np.array(list(parts.values()), float)
    if (vals <= 0).any():
        return 0.0
    return float(np.exp(np.mean(np.log(vals))))


# ----------------------------------------------------------------------------- the self-check


def colourfulness(image: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness (2003) of a BGR/RGB uint8 image: 0 for grey, about 15 'slightly',
    33 'moderately', above 45 'highly colourful'. A grey (2-D) image gives 0."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] < 3:
        return 0.0
    a = a[..., :3].astype(np.float64)
    if max(a.shape[:2]) > 512:  # a subsample is enough and keeps it fast
        step = int(math.ceil(max(a.shape[:2]) / 512))
        a = a[::step, ::step]
    rg = a[..., 2] - a[..., 1]
    yb = 0.5 * (a[..., 2] + a[..., 1]) - a[..., 0]
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def to_grey(image: np.ndarray) -> np.ndarray:
    """uint8 grey of a 2-D or (H, W, 3|4) BGR image."""
    import cv2

    a = np.asarray(image)
    if a.ndim == 3:
        a = cv2.cvtColor(a[..., :3].astype(np.uint8), cv2.COLOR_BGR2GRAY)
    return a.astype(np.uint8)


def image_checks(image: np.ndarray) -> dict:
    """Cheap statistics of the grey radiograph, before any network: dynamic range (grey levels between the
    0.5th and 99.5th percentile) and the shares of pixels at the ends of the scale."""
    a = np.asarray(image)
    if max(a.shape) > 512:
        step = int(math.ceil(max(a.shape) / 512))
        a = a[::step, ::step]
    lo, hi = np.percentile(a, [0.5, 99.5])
    return {"dynamic_range": float(hi - lo), "bright_frac": float((a >= 250).mean()),
            "dark_frac": float((a <= 5).mean()), "mean_grey": float(a.mean())}


def mask_checks(raw_mask: np.ndarray, hand_mask: np.ndarray | None, cfg) -> dict:
    """Shape statistics for the self-check: on the raw (unprocessed) mask the number of large components and
    the second largest's area relative to the largest; on the hand component the number of deep finger gaps
    (convexity defects deeper than `predict.finger_gap_depth_frac` x sqrt(hull area)) and the aspect of its
    rotated bounding box. Computed at <= 256 px."""
    import cv2

    def small(m):
        m = np.asarray(m).astype(np.uint8)
        if max(m.shape) > 256:
            s = 256 / max(m.shape)
            m = cv2.resize(m * 255, (max(1, round(m.shape[1] * s)), max(1, round(m.shape[0] * s))),
                           interpolation=cv2.INTER_AREA) > 127
        return np.asarray(m).astype(np.uint8)

    out = {"n_large_components": 0, "second_object_ratio": 0.0, "finger_gaps": 0, "hand_aspect": float("nan"),
           "hand_span": 0.0, "hand_solidity": float("nan")}
    raw = small(raw_mask)
    if raw.size == 0 or not raw.any():
        return out
    n, _, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
    areas = np.sort(stats[1:, cv2.CC_STAT_AREA])[::-1].astype(float)
    large = areas[areas >= 0.02 * raw.size]
    out["n_large_components"] = int(len(large))
    if len(large) >= 2:
        out["second_object_ratio"] = float(large[1] / large[0])
    hand = small(hand_mask if hand_mask is not None else raw_mask)
    if not hand.any():
        return out
    ys, xs = np.nonzero(hand)
    out["hand_span"] = float(max((ys.max() - ys.min() + 1) / hand.shape[0], (xs.max() - xs.min() + 1) / hand.shape[1]))
    contours, _ = cv2.findContours(hand, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=cv2.contourArea)
    (_, _), (rw, rh), _ = cv2.minAreaRect(c)
    out["hand_aspect"] = float(max(rw, rh) / max(min(rw, rh), 1.0))
    hull_area = cv2.contourArea(cv2.convexHull(c))
    out["hand_solidity"] = float(cv2.contourArea(c) / hull_area) if hull_area > 0 else float("nan")
    out["finger_gaps"] = _mod("masks").deep_gaps(c, cfg.predict.finger_gap_depth_frac)
    return out


def hard_image_reasons(qc: dict, cfg) -> list[str]:
    """Reasons a frame holds nothing to read (checked before any network)."""
    p = cfg.predict
    reasons = []
    col = _finite(qc.get("colourfulness"))
    if not math.isnan(col) and col > p.max_colourfulness:
        reasons.append(f"not a radiograph: a colour image (colourfulness {col:.0f}, a radiograph is grey: "
                       f"<= {p.max_colourfulness:.0f})")
    dr = _finite(qc.get("dynamic_range"))
    mean = _finite(qc.get("mean_grey"))
    if not math.isnan(dr) and dr < p.min_dynamic_range:
        what = "saturated (all white)" if not math.isnan(mean) and mean > 200 else "blank"
        reasons.append(f"no hand found: the image is {what} (grey levels span {dr:.0f} of 255, "
                       f"below {p.min_dynamic_range:.0f})")
    else:
        for key, what in (("bright_frac", "saturated (white)"), ("dark_frac", "empty (black)")):
            v = _finite(qc.get(key))
            if not math.isnan(v) and v > p.max_saturated_frac:
                reasons.append(f"no hand found: {100 * v:.0f}% of the image is {what}")
    return reasons


def _decay(x: float, ok: float, scale: float) -> float:
    x = _finite(x)
    if math.isnan(x):
        return 1.0
    return float(math.exp(-max(x - ok, 0.0) / max(scale, 1e-6)))


def region_spread_scale(ref: dict | None, cfg) -> tuple[float, float]:
    """(ok, scale) of the regions part: from the blend's out-of-fold spread quantiles (`ref`, keys like "0.995")
    when `predict.region_spread_calibrated` and both configured quantiles are there, else the fixed months."""
    p = cfg.predict
    ok_key, half_key = f"{p.region_spread_ok_quantile:g}", f"{p.region_spread_half_quantile:g}"
    if p.region_spread_calibrated and ref:
        if ok_key not in ref or half_key not in ref or p.region_spread_ok_quantile >= p.region_spread_half_quantile:
            raise ConfigError(f"predict.region_spread_ok_quantile / _half_quantile must be two of {sorted(ref)} "
                              f"(ok below half), got {ok_key} / {half_key}")
        ok, half = float(ref[ok_key]), float(ref[half_key])
        return ok, max(half - ok, 1.0) / math.log(2.0)
    return p.region_spread_ok_months, p.region_spread_scale_months


def thumb_depth(points, mask) -> float | None:
    """Distance from the thumb tip (row 1 of the (3, 2) points) to the edge of `mask`, as a share of the middle-tip
    to capitate length; 0 on or outside the edge, None without a mask or finite points."""
    pts = np.asarray(points, float)
    if mask is None or pts.shape != (3, 2) or not np.isfinite(pts).all() or not np.asarray(mask).any():
        return None
    length = float(np.hypot(*(pts[0] - pts[2])))
    x, y = (int(round(v)) for v in pts[1])
    m = np.asarray(mask).astype(np.uint8)
    if length < 1 or not (0 <= x < m.shape[1] and 0 <= y < m.shape[0]):
        return None if length < 1 else 0.0
    return float(cv2.distanceTransform(m, cv2.DIST_L2, 5)[y, x]) / length


def extra_parts(qc: dict, parts: dict, cfg) -> dict:
    """`parts` plus `regions` (spread between the regions' estimates), `thumb` (the thumb tip's depth inside the
    outline, `thumb_depth`), `noise` (pixel noise inside the hand), `compression` (JPEG block edges in the clean
    hand) and
    `cls_spread` (the cls heads' width, relative to the models' typical validation width when known, else in
    months), where the qc has them."""
    p = cfg.predict
    parts = dict(parts)
    if qc.get("region_spread_months") is not None and "regions" not in parts:
        ok, scale = region_spread_scale(qc.get("region_spread_ref"), cfg)
        parts["regions"] = _decay(qc["region_spread_months"], ok, scale)
    if qc.get("thumb_depth_frac") is not None and "thumb" not in parts:
        parts["thumb"] = _decay(qc["thumb_depth_frac"], p.thumb_depth_ok_frac, p.thumb_depth_scale_frac)
    if qc.get("noise_sigma") is not None and "noise" not in parts:
        parts["noise"] = _decay(qc["noise_sigma"], p.noise_ok_sigma, p.noise_scale_sigma)
    if qc.get("block_artefacts") is not None and "compression" not in parts:
        parts["compression"] = _decay(qc["block_artefacts"], p.block_ok_levels, p.block_scale_levels)
    if "cls_spread" not in parts:
        if qc.get("cls_width_ratio") is not None:
            parts["cls_spread"] = _decay(qc["cls_width_ratio"], p.cls_width_ok_ratio, p.cls_width_ratio_scale)
        elif qc.get("cls_width_months") is not None:
            parts["cls_spread"] = _decay(qc["cls_width_months"], p.cls_width_ok_months, p.cls_width_scale_months)
    return parts


def quality_score(qc: dict, cfg) -> tuple[float, list[str]]:
    """The self-check's score 0..1 and the reasons for a rejection (empty when accepted).

    `qc` holds any of: `colourfulness`, `dynamic_range`, `bright_frac`, `dark_frac`, `mean_grey` (image
    checks), `mask_area_frac`, `second_object_ratio`, `finger_gaps`, `hand_span`, `hand_aspect`,
    `hand_solidity` (mask checks; the convex-outline one only where `keypoint_confidence` is absent or below
    `register.min_confidence`),
    `quality_parts` (dict, as `quality_parts` gives; else built from `mask_quality`, `keypoint_confidence`,
    `registration_method`, `registration_residual_px`, `agreement_sd_months`), `region_spread_months`,
    `cls_width_ratio` (width / the models' typical validation width) or `cls_width_months`. A missing field
    counts as passing (so the function also scores partial records).
    Accepted when the score is >= `predict.min_quality` and no reason is given.
    """
    p = cfg.predict
    reasons = hard_image_reasons(qc, cfg)
    area = _finite(qc.get("mask_area_frac"))
    if not math.isnan(area) and area < p.min_hand_area_frac:
        reasons.append(f"no hand found (hand mask covers {100 * area:.1f}% of the image, below "
                       f"{100 * p.min_hand_area_frac:.0f}%)")
    r2 = _finite(qc.get("second_object_ratio"))
    if not math.isnan(r2) and r2 > p.max_second_object_ratio:
        reasons.append(f"two hands or two large objects (second object {100 * r2:.0f}% of the first's area, "
                       f"above {100 * p.max_second_object_ratio:.0f}%)")
    gaps = qc.get("finger_gaps")
    if gaps is not None and _finite(gaps) < p.min_finger_gaps:
        reasons.append(f"no fingers found ({int(gaps)} finger gaps in the outline, need {p.min_finger_gaps}): "
                       "not a hand (forearm only, foot, other body part?)")
    span = _finite(qc.get("hand_span"))
    if not math.isnan(span) and span < p.min_hand_span:
        reasons.append(f"the hand spans only {100 * span:.0f}% of the image (a hand radiograph is framed to the hand, "
                       f">= {100 * p.min_hand_span:.0f}%): a fragment or another body part")
    asp = _finite(qc.get("hand_aspect"))
    sol = _finite(qc.get("hand_solidity"))
    # a hand holding its fingers together has this outline too (real 3287, 11863): there the keypoint network
    # finds the hand's three points; the outline refuses only where it did not (or was not asked)
    if (not (math.isnan(sol) or math.isnan(asp)) and sol > p.max_convex_solidity and asp > p.max_convex_aspect
            and not keypoints_found_hand(qc.get("keypoint_confidence"), cfg)):
        reasons.append(f"a convex elongated outline without separate fingers (solidity {sol:.2f}, aspect {asp:.1f}) "
                       "in which the keypoint network found no hand: a foot, or the segmentation missed the fingers")
    if not math.isnan(asp) and asp > p.max_hand_aspect:
        reasons.append(f"the object is too elongated for a hand (aspect {asp:.1f}, above {p.max_hand_aspect})")
    parts = dict(qc.get("quality_parts") or {})
    if not parts and any(k in qc for k in ("mask_quality", "keypoint_confidence", "registration_method")):
        parts = quality_parts(qc.get("mask_quality"), qc.get("keypoint_confidence"),
                              {"method": qc.get("registration_method"),
                               "residual_px": qc.get("registration_residual_px")},
                              _finite(qc.get("agreement_sd_months")) if "agreement_sd_months" in qc else 0.0, cfg)
    parts = extra_parts(qc, parts, cfg)
    core = {k: v for k, v in parts.items() if k in CORE_PARTS}
    score = (overall_quality(core) if core else 1.0) * float(np.prod([v for k, v in parts.items()
                                                                      if k not in CORE_PARTS] or [1.0]))
    if reasons:  # a failed check: nothing the networks say can make this a readable hand radiograph
        score = 0.0
    low = [k for k, v in parts.items() if v < p.min_part_quality]
    if parts and (score < p.min_quality or low):
        weak = [f"{k} quality {v:.2f} below {p.min_quality}{PART_HINTS.get(k, '')}" for k, v in parts.items()
                if v < p.min_quality]
        if not reasons:
            reasons += weak or [f"overall quality {score:.2f} below {p.min_quality} (weakest: "
                                f"{min(parts, key=parts.get)} {min(parts.values()):.2f})"]
    return float(score), reasons


def assess_image(image: np.ndarray, male: bool, models: LoadedModels, cfg, chronological_age_months=None,
                 image_id: str = "image", force: bool = False, colourfulness_value: float | None = None) -> dict:
    """One uint8 radiograph -> the result dict of method.md section 5 (see `assess_image_full`)."""
    return assess_image_full(image, male, models, cfg, chronological_age_months, image_id, force,
                             colourfulness_value)[0]


def _segment(models: LoadedModels, image: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(raw mask, post-processed hand mask) at the image's size, from one pass of the U-Net."""
    raw, mask = _mod("segmentation").predict_mask_and_raw(models.unet, image, cfg.segment, models.device)
    return np.asarray(raw).astype(bool), np.asarray(mask).astype(bool)


def normalise_input(image: np.ndarray, cfg, polarity: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(radiograph for the clean step, radiograph for the U-Net, info), by `predict.normalise_input`:

    - "stretch": both in normal polarity (dark background; `boneage.masks.normal_polarity`, before
      anything else as method.md asks) with grey levels stretched so that the 0.5th..99.5th percentiles span
      0..255: a brightness offset, a linear contrast change and an inversion are undone before any network.
    - "segment" (default): the same for the U-Net; the clean step gets the polarity-corrected, unstretched
      radiograph, as stage 2 gets it (stage 2 stretches the hand alone: `clean.hand_stretch`).
    - "off": both unchanged.
    `polarity=False`: keep the polarity as given."""
    mode = str(getattr(cfg.predict, "normalise_input", "off")).lower()
    if mode in ("off", "false", "0", "none", ""):
        return image, image, {}
    masks = _mod("masks")
    inverted = False
    if polarity and hasattr(masks, "normal_polarity"):
        image, inverted = masks.normal_polarity(image)
    a = image[:: max(1, image.shape[0] // 512), :: max(1, image.shape[1] // 512)]
    lo, hi = (float(v) for v in np.percentile(a, [0.5, 99.5]))
    stretched = image
    if hi - lo >= cfg.predict.min_dynamic_range and (lo > 0 or hi < 255):
        lut = np.clip((np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
        stretched = lut[image]
    info = {"input_inverted": bool(inverted), "input_range": [round(lo, 1), round(hi, 1)]}
    return (image if mode == "segment" else stretched), stretched, info


def _polarity_by_mask(models: LoadedModels, image: np.ndarray, raw_mask: np.ndarray, mask: np.ndarray, norm: dict,
                      cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, str]:
    """The polarity decided by the U-Net's two readings, of the film as it came and inverted: the one whose hand
    stands out brighter from the background around it (`masks.polarity_from_mask`) is kept; the classical guess
    only where neither reading found a hand. The classical guess before the U-Net turned 16 of 200 hold-out films
    negative when they were rotated by 10-45 degrees; the reading as it came alone kept 8 of 40 inverted films
    negative, where the U-Net found bones instead of a hand (issue 11). A film and its inverse make the same two
    readings, so they are read exactly alike. Returns (image, raw mask, mask, normalisation info, flag)."""
    masks = _mod("masks")
    alt, alt_seg, alt_norm = normalise_input(255 - image, cfg, polarity=False)
    alt_raw, alt_mask = _segment(models, alt_seg, cfg)
    d = masks.polarity_from_mask(image, mask) if mask.any() else None
    d_alt = masks.polarity_from_mask(alt, alt_mask) if alt_mask.any() else None
    if d is None and d_alt is None:
        inverted = masks.detect_inverted(image)
    else:
        inverted = (-np.inf if d_alt is None else d_alt) > (-np.inf if d is None else d)
    if not inverted:
        return image, raw_mask, mask, {**norm, "input_inverted": False}, ""
    if float(alt_mask.mean()) >= cfg.predict.min_hand_area_frac:
        return alt, alt_raw, alt_mask, {**alt_norm, "input_inverted": True}, ""
    return image, raw_mask, mask, {**norm, "input_inverted": False}, \
        "polarity: kept as read (no hand found after inverting it)"


def _reject_early(result: dict, qc: dict, reasons: list[str], t: dict, chronological_age_months) -> dict:
    result.update(status="rejected", hard_reject=True, rejection_reasons=reasons, qc=qc,
                  timing_s={k: round(v, 3) for k, v in t.items()})
    qc["quality"] = 0.0
    if chronological_age_months is not None:
        result["chronological_age_months"] = float(chronological_age_months)
    return result


def assess_image_full(image: np.ndarray, male: bool, models: LoadedModels, cfg, chronological_age_months=None,
                      image_id: str = "image", force: bool = False,
                      colourfulness_value: float | None = None) -> tuple[dict, dict]:
    """The result dict and the intermediate images (for the one-page PNG):
    {image, mask, points, canvas, crops, boxes}. Timings per step in `timing_s`.

    `image`: uint8 grey (H, W) or colour (H, W, 3) BGR; `colourfulness_value`: the colourfulness of the file
    when the caller already turned it to grey (predict.py)."""
    masks, kps, reg_mod = _mod("masks"), _mod("keypoints"), _mod("registration")
    training = _mod("training")
    dev = models.device
    sex = "M" if male else "F"
    t = {}
    col = colourfulness(image) if colourfulness_value is None else float(colourfulness_value)
    image = to_grey(image)
    as_read = image  # the ablation's raw-radiograph models read it so, without any preprocessing
    t0 = time.perf_counter()
    img_qc = {"colourfulness": round(col, 2), **{k: round(v, 4) for k, v in image_checks(image).items()}}
    result = {"id": image_id, "sex": sex, "status": "ok", "bone_age_months": None, "uncertainty_months": None}
    arrays = {"image": image, "mask": None, "points": None, "canvas": None, "crops": {}, "boxes": {}}
    hard = hard_image_reasons(img_qc, cfg)
    t["checks"] = time.perf_counter() - t0
    if hard:  # nothing to read: no network is run
        return _reject_early(result, {**img_qc, "flags": []}, hard, t, chronological_age_months), arrays
    t0 = time.perf_counter()
    image, seg_image, norm = normalise_input(image, cfg, polarity=False)  # the U-Net's readings decide it
    arrays["image"] = image
    t["normalise"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw_mask, mask = _segment(models, seg_image, cfg)
    flags = []
    if norm:
        image, raw_mask, mask, norm, flag = _polarity_by_mask(models, image, raw_mask, mask, norm, cfg)
        flags += [flag] if flag else []
    t["segment"] = time.perf_counter() - t0
    arrays["image"], arrays["mask"] = image, mask
    arrays["mask"] = mask
    mask_q, mask_flag = masks.mask_quality(mask, cfg.predict.mask_straight_tol_frac)
    area = float(mask.mean()) if mask.size else 0.0
    if mask_flag:
        flags.append(f"mask: {mask_flag}")
    if area < cfg.predict.min_hand_area_frac:
        qc = {**img_qc, "mask_quality": round(float(mask_q), 3), "mask_area_frac": round(area, 4), "flags": flags}
        _, reasons = quality_score({"mask_area_frac": area}, cfg)
        return _reject_early(result, qc, reasons, t, chronological_age_months), arrays
    shape_qc = mask_checks(raw_mask, mask, cfg)

    t0 = time.perf_counter()
    clean, info = masks.clean_radiograph(image, mask, cfg.clean)
    if info.get("flag"):
        flags.append(f"clean: {info['flag']}")
    if info.get("denoised"):
        flags.append(f"clean: denoised (pixel noise sigma {info['noise_sigma']:.1f} grey levels)")
    if info.get("deblocked"):
        flags.append(f"clean: deblocked (JPEG block edges of {info['block_artefacts']:.1f} grey levels)")
    t["clean"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kp_mask = mask if info.get("flag") else info.get("mask", mask)
    points, kp_conf, kp_source = kps.predict_keypoints(models.keypoint_model, clean, kp_mask, cfg.keypoints, dev)
    t["keypoints"] = time.perf_counter() - t0
    if kp_source != "model":
        flags.append(f"keypoints: {kp_source}")
    t0 = time.perf_counter()
    canvas, reg = reg_mod.register_radiograph(clean, points, kp_conf, kp_mask, cfg.register)
    crops = reg_mod.crop_regions(canvas, cfg.register)
    needed = {models.specs[n].region for n in models.specs} & set(reg_mod.BASELINE_INPUTS)
    if needed:  # models of the ablation's whole radiographs (bench/stress.py compares them)
        crops.update(reg_mod.baseline_crops(as_read, clean, replace(cfg.register, baseline_inputs=sorted(needed))))
    t["register"] = time.perf_counter() - t0
    if reg.get("flag"):
        flags.append(f"registration: {reg['flag']}")
    arrays.update(points=np.asarray(points, float), canvas=canvas, crops=crops,
                  boxes={k: [v * cfg.register.canvas_scale for v in box] for k, box in cfg.register.regions.items()})

    t0 = time.perf_counter()
    names, coef, icpt, calib, kind = _sex_weights(models, sex)
    per_model, P, S, W = {}, [], [], []
    for n, c in zip(names, coef):
        spec = models.specs.get(n)
        if spec is None or n not in models.fold_models:
            raise StageInputError(f"model {n} of the blend is not loaded from {models.models_dir}")
        out = training.predict_crop(models.fold_models[n], crops[spec.region], male, spec, cfg, dev)
        P.append(_finite(out.get("pred")))
        S.append(_finite(out.get("pred_std")))
        W.append(_finite(out.get("pred_width")))
        per_model[n] = {"region": spec.region, "head": spec.head, "sex_mode": spec.sex_mode,
                        "backbone": spec.backbone, "pred_months": _r(P[-1]), "fold_sd_months": _r(S[-1]),
                        "width_months": _r(W[-1]), "coef": round(float(c), 4)}
    t["models"] = time.perf_counter() - t0
    P, S, W = np.array([P]), np.array([S]), np.array([W])
    if not np.isfinite(P).all():
        bad = [n for n, v in zip(names, P[0]) if not np.isfinite(v)]
        raise StageInputError(f"{image_id}: model(s) {', '.join(bad)} gave no finite estimate")
    raw = float(icpt + P[0] @ coef)
    is_cls = np.array([parse_model_name(n).head == "cls" for n in names])
    unc = {k: float(v[0]) for k, v in blend_uncertainty(P, S, W, coef, is_cls, calib).items()}
    regions, est = region_estimates(P, names, calib)  # each model on the bone age scale, as in stage 7
    region_est = {r: round(float(v), 2) for r, v in zip(regions, est[0])}

    agree_sd = math.hypot(unc["fold_sd"], unc["model_sd"])
    parts = quality_parts(mask_q, kp_conf, reg, agree_sd, cfg)
    region_spread = float(est[0].max() - est[0].min()) if len(regions) > 1 else None
    cls_w = [w for w, c in zip(W[0], is_cls) if c and np.isfinite(w)]
    cls_width = float(np.mean(cls_w)) if cls_w else None
    typ = getattr(models, "typical_cls_width", {}) or {}
    ratios = [w / typ[n] for n, w, c in zip(names, W[0], is_cls) if c and np.isfinite(w) and typ.get(n, 0) > 0]
    cls_ratio = float(np.mean(ratios)) if ratios else None
    qc_in = {**img_qc, **shape_qc, "mask_area_frac": area, "quality_parts": parts, "keypoint_confidence": kp_conf,
             "noise_sigma": float(info.get("noise_sigma", 0.0)),
             "block_artefacts": float(info.get("block_artefacts", 0.0)),
             **({"thumb_depth_frac": depth} if (depth := thumb_depth(points, kp_mask)) is not None else {}),
             **({"region_spread_months": region_spread} if region_spread is not None else {}),
             "region_spread_ref": ((models.blend or {}).get("sexes", {}).get(sex, {})
                                   .get("region_spread_oof_quantiles") if kind == "blend" else None),
             **({"cls_width_months": cls_width} if cls_width is not None else {}),
             **({"cls_width_ratio": cls_ratio} if cls_ratio is not None else {})}
    parts = extra_parts(qc_in, parts, cfg)
    qc_in["quality_parts"] = parts
    quality, reasons = quality_score(qc_in, cfg)
    rejected = bool(reasons)
    bone_age = float(np.clip(raw, 0.0, 240.0))
    result.update({
        "status": ("forced" if force else "rejected") if rejected else "ok",
        "bone_age_months": round(bone_age, 2) if (not rejected or force) else None,
        "uncertainty_months": round(unc["uncertainty"], 2) if (not rejected or force) else None,
        "uncertainty_parts_months": {k: round(v, 2) for k, v in unc.items() if k != "uncertainty"},
        "per_model": per_model,
        "per_region_months": region_est,
        "blend": {"kind": kind, "file": str(models.blend_path) if models.blend_path else None,
                  "intercept": round(float(icpt), 4), "raw_months": round(raw, 2)},
        "qc": {
            "quality": round(quality, 3), "min_quality": cfg.predict.min_quality,
            "quality_parts": {k: round(v, 3) for k, v in parts.items()},
            **img_qc, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in shape_qc.items()},
            "agreement_sd_months": round(agree_sd, 2),
            "region_spread_months": _r(region_spread),
            "region_spread_ok_scale_months": [_r(v) for v in region_spread_scale(qc_in["region_spread_ref"], cfg)],
            "cls_width_months": _r(cls_width),
            "cls_width_ratio": _r(cls_ratio, 3),
            "mask_quality": round(float(mask_q), 3), "mask_area_frac": round(area, 4),
            "noise_sigma": round(float(info.get("noise_sigma", 0.0)), 2),
            "block_artefacts": round(float(info.get("block_artefacts", 0.0)), 2),
            "thumb_depth_frac": _r(qc_in.get("thumb_depth_frac"), 3),
            "inverted": bool(info.get("inverted", False)) != bool(norm.get("input_inverted", False)),
            "input_range": norm.get("input_range"),
            "keypoint_confidence": round(float(_finite(kp_conf)), 3) if not math.isnan(_finite(kp_conf)) else None,
            "keypoint_source": kp_source,
            "keypoints_px": {k: [_r(x, 1), _r(y, 1)] for k, (x, y) in
                             zip(("middle_tip", "thumb_tip", "capitate"), np.asarray(points, float))},
            "registration_method": reg.get("method"), "registration_residual_px": _r(reg.get("residual_px")),
            "mirrored": bool(reg.get("mirrored", False)),
            "flags": flags + list(models.notes),
        },
    })
    if rejected:
        result["rejection_reasons"] = reasons
        if not force:  # a rejected radiograph gives no bone age, not even per model
            result["per_region_months"] = None
            result["blend"]["raw_months"] = None
            for v in per_model.values():
                v["pred_months"] = None
    if force and rejected:
        result["warning"] = ("FORCED: the self-check rejected this radiograph (" + "; ".join(reasons) +
                             "); the bone age is shown only because --force was given; do not rely on it")
    if chronological_age_months is not None:
        result["chronological_age_months"] = round(float(chronological_age_months), 2)
        if result["bone_age_months"] is not None:
            result.update(assess_against_gp(result["bone_age_months"], float(chronological_age_months), male))
    result["timing_s"] = {k: round(v, 3) for k, v in t.items()}
    return result, arrays


# ----------------------------------------------------------------------------- one-page PNG


def render_assessment_png(result: dict, arrays: dict, path: Path) -> Path:
    """One page: the radiograph with its mask and keypoints, the registered hand with regions A, B, C,
    each model's / region's estimate with the blend, and the result in words."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig = plt.figure(figsize=(13, 6.2))
    gs = fig.add_gridspec(1, 3, width_ratios=[1.0, 0.8, 1.25], wspace=0.25)
    ax = fig.add_subplot(gs[0])
    ax.imshow(arrays["image"], cmap="gray")
    if arrays.get("mask") is not None and arrays["mask"].any():
        ax.contour(arrays["mask"].astype(float), levels=[0.5], colors="lime", linewidths=1.2)
    if arrays.get("points") is not None:
        shown = 0
        for (x, y), name, c in zip(arrays["points"], ("middle tip", "thumb tip", "capitate"),
                                   ("tab:red", "tab:orange", "tab:cyan")):
            if np.isfinite([x, y]).all():
                ax.plot(x, y, "o", ms=7, mfc=c, mec="white", label=name)
                shown += 1
        if shown:
            ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
    ax.set_title(f"{result['id']}: mask and keypoints", fontsize=10)
    ax.axis("off")

    ax = fig.add_subplot(gs[1])
    if arrays.get("canvas") is not None:
        ax.imshow(arrays["canvas"], cmap="gray")
        for (r, (x0, y0, x1, y1)), c in zip(sorted(arrays["boxes"].items()), ("yellow", "magenta", "cyan")):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=c, lw=1.5, ls="--" if r == "A" else "-"))
            ax.text(x0 + 3, y0 + 3, r, color=c, fontsize=11, va="top", fontweight="bold")
        ax.set_title(f"registered ({result.get('qc', {}).get('registration_method', '?')})", fontsize=10)
    else:
        ax.text(0.5, 0.5, "not registered", ha="center", va="center")
    ax.axis("off")

    ax = fig.add_subplot(gs[2])
    per = result.get("per_model") or {}
    if per and result.get("bone_age_months") is not None:
        names = list(per)
        vals = [per[n]["pred_months"] for n in names]
        errs = [per[n]["fold_sd_months"] or 0.0 for n in names]
        y = np.arange(len(names))
        ax.barh(y, vals, xerr=errs, color=["tab:gray" if per[n]["coef"] == 0 else "tab:blue" for n in names],
                alpha=0.75, capsize=3)
        for yi, n, v in zip(y, names, vals):  # labels inside the plot: long model names never get cut
            ax.text(3, yi, f"region {per[n]['region']}: {n}\n{v:.1f} months, coef {per[n]['coef']:.2f}",
                    va="center", ha="left", fontsize=8, bbox={"fc": "white", "ec": "none", "alpha": 0.75, "pad": 1})
        ax.set_yticks([])
        ax.invert_yaxis()
        ba = result.get("bone_age_months")
        if ba is not None:
            u = result.get("uncertainty_months") or 0.0
            ax.axvline(ba, color="k", lw=2, label=f"blend {ba:.1f} ± {u:.1f}")
            ax.axvspan(ba - u, ba + u, color="k", alpha=0.08)
        ca = result.get("chronological_age_months")
        if ca is not None:
            ax.axvline(ca, color="tab:green", ls="--", lw=1.5, label=f"chronological {ca:.0f}")
        ax.set_xlim(0, 240)
        ax.set_xlabel("bone age (months; model predictions before blending)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title("each model's estimate and the blend", fontsize=10)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "rejected by the self-check:\nno estimates shown\n(--force shows them, marked)",
                ha="center", va="center", fontsize=11, color="red", transform=ax.transAxes)

    status = result.get("status", "?")
    if result.get("bone_age_months") is None:
        head = f"REJECTED - no bone age. {'; '.join(result.get('rejection_reasons', []))}"
    else:
        head = (f"bone age {result['bone_age_months']:.1f} ± {result['uncertainty_months']:.1f} months "
                f"(sex {result['sex']})")
        if "z_score" in result:
            head += (f"; chronological {result['chronological_age_months']:.0f}, difference "
                     f"{result['difference_months']:+.1f}, Z {result['z_score']:+.2f} (GP SD "
                     f"{result['gp_sd_months']:.1f}): {result['interpretation'].upper()}")
    qc = result.get("qc", {})
    foot = (f"quality {qc.get('quality', float('nan')):.2f} (min {qc.get('min_quality', '')}); parts "
            + ", ".join(f"{k} {v:.2f}" for k, v in (qc.get("quality_parts") or {}).items())
            + ("; flags: " + "; ".join(qc["flags"]) if qc.get("flags") else ""))
    colour = {"ok": "black", "forced": "darkorange", "rejected": "red"}.get(status, "black")
    if status == "forced":
        head = "FORCED (self-check rejected; do not rely on it): " + head
    fig.suptitle(head, fontsize=11, color=colour, wrap=True)
    fig.text(0.5, -0.01, foot, ha="center", va="top", fontsize=8, wrap=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
