"""Stage 3: three keypoints per radiograph (middle fingertip, thumb tip, capitate).

Reads `work/clean/{id}.png`, `work/masks/{id}.png` and any keypoint annotations in
`input/annotations/` (plain CSV, VIA JSON/CSV, COCO; see `boneage.annotations`). Every radiograph
first gets the geometric guess from its mask; training radiographs with manual points, plus (when
there are fewer than `keypoints.min_manual_for_manual_only` of them) training radiographs with a
confident geometric guess as pseudo-labels, train the VGG-style regressor (`boneage.keypoints`),
which then predicts every training and test radiograph. Manual points win where they exist.

Writes `work/keypoints.csv` (id, six coordinates in original pixels, confidence, source),
`work/models/keypoints/` (model.pt, meta.json) and `work/qc/03_keypoints.png` (least confident
first). Resume: a trained model is reused and a complete keypoints.csv is kept unless --force.
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from boneage.annotations import COORD_COLUMNS, POINTS, annotation_arrays, load_annotations
from boneage.cli import run_stage
from boneage.errors import StageInputError
from boneage.fileio import atomic_write_csv, read_gray, read_mask
from boneage.inputs import load_dataset
from boneage.keypoints import (
    INPUT_VIEW,
    finish_network_points,
    fit_geometric_proportions,
    from_view,
    geometric_from_cfg,
    load_keypoint_model,
    network_view,
    predict_batch,
    save_model,
    second_readings,
    to_view,
    train_model,
)
from boneage.qc import contact_sheet
from boneage.runtime import select_device, setup_torch

log = logging.getLogger("boneage.keypoints")

OUT_COLUMNS = ["id", *COORD_COLUMNS, "confidence", "source"]
COLOURS = [(0, 0, 255), (0, 255, 255), (255, 128, 0)]  # BGR: middle tip red, thumb yellow, capitate blue


def load_inputs(cfg, ids: list[str]) -> tuple[dict, dict]:
    """Clean images and masks of every id; a missing clean image is a stage input error."""
    work = cfg.work_path
    missing = [i for i in ids if not (work / "clean" / f"{i}.png").exists()]
    if missing:
        raise StageInputError(f"{len(missing)} clean image(s) missing in {work / 'clean'} (e.g. {missing[:3]}); "
                              "run src/02_clean.py first")
    clean, masks = {}, {}
    for i in tqdm(ids, desc="03 read", leave=False):
        clean[i] = read_gray(work / "clean" / f"{i}.png")
        mp = work / "masks" / f"{i}.png"
        masks[i] = read_mask(mp) if mp.exists() else clean[i] > 0
        if masks[i].shape != clean[i].shape:
            h, w = clean[i].shape
            masks[i] = cv2.resize(masks[i].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return clean, masks


def draw_points(image: np.ndarray, pts: np.ndarray, radius: int | None = None) -> np.ndarray:
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    r = radius or max(3, round(max(image.shape[:2]) / 80))
    for p, col in zip(np.asarray(pts, float).reshape(3, 2), COLOURS):
        if np.isfinite(p).all():
            cv2.circle(out, (int(round(p[0])), int(round(p[1]))), r, col, -1, cv2.LINE_AA)
            cv2.circle(out, (int(round(p[0])), int(round(p[1]))), r + 1, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def main(cfg, args):
    kcfg = cfg.keypoints
    work = cfg.work_path
    out_csv = work / "keypoints.csv"
    model_dir = work / "models" / "keypoints"
    ds = load_dataset(cfg)
    table = ds.all
    ids = table["id"].astype(str).tolist()
    train_ids = set(ds.train["id"].astype(str))
    if out_csv.exists() and not args.force:
        done = pd.read_csv(out_csv, dtype={"id": str})
        if set(ids) <= set(done["id"]):
            log.info("keypoints: %s already covers all %d radiographs (use --force to redo)", out_csv, len(ids))
            return
    setup_torch(cfg.threads, cfg.seed)
    device = select_device(cfg.device)
    clean, masks = load_inputs(cfg, ids)
    sizes = {i: clean[i].shape for i in ids}
    ann = load_annotations(ds.annotations_dir, sizes, kcfg.point_names, kcfg.via_attribute, set(ids))
    manual = {r["id"]: annotation_arrays(r) for r in ann.to_dict("records") if r["n_points"] > 0}
    log.info("keypoints: manual points for %d radiograph(s) (%d complete)", len(manual),
             int((ann["n_points"] == 3).sum()) if len(ann) else 0)

    # the geometric guess's proportions, refitted on the manual points of training radiographs
    props = fit_geometric_proportions([(masks[i], manual[i][0]) for i in sorted(manual) if i in train_ids])
    if props:
        log.info("keypoints: geometric proportions refitted on manual points: %s",
                 {k: round(v, 3) for k, v in props.items()})
    # geometric guess for every radiograph
    geo = {}
    for i in tqdm(ids, desc="03 geometric", leave=False):
        geo[i] = geometric_from_cfg(masks[i], kcfg, props)
    size = kcfg.input_size_px
    # the network's input: each hand turned upright and framed (keypoints.network_view), in training and after
    views = {i: network_view(clean[i], masks[i], *geo[i], kcfg) for i in ids}

    model = None if args.force else load_keypoint_model(model_dir, kcfg, device)
    if model is not None:
        log.info("keypoints: reusing the trained model in %s", model_dir)
        meta = model_dir / "meta.json"
        if meta.exists() and not props:
            props = json.loads(meta.read_text()).get("geometric_proportions") or None
    else:
        imgs, pts, vis, wts = [], [], [], []
        n_manual = 0
        for i in sorted(train_ids):
            sq, back = views[i]
            if i in manual:
                p, v = manual[i]
                imgs.append(sq)
                pts.append(np.nan_to_num(to_view(p, back)))
                vis.append(v)
                wts.append(3.0)
                n_manual += 1
        n_pseudo = 0
        if n_manual < kcfg.min_manual_for_manual_only:
            ok = [i for i in sorted(train_ids) if i not in manual and geo[i][1] >= kcfg.min_geometric_confidence
                  and np.isfinite(geo[i][0]).all()]
            ok = sorted(ok, key=lambda i: -geo[i][1])[: max(0, kcfg.max_pseudo_labels)]
            for i in sorted(ok):
                sq, back = views[i]
                imgs.append(sq)
                pts.append(to_view(geo[i][0], back))
                vis.append(np.ones(3, bool))
                wts.append(1.0)
                n_pseudo += 1
        log.info("keypoints: training on %d manual + %d geometric pseudo-labelled radiographs", n_manual, n_pseudo)
        if len(imgs) >= kcfg.min_train_images and kcfg.epochs > 0:
            model = train_model(imgs, pts, vis, kcfg, device, weights=wts)
            save_model(model, model_dir, {"n_manual": n_manual, "n_pseudo": n_pseudo, "input_size_px": size,
                                          "input_view": INPUT_VIEW,
                                          "filters": list(kcfg.filters), "epochs": kcfg.epochs,
                                          "geometric_proportions": props or {}})
        else:
            log.warning("keypoints: %d labelled radiographs (< %d): no network, geometric points only",
                        len(imgs), kcfg.min_train_images)

    preds = {}
    if model is not None:
        bs = 32
        for b in tqdm(range(0, len(ids), bs), desc="03 predict", leave=False):
            chunk = ids[b:b + bs]
            out = predict_batch(model, [views[i][0] for i in chunk], device, kcfg.flip_average)
            for i, p in zip(chunk, out):
                preds[i] = from_view(p, views[i][1])
        pids = list(preds)
        agains = dict(zip(pids, second_readings(model, [clean[i] for i in pids], [masks[i] for i in pids],
                                                [preds[i] for i in pids], kcfg, device)))

    rows = []
    for i in ids:
        gp, gc = geo[i]
        if i in preds:
            p, conf, src = finish_network_points(model, clean[i], masks[i], preds[i], gp, gc, kcfg, device,
                                                 agains[i])
        else:
            p, conf, src = gp, gc, "geometric"
        if i in manual:
            mp, mv = manual[i]
            p = np.where(mv[:, None], mp, p)
            if mv.all():
                conf, src = 1.0, "manual"
            else:
                conf = max(conf, 0.5)
                src = "manual" if mv.sum() >= 2 else src
        rec = {"id": i}
        for k, name in enumerate(POINTS):
            rec[f"{name}_x"] = round(float(p[k, 0]), 2) if np.isfinite(p[k, 0]) else np.nan
            rec[f"{name}_y"] = round(float(p[k, 1]), 2) if np.isfinite(p[k, 1]) else np.nan
        rec["confidence"] = round(float(conf), 4)
        rec["source"] = src
        rows.append(rec)
    df = pd.DataFrame(rows, columns=OUT_COLUMNS)
    atomic_write_csv(out_csv, df)
    log.info("keypoints: wrote %s (%d rows; sources %s; median confidence %.2f)", out_csv, len(df),
             df["source"].value_counts().to_dict(), float(df["confidence"].median()))

    # QC: least confident first
    worst = df.sort_values("confidence").head(kcfg.qc_sheet_n)
    tiles, caps = [], []
    for r in worst.to_dict("records"):
        p = np.array([[r[f"{n}_x"], r[f"{n}_y"]] for n in POINTS], float)
        tiles.append(draw_points(clean[r["id"]], p))
        caps.append(f"{r['id']} {r['source'][:4]} c={r['confidence']:.2f}")
    contact_sheet(tiles, caps, work / "qc" / "03_keypoints.png",
                  title="03 keypoints, least confident first (red middle tip, yellow thumb tip, blue capitate)")


if __name__ == "__main__":
    sys.exit(run_stage("03_keypoints", "Keypoints: middle fingertip, thumb tip, capitate.", main))
