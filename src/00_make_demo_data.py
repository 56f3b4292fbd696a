"""Stage 0: render the phantom data set (Kaggle layout, annotations, ground truth) into the input folder.

    .venv/bin/python src/00_make_demo_data.py --config configs/smoke.yaml \
        --set demo.n_train=40 demo.n_test=10 demo.out_dir=/tmp/phantoms
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boneage.cli import run_stage
from boneage.demo_data import make_demo_dataset


def main(cfg, args):
    make_demo_dataset(cfg, force=args.force)


if __name__ == "__main__":
    sys.exit(run_stage("00_make_demo_data", "Render the synthetic phantom data set in the Kaggle RSNA layout", main))
