"""Stage 7 outputs people read: `submissions/report.md` with its PNG plots, the per-case uncertainty
table and the list of test cases a person should check.

Everything here reads the blend and the checked OOF files (`boneage.blending`) plus the files earlier
stages wrote into the work dir (`qc/*.png`, `logs/*.config.yaml`, `logs/times.json`, `masks.csv`,
`registration.csv`, `keypoints.csv`); a missing one is mentioned in the report, never an error.
The paper's table (method.md section 4) is regenerated from out-of-fold predictions: region rows are
the best single model of that region and column, ensemble rows and the "all models" column are
cross-validated blends of the models in that cell.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from boneage.blending import SEXES, Blend, OofSet, fit_sex_blend  # noqa: E402
from boneage.fileio import atomic_write_csv, atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

REGION_NAMES = {"A": "A whole hand", "B": "B carpals + distal radius/ulna", "C": "C metacarpals + proximal phalanges"}
# The paper's figures (Iglovikov et al. 2018, MAE in months on 1,000 withheld radiographs); None: not known here.
PAPER_TABLE = {
    "A": {"reg_both": "8.08", "reg_fm": "7.12 (F)", "cls_fm": "", "all": ""},
    "B": {"reg_both": "", "reg_fm": "", "cls_fm": "", "all": ""},
    "C": {"reg_both": "8.42", "reg_fm": "6.79 (F)", "cls_fm": "", "all": ""},
    "ensemble": {"reg_both": "7.52", "reg_fm": "6.49 / 6.30", "cls_fm": "6.39 / 6.16", "all": "6.10"},
}
SEX_COLOURS = {"F": "tab:red", "M": "tab:blue"}
SEX_LABELS = {"F": "female", "M": "male"}


def mae(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.mean(np.abs(a - b))) if len(a) else float("nan")


def _fmt(v, nd: int = 2) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


# ----------------------------------------------------------------------------- the paper's table


def _single_best(data: OofSet, sex: str | None, keep) -> tuple[float, str] | None:
    """Lowest raw OOF MAE among models passing `keep` (on `sex`'s rows, or all rows when None)."""
    best = None
    for m in data.models:
        if not keep(m) or (sex is not None and not m.covers(sex)):
            continue
        df = data.oof[m.name]
        if sex is not None:
            df = df[df["sex"] == sex]
        elif m.sex_mode in ("female", "male"):
            continue  # "both sexes" needs a model that covers both
        if len(df):
            v = mae(df["pred"], df["boneage"])
            if best is None or v < best[0]:
                best = (v, m.name)
    return best


def _blend_errors(data: OofSet, sex: str, keep, blend: Blend) -> np.ndarray | None:
    names = [m.name for m in data.covering(sex) if keep(m)]
    if not names:
        return None
    b = fit_sex_blend(data, sex, blend.method, blend.ridge_alpha, models=names,
                      fallback_single=blend.fallback_single, warn=False)
    return np.abs(np.clip(b.oof["pred"].to_numpy(), 0, 240) - b.oof["boneage"].to_numpy())


def paper_table(data: OofSet, blend: Blend) -> pd.DataFrame:
    """The paper's table for this run (OOF MAE, months): rows A, B, C, ensemble; columns pooled
    regression, regression F / M, classification F / M, everything; paper figures alongside."""
    sexes = [s for s in SEXES if s in blend.sexes]
    both_modes = ("pooled", "sex_input")
    cols = {
        "reg_both": lambda m: m.head == "reg" and m.sex_mode in both_modes,
        "reg_fm": lambda m: m.head == "reg",
        "cls_fm": lambda m: m.head == "cls",
        "all": lambda m: True,
    }
    rows = []
    regions = sorted({m.region for m in data.models} | {"A", "B", "C"})
    for region in regions + ["ensemble"]:
        row = {"row": REGION_NAMES.get(region, region) if region != "ensemble" else "ensemble of regions"}
        for key, base in cols.items():
            def keep(m, base=base, region=region):
                return base(m) and (region == "ensemble" or m.region == region)

            if key == "reg_both":
                if region == "ensemble":
                    errs = [e for s in sexes if (e := _blend_errors(data, s, keep, blend)) is not None]
                    cell = _fmt(float(np.mean(np.concatenate(errs)))) if errs else ""
                else:
                    best = _single_best(data, None, keep)
                    cell = _fmt(best[0]) if best else ""
            elif key in ("reg_fm", "cls_fm"):
                parts = []
                for s in ("F", "M"):
                    if s not in sexes:
                        parts.append("")
                    elif region == "ensemble":
                        e = _blend_errors(data, s, keep, blend)
                        parts.append(_fmt(float(e.mean())) if e is not None else "")
                    else:
                        best = _single_best(data, s, keep)
                        parts.append(_fmt(best[0]) if best else "")
                cell = " / ".join(parts) if any(parts) else ""
            else:
                errs = [e for s in sexes if (e := _blend_errors(data, s, keep, blend)) is not None]
                cell = _fmt(float(np.mean(np.concatenate(errs)))) if errs else ""
            row[key] = cell
            row[key + "_paper"] = PAPER_TABLE.get(region, {}).get(key, "")
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures


def model_table(data: OofSet, blend: Blend) -> pd.DataFrame:
    """One row per model: OOF MAE overall / F / M, hold-out MAE, blend coefficients per sex."""
    rows = []
    for m in data.models:
        df = data.oof[m.name]
        row = {"model": m.name, "region": m.region, "head": m.head, "sex_mode": m.sex_mode, "backbone": m.backbone,
               "n": len(df), "oof_mae": mae(df["pred"], df["boneage"])}
        for s in SEXES:
            d = df[df["sex"] == s]
            row[f"oof_mae_{s}"] = mae(d["pred"], d["boneage"]) if len(d) else np.nan
            b = blend.sexes.get(s)
            row[f"coef_{s}"] = dict(zip(b.models, b.coef)).get(m.name, np.nan) if b else np.nan
        h = data.holdout.get(m.name)
        row["holdout_mae"] = mae(h["pred"], h["boneage"]) if h is not None and len(h) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).sort_values("oof_mae").reset_index(drop=True)


