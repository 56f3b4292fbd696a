"""Score a submission CSV (`Case ID,Sex,boneage`) against labels (`id,boneage,male`).

    python bench/score.py SUBMISSION LABELS [--json OUT]

Prints the MAE overall, by sex and by age band, and the sex-mean baseline when a training CSV is
given with --train (the mean bone age of each sex in the training labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

BANDS = [(0, 60, "0-5 y"), (60, 120, "5-10 y"), (120, 180, "10-15 y"), (180, 241, "15+ y")]


def score(sub: pd.DataFrame, labels: pd.DataFrame, train: pd.DataFrame | None = None) -> dict:
    sub = sub.rename(columns={"Case ID": "id"})
    sub["id"] = sub["id"].astype(str)
    labels = labels.assign(id=labels["id"].astype(str))
    missing = sorted(set(labels["id"]) - set(sub["id"]))
    if missing:
        raise ValueError(f"submission lacks {len(missing)} labelled ids, e.g. {missing[:5]}")
    m = labels.merge(sub[["id", "boneage"]].rename(columns={"boneage": "pred"}), on="id")
    m["male"] = m["male"].astype(str).str.lower().isin(["true", "1", "m"])
    err = (m["pred"] - m["boneage"]).abs()
    out = {"n": int(len(m)), "mae": float(err.mean()),
           "mae_female": float(err[~m["male"]].mean()), "mae_male": float(err[m["male"]].mean()),
           "bands": {}}
    for lo, hi, name in BANDS:
        sel = (m["boneage"] >= lo) & (m["boneage"] < hi)
        out["bands"][name] = {"n": int(sel.sum()), "mae": float(err[sel].mean()) if sel.any() else None}
    if train is not None:
        tr_male = train["male"].astype(str).str.lower().isin(["true", "1", "m"])
        means = {True: train.loc[tr_male, "boneage"].mean(), False: train.loc[~tr_male, "boneage"].mean()}
        base = np.where(m["male"], means[True], means[False])
        out["sex_mean_baseline_mae"] = float(np.abs(base - m["boneage"]).mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("submission", type=Path)
    ap.add_argument("labels", type=Path)
    ap.add_argument("--train", type=Path, help="training labels, for the sex-mean baseline")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        res = score(pd.read_csv(args.submission), pd.read_csv(args.labels),
                    pd.read_csv(args.train) if args.train else None)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"n={res['n']}  MAE {res['mae']:.2f} months  (F {res['mae_female']:.2f}, M {res['mae_male']:.2f})")
    if "sex_mean_baseline_mae" in res:
        print(f"sex-mean baseline MAE {res['sex_mean_baseline_mae']:.2f} months")
    for name, b in res["bands"].items():
        print(f"  {name:8s} n={b['n']:4d}  MAE {b['mae']:.2f}" if b["mae"] is not None else f"  {name:8s} n=0")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
