"""Stage 5: write folds/folds.csv (id,fold,holdout), K folds stratified by bone-age bin x sex."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boneage.cli import run_stage
from boneage.fileio import atomic_write_csv
from boneage.folds import make_folds
from boneage.inputs import load_dataset

log = logging.getLogger("boneage.folds")


def main(cfg, args):
    out = cfg.folds_path / "folds.csv"
    ds = load_dataset(cfg)
    folds = make_folds(ds.train, cfg.folds.n_folds, cfg.folds.seed, cfg.folds.holdout_n, cfg.folds.age_bin_months)
    atomic_write_csv(out, folds)
    counts = folds[~folds["holdout"]].groupby("fold").size().to_dict()
    log.info("wrote %s: %d folds %s, %d held out", out, cfg.folds.n_folds, counts, int(folds["holdout"].sum()))


if __name__ == "__main__":
    sys.exit(run_stage("05_folds", "Stratified folds and hold-out.", main))
