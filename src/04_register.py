"""Stage 4: registration into the standard canvas and the three region crops.

Reads `work/clean/{id}.png`, `work/masks/{id}.png` and `work/keypoints.csv`; writes
`work/registered/{id}.png`, `work/crops/{A,B,C}/{id}.png` (plus `work/crops/{raw,clean}/{id}.png`, the
ablation's whole radiographs, when `register.baseline_inputs` lists them), `work/registration.csv` and
`work/qc/04_registered.png` (flagged / largest thumb residual first, region boxes drawn).
See `boneage.registration` for the transform, the mirror convention and the mask fallback.
Resume: a radiograph whose canvas and crops exist keeps its row in registration.csv unless --force.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from boneage.annotations import POINTS
from boneage.cli import run_stage
from boneage.errors import StageInputError
from boneage.fileio import atomic_write_csv, atomic_write_png, read_gray, read_mask
from boneage.inputs import load_dataset
from boneage.keypoints import points_plausible
from boneage.qc import contact_sheet
from boneage.registration import (
    REG_COLUMNS,
    baseline_crops,
    check_baseline_inputs,
    crop_regions,
    hand_length_stats,
    region_box,
    register_radiograph,
)

log = logging.getLogger("boneage.register")

BOX_COLOURS = {"A": (0, 200, 0), "B": (0, 0, 255), "C": (255, 128, 0)}


def draw_regions(canvas: np.ndarray, cfg) -> np.ndarray:
    out = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)
    t = max(1, round(4 * cfg.canvas_scale))
    for name in cfg.regions:
        x0, y0, x1, y1 = region_box(cfg, name)
        cv2.rectangle(out, (x0 + t, y0 + t), (x1 - 1 - t, y1 - 1 - t), BOX_COLOURS.get(name, (255, 255, 255)), t)
    return out


def main(cfg, args):
    rcfg = cfg.register
    check_baseline_inputs(rcfg)
    work = cfg.work_path
    ds = load_dataset(cfg)
    source_path = dict(zip(ds.all["id"].astype(str), ds.all["path"]))
    ids = ds.all["id"].astype(str).tolist()
    kp_path = work / "keypoints.csv"
    if not kp_path.exists():
        raise StageInputError(f"{kp_path} not found; run src/03_keypoints.py first")
    kp = pd.read_csv(kp_path, dtype={"id": str}).set_index("id")
    missing = [i for i in ids if i not in kp.index]
    if missing:
        raise StageInputError(f"{kp_path} lacks {len(missing)} radiograph(s) (e.g. {missing[:3]}); rerun stage 3")
    pts_all = np.stack([kp.loc[ids, [f"{p}_{a}" for a in ("x", "y")]].to_numpy(float) for p in POINTS], 1)
    # the data set's spread of hand lengths, from the confident, plausible rows only
    conf_all = kp.loc[ids, "confidence"].to_numpy(float)
    good = [k for k in range(len(ids)) if np.isfinite(conf_all[k]) and conf_all[k] >= rcfg.min_confidence
            and points_plausible(pts_all[k])[0]]
    stats = hand_length_stats(pts_all[good])
    log.info("register: hand length from %d confident rows: %s", len(good), stats)
    reg_csv = work / "registration.csv"
    old = pd.read_csv(reg_csv, dtype={"id": str}).set_index("id") if reg_csv.exists() and not args.force else None
    rows, qc = [], []
    for k, i in enumerate(tqdm(ids, desc="04 register")):
        out_png = work / "registered" / f"{i}.png"
        crops_done = all((work / "crops" / n / f"{i}.png").exists() for n in [*rcfg.regions, *rcfg.baseline_inputs])
        if old is not None and i in old.index and out_png.exists() and crops_done:
            rows.append({"id": i, **old.loc[i].to_dict()})
            continue
        cp = work / "clean" / f"{i}.png"
        if not cp.exists():
            raise StageInputError(f"{cp} not found; run src/02_clean.py first")
        clean = read_gray(cp)
        mp = work / "masks" / f"{i}.png"
        mask = read_mask(mp) if mp.exists() else clean > 0
        conf = float(kp.loc[i, "confidence"]) if np.isfinite(kp.loc[i, "confidence"]) else 0.0
        manual = str(kp.loc[i, "source"]) == "manual"
        canvas, row = register_radiograph(clean, pts_all[k], conf, mask, rcfg, stats, manual)
        atomic_write_png(out_png, canvas)
        crops = crop_regions(canvas, rcfg)
        if rcfg.baseline_inputs:  # the ablation's whole-radiograph inputs (issue 8)
            crops.update(baseline_crops(read_gray(source_path[i]), clean, rcfg))
        for name, crop in crops.items():
            atomic_write_png(work / "crops" / name / f"{i}.png", crop)
        row.pop("matrix", None)
        rows.append({"id": i, **row})
    df = pd.DataFrame(rows).reindex(columns=REG_COLUMNS)
    for c in ("scale", "angle_deg", "tx", "ty", "residual_px"):
        df[c] = df[c].astype(float).round(4)
    df["flag"] = df["flag"].fillna("")
    atomic_write_csv(reg_csv, df)
    n_mask = int((df["method"] == "mask").sum())
    log.info("register: wrote %s (%d rows, %d mask fallbacks, %d mirrored, %d flagged)", reg_csv, len(df), n_mask,
             int(df["mirrored"].astype(bool).sum()), int((df["flag"] != "").sum()))
    # QC: flagged first, then by thumb residual
    order = df.assign(_f=(df["flag"] != "").astype(int), _r=df["residual_px"].fillna(1e9))
    order = order.sort_values(["_f", "_r"], ascending=False).head(rcfg.qc_sheet_n)
    for r in order.to_dict("records"):
        canvas = read_gray(work / "registered" / f"{r['id']}.png")
        cap = f"{r['id']} {r['method'][:4]}{' M' if r['mirrored'] else ''} r={r['residual_px']:.0f} {r['flag']}"
        qc.append((draw_regions(canvas, rcfg), cap))
    if qc:
        contact_sheet([q[0] for q in qc], [q[1] for q in qc], work / "qc" / "04_registered.png",
                      title="04 registered, flagged / worst first (A green, B red, C blue)")


if __name__ == "__main__":
    sys.exit(run_stage("04_register", "Registration into the standard canvas and region crops.", main))
