"""Stage 7 blend: recovers known coefficients from synthetic OOF files and refuses broken ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneage.blending import (
    apply_blend_to_test,
    blend_uncertainty,
    check_submission,
    fit_blend,
    parse_model_name,
    read_oof_dir,
)
from boneage.errors import ConfigError, StageInputError
from boneage.folds import read_folds


def make_oof(root: Path, n: int = 400, n_test: int = 40, n_folds: int = 4, holdout_n: int = 0, seed: int = 0,
             sex_models: bool = False) -> dict:
    """Synthetic OOF files with known relations to the truth.

    reg_A: truth + N(0, 4); reg_C: 0.5 * truth + 60 + N(0, 4) (a biased, compressed model); cls_B: truth
    + N(0, 12) (a weak one). With sex_models, a female-only model cls_C_female_vgg = truth + N(0, 3).
    """
    rng = np.random.default_rng(seed)
    ids = [str(10000 + i) for i in range(n + holdout_n)]
    truth = rng.uniform(12, 228, len(ids))
    sex = np.where(rng.random(len(ids)) < 0.5, "F", "M")
    fold = np.arange(len(ids)) % n_folds
    hold = np.zeros(len(ids), bool)
    hold[n:] = True
    fold[hold] = -1
    (root / "folds").mkdir(parents=True, exist_ok=True)
    (root / "oof").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "fold": fold, "holdout": hold}).to_csv(root / "folds" / "folds.csv", index=False)
    models = {
        "reg_A_sex_input_vgg": lambda t, r: t + r.normal(0, 4, len(t)),
        "reg_C_sex_input_vgg": lambda t, r: 0.5 * t + 60 + r.normal(0, 4, len(t)),
        "cls_B_sex_input_vgg": lambda t, r: t + r.normal(0, 12, len(t)),
    }
    if sex_models:
        models["cls_C_female_vgg"] = lambda t, r: t + r.normal(0, 3, len(t))
    test_ids = [str(20000 + i) for i in range(n_test)]
    test_truth = rng.uniform(12, 228, n_test)
    test_sex = np.where(rng.random(n_test) < 0.5, "F", "M")
    for name, f in models.items():
        keep = ~hold
        if "female" in name:
            keep &= sex == "F"
        df = pd.DataFrame({"id": np.array(ids)[keep], "fold": fold[keep], "sex": sex[keep],
                           "boneage": truth[keep], "pred": f(truth[keep], rng)})
        df.to_csv(root / "oof" / f"{name}.csv", index=False)
        tk = np.ones(n_test, bool) if "female" not in name else test_sex == "F"
        t = pd.DataFrame({"id": np.array(test_ids)[tk], "sex": test_sex[tk], "pred": f(test_truth[tk], rng),
                          "pred_std": 1.0})
        if name.startswith("cls"):
            t["pred_width"] = 8.0
        t.to_csv(root / "oof" / f"{name}.test.csv", index=False)
        if holdout_n:
            hk = hold & ((sex == "F") if "female" in name else True)
            pd.DataFrame({"id": np.array(ids)[hk], "sex": sex[hk], "boneage": truth[hk], "pred": f(truth[hk], rng),
                          "pred_std": 1.0}).to_csv(root / "oof" / f"{name}.holdout.csv", index=False)
    return {"ids": ids, "sex": sex, "truth": truth, "test_ids": test_ids, "test_sex": test_sex,
            "test_truth": test_truth}


def test_parse_model_name():
    m = parse_model_name("cls_C_female_vgg")
    assert (m.head, m.region, m.sex_mode, m.backbone) == ("cls", "C", "female", "vgg")
    assert m.covers("F") and not m.covers("M")
    assert parse_model_name("reg_A_pooled_efficientnet_b0").backbone == "efficientnet_b0"
    with pytest.raises(StageInputError, match="reg_A_vgg"):
        parse_model_name("reg_A_vgg")


def test_blend_recovers_known_coefficients(tmp_path):
    make_oof(tmp_path, n=2000)
    data = read_oof_dir(tmp_path / "oof", read_folds(tmp_path / "folds" / "folds.csv"))
    blend = fit_blend(data, "nnls")
    for sex in ("F", "M"):
        b = blend.sexes[sex]
        coef = dict(zip(b.models, b.coef))
        # truth = reg_A (noise 4) and truth = 2 * reg_C - 120 (noise 8): inverse-variance weights 0.8 / 0.2 of
        # the two truth estimates, i.e. coef_A ~ 0.8, coef_C ~ 2 * 0.2 = 0.4, intercept ~ -120 * 0.2 = -24;
        # the weak cls_B (noise 12) gets a small share (population OLS: A 0.733, C 0.366, B 0.082, b -21.6)
        assert coef["reg_A_sex_input_vgg"] == pytest.approx(0.733, abs=0.06)
        assert coef["reg_C_sex_input_vgg"] == pytest.approx(0.366, abs=0.07)
        assert coef["cls_B_sex_input_vgg"] == pytest.approx(0.08, abs=0.04)
        assert b.intercept == pytest.approx(-21.6, abs=7.0)
        assert min(c for c in b.coef) >= 0
        # honest CV MAE below the best single model (reg_A, MAE ~ 4 * 0.8 = 3.2)
        assert b.oof_mae < min(b.single_mae.values())
        assert b.single_mae["reg_A_sex_input_vgg"] == pytest.approx(3.19, abs=0.35)
        assert b.oof["pred"].notna().all()
    js = blend.to_json()
    json.dumps(js)  # plain JSON
    assert set(js["sexes"]) == {"F", "M"}
    # the self-check's reference: quantiles of the spread between the regions' calibrated estimates, recomputed
    b = blend.sexes["F"]
    est = [np.polyval(np.polyfit(b.oof[m], b.oof["boneage"], 1), b.oof[m])
           for m in ("reg_A_sex_input_vgg", "cls_B_sex_input_vgg", "reg_C_sex_input_vgg")]
    spread = np.max(est, axis=0) - np.min(est, axis=0)
    q = js["sexes"]["F"]["region_spread_oof_quantiles"]
    assert list(q) == ["0.5", "0.8", "0.9", "0.95", "0.98", "0.99", "0.995", "0.999"]
    assert q["0.5"] == pytest.approx(np.median(spread), abs=0.01) and q["0.99"] == pytest.approx(
        np.quantile(spread, 0.99), abs=0.01)
    assert 5 < q["0.5"] < q["0.9"] < q["0.995"] < 60  # noise SDs 4 (A), 12 (B), 8 (C) after calibration


def test_degenerate_blend_falls_back_to_its_best_model(tmp_path):
    """40 radiographs, 2 folds, models that barely move (a 1-epoch smoke run): a linear fit on their noise
    extrapolates wildly out of fold. The blend is then replaced by its best model alone, per sex, and says so."""
    s = make_oof(tmp_path, n=40, n_test=10, n_folds=2)
    rng = np.random.default_rng(1)
    for k, f in enumerate(sorted((tmp_path / "oof").glob("*.csv"))):
        df = pd.read_csv(f, dtype={"id": str})
        df["pred"] = 110.0 + 5 * k + rng.normal(0, 0.05, len(df))  # nearly constant, different levels
        df.to_csv(f, index=False)
    data = read_oof_dir(tmp_path / "oof", read_folds(tmp_path / "folds" / "folds.csv"))
    raw = fit_blend(data, "nnls", fallback_single=False)
    blend = fit_blend(data, "nnls")
    js = blend.to_json()
    pred = apply_blend_to_test(js, data, s["test_ids"], list(s["test_sex"]))
    fell_back = []
    for sex in ("F", "M"):
        b, r = blend.sexes[sex], raw.sexes[sex]
        best = min(b.single_mae, key=b.single_mae.get)
        assert r.fallback == ""
        if r.oof_mae <= b.single_mae[best]:  # the fitted blend held its own: kept as fitted
            assert b.fallback == "" and b.coef == r.coef and b.oof_mae == r.oof_mae
            continue
        fell_back.append(sex)
        assert b.fallback == "best_single" and js["sexes"][sex]["fallback"] == "best_single"
        assert dict(zip(b.models, b.coef)) == {m: (1.0 if m == best else 0.0) for m in b.models}
        assert b.intercept == 0.0 and b.oof_mae == pytest.approx(b.single_mae[best])
        test_best = pd.read_csv(tmp_path / "oof" / f"{best}.test.csv", dtype={"id": str}).set_index("id")["pred"]
        rows = pred[pred["id"].isin([i for i, x in zip(s["test_ids"], s["test_sex"]) if x == sex])]
        assert np.allclose(rows["boneage"].to_numpy(), test_best.loc[rows["id"]].to_numpy(), atol=0.01)
    assert fell_back == ["F"]  # F's fitted blend: OOF MAE 82 against 56 for its best model (M's: 46 against 52)


def test_ridge_option_and_bad_method(tmp_path):
    make_oof(tmp_path, n=300)
    data = read_oof_dir(tmp_path / "oof", read_folds(tmp_path / "folds" / "folds.csv"))
    b = fit_blend(data, "ridge", 1.0).sexes["F"]
    assert b.oof_mae < min(b.single_mae.values()) + 0.1
    with pytest.raises(ConfigError, match="blend.method"):
        fit_blend(data, "xgboost")


def test_sex_specific_model_only_in_its_sex(tmp_path):
    make_oof(tmp_path, n=600, sex_models=True)
    data = read_oof_dir(tmp_path / "oof", read_folds(tmp_path / "folds" / "folds.csv"))
    blend = fit_blend(data)
    assert "cls_C_female_vgg" in blend.sexes["F"].models
    assert "cls_C_female_vgg" not in blend.sexes["M"].models
    assert blend.sexes["F"].oof_mae < blend.sexes["M"].oof_mae  # the female model is the best one


def test_holdout_and_test_application(tmp_path):
    s = make_oof(tmp_path, n=600, holdout_n=100, sex_models=True)
    data = read_oof_dir(tmp_path / "oof", read_folds(tmp_path / "folds" / "folds.csv"))
    blend = fit_blend(data)
    for b in blend.sexes.values():
        assert b.holdout_mae is not None and b.holdout_mae < 5.0
        assert len(b.holdout) > 30
    js = blend.to_json()
    out = apply_blend_to_test(js, data, s["test_ids"], list(s["test_sex"]))
    assert list(out["id"]) == s["test_ids"]
    assert out["boneage"].between(0, 240).all()
    assert np.mean(np.abs(out["boneage"] - s["test_truth"])) < 5.0
    assert (out["uncertainty"] > 0).all()
    # female rows blend a cls head with width 8: the width part is 8
    assert out.loc[out["sex"] == "F", "width_sd"].to_numpy() == pytest.approx(8.0)


def test_blend_uncertainty_parts():
    preds = np.array([[100.0, 110.0]])
    unc = blend_uncertainty(preds, np.array([[2.0, 4.0]]), np.array([[np.nan, 6.0]]), np.array([0.5, 0.5]),
                            np.array([False, True]))
    assert unc["fold_sd"][0] == pytest.approx(3.0)
    assert unc["model_sd"][0] == pytest.approx(5.0)
    assert unc["width_sd"][0] == pytest.approx(6.0)
    assert unc["uncertainty"][0] == pytest.approx(np.sqrt(9 + 25 + 36))


def _broken(tmp_path, edit):
    make_oof(tmp_path, n=200, sex_models=True)
    edit(tmp_path / "oof")
    folds = read_folds(tmp_path / "folds" / "folds.csv")
    with pytest.raises(StageInputError) as exc:
        read_oof_dir(tmp_path / "oof", folds)
    return str(exc.value)


def test_refuses_missing_fold(tmp_path):
    def drop_fold(d):
        p = d / "reg_C_sex_input_vgg.csv"
        df = pd.read_csv(p, dtype={"id": str})
        df[df["fold"] != 2].to_csv(p, index=False)
    msg = _broken(tmp_path, drop_fold)
    assert "reg_C_sex_input_vgg.csv" in msg and "fold(s) 2 missing" in msg


def test_refuses_missing_id(tmp_path):
    def drop_id(d):
        p = d / "cls_C_female_vgg.csv"
        df = pd.read_csv(p, dtype={"id": str})
        df.iloc[1:].to_csv(p, index=False)
    msg = _broken(tmp_path, drop_id)
    assert "cls_C_female_vgg.csv" in msg and "1 id(s) of folds.csv missing" in msg


def test_refuses_wrong_sex_rows_fold_and_missing_test(tmp_path):
    def several(d):
        p = d / "cls_C_female_vgg.csv"
        a = pd.read_csv(d / "reg_A_sex_input_vgg.csv", dtype={"id": str})
        pd.concat([pd.read_csv(p, dtype={"id": str}), a[a["sex"] == "M"].head(2)]).to_csv(p, index=False)
        q = d / "reg_A_sex_input_vgg.csv"
        a.loc[0, "fold"] = (a.loc[0, "fold"] + 1) % 4
        a.to_csv(q, index=False)
        (d / "cls_B_sex_input_vgg.test.csv").unlink()
    msg = _broken(tmp_path, several)
    assert "cls_C_female_vgg.csv: 2 id(s) not expected for a female model" in msg
    assert "reg_A_sex_input_vgg.csv: 1 id(s) with a fold other than folds.csv's" in msg
    assert "cls_B_sex_input_vgg.test.csv: missing" in msg


def test_refuses_sex_clash_with_labels(tmp_path):
    s = make_oof(tmp_path, n=200)
    folds = read_folds(tmp_path / "folds" / "folds.csv")
    labels = pd.Series(s["sex"], index=s["ids"])
    labels.iloc[0] = "M" if labels.iloc[0] == "F" else "F"
    with pytest.raises(StageInputError, match=f"sex differs from the labels': {s['ids'][0]}"):
        read_oof_dir(tmp_path / "oof", folds, labels)


def test_submission_check_names_ids():
    pred = pd.DataFrame({"id": ["1", "2", "2", "4"], "boneage": [10.0, 20.0, 20.0, np.nan]})
    with pytest.raises(StageInputError) as exc:
        check_submission(pred, ["1", "2", "3", "4"])
    msg = str(exc.value)
    assert "without a prediction: 3" in msg and "without a finite prediction" in msg and "4" in msg
    assert "more than once: 2" in msg


def test_blend_reads_only_the_configured_regions(tmp_path):
    """The ablation's whole-radiograph models (raw, clean) share oof/ with the regions but stay out of the blend."""
    make_oof(tmp_path)
    oof = tmp_path / "oof"
    for suffix in (".csv", ".test.csv"):
        (oof / f"reg_raw_sex_input_vgg{suffix}").write_text((oof / f"reg_A_sex_input_vgg{suffix}").read_text())
    folds = read_folds(tmp_path / "folds" / "folds.csv")
    every = {m.name for m in read_oof_dir(oof, folds).models}
    assert "reg_raw_sex_input_vgg" in every
    blended = {m.name for m in read_oof_dir(oof, folds, regions=["A", "B", "C"]).models}
    assert blended == every - {"reg_raw_sex_input_vgg"}
    with pytest.raises(StageInputError, match="region"):
        read_oof_dir(oof, folds, regions=["clean"])
