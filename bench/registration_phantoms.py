"""Registration accuracy on phantoms with known keypoints: where the true points land on the canvas.

    python bench/registration_phantoms.py --config configs/demo.yaml [--work work] [--input input]

Uses the stage 1-3 outputs of a run on phantom data (`work/clean`, `work/masks`, `work/keypoints.csv`)
and the phantoms' true keypoints (`input/ground_truth/params.jsonl`). For each radiograph it runs
`register_radiograph` as stage 4 does, maps the TRUE middle tip, thumb tip and capitate with the
resulting transform, and reports: the share registered upright (tip above capitate), with the thumb on
the canvas' right (a left hand), and the distance of tip and capitate from their canvas targets in %
of the target tip-to-capitate distance; split by method (keypoints / mask fallback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from boneage.config import load_config
from boneage.registration import canvas_size, register_radiograph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    work, inp = cfg.work_path, cfg.input_path
    kp = pd.read_csv(work / "keypoints.csv", dtype={"id": str}).set_index("id")
    rc = cfg.register
    s = rc.canvas_scale
    Hc, Wc = canvas_size(rc)
    tip_t = np.array([Wc / 2, rc.tip_y_px * s])
    cap_t = np.array([Wc / 2, Hc - rc.capitate_from_bottom_px * s])
    span = np.linalg.norm(cap_t - tip_t)
    rows = []
    for line in open(inp / "ground_truth" / "params.jsonl"):
        p = json.loads(line)
        i = str(p["id"])
        if i not in kp.index:
            continue
        clean = cv2.imread(str(work / "clean" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(work / "masks" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) > 127
        r = kp.loc[i]
        pts = np.array([[r.middle_tip_x, r.middle_tip_y], [r.thumb_tip_x, r.thumb_tip_y],
                        [r.capitate_x, r.capitate_y]], float)
        _, row = register_radiograph(clean, pts, float(r.confidence), mask, rc)
        M = np.array(row["matrix"])
        true = np.array(p["keypoints"], float)[:, :2]
        t = true @ M[:, :2].T + M[:, 2]
        rows.append({"id": i, "method": row["method"], "upright": t[0, 1] < t[2, 1],
                     "thumb_right": t[1, 0] > t[2, 0],
                     "tip_err_pct": 100 * np.linalg.norm(t[0] - tip_t) / span,
                     "cap_err_pct": 100 * np.linalg.norm(t[2] - cap_t) / span})
    df = pd.DataFrame(rows)
    for name, g in [("all", df)] + list(df.groupby("method")):
        print(f"{name:10s} n={len(g):4d}  upright {g['upright'].mean():6.1%}"
              f"  thumb right {g['thumb_right'].mean():6.1%}"
              f"  tip err median {g['tip_err_pct'].median():5.1f} %"
              f"  capitate err median {g['cap_err_pct'].median():5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
