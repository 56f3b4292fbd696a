"""Stage 1: hand masks for every radiograph with a U-Net bootstrapped from zero (or few) manual masks.

Reads the data set (`boneage.inputs.load_dataset`) and `input/annotations/masks/{id}.png` where
present; writes `work/masks/{id}.png` (0/255, the radiograph's size), `work/masks.csv`
(`id,quality,area_frac,n_components,flag`), `work/models/unet/` (`unet.pt`, `rounds.json`, the
working-resolution cache) and `work/qc/01_masks.png` (worst quality first).

Resume: masks on disk are kept and the trained U-Net is reused unless --force. Radiographs with a
manual mask get that mask. The U-Net trains on training radiographs only.
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
from boneage.fileio import atomic_write_csv, atomic_write_json, atomic_write_png, read_gray, read_mask
from boneage.masks import count_components, quality_from_features, shape_features
from boneage.qc import contact_sheet, outline_mask
from boneage.runtime import select_device, setup_torch

log = logging.getLogger("boneage.segment")


def manual_mask_path(ann_dir: Path, sid: str) -> Path | None:
    for ext in (".png", ".PNG"):
        p = ann_dir / "masks" / f"{sid}{ext}"
        if p.exists():
            return p
    return None


def _load_manual(path: Path, shape: tuple[int, int]) -> np.ndarray:
    m = read_mask(path)
    if m.shape != shape:
        m = cv2.resize(m.astype(np.uint8) * 255, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 127
    return m


def train_or_load(cfg, ds, model_dir: Path, device, force: bool):
    """The U-Net: reused from `model_dir` unless `force`, else bootstrapped on the training radiographs."""
    import torch

    from boneage.segmentation import (
        MODEL_FILE,
        bootstrap_px,
        bootstrap_unet,
        load_unet,
        mask_to_work,
        relabel_unet,
        save_unet,
        to_work,
    )

    sc = cfg.segment
    if (model_dir / MODEL_FILE).exists() and not force:
        log.info("reusing the trained U-Net in %s", model_dir)
        return load_unet(model_dir, sc, device)
    train = ds.train
    if len(train) == 0:
        raise StageInputError("no training radiographs: the U-Net cannot be trained")
    if len(train) > sc.max_train_images:
        train = train.sample(sc.max_train_images, random_state=cfg.seed)
    ids = [str(i) for i in train["id"]]
    s = bootstrap_px(sc)
    cache = model_dir / f"cache_{s}.npz"
    stack = inners = None
    if cache.exists() and not force:
        z = np.load(cache, allow_pickle=False)
        if list(z["ids"]) == ids:
            stack, inners = z["images"], [tuple(x) for x in z["inners"]]
    manual: dict[int, np.ndarray] = {}
    if stack is None:
        from tqdm import tqdm

        stack = np.zeros((len(ids), s, s), np.uint8)
        inners = []
        for k, p in enumerate(tqdm(list(train["path"]), desc="working images", mininterval=5)):
            wi = to_work(read_gray(p), s)
            stack[k] = wi.image
            inners.append(wi.inner)
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".cache_{s}.tmp.npz"
        np.savez(tmp, ids=np.array(ids), images=stack, inners=np.array(inners))
        tmp.replace(cache)
    for k, (sid, p) in enumerate(zip(ids, train["path"])):
        mp = manual_mask_path(ds.annotations_dir, sid)
        if mp is not None:
            img_shape = read_gray(p).shape
            manual[k] = mask_to_work(_load_manual(mp, img_shape), s)
    log.info("U-Net bootstrap: %d training radiographs, %d manual masks, work size %d", len(ids), len(manual), s)
    boot = bootstrap_unet(stack, inners, manual, sc, device, seed=cfg.seed)
    if sc.relabel_epochs > 0:
        def items():
            for sid, p in zip(ids, train["path"]):
                img = read_gray(p)
                mp = manual_mask_path(ds.annotations_dir, sid)
                yield img, (_load_manual(mp, img.shape) if mp is not None else None)

        boot.rounds.append(relabel_unet(boot.model, items(), sc, device, cfg.seed + 7))
    save_unet(boot.model, model_dir)
    atomic_write_json(model_dir / "rounds.json", boot.rounds)
    torch.set_grad_enabled(True)
    return boot.model


def main(cfg, args):
    from boneage.inputs import load_dataset
    from boneage.segmentation import predict_masks

    sc = cfg.segment
    setup_torch(cfg.threads, cfg.seed)
    device = select_device(cfg.device)
    ds = load_dataset(cfg)
    work = cfg.work_path
    model_dir = work / "models" / "unet"
    mask_dir = work / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows = ds.all
    todo = [r for r in rows.itertuples() if args.force or not (mask_dir / f"{r.id}.png").exists()]
    log.info("%d of %d radiographs need a mask", len(todo), len(rows))
    if todo:
        model = train_or_load(cfg, ds, model_dir, device, args.force)
        from tqdm import tqdm

        bs = max(1, int(sc.predict_batch_size))
        for b0 in tqdm(range(0, len(todo), bs), desc="masks", mininterval=5):
            chunk = todo[b0:b0 + bs]
            imgs = [read_gray(r.path) for r in chunk]
            predicted = predict_masks(model, imgs, sc, device)
            for r, img, pm in zip(chunk, imgs, predicted):
                mp = manual_mask_path(ds.annotations_dir, str(r.id)) if r.split == "train" else None
                m = _load_manual(mp, img.shape) if mp is not None else pm
                atomic_write_png(mask_dir / f"{r.id}.png", m.astype(np.uint8) * 255)

    # masks.csv and the QC sheet over every radiograph (masks kept from earlier runs included)
    table = []
    for r in rows.itertuples():
        m = read_mask(mask_dir / f"{r.id}.png")
        f = shape_features(m)
        q, flag = quality_from_features(f, sc.flag_below_quality)
        table.append({"id": str(r.id), "quality": round(q, 4), "area_frac": round(float(m.mean()), 4),
                      "n_components": count_components(m), "flag": flag})
    df = pd.DataFrame(table, columns=["id", "quality", "area_frac", "n_components", "flag"])
    atomic_write_csv(work / "masks.csv", df)
    n_flag = int((df.flag != "").sum())
    log.info("masks.csv: %d radiographs, %d flagged, median quality %.3f", len(df), n_flag,
             float(df.quality.median()) if len(df) else 0.0)
    worst = df.sort_values("quality").head(int(sc.qc_sheet_n))
    paths = dict(zip(rows["id"].astype(str), rows["path"]))
    tiles, caps = [], []
    for r in worst.itertuples():
        img = read_gray(paths[r.id])
        m = read_mask(mask_dir / f"{r.id}.png")
        s = 384 / max(img.shape)
        if s < 1:
            img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
            m = cv2.resize(m.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        tiles.append(outline_mask(img, m))
        caps.append(f"{r.id} q{r.quality:.2f} {r.flag}")
    if tiles:
        contact_sheet(tiles, caps, work / "qc" / "01_masks.png", title="stage 1 masks, worst quality first")


if __name__ == "__main__":
    sys.exit(run_stage("01_segment", "Hand segmentation: U-Net bootstrapped from zero masks.", main))
