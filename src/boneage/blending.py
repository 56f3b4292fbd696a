"""Stage 7 maths: read and check the out-of-fold files, fit the per-sex linear blend, apply it.

Files (method.md section 0): `oof/{model}.csv` (`id,fold,sex,boneage,pred`), `oof/{model}.test.csv`
(`id,sex,pred,pred_std[,pred_width]`), optional `oof/{model}.holdout.csv` (`id,sex,boneage,pred,pred_std`).
A model's name is `{head}_{region}_{sexmode}_{backbone}`; a `female` / `male` model covers only that
sex's radiographs, `pooled` and `sex_input` models cover both.

The blend, per sex: bone age = intercept + sum_i coef_i * pred_i over every model covering that sex,
fitted with scikit-learn (`LinearRegression(positive=True)` by default, `Ridge` as an option). Its
out-of-fold MAE is measured by cross-validation over the same folds as the models (fit on the other
folds, predict this one), so the blended figure does not see its own rows. The coefficients finally
kept are fitted on every out-of-fold row and stored as JSON.

Uncertainty of a blended prediction (months), three parts combined in quadrature:
- folds: sum_i |coef_i| * pred_std_i (the spread of each model over its fold models, taken as fully
  correlated between models, so an upper bound);
- models: the coefficient-weighted SD of the individual models' predictions (their disagreement), each
  model first put on the bone age scale by its own linear calibration on the OOF rows (`calibration` in
  blend.json: slope, intercept), so that a compressed but useful model does not read as disagreement;
- width: the coefficient-weighted mean of `pred_width` over classification heads (the SD of the
  predicted distribution over months), 0 when no classification head is blended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.errors import ConfigError, StageInputError

log = logging.getLogger(__name__)

SEXES = ("F", "M")
SEX_MODES = ("pooled", "sex_input", "female", "male")
OOF_COLUMNS = ("id", "fold", "sex", "boneage", "pred")
TEST_COLUMNS = ("id", "sex", "pred", "pred_std")
HOLDOUT_COLUMNS = ("id", "sex", "boneage", "pred", "pred_std")
MAX_IDS_NAMED = 8


@dataclass(frozen=True)
class ModelName:
    """The parts of a model's name `{head}_{region}_{sexmode}_{backbone}`."""

    name: str
    head: str
    region: str
    sex_mode: str
    backbone: str

    def covers(self, sex: str) -> bool:
        """Whether this model predicts radiographs of sex 'F' / 'M'."""
        if self.sex_mode == "female":
            return sex == "F"
        if self.sex_mode == "male":
            return sex == "M"
        return True


def parse_model_name(name: str) -> ModelName:
    """`cls_C_female_vgg` -> ModelName(head='cls', region='C', sex_mode='female', backbone='vgg').

    The backbone may itself contain underscores (`reg_A_pooled_efficientnet_b0`)."""
    parts = name.split("_", 2)
    rest = parts[2] if len(parts) == 3 else ""
    mode = next((m for m in sorted(SEX_MODES, key=len, reverse=True) if rest.startswith(m + "_")), None)
    if mode is None or not parts[0] or not parts[1] or len(rest) <= len(mode) + 1:
        raise StageInputError(f"model name '{name}' is not {{head}}_{{region}}_{{sexmode}}_{{backbone}} "
                              f"with sexmode one of {', '.join(SEX_MODES)}")
    return ModelName(name, parts[0], parts[1], mode, rest[len(mode) + 1:])


def _name_ids(ids) -> str:
    ids = sorted(map(str, ids))
    more = f" and {len(ids) - MAX_IDS_NAMED} more" if len(ids) > MAX_IDS_NAMED else ""
    return ", ".join(ids[:MAX_IDS_NAMED]) + more


