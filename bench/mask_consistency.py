"""Mask consistency (issue 11): does stage 1 give a turned, cropped, downscaled or mirrored copy of a film the same
mask, moved the same way? For each film, the IoU of stage 1's mask of the copy with the original's mask put through
the same transform. Model-free of everything after stage 1, so it takes seconds per film where the stress test
(`bench/stress.py`) takes a minute; the stress test's shifts followed it (bench/notes/robustness.md, sessions 10, 12).

    .venv/bin/python bench/mask_consistency.py --unet WORK/models/unet [--config configs/cpu.yaml] \
        [--set key=value ...] [--data ../shared/data/rsna-half] [--n 12] [--threads 1] [--out F.csv]

Films: the first `--n` of the stress test's hold-out (its `pick_ids`). Prints one line per film and the median and
minimum IoU per transform; `--out` writes the rows.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from bench.stress import crop, downscale, model_args, pick_ids, rotate  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.fileio import atomic_write_csv, read_gray  # noqa: E402

TRANSFORMS = ("rot+10", "rot-20", "rot+45", "crop5%", "down0.5", "hflip")


def transform(name: str, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(the copy of `image` by transform `name`, `mask` moved the same way or None): the stress test's rotations
    (onto a canvas that keeps every pixel), its 5 % crop, half resolution and the left-right mirror."""
    m = None if mask is None else np.asarray(mask).astype(np.uint8) * 255
    if name.startswith("rot"):
        deg = float(name[3:])
        # the mask's border is background, so the stress test's fill (the border's median grey) is 0 for it
        return rotate(image, deg), None if m is None else rotate(m, deg) > 127
    if name == "crop5%":
        return crop(image, 0.05), None if m is None else crop(m, 0.05) > 127
    if name == "down0.5":
        small = downscale(image, 0.5)
        size = (small.shape[1], small.shape[0])
        return small, None if m is None else cv2.resize(m, size, interpolation=cv2.INTER_AREA) > 127
    if name == "hflip":
        return np.ascontiguousarray(image[:, ::-1]), None if m is None else np.ascontiguousarray(m[:, ::-1]) > 127
    raise ValueError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def consistency(images: dict[str, np.ndarray], segment, transforms=TRANSFORMS) -> pd.DataFrame:
    """Rows (id, transform, iou) for `segment(image) -> bool mask` on every image and its copies."""
    rows = []
    for fid, img in images.items():
        m0 = segment(img)
        for name in transforms:
            copy, moved = transform(name, img, m0)
            rows.append({"id": fid, "transform": name, "iou": iou(segment(copy), moved)})
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> dict:
    g = rows.groupby("transform", sort=False)["iou"]
    return {t: {"median": round(float(v.median()), 4), "min": round(float(v.min()), 3)} for t, v in g}


def main(argv=None) -> int:
    ap = model_args(__doc__, "--unet", "folder with unet.pt (a work dir's models/unet)")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--out", help="CSV of the rows")
    args = ap.parse_args(argv)
    import torch

    from boneage.segmentation import load_unet, predict_mask_and_raw

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides).segment
    unet = load_unet(Path(args.unet), cfg, "cpu")
    ids = pick_ids(Path(args.data), args.n)["id"].tolist()
    t0 = time.perf_counter()
    images = {i: read_gray(Path(args.data) / "images" / f"{i}.jpg") for i in ids}
    rows = consistency(images, lambda im: np.asarray(predict_mask_and_raw(unet, im, cfg, "cpu")[1]).astype(bool))
    for fid, g in rows.groupby("id", sort=False):
        print(fid, " ".join(f"{t} {v:.3f}" for t, v in zip(g["transform"], g["iou"])))
    print(json.dumps({"n_films": len(ids), "seconds": round(time.perf_counter() - t0, 1), "iou": summary(rows)}))
    if args.out:
        atomic_write_csv(Path(args.out), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
