"""Stages 3-4 of a real-data run scored against the shared manual annotations (issue 5).

    .venv/bin/python bench/registration_real.py --work WORK_DIR --input INPUT_DIR [--data ../shared/data/rsna-half]

WORK_DIR: a run's work folder (`keypoints.csv`, `registration.csv`), e.g. of
`bash run_all.sh --config configs/cpu.yaml --set input_dir=INPUT_DIR ...`; INPUT_DIR: the Kaggle-layout
folder `bench/make_real_input.py` built (its training CSV says which radiographs stage 3 could train on).

- Mirror: `registration.csv`'s `mirrored` against `hand_boxes.csv`'s `side` (right = a mirrored hand),
  for every annotated radiograph of the run.
- Keypoints: middle fingertip and thumb tip against `middle_finger4` / `thumb4`, capitate against the
  centre of the `Wrist` box of `ossification_rois.csv`, in % of that hand's length (manual
  `middle_finger4` to `wrist`; for ROI radiographs, the predicted tip to the Wrist box centre). Radiographs
  in the training part had their manual points in stage 3's training set (`--keypoints`): they are listed
  apart, and only test-part radiographs give honest figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "rsna-half"


def _summary(errors: pd.Series) -> str:
    e = errors.dropna()
    if e.empty:
        return "—"
    return f"{e.median():.2f} / {e.quantile(0.9):.2f} (n {len(e)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args(argv)
    kp = pd.read_csv(args.work / "keypoints.csv", dtype={"id": str}).set_index("id")
    reg = pd.read_csv(args.work / "registration.csv", dtype={"id": str}).set_index("id")
    train_ids = set(pd.read_csv(args.input / "boneage-training-dataset.csv", dtype={"id": str})["id"])
    manual = pd.read_csv(args.data / "hand_keypoints.csv", dtype={"id": str})
    boxes = pd.read_csv(args.data / "hand_boxes.csv", dtype={"id": str})
    rois = pd.read_csv(args.data / "ossification_rois.csv", dtype={"id": str})

    rows = []
    for i, g in manual.groupby("id"):
        if i not in kp.index:
            continue
        pts = g.set_index("point")[["x", "y"]]
        length = float(np.hypot(*(pts.loc["middle_finger4"] - pts.loc["wrist"])))
        tip = np.hypot(kp.loc[i, "middle_tip_x"] - pts.loc["middle_finger4", "x"],
                       kp.loc[i, "middle_tip_y"] - pts.loc["middle_finger4", "y"])
        thumb = np.hypot(kp.loc[i, "thumb_tip_x"] - pts.loc["thumb4", "x"],
                         kp.loc[i, "thumb_tip_y"] - pts.loc["thumb4", "y"])
        side = boxes.loc[boxes["id"] == i, "side"]
        rows.append({"id": i, "part": "train (seen)" if i in train_ids else "test", "tip_pct": 100 * tip / length,
                     "thumb_pct": 100 * thumb / length, "source": kp.loc[i, "source"],
                     "method": reg.loc[i, "method"], "mirrored": bool(reg.loc[i, "mirrored"]),
                     "truth_mirrored": (side.iloc[0] == "right") if len(side) else np.nan})
    for i, g in rois.groupby("id"):
        if i not in kp.index:
            continue
        w = g[g["label"] == "Wrist"]
        if w.empty:
            continue
        cx, cy = float((w.x0 + w.x1).iloc[0] / 2), float((w.y0 + w.y1).iloc[0] / 2)
        length = float(np.hypot(kp.loc[i, "middle_tip_x"] - cx, kp.loc[i, "middle_tip_y"] - cy))
        err = float(np.hypot(kp.loc[i, "capitate_x"] - cx, kp.loc[i, "capitate_y"] - cy))
        rows.append({"id": i, "part": "train (seen)" if i in train_ids else "test", "capitate_pct": 100 * err / length,
                     "source": kp.loc[i, "source"], "method": reg.loc[i, "method"]})
    df = pd.DataFrame(rows)
    if df.empty:
        print(f"{args.work}: none of the radiographs with manual annotations in {args.data} is in this run")
        return 1
    print(f"run {args.work}: {len(kp)} radiographs; {len(df)} with manual annotations\n")
    print("| part | middle tip median / p90 (% hand length) | thumb tip | capitate |\n| --- | --- | --- | --- |")
    for part, g in df.groupby("part"):
        print(f"| {part} | {_summary(g.get('tip_pct', pd.Series(dtype=float)))} "
              f"| {_summary(g.get('thumb_pct', pd.Series(dtype=float)))} "
              f"| {_summary(g.get('capitate_pct', pd.Series(dtype=float)))} |")
    m = df.dropna(subset=["truth_mirrored"]) if "truth_mirrored" in df else df.iloc[:0]
    wrong = m[m["mirrored"] != m["truth_mirrored"].astype(bool)]
    named = ", ".join(f"{r.id} ({r.part}, {r.method})" for r in wrong.itertuples()) or "none"
    print(f"\nmirror: {len(m) - len(wrong)} of {len(m)} right ({int(m['truth_mirrored'].astype(bool).sum())} "
          f"mirrored hands); wrong: {named}")
    print(f"registration method over the whole run: {reg['method'].value_counts().to_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