def normalise_sex(values: pd.Series) -> pd.Series:
    """'F'/'M' (also female/male, f/m, 0/1 with 1 male, booleans with True male) -> 'F'/'M'; else NaN."""
    def one(v):
        if isinstance(v, (bool, np.bool_)):
            return "M" if v else "F"
        s = str(v).strip().upper()
        if s in ("F", "FEMALE", "0", "FALSE"):
            return "F"
        if s in ("M", "MALE", "1", "TRUE"):
            return "M"
        return np.nan
    return values.map(one)


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except Exception as exc:  # pandas raises several types for unreadable files
        raise StageInputError(f"{path}: cannot read as CSV ({exc})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StageInputError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(columns)}")
    df["id"] = df["id"].astype(str).str.strip()
    df["sex"] = normalise_sex(df["sex"])
    return df


@dataclass
class OofSet:
    """Every model's out-of-fold, test and (optional) hold-out predictions, checked."""

    models: list[ModelName]
    oof: dict[str, pd.DataFrame]  # model -> id, fold, sex, boneage, pred
    test: dict[str, pd.DataFrame]  # model -> id, sex, pred, pred_std, pred_width (NaN when absent)
    holdout: dict[str, pd.DataFrame]  # model -> id, sex, boneage, pred, pred_std (may be empty)
    folds: pd.DataFrame  # id, fold, holdout

    def model(self, name: str) -> ModelName:
        return next(m for m in self.models if m.name == name)

    def covering(self, sex: str) -> list[ModelName]:
        return [m for m in self.models if m.covers(sex)]


def read_oof_dir(oof_dir: Path, folds: pd.DataFrame, sex_by_id: pd.Series | None = None,
                 regions: list[str] | tuple[str, ...] | None = None) -> OofSet:
    """Read every `oof/*.csv` and check it against the folds, or raise one StageInputError naming
    every broken file and what is wrong (missing folds, missing / extra / duplicate ids, wrong fold,
    non-finite predictions, a missing test file).

    `regions`: only models of these inputs are read (stage 7 passes `blend.regions`, so that the
    ablation's raw / clean models in the same folder stay out of the blend); None reads every model.

    `sex_by_id` ('F'/'M' indexed by id, e.g. from the training labels) decides which ids a female /
    male model must cover; without it the sex columns of the files themselves are used.
    """
    oof_dir = Path(oof_dir)
    paths = sorted(p for p in oof_dir.glob("*.csv") if not p.name.endswith((".test.csv", ".holdout.csv")))
    if regions is not None:
        paths = [p for p in paths if parse_model_name(p.stem).region in regions]
    if not paths:
        where = f" of region(s) {', '.join(regions)}" if regions is not None else ""
        raise StageInputError(f"{oof_dir}: no out-of-fold files (*.csv){where}; run stage 06 first")
    problems: list[str] = []
    models, oof, test, holdout = [], {}, {}, {}
    for p in paths:
        m = parse_model_name(p.stem)
        models.append(m)
        df = _read_csv(p, OOF_COLUMNS)
        df["fold"] = pd.to_numeric(df["fold"], errors="coerce")
        df["boneage"] = pd.to_numeric(df["boneage"], errors="coerce")
        df["pred"] = pd.to_numeric(df["pred"], errors="coerce")
        oof[m.name] = df
        tp = oof_dir / f"{m.name}.test.csv"
        if tp.exists():
            t = _read_csv(tp, TEST_COLUMNS)
            for c in ("pred", "pred_std", "pred_width"):
                t[c] = pd.to_numeric(t[c], errors="coerce") if c in t.columns else np.nan
            test[m.name] = t
        else:
            problems.append(f"{tp.name}: missing (every model needs its test predictions)")
        hp = oof_dir / f"{m.name}.holdout.csv"
        if hp.exists():
            h = _read_csv(hp, HOLDOUT_COLUMNS)
            for c in ("boneage", "pred", "pred_std"):
                h[c] = pd.to_numeric(h[c], errors="coerce")
            holdout[m.name] = h
    if sex_by_id is None:
        both = pd.concat([d[["id", "sex"]] for d in oof.values()] + [d[["id", "sex"]] for d in holdout.values()])
        sex_by_id = both.dropna().drop_duplicates("id").set_index("id")["sex"]
    data = OofSet(models, oof, test, holdout, folds)
    for m in models:
        problems += _check_oof(m, oof[m.name], folds, sex_by_id)
        if m.name in holdout:
            problems += _check_holdout(m, holdout[m.name], folds, sex_by_id)
    if problems:
        raise StageInputError("broken out-of-fold files in " + str(oof_dir) + ":\n  " + "\n  ".join(problems))
    return data


