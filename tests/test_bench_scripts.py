"""The benchmark scripts anyone reruns to check a figure: the ablation table and the submission scorer."""

import importlib.util

import numpy as np
import pandas as pd
import pytest

from boneage.config import REPO_ROOT
from test_blending import make_oof


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablation_scores_single_models_and_blends_on_known_oof(tmp_path, capsys):
    truth = make_oof(tmp_path, n=1200, n_test=300)
    labels = pd.DataFrame({"id": truth["test_ids"], "boneage": truth["test_truth"],
                           "male": truth["test_sex"] == "M"})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "ablation.md"
    arms = ["A alone=reg_A_sex_input_vgg", "weak=cls_B_sex_input_vgg",
            "all=reg_A_sex_input_vgg,reg_C_sex_input_vgg,cls_B_sex_input_vgg"]
    argv = ["--oof", str(tmp_path / "oof"), "--folds", str(tmp_path / "folds" / "folds.csv"),
            "--labels", str(tmp_path / "labels.csv"), "--out", str(out)]
    assert _load("ablation").main(argv + [a for arm in arms for a in ("--arm", arm)]) == 0
    rows = [r.split("|")[1:-1] for r in out.read_text().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["A alone", "weak", "all"]
    oof = {r[0].strip(): float(r[1].split("(")[0]) for r in rows}
    test = {r[0].strip(): float(r[4].split("(")[0]) for r in rows}
    assert oof["A alone"] == pytest.approx(4 * np.sqrt(2 / np.pi), abs=0.3)  # MAE of N(0, 4)
    assert oof["weak"] == pytest.approx(12 * np.sqrt(2 / np.pi), abs=0.8)
    assert oof["all"] < oof["A alone"] < oof["weak"]
    assert test["A alone"] == pytest.approx(4 * np.sqrt(2 / np.pi), abs=0.6)
    assert test["all"] < test["weak"]
    assert all(len(r[3].split(",")) == 4 for r in rows)  # one MAE per fold
    with pytest.raises(SystemExit, match="reg_raw_sex_input_vgg"):
        _load("ablation").main(argv[:4] + ["--arm", "raw=reg_raw_sex_input_vgg"])


def test_score_overall_by_sex_and_band():
    score = _load("score").score
    labels = pd.DataFrame({"id": ["1", "2", "3", "4"], "boneage": [30.0, 100.0, 150.0, 200.0],
                           "male": [True, False, True, False]})
    sub = pd.DataFrame({"Case ID": [4, 3, 2, 1], "Sex": ["F", "M", "F", "M"], "boneage": [190.0, 150.0, 104.0, 32.0]})
    r = score(sub, labels)
    assert r["mae"] == pytest.approx((10 + 0 + 4 + 2) / 4)
    assert r["mae_male"] == pytest.approx(1.0) and r["mae_female"] == pytest.approx(7.0)
    assert r["bands"]["0-5 y"] == {"n": 1, "mae": 2.0}
    with pytest.raises(ValueError, match="lacks 1"):
        score(sub.iloc[:3], labels)


def test_stress_summary_shifts_and_accepted_columns():
    stress = _load("stress")
    rows = pd.DataFrame([
        {"id": "a", "transform": "original", "family": "original", "pred": 100.0, "raw_pred": 90.0, "status": "ok"},
        {"id": "b", "transform": "original", "family": "original", "pred": 50.0, "raw_pred": 60.0, "status": "ok"},
        {"id": "c", "transform": "original", "family": "original", "pred": 70.0, "raw_pred": 70.0,
         "status": "forced"},
        {"id": "a", "transform": "rot+10", "family": "rotation", "pred": 102.0, "raw_pred": 110.0, "status": "ok"},
        {"id": "b", "transform": "rot+10", "family": "rotation", "pred": 30.0, "raw_pred": 61.0, "status": "forced"},
        {"id": "c", "transform": "rot+10", "family": "rotation", "pred": 71.0, "raw_pred": 70.0, "status": "ok"},
    ])
    summary = stress.summarise(rows)
    r = summary.loc["rot+10"]
    assert r["n"] == 3 and r["median"] == pytest.approx(2.0) and r["max"] == pytest.approx(20.0)
    assert r["over12"] == pytest.approx(1 / 3) and r["rejected"] == pytest.approx(1 / 3)
    # only a: b's variant is rejected, c's original is
    assert r["acc_n"] == 1 and r["acc_median"] == pytest.approx(2.0) and r["acc_over12"] == 0.0
    assert r["raw_median"] == pytest.approx(1.0)
    assert summary.loc["**rotation** (all)", "n"] == 3
