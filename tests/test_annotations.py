"""Keypoint annotation import: plain CSV, VIA project JSON and CSV export, COCO 21-point hands."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from boneage.annotations import (
    annotation_arrays,
    detect_format,
    load_annotations,
    read_coco_keypoints,
    read_plain_csv,
    read_via_csv,
    read_via_json,
)
from boneage.errors import InputError

FIX = Path(__file__).resolve().parent / "fixtures" / "annotations"
VIA_NAMES = {"middle_tip": "MT", "thumb_tip": "TT", "capitate": "CAP"}


def _row(df, rid):
    return df[df["id"] == rid].iloc[0]


def test_plain_csv_partial_rows_stay_partial():
    df = read_plain_csv(FIX / "keypoints.csv")
    assert list(df["id"]) == ["1377", "1394", "1402"]
    r = _row(df, "1377")
    assert (r["middle_tip_x"], r["middle_tip_y"], r["capitate_y"]) == (352.5, 40.25, 700.0)
    r = _row(df, "1394")
    assert math.isnan(r["thumb_tip_x"]) and math.isnan(r["thumb_tip_y"])  # not marked: never invented
    assert r["capitate_x"] == 310.0
    pts, vis = annotation_arrays(r)
    assert vis.tolist() == [True, False, True]
    assert pts.shape == (3, 2)


def test_plain_csv_bad_rows_name_file_and_row():
    with pytest.raises(InputError) as exc:
        read_plain_csv(FIX / "keypoints_bad.csv")
    msg = str(exc.value)
    assert "keypoints_bad.csv row 3" in msg and "middle_tip_y='sixty'" in msg


def test_coordinates_outside_the_image_reported_together(tmp_path):
    shutil.copy(FIX / "keypoints.csv", tmp_path / "keypoints.csv")
    (tmp_path / "more.csv").write_text("id,middle_tip_x,middle_tip_y,thumb_tip_x,thumb_tip_y,capitate_x,capitate_y\n"
                                       "1402,5000,40,,,,\n1394,-3,10,,,,\n")
    sizes = {"1377": (1022, 757), "1394": (1022, 757), "1402": (1022, 757)}
    with pytest.raises(InputError) as exc:
        load_annotations(tmp_path, sizes)
    msg = str(exc.value)
    assert "more.csv row 2 (id 1402): middle_tip (5000.0, 40.0) outside the image 757x1022" in msg, msg
    assert "more.csv row 3 (id 1394)" in msg


def test_via_project_json_with_configured_names():
    df = read_via_json(FIX / "via_project.json", VIA_NAMES)
    r = _row(df, "1377")
    assert (r["middle_tip_x"], r["middle_tip_y"]) == (352.0, 40.0)
    assert (r["thumb_tip_x"], r["thumb_tip_y"]) == (640.0, 420.0)
    assert (r["capitate_x"], r["capitate_y"]) == (360.0, 700.0)
    r = _row(df, "1394")  # filename with a folder; only the middle tip marked
    assert r["middle_tip_x"] == 300.0 and math.isnan(r["thumb_tip_x"]) and math.isnan(r["capitate_x"])
    assert np.isnan(_row(df, "1402")[["middle_tip_x", "thumb_tip_x", "capitate_x"]].astype(float)).all()
    # without the name mapping nothing matches our names: all points missing, nothing invented
    df0 = read_via_json(FIX / "via_project.json")
    assert df0[["middle_tip_x", "thumb_tip_x", "capitate_x"]].isna().all().all()


def test_via_csv_export_matches_the_project():
    a = read_via_csv(FIX / "via_export.csv", VIA_NAMES).set_index("id")
    b = read_via_json(FIX / "via_project.json", VIA_NAMES).set_index("id")
    cols = ["middle_tip_x", "middle_tip_y", "thumb_tip_x", "thumb_tip_y", "capitate_x", "capitate_y"]
    assert sorted(a.index) == sorted(b.index) == ["1377", "1394", "1402"]
    np.testing.assert_array_equal(a.loc[sorted(a.index), cols].to_numpy(float),
                                  b.loc[sorted(b.index), cols].to_numpy(float))


def test_via_attribute_restricts_the_lookup():
    df = read_via_json(FIX / "via_project.json", VIA_NAMES, attribute="other")
    assert df[["middle_tip_x"]].isna().all().all()


def test_coco_hand21_maps_tips_and_leaves_capitate_missing():
    for name in ("coco_hand21.json", "coco_hand21_unnamed.json"):
        df = read_coco_keypoints(FIX / name)
        r = _row(df, "1377")
        assert (r["middle_tip_x"], r["middle_tip_y"]) == (352.0, 40.0), name
        assert (r["thumb_tip_x"], r["thumb_tip_y"]) == (640.0, 420.0), name
        assert math.isnan(r["capitate_x"]), name
        r = _row(df, "1394")  # thumb visibility 0: not marked
        assert r["middle_tip_x"] == 300.0 and math.isnan(r["thumb_tip_x"]), name


def test_detect_format():
    assert detect_format(FIX / "keypoints.csv") == "plain"
    assert detect_format(FIX / "via_export.csv") == "via_csv"
    assert detect_format(FIX / "via_project.json") == "via_json"
    assert detect_format(FIX / "coco_hand21.json") == "coco"


def test_load_annotations_merges_files_and_counts_points(tmp_path):
    for name in ("keypoints.csv", "coco_hand21.json"):
        shutil.copy(FIX / name, tmp_path / name)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "ignored.csv").write_text("not,a,keypoint,file\n")
    df = load_annotations(tmp_path, {"1377": (1022, 757), "1394": (1022, 757), "1402": (1022, 757)},
                          known_ids={"1377", "1394", "1402"})
    r = _row(df, "1377")
    assert r["n_points"] == 3  # the CSV's 352.5 and COCO's 352.0 agree within 1 px
    r = _row(df, "1394")
    assert r["n_points"] == 2 and math.isnan(r["thumb_tip_x"])
    assert _row(df, "1402")["n_points"] == 0


def test_load_annotations_conflict_is_an_error(tmp_path):
    shutil.copy(FIX / "keypoints.csv", tmp_path / "keypoints.csv")
    (tmp_path / "second.csv").write_text("id,middle_tip_x,middle_tip_y,thumb_tip_x,thumb_tip_y,capitate_x,capitate_y\n"
                                         "1377,400,40,,,,\n")
    with pytest.raises(InputError, match=r"second.csv row 2 \(id 1377\): middle_tip disagrees"):
        load_annotations(tmp_path)


def test_no_annotations_dir_gives_an_empty_table(tmp_path):
    assert len(load_annotations(tmp_path / "absent")) == 0
    assert len(load_annotations(None)) == 0
