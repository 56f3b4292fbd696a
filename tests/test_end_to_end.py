"""The whole chain in the smoke profile, into a temporary folder, and resuming after a kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _paths(tmp: Path) -> list[str]:
    return [f"input_dir={tmp / 'input'}", f"work_dir={tmp / 'work'}", f"folds_dir={tmp / 'folds'}",
            f"oof_dir={tmp / 'oof'}", f"submissions_dir={tmp / 'submissions'}"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _run(cmd: list[str], timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=PY)
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    sets = _sets(_paths(tmp))
    _run([PY, "src/00_make_demo_data.py", "--config", "configs/smoke.yaml", *sets])
    t0 = time.perf_counter()
    res = _run(["bash", "run_all.sh", "--config", "configs/smoke.yaml", *sets])
    return tmp, res, time.perf_counter() - t0


def test_submission_matches_the_test_csv_row_for_row(smoke_run):
    tmp, _, _ = smoke_run
    test = pd.read_csv(tmp / "input" / "boneage-test-dataset.csv")
    sub = pd.read_csv(tmp / "submissions" / "submission.csv")
    assert list(sub.columns) == ["Case ID", "Sex", "boneage"]
    assert sub["Case ID"].tolist() == test["Case ID"].tolist()
    assert sub["Sex"].tolist() == test["Sex"].tolist()
    assert np.isfinite(sub["boneage"]).all()
    assert sub["boneage"].between(0, 240).all()


def test_every_stage_left_its_outputs(smoke_run):
    tmp, _, _ = smoke_run
    work = tmp / "work"
    ids = pd.concat([pd.read_csv(tmp / "input" / "boneage-training-dataset.csv")["id"],
                     pd.read_csv(tmp / "input" / "boneage-test-dataset.csv")["Case ID"]]).astype(str)
    for sub in ("masks", "clean", "registered", "crops/A", "crops/B", "crops/C", "crops/raw", "crops/clean"):
        missing = [i for i in ids if not (work / sub / f"{i}.png").exists()]
        assert not missing, f"{sub}: missing {missing[:5]}"
    for csv in ("masks.csv", "clean.csv", "keypoints.csv", "registration.csv"):
        df = pd.read_csv(work / csv, dtype={"id": str})
        assert set(df["id"]) == set(ids), csv
    assert (tmp / "folds" / "folds.csv").exists()
    assert list((tmp / "oof").glob("*.test.csv"))
    assert (tmp / "submissions" / "report.md").exists()
    blend = (tmp / "submissions" / "blend.json").read_text()
    assert (tmp / "oof" / "reg_raw_sex_input_vgg.csv").exists()  # the ablation's raw-radiograph model ...
    assert "reg_A_sex_input_vgg" in blend and "_raw_" not in blend  # ... trained, but not blended
    assert len(list((work / "qc").glob("*.png"))) >= 4
    times = (work / "logs" / "times.json").read_text()
    for stage in ("01_segment", "02_clean", "03_keypoints", "04_register", "05_folds", "06_train", "07_blend"):
        assert stage in times


def test_rerun_resumes_without_redoing_work(smoke_run):
    tmp, _, first_seconds = smoke_run
    sets = _sets(_paths(tmp))
    work = tmp / "work"
    watched = sorted((work / "masks").glob("*.png"))[:5] + sorted((work / "crops" / "A").glob("*.png"))[:5]
    before = {p: p.stat().st_mtime_ns for p in watched}
    t0 = time.perf_counter()
    _run(["bash", "run_all.sh", "--config", "configs/smoke.yaml", *sets])
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert time.perf_counter() - t0 < first_seconds


def test_stage_killed_midway_resumes_where_it_stopped(tmp_path):
    sets = _sets(_paths(tmp_path) + ["demo.n_train=150", "demo.n_test=10", "demo.workers=1"])
    cmd = [PY, "src/00_make_demo_data.py", "--config", "configs/smoke.yaml", *sets]
    out = tmp_path / "input" / "boneage-training-dataset"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 20 <= len(done) < 160, "the stage should have been killed midway"
    _run(cmd)
    assert len(list(out.glob("*.png"))) == 150
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()), "finished images were redone"
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
