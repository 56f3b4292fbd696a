"""Stage 6: train the bone age networks (regions x heads x sex modes x backbones) over the folds.

Writes `work/models/{model}/fold{k}/` (checkpoints, metrics.jsonl), `oof/{model}.csv`,
`oof/{model}.test.csv` and, with hold-out rows, `oof/{model}.holdout.csv`. A rerun resumes an
interrupted fold from its last epoch and skips finished folds (`--force` retrains).

    python src/06_train.py --config configs/demo.yaml
    python src/06_train.py --config configs/full.yaml --set train.only_models=[cls_C_female_vgg] --fold 2
    torchrun --nproc_per_node=4 src/06_train.py --config configs/full.yaml   # one job, 4 GPUs (DDP)

Spreading the grid over GPUs as independent jobs: one process per (model, fold), e.g.
`CUDA_VISIBLE_DEVICES=$g python src/06_train.py ... --set train.only_models=[NAME] --fold K`;
then one plain run (every fold found done) assembles the oof files. `--list` prints the names.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boneage.cli import run_stage

log = logging.getLogger("boneage.training")


def add_arguments(parser):
    parser.add_argument("--fold", type=int, action="append", default=None,
                        help="train only this fold (repeatable); oof files are assembled once all folds are done")
    parser.add_argument("--list", action="store_true", help="print the model names of the grid and exit")


def main(cfg, args):
    from boneage.runtime import setup_torch
    from boneage.training import list_model_specs, read_folds, train_all

    if args.list:
        for spec in list_model_specs(cfg):
            print(spec.name)
        return
    from boneage.inputs import load_dataset

    setup_torch(cfg.threads, cfg.seed)
    folds = read_folds(cfg)
    ds = load_dataset(cfg)
    done = train_all(cfg, ds.train, ds.test, folds, force=args.force, only_folds=args.fold)
    log.info("oof files complete for %d models: %s", len(done), ", ".join(done))


if __name__ == "__main__":
    sys.exit(run_stage("06_train", "Bone age networks over the folds, with out-of-fold predictions.", main,
                       add_arguments))
