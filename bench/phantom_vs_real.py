"""Phantoms beside real radiographs of similar bone age: bench/output/phantom_vs_real.png.

    .venv/bin/python bench/phantom_vs_real.py [--seed 3]

Row 1: 8 real RSNA radiographs (../shared/data/rsna-half) nearest to 1, 3, 5, 7, 9, 11, 14, 17 years
(same sex as the phantom below). Row 2: phantoms with the default acquisition artefacts. Row 3: the
same phantoms clean (cfg.artefacts=False). Also prints intensity statistics (background, soft tissue,
bone) of the clean phantoms next to rough ones of the real images for a numeric comparison.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
import numpy as np
import pandas as pd

from boneage.fileio import read_gray
from boneage.phantom import PhantomConfig, render_phantom
from boneage.qc import contact_sheet

AGES_Y = [1, 3, 5, 7, 9, 11, 14, 17]
SEXES = ["F", "M", "F", "M", "F", "M", "F", "M"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "output" / "phantom_vs_real.png"))
    a = ap.parse_args()
    data = REPO.parent / "shared" / "data" / "rsna-half"
    if not (data / "labels.csv").exists():
        sys.exit(f"real data not found at {data}")
    labels = pd.read_csv(data / "labels.csv")
    real, real_cap, ph_art, ph_cap, ph_clean, clean_cap = [], [], [], [], [], []
    for k, (y, sex) in enumerate(zip(AGES_Y, SEXES)):
        sub = labels[labels["male"] == (sex == "M")]
        row = sub.iloc[(sub["boneage"] - 12 * y).abs().argsort().iloc[0]]
        real.append(read_gray(data / "images" / f"{row['id']}.jpg"))
        real_cap.append(f"real {row['id']} {sex} {row['boneage']:.0f} mo")
        ba = float(row["boneage"])
        s = render_phantom(ba, sex, PhantomConfig(), a.seed, k)
        ph_art.append(s.image)
        ph_cap.append(f"phantom {sex} {ba:.0f} mo rot {s.params['rotation_deg']:.0f}")
        c = render_phantom(ba, sex, PhantomConfig(artefacts=False), a.seed, k)
        ph_clean.append(c.image)
        clean_cap.append(f"clean {sex} {ba:.0f} mo (app {c.params['appearance_age_months']:.0f})")
        inside = c.mask > 0
        print(f"{sex} {ba:5.0f} mo  phantom clean: background {np.median(c.image[~inside]):5.1f}  "
              f"soft p25 {np.percentile(c.image[inside], 25):5.1f}  bone p95 {np.percentile(c.image[inside], 95):5.1f}"
              f" | real: p5 {np.percentile(real[-1], 5):5.1f} p50 {np.percentile(real[-1], 50):5.1f} "
              f"p99 {np.percentile(real[-1], 99):5.1f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(real + ph_art + ph_clean, real_cap + ph_cap + clean_cap, Path(a.out), tile_px=256, columns=8,
                  title="real RSNA (top) / phantoms with artefacts (middle) / clean phantoms (bottom)")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
