"""Stage 00 writes the phantom data set in the Kaggle layout, with annotations and separate ground truth."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from boneage.config import REPO_ROOT as REPO
from boneage.config import load_config
from boneage.demo_data import make_demo_dataset


def _stage():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "src" / "00_make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _overrides(tmp):
    return [f"input_dir={tmp / 'input'}", f"work_dir={tmp / 'work'}", "demo.n_train=12", "demo.n_test=4",
            "phantom.long_side_px=128", "demo.annotated_fraction=0.25", "demo.workers=1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    from boneage.cli import run_stage

    mod = _stage()
    argv = ["--config", "configs/smoke.yaml"]
    for o in _overrides(tmp):
        argv += ["--set", o]
    assert run_stage("00_make_demo_data", "test", mod.main, argv=argv) == 0
    return tmp, tmp / "input"


def test_layout_and_csvs(made):
    tmp, out = made
    train = pd.read_csv(out / "boneage-training-dataset.csv", dtype={"id": str})
    assert list(train.columns) == ["id", "boneage", "male"]
    assert list(train["id"]) == [str(i) for i in range(1, 13)]
    assert train["male"].dtype == bool
    assert train["boneage"].between(0, 228).all()
    raw = (out / "boneage-training-dataset.csv").read_text()
    assert "True" in raw or "False" in raw
    test = pd.read_csv(out / "boneage-test-dataset.csv", dtype={"Case ID": str})
    assert list(test.columns) == ["Case ID", "Sex"]
    assert list(test["Case ID"]) == [str(i) for i in range(13, 17)]
    assert set(test["Sex"]) <= {"M", "F"}
    for i in train["id"]:
        assert (out / "boneage-training-dataset" / f"{i}.png").exists()
    for i in test["Case ID"]:
        assert (out / "boneage-test-dataset" / f"{i}.png").exists()
    from boneage.fileio import read_gray

    img = read_gray(out / "boneage-training-dataset" / "1.png")
    assert img.shape == (128, 102)


def test_annotations_training_only(made):
    _, out = made
    kp = pd.read_csv(out / "annotations" / "keypoints.csv", dtype={"id": str})
    assert list(kp.columns) == ["id", "middle_tip_x", "middle_tip_y", "thumb_tip_x", "thumb_tip_y",
                                "capitate_x", "capitate_y"]
    assert len(kp) == 3  # round(0.25 * 12)
    assert set(kp["id"]).issubset({str(i) for i in range(1, 13)})
    masks = sorted(p.stem for p in (out / "annotations" / "masks").glob("*.png"))
    assert sorted(masks) == sorted(kp["id"])
    from boneage.fileio import read_gray

    m = read_gray(out / "annotations" / "masks" / f"{kp['id'].iloc[0]}.png")
    assert set(np.unique(m)) <= {0, 255}
    via = json.loads((out / "annotations" / "via_keypoints.json").read_text())
    meta = via["_via_img_metadata"]
    assert len(meta) == 3
    for entry in meta.values():
        names = {r["region_attributes"]["name"] for r in entry["regions"]}
        assert names <= {"middle_tip", "thumb_tip", "capitate"}
        for r in entry["regions"]:
            assert r["shape_attributes"]["name"] == "point"
        row = kp[kp["id"] == entry["filename"][:-4]].iloc[0]
        for r in entry["regions"]:
            n = r["region_attributes"]["name"]
            assert abs(r["shape_attributes"]["cx"] - row[f"{n}_x"]) <= 0.51


def test_ground_truth_separate(made):
    _, out = made
    gt = out / "ground_truth"
    labels = pd.read_csv(gt / "test_labels.csv", dtype={"id": str})
    assert list(labels.columns) == ["id", "boneage", "male"] and list(labels["id"]) == ["13", "14", "15", "16"]
    test = pd.read_csv(out / "boneage-test-dataset.csv", dtype={"Case ID": str})
    assert list(labels["male"].map({True: "M", False: "F"})) == list(test["Sex"])
    assert len(pd.read_csv(gt / "test_keypoints.csv")) == 4
    assert len(list((gt / "masks").glob("*.png"))) == 4
    lines = (gt / "params.jsonl").read_text().splitlines()
    assert len(lines) == 16
    rec = json.loads(lines[0])
    assert rec["id"] == "1" and "rotation_deg" in rec and "keypoints" in rec
    # no test answers in the input side
    assert not any("boneage" in p.name for p in (out / "annotations").iterdir())


def test_deterministic_resume_and_skip(made, tmp_path, capsys):
    tmp, out = made
    cfg = load_config("configs/smoke.yaml", _overrides(tmp))
    # complete set: no --force -> nothing is rewritten
    before = (out / "boneage-training-dataset" / "5.png").stat().st_mtime_ns
    make_demo_dataset(cfg)
    assert "already holds a data set" in capsys.readouterr().out
    assert (out / "boneage-training-dataset" / "5.png").stat().st_mtime_ns == before
    # a second folder with the same seed: identical bytes; an interrupted run resumes
    cfg2 = load_config("configs/smoke.yaml", _overrides(tmp) + [f"demo.out_dir={tmp_path / 'again'}"])
    out2 = make_demo_dataset(cfg2)
    for name in ("boneage-training-dataset/3.png", "boneage-test-dataset/14.png", "boneage-training-dataset.csv",
                 "annotations/keypoints.csv", "ground_truth/test_labels.csv"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name
    (out2 / "boneage-training-dataset" / "7.png").unlink()
    (out2 / "boneage-training-dataset.csv").unlink()
    keep = (out2 / "boneage-training-dataset" / "2.png").stat().st_mtime_ns
    make_demo_dataset(cfg2)
    assert (out2 / "boneage-training-dataset" / "7.png").read_bytes() == \
        (out / "boneage-training-dataset" / "7.png").read_bytes()
    assert (out2 / "boneage-training-dataset" / "2.png").stat().st_mtime_ns == keep  # skipped, not redone
    assert (out2 / "boneage-training-dataset.csv").read_bytes() == (out / "boneage-training-dataset.csv").read_bytes()


def test_image_written_last_so_an_existing_image_means_a_finished_item(tmp_path, monkeypatch):
    """A kill between an item's files must never leave its radiograph without its record: the resume
    check takes an existing radiograph as finished (the CI failure of 2026-11-26 was exactly this)."""
    import boneage.demo_data as dd
    from boneage.phantom import PhantomConfig

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the record")

    monkeypatch.setattr(dd, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        dd._make_item(PhantomConfig(long_side_px=96), 1, tmp_path, 3, "train", True, force=False)
    assert not (tmp_path / "boneage-training-dataset" / "3.png").exists()
    monkeypatch.undo()
    rec = dd._make_item(PhantomConfig(long_side_px=96), 1, tmp_path, 3, "train", True, force=False)
    assert (tmp_path / "boneage-training-dataset" / "3.png").stat().st_size == rec["image_bytes"]
