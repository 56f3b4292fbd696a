"""Mask IoU of a trained stage-1 U-Net against the phantoms' true masks, under several post-processing
settings, from one prediction per radiograph (no retraining).

    .venv/bin/python bench/mask_iou_phantoms.py --work WORK_DIR --input INPUT_DIR [--config configs/demo.yaml]
        [--n 120] [--variant "name: key=value,key=value" ...]

WORK_DIR holds `models/unet/unet.pt` (e.g. after `make demo`: `work`); INPUT_DIR is the phantom input
folder with `ground_truth/masks/{id}.png` for the test phantoms (`input`). Each variant is a list of
`segment.*` overrides applied to the post-processing only (the U-Net's probabilities are the same).
Prints median / mean / 10th-percentile IoU, precision and recall per variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from boneage.config import load_config  # noqa: E402
from boneage.fileio import read_gray, read_mask  # noqa: E402

DEFAULT_VARIANTS = [
    "as trained (dilate 0.01): segment.dilate_frac=0.01",
    "no dilation: segment.dilate_frac=0",
    "bands clipped: segment.dilate_frac=0,segment.clip_bright_bands=true",
    "bands clipped + edges refined: segment.dilate_frac=0,segment.clip_bright_bands=true,"
    "segment.refine_edge_work_px=1.5",
    "dilate 0.01, bands clipped, edges refined: segment.dilate_frac=0.01,segment.clip_bright_bands=true,"
    "segment.refine_edge_work_px=1.5",
    "dilate 0.01, bands clipped, edges refined 2.5: segment.dilate_frac=0.01,segment.clip_bright_bands=true,"
    "segment.refine_edge_work_px=2.5",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--variant", action="append")
    ap.add_argument("--stage1-masks", action="store_true",
                    help="score the masks stage 1 wrote (WORK/masks/{id}.png: polarity and upright retries included) "
                         "instead of re-predicting under variants")
    args = ap.parse_args(argv)
    if args.stage1_masks:
        return score_stage1_masks(args)

    import torch

    from boneage.segmentation import load_unet, prob_to_masks, to_work, work_probs

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    model = load_unet(args.work / "models" / "unet", cfg.segment, "cpu")
    truth = sorted((args.input / "ground_truth" / "masks").glob("*.png"), key=lambda p: int(p.stem))[:args.n]
    if not truth:
        raise SystemExit(f"{args.input}/ground_truth/masks: no true masks")
    images = [read_gray(args.input / "boneage-test-dataset" / p.name) for p in truth]
    works = [to_work(img, cfg.segment.work_size_px) for img in images]
    probs = work_probs(model, works, cfg.segment, "cpu")  # as stage 1 reads them (segment.flip_tta)
    print(f"{len(truth)} test phantoms, U-Net from {args.work}, working size {cfg.segment.work_size_px}\n")
    print("| variant | IoU median | mean | p10 | precision | recall |\n| --- | --- | --- | --- | --- | --- |")
    for text in args.variant or DEFAULT_VARIANTS:
        name, _, sets = text.partition(": ")
        vcfg = load_config(args.config, [s for s in sets.split(",") if s])
        ious, prec, rec = [], [], []
        for p, w, img, tp in zip(probs, works, images, truth):
            m = prob_to_masks(p, w.inner, w.size, vcfg.segment, img)[1]
            gt = read_mask(tp)
            inter = float((m & gt).sum())
            ious.append(inter / max(1.0, float((m | gt).sum())))
            prec.append(inter / max(1.0, float(m.sum())))
            rec.append(inter / max(1.0, float(gt.sum())))
        print(f"| {name} | {np.median(ious):.3f} | {np.mean(ious):.3f} | {np.percentile(ious, 10):.3f} "
              f"| {np.mean(prec):.3f} | {np.mean(rec):.3f} |", flush=True)
    return 0


def _iou_row(name: str, pairs) -> str:
    ious, prec, rec = [], [], []
    for m, gt in pairs:
        inter = float((m & gt).sum())
        ious.append(inter / max(1.0, float((m | gt).sum())))
        prec.append(inter / max(1.0, float(m.sum())))
        rec.append(inter / max(1.0, float(gt.sum())))
    return (f"| {name} | {np.median(ious):.3f} | {np.mean(ious):.3f} | {np.percentile(ious, 10):.3f} "
            f"| {np.mean(prec):.3f} | {np.mean(rec):.3f} | {np.mean(np.array(ious) >= 0.97):.2f} |")


def score_stage1_masks(args) -> int:
    truth = sorted((args.input / "ground_truth" / "masks").glob("*.png"), key=lambda p: int(p.stem))[:args.n]
    have = [p for p in truth if (args.work / "masks" / p.name).exists()]
    if not have:
        raise SystemExit(f"{args.work}/masks: none of the {len(truth)} test phantoms has a stage-1 mask")
    print(f"{len(have)} test phantoms, stage-1 masks of {args.work}\n")
    print("| masks | IoU median | mean | p10 | precision | recall | share >= 0.97 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(_iou_row(str(args.work), ((read_mask(args.work / "masks" / p.name), read_mask(p)) for p in have)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