def _expected_ids(m: ModelName, ids: pd.Series, sex_by_id: pd.Series) -> set[str]:
    if m.sex_mode in ("female", "male"):
        want = "F" if m.sex_mode == "female" else "M"
        return {i for i in ids if sex_by_id.get(i) == want}
    return set(ids)


def _check_oof(m: ModelName, df: pd.DataFrame, folds: pd.DataFrame, sex_by_id: pd.Series) -> list[str]:
    name = f"{m.name}.csv"
    out = []
    train = folds[~folds["holdout"]]
    expected = _expected_ids(m, train["id"], sex_by_id)
    got = set(df["id"])
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        out.append(f"{name}: duplicate id(s) {_name_ids(set(dup))}")
    missing = expected - got
    if missing:
        out.append(f"{name}: {len(missing)} id(s) of folds.csv missing: {_name_ids(missing)}")
    extra = got - expected
    if extra:
        held = extra & set(folds.loc[folds["holdout"], "id"])
        what = " (hold-out ids must not be in out-of-fold files)" if held else ""
        out.append(f"{name}: {len(extra)} id(s) not expected for a {m.sex_mode} model{what}: {_name_ids(extra)}")
    want_folds = set(train.loc[train["id"].isin(expected), "fold"])
    have_folds = set(df["fold"].dropna().astype(int))
    lost = want_folds - have_folds
    if lost:
        out.append(f"{name}: fold(s) {', '.join(map(str, sorted(lost)))} missing")
    fold_of = train.set_index("id")["fold"]
    shared = df[df["id"].isin(fold_of.index)]
    wrong = shared["id"][shared["fold"].to_numpy() != fold_of.reindex(shared["id"]).to_numpy()]
    if len(wrong):
        out.append(f"{name}: {len(wrong)} id(s) with a fold other than folds.csv's: {_name_ids(set(wrong))}")
    bad = df["id"][~np.isfinite(df["pred"].to_numpy(float)) | ~np.isfinite(df["boneage"].to_numpy(float))]
    if len(bad):
        out.append(f"{name}: {len(bad)} id(s) with a missing or non-finite pred/boneage: {_name_ids(set(bad))}")
    if df["sex"].isna().any():
        out.append(f"{name}: sex not F/M for id(s) {_name_ids(set(df.loc[df['sex'].isna(), 'id']))}")
    known = sex_by_id.reindex(df["id"]).to_numpy()
    clash = df["id"][(pd.notna(known)) & df["sex"].notna().to_numpy() & (known != df["sex"].to_numpy())]
    if len(clash):
        out.append(f"{name}: {len(clash)} id(s) whose sex differs from the labels': {_name_ids(set(clash))}")
    return out


def _check_holdout(m: ModelName, df: pd.DataFrame, folds: pd.DataFrame, sex_by_id: pd.Series) -> list[str]:
    name = f"{m.name}.holdout.csv"
    expected = _expected_ids(m, folds.loc[folds["holdout"], "id"], sex_by_id)
    out = []
    missing = expected - set(df["id"])
    if missing:
        out.append(f"{name}: {len(missing)} hold-out id(s) missing: {_name_ids(missing)}")
    extra = set(df["id"]) - expected
    if extra:
        out.append(f"{name}: {len(extra)} id(s) that are not hold-out ids of this model: {_name_ids(extra)}")
    bad = df["id"][~np.isfinite(df["pred"].to_numpy(float))]
    if len(bad):
        out.append(f"{name}: non-finite pred for id(s) {_name_ids(set(bad))}")
    return out


# ----------------------------------------------------------------------------- fitting


def make_estimator(method: str, ridge_alpha: float = 1.0):
    """The scikit-learn estimator of a blend: `nnls` (non-negative coefficients + intercept) or `ridge`."""
    from sklearn.linear_model import LinearRegression, Ridge

    if method == "nnls":
        return LinearRegression(positive=True)
    if method == "ridge":
        return Ridge(alpha=ridge_alpha)
    raise ConfigError(f"config key 'blend.method' must be nnls or ridge, got '{method}'")


