"""MAE by region x head x sex mode from stage 6's `oof/` files, and the regression - classification difference.

Stage 6 trains the grid itself; this script only reads its outputs (`oof/{head}_{region}_{mode}_{backbone}.csv`,
`id,fold,sex,boneage,pred`, and `.holdout.csv`). `female` and `male` models are scored on their own sex;
`per_sex` is the two together, scored on every radiograph like `pooled` and `sex_input`.

    python src/06_train.py --config configs/demo.yaml --set work_dir=W --set oof_dir=O --set folds_dir=F \
        --set 'train.sex_modes=[pooled,sex_input,female,male]'
    python bench/phantom_heads.py --oof O --out table.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

REGIONS = ("A", "B", "C")
HEADS = ("reg", "cls")
MODES = ("pooled", "sex_input", "female", "male", "per_sex")
KINDS = {"oof": ".csv", "holdout": ".holdout.csv"}


def read_preds(oof_dir: Path, head: str, region: str, mode: str, backbone: str = "vgg",
               kind: str = "oof") -> pd.DataFrame | None:
    """One model's predictions (`per_sex`: the female and the male model's rows together); None if missing."""
    if mode == "per_sex":
        parts = [read_preds(oof_dir, head, region, m, backbone, kind) for m in ("female", "male")]
        return None if any(p is None for p in parts) else pd.concat(parts, ignore_index=True)
    path = Path(oof_dir) / f"{head}_{region}_{mode}_{backbone}{KINDS[kind]}"
    if not path.exists():
        return None
    return pd.read_csv(path, dtype={"id": str})


def mae(df: pd.DataFrame | None) -> float:
    return float("nan") if df is None or len(df) == 0 else float(np.mean(np.abs(df["pred"] - df["boneage"])))


def build_table(oof_dir: Path, regions=REGIONS, modes=MODES, backbone: str = "vgg") -> pd.DataFrame:
    """One row per region x sex mode: n, then MAE per head and reg - cls, out of fold and on the hold-out."""
    rows = []
    for region in regions:
        for mode in modes:
            row: dict = {"region": region, "sex_mode": mode}
            for kind in KINDS:
                preds = {h: read_preds(oof_dir, h, region, mode, backbone, kind) for h in HEADS}
                row[f"n_{kind}"] = max((len(p) for p in preds.values() if p is not None), default=0)
                for h in HEADS:
                    row[f"{h}_{kind}"] = mae(preds[h])
                row[f"diff_{kind}"] = row[f"reg_{kind}"] - row[f"cls_{kind}"]
            rows.append(row)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame, kind: str = "oof") -> pd.DataFrame:
    """Mean reg - cls difference per sex mode (over regions) and per region (over the all-radiograph modes)."""
    full = table[table["sex_mode"].isin(["pooled", "sex_input", "per_sex"])]
    by_mode = table.groupby("sex_mode", sort=False)[f"diff_{kind}"].mean().rename("mean reg - cls")
    by_region = full.groupby("region", sort=False)[f"diff_{kind}"].mean().rename("mean reg - cls")
    return pd.concat([by_mode.rename(lambda m: f"sex mode {m}"), by_region.rename(lambda r: f"region {r}")]).to_frame()


def sex_mean_baseline(oof_dir: Path, backbone: str = "vgg") -> tuple[float, float]:
    """MAE of predicting the sex's mean age: out of fold (means of the other folds) and on the hold-out
    (means of every out-of-fold row), from the first all-radiograph oof file found; NaN if none."""
    for path in sorted(Path(oof_dir).glob(f"*_pooled_{backbone}.csv")) + sorted(
            Path(oof_dir).glob(f"*_sex_input_{backbone}.csv")):
        oof = pd.read_csv(path, dtype={"id": str})
        err = []
        for k in sorted(oof["fold"].unique()):
            means = oof[oof["fold"] != k].groupby("sex")["boneage"].mean()
            rows = oof[oof["fold"] == k]
            err.append(np.abs(rows["sex"].map(means) - rows["boneage"]))
        hold_path = path.with_name(path.name[:-4] + ".holdout.csv")
        hold_mae = float("nan")
        if hold_path.exists():
            hold = pd.read_csv(hold_path, dtype={"id": str})
            hold_mae = float(np.mean(np.abs(hold["sex"].map(oof.groupby("sex")["boneage"].mean()) - hold["boneage"])))
        return float(np.mean(np.concatenate(err))), hold_mae
    return float("nan"), float("nan")


def _f(x: float) -> str:
    return "" if np.isnan(x) else f"{x:.2f}"


def _d(x: float) -> str:
    return "" if np.isnan(x) else f"{x:+.2f}"


def to_markdown(table: pd.DataFrame, baseline: tuple[float, float] | None = None) -> str:
    lines = ["| region | sex mode | n OOF | reg OOF | cls OOF | reg - cls OOF | n hold-out | reg hold-out | "
             "cls hold-out | reg - cls hold-out |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.region} | {r.sex_mode} | {r.n_oof} | {_f(r.reg_oof)} | {_f(r.cls_oof)} | "
                     f"{_d(r.diff_oof)} | {r.n_holdout} | {_f(r.reg_holdout)} | {_f(r.cls_holdout)} | "
                     f"{_d(r.diff_holdout)} |")
    if baseline is not None:
        lines.append(f"| sex-mean baseline | | | {_f(baseline[0])} | | | | {_f(baseline[1])} | | |")
    oof, hold = summary(table, "oof").iloc[:, 0], summary(table, "holdout").iloc[:, 0]
    lines += ["", "| reg - cls, mean over | OOF | hold-out |", "| --- | --- | --- |"]
    for name in oof.index:
        lines.append(f"| {name} | {_d(oof[name])} | {_d(hold[name])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oof", type=Path, required=True, help="stage 6's oof_dir")
    ap.add_argument("--backbone", default="vgg")
    ap.add_argument("--regions", nargs="+", default=list(REGIONS))
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    table = build_table(args.oof, args.regions, MODES, args.backbone)
    if table[["reg_oof", "cls_oof"]].isna().all().all():
        raise SystemExit(f"{args.oof}: no oof files for backbone {args.backbone}")
    md = to_markdown(table, sex_mean_baseline(args.oof, args.backbone))
    print(md, end="")
    if args.out is not None:
        args.out.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
