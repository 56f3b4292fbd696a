"""What each stage is worth (issue 8): the same network on the same folds fed (1) the raw radiograph,
(2) the cleaned radiograph (stages 1-2), (3) the registered whole hand, region A (stages 1-4), against
(4) the full method, the blend of regions A, B, C and both heads.

    .venv/bin/python bench/ablation.py --oof OOF_DIR --folds FOLDS_CSV [--labels TEST_LABELS_CSV]
        [--test-csv boneage-test-dataset.csv] [--arm "label=model[,model...]" ...] [--out FILE.md]

Reads the out-of-fold files stage 6 wrote. `configs/cpu.yaml` writes the whole-radiograph inputs
(`register.baseline_inputs`); their models are one more stage-6 call after the run:
`bash run_all.sh --config configs/cpu.yaml ... --only 6 --set 'train.regions=[raw,clean]'`
(stage 7 blends only `blend.regions`, A, B, C, so they never enter the submission).
Default arms whose models are missing are skipped with a line saying so. An arm with one model is that
model's predictions; an arm with several is their
linear blend, fitted and cross-validated over the folds exactly as stage 7 does (`boneage.blending`).
For each arm: the OOF MAE over the training radiographs, the mean and SD of the per-fold MAEs, and,
with `--labels`, the MAE on the test radiographs (fold-mean predictions; never trained on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from boneage.blending import OofSet, apply_blend_to_test, fit_blend, read_oof_dir  # noqa: E402
from boneage.folds import read_folds  # noqa: E402

DEFAULT_ARMS = [
    "(1) raw radiograph, reg=reg_raw_sex_input_vgg",
    "(1) raw radiograph, reg + cls=reg_raw_sex_input_vgg,cls_raw_sex_input_vgg",
    "(2) cleaned radiograph (stages 1-2), reg=reg_clean_sex_input_vgg",
    "(2) cleaned radiograph (stages 1-2), reg + cls=reg_clean_sex_input_vgg,cls_clean_sex_input_vgg",
    "(3) registered hand A (stages 1-4), reg=reg_A_sex_input_vgg",
    "(3) registered hand A (stages 1-4), reg + cls=reg_A_sex_input_vgg,cls_A_sex_input_vgg",
    "(4) full method: blend of A, B, C x reg, cls=reg_A_sex_input_vgg,cls_A_sex_input_vgg,reg_B_sex_input_vgg,"
    "cls_B_sex_input_vgg,reg_C_sex_input_vgg,cls_C_sex_input_vgg",
]


def parse_arm(text: str) -> tuple[str, list[str]]:
    label, _, models = text.rpartition("=")
    if not label or not models:
        raise SystemExit(f"--arm '{text}': expected 'label=model[,model...]'")
    return label, [m.strip() for m in models.split(",") if m.strip()]


def subset(data: OofSet, names: list[str]) -> OofSet:
    missing = [n for n in names if n not in data.oof]
    if missing:
        raise SystemExit(f"no out-of-fold file for {', '.join(missing)} (have {', '.join(sorted(data.oof))})")
    keep = set(names)
    return OofSet([m for m in data.models if m.name in keep], {n: data.oof[n] for n in names},
                  {n: data.test[n] for n in names if n in data.test},
                  {n: data.holdout[n] for n in names if n in data.holdout}, data.folds)


def arm_predictions(data: OofSet, names: list[str],
                    test: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(oof id, fold, boneage, pred), (test id, pred) for one model or the blend of several."""
    sub = subset(data, names)
    if len(names) == 1:
        oof = sub.oof[names[0]][["id", "fold", "boneage", "pred"]]
        tp = sub.test[names[0]][["id", "pred"]] if test is not None else None
        return oof, tp
    blend = fit_blend(sub)
    oof = blend.oof_frame()[["id", "fold", "boneage", "pred"]]
    tp = None
    if test is not None:
        tp = apply_blend_to_test(blend.to_json(), sub, test["id"].tolist(), test["sex"].tolist())
        tp = tp.rename(columns={"boneage": "pred"})[["id", "pred"]]
    return oof, tp


def mae(pred, truth) -> float:
    return float(np.mean(np.abs(np.clip(np.asarray(pred, float), 0, 240) - np.asarray(truth, float))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oof", type=Path, required=True)
    ap.add_argument("--folds", type=Path, required=True)
    ap.add_argument("--labels", type=Path, help="test labels id,boneage,male (ground_truth/test_labels.csv)")
    ap.add_argument("--test-csv", type=Path, help="boneage-test-dataset.csv (Case ID,Sex), needed for blended arms")
    ap.add_argument("--arm", action="append", help="label=model[,model...] (default: the four arms of issue 8)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    data = read_oof_dir(args.oof, read_folds(args.folds))
    labels = test = None
    if args.labels:
        labels = pd.read_csv(args.labels, dtype={"id": str})
        if args.test_csv:
            t = pd.read_csv(args.test_csv, dtype={"Case ID": str})
            test = pd.DataFrame({"id": t["Case ID"].astype(str), "sex": t["Sex"].astype(str).str.upper().str[0]})
        else:
            test = pd.DataFrame({"id": labels["id"], "sex": np.where(labels["male"].astype(str).str.lower()
                                                                       .isin(["true", "1"]), "M", "F")})
    rows = []
    for text in args.arm or DEFAULT_ARMS:
        label, names = parse_arm(text)
        if not args.arm and any(n not in data.oof for n in names):  # a default arm whose models were not trained
            print(f"skipped: {label} (no out-of-fold file for {', '.join(n for n in names if n not in data.oof)})")
            continue
        oof, tp = arm_predictions(data, names, test)
        per_fold = [mae(g["pred"], g["boneage"]) for _, g in oof.groupby("fold")]
        row = {"arm": label, "models": len(names), "n_oof": len(oof), "oof_mae": mae(oof["pred"], oof["boneage"]),
               "fold_mean": float(np.mean(per_fold)), "fold_sd": float(np.std(per_fold, ddof=1)),
               "fold_maes": ", ".join(f"{v:.2f}" for v in per_fold)}
        if tp is not None:
            m = labels.merge(tp, on="id")
            row.update(n_test=len(m), test_mae=mae(m["pred"], m["boneage"]))
        rows.append(row)
    df = pd.DataFrame(rows)
    lines = ["| arm | OOF MAE (n) | per-fold MAE mean +- SD | per fold | test MAE (n) |",
             "| --- | --- | --- | --- | --- |"]
    for r in df.to_dict("records"):
        test_cell = f"{r['test_mae']:.2f} ({r['n_test']})" if "test_mae" in r and pd.notna(r.get("test_mae")) else "—"
        lines.append(f"| {r['arm']} | {r['oof_mae']:.2f} ({r['n_oof']}) | {r['fold_mean']:.2f} +- {r['fold_sd']:.2f} "
                     f"| {r['fold_maes']} | {test_cell} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
