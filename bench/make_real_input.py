"""Build a Kaggle-layout input folder from the shared real radiographs (../shared/data/rsna-half).

    python bench/make_real_input.py OUT_DIR [--split holdout100px|random] [--seed 0] [--test-n 200] [--copy]

Training part: `boneage-training-dataset.csv` (`id,boneage,male`) + `boneage-training-dataset/`.
Test part: `boneage-test-dataset.csv` (`Case ID,Sex`) + `boneage-test-dataset/`; its labels are kept
aside in `ground_truth/test_labels.csv` (`id,boneage,male`), which no stage trains on (stage 7 scores
against it; `bench/score.py` does the same by hand). By default the test part is the fixed hold-out
of 200 marked in `rsna-100px/labels.csv`, so figures are comparable with the 100 px benchmarks.
The shared manual keypoints of the training part go to `annotations/hand_keypoints_coco.json`
(COCO 21-point hand layout) with `--keypoints`. Images are symlinked unless `--copy`.
Deterministic for a seed. Never commit the output: it is RSNA data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
COCO_ORDER = ["wrist"] + [f"{f}{i}" for f in ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
                          for i in range(1, 5)]


def choose_test_ids(labels: pd.DataFrame, split: str, seed: int, test_n: int) -> set[str]:
    if split == "holdout100px":
        small = pd.read_csv(SHARED / "rsna-100px" / "labels.csv", dtype={"id": str})
        return set(small.loc[small["holdout"].astype(str) == "True", "id"])
    rng = np.random.default_rng(seed)
    ids = labels["id"].to_numpy()
    return set(rng.choice(ids, size=test_n, replace=False))


def coco_keypoints(ids: set[str], labels: pd.DataFrame) -> dict:
    kp = pd.read_csv(SHARED / "rsna-half" / "hand_keypoints.csv", dtype={"id": str})
    kp = kp[kp["id"].isin(ids)]
    size = labels.set_index("id")[["width", "height"]]
    images, annotations = [], []
    for n, (img_id, g) in enumerate(kp.groupby("id")):
        pts = g.set_index("point")
        flat = []
        for name in COCO_ORDER:
            if name in pts.index:
                flat += [float(pts.loc[name, "x"]), float(pts.loc[name, "y"]), 2]
            else:
                flat += [0.0, 0.0, 0]
        images.append({"id": n + 1, "file_name": f"{img_id}.jpg", "width": int(size.loc[img_id, "width"]),
                       "height": int(size.loc[img_id, "height"])})
        annotations.append({"id": n + 1, "image_id": n + 1, "category_id": 1, "keypoints": flat,
                            "num_keypoints": int(sum(v == 2 for v in flat[2::3]))})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "hand", "keypoints": COCO_ORDER}]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--split", choices=["holdout100px", "random"], default="holdout100px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-n", type=int, default=200)
    ap.add_argument("--keypoints", action="store_true", help="write the shared manual keypoints as COCO JSON")
    ap.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    args = ap.parse_args(argv)
    src = SHARED / "rsna-half"
    if not (src / "labels.csv").exists():
        print(f"error: {src}/labels.csv not found; the shared real data is needed", file=sys.stderr)
        return 2
    labels = pd.read_csv(src / "labels.csv", dtype={"id": str})
    test_ids = choose_test_ids(labels, args.split, args.seed, args.test_n)
    out = args.out_dir
    for sub in ("boneage-training-dataset", "boneage-test-dataset", "ground_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for row in labels.itertuples(index=False):
        part = "boneage-test-dataset" if row.id in test_ids else "boneage-training-dataset"
        dst = out / part / f"{row.id}.jpg"
        if not dst.exists():
            if args.copy:
                shutil.copyfile(src / "images" / f"{row.id}.jpg", dst)
            else:
                os.symlink((src / "images" / f"{row.id}.jpg").resolve(), dst)
    train = labels[~labels["id"].isin(test_ids)]
    test = labels[labels["id"].isin(test_ids)]
    train[["id", "boneage", "male"]].to_csv(out / "boneage-training-dataset.csv", index=False)
    pd.DataFrame({"Case ID": test["id"], "Sex": np.where(test["male"].astype(str) == "True", "M", "F")}).to_csv(
        out / "boneage-test-dataset.csv", index=False)
    test[["id", "boneage", "male"]].to_csv(out / "ground_truth" / "test_labels.csv", index=False)
    if args.keypoints:
        (out / "annotations").mkdir(exist_ok=True)
        coco = coco_keypoints(set(train["id"]), labels)
        (out / "annotations" / "hand_keypoints_coco.json").write_text(json.dumps(coco))
    print(f"{out}: {len(train)} training, {len(test)} test radiographs (split {args.split}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
