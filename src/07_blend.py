"""Stage 7: blend the out-of-fold predictions per sex, write the submission and the report.

Reads `oof/*.csv` (+ `.test.csv`, optional `.holdout.csv`), `folds/folds.csv`, the test list; writes
`submissions/blend.json`, `submission.csv` (`Case ID,Sex,boneage`), `test_uncertainty.csv`,
`check_cases.csv`, `report.md` with `figures/*.png`. See `boneage.blending` and `boneage.report`.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pandas as pd

from boneage.blending import apply_blend_to_test, fit_blend, read_oof_dir
from boneage.cli import run_stage
from boneage.fileio import atomic_write_csv, atomic_write_json
from boneage.folds import read_folds
from boneage.report import uncertainty_table, write_report

log = logging.getLogger("boneage.07_blend")


def main(cfg, args):
    from boneage.inputs import load_dataset

    ds = load_dataset(cfg)
    train = ds.train.assign(id=ds.train["id"].astype(str))
    test = ds.test.assign(id=ds.test["id"].astype(str))
    sex_by_id = pd.Series(["M" if m else "F" for m in train["male"]], index=train["id"])
    folds = read_folds(cfg.folds_path / "folds.csv")
    data = read_oof_dir(cfg.oof_path, folds, sex_by_id, regions=cfg.blend.regions)
    blend = fit_blend(data, cfg.blend.method, cfg.blend.ridge_alpha, cfg.blend.fallback_single)
    out = cfg.submissions_path
    blend_json = blend.to_json()
    atomic_write_json(out / "blend.json", blend_json)

    test_sex = ["M" if m else "F" for m in test["male"]]
    pred = apply_blend_to_test(blend_json, data, list(test["id"]), test_sex)  # raises naming ids without one
    atomic_write_csv(out / "submission.csv", pd.DataFrame(
        {"Case ID": pred["id"], "Sex": pred["sex"], "boneage": pred["boneage"].round(2)}))
    unc = uncertainty_table(pred, cfg.work_path, cfg.blend.check_keypoint_confidence)
    atomic_write_csv(out / "test_uncertainty.csv", unc)

    truth = cfg.input_path / "ground_truth" / "test_labels.csv"
    report = write_report(out, blend, data, pred, unc, cfg.work_path, cfg.blend,
                          truth_path=truth if truth.exists() else None,
                          train_labels=train[["id", "male", "boneage"]])
    oof = blend.oof_frame()
    best = min((data.oof[m.name]["pred"] - data.oof[m.name]["boneage"]).abs().mean()
               for m in data.models if m.sex_mode not in ("female", "male")) if any(
        m.sex_mode not in ("female", "male") for m in data.models) else float("nan")
    blended = (oof["pred"].clip(0, 240) - oof["boneage"]).abs().mean()
    log.info("blend OOF MAE %.2f months (best single model covering both sexes %.2f); report %s", blended, best, report)
    if blended >= best:
        log.warning("the blend does not beat its best single model on OOF MAE (%.2f >= %.2f)", blended, best)


if __name__ == "__main__":
    sys.exit(run_stage("07_blend", "Blend out-of-fold predictions, write the submission and the report", main))
