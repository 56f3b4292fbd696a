"""Stress test: how far does the bone age move when the same radiograph is rotated, flipped, inverted,
brightened, downscaled, compressed, cropped or stamped? The whole inference chain (`boneage.assess.assess_image`:
segmentation, cleaning, keypoints, registration, the networks, the blend) runs on every variant.

    .venv/bin/python bench/stress.py --models WORK_DIR [--config configs/cpu.yaml] [--set key=value ...]
        [--data ../shared/data/rsna-half] [--n 200] [--compare-raw RAW_WORK_DIR] [--out bench/output]

- `--models`: a work dir with `models/` and a blend (as `boneage.assess.load_models` takes); `--config` and
  `--set` must describe how those models were trained (crop sizes, canvas scale, network widths).
- radiographs: the hold-out part of rsna-half (the 200 ids with `holdout=True` in rsna-100px/labels.csv), the
  first `--n` of them in that file's order; labels from rsna-half/labels.csv.
- `--compare-raw DIR`: a models dir with a model of input `raw` (the real-data ablation's raw-radiograph model,
  `register.baseline_inputs`), the radiograph padded black to the crop's aspect and resized whole; no segmentation
  or registration.
  Its shifts go in a second column. Absent or without such a model: the column is skipped and the report says so.
- Shifts are |pred(variant) - pred(original)| in months on the full method's number given with force=True
  (a rejected variant still has a number here); the share of variants the self-check rejects is reported too.

Writes `{out}/stress.md` (also printed), `{out}/stress.png`, `{out}/stress_rows.csv` (one row per id x variant).
Bars (issue): geometric families median < 1 month and no shift > 12 months; intensity families median < 3.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from boneage.config import load_config  # noqa: E402
from boneage.fileio import atomic_write_csv, atomic_write_text, read_gray  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
log = logging.getLogger("stress")
GEOMETRIC = ("rotation", "flip", "downscale", "crop")
INTENSITY = ("invert", "brightness", "contrast", "gamma", "noise", "jpeg", "overlay")


# ----------------------------------------------------------------------------- the transforms


def _background(img: np.ndarray) -> int:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return int(np.median(border))


def rotate(img: np.ndarray, deg: float) -> np.ndarray:
    """In-plane rotation about the centre onto a canvas large enough to keep every pixel; the new corners take
    the radiograph's border grey."""
    if deg % 360 == 90:
        return np.ascontiguousarray(np.rot90(img, -1))
    if deg % 360 == 180:
        return np.ascontiguousarray(img[::-1, ::-1])
    h, w = img.shape
    M = cv2.getRotationMatrix2D((w / 2, h / 2), -deg, 1.0)
    c, s = abs(M[0, 0]), abs(M[0, 1])
    nw, nh = int(round(h * s + w * c)), int(round(h * c + w * s))
    M[0, 2] += nw / 2 - w / 2
    M[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(img, M, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=_background(img))


def brightness(img: np.ndarray, b: float) -> np.ndarray:
    """Add b x 255 (albumentations' brightness)."""
    return np.clip(img.astype(np.float32) + b * 255.0, 0, 255).astype(np.uint8)


def contrast(img: np.ndarray, c: float) -> np.ndarray:
    """Scale the deviations from the mean grey by 1 + c."""
    f = img.astype(np.float32)
    m = float(f.mean())
    return np.clip(m + (f - m) * (1.0 + c), 0, 255).astype(np.uint8)


def gamma(img: np.ndarray, g: float) -> np.ndarray:
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g, 0, 255).astype(np.uint8)
    return lut[img]


def downscale(img: np.ndarray, f: float) -> np.ndarray:
    h, w = img.shape
    return cv2.resize(img, (max(16, round(w * f)), max(16, round(h * f))), interpolation=cv2.INTER_AREA)


def noise(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, q: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(q)])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def crop(img: np.ndarray, frac: float) -> np.ndarray:
    h, w = img.shape
    dy, dx = int(round(frac * h)), int(round(frac * w))
    return np.ascontiguousarray(img[dy:h - dy, dx:w - dx])


