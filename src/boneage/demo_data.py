"""Stage 0: write a phantom data set in the Kaggle RSNA layout (plus annotations and ground truth).

Layout under the output folder (`cfg.demo.out_dir`, or `cfg.input_path` when empty):

    boneage-training-dataset.csv          id,boneage,male        (male True/False)
    boneage-training-dataset/{id}.png
    boneage-test-dataset.csv              Case ID,Sex            (Sex M/F)
    boneage-test-dataset/{id}.png
    annotations/masks/{id}.png            0/255, for the annotated share of the training images
    annotations/keypoints.csv             id,middle_tip_x,...,capitate_y (empty cell: not visible)
    annotations/via_keypoints.json        the same points as a VGG Image Annotator 2 project
    ground_truth/test_labels.csv          id,boneage,male
    ground_truth/test_keypoints.csv       id,middle_tip_x,...,capitate_y
    ground_truth/masks/{id}.png           test masks
    ground_truth/params.jsonl             every drawn parameter, one line per image (train and test)
    ground_truth/params/{id}.json         the same per image (what a resumed run reads back)

Ids are integers as text: training 1..n_train, test n_train+1..n_train+n_test. Image `id` is
rendered by `make_phantom(cfg.phantom, cfg.demo.seed, id)`, so the set is deterministic and every
image can be re-rendered alone. Items already written are skipped (resume) unless `force`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from boneage.config import REPO_ROOT, Config
from boneage.errors import ConfigError
from boneage.fileio import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_png,
    atomic_write_text,
    encode_png,
)
from boneage.phantom import KEYPOINT_NAMES, PhantomConfig, make_phantom

log = logging.getLogger(__name__)

TRAIN_CSV = "boneage-training-dataset.csv"
TEST_CSV = "boneage-test-dataset.csv"
TRAIN_DIR = "boneage-training-dataset"
TEST_DIR = "boneage-test-dataset"
KP_COLUMNS = ["id"] + [f"{n}_{c}" for n in KEYPOINT_NAMES for c in ("x", "y")]


def output_dir(cfg: Config) -> Path:
    if cfg.demo.out_dir:
        p = Path(cfg.demo.out_dir)
        return p if p.is_absolute() else REPO_ROOT / p
    return cfg.input_path


def dataset_complete(out: Path) -> bool:
    """True when the training CSV exists and every image it lists exists."""
    csv = out / TRAIN_CSV
    if not csv.exists():
        return False
    try:
        ids = pd.read_csv(csv, dtype={"id": str})["id"]
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return False
    return all((out / TRAIN_DIR / f"{i}.png").exists() for i in ids)


def _item_paths(out: Path, sid: int, split: str, annotated: bool) -> dict[str, Path]:
    paths = {"image": out / (TRAIN_DIR if split == "train" else TEST_DIR) / f"{sid}.png",
             "params": out / "ground_truth" / "params" / f"{sid}.json"}
    if split == "test":
        paths["mask"] = out / "ground_truth" / "masks" / f"{sid}.png"
    elif annotated:
        paths["mask"] = out / "annotations" / "masks" / f"{sid}.png"
    return paths


def _make_item(pcfg: PhantomConfig, seed: int, out: Path, sid: int, split: str, annotated: bool,
               force: bool, single_thread: bool = False) -> dict:
    """Render (or read back) one image; returns its record (id, split, label, keypoints, params)."""
    if single_thread:
        cv2.setNumThreads(1)  # one core per worker process
    paths = _item_paths(out, sid, split, annotated)
    if not force and all(p.exists() for p in paths.values()):
        try:
            return json.loads(paths["params"].read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a broken record: render again
    s = make_phantom(pcfg, seed, sid)
    # The radiograph is written last: once it exists, its mask and record do too, so a run killed
    # between files re-renders only items whose image is missing.
    png = encode_png(s.image, paths["image"])
    if "mask" in paths:
        atomic_write_png(paths["mask"], s.mask)
    rec = {"id": str(sid), "split": split, "annotated": annotated, "boneage": s.bone_age_months,
           "male": s.sex == "M", "sex": s.sex, "image_bytes": len(png), **s.params}
    atomic_write_json(paths["params"], rec)
    atomic_write_bytes(paths["image"], png)
    return rec


def _kp_row(rec: dict) -> dict:
    row = {"id": rec["id"]}
    for name, (x, y, v) in zip(KEYPOINT_NAMES, rec["keypoints"]):
        row[f"{name}_x"] = round(float(x), 2) if v > 0 else None
        row[f"{name}_y"] = round(float(y), 2) if v > 0 else None
    return row


def via_project(records: list[dict]) -> dict:
    """A VGG Image Annotator 2 project with one point region per visible keypoint."""
    meta = {}
    for rec in records:
        fname = f"{rec['id']}.png"
        regions = []
        for name, (x, y, v) in zip(KEYPOINT_NAMES, rec["keypoints"]):
            if v > 0:
                regions.append({"shape_attributes": {"name": "point", "cx": int(round(x)), "cy": int(round(y))},
                                "region_attributes": {"name": name}})
        key = f"{fname}{rec['image_bytes']}"
        meta[key] = {"filename": fname, "size": int(rec["image_bytes"]), "regions": regions, "file_attributes": {}}
    return {
        "_via_settings": {"ui": {"annotation_editor_height": 25, "annotation_editor_fontsize": 0.8,
                                 "leftsidebar_width": 18, "image_grid": {}, "image": {"region_label": "name"}},
                          "core": {"buffer_size": 18, "filepath": {}, "default_filepath": ""},
                          "project": {"name": "boneage_keypoints"}},
        "_via_img_metadata": meta,
        "_via_attributes": {"region": {"name": {"type": "dropdown", "description": "keypoint",
                                                "options": {n: "" for n in KEYPOINT_NAMES},
                                                "default_options": {}}},
                            "file": {}},
        "_via_data_format_version": "2.0.10",
        "_via_image_id_list": list(meta.keys()),
    }


def make_demo_dataset(cfg: Config, force: bool = False) -> Path:
    """Write the phantom data set; returns the output folder. Does nothing if a complete set exists."""
    d = cfg.demo
    if d.n_train < 1 or d.n_test < 0:
        raise ConfigError(f"demo.n_train must be >= 1 and demo.n_test >= 0 (got {d.n_train}, {d.n_test})")
    if not 0.0 <= d.annotated_fraction <= 1.0:
        raise ConfigError(f"demo.annotated_fraction must be in [0, 1], got {d.annotated_fraction}")
    out = output_dir(cfg)
    if not force and dataset_complete(out):
        msg = f"{out} already holds a data set ({TRAIN_CSV} and all its images); use --force to rewrite it"
        print(msg)
        log.info(msg)
        return out
    n_ann = int(round(d.annotated_fraction * d.n_train))
    ann_idx = np.random.default_rng([d.seed, 99]).choice(d.n_train, size=n_ann, replace=False)
    annotated = {int(i) + 1 for i in ann_idx}
    jobs = [(i, "train", i in annotated) for i in range(1, d.n_train + 1)]
    jobs += [(i, "test", False) for i in range(d.n_train + 1, d.n_train + d.n_test + 1)]
    log.info("rendering %d training + %d test phantoms into %s (%d annotated, %d workers)",
             d.n_train, d.n_test, out, n_ann, d.workers)
    if d.workers > 1:
        from joblib import Parallel, delayed

        gen = Parallel(n_jobs=d.workers, return_as="generator", batch_size=4)(
            delayed(_make_item)(cfg.phantom, d.seed, out, sid, split, ann, force, True) for sid, split, ann in jobs)
        records = list(tqdm(gen, total=len(jobs), desc="phantoms", unit="img"))
    else:
        records = [_make_item(cfg.phantom, d.seed, out, sid, split, ann, force)
                   for sid, split, ann in tqdm(jobs, desc="phantoms", unit="img")]
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    ann_recs = [r for r in train if r["annotated"]]
    # annotations (training only) and ground truth (test answers, all params)
    atomic_write_csv(out / "annotations" / "keypoints.csv", pd.DataFrame([_kp_row(r) for r in ann_recs],
                                                                           columns=KP_COLUMNS))
    atomic_write_json(out / "annotations" / "via_keypoints.json", via_project(ann_recs))
    atomic_write_csv(out / "ground_truth" / "test_labels.csv",
                     pd.DataFrame({"id": [r["id"] for r in test], "boneage": [r["boneage"] for r in test],
                                   "male": [bool(r["male"]) for r in test]}))
    atomic_write_csv(out / "ground_truth" / "test_keypoints.csv",
                     pd.DataFrame([_kp_row(r) for r in test], columns=KP_COLUMNS))
    atomic_write_text(out / "ground_truth" / "params.jsonl",
                      "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    # the Kaggle CSVs last: a training CSV means the images it lists are there
    atomic_write_csv(out / TEST_CSV, pd.DataFrame({"Case ID": [r["id"] for r in test],
                                                   "Sex": [r["sex"] for r in test]}))
    atomic_write_csv(out / TRAIN_CSV, pd.DataFrame({"id": [r["id"] for r in train],
                                                    "boneage": [r["boneage"] for r in train],
                                                    "male": [bool(r["male"]) for r in train]}))
    log.info("wrote %d training and %d test images to %s", len(train), len(test), out)
    return out
