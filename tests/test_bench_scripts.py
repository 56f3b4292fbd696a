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


def test_stress_report_from_the_rows_of_two_shards(tmp_path, capsys):
    """`--shard K/N` runs split the radiographs; `--rows` takes every shard's rows and reports them as one run."""
    stress = _load("stress")
    base = {"family": "original", "raw_pred": np.nan, "status": "ok", "transform": "original"}
    shards = []
    for k, ids in enumerate((["a", "c"], ["b"])):
        rows = []
        for j, i in enumerate(ids):
            rows.append({**base, "id": i, "pred": 100.0 + 10 * j})
            rows.append({**base, "id": i, "transform": "hflip", "family": "flip", "pred": 100.0 + 10 * j + k + 1})
        shards.append(tmp_path / f"rows{k}.csv")
        pd.DataFrame(rows).to_csv(shards[-1], index=False)
    assert stress.main(["--models", "unused", "--rows", *map(str, shards), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "stress.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| hflip |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "3" and float(cells[3]) == pytest.approx(1.0) and float(cells[5]) == pytest.approx(2.0)
    assert "Radiographs: 3 of the rsna-half hold-out" in md
    # only a flip was run: the intensity bar is not judged on no rows
    assert "median < 3 months: not run" in md and "none > 12: **not met**" in md


def test_stage12_speed_runs_stage_1_and_2_on_a_half_precision_unet(tmp_path, capsys):
    """bench/stage12_speed.py (issue 4's speed figure, CPU and GPU): a U-Net stored in half precision (as carried
    to a GPU box) loads into the fp32 model; every radiograph is timed through both stages, the network's share
    inside stage 1."""
    import json

    import cv2
    import torch

    from boneage.config import load_config
    from boneage.phantom import PhantomConfig, make_phantom
    from boneage.segmentation import build_unet

    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml")
    sd = build_unet(cfg.segment).state_dict()
    (tmp_path / "unet").mkdir()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "unet" / "unet.pt")
    (tmp_path / "images").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), make_phantom(PhantomConfig(), 5, i).image)
    out = tmp_path / "speed.json"
    argv = ["--unet", str(tmp_path / "unet"), "--images", str(tmp_path / "images"), "--n", "5", "--threads", "1",
            "--config", str(REPO_ROOT / "configs" / "smoke.yaml"), "--set", "segment.predict_batch_size=2",
            "--out", str(out)]
    assert _load("stage12_speed").main(argv) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 3 and res["batch"] == 2 and res["device"] == "cpu" and res["amp"] is False
    ms = res["ms_per_image"]
    assert 0 < ms["stage1_network"] <= ms["stage1"] and ms["clean"] > 0 and ms["encode"] > 0
    assert res["images_per_s"] == pytest.approx(1000 / sum(v for k, v in ms.items() if k != "stage1_network"),
                                                rel=0.15)
    assert _load("stage12_speed").main(argv[:2] + ["--images", str(tmp_path / "unet")]) == 2  # no radiographs
    import boneage.segmentation as seg

    assert seg.predict_probs.__name__ == "predict_probs"  # the bench's timing wrapper is taken off again


@pytest.mark.parametrize("script", sorted((REPO_ROOT / "bench" / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_gpu_session_scripts_parse(script):
    """The scripts run on a lent GPU machine, where a syntax error costs device time: `bash -n` reads them whole."""
    import subprocess

    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_compression_bench_tables_shift_by_block_edges(tmp_path):
    comp = _load("compression")
    rows = []
    for k in range(10):
        rows.append({"id": str(k), "quality_jpeg": 0, "pred": 100.0 + k, "status": "ok", "block_artefacts": 1.0})
        # light compression: 1 month off, accepted; heavy: 20 months off, refused for half of them
        rows.append({"id": str(k), "quality_jpeg": 90, "pred": 101.0 + k, "status": "ok", "block_artefacts": 2.0})
        rows.append({"id": str(k), "quality_jpeg": 30, "pred": 80.0 + k, "status": "ok" if k < 5 else "rejected",
                     "block_artefacts": 20.0})
    rows = pd.DataFrame(rows)
    v = comp.shifts(rows)
    assert set(v["quality_jpeg"]) == {30, 90}
    assert v.loc[v["quality_jpeg"] == 90, "shift"].tolist() == pytest.approx([1.0] * 10)
    assert (v.loc[v["quality_jpeg"] == 30, "band"].astype(str) == ">= 16").all()
    lines = comp.table(v, "band")
    cells = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in lines[2:]}
    assert set(cells) == {"0-4", ">= 16"}
    assert [c.strip() for c in cells["0-4"]] == ["10", "1.00", "1.00", "0%", "0%", "1.00"]
    assert [c.strip() for c in cells[">= 16"]] == ["10", "20.00", "20.00", "100%", "50%", "20.00"]
    args = type("A", (), {"models": "m", "config": "c", "overrides": [], "skip": 40})()
    md = comp.to_markdown(v, rows, args)
    assert "10 rsna-half holdout radiographs" in md and "max 1.00 grey levels" in md
    comp.plot(v, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert comp.main(["--models", "unused", "--rows", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "o")]) == 0
    assert "| >= 16 | 10 | 20.00 |" in (tmp_path / "o" / "compression.md").read_text()
    assert (tmp_path / "o" / "compression.png").exists()


def test_mask_consistency_scores_a_steady_segmenter_high_and_a_frame_bound_one_low():
    """bench/mask_consistency.py: a segmenter that follows the hand (grey above the film's background) keeps its mask
    through every copy; one that marks a fixed part of the frame (the left half) does not follow a mirror or a turn."""
    from boneage.phantom import PhantomConfig, make_phantom

    mc = _load("mask_consistency")
    pc = PhantomConfig()
    pc.long_side_px, pc.artefacts = 384, False
    images = {str(i): make_phantom(pc, 0, i).image for i in range(2)}

    def follows(img):
        border = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]))
        return img > border + 25

    def left_half(img):
        m = np.zeros(img.shape, bool)
        m[:, : img.shape[1] // 2] = True
        return m

    steady = mc.summary(mc.consistency(images, follows))
    assert set(steady) == set(mc.TRANSFORMS)
    assert all(v["median"] > 0.9 for v in steady.values()), steady
    bound = mc.summary(mc.consistency(images, left_half, ("hflip", "rot+45")))
    assert bound["hflip"]["median"] < 0.05 and bound["rot+45"]["median"] < 0.7
    with pytest.raises(ValueError, match="unknown transform"):
        mc.transform("shear", images["0"])
