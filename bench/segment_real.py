"""Stages 1-2 on real radiographs (../shared/data/rsna-half), with zero manual masks.

Trains the U-Net bootstrap (classical first guess -> pseudo-labels -> self-training) on the
radiographs that carry no evaluation annotation, then measures on the 84 annotated ones:

- share of the 21 manual hand keypoints (54 radiographs) and of the ROI box centres (30) that
  fall inside the predicted mask, for the classical guess alone and for the U-Net;
- mask area / area of the convex hull of the 21 keypoints (every value above 2.5 is a failure);
- speed of stage 1 inference + stage 2 (read JPEG, mask, clean, encode PNGs) with peak memory;
- QC sheets (worst first) under bench/output/segment_real/.

    .venv/bin/python bench/segment_real.py --work-size 256 --epochs 6 --rounds 1 --epochs-per-round 3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import cv2
import numpy as np
import pandas as pd
import torch

from boneage.config import load_config
from boneage.fileio import read_gray
from boneage.masks import classical_mask, clean_radiograph, count_components, detect_inverted, mask_quality
from boneage.qc import contact_sheet, outline_mask
from boneage.segmentation import (
    bootstrap_px,
    bootstrap_unet,
    build_unet,
    predict_masks,
    relabel_unet,
    save_unet,
    to_work,
)

DATA = REPO.parent / "shared" / "data" / "rsna-half"
log = logging.getLogger("segment_real")


def eval_points(data: Path) -> dict[str, tuple[np.ndarray, str]]:
    """id -> (points (k, 2), kind) for keypoints (21) and ROI centres (17)."""
    kp = pd.read_csv(data / "hand_keypoints.csv")
    roi = pd.read_csv(data / "ossification_rois.csv")
    out = {}
    for i, g in kp.groupby("id"):
        out[str(i)] = (g[["x", "y"]].to_numpy(float), "keypoints")
    for i, g in roi.groupby("id"):
        out[str(i)] = (np.c_[(g.x0 + g.x1) / 2, (g.y0 + g.y1) / 2], "rois")
    return out


def score_mask(mask: np.ndarray, pts: np.ndarray, kind: str) -> dict:
    h, w = mask.shape
    xi = np.clip(np.round(pts[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(pts[:, 1]).astype(int), 0, h - 1)
    inside = mask[yi, xi]
    ratio = np.nan
    if kind == "keypoints":
        hull = cv2.convexHull(pts.astype(np.float32))
        ratio = float(mask.sum() / max(cv2.contourArea(hull), 1.0))
    return {"n_points": int(len(inside)), "n_inside": int(inside.sum()), "area_hull_ratio": ratio}


def figures(rows: pd.DataFrame) -> dict:
    out = {}
    for kind in ("keypoints", "rois"):
        r = rows[rows.kind == kind]
        out[f"{kind}_inside_frac"] = round(float(r.n_inside.sum() / max(r.n_points.sum(), 1)), 4)
        out[f"{kind}_images_all_inside"] = f"{int((r.n_inside == r.n_points).sum())}/{len(r)}"
    r = rows[rows.kind == "keypoints"].area_hull_ratio
    out["all_points_inside_frac"] = round(float(rows.n_inside.sum() / rows.n_points.sum()), 4)
    out["area_hull_ratio"] = {"min": round(float(r.min()), 3), "median": round(float(r.median()), 3),
                              "p90": round(float(r.quantile(0.9)), 3), "max": round(float(r.max()), 3),
                              "n_above_2.5": int((r > 2.5).sum()), "n": int(r.notna().sum())}
    return out


def sheet(ids, images, masks, pts_by_id, captions, path, title):
    tiles = []
    for i, img, m in zip(ids, images, masks):
        o = outline_mask(img, m, thickness=max(2, img.shape[0] // 300))
        if i in pts_by_id:
            pts, _ = pts_by_id[i]
            for x, y in pts:
                xi, yi = int(np.clip(x, 0, m.shape[1] - 1)), int(np.clip(y, 0, m.shape[0] - 1))
                cv2.circle(o, (xi, yi), max(3, img.shape[0] // 150), (0, 255, 0) if m[yi, xi] else (0, 0, 255), -1)
        tiles.append(o)
    contact_sheet(tiles, captions, path, tile_px=200, columns=8, title=title)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "output" / "segment_real")
    ap.add_argument("--work-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--epochs-per-round", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=1000, help="at most this many training radiographs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-n", type=int, default=100)
    ap.add_argument("--reuse-model", action="store_true", help="skip training when out/unet.pt exists")
    ap.add_argument("--relabel-epochs", type=int, default=0,
                    help="segment.relabel_epochs: stage 1's relabel round (labels from the whole pipeline at each "
                         "radiograph's own size), also run on a --reuse-model model; 0: off")
    ap.add_argument("--bootstrap-work-size", type=int, default=0,
                    help="segment.bootstrap_work_size_px: the bootstrap's rounds (and the relabel round's label "
                         "predictions) at this size, the relabel round and inference at --work-size; 0: --work-size")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--phantoms", type=int, default=0, help="phantom IoU benchmark with this many training phantoms")
    ap.add_argument("--phantom-px", type=int, default=256)
    ap.add_argument("--manual-frac", type=float, default=0.1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.phantoms:
        return phantom_bench(args)
    if not (args.data / "labels.csv").exists():
        print(f"no data at {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"segment.work_size_px={args.work_size}", f"segment.epochs={args.epochs}",
                             f"segment.self_training_rounds={args.rounds}",
                             f"segment.epochs_per_round={args.epochs_per_round}",
                             f"segment.relabel_epochs={args.relabel_epochs}",
                             f"segment.bootstrap_work_size_px={args.bootstrap_work_size}", *args.overrides])
    sc = cfg.segment
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    labels = pd.read_csv(args.data / "labels.csv", dtype={"id": str})
    pts_by_id = eval_points(args.data)
    eval_ids = [i for i in labels.id if i in pts_by_id]
    train_ids = [i for i in labels.id if i not in pts_by_id][: args.n_train]
    report: dict = {"command": " ".join(sys.argv), "machine": f"{platform.node()} {platform.processor()} "
                    f"{torch.get_num_threads()} torch threads",
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "load_avg_start": list(np.round(np.array(__import__("os").getloadavg()), 2)),
                    "config": {k: getattr(sc, k) for k in ("work_size_px", "encoder", "encoder_depth",
                                                           "decoder_channels", "epochs", "self_training_rounds",
                                                           "epochs_per_round", "batch_size", "lr",
                                                           "pseudo_label_min_quality", "dilate_frac")},
                    "n_train": len(train_ids), "n_eval": len(eval_ids)}

    # ---- classical first guess alone on the evaluation radiographs
    t0 = time.perf_counter()
    rows, cls_masks, images = [], {}, {}
    for i in eval_ids:
        img = read_gray(args.data / "images" / f"{i}.jpg")
        images[i] = img
        m, q, flag = classical_mask(img)
        cls_masks[i] = m
        pts, kind = pts_by_id[i]
        rows.append({"id": i, "kind": kind, "quality": q, "flag": flag, **score_mask(m, pts, kind)})
    cls = pd.DataFrame(rows)
    report["classical"] = figures(cls)
    report["classical"]["seconds_per_image"] = round((time.perf_counter() - t0) / len(eval_ids), 4)
    cls.to_csv(out / "classical_eval.csv", index=False)
    log.info("classical: %s", report["classical"])

    # ---- U-Net bootstrap on the other radiographs
    model_path = out / "unet.pt"
    if args.reuse_model and model_path.exists():
        model = build_unet(sc)
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
        model.eval()
        report["bootstrap"] = json.loads((out / "rounds.json").read_text()) if (out / "rounds.json").exists() else []
    else:
        t0 = time.perf_counter()
        works = [to_work(read_gray(args.data / "images" / f"{i}.jpg"), bootstrap_px(sc)) for i in train_ids]
        stack = np.stack([w.image for w in works])
        inners = [w.inner for w in works]
        t_prep = time.perf_counter() - t0
        boot = bootstrap_unet(stack, inners, {}, sc, device, seed=0)
        model = boot.model
        save_unet(model, out)
        report["bootstrap"] = boot.rounds
        report["train_seconds"] = round(time.perf_counter() - t0, 1)
        report["prep_seconds"] = round(t_prep, 1)
        (out / "rounds.json").write_text(json.dumps(boot.rounds, indent=2))

    if args.relabel_epochs > 0:
        items = ((read_gray(args.data / "images" / f"{i}.jpg"), None) for i in train_ids)
        report["relabel"] = relabel_unet(model, items, sc, device, seed=7)
        save_unet(model, out)
        (out / "rounds.json").write_text(json.dumps(report["bootstrap"] + [report["relabel"]], indent=2))

    # ---- U-Net on the evaluation radiographs
    rows, unet_masks = [], {}
    eval_masks = _predict_many(model, [images[i] for i in eval_ids], sc, device)
    for i, m in zip(eval_ids, eval_masks):
        unet_masks[i] = m
        q, flag = mask_quality(m)
        pts, kind = pts_by_id[i]
        rows.append({"id": i, "kind": kind, "quality": q, "flag": flag, "n_components": count_components(m),
                     **score_mask(m, pts, kind)})
    un = pd.DataFrame(rows)
    un.to_csv(out / "unet_eval.csv", index=False)
    report["unet"] = figures(un)
    report["unet"]["flagged"] = int((un.flag != "").sum())
    log.info("unet: %s", report["unet"])

    # ---- QC sheets on the evaluation radiographs, worst (fewest points inside) first
    for name, df, masks in (("classical", cls, cls_masks), ("unet", un, unet_masks)):
        d = df.assign(frac=df.n_inside / df.n_points).sort_values(["frac", "quality"])
        ids = list(d.id)
        caps = [f"{r.id} in {r.n_inside}/{r.n_points} r{r.area_hull_ratio:.2f} q{r.quality:.2f}"
                for r in d.itertuples()]
        sheet(ids, [images[i] for i in ids], [masks[i] for i in ids], pts_by_id, caps,
              out / f"qc_eval_{name}.png", f"{name}: annotated radiographs, fewest points inside first")

    # ---- stage 1 inference + stage 2, timed, on radiographs not used above; QC sheets worst first
    speed_ids = [i for i in labels.id if i not in pts_by_id][-args.speed_n:]
    times = {"read": 0.0, "mask": 0.0, "clean": 0.0, "write": 0.0}
    qrows, thumbs = [], {}
    t_all = time.perf_counter()
    batch = max(2, sc.predict_batch_size)
    for b0 in range(0, len(speed_ids), batch):
        chunk = speed_ids[b0:b0 + batch]
        t = time.perf_counter()
        imgs = [read_gray(args.data / "images" / f"{i}.jpg") for i in chunk]
        t2 = time.perf_counter()
        ms = _predict_many(model, imgs, sc, device)
        t3 = time.perf_counter()
        times["read"] += t2 - t
        times["mask"] += t3 - t2
        for i, img, m in zip(chunk, imgs, ms):
            _stage2(i, img, m, cfg, times, qrows, thumbs)
    wall = time.perf_counter() - t_all
    n = len(speed_ids)
    report["speed"] = {"n_images": n, "images_per_s": round(n / wall, 2),
                       "ms_per_image": {k: round(1000 * v / n, 1) for k, v in times.items()},
                       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
                       "load_avg_end": list(np.round(np.array(__import__("os").getloadavg()), 2))}
    log.info("speed: %s", report["speed"])
    qd = pd.DataFrame(qrows).sort_values("quality")
    qd.to_csv(out / "speed_quality.csv", index=False)
    report["speed_set_flags"] = {"flagged": int((qd.flag != "").sum()), "inverted": int(qd.inverted.sum()),
                                 "clean_flagged": int((qd.clean_flag != "").sum())}
    top = list(qd.id[:48])
    contact_sheet([outline_mask(thumbs[i][0], thumbs[i][1]) for i in top],
                  [f"{i} q{q:.2f} {f}" for i, q, f in zip(qd.id[:48], qd.quality[:48], qd.flag[:48])],
                  out / "01_masks.png", tile_px=200, title="stage 1 U-Net masks, worst quality first")
    contact_sheet([thumbs[i][2] for i in top], [f"{i} q{q:.2f}" for i, q in zip(qd.id[:48], qd.quality[:48])],
                  out / "02_clean.png", tile_px=200, title="stage 2 clean radiographs, worst mask quality first")

    # ---- polarity over the whole set
    inv = [i for i in labels.id if detect_inverted(read_gray(args.data / "images" / f"{i}.jpg"))]
    report["inverted_detected"] = {"n": len(inv), "ids": inv[:50]}
    (out / "figures.json").write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps({k: report[k] for k in ("classical", "unet", "speed", "inverted_detected")}, indent=2,
                     default=float))
    return 0


def phantom_bench(args) -> int:
    """Bootstrap IoU on phantoms: zero manual masks, and manual masks for `--manual-frac` of them."""
    from boneage.masks import classical_mask
    from boneage.phantom import PhantomConfig, make_phantom
    from boneage.segmentation import mask_to_work

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"segment.work_size_px={args.work_size}", f"segment.epochs={args.epochs}",
                             f"segment.self_training_rounds={args.rounds}",
                             f"segment.epochs_per_round={args.epochs_per_round}",
                             f"segment.relabel_epochs={args.relabel_epochs}",
                             f"segment.bootstrap_work_size_px={args.bootstrap_work_size}", *args.overrides])
    sc = cfg.segment
    pc = PhantomConfig(long_side_px=args.phantom_px)
    train = [make_phantom(pc, 11, i) for i in range(args.phantoms)]
    test = [make_phantom(pc, 12, i) for i in range(max(8, args.phantoms // 4))]
    works = [to_work(p.image, sc.work_size_px) for p in train]
    stack = np.stack([w.image for w in works])
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "phantom_px": args.phantom_px, "n_train": len(train), "n_test": len(test)}

    def iou(a, b):
        return float((a & b).sum() / max((a | b).sum(), 1))

    out["classical_iou"] = _iou_summary([iou(classical_mask(p.image)[0], p.mask > 127) for p in test])
    for frac in sorted({0.0, args.manual_frac}):
        n_man = int(round(frac * len(train)))
        manual = {k: mask_to_work(train[k].mask > 127, sc.work_size_px) for k in range(n_man)}
        t0 = time.perf_counter()
        boot = bootstrap_unet(stack, [w.inner for w in works], manual, sc, torch.device("cpu"), seed=0)
        masks = predict_masks(boot.model, [p.image for p in test], sc, torch.device("cpu"))
        out[f"unet_manual_{frac:.2f}"] = {"n_manual": n_man, "seconds": round(time.perf_counter() - t0, 1),
                                          "iou": _iou_summary([iou(m, p.mask > 127) for m, p in zip(masks, test)]),
                                          "rounds": boot.rounds}
        log.info("phantoms, %d manual: %s", n_man, out[f"unet_manual_{frac:.2f}"]["iou"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "phantom_figures.json").write_text(json.dumps(out, indent=2, default=float))
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}, indent=2, default=float))
    return 0


def _iou_summary(v):
    v = np.array(v)
    return {"mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "min": round(float(v.min()), 4), "share_ge_0.97": round(float((v >= 0.97).mean()), 3)}


def _predict_many(model, imgs, sc, device):
    """Stage 1 inference on a list of radiographs, batched (CPU convolutions are ~3x faster in batches)."""
    return predict_masks(model, imgs, sc, device)


def _stage2(i, img, m, cfg, times, qrows, thumbs):
    t3 = time.perf_counter()
    q, flag = mask_quality(m)
    clean, info = clean_radiograph(img, m, cfg.clean)
    t4 = time.perf_counter()
    cv2.imencode(".png", m.astype(np.uint8) * 255)
    cv2.imencode(".png", clean)
    t5 = time.perf_counter()
    times["clean"] += t4 - t3
    times["write"] += t5 - t4
    qrows.append({"id": i, "quality": q, "flag": flag, "inverted": info["inverted"], "clean_flag": info["flag"]})
    s = 400 / max(img.shape)
    thumbs[i] = (cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA),
                 cv2.resize(m.astype(np.uint8), None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST) > 0,
                 cv2.resize(clean, None, fx=s, fy=s, interpolation=cv2.INTER_AREA))


if __name__ == "__main__":
    sys.exit(main())
