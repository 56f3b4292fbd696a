"""Stage 2: keep the hand, black background, contrast equalised inside the hand.

Reads the radiographs and `work/masks/{id}.png`; writes `work/clean/{id}.png` (same size),
`work/clean.csv` (`id,inverted,kept_area_frac,flag`) and `work/qc/02_clean.png` (worst mask
quality first). Inverted radiographs are turned to normal polarity. A missing, empty or
implausible mask never stops the stage: the radiograph is kept whole (polarity corrected and
equalised) and flagged, and stage 4 falls back.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np
import pandas as pd

from boneage.cli import run_stage
from boneage.errors import StageInputError
from boneage.fileio import atomic_write_csv, atomic_write_png, read_gray, read_mask
from boneage.masks import clean_radiograph
from boneage.qc import contact_sheet, outline_mask
from boneage.runtime import thread_map

log = logging.getLogger("boneage.clean")
COLUMNS = ["id", "inverted", "kept_area_frac", "flag"]


def main(cfg, args):
    from boneage.inputs import load_dataset

    ds = load_dataset(cfg)
    work = cfg.work_path
    mask_dir = work / "masks"
    if not mask_dir.is_dir():
        raise StageInputError(f"{mask_dir}: no masks; run stage 01_segment first")
    out_dir = work / "clean"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = work / "clean.csv"
    previous: dict[str, dict] = {}
    if csv_path.exists() and not args.force:
        try:
            old = pd.read_csv(csv_path, dtype={"id": str}, keep_default_na=False)
            previous = {r["id"]: r for r in old.to_dict("records")}
        except (OSError, ValueError, pd.errors.ParserError):
            previous = {}
    rows = ds.all

    def clean_one(r) -> dict:
        sid = str(r.id)
        out = out_dir / f"{sid}.png"
        if out.exists() and sid in previous and not args.force:
            return {k: previous[sid][k] for k in COLUMNS}
        img = read_gray(r.path)
        mp = mask_dir / f"{sid}.png"
        mask = None
        flag_extra = ""
        if mp.exists():
            try:
                mask = read_mask(mp)
            except Exception as exc:  # a broken mask file: carry on without it, flagged
                flag_extra = f"bad_mask_file:{type(exc).__name__}"
        else:
            flag_extra = "no_mask_file"
        clean, info = clean_radiograph(img, mask, cfg.clean)
        atomic_write_png(out, clean)
        noisy = f"denoised:sigma{info['noise_sigma']:.1f}" if info.get("denoised") else ""
        # heavy JPEG compression, as the self-check judges it (predict.block_ok_levels): stage 7 lists the case
        blocky = (f"jpeg_blocks:step{info['block_artefacts']:.1f}{'(deblocked)' if info.get('deblocked') else ''}"
                  if info.get("deblocked") or info.get("block_artefacts", 0.0) > cfg.predict.block_ok_levels else "")
        flag = "+".join(f for f in (flag_extra, info["flag"], noisy, blocky) if f)
        return {"id": sid, "inverted": bool(info["inverted"]), "kept_area_frac": round(info["kept_area_frac"], 4),
                "flag": flag}

    # OpenCV and numpy release the GIL: with clean.workers > 1 radiographs are cleaned side by side (order kept)
    table = thread_map(clean_one, rows.itertuples(), max(1, int(cfg.clean.workers)), desc="clean")
    df = pd.DataFrame(table, columns=COLUMNS)
    atomic_write_csv(csv_path, df)
    n_inv = int(df.inverted.astype(str).eq("True").sum())
    n_flag = int((df.flag.astype(str) != "").sum())
    log.info("clean.csv: %d radiographs, %d inverted, %d flagged", len(df), n_inv, n_flag)

    # QC: worst mask quality first (masks.csv), flagged ones before the rest
    order = df.assign(_f=(df.flag.astype(str) != "").astype(int))
    mq_path = work / "masks.csv"
    if mq_path.exists():
        mq = pd.read_csv(mq_path, dtype={"id": str})[["id", "quality"]]
        order = order.merge(mq, on="id", how="left")
    else:
        order["quality"] = np.nan
    order = order.sort_values(["_f", "quality"], ascending=[False, True]).head(int(cfg.clean.qc_sheet_n))
    tiles, caps = [], []
    for r in order.itertuples():
        img = read_gray(out_dir / f"{r.id}.png")
        s = 384 / max(img.shape)
        if s < 1:
            img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        mp = mask_dir / f"{r.id}.png"
        if mp.exists():
            m = read_mask(mp)
            m = cv2.resize(m.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
            tile = outline_mask(img, m, thickness=1)
        else:
            tile = img
        tiles.append(tile)
        q = "" if pd.isna(r.quality) else f" q{r.quality:.2f}"
        caps.append(f"{r.id}{q}{' inv' if str(r.inverted) == 'True' else ''} {r.flag}")
    if tiles:
        contact_sheet(tiles, caps, work / "qc" / "02_clean.png", title="stage 2 clean radiographs, worst first")


if __name__ == "__main__":
    sys.exit(run_stage("02_clean", "Keep the hand, black background, CLAHE inside the hand.", main))
