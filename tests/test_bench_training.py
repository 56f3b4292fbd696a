"""Stage 6 benchmark helpers: the phantom table (bench/phantom_heads.py) and the 100 px script's ensembles
(bench/train_100px.py)."""

import importlib.util
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from boneage.config import REPO_ROOT


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(oof_dir, name, ids, male, age, err, holdout=False):
    df = pd.DataFrame({"id": ids, "fold": np.arange(len(ids)) % 2, "sex": np.where(male, "M", "F"), "boneage": age,
                       "pred": age + err})
    if holdout:
        df = df.drop(columns="fold")
    df.to_csv(oof_dir / f"{name}{'.holdout.csv' if holdout else '.csv'}", index=False)


def test_phantom_table_known_maes_per_sex_and_differences(tmp_path, capsys):
    ph = _load("phantom_heads")
    n = 40
    ids = [str(i) for i in range(n)]
    male = np.arange(n) % 8 < 2  # 10 boys, 30 girls: per_sex must weight by rows, not average the two models
    age = np.linspace(10, 200, n)
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    f, m = ~male, male
    for head, e in (("reg", 5.0), ("cls", 2.0)):
        _write(tmp_path, f"{head}_A_pooled_vgg", ids, male, age, e * sign)
        _write(tmp_path, f"{head}_A_sex_input_vgg", ids, male, age, (e - 1) * sign)
        _write(tmp_path, f"{head}_A_female_vgg", np.array(ids)[f], male[f], age[f], np.full(f.sum(), e + 1))
        _write(tmp_path, f"{head}_A_male_vgg", np.array(ids)[m], male[m], age[m], np.full(m.sum(), -(e + 3)))
        _write(tmp_path, f"{head}_A_pooled_vgg", ids[:8], male[:8], age[:8], np.full(8, 2 * e), holdout=True)
    t = ph.build_table(tmp_path, regions=["A", "B"]).set_index(["region", "sex_mode"])
    assert t.loc[("A", "pooled"), "reg_oof"] == pytest.approx(5.0)
    assert t.loc[("A", "pooled"), "cls_oof"] == pytest.approx(2.0)
    assert t.loc[("A", "pooled"), "diff_oof"] == pytest.approx(3.0)
    assert t.loc[("A", "sex_input"), "diff_oof"] == pytest.approx(3.0)
    assert t.loc[("A", "female"), "reg_oof"] == pytest.approx(6.0) and t.loc[("A", "female"), "n_oof"] == 30
    assert t.loc[("A", "male"), "cls_oof"] == pytest.approx(5.0) and t.loc[("A", "male"), "n_oof"] == 10
    assert t.loc[("A", "per_sex"), "reg_oof"] == pytest.approx((30 * 6 + 10 * 8) / 40)
    assert t.loc[("A", "per_sex"), "n_oof"] == 40
    assert t.loc[("A", "pooled"), "diff_holdout"] == pytest.approx(6.0)
    assert t.loc[("A", "sex_input"), "n_holdout"] == 0 and np.isnan(t.loc[("A", "sex_input"), "reg_holdout"])
    assert np.isnan(t.loc[("B", "pooled"), "reg_oof"])  # region not trained: empty cells, no crash
    s = ph.summary(t.reset_index()).iloc[:, 0]
    assert s["region A"] == pytest.approx(3.0)  # pooled, sex_input and per_sex all +3
    assert s["sex mode male"] == pytest.approx(3.0)

    out = tmp_path / "table.md"
    assert ph.main(["--oof", str(tmp_path), "--regions", "A", "--out", str(out)]) == 0
    md = out.read_text()
    assert "| A | pooled | 40 | 5.00 | 2.00 | +3.00 | 8 | 10.00 | 4.00 | +6.00 |" in md
    assert "| A | per_sex | 40 | 6.50 | 3.50 | +3.00 |" in md
    assert md == capsys.readouterr().out
    # sex-mean baseline: out of fold, each fold scored with the other fold's sex means
    oof = pd.read_csv(tmp_path / "reg_A_pooled_vgg.csv")
    err = [abs(r.boneage - oof[(oof.fold != r.fold) & (oof.sex == r.sex)].boneage.mean()) for r in oof.itertuples()]
    hold = pd.read_csv(tmp_path / "reg_A_pooled_vgg.holdout.csv")
    means = oof.groupby("sex").boneage.mean()
    hold_err = np.abs(hold.sex.map(means) - hold.boneage)
    assert ph.sex_mean_baseline(tmp_path) == pytest.approx((np.mean(err), hold_err.mean()))
    assert f"| sex-mean baseline | | | {np.mean(err):.2f} | | | | {hold_err.mean():.2f} | | |" in md
    with pytest.raises(SystemExit, match="no oof files"):
        ph.main(["--oof", str(tmp_path), "--backbone", "resnet18"])


