"""The self-check on real radiographs and on synthetic negatives: acceptance rate, MAE of accepted vs all,
and a contact sheet of what it rejected.

    .venv/bin/python bench/selfcheck_real.py --models WORK_DIR [--config configs/cpu.yaml] [--set key=value ...]
        [--data ../shared/data/rsna-half] [--n 1000] [--neg-sizes 256 512 1024] [--neg-seeds 0 1 2]
        [--out bench/output]

Every radiograph of rsna-half (or the first `--n`) goes through `boneage.assess.assess_image` (force=True, so
that the MAE of all can be compared with the MAE of the accepted ones; the decision is the `status`). The
hold-out ids (`holdout=True` in rsna-100px/labels.csv) are reported apart: the models of a work dir built
by `bench/make_real_input.py` never trained on them. The negatives of `boneage.negatives.make_negatives` are run
at each size and seed; every one should be rejected.

Writes `{out}/selfcheck_real.csv` (one row per radiograph), `{out}/selfcheck_negatives.csv`,
`{out}/selfcheck_real.md` (printed too) and `{out}/rejected.png` (the rejected radiographs, normalised as the
self-check saw them, with the U-Net's mask outline and the first reason). `--reuse`: only the report and sheet.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from boneage.config import load_config  # noqa: E402
from boneage.fileio import atomic_write_csv, atomic_write_text, read_gray  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
log = logging.getLogger("selfcheck_real")


def _short(reason: str) -> str:
    return reason.split("(")[0].strip()[:40]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", default=str(SHARED / "rsna-half"))
    ap.add_argument("--n", type=int, default=0, help="first N radiographs only (0: all)")
    ap.add_argument("--neg-sizes", type=int, nargs="*", default=[256, 512, 1024])
    ap.add_argument("--neg-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--out", default=str(REPO / "bench" / "output"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse {out}/selfcheck_real.csv and selfcheck_negatives.csv: only the report and the sheet")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    from boneage.assess import assess_image, assess_image_full, load_models
    from boneage.negatives import make_negatives
    from boneage.qc import contact_sheet, outline_mask

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    models = load_models(Path(args.models), cfg, "cpu")
    out = Path(args.out)
    data = Path(args.data)
    lab = pd.read_csv(data / "labels.csv", dtype={"id": str})
    lab["male"] = lab["male"].astype(str).str.lower() == "true"
    hold = pd.read_csv(SHARED / "rsna-100px" / "labels.csv", dtype={"id": str})
    hold_ids = set(hold.loc[hold["holdout"].astype(str).str.lower() == "true", "id"])
    if args.n:
        lab = lab.head(args.n)
    rows = []
    t0 = time.perf_counter()
    for k, r in enumerate([] if args.reuse else lab.itertuples(index=False)):
        img = read_gray(data / "images" / f"{r.id}.jpg")
        res = assess_image(img, bool(r.male), models, cfg, image_id=r.id, force=True)
        qc = res.get("qc", {})
        rows.append({"id": r.id, "male": r.male, "boneage": r.boneage, "holdout": r.id in hold_ids,
                     "status": res["status"], "pred": res.get("bone_age_months"), "quality": qc.get("quality"),
                     **{f"part_{p}": v for p, v in (qc.get("quality_parts") or {}).items()},
                     "finger_gaps": qc.get("finger_gaps"), "second_object_ratio": qc.get("second_object_ratio"),
                     "hand_aspect": qc.get("hand_aspect"), "hand_span": qc.get("hand_span"),
                     "hand_solidity": qc.get("hand_solidity"), "mask_area_frac": qc.get("mask_area_frac"),
                     "dynamic_range": qc.get("dynamic_range"), "block_artefacts": qc.get("block_artefacts"),
                     "registration_method": qc.get("registration_method"),
                     "reasons": "; ".join(res.get("rejection_reasons", []))})
        if (k + 1) % 50 == 0:
            log.info("%d/%d radiographs, %.0f s", k + 1, len(lab), time.perf_counter() - t0)
    if args.reuse:
        df = pd.read_csv(out / "selfcheck_real.csv", dtype={"id": str})
    else:
        df = pd.DataFrame(rows)
        atomic_write_csv(out / "selfcheck_real.csv", df)
    seconds = time.perf_counter() - t0

    neg_rows = []
    for size in [] if args.reuse else args.neg_sizes:
        for seed in args.neg_seeds:
            for name, img in make_negatives(size, seed).items():
                res = assess_image(img, seed % 2 == 0, models, cfg, image_id=f"{name}_{size}_{seed}")
                neg_rows.append({"name": name, "size": size, "seed": seed, "status": res["status"],
                                 "quality": res.get("qc", {}).get("quality"),
                                 "reasons": "; ".join(res.get("rejection_reasons", []))})
    if args.reuse:
        neg = pd.read_csv(out / "selfcheck_negatives.csv")
    else:
        neg = pd.DataFrame(neg_rows)
        atomic_write_csv(out / "selfcheck_negatives.csv", neg)

    acc = df["status"] == "ok"
    err = (df["pred"].astype(float) - df["boneage"]).abs()

    def mae(mask) -> str:
        e = err[mask].dropna()
        return f"{e.mean():.2f} ({len(e)})" if len(e) else "n/a"

    h = df["holdout"]
    lines = [
        "# Self-check on real radiographs and synthetic negatives", "",
        f"Models: `{args.models}`, config `{args.config}` {' '.join(args.overrides)}. "
        f"Data: `{data}`, {len(df)} radiographs ({h.sum()} hold-out). "
        + ("(rows reused) " if args.reuse else f"{seconds:.0f} s, {seconds / max(len(df), 1):.2f} s per radiograph, "
           f"{args.threads} thread(s).") + f" `predict.normalise_input={cfg.predict.normalise_input}`.", "",
        "| set | n | accepted | MAE all (months, n with a number) | MAE accepted | MAE rejected |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, m in (("all rsna-half", np.ones(len(df), bool)), ("hold-out (never trained on)", h.to_numpy()),
                     ("training part", (~h).to_numpy())):
        m = pd.Series(m, index=df.index)
        lines.append(f"| {label} | {m.sum()} | {acc[m].mean():.1%} | {mae(m)} | {mae(m & acc)} | {mae(m & ~acc)} |")
    lines += ["", "Rejection reasons (first reason of each rejected radiograph):", ""]
    first = df.loc[~acc, "reasons"].str.split("; ").str[0].map(_short)
    for reason, n in first.value_counts().items():
        lines.append(f"- {reason}: {n}")
    lines += ["", f"Negatives: {len(neg)} images ({', '.join(map(str, args.neg_sizes))} px, seeds "
              f"{', '.join(map(str, args.neg_seeds))}); rejected {(neg['status'] == 'rejected').sum()} of {len(neg)}.",
              "", "| negative | rejected | first reasons |", "| --- | --- | --- |"]
    for name, g in neg.groupby("name", sort=False):
        rs = sorted(set(g["reasons"].str.split("; ").str[0].map(_short)))
        lines.append(f"| {name} | {(g['status'] == 'rejected').sum()}/{len(g)} | {'; '.join(rs)} |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "selfcheck_real.md", md)
    print(md)

    rej = df[~acc]
    tiles, caps = [], []
    for r in rej.itertuples(index=False):
        img = read_gray(data / "images" / f"{r.id}.jpg")
        try:
            male = str(r.male).lower() == "true"
            _, arrays = assess_image_full(img, male, models, cfg, force=True)  # what the self-check saw
            tile = outline_mask(arrays["image"], arrays["mask"], thickness=max(2, max(img.shape) // 200))
        except Exception:  # the sheet is for a person; a failure here must not lose the figures above
            tile = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        tiles.append(tile)
        caps.append(f"{r.id} q{float(r.quality or 0):.2f} {_short(str(r.reasons))}")
    if not tiles:
        tiles, caps = [np.zeros((64, 64), np.uint8)], ["nothing rejected"]
    contact_sheet(tiles, caps, out / "rejected.png", tile_px=240, columns=6,
                  title=f"rsna-half radiographs rejected by the self-check: {len(rej)} of {len(df)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
