"""How far does JPEG compression move the bone age, against the block edges the self-check sees? Calibrates
`predict.block_ok_levels` / `block_scale_levels` (the self-check's compression part) on radiographs that the
stress test does not use.

    .venv/bin/python bench/compression.py --models WORK_DIR [--config configs/cpu.yaml] [--set key=value ...]
        [--split holdout|train] [--skip 40] [--n 80] [--qualities 30,50,70,90] [--out bench/output/compression]

- radiographs: the rsna-half hold-out in `bench/stress.py`'s order, from the `--skip`-th (the stress test reads the
  first 40), `--n` of them, or with `--split train` the training part's (the models have seen them; but the
  low-contrast films whose compression the stretch multiplies are nearly all there or in the stress test's 40);
  each compressed at every quality of `--qualities` (OpenCV's JPEG at the film's own resolution) and run through
  the whole chain (`boneage.assess.assess_image`, force=True, so every variant has a number).
- per variant: |pred(variant) - pred(original)| in months and `qc.block_artefacts` (JPEG block edges in the clean
  hand, grey levels) with the self-check's verdict.

Writes `{out}/compression.md` (also printed: the shift by band of block edges and by quality, with the share the
self-check refuses), `{out}/compression.png` (shift against block edges) and `{out}/compression_rows.csv`.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from bench.stress import jpeg, load_rows, model_args, pick_ids, write_outputs  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.fileio import read_gray  # noqa: E402

log = logging.getLogger("compression")
BANDS = [0, 4, 8, 12, 16, 1e9]


def pick_films(data: Path, split: str, skip: int, n: int) -> pd.DataFrame:
    """`n` radiographs from the `skip`-th: of the hold-out in the stress test's order, or of the training part
    (rsna-100px's `holdout=False`) in that file's order."""
    return pick_ids(data, skip + n, holdout=split == "holdout").iloc[skip:].reset_index(drop=True)


def run(args) -> pd.DataFrame:
    import torch

    from boneage.assess import assess_image, load_models

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    models = load_models(Path(args.models), cfg, "cpu")
    df = pick_films(Path(args.data), args.split, args.skip, args.n)
    qualities = [int(q) for q in args.qualities.split(",")]
    rows, t0 = [], time.perf_counter()
    for k, r in enumerate(df.itertuples(index=False)):
        img = read_gray(Path(args.data) / "images" / f"{r.id}.jpg")
        for q in [0] + qualities:
            res = assess_image(img if q == 0 else jpeg(img, q), bool(r.male), models, cfg,
                               image_id=f"{r.id}_q{q}", force=True)
            qc = res.get("qc", {})
            rows.append({"id": r.id, "quality_jpeg": q, "pred": res.get("bone_age_months"), "status": res["status"],
                         "block_artefacts": qc.get("block_artefacts"), "quality": qc.get("quality"),
                         "reasons": "; ".join(res.get("rejection_reasons", []))})
        log.info("%d/%d radiographs, %.0f s", k + 1, len(df), time.perf_counter() - t0)
    return pd.DataFrame(rows)


def shifts(rows: pd.DataFrame) -> pd.DataFrame:
    orig = rows[rows["quality_jpeg"] == 0].set_index("id")
    v = rows[rows["quality_jpeg"] != 0].copy()
    v["shift"] = (v["pred"].astype(float) - v["id"].map(orig["pred"].astype(float))).abs()
    v["refused"] = v["status"] != "ok"
    v["band"] = pd.cut(v["block_artefacts"].astype(float), BANDS, right=False,
                       labels=[f"{a:g}-{b:g}" if b < 1e9 else f">= {a:g}" for a, b in zip(BANDS, BANDS[1:])])
    return v


def table(v: pd.DataFrame, by: str) -> list[str]:
    lines = [f"| {by} | n | median shift | p90 | share > 12 mo | refused | accepted median |", "|" + " --- |" * 7]
    for key, g in v.groupby(by, observed=True):
        acc = g.loc[~g["refused"], "shift"]
        lines.append(f"| {key} | {len(g)} | {g['shift'].median():.2f} | {g['shift'].quantile(0.9):.2f} | "
                     f"{(g['shift'] > 12).mean():.0%} | {g['refused'].mean():.0%} | "
                     f"{acc.median() if len(acc) else float('nan'):.2f} |")
    return lines


def to_markdown(v: pd.DataFrame, rows: pd.DataFrame, args) -> str:
    orig = rows[rows["quality_jpeg"] == 0]
    return "\n".join([
        "# JPEG compression: bone age shift against the block edges in the clean hand", "",
        f"Models: `{args.models}` (config `{args.config}`{', ' + ' '.join(args.overrides) if args.overrides else ''}). "
        f"{orig['id'].nunique()} rsna-half {getattr(args, 'split', 'holdout')} radiographs from the {args.skip}-th; "
        "originals: block edges "
        f"median {orig['block_artefacts'].median():.2f}, max {orig['block_artefacts'].max():.2f} grey levels, "
        f"{(orig['status'] == 'ok').mean():.0%} accepted.", "",
        "By block edges (grey levels of the clean hand):", "", *table(v, "band"), "",
        "By JPEG quality:", "", *table(v, "quality_jpeg"), ""])


def plot(v: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for q, g in v.groupby("quality_jpeg"):
        ax.scatter(g["block_artefacts"], g["shift"], s=12, alpha=0.7, label=f"JPEG {q}")
    ax.axhline(12, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("block edges in the clean hand (grey levels)")
    ax.set_ylabel("|shift| (months)")
    ax.set_title("bone age shift under JPEG compression")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = model_args(__doc__)
    ap.add_argument("--split", choices=["holdout", "train"], default="holdout",
                    help="train: the models' own training radiographs (rsna-half's low-contrast films, ids 2000-4999, "
                    "are nearly all among the stress test's first 40 of the hold-out or in training)")
    ap.add_argument("--skip", type=int, default=40)
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--qualities", default="30,50,70,90")
    ap.add_argument("--rows", help="reuse a compression_rows.csv instead of running the models")
    ap.add_argument("--out", default=str(REPO / "bench" / "output" / "compression"))
    args, out, rows = load_rows(ap, argv, "compression", run, lambda f: pd.read_csv(f, dtype={"id": str}))
    v = shifts(rows)
    write_outputs(out, "compression", to_markdown(v, rows, args), partial(plot, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
