"""Bone age networks on the 100 px test bed: train on the 800 `holdout=False`, MAE on the 200 `holdout=True`.

Uses the stage 6 code itself (`boneage.models`, `boneage.training`): the same networks, heads,
losses, augmentation and optimiser. Every run appends one JSON line to `--out`.

    .venv/bin/python bench/train_100px.py --backbone vgg --head cls --sex-mode sex_input --epochs 15 \
        --seeds 0 1 2 --threads 2 --set train.vgg_width=0.5

`--sex-mode per_sex` trains a female and a male model and scores them together (the paper's
separate per-sex models); `--folds K` trains K models on K folds of the 800 and averages them
(fold ensembling, as stage 6 does for test images). `--ensemble-seeds K` averages K models trained
on all 800 with seeds `seed * K + j` (j = 0..K-1, so the ensembles of different `--seeds` share no
member); `--head reg+cls` makes the members alternate between the two heads (reg, cls, reg, ...).
The JSON line also lists every member's own MAE; `--save-preds DIR` writes each member's and each
ensemble's hold-out predictions. The CPU seconds reported cover the whole ensemble.
`--baseline` prints the sex-mean baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import pandas as pd
import torch

from boneage.config import load_config
from boneage.models import build_model
from boneage.training import (
    CropDataset,
    build_train_transform,
    make_loader,
    make_optimizer,
    make_scheduler,
    predict_loader,
    train_one_epoch,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-100px"


def load_set(data: Path) -> tuple[pd.DataFrame, tuple[int, int]]:
    df = pd.read_csv(data / "labels.csv", dtype={"id": str})
    df["male"] = df["male"].astype(str).str.lower().isin(["true", "1"])
    df["holdout"] = df["holdout"].astype(str).str.lower().isin(["true", "1"])
    df["path"] = [data / "images" / f"{i}.png" for i in df["id"]]
    import cv2

    h, w = cv2.imread(str(df["path"].iloc[0]), cv2.IMREAD_GRAYSCALE).shape
    return df, (h, w)


def sex_mean_baseline(df: pd.DataFrame) -> float:
    tr, ho = df[~df["holdout"]], df[df["holdout"]]
    means = tr.groupby("male")["boneage"].mean()
    return float(np.mean(np.abs(ho["male"].map(means) - ho["boneage"])))


def train_predict(train: pd.DataFrame, test: pd.DataFrame, hw, backbone: str, head: str, sex_mode: str, tcfg,
                  epochs: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = torch.device("cpu")
    model = build_model(backbone, head, sex_mode, hw, tcfg)
    ds = CropDataset(list(train["path"]), train["male"], train["boneage"], hw, build_train_transform(tcfg))
    loader = make_loader(ds, tcfg, device, shuffle=True, drop_last=True)
    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg, epochs * len(loader))
    for _ in range(epochs):
        train_one_epoch(model, loader, opt, sched, head, tcfg, device)
    test_ds = CropDataset(list(test["path"]), test["male"], test["boneage"], hw)
    idx, pred, _ = predict_loader(model, make_loader(test_ds, tcfg, device, shuffle=False), head, tcfg, device)
    out = np.empty(len(test), np.float32)
    out[idx] = pred
    return out


def member_plan(seed: int, n_members: int, head: str) -> list[tuple[int, str]]:
    """(torch seed, head) of each ensemble member: seeds seed * K + j, heads cycling through `head`'s
    parts ("reg+cls": reg, cls, reg, ...). One member (K = 1) is the plain run of `seed`."""
    heads = head.split("+")
    return [(seed * n_members + j, heads[j % len(heads)]) for j in range(n_members)]


def ensemble_mean(preds: list[np.ndarray]) -> np.ndarray:
    """The ensemble's prediction: the plain mean of its members' predictions (months)."""
    return np.mean(np.stack([np.asarray(p, np.float64) for p in preds]), axis=0).astype(np.float32)


def score(pred: np.ndarray, hold: pd.DataFrame) -> tuple[float, float, float]:
    """MAE overall, on girls and on boys (months)."""
    err = np.abs(np.asarray(pred, np.float64) - hold["boneage"].to_numpy(np.float64))
    male = hold["male"].to_numpy(bool)
    return float(err.mean()), float(err[~male].mean()), float(err[male].mean())


def run_once(df, hw, args, tcfg, seed: int, head: str | None = None) -> np.ndarray:
    """Hold-out predictions of one seed (per-sex and fold ensembles combined)."""
    head = head or args.head
    train, hold = df[~df["holdout"]].reset_index(drop=True), df[df["holdout"]].reset_index(drop=True)
    groups = [("female", ~train["male"], ~hold["male"]), ("male", train["male"], hold["male"])] \
        if args.sex_mode == "per_sex" else [(args.sex_mode, train["male"] | True, hold["male"] | True)]
    pred = np.zeros(len(hold), np.float32)
    for mode, tr_mask, ho_mask in groups:
        tr, ho = train[tr_mask.to_numpy()].reset_index(drop=True), hold[ho_mask.to_numpy()]
        if args.folds > 1:
            rng = np.random.default_rng(seed)
            fold = rng.permutation(len(tr)) % args.folds
            p = np.mean([train_predict(tr[fold != k], ho, hw, args.backbone, head, mode, tcfg, args.epochs,
                                       seed * 100 + k) for k in range(args.folds)], axis=0)
        else:
            p = train_predict(tr, ho, hw, args.backbone, head, mode, tcfg, args.epochs, seed)
        pred[ho_mask.to_numpy()] = p
    return pred


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbone", default="vgg")
    ap.add_argument("--head", default="reg", choices=["reg", "cls", "reg+cls"],
                    help="reg+cls: ensemble members alternate between the heads (needs --ensemble-seeds >= 2)")
    ap.add_argument("--sex-mode", default="sex_input", choices=["pooled", "sex_input", "per_sex"])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=1, help="fold ensemble of K models (1: one model on all 800)")
    ap.add_argument("--ensemble-seeds", type=int, default=1, metavar="K",
                    help="average K models trained on all 800 (seeds seed * K + j) per reported seed")
    ap.add_argument("--save-preds", type=Path, default=None, metavar="DIR",
                    help="write each member's and each ensemble's hold-out predictions (CSV) here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "notes" / "train_100px.jsonl")
    ap.add_argument("--baseline", action="store_true", help="print the sex-mean baseline and exit")
    args = ap.parse_args(argv)
    if args.ensemble_seeds < 1 or (args.head == "reg+cls" and args.ensemble_seeds < 2):
        ap.error("--ensemble-seeds must be >= 1 (>= 2 with --head reg+cls)")
    torch.set_num_threads(args.threads)
    df, hw = load_set(args.data)
    if args.baseline:
        print(f"sex-mean baseline MAE on the hold-out: {sex_mean_baseline(df):.2f} months")
        return
    cfg = load_config(None, ["train.num_workers=0", *args.overrides])
    tcfg = cfg.train
    hold = df[df["holdout"]].reset_index(drop=True)
    maes, f_maes, m_maes, secs, cpu_secs, member_maes = [], [], [], [], [], []
    for seed in args.seeds:
        t0, c0 = time.perf_counter(), time.process_time()
        preds = []
        for member_seed, head in member_plan(seed, args.ensemble_seeds, args.head):
            preds.append(run_once(df, hw, args, tcfg, member_seed, head))
            member_maes.append(round(score(preds[-1], hold)[0], 2))
            if args.ensemble_seeds > 1:
                print(f"    member seed {member_seed} ({head}): MAE {member_maes[-1]:.2f}", flush=True)
            _save(args, hold, preds[-1], f"seed{member_seed}_{head}")
        pred = ensemble_mean(preds)
        secs.append(time.perf_counter() - t0)
        cpu_secs.append(time.process_time() - c0)  # CPU time: comparable across runs when the cores are shared
        if args.ensemble_seeds > 1:
            _save(args, hold, pred, f"ensemble{seed}")
        mae, f_mae, m_mae = score(pred, hold)
        maes.append(mae)
        f_maes.append(f_mae)
        m_maes.append(m_mae)
        print(f"  seed {seed}: MAE {maes[-1]:.2f} (F {f_maes[-1]:.2f}, M {m_maes[-1]:.2f}) in {secs[-1]:.0f} s "
              f"({cpu_secs[-1]:.0f} CPU s)", flush=True)
    rec = {"tag": args.tag, "backbone": args.backbone, "head": args.head, "sex_mode": args.sex_mode,
           "epochs": args.epochs, "folds": args.folds, "ensemble_seeds": args.ensemble_seeds,
           "threads": args.threads, "overrides": args.overrides,
           "mae": [round(m, 2) for m in maes], "mae_mean": round(float(np.mean(maes)), 2),
           "mae_sd": round(float(np.std(maes)), 2), "mae_f": round(float(np.mean(f_maes)), 2),
           "mae_m": round(float(np.mean(m_maes)), 2), "member_mae": member_maes,
           "seconds_per_seed": round(float(np.mean(secs)), 1),
           "cpu_seconds_per_seed": round(float(np.mean(cpu_secs)), 1), "load_avg": round(os.getloadavg()[0], 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(rec), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _save(args, hold: pd.DataFrame, pred: np.ndarray, name: str) -> None:
    if args.save_preds is None:
        return
    args.save_preds.mkdir(parents=True, exist_ok=True)
    stem = f"{args.tag}_{name}" if args.tag else name
    pd.DataFrame({"id": hold["id"], "male": hold["male"], "boneage": hold["boneage"], "pred": pred}).to_csv(
        args.save_preds / f"{stem}.csv", index=False)


if __name__ == "__main__":
    main()