def test_ensemble_members_and_mean():
    t = _load("train_100px")
    assert t.member_plan(2, 1, "reg") == [(2, "reg")]  # one member: the plain run of that seed
    plan = t.member_plan(1, 4, "reg+cls")
    assert plan == [(4, "reg"), (5, "cls"), (6, "reg"), (7, "cls")]
    seeds = [s for seed in (0, 1, 2) for s, _ in t.member_plan(seed, 4, "reg")]
    assert len(set(seeds)) == 12  # ensembles of different seeds share no member
    preds = [np.array([10.0, 100.0]), np.array([20.0, 110.0]), np.array([60.0, 90.0])]
    assert t.ensemble_mean(preds) == pytest.approx([30.0, 100.0])
    hold = pd.DataFrame({"boneage": [30.0, 100.0, 50.0, 10.0], "male": [True, False, False, True]})
    mae, f, m = t.score(np.array([32.0, 100.0, 44.0, 10.0]), hold)
    assert (mae, f, m) == pytest.approx((2.0, 3.0, 1.0))


def test_train_100px_ensemble_run_end_to_end(tmp_path):
    """Two members (reg, cls) on a tiny 100 px-style folder: the JSON line, member MAEs and saved predictions agree."""
    t = _load("train_100px")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    n = 24
    ages = rng.uniform(20, 200, n).round()
    for i in range(n):
        img = np.full((32, 32), int(ages[i]), np.uint8)
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), img)
    pd.DataFrame({"id": range(n), "male": np.arange(n) % 2 == 0, "boneage": ages,
                  "holdout": np.arange(n) >= 16}).to_csv(tmp_path / "labels.csv", index=False)
    out, preds = tmp_path / "runs.jsonl", tmp_path / "preds"
    t.main(["--data", str(tmp_path), "--threads", "1", "--seeds", "3", "--epochs", "1", "--ensemble-seeds", "2",
            "--head", "reg+cls", "--set", "train.vgg_width=0.125", "--set", "train.vgg_fc=16",
            "--set", "train.batch_size=8", "--tag", "t", "--out", str(out), "--save-preds", str(preds)])
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["ensemble_seeds"] == 2 and rec["head"] == "reg+cls" and len(rec["member_mae"]) == 2
    members = [pd.read_csv(preds / f"t_seed{s}_{h}.csv") for s, h in ((6, "reg"), (7, "cls"))]
    ens = pd.read_csv(preds / "t_ensemble3.csv")
    assert len(ens) == 8
    assert ens["pred"].to_numpy() == pytest.approx((members[0]["pred"] + members[1]["pred"]).to_numpy() / 2,
                                                   abs=1e-3)
    assert rec["mae"][0] == pytest.approx(float(np.mean(np.abs(ens["pred"] - ens["boneage"]))), abs=0.01)
    assert rec["member_mae"][1] == pytest.approx(float(np.mean(np.abs(members[1]["pred"] - members[1]["boneage"]))),
                                                 abs=0.01)
    with pytest.raises(SystemExit):
        t.main(["--data", str(tmp_path), "--head", "reg+cls", "--out", str(out)])  # reg+cls needs >= 2 members