def wide_table(frames: dict[str, pd.DataFrame], names: list[str], ids: list[str] | None = None,
               column: str = "pred") -> pd.DataFrame:
    """One column per model (its `column`), one row per id; only ids every model has unless `ids` given."""
    cols = {n: frames[n].drop_duplicates("id").set_index("id")[column] for n in names}
    wide = pd.DataFrame(cols)
    if ids is not None:
        wide = wide.reindex(ids)
    return wide.dropna() if ids is None else wide


def cv_blend_predict(X: np.ndarray, y: np.ndarray, folds: np.ndarray, method: str, ridge_alpha: float) -> np.ndarray:
    """Out-of-fold blended predictions: for each fold, fit on the other folds and predict this one.

    With a single fold present the blend cannot be cross-validated; the (in-sample) fit is returned."""
    out = np.full(len(y), np.nan)
    uniq = np.unique(folds)
    if len(uniq) < 2:
        return make_estimator(method, ridge_alpha).fit(X, y).predict(X)
    for k in uniq:
        test = folds == k
        est = make_estimator(method, ridge_alpha).fit(X[~test], y[~test])
        out[test] = est.predict(X[test])
    return out


@dataclass
class SexBlend:
    """The blend for one sex: coefficients kept, and its honest out-of-fold predictions."""

    sex: str
    models: list[str]
    coef: list[float]
    intercept: float
    oof: pd.DataFrame  # id, fold, sex, boneage, pred (blended, cross-validated), plus one column per model
    oof_mae: float
    fold_mae: dict[int, float]
    single_mae: dict[str, float]  # each model's raw OOF MAE on this sex
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (slope, intercept)
    fallback: str = ""  # "best_single" when the fitted blend did worse out of fold than its best model alone
    region_spread_q: dict[str, float] = field(default_factory=dict)  # quantile -> OOF spread between regions
    holdout: pd.DataFrame | None = None  # id, sex, boneage, pred (blend with the final coefficients)
    holdout_mae: float | None = None

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.intercept + X @ np.asarray(self.coef, dtype=float)


@dataclass
class Blend:
    """Both sexes' blends and what was asked for."""

    method: str
    ridge_alpha: float
    sexes: dict[str, SexBlend] = field(default_factory=dict)
    fallback_single: bool = True

    def oof_frame(self) -> pd.DataFrame:
        return pd.concat([b.oof[["id", "fold", "sex", "boneage", "pred"]] for b in self.sexes.values()],
                         ignore_index=True)

    def holdout_frame(self) -> pd.DataFrame | None:
        parts = [b.holdout for b in self.sexes.values() if b.holdout is not None]
        return pd.concat(parts, ignore_index=True) if parts else None

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "ridge_alpha": self.ridge_alpha,
            "clip_months": [0.0, 240.0],
            "formula": "bone_age = intercept + sum(coef[model] * pred[model]), per sex, clipped to 0..240",
            "sexes": {
                s: {
                    "models": b.models,
                    "coef": {m: round(float(c), 6) for m, c in zip(b.models, b.coef)},
                    "intercept": round(float(b.intercept), 6),
                    "calibration": {m: [round(float(a), 6), round(float(c), 6)] for m, (a, c) in b.calibration.items()},
                    "oof_mae": round(b.oof_mae, 4),
                    "fold_mae": {str(k): round(v, 4) for k, v in b.fold_mae.items()},
                    "single_model_oof_mae": {m: round(v, 4) for m, v in b.single_mae.items()},
                    "holdout_mae": None if b.holdout_mae is None else round(b.holdout_mae, 4),
                    "fallback": b.fallback,
                    "region_spread_oof_quantiles": {k: round(v, 2) for k, v in b.region_spread_q.items()},
                    "n_oof": int(len(b.oof)),
                }
                for s, b in self.sexes.items()
            },
        }


