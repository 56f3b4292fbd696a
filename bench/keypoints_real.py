"""Stages 3-4 on real radiographs (../shared/data/rsna-half): keypoint accuracy, mirror detection,
registration beside the paper authors' own, and inference speed.

    .venv/bin/python bench/keypoints_real.py prep            # masks + clean images (boneage.masks, classical)
    .venv/bin/python bench/keypoints_real.py train [--device cuda] [--epochs 30]
    .venv/bin/python bench/keypoints_real.py eval            # figures + sheets into bench/output/keypoints_real/
    .venv/bin/python bench/keypoints_real.py speed [--n 100] # stages 3+4 inference, radiographs/s
    .venv/bin/python bench/keypoints_real.py phantoms        # keypoint error, mirror, crops on phantoms

Masks: no stage-1 U-Net is trained here, so the masks are `boneage.masks.classical_mask` (the
stage-1 bootstrap's first guess) and the clean images `boneage.masks.clean_radiograph`; a bad
mask is counted against the keypoints (nothing is excluded).

Ground truth: `hand_keypoints.csv` (54 radiographs; `middle_finger4`, `thumb4` at the soft-tissue
tip, `wrist` at the distal radius) and the `Wrist` box centre of `ossification_rois.csv` (30
radiographs) for the capitate. Errors in % of the hand's fingertip-to-wrist distance (manual
middle_finger4 to manual wrist; for the box set: predicted middle tip to the mean of the Radius and
Ulna box centres). `hand_boxes.csv` `side` gives the mirrored hands.

Protocol (no figure on images a model trained on):
- zero annotations: geometric points; and a network trained on the confident geometric
  pseudo-labels of the ~900 radiographs that are in neither evaluation set.
- with the shared manual points: the 54 keypoint radiographs in 3 folds; per fold the network
  trains on the pseudo-labels above plus the manual tips of the other two folds (capitate masked:
  the manual set has none) and predicts the held-out fold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import cv2
import numpy as np
import pandas as pd

from boneage.config import load_config
from boneage.keypoints import (
    combine_model_geometric,
    finish_network_points,
    from_view,
    geometric_from_cfg,
    load_keypoint_model,
    network_view,
    predict_batch,
    predict_keypoints,
    save_model,
    second_readings,
    to_square,
    train_model,
)
from boneage.registration import crop_regions, is_mirrored, region_box, register_radiograph

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "output" / "keypoints_real"
CACHE = OUT / "cache"
# the CSVs are copied into the cache by `prep`, so `train` runs on a machine without ../shared
HALF = DATA / "rsna-half" if (DATA / "rsna-half" / "labels.csv").exists() else CACHE / "csv"


def ids_sets():
    lab = pd.read_csv(HALF / "labels.csv", dtype={"id": str})
    kp_ids = sorted(lab.loc[lab.has_keypoints, "id"])
    roi_ids = sorted(lab.loc[lab.has_rois, "id"])
    return lab["id"].tolist(), kp_ids, roi_ids


def cmd_prep(args):
    from boneage.fileio import read_gray
    from boneage.masks import classical_mask, clean_radiograph

    cfg = load_config(None)
    (CACHE / "masks").mkdir(parents=True, exist_ok=True)
    (CACHE / "clean").mkdir(parents=True, exist_ok=True)
    (CACHE / "csv").mkdir(parents=True, exist_ok=True)
    for f in HALF.glob("*.csv"):
        (CACHE / "csv" / f.name).write_bytes(f.read_bytes())
    all_ids, _, _ = ids_sets()
    for i in all_ids:
        if (CACHE / "clean" / f"{i}.png").exists():
            continue
        src = Path(args.from_dir) if args.from_dir else None
        if src and (src / "clean" / f"{i}.png").exists():
            for sub in ("masks", "clean"):
                (CACHE / sub / f"{i}.png").write_bytes((src / sub / f"{i}.png").read_bytes())
            continue
        img = read_gray(HALF / "images" / f"{i}.jpg")
        m, _, _ = classical_mask(img, 384)
        c, info = clean_radiograph(img, m, cfg.clean)
        cv2.imwrite(str(CACHE / "masks" / f"{i}.png"), info["mask"].astype(np.uint8) * 255)
        cv2.imwrite(str(CACHE / "clean" / f"{i}.png"), c)
    # geometric points and network inputs for every radiograph, in one file that travels
    kcfg = cfg.keypoints
    size = kcfg.input_size_px
    geo, conf, sq, scale = [], [], [], []
    for i in all_ids:
        m = cv2.imread(str(CACHE / "masks" / f"{i}.png"), 0) > 0
        c = cv2.imread(str(CACHE / "clean" / f"{i}.png"), 0)
        p, cf = geometric_from_cfg(m, kcfg)
        s, k = to_square(c, size)
        geo.append(p)
        conf.append(cf)
        sq.append(s)
        scale.append(k)
    np.savez_compressed(CACHE / f"inputs_{size}.npz", ids=np.array(all_ids), geo=np.array(geo), conf=np.array(conf),
                        sq=np.array(sq), scale=np.array(scale))
    print(f"prep: {len(all_ids)} radiographs, median geometric confidence {np.median(conf):.2f}")


def manual_table():
    kp = pd.read_csv(HALF / "hand_keypoints.csv", dtype={"id": str})
    piv = kp.pivot_table(index="id", columns="point", values=["x", "y"])
    out = {}
    for i in piv.index:
        out[i] = {k: np.array([piv.loc[i, ("x", n)], piv.loc[i, ("y", n)]], float)
                  for k, n in (("tip", "middle_finger4"), ("thumb", "thumb4"), ("wrist", "wrist"))}
    return out


def roi_table():
    r = pd.read_csv(HALF / "ossification_rois.csv", dtype={"id": str})
    r["cx"], r["cy"] = (r.x0 + r.x1) / 2, (r.y0 + r.y1) / 2
    out = {}
    for i, g in r.groupby("id"):
        out[i] = {"capitate": g.loc[g.label == "Wrist", ["cx", "cy"]].to_numpy(float)[0],
                  "radius_ulna": g.loc[g.label.isin(["Radius", "Ulna"]), ["cx", "cy"]].to_numpy(float).mean(0)}
    return out


def cmd_train(args):
    import torch

    from boneage.runtime import setup_torch

    cfg = load_config(None, [f"keypoints.epochs={args.epochs}", f"keypoints.batch_size={args.batch}"])
    kcfg = cfg.keypoints
    setup_torch(args.threads, 0)
    device = torch.device(args.device)
    d = np.load(CACHE / f"inputs_{kcfg.input_size_px}.npz")
    ids = list(d["ids"])
    idx = {i: k for k, i in enumerate(ids)}
    _, kp_ids, roi_ids = ids_sets()
    held = set(kp_ids) | set(roi_ids)
    man = manual_table()
    pseudo = [i for i in ids if i not in held and d["conf"][idx[i]] >= kcfg.min_geometric_confidence
              and np.isfinite(d["geo"][idx[i]]).all()]
    pseudo = pseudo[: args.limit] if args.limit else pseudo
    print(f"train: {len(pseudo)} pseudo-labelled radiographs (of {len(ids) - len(held)} not evaluated)", flush=True)

    def fit(extra: list[str], tag: str):
        imgs = [d["sq"][idx[i]] for i in pseudo]
        pts = [d["geo"][idx[i]] * d["scale"][idx[i]] for i in pseudo]
        vis = [np.ones(3, bool) for _ in pseudo]
        wts = [1.0] * len(pseudo)
        for i in extra:
            p = np.stack([man[i]["tip"], man[i]["thumb"], [np.nan, np.nan]])
            imgs.append(d["sq"][idx[i]])
            pts.append(np.nan_to_num(p) * d["scale"][idx[i]])
            vis.append(np.array([True, True, False]))
            wts.append(args.manual_weight)
        t0 = time.perf_counter()
        model = train_model(imgs, pts, vis, kcfg, device, weights=wts, log_every=5)
        print(f"train {tag}: {len(imgs)} images, {args.epochs} epochs, {time.perf_counter() - t0:.0f} s", flush=True)
        return model

    preds = {}
    model = fit([], "zero")
    save_model(model, OUT / "model_zero", {"epochs": args.epochs})
    ev = sorted(held)
    out = predict_batch(model, [d["sq"][idx[i]] for i in ev], device)
    preds["zero"] = {i: (p / d["scale"][idx[i]]).tolist() for i, p in zip(ev, out)}
    rng = np.random.default_rng(0)
    order = list(rng.permutation(kp_ids))
    folds = [order[k::3] for k in range(3)]
    preds["manual"] = {}
    for k, fold in enumerate(folds):
        train_ids = [i for i in kp_ids if i not in fold]
        m = fit(train_ids, f"fold{k}")
        out = predict_batch(m, [d["sq"][idx[i]] for i in fold], device)
        preds["manual"].update({i: (p / d["scale"][idx[i]]).tolist() for i, p in zip(fold, out)})
    (OUT / "preds.json").write_text(json.dumps(preds))
    print("train: wrote", OUT / "preds.json")


def errors_for(points: dict[str, np.ndarray], man: dict, rois: dict, sides: dict) -> dict:
    tip_e, th_e, cap_e, mirror_wrong = [], [], [], []
    for i, m in man.items():
        if i not in points:
            continue
        p = points[i]
        L = np.hypot(*(m["tip"] - m["wrist"]))
        tip_e.append(np.hypot(*(p[0] - m["tip"])) / L * 100 if np.isfinite(p[0]).all() else np.inf)
        th_e.append(np.hypot(*(p[1] - m["thumb"])) / L * 100 if np.isfinite(p[1]).all() else np.inf)
        mir = is_mirrored(p)
        if mir is None or mir != (sides[i] == "right"):
            mirror_wrong.append(i)
    for i, r in rois.items():
        if i not in points:
            continue
        p = points[i]
        L = np.hypot(*(p[0] - r["radius_ulna"])) if np.isfinite(p[0]).all() else np.nan
        cap_e.append(np.hypot(*(p[2] - r["capitate"])) / L * 100 if np.isfinite(p[2]).all() and L > 0 else np.inf)

    def q(v):
        v = np.asarray(v, float)
        if not len(v):
            return {"n": 0}
        return {"n": int(len(v)), "median": round(float(np.median(v)), 2), "p90": round(float(np.quantile(v, 0.9)), 2)}

    return {"middle_tip_pct": q(tip_e), "thumb_tip_pct": q(th_e), "capitate_pct": q(cap_e),
            "mirror_wrong": mirror_wrong}


def cmd_eval(args):
    cfg = load_config(None, [f"register.canvas_scale={args.canvas_scale}"])
    kcfg, rcfg = cfg.keypoints, cfg.register
    _, kp_ids, roi_ids = ids_sets()
    man, rois = manual_table(), roi_table()
    sides = pd.read_csv(HALF / "hand_boxes.csv", dtype={"id": str}).set_index("id")["side"].to_dict()
    d = np.load(CACHE / f"inputs_{kcfg.input_size_px}.npz")
    idx = {i: k for k, i in enumerate(d["ids"])}
    masks = {i: cv2.imread(str(CACHE / "masks" / f"{i}.png"), 0) > 0 for i in set(kp_ids) | set(roi_ids)}
    results = {}
    geo = {i: d["geo"][idx[i]] for i in masks}
    results["geometric (zero annotations)"] = errors_for(geo, man, rois, sides)
    # the capitate proportions (config defaults) were read off these 30 box radiographs: leave-one-out
    from boneage.keypoints import fit_geometric_proportions

    loo = {}
    for i in roi_ids:
        others = [(masks[j], np.stack([[np.nan, np.nan], [np.nan, np.nan], rois[j]["capitate"]])) for j in roi_ids
                  if j != i]
        props = fit_geometric_proportions(others)
        loo[i] = geometric_from_cfg(masks[i], kcfg, props)[0]
    results["geometric capitate, proportions leave-one-out"] = {"capitate_pct": errors_for(loo, {}, rois, sides)[
        "capitate_pct"]}
    pj = OUT / "preds.json"
    fused = {}
    if pj.exists():
        preds = json.loads(pj.read_text())
        for tag, name in (("zero", "network+geometric, zero annotations"),
                          ("manual", "network+geometric, manual tips in training (3 folds)")):
            raw = {i: np.array(p) for i, p in preds[tag].items()}
            results[name.replace("network+geometric", "network alone")] = errors_for(raw, man, rois, sides)
            fz = {}
            for i, p in raw.items():
                fz[i] = combine_model_geometric(p, geo[i], float(d["conf"][idx[i]]), masks[i])[0]
            results[name] = errors_for(fz, man, rois, sides)
            if tag == "zero":
                fused = fz
    for k, v in results.items():
        print(f"{k}: {json.dumps(v)}")
    (OUT / "figures.json").write_text(json.dumps(results, indent=1))
    # registration on the keypoint set: method, flags and mirror decisions against hand_boxes `side`
    from boneage.registration import check_points, hand_length_stats

    pts_for = fused or geo
    stats = hand_length_stats(np.array([d["geo"][k] for k in range(len(d["ids"]))]))
    reg_rows = []
    for i in kp_ids:
        p = pts_for[i]
        conf = float(d["conf"][idx[i]])
        why = check_points(p, conf, masks[i], rcfg, stats)
        mir = (is_mirrored(p) if not why else False)
        reg_rows.append({"id": i, "method": "mask" if why else "keypoints", "flag": why, "mirrored": mir,
                         "truth_mirrored": sides[i] == "right"})
    reg = pd.DataFrame(reg_rows)
    wrong = reg[reg["mirrored"] != reg["truth_mirrored"]]
    print(f"registration on the 54 keypoint radiographs: {int((reg.method == 'mask').sum())} mask fallbacks "
          f"({reg.loc[reg.method == 'mask', 'id'].tolist()}); mirrored wrongly: {wrong['id'].tolist()}; "
          f"mirrored {int(reg.mirrored.sum())} of {int(reg.truth_mirrored.sum())} right hands")
    results["registration_54"] = {"mask_fallbacks": reg.loc[reg.method == "mask", "id"].tolist(),
                                  "mirrored_wrongly": wrong["id"].tolist()}
    (OUT / "figures.json").write_text(json.dumps(results, indent=1))
    # sheets: registered canvases beside the reference, and a sample of registered real radiographs
    ref_dir = DATA / "reference-registered" / "images"
    tiles = []
    for i in ["1437", "2249", "2550"]:
        c = cv2.imread(str(CACHE / "clean" / f"{i}.png"), 0)
        m = cv2.imread(str(CACHE / "masks" / f"{i}.png"), 0) > 0
        p = pts_for.get(i)
        if p is None:
            p, cf = geometric_from_cfg(m, kcfg)
        can, row = register_radiograph(c, p, 1.0, m, rcfg)
        ref = cv2.imread(str(ref_dir / f"{i}.jpg"), 0)
        ref = cv2.resize(ref, (can.shape[1], can.shape[0]), interpolation=cv2.INTER_AREA)
        tiles += [_boxes(can, rcfg, f"{i} ours"), _boxes(ref, rcfg, f"{i} reference")]
    cv2.imwrite(str(OUT / "side_by_side.png"), np.hstack(tiles))
    sample = kp_ids[:12] + roi_ids[:12]
    tiles = []
    for i in sample:
        c = cv2.imread(str(CACHE / "clean" / f"{i}.png"), 0)
        m = masks[i]
        p = pts_for.get(i, geo[i])
        can, row = register_radiograph(c, p, 1.0, m, rcfg)
        tiles.append(_boxes(can, rcfg, f"{i} {row['method']}{' M' if row['mirrored'] else ''}"))
    rows = [np.hstack(tiles[k:k + 8]) for k in range(0, len(tiles), 8)]
    cv2.imwrite(str(OUT / "registered_sample.png"), np.vstack(rows))
    # mean registered canvas over the evaluation sets (where do the bones land?)
    acc = []
    for i in sorted(masks):
        c = cv2.imread(str(CACHE / "clean" / f"{i}.png"), 0)
        can, row = register_radiograph(c, pts_for.get(i, geo[i]), 1.0, masks[i], rcfg)
        acc.append(can.astype(np.float32))
    cv2.imwrite(str(OUT / "mean_registered.png"), _boxes(np.mean(acc, 0).astype(np.uint8), rcfg, "mean ours"))
    refs = [cv2.imread(str(p), 0).astype(np.float32) for p in sorted(ref_dir.glob("*.jpg"))]
    mref = cv2.resize(np.mean(refs, 0), (acc[0].shape[1], acc[0].shape[0])).astype(np.uint8)
    cv2.imwrite(str(OUT / "mean_reference.png"), _boxes(mref, rcfg, "mean reference"))
    # registered positions of the manual thumb tips and capitates (typical canvas positions)
    th, cp = [], []
    from boneage.registration import similarity_from_points, transform_points

    for i in kp_ids:
        p = pts_for.get(i, geo[i])
        if np.isfinite(p).all():
            M, info = similarity_from_points(p, rcfg)
            th.append(transform_points(M, man[i]["thumb"])[0] / rcfg.canvas_scale)
    for i in roi_ids:
        p = pts_for.get(i, geo[i])
        if np.isfinite(p).all():
            M, info = similarity_from_points(p, rcfg)
            cp.append(transform_points(M, rois[i]["capitate"])[0] / rcfg.canvas_scale)
    print("registered manual thumb tip, median full-canvas px:", np.round(np.median(th, 0), 0).tolist())
    print("registered Wrist-box centre, median full-canvas px:", np.round(np.median(cp, 0), 0).tolist())


def _boxes(img, rcfg, caption):
    out = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    for n, col in zip("ABC", [(0, 200, 0), (0, 0, 255), (255, 128, 0)]):
        x0, y0, x1, y1 = region_box(rcfg, n)
        cv2.rectangle(out, (x0 + 2, y0 + 2), (x1 - 3, y1 - 3), col, 2)
    cv2.putText(out, caption, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 0), 2)
    return out


def cmd_speed(args):
    import torch

    from boneage.fileio import atomic_write_png, read_gray, read_mask
    from boneage.runtime import setup_torch

    # --work: a chain's work dir (its keypoint model, clean images and masks) with --config its profile
    cfg = load_config(args.config or None)
    setup_torch(args.threads, 0)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    work = Path(args.work) if args.work else None
    src = work if work else CACHE
    model_dir = work / "models" / "keypoints" if work else OUT / "model_zero"
    model = load_keypoint_model(model_dir, cfg.keypoints, device)
    if model is None:
        from boneage.keypoints import build_model

        model = build_model(cfg.keypoints).eval()  # untrained: same cost
    all_ids = sorted(p.stem for p in (src / "clean").glob("*.png")) if work else ids_sets()[0]
    ids = all_ids[: args.n]
    tmp = OUT / "speed_tmp"
    kcfg, rcfg = cfg.keypoints, cfg.register
    predict_keypoints(model, np.zeros((64, 64), np.uint8), np.zeros((64, 64), bool), kcfg, device)

    def finish(i, clean, mask, pts, conf):
        canvas, row = register_radiograph(clean, pts, conf, mask, rcfg)
        atomic_write_png(tmp / "registered" / f"{i}.png", canvas)
        for n, crop in crop_regions(canvas, rcfg).items():
            atomic_write_png(tmp / n / f"{i}.png", crop)

    # as stage 3 runs (`src/03_keypoints.py`): geometric guess, the network's view in batches of 32, the
    # batched second readings of the fixed-point check, the view search where it fails, fusion; then stage 4
    t0 = time.perf_counter()
    for b in range(0, len(ids), 32):
        chunk = ids[b:b + 32]
        cl = [read_gray(src / "clean" / f"{i}.png") for i in chunk]
        ms = [read_mask(src / "masks" / f"{i}.png") for i in chunk]
        geos = [geometric_from_cfg(m, kcfg) for m in ms]
        views = [network_view(c, m, g, gc, kcfg) for c, m, (g, gc) in zip(cl, ms, geos)]
        firsts = [from_view(o, v[1]) for o, v in zip(predict_batch(model, [v[0] for v in views], device), views)]
        agains = second_readings(model, cl, ms, firsts, kcfg, device)
        for i, c, m, (g, gc), p, a in zip(chunk, cl, ms, geos, firsts, agains):
            pts, conf, _ = finish_network_points(model, c, m, p, g, gc, kcfg, device, a)
            finish(i, c, m, pts, conf)
    dt = time.perf_counter() - t0
    print(f"speed (stage batches of 32): {len(ids)} half-size radiographs in {dt:.1f} s = {len(ids) / dt:.1f}/s")
    # one radiograph at a time (src/predict.py's path)
    t0 = time.perf_counter()
    for i in ids[:30]:
        c = read_gray(src / "clean" / f"{i}.png")
        m = read_mask(src / "masks" / f"{i}.png")
        pts, conf, _ = predict_keypoints(model, c, m, kcfg, device)
        finish(i, c, m, pts, conf)
    dt1 = time.perf_counter() - t0
    print(f"speed (one at a time): 30 radiographs in {dt1:.1f} s = {30 / dt1:.1f}/s")
    print(f"(stages 3+4 inference: read clean + mask, network + geometric keypoints, registration, 3 crops, "
          f"PNG writes; torch threads 2; canvas_scale {rcfg.canvas_scale}, input {kcfg.input_size_px}, "
          f"filters {list(kcfg.filters)})")


def cmd_phantoms(args):
    """Geometric keypoints on phantoms: proportions refitted on `--n-fit` annotated phantoms (as stage 3
    does with manual points), errors on `--n` others; mirror detection; bones inside the region boxes."""
    from boneage.keypoints import fit_geometric_proportions, geometric_keypoints
    from boneage.phantom import PhantomConfig, make_phantom
    from boneage.registration import similarity_from_points, transform_points

    rcfg = load_config(None).register
    pc = PhantomConfig(long_side_px=args.px, p_mirror=args.p_mirror)
    fit = [make_phantom(pc, args.seed, i) for i in range(args.n_fit)]
    props = fit_geometric_proportions([(s.mask, s.keypoints[:, :2]) for s in fit]) or {}
    wanted = {"B": ["capitate", "hamate", "lunate", "radius_epiphysis", "ulna_epiphysis"],
              "C": ["MC2", "MC3", "MC4", "MC5", "PP2", "PP3", "PP4", "PP5"]}
    errs, wrong, n_mirrored, n_bones, outside = [], [], 0, 0, 0
    for i in range(1000, 1000 + args.n):
        s = make_phantom(pc, args.seed, i)
        kp, truth = s.keypoints[:, :2], bool(s.params["mirrored"])
        n_mirrored += truth
        pts, conf = geometric_keypoints(s.mask, props.get("tip_inset_frac"), props.get("capitate_along"),
                                        props.get("capitate_across"))
        if is_mirrored(pts) is not truth:
            wrong.append((i, round(conf, 2)))
        errs.append(np.hypot(*(pts - kp).T) / np.hypot(*(kp[0] - kp[2])) * 100)
        if not np.isfinite(pts).all():
            continue
        M, _ = similarity_from_points(pts, rcfg)
        for region, names in wanted.items():
            x0, y0, x1, y1 = region_box(rcfg, region)
            for n in names:
                c = s.params["bone_centres"].get(n)
                if c is None:
                    continue
                q = transform_points(M, np.asarray(c, float))[0]
                n_bones += 1
                outside += not (x0 <= q[0] <= x1 and y0 <= q[1] <= y1)
    e = np.array(errs)
    print(f"phantoms ({args.px} px, seed {args.seed}, fit on {args.n_fit}, test {args.n}): proportions {props}")
    print(f"error % of hand length (middle tip, thumb tip, capitate): median {np.nanmedian(e, 0).round(2).tolist()}"
          f" p90 {np.nanquantile(e, 0.9, 0).round(2).tolist()}")
    print(f"mirror: {len(wrong)} wrong of {len(e)} ({n_mirrored} mirrored) {wrong}; "
          f"bone centres outside their box: {outside} of {n_bones}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("--from-dir", default="", help="copy masks/clean already made by this same code from here")
    p = sub.add_parser("train")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--manual-weight", type=float, default=5.0)
    p.add_argument("--limit", type=int, default=0, help="at most this many pseudo-labels (a quick check)")
    p = sub.add_parser("eval")
    p.add_argument("--canvas-scale", type=float, default=0.25)
    p = sub.add_parser("phantoms")
    p.add_argument("--px", type=int, default=512)
    p.add_argument("--p-mirror", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--n-fit", type=int, default=20)
    p.add_argument("--n", type=int, default=100)
    p = sub.add_parser("speed")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--work", default="", help="a chain's work dir: its keypoint model, clean images and masks")
    p.add_argument("--config", default="", help="that chain's profile (configs/cpu.yaml)")
    p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd != "phantoms" and not (HALF / "labels.csv").exists():
        sys.exit(f"real data not found at {HALF}")
    OUT.mkdir(parents=True, exist_ok=True)
    cmds = {"prep": cmd_prep, "train": cmd_train, "eval": cmd_eval, "speed": cmd_speed, "phantoms": cmd_phantoms}
    cmds[args.cmd](args)


if __name__ == "__main__":
    main()
