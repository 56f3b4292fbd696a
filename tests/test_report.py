"""Stage 7 report and stage script: rendered from synthetic OOF files into a temporary run."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneage.config import load_config
from boneage.errors import StageInputError
from test_blending import make_oof

REPO = Path(__file__).resolve().parents[1]


def _stage7():
    spec = importlib.util.spec_from_file_location("stage07_blend", REPO / "src" / "07_blend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, monkeypatch, holdout_n: int = 60, truth: bool = True):
    s = make_oof(tmp_path, n=400, n_test=30, holdout_n=holdout_n, sex_models=True)
    work = tmp_path / "work"
    (work / "qc").mkdir(parents=True)
    (work / "logs").mkdir(parents=True)
    import cv2

    cv2.imwrite(str(work / "qc" / "01_masks_worst.png"), np.zeros((20, 20), np.uint8))
    (work / "logs" / "times.json").write_text(json.dumps(
        {"01_segment": {"seconds": 12.5, "status": "ok", "finished": "2026-01-01 00:00:00"}}))
    (work / "logs" / "01_segment.config.yaml").write_text("seed: 0\n")
    tid = s["test_ids"]
    pd.DataFrame({"id": tid, "quality": 0.9, "area_frac": 0.3, "n_components": 1,
                  "flag": ["small hand"] + [""] * (len(tid) - 1)}).to_csv(work / "masks.csv", index=False)
    pd.DataFrame({"id": tid, "confidence": [0.9, 0.2] + [0.9] * (len(tid) - 2)}).to_csv(
        work / "keypoints.csv", index=False)
    if truth:
        (tmp_path / "input" / "ground_truth").mkdir(parents=True)
        pd.DataFrame({"id": tid, "boneage": s["test_truth"], "male": s["test_sex"] == "M"}).to_csv(
            tmp_path / "input" / "ground_truth" / "test_labels.csv", index=False)
    n_train = len(s["ids"])
    ds = types.SimpleNamespace(
        train=pd.DataFrame({"id": s["ids"], "male": s["sex"] == "M", "boneage": s["truth"],
                            "path": [Path(f"{i}.png") for i in s["ids"]]}).iloc[:n_train],
        test=pd.DataFrame({"id": tid, "male": s["test_sex"] == "M", "path": [Path(f"{i}.png") for i in tid]}),
    )
    fake = types.ModuleType("boneage.inputs")
    fake.load_dataset = lambda cfg: ds
    monkeypatch.setitem(sys.modules, "boneage.inputs", fake)
    cfg = load_config(None, [f"input_dir={tmp_path / 'input'}", f"work_dir={work}", f"folds_dir={tmp_path / 'folds'}",
                             f"oof_dir={tmp_path / 'oof'}", f"submissions_dir={tmp_path / 'sub'}",
                             "blend.check_top_n=3"])
    _stage7().main(cfg, types.SimpleNamespace(force=False))
    return s, tmp_path / "sub"


def test_stage7_writes_submission_report_and_plots(tmp_path, monkeypatch):
    s, sub = _run(tmp_path, monkeypatch)
    subm = pd.read_csv(sub / "submission.csv", dtype={"Case ID": str})
    assert list(subm.columns) == ["Case ID", "Sex", "boneage"]
    assert list(subm["Case ID"]) == s["test_ids"]
    assert list(subm["Sex"]) == list(s["test_sex"])
    assert subm["boneage"].between(0, 240).all()
    assert np.mean(np.abs(subm["boneage"] - s["test_truth"])) < 5
    blend = json.loads((sub / "blend.json").read_text())
    assert set(blend["sexes"]) == {"F", "M"} and "cls_C_female_vgg" in blend["sexes"]["F"]["coef"]
    unc = pd.read_csv(sub / "test_uncertainty.csv", dtype={"id": str})
    assert (unc["uncertainty_months"] > 0).all() and len(unc) == 30
    assert unc.loc[unc["id"] == s["test_ids"][0], "qc_flags"].item() == "mask: small hand"
    chk = pd.read_csv(sub / "check_cases.csv", dtype={"id": str})
    assert {s["test_ids"][0], s["test_ids"][1]} <= set(chk["id"])  # the QC-flagged ones
    assert len(chk) >= 3
    md = (sub / "report.md").read_text()
    for section in ("## Summary", "## The paper's table", "## Models", "## Blend coefficients",
                    "## Predicted against true", "## Bland-Altman", "## MAE by age band and sex",
                    "## Test cases a person should check", "## QC sheets", "## Run time per stage",
                    "## Resolved configs"):
        assert section in md, section
    assert "beats the best single model" in md
    assert "Hold-out (60 radiographs" in md
    assert "Test set scored against `input/ground_truth/test_labels.csv`" in md and "sex-mean baseline" in md
    assert "| 8.08 |" in md and "6.39 / 6.16" in md  # the paper's figures beside this run's
    assert "ensemble of regions" in md
    assert "[01_masks_worst.png](qc/01_masks_worst.png)" in md and (sub / "qc" / "01_masks_worst.png").exists()
    assert "[01_segment.config.yaml](configs/01_segment.config.yaml)" in md
    assert "| 01_segment | 12.5 | ok |" in md
    for png in ("coefficients", "pred_vs_true", "bland_altman", "mae_by_age", "uncertainty"):
        p = sub / "figures" / f"{png}.png"
        assert p.exists() and p.stat().st_size > 5000, png
        assert f"figures/{png}.png" in md


def test_stage7_without_holdout_or_truth(tmp_path, monkeypatch):
    _, sub = _run(tmp_path, monkeypatch, holdout_n=0, truth=False)
    md = (sub / "report.md").read_text()
    assert "no hold-out MAE" in md and "the test set is not scored" in md


def test_stage7_refuses_test_ids_without_prediction(tmp_path, monkeypatch):
    s = make_oof(tmp_path, n=200, n_test=10)
    for p in (tmp_path / "oof").glob("reg_A*.test.csv"):
        df = pd.read_csv(p, dtype={"id": str})
        df.iloc[2:].to_csv(p, index=False)
    ds = types.SimpleNamespace(
        train=pd.DataFrame({"id": s["ids"], "male": s["sex"] == "M", "boneage": s["truth"]}),
        test=pd.DataFrame({"id": s["test_ids"], "male": s["test_sex"] == "M"}))
    fake = types.ModuleType("boneage.inputs")
    fake.load_dataset = lambda cfg: ds
    monkeypatch.setitem(sys.modules, "boneage.inputs", fake)
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", f"folds_dir={tmp_path / 'folds'}",
                             f"oof_dir={tmp_path / 'oof'}", f"submissions_dir={tmp_path / 'sub'}"])
    with pytest.raises(StageInputError, match="20000, 20001"):
        _stage7().main(cfg, types.SimpleNamespace(force=False))