def blend_coefficients(blend_json: dict, sex: str) -> tuple[list[str], np.ndarray, float]:
    """(models, coefficients, intercept) of one sex from a `blend.json` dict."""
    try:
        s = blend_json["sexes"][sex]
        models = list(s["models"])
        return models, np.array([float(s["coef"][m]) for m in models]), float(s["intercept"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StageInputError(f"blend.json has no usable coefficients for sex {sex} ({exc})") from None


def fit_sex_blend(data: OofSet, sex: str, method: str, ridge_alpha: float, models: list[str] | None = None,
                  fallback_single: bool = True, warn: bool = True) -> SexBlend:
    """Fit the blend of one sex over `models` (default: every model covering that sex). With `fallback_single`,
    a blend whose cross-validated OOF MAE is worse than its best model's own OOF MAE is replaced by that model
    alone (coefficient 1, intercept 0): on few radiographs or undertrained, nearly constant models, a linear
    fit extrapolates (a 2-fold smoke run gave blend coefficients in the hundreds, OOF MAE 5,962 months)."""
    names = models if models is not None else [m.name for m in data.covering(sex)]
    if not names:
        raise StageInputError(f"no model covers sex {sex}; cannot blend")
    train = data.folds[~data.folds["holdout"]]
    base = data.oof[names[0]]
    ids = [i for i in base.loc[base["sex"] == sex, "id"] if i in set(train["id"])]
    X = wide_table(data.oof, names, ids)
    if X.isna().any().any():  # read_oof_dir guarantees coverage; this guards direct callers
        raise StageInputError(f"sex {sex}: models {', '.join(names)} do not cover the same ids")
    meta = base.drop_duplicates("id").set_index("id").loc[ids, ["fold", "boneage"]]
    y = meta["boneage"].to_numpy(float)
    folds = meta["fold"].to_numpy(int)
    Xa = X.to_numpy(float)
    pred = cv_blend_predict(Xa, y, folds, method, ridge_alpha)
    est = make_estimator(method, ridge_alpha).fit(Xa, y)
    oof = pd.DataFrame({"id": ids, "fold": folds, "sex": sex, "boneage": y, "pred": pred})
    for n in names:
        oof[n] = X[n].to_numpy(float)
    single = {n: float(np.mean(np.abs(X[n].to_numpy(float) - y))) for n in names}
    calib = {}
    for n in names:
        x = X[n].to_numpy(float)
        slope, icpt = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (1.0, 0.0)
        calib[n] = (float(slope), float(icpt))
    coef, intercept, fallback = [float(c) for c in est.coef_], float(est.intercept_), ""
    best = min(single, key=single.get)
    fitted_mae = float(np.mean(np.abs(np.clip(pred, 0, 240) - y)))
    if fallback_single and fitted_mae > single[best]:
        (log.warning if warn else log.debug)(
            "sex %s: the blend's OOF MAE %.2f is worse than %s alone (%.2f); that model is used alone",
            sex, fitted_mae, best, single[best])
        coef, intercept, fallback = [1.0 if n == best else 0.0 for n in names], 0.0, "best_single"
        pred = X[best].to_numpy(float)
        oof["pred"] = pred
    fold_mae = {int(k): float(np.mean(np.abs(pred[folds == k] - y[folds == k]))) for k in np.unique(folds)}
    sb = SexBlend(sex, list(names), coef, intercept, oof, float(np.mean(np.abs(pred - y))), fold_mae, single, calib,
                  fallback=fallback, region_spread_q=region_spread_quantiles(X, names, calib))
    if names and all(n in data.holdout for n in names):
        h0 = data.holdout[names[0]]
        hids = list(h0.loc[h0["sex"] == sex, "id"])
        if hids:
            H = wide_table(data.holdout, names, hids)
            hy = h0.drop_duplicates("id").set_index("id").loc[hids, "boneage"].to_numpy(float)
            hp = sb.predict(H.to_numpy(float))
            sb.holdout = pd.DataFrame({"id": hids, "sex": sex, "boneage": hy, "pred": hp})
            for n in names:
                sb.holdout[n] = H[n].to_numpy(float)
            sb.holdout_mae = float(np.mean(np.abs(np.clip(hp, 0, 240) - hy)))
    return sb


SPREAD_QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def region_estimates(P: np.ndarray, names: list[str], calib: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(regions, estimates (rows, regions)): a region's estimate of each row of P (rows x models) is the mean of
    its models' predictions, each on the bone age scale by its own calibration ((n_models, 2) slope, intercept).
    Stage 7 (the spread's quantiles) and `boneage.assess` (one radiograph) both use it."""
    regions = [parse_model_name(n).region for n in names]
    cal = np.asarray(P, float) * calib[:, 0] + calib[:, 1]
    order = sorted(set(regions))
    est = np.stack([cal[:, [i for i, r in enumerate(regions) if r == g]].mean(1) for g in order], 1)
    return order, est


def region_spreads(P: np.ndarray, names: list[str], calib: np.ndarray) -> np.ndarray:
    """Spread (max - min, months) between the regions' estimates (`region_estimates`) of each row of P; NaN
    where fewer than two regions."""
    _, est = region_estimates(P, names, calib)
    if est.shape[1] < 2:
        return np.full(len(est), np.nan)
    return est.max(1) - est.min(1)


def region_spread_quantiles(X: pd.DataFrame, names: list[str], calib: dict[str, tuple[float, float]]) -> dict:
    """Quantiles of the spread between regions over the out-of-fold rows (`SPREAD_QUANTILES`, keys like
    "0.995"): what the self-check calls an ordinary disagreement for these models. Empty with one region."""
    sp = region_spreads(X[names].to_numpy(float), names, np.array([calib[n] for n in names], float))
    sp = sp[np.isfinite(sp)]
    if not len(sp):
        return {}
    return {f"{q:g}": float(np.quantile(sp, q)) for q in SPREAD_QUANTILES}


def fit_blend(data: OofSet, method: str = "nnls", ridge_alpha: float = 1.0, fallback_single: bool = True) -> Blend:
    """Per-sex blends over every model covering each sex (sexes with no OOF rows are skipped)."""
    make_estimator(method, ridge_alpha)  # fail early on a bad method
    blend = Blend(method, ridge_alpha, fallback_single=fallback_single)
    for sex in SEXES:
        covering = data.covering(sex)
        if not covering or not (data.oof[covering[0].name]["sex"] == sex).any():
            log.warning("no out-of-fold rows of sex %s; no blend for it", sex)
            continue
        blend.sexes[sex] = fit_sex_blend(data, sex, method, ridge_alpha, fallback_single=fallback_single)
        b = blend.sexes[sex]
        log.info("blend %s: OOF MAE %.2f (best single %.2f, %s)", sex, b.oof_mae, min(b.single_mae.values()),
                 min(b.single_mae, key=b.single_mae.get))
    if not blend.sexes:
        raise StageInputError("no out-of-fold rows of either sex; nothing to blend")
    return blend


def blend_calibration(blend_json: dict, sex: str, models: list[str]) -> np.ndarray:
    """(n_models, 2) slope, intercept of each model's own calibration; identity where blend.json has none."""
    cal = blend_json.get("sexes", {}).get(sex, {}).get("calibration", {}) or {}
    return np.array([cal.get(m, [1.0, 0.0]) for m in models], dtype=float).reshape(len(models), 2)


def blend_uncertainty(preds: np.ndarray, stds: np.ndarray, widths: np.ndarray, coef: np.ndarray,
                      is_cls: np.ndarray, calibration: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Uncertainty parts (months) of blended predictions; arrays are (n_cases, n_models).

    `calibration` (n_models, 2: slope, intercept) maps each model's prediction onto the bone age scale
    before the models' disagreement is measured. Returns `fold_sd`, `model_sd`, `width_sd` and
    `uncertainty` (their quadrature sum)."""
    preds = np.atleast_2d(np.asarray(preds, float))
    if calibration is not None:
        cal = np.asarray(calibration, float)
        preds = preds * cal[:, 0] + cal[:, 1]
    stds = np.nan_to_num(np.atleast_2d(np.asarray(stds, float)), nan=0.0)
    widths = np.atleast_2d(np.asarray(widths, float))
    coef = np.asarray(coef, float)
    w = np.abs(coef)
    if w.sum() <= 0:  # a degenerate blend (all zero): weigh the models equally for the spread
        w = np.ones_like(w)
    wn = w / w.sum()
    fold_sd = stds @ np.abs(coef)
    mean = preds @ wn
    model_sd = np.sqrt(np.maximum(((preds - mean[:, None]) ** 2) @ wn, 0.0))
    cls = np.asarray(is_cls, bool)
    width_sd = np.zeros(len(preds))
    if cls.any() and w[cls].sum() > 0:
        wc = w[cls] / w[cls].sum()
        wid = widths[:, cls]
        ok = np.isfinite(wid)
        width_sd = np.where(ok.any(1), np.nansum(np.where(ok, wid, 0.0) * wc, 1) / np.maximum((ok * wc).sum(1), 1e-12),
                            0.0)
    total = np.sqrt(fold_sd ** 2 + model_sd ** 2 + width_sd ** 2)
    return {"fold_sd": fold_sd, "model_sd": model_sd, "width_sd": width_sd, "uncertainty": total}


def apply_blend_to_test(blend_json: dict, data: OofSet, test_ids: list[str], test_sex: list[str]) -> pd.DataFrame:
    """Blend the test predictions: one row per test id (in the given order) with `id, sex, boneage`
    (clipped to 0..240), the raw blended value, the uncertainty parts and each model's prediction.

    Raises StageInputError naming the ids that lack a finite prediction."""
    rows = []
    problems = []
    order = pd.DataFrame({"id": [str(i) for i in test_ids], "sex": list(test_sex)})
    for sex, part in order.groupby("sex", sort=False):
        if sex not in blend_json.get("sexes", {}):
            problems.append(f"no blend for sex {sex} (test ids {_name_ids(part['id'])})")
            continue
        models, coef, intercept = blend_coefficients(blend_json, sex)
        missing_models = [m for m in models if m not in data.test]
        if missing_models:
            problems.append(f"test predictions missing for model(s) {', '.join(missing_models)}")
            continue
        ids = list(part["id"])
        P = wide_table(data.test, models, ids, "pred").to_numpy(float)
        S = wide_table(data.test, models, ids, "pred_std").to_numpy(float)
        W = wide_table(data.test, models, ids, "pred_width").to_numpy(float)
        raw = intercept + P @ coef
        is_cls = np.array([parse_model_name(m).head == "cls" for m in models])
        unc = blend_uncertainty(P, S, W, coef, is_cls, blend_calibration(blend_json, sex, models))
        df = pd.DataFrame({"id": ids, "sex": sex, "raw": raw, "boneage": np.clip(raw, 0.0, 240.0)})
        for k, v in unc.items():
            df[k] = v
        for j, m in enumerate(models):
            df[m] = P[:, j]
        rows.append(df)
    if problems:
        raise StageInputError("cannot blend the test predictions: " + "; ".join(problems))
    out = pd.concat(rows, ignore_index=True).set_index("id").reindex(order["id"]).reset_index()
    check_submission(out, order["id"].tolist())
    return out


def check_submission(pred: pd.DataFrame, test_ids: list[str]) -> None:
    """Every test id has exactly one finite prediction, or a StageInputError naming the ids."""
    counts = pred["id"].value_counts()
    dup = [i for i in counts.index if counts[i] > 1]
    missing = sorted(set(test_ids) - set(pred["id"]))
    finite = pred.drop_duplicates("id").set_index("id")["boneage"].reindex(test_ids)
    nonfinite = [i for i, v in finite.items() if not np.isfinite(v) and i not in missing]
    extra = sorted(set(pred["id"]) - set(test_ids))
    msgs = []
    if missing:
        msgs.append(f"{len(missing)} test id(s) without a prediction: {_name_ids(missing)}")
    if nonfinite:
        msgs.append(f"{len(nonfinite)} test id(s) without a finite prediction (a model lacks them?): "
                    f"{_name_ids(nonfinite)}")
    if dup:
        msgs.append(f"{len(dup)} test id(s) predicted more than once: {_name_ids(dup)}")
    if extra:
        msgs.append(f"{len(extra)} predicted id(s) not in the test list: {_name_ids(extra)}")
    if msgs:
        raise StageInputError("submission check failed: " + "; ".join(msgs))