def blend_summary(data: OofSet, blend: Blend) -> dict:
    """Blend OOF MAE against its best single model, overall and per sex; hold-out likewise."""
    oof = blend.oof_frame()
    out = {"blend_oof_mae": mae(np.clip(oof["pred"], 0, 240), oof["boneage"]), "n_oof": len(oof)}
    both = _single_best(data, None, lambda m: True)
    out["best_single"] = both[1] if both else None
    out["best_single_oof_mae"] = both[0] if both else float("nan")
    out["gain_months"] = out["best_single_oof_mae"] - out["blend_oof_mae"]
    for s, b in blend.sexes.items():
        name = min(b.single_mae, key=b.single_mae.get)
        out[f"blend_oof_mae_{s}"] = b.oof_mae
        out[f"best_single_{s}"] = name
        out[f"best_single_oof_mae_{s}"] = b.single_mae[name]
    hold = blend.holdout_frame()
    if hold is not None and len(hold):
        out["blend_holdout_mae"] = mae(np.clip(hold["pred"], 0, 240), hold["boneage"])
        out["n_holdout"] = len(hold)
        if out["best_single"] in data.holdout:
            h = data.holdout[out["best_single"]]
            out["best_single_holdout_mae"] = mae(h["pred"], h["boneage"])
    return out


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def plot_pred_vs_true(frames: dict[str, pd.DataFrame], path: Path, title: str) -> str:
    """Scatter of predicted against true bone age, one panel per frame (e.g. OOF, hold-out), by sex."""
    fig, axes = plt.subplots(1, len(frames), figsize=(5.2 * len(frames), 5.0), squeeze=False)
    for ax, (label, df) in zip(axes[0], frames.items()):
        for s in SEXES:
            d = df[df["sex"] == s]
            if len(d):
                e = mae(np.clip(d["pred"], 0, 240), d["boneage"])
                ax.scatter(d["boneage"], np.clip(d["pred"], 0, 240), s=9, alpha=0.6, c=SEX_COLOURS[s],
                           label=f"{SEX_LABELS[s]} (n={len(d)}, MAE {e:.2f})")
        ax.plot([0, 240], [0, 240], "k--", lw=1, label="identity")
        ax.set(xlim=(0, 240), ylim=(0, 240), xlabel="true bone age (months)", ylabel="predicted (months)",
               title=f"{label}: MAE {mae(np.clip(df['pred'], 0, 240), df['boneage']):.2f} months")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_bland_altman(df: pd.DataFrame, path: Path, title: str) -> str:
    """Bland-Altman: difference (predicted - true) against the mean of the two, with bias and 95% limits."""
    pred = np.clip(df["pred"].to_numpy(float), 0, 240)
    true = df["boneage"].to_numpy(float)
    mean, diff = (pred + true) / 2, pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for s in SEXES:
        k = (df["sex"] == s).to_numpy()
        if k.any():
            ax.scatter(mean[k], diff[k], s=9, alpha=0.6, c=SEX_COLOURS[s], label=SEX_LABELS[s])
    ax.axhline(bias, color="k", lw=1.2, label=f"bias {bias:+.2f}")
    ax.axhline(bias - 1.96 * sd, color="gray", ls="--", lw=1,
               label=f"95% limits {bias - 1.96 * sd:+.1f} / {bias + 1.96 * sd:+.1f}")
    ax.axhline(bias + 1.96 * sd, color="gray", ls="--", lw=1)
    ax.set(xlabel="mean of predicted and true (months)", ylabel="predicted - true (months)", title=title, xlim=(0, 240))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    return _save(fig, path)