def letter(img: np.ndarray) -> np.ndarray:
    """A burned-in white 'R' (10 % of the height) in the top left corner, as a technician's side marker."""
    out = img.copy()
    h, w = img.shape
    scale = 0.1 * h / 22.0
    cv2.putText(out, "R", (int(0.04 * w), int(0.14 * h)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                max(2, int(round(scale * 2.5))), cv2.LINE_AA)
    return out


def ruler(img: np.ndarray) -> np.ndarray:
    """A bright ruler along the right edge with tick marks."""
    out = img.copy()
    h, w = img.shape
    x0, x1 = int(0.90 * w), int(0.95 * w)
    out[int(0.05 * h):int(0.95 * h), x0:x1] = 200
    for k, y in enumerate(range(int(0.05 * h), int(0.95 * h), max(3, h // 60))):
        cv2.line(out, (x0, y), (x0 + (x1 - x0) * (2 if k % 5 == 0 else 1) // 3, y), 40, max(1, h // 400))
    return out


def variants(seed: int = 0) -> list[tuple[str, str, object]]:
    """(name, family, function(img) -> img) of every transform of the issue."""
    v = [(f"rot{d:+d}", "rotation", partial(rotate, deg=d)) for d in (-10, 10, -20, 20, -45, 45)]
    v += [("rot90", "rotation", partial(rotate, deg=90)), ("rot180", "rotation", partial(rotate, deg=180))]
    v += [("hflip", "flip", lambda im: np.ascontiguousarray(im[:, ::-1])),
          ("invert", "invert", lambda im: 255 - im)]
    v += [(f"bright{int(100 * b):+d}%", "brightness", partial(brightness, b=b)) for b in (-0.4, -0.2, 0.2, 0.4)]
    v += [(f"contrast{int(100 * c):+d}%", "contrast", partial(contrast, c=c)) for c in (-0.4, -0.2, 0.2, 0.4)]
    v += [(f"gamma{g}", "gamma", partial(gamma, g=g)) for g in (0.6, 1.6)]
    v += [(f"down{f}", "downscale", partial(downscale, f=f)) for f in (0.5, 0.25)]
    v += [("noise10", "noise", lambda im: noise(im, 10.0, seed)), ("jpeg30", "jpeg", lambda im: jpeg(im, 30)),
          ("crop5%", "crop", lambda im: crop(im, 0.05)), ("letter", "overlay", letter), ("ruler", "overlay", ruler)]
    return v


# ----------------------------------------------------------------------------- the raw-radiograph model


class RawModel:
    """A models dir with a model of input `raw` (the ablation's raw radiograph: padded black to the crop's
    aspect and resized whole, `boneage.registration.fit_whole`; no segmentation or registration)."""

    def __init__(self, models_dir: Path, cfg, device):
        from boneage.blending import parse_model_name
        from boneage.training import ModelSpec, load_fold_models

        names = sorted(p.name for p in (Path(models_dir) / "models").glob("*") if p.is_dir()
                       and list(p.glob("fold*/best.pt")))
        names = [n for n in names if _region_of(n) == "raw"]
        if not names:
            raise FileNotFoundError(f"{models_dir}/models: no model of input raw with trained folds")
        m = parse_model_name(names[0])
        self.spec = ModelSpec(m.name, m.region, m.head, m.sex_mode, m.backbone)
        self.cfg, self.device = cfg, device
        self.models = load_fold_models(models_dir, self.spec, cfg, device)

    def crop(self, img: np.ndarray) -> np.ndarray:
        from boneage.registration import fit_whole, input_hw

        return fit_whole(img, input_hw(self.cfg.register, "raw"))

    def predict(self, img: np.ndarray, male: bool) -> float:
        from boneage.training import predict_crop

        return float(predict_crop(self.models, self.crop(img), male, self.spec, self.cfg, self.device)["pred"])


def _region_of(name: str) -> str | None:
    from boneage.blending import parse_model_name
    from boneage.errors import StageInputError

    try:
        return parse_model_name(name).region
    except StageInputError:
        return None


# ----------------------------------------------------------------------------- the run


def pick_ids(data: Path, n: int, holdout: bool = True) -> pd.DataFrame:
    """The first `n` radiographs of rsna-100px's hold-out (`holdout=True`; or its training part), in that file's
    order, with rsna-half's labels."""
    lab = pd.read_csv(data / "labels.csv", dtype={"id": str})
    hold = pd.read_csv(SHARED / "rsna-100px" / "labels.csv", dtype={"id": str})
    ids = hold.loc[(hold["holdout"].astype(str).str.lower() == "true") == holdout, "id"].tolist()
    df = lab.set_index("id").loc[[i for i in ids if i in set(lab["id"])]].reset_index()
    df["male"] = df["male"].astype(str).str.lower() == "true"
    return df.head(n)


def run(args) -> pd.DataFrame:
    import torch

    from boneage.assess import assess_image, load_models

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    models = load_models(Path(args.models), cfg, "cpu")
    raw = None
    if args.compare_raw:
        try:
            rcfg = load_config(args.config, args.overrides + args.raw_overrides)
            raw = RawModel(Path(args.compare_raw), rcfg, "cpu")
        except (FileNotFoundError, OSError, RuntimeError, KeyError) as exc:
            log.warning("raw-radiograph model skipped: %s", exc)
            args.raw_note = f"raw-radiograph column skipped: {exc}"
    else:
        args.raw_note = "raw-radiograph column skipped: no --compare-raw model given (none trained yet)"
    df = pick_ids(Path(args.data), args.n)
    if args.shard:  # K/N: every N-th radiograph from the K-th (0-based), to run N processes side by side
        k, n = (int(v) for v in args.shard.split("/"))
        df = df.iloc[k::n]
    vs = variants(args.seed)
    if args.transforms:
        keep = {t.strip() for t in args.transforms.split(',')}
        vs = [v for v in vs if v[0] in keep or v[1] in keep]
    rows = []
    t0 = time.perf_counter()
    for k, r in enumerate(df.itertuples(index=False)):
        img = read_gray(Path(args.data) / "images" / f"{r.id}.jpg")
        for name, fam, fn in [("original", "original", lambda im: im)] + vs:
            v = fn(img)
            res = assess_image(v, bool(r.male), models, cfg, image_id=f"{r.id}_{name}", force=True)
            qc = res.get("qc", {})
            rows.append({"id": r.id, "male": bool(r.male), "boneage": float(r.boneage), "transform": name,
                         "family": fam, "pred": res.get("bone_age_months"), "status": res["status"],
                         "quality": qc.get("quality"), "block_artefacts": qc.get("block_artefacts"),
                         "registration_method": qc.get("registration_method"),
                         "mirrored": qc.get("mirrored"), "inverted": qc.get("inverted"),
                         "raw_pred": raw.predict(v, bool(r.male)) if raw is not None else np.nan,
                         "reasons": "; ".join(res.get("rejection_reasons", []))})
        log.info("%d/%d radiographs, %.0f s", k + 1, len(df), time.perf_counter() - t0)
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per transform and per family: n, median / p90 of |shift|, share > 12 months, share rejected."""
    orig = rows[rows["transform"] == "original"].set_index("id")
    v = rows[rows["transform"] != "original"].copy()
    v["shift"] = (v["pred"].astype(float) - v["id"].map(orig["pred"].astype(float))).abs()
    v["raw_shift"] = (v["raw_pred"].astype(float) - v["id"].map(orig["raw_pred"].astype(float))).abs()
    v["rejected"] = v["status"] != "ok"
    # what a user is shown: a number for the original and for the variant only when the self-check accepts both
    v["both_ok"] = ~v["rejected"] & v["id"].map(orig["status"] == "ok").fillna(False).astype(bool)

    def agg(g: pd.DataFrame) -> pd.Series:
        s, rs = g["shift"].dropna(), g["raw_shift"].dropna()
        acc = g.loc[g["both_ok"], "shift"].dropna()
        return pd.Series({"n": len(g), "median": s.median(), "p90": s.quantile(0.9), "max": s.max(),
                          "over12": (s > 12).mean(), "rejected": g["rejected"].mean(),
                          "acc_n": len(acc), "acc_median": acc.median() if len(acc) else np.nan,
                          "acc_over12": (acc > 12).mean() if len(acc) else np.nan,
                          "raw_median": rs.median() if len(rs) else np.nan,
                          "raw_p90": rs.quantile(0.9) if len(rs) else np.nan,
                          "raw_over12": (rs > 12).mean() if len(rs) else np.nan})

    order = list(dict.fromkeys(v["transform"]))
    per_t = v.groupby("transform").apply(agg, include_groups=False).loc[order]
    per_t.insert(0, "family", v.groupby("transform")["family"].first().loc[order])
    fam_order = list(dict.fromkeys(v["family"]))
    per_f = v.groupby("family").apply(agg, include_groups=False).loc[fam_order]
    per_f.insert(0, "family", per_f.index)
    per_f.index = [f"**{f}** (all)" for f in per_f.index]
    return pd.concat([per_t, per_f])


def to_markdown(summary: pd.DataFrame, rows: pd.DataFrame, args) -> str:
    has_raw = summary["raw_median"].notna().any()
    orig = rows[rows["transform"] == "original"]
    lines = [
        "# Stress test: shift of the bone age under transforms of the same radiograph", "",
        f"Models: `{args.models}` (config `{args.config}`{', ' + ' '.join(args.overrides) if args.overrides else ''}). "
        f"Radiographs: {orig['id'].nunique()} of the rsna-half hold-out (`--n {args.n}`). "
        f"Originals accepted by the self-check: {(orig['status'] == 'ok').mean():.0%}. "
        "Shift = |pred(variant) - pred(original)| in months (full method, numbers taken with force).", "",
        args.raw_note if not has_raw else ("Raw-radiograph model: "
                                           + (f"`{args.compare_raw}`" if args.compare_raw else "as in the rows' run")
                                           + " (input raw)."), "",
        "Accepted: the variants for which the self-check accepts both the original and the variant (what a user "
        "is shown); their n, median shift and share > 12 months.", "",
        "| transform | family | n | median | p90 | max | share > 12 mo | rejected | accepted n | accepted median "
        "| accepted > 12 mo |" + (" raw median | raw p90 | raw > 12 mo |" if has_raw else ""),
        "|" + " --- |" * (14 if has_raw else 11),
    ]
    for name, r in summary.iterrows():
        line = (f"| {name} | {r['family']} | {int(r['n'])} | {r['median']:.2f} | {r['p90']:.2f} | {r['max']:.1f} | "
                f"{r['over12']:.0%} | {r['rejected']:.0%} | {int(r['acc_n'])} | {r['acc_median']:.2f} | "
                f"{r['acc_over12']:.0%} |")
        if has_raw:
            line += f" {r['raw_median']:.2f} | {r['raw_p90']:.2f} | {r['raw_over12']:.0%} |"
        lines.append(line)
    fam = summary[summary.index.str.startswith("**")]
    geo = fam[fam["family"].isin(GEOMETRIC)]
    inten = fam[fam["family"].isin(INTENSITY)]
    geo_ok = bool((geo["median"] < 1).all() and (geo["max"] <= 12).all())
    int_ok = bool((inten["median"] < 3).all())
    absent = "not run (no such transform in these rows)"
    lines += ["", "Bars (issue): geometric families (" + ", ".join(GEOMETRIC) + ") median < 1 month and none > 12: "
              + (absent if geo.empty else "**met**" if geo_ok else "**not met** (" + ", ".join(
                  f"{f}: median {m:.2f}, max {x:.1f}" for f, m, x in zip(geo["family"], geo["median"], geo["max"])
                  if not (m < 1 and x <= 12)) + ")"),
              "Intensity families (" + ", ".join(INTENSITY) + ") median < 3 months: "
              + (absent if inten.empty else "**met**" if int_ok else "**not met** (" + ", ".join(
                  f"{f}: {m:.2f}" for f, m in zip(inten["family"], inten["median"]) if not m < 3) + ")"), ""]
    return "\n".join(lines)


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_t = summary[~summary.index.str.startswith("**")]
    has_raw = per_t["raw_median"].notna().any()
    x = np.arange(len(per_t))
    wd = 0.4 if has_raw else 0.7
    fig, ax = plt.subplots(figsize=(14, 5))
    colours = ["tab:blue" if f in GEOMETRIC else "tab:orange" for f in per_t["family"]]
    ax.bar(x - (wd / 2 if has_raw else 0), per_t["median"], wd, color=colours, label="full method: median")
    ax.scatter(x - (wd / 2 if has_raw else 0), per_t["p90"], marker="_", s=200, color="k", label="full method: p90")
    if has_raw:
        ax.bar(x + wd / 2, per_t["raw_median"], wd, color="tab:gray", label="raw radiograph model: median")
        ax.scatter(x + wd / 2, per_t["raw_p90"], marker="_", s=200, color="tab:red", label="raw model: p90")
    ax.axhline(1, color="tab:blue", ls="--", lw=1, label="bar: geometric median 1 month")
    ax.axhline(3, color="tab:orange", ls="--", lw=1, label="bar: intensity median 3 months")
    ax.set_xticks(x)
    ax.set_xticklabels(per_t.index, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("|pred(variant) - pred(original)| (months)")
    ax.set_title("Bone age shift per transform (blue: geometric, orange: intensity)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_args(doc: str, flag: str = "--models",
               what: str = "work dir with models/ and a blend.json") -> argparse.ArgumentParser:
    """The command line's trained models (`flag`, `what` they are), their config and the data, as the benches on real
    radiographs take them."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument(flag, required=True, help=what)
    ap.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", default=str(SHARED / "rsna-half"))
    ap.add_argument("--threads", type=int, default=1)
    return ap


def load_rows(ap: argparse.ArgumentParser, argv, name: str, run_fn, read_fn) -> tuple[argparse.Namespace, Path,
                                                                                      pd.DataFrame]:
    """(args, out dir, rows): the rows of `--rows` files by `read_fn(files)`, else of `run_fn(args)`, written to
    `{out}/{name}_rows.csv`."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    if args.rows:
        return args, out, read_fn(args.rows)
    rows = run_fn(args)
    atomic_write_csv(out / f"{name}_rows.csv", rows)
    return args, out, rows


def write_outputs(out: Path, name: str, md: str, plot_fn) -> None:
    """`{out}/{name}.md` (also printed) and `{out}/{name}.png` by `plot_fn(path)`."""
    atomic_write_text(out / f"{name}.md", md)
    plot_fn(out / f"{name}.png")
    print(md)


def main(argv=None) -> int:
    ap = model_args(__doc__)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--compare-raw", metavar="WORKDIR")
    ap.add_argument("--raw-set", dest="raw_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config for the raw model (e.g. register.crop_sizes={R:[256,256]})")
    ap.add_argument("--out", default=str(REPO / "bench" / "output"))
    ap.add_argument("--rows", nargs="+", help="reuse stress_rows.csv file(s) (e.g. of --shard runs) instead of "
                    "running the models")
    ap.add_argument("--shard", default="", metavar="K/N", help="only every N-th radiograph from the K-th (0-based)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transforms", default="", help="comma-separated transform or family names (default: all)")
    ap.set_defaults(raw_note="")
    args, out, rows = load_rows(ap, argv, "stress", run, lambda files: pd.concat(
        [pd.read_csv(f, dtype={"id": str}) for f in files], ignore_index=True))
    if args.rows and rows["raw_pred"].isna().all():
        args.raw_note = "raw-radiograph column skipped: no raw model in these rows"
    summary = summarise(rows)
    write_outputs(out, "stress", to_markdown(summary, rows, args), partial(plot, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