def mae_by_band(df: pd.DataFrame, band_months: int) -> pd.DataFrame:
    """MAE and count per (true) age band and sex."""
    edges = np.arange(0, 240 + band_months, band_months)
    d = df.assign(err=np.abs(np.clip(df["pred"], 0, 240) - df["boneage"]),
                  band=pd.cut(df["boneage"], edges, include_lowest=True, right=False))
    g = d.groupby(["band", "sex"], observed=True)["err"].agg(["mean", "count"]).reset_index()
    g["band"] = g["band"].map(lambda iv: f"{int(iv.left)}-{int(iv.right)}")
    return g


def plot_mae_by_band(df: pd.DataFrame, band_months: int, path: Path, title: str) -> str:
    g = mae_by_band(df, band_months)
    bands = list(dict.fromkeys(g["band"]))
    x = np.arange(len(bands))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.8 * len(bands) + 2), 4.4))
    width = 0.4
    for j, s in enumerate(SEXES):
        d = g[g["sex"] == s].set_index("band").reindex(bands)
        bars = ax.bar(x + (j - 0.5) * width, d["mean"].fillna(0), width, color=SEX_COLOURS[s], alpha=0.8,
                      label=SEX_LABELS[s])
        for b, n in zip(bars, d["count"]):
            if np.isfinite(n):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"n={int(n)}", ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(x, bands, rotation=0, fontsize=8)
    ax.set(xlabel="true bone age band (months)", ylabel="MAE (months)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_coefficients(blend: Blend, path: Path) -> str:
    """Horizontal bars of each model's coefficient, one panel per sex, intercept in the title."""
    sexes = list(blend.sexes)
    names = sorted({m for b in blend.sexes.values() for m in b.models})  # same rows in every panel
    fig, axes = plt.subplots(1, len(sexes), figsize=(6.0 * len(sexes), 0.45 * len(names) + 1.8), squeeze=False,
                             constrained_layout=True)
    for ax, s in zip(axes[0], sexes):
        b = blend.sexes[s]
        coef = dict(zip(b.models, b.coef))
        y = np.arange(len(names))
        vals = [coef.get(n, 0.0) for n in names]
        ax.barh(y, vals, color=SEX_COLOURS[s], alpha=0.8)
        for yi, n in zip(y, names):
            ax.text(coef.get(n, 0.0), yi, f" {coef[n]:.3f}" if n in coef else " (not for this sex)", va="center",
                    fontsize=8)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set(xlabel="coefficient", title=f"{SEX_LABELS[s]}: intercept {b.intercept:+.2f} months")
        ax.grid(axis="x", alpha=0.3)
        lo, hi = min([0.0] + vals), max([0.0] + vals)
        span = max(hi - lo, 1e-3)
        ax.set_xlim(lo - 0.05 * span, hi + 0.3 * span)
    fig.suptitle(f"blend coefficients ({blend.method})")
    return _save(fig, path)


def plot_uncertainty(unc: pd.DataFrame, path: Path, truth: pd.DataFrame | None = None) -> str:
    """Histogram of the test uncertainties; with ground truth also |error| against uncertainty."""
    n = 2 if truth is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.0), squeeze=False)
    ax = axes[0][0]
    ax.hist(unc["uncertainty_months"], bins=min(30, max(5, len(unc) // 3)), color="tab:gray", alpha=0.8)
    ax.set(xlabel="uncertainty (months)", ylabel="test radiographs", title="test uncertainty")
    ax.grid(alpha=0.3)
    if truth is not None:
        d = unc.merge(truth[["id", "boneage"]].rename(columns={"boneage": "true"}), on="id")
        err = np.abs(d["boneage"] - d["true"])
        ax = axes[0][1]
        for s in SEXES:
            k = d["sex"] == s
            ax.scatter(d.loc[k, "uncertainty_months"], err[k], s=12, alpha=0.7, c=SEX_COLOURS[s], label=SEX_LABELS[s])
        r = np.corrcoef(d["uncertainty_months"], err)[0, 1] if len(d) > 2 and err.std() > 0 else float("nan")
        ax.set(xlabel="uncertainty (months)", ylabel="|error| on test (months)",
               title=f"does uncertainty flag errors? r = {r:.2f}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- test cases


def _read_optional(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_csv(path, dtype={"id": str}, keep_default_na=True)
    except Exception as exc:  # a broken QC file must not stop the report
        log.warning("%s: unreadable (%s); its QC flags are not listed", path, exc)
        return None


def qc_flags(work_dir: Path, ids: list[str], kp_min_conf: float) -> pd.DataFrame:
    """Per id: the QC reasons from `masks.csv`, `registration.csv` (flag columns) and `keypoints.csv`
    (confidence below `kp_min_conf`), joined with '; ' (empty when none)."""
    reasons = {i: [] for i in ids}
    for name, label in (("masks.csv", "mask"), ("clean.csv", "clean"), ("registration.csv", "registration")):
        df = _read_optional(work_dir / name)
        if df is None or "flag" not in df.columns:
            continue
        for i, f in zip(df["id"], df["flag"]):
            if i in reasons and isinstance(f, str) and f.strip():
                reasons[i].append(f"{label}: {f.strip()}")
    kp = _read_optional(work_dir / "keypoints.csv")
    if kp is not None and "confidence" in kp.columns:
        for i, c in zip(kp["id"], pd.to_numeric(kp["confidence"], errors="coerce")):
            if i in reasons and (not np.isfinite(c) or c < kp_min_conf):
                reasons[i].append(f"keypoints: confidence {c:.2f}")
    return pd.DataFrame({"id": ids, "qc_flags": ["; ".join(reasons[i]) for i in ids]})


def uncertainty_table(test_pred: pd.DataFrame, work_dir: Path, kp_min_conf: float) -> pd.DataFrame:
    """`test_uncertainty.csv`: id, sex, boneage, uncertainty_months and its parts, QC flags."""
    t = test_pred.rename(columns={"uncertainty": "uncertainty_months"})
    out = t[["id", "sex", "boneage", "uncertainty_months", "fold_sd", "model_sd", "width_sd"]].copy()
    out = out.merge(qc_flags(work_dir, list(out["id"]), kp_min_conf), on="id", how="left")
    for c in ("boneage", "uncertainty_months", "fold_sd", "model_sd", "width_sd"):
        out[c] = out[c].round(2)
    return out


def cases_to_check(unc: pd.DataFrame, top_n: int) -> pd.DataFrame:
    """The `top_n` largest uncertainties plus every case with a QC flag, largest uncertainty first."""
    top = set(unc.nlargest(top_n, "uncertainty_months")["id"])
    flagged = set(unc.loc[unc["qc_flags"].fillna("") != "", "id"])
    sel = unc[unc["id"].isin(top | flagged)].copy()
    sel["why"] = [
        "; ".join(([f"uncertainty rank {r}"] if i in top else []) + ([q] if q else []))
        for i, q, r in zip(sel["id"], sel["qc_flags"].fillna(""),
                           sel["uncertainty_months"].rank(ascending=False, method="first").astype(int))
    ]
    return sel.sort_values("uncertainty_months", ascending=False)[["id", "sex", "boneage", "uncertainty_months", "why"]]


def score_test(submission: pd.DataFrame, truth_path: Path, train_labels: pd.DataFrame | None) -> dict | None:
    """Score the submission against `input/ground_truth/test_labels.csv` (`id,boneage,male`), if present.

    Used only for this score, never for fitting. Baseline: each sex's mean training bone age."""
    if truth_path is None or not Path(truth_path).exists():
        return None
    truth = pd.read_csv(truth_path, dtype={"id": str})
    truth["male"] = truth["male"].astype(str).str.strip().str.lower().isin(("true", "1", "m", "male"))
    d = submission.merge(truth, on="id", suffixes=("", "_true"))
    out = {"n": len(d), "mae": mae(d["boneage"], d["boneage_true"]), "path": str(truth_path)}
    for s, male in (("F", False), ("M", True)):
        k = d["male"] == male
        out[f"mae_{s}"] = mae(d.loc[k, "boneage"], d.loc[k, "boneage_true"]) if k.any() else float("nan")
        out[f"n_{s}"] = int(k.sum())
    if train_labels is not None and len(train_labels):
        means = train_labels.groupby(train_labels["male"].astype(bool))["boneage"].mean()
        base = d["male"].map(lambda m: means.get(bool(m), train_labels["boneage"].mean()))
        out["baseline_mae"] = mae(base, d["boneage_true"])
    out["frame"] = pd.DataFrame({"id": d["id"], "sex": np.where(d["male"], "M", "F"), "boneage": d["boneage_true"],
                                 "pred": d["boneage"]})
    return out


# ----------------------------------------------------------------------------- the report


def _md_table(df: pd.DataFrame, floats: int = 2) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("" if not np.isfinite(v) else f"{v:.{floats}f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _link_files(files: list[Path], out_dir: Path, sub: str, copy: bool) -> list[tuple[str, str]]:
    """(name, relative link) for each file, copied into `out_dir/sub/` when `copy`."""
    links = []
    for f in files:
        if copy:
            dst = out_dir / sub / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
            links.append((f.name, f"{sub}/{f.name}"))
        else:
            links.append((f.name, os.path.relpath(f, out_dir)))
    return links


def write_report(out_dir: Path, blend: Blend, data: OofSet, test_pred: pd.DataFrame, unc: pd.DataFrame,
                 work_dir: Path, cfg_blend, truth_path: Path | None = None,
                 train_labels: pd.DataFrame | None = None, title: str = "Bone age: stage 7 report") -> Path:
    """Write `out_dir/report.md` and its PNGs; returns the report's path."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    summary = blend_summary(data, blend)
    oof = blend.oof_frame()
    hold = blend.holdout_frame()
    md = [f"# {title}", ""]
    md += ["All MAE figures are in months. OOF: out-of-fold (each radiograph predicted by models that did not "
           "train on it; the blend itself cross-validated over the same folds).", ""]

    md += ["## Summary", ""]
    gain = summary["gain_months"]
    rel = 100 * gain / summary["best_single_oof_mae"] if summary["best_single_oof_mae"] else float("nan")
    verdict = (f"beats the best single model (`{summary['best_single']}`, {summary['best_single_oof_mae']:.2f}) by "
               f"**{gain:.2f} months ({rel:.1f}%)**" if gain > 0 else
               f"does NOT beat the best single model (`{summary['best_single']}`, "
               f"{summary['best_single_oof_mae']:.2f}): **worse by {-gain:.2f} months ({-rel:.1f}%)**")
    md.append(f"- Blend OOF MAE **{summary['blend_oof_mae']:.2f}** on {summary['n_oof']} radiographs; it {verdict}.")
    for s in blend.sexes:
        g = summary[f"best_single_oof_mae_{s}"] - summary[f"blend_oof_mae_{s}"]
        md.append(f"- {SEX_LABELS[s]}: blend {summary[f'blend_oof_mae_{s}']:.2f} vs best single "
                  f"`{summary[f'best_single_{s}']}` {summary[f'best_single_oof_mae_{s}']:.2f} ({g:+.2f}).")
    if "blend_holdout_mae" in summary:
        extra = (f"; best single model there {summary['best_single_holdout_mae']:.2f}"
                 if "best_single_holdout_mae" in summary else "")
        md.append(f"- Hold-out ({summary['n_holdout']} radiographs never used for training or blending): blend MAE "
                  f"**{summary['blend_holdout_mae']:.2f}**{extra}.")
    else:
        md.append("- No hold-out files (`oof/*.holdout.csv`): no hold-out MAE.")
    score = score_test(test_pred[["id", "boneage"]], truth_path, train_labels) if truth_path else None
    if score:
        base = f"; sex-mean baseline {score['baseline_mae']:.2f}" if "baseline_mae" in score else ""
        md.append(f"- Test set scored against `input/ground_truth/{Path(score['path']).name}` (ground truth kept aside "
                  f"when the input folder was built, by the phantom generator or `bench/make_real_input.py`; used only "
                  f"for this score, never for fitting): MAE **{score['mae']:.2f}** on "
                  f"{score['n']} (female {_fmt(score['mae_F'])}, male {_fmt(score['mae_M'])}){base}.")
    else:
        md.append("- No test ground truth (`input/ground_truth/test_labels.csv`): the test set is not scored.")
    md.append(f"- Test predictions: {len(test_pred)} radiographs, `submission.csv`; mean uncertainty "
              f"{unc['uncertainty_months'].mean():.2f} months (`test_uncertainty.csv`).")
    md.append("")

    md += ["## The paper's table, this run beside the paper", "",
           "This run: OOF MAE. Region rows: the best single model of that region in that column; ensemble row "
           "and the *all models* column: cross-validated blends of the models in the cell (per sex, pooled). "
           "*Paper*: Iglovikov et al. 2018, 1,000 withheld radiographs; blank where the figure is not known here. "
           "F / M: female / male. Regression *both sexes* uses pooled and sex_input models; the F / M columns use "
           "every model covering that sex (female / male models, and pooled / sex_input models scored on that sex's "
           "radiographs).", ""]
    pt = paper_table(data, blend)
    pt = pt.rename(columns={"row": "region", "reg_both": "regression, both sexes", "reg_both_paper": "(paper)",
                            "reg_fm": "regression F / M", "reg_fm_paper": "(paper) ",
                            "cls_fm": "classification F / M", "cls_fm_paper": "(paper)  ",
                            "all": "all models", "all_paper": "(paper)   "})
    md += [_md_table(pt), ""]

    md += ["## Models", ""]
    mt = model_table(data, blend)
    md += [_md_table(mt[["model", "n", "oof_mae", "oof_mae_F", "oof_mae_M", "holdout_mae", "coef_F", "coef_M"]], 3), ""]

    md += ["## Blend coefficients", "",
           f"Method `{blend.method}`" + (f" (alpha {blend.ridge_alpha})" if blend.method == "ridge" else
                                          " (non-negative coefficients and an intercept)") +
           "; `blend.json` holds them. bone age = intercept + sum(coef x model prediction), clipped to 0..240.", ""]
    md += [f"![coefficients](figures/{plot_coefficients(blend, fig_dir / 'coefficients.png')})", ""]
    rows = [{"sex": SEX_LABELS[s], "intercept": b.intercept, "OOF MAE": b.oof_mae,
             "per-fold MAE": ", ".join(f"{k}: {v:.2f}" for k, v in b.fold_mae.items())} for s, b in blend.sexes.items()]
    md += [_md_table(pd.DataFrame(rows)), ""]

    md += ["## Predicted against true", ""]
    frames = {"OOF (blend, cross-validated)": oof}
    if hold is not None and len(hold):
        frames["hold-out"] = hold
    if score:
        frames["test (ground truth)"] = score["frame"]
    md += [f"![predicted vs true](figures/{plot_pred_vs_true(frames, fig_dir / 'pred_vs_true.png', 'blend')})", ""]
    md += ["## Bland-Altman", ""]
    md += [f"![Bland-Altman](figures/{plot_bland_altman(oof, fig_dir / 'bland_altman.png', 'OOF, blend')})", ""]
    md += ["## MAE by age band and sex", ""]
    band = cfg_blend.age_band_months
    md += [f"![MAE by age](figures/{plot_mae_by_band(oof, band, fig_dir / 'mae_by_age.png', 'OOF MAE of the blend')})",
           ""]
    g = mae_by_band(oof, band).pivot(index="band", columns="sex", values="mean").reset_index()
    g.columns = [str(c) for c in g.columns]
    md += [_md_table(g.rename(columns={"band": "band (months)", "F": "MAE female", "M": "MAE male"})), ""]

    md += ["## Test cases a person should check", "",
           f"The {cfg_blend.check_top_n} largest uncertainties and every case with a QC flag (mask, cleaning or "
           f"registration flag, keypoint confidence below {cfg_blend.check_keypoint_confidence}). Uncertainty "
           "(months) = quadrature sum of the spread over folds, the disagreement between models and, for "
           "classification heads, the width of the predicted distribution (`test_uncertainty.csv` has the parts).", ""]
    truth_frame = score["frame"][["id", "boneage"]] if score else None
    md += [f"![uncertainty](figures/{plot_uncertainty(unc, fig_dir / 'uncertainty.png', truth_frame)})", ""]
    chk = cases_to_check(unc, cfg_blend.check_top_n)
    atomic_write_csv(out_dir / "check_cases.csv", chk)
    md += [_md_table(chk) if len(chk) else "(none)", ""]

    md += ["## QC sheets (stages 1-4)", ""]
    qc = sorted((Path(work_dir) / "qc").glob("*.png"))
    if qc:
        md += [f"- [{n}]({link})" for n, link in _link_files(qc, out_dir, "qc", cfg_blend.copy_qc)]
    else:
        md.append(f"(no QC sheets in {Path(work_dir) / 'qc'})")
    md.append("")

    md += ["## Run time per stage", ""]
    times_path = Path(work_dir) / "logs" / "times.json"
    try:
        times = json.loads(times_path.read_text()) if times_path.exists() else {}
    except (OSError, json.JSONDecodeError):
        times = {}
    if times:
        tt = pd.DataFrame([{"stage": k, "seconds": float(v.get("seconds", np.nan)), "status": v.get("status", ""),
                            "finished": v.get("finished", "")} for k, v in sorted(times.items())])
        md += [_md_table(tt, 1), "", f"Total {tt['seconds'].sum():.1f} s (as recorded; 07 is this run's own "
                                        "previous record, if any).", ""]
    else:
        md += [f"(no {times_path})", ""]

    md += ["## Resolved configs", ""]
    confs = sorted((Path(work_dir) / "logs").glob("*.config.yaml"))
    if confs:
        md += [f"- [{n}]({link})" for n, link in _link_files(confs, out_dir, "configs", cfg_blend.copy_qc)]
    else:
        md.append("(no resolved configs in the logs)")
    md.append("")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path
