"""The input contract on real bad files: each problem gives a clear error naming the file or row."""

import cv2
import numpy as np
import pandas as pd
import pytest

from boneage.config import load_config
from boneage.errors import InputError
from boneage.fileio import read_gray
from boneage.inputs import load_dataset, parse_sex


def _hand(h=120, w=96, value=180):
    img = np.zeros((h, w), np.uint8)
    cv2.rectangle(img, (20, 30), (75, 110), value, -1)
    return img


def _kaggle(root, n_train=6, n_test=3, nested=False):
    tr = root / "boneage-training-dataset"
    te = root / "boneage-test-dataset"
    if nested:
        tr, te = tr / "boneage-training-dataset", te / "boneage-test-dataset"
    tr.mkdir(parents=True)
    te.mkdir(parents=True)
    rows = []
    for i in range(n_train):
        cv2.imwrite(str(tr / f"{1000 + i}.png"), _hand())
        rows.append({"id": 1000 + i, "boneage": 12 * (i % 19 + 1), "male": i % 2 == 0})
    pd.DataFrame(rows).to_csv(root / "boneage-training-dataset.csv", index=False)
    trows = []
    for i in range(n_test):
        cv2.imwrite(str(te / f"{5000 + i}.png"), _hand())
        trows.append({"Case ID": 5000 + i, "Sex": "M" if i % 2 else "F"})
    pd.DataFrame(trows).to_csv(root / "boneage-test-dataset.csv", index=False)
    return tr, te


def _cfg(root, *extra):
    return load_config(None, [f"input_dir={root}", f"work_dir={root.parent / 'work'}", *extra])


@pytest.mark.parametrize("nested", [False, True])
def test_kaggle_layout(tmp_path, nested):
    root = tmp_path / "input"
    _kaggle(root, nested=nested)
    ds = load_dataset(_cfg(root))
    assert list(ds.train.columns) == ["id", "male", "boneage", "path"]
    assert ds.train["id"].tolist() == [str(1000 + i) for i in range(6)]
    assert ds.train["male"].tolist() == [True, False] * 3
    assert ds.train["boneage"].tolist() == [12.0 * (i + 1) for i in range(6)]
    assert ds.test["id"].tolist() == ["5000", "5001", "5002"]
    assert ds.test["male"].tolist() == [False, True, False]
    assert all(p.exists() for p in ds.all["path"])


def test_rsna_challenge_layout(tmp_path):
    root = tmp_path / "input"
    (root / "boneage-training-dataset").mkdir(parents=True)
    (root / "Bone Age Validation Set" / "boneage-validation-dataset-1").mkdir(parents=True)
    (root / "Bone Age Test Set" / "images").mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(root / "boneage-training-dataset" / f"{i + 1}.png"), _hand())
    pd.DataFrame({"id": [1, 2, 3, 4], "boneage": [10, 20, 30, 40], "male": ["True", "False"] * 2}).to_csv(
        root / "train.csv", index=False)
    for i in range(2):
        cv2.imwrite(str(root / "Bone Age Validation Set" / "boneage-validation-dataset-1" / f"{100 + i}.png"), _hand())
    pd.DataFrame({"Image ID": [100, 101], "male": [True, False], "Bone Age (months)": [50, 60]}).to_csv(
        root / "Bone Age Validation Set" / "Validation Dataset.csv", index=False)
    for i in range(2):
        cv2.imwrite(str(root / "Bone Age Test Set" / "images" / f"{4360 + i}.png"), _hand())
    pd.DataFrame({"Case ID": [4360, 4361], "Sex": ["M", "F"]}).to_csv(
        root / "Bone Age Test Set" / "test.csv", index=False)
    ds = load_dataset(_cfg(root))
    assert sorted(ds.train["id"]) == ["1", "100", "101", "2", "3", "4"]
    assert ds.train.set_index("id").loc["101", "boneage"] == 60
    assert ds.test["id"].tolist() == ["4360", "4361"]


def test_plain_folder_with_id_male_csvs(tmp_path):
    root = tmp_path / "input"
    (root / "images").mkdir(parents=True)
    for i in ("a1", "a2", "a3", "t1"):
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), _hand())
    pd.DataFrame({"id": ["a1", "a2", "a3"], "male": [1, 0, 1], "boneage": [100, 110, 120]}).to_csv(
        root / "labels.csv", index=False)
    pd.DataFrame({"id": ["t1"], "male": [0]}).to_csv(root / "to_read.csv", index=False)
    ds = load_dataset(_cfg(root))
    assert ds.train["male"].tolist() == [True, False, True]
    assert ds.test["id"].tolist() == ["t1"]


@pytest.mark.parametrize("value,expected", [("True", True), ("false", False), ("M", True), ("F", False),
                                            ("1", True), ("0", False), ("x", None), ("", None)])
def test_parse_sex(value, expected):
    assert parse_sex(value) is expected


def test_image_kinds_decode(tmp_path):
    # 16-bit PNG is scaled to 8 bits by percentiles, not truncated
    img16 = (np.linspace(0, 4095, 64 * 48).reshape(64, 48)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a16.png"), img16)
    g = read_gray(tmp_path / "a16.png")
    assert g.dtype == np.uint8 and g.max() == 255 and g.min() == 0
    # RGB JPEG becomes grey
    rgb = np.dstack([_hand()] * 3)
    cv2.imwrite(str(tmp_path / "rgb.jpg"), rgb)
    g = read_gray(tmp_path / "rgb.jpg")
    assert g.ndim == 2 and abs(int(g[60, 50]) - 180) < 6


def _write_dicom(path, pixels, photometric="MONOCHROME2", body_part="HAND", sex="F"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientSex = sex
    ds.BodyPartExamined = body_part
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_monochrome1_is_inverted(tmp_path):
    px = np.full((80, 64), 3500, np.uint16)  # MONOCHROME1: high values are dark (background)
    px[20:60, 16:48] = 500  # the "hand" is low, i.e. bright once inverted
    _write_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1")
    g = read_gray(tmp_path / "m1.dcm")
    assert g[40, 32] > 200 and g[5, 5] < 50
    _write_dicom(tmp_path / "m2.dcm", px, "MONOCHROME2")
    g2 = read_gray(tmp_path / "m2.dcm")
    assert g2[40, 32] < 50 and g2[5, 5] > 200


def test_dicom_inside_a_dataset(tmp_path):
    root = tmp_path / "input"
    tr, te = _kaggle(root)
    (tr / "1000.png").unlink()
    px = np.zeros((120, 96), np.uint16)
    px[30:110, 20:75] = 3000
    _write_dicom(tr / "1000.dcm", px)
    ds = load_dataset(_cfg(root))
    assert ds.train.set_index("id").loc["1000", "path"].suffix == ".dcm"


def test_bad_training_rows_are_dropped_with_a_record(tmp_path):
    root = tmp_path / "input"
    tr, _ = _kaggle(root, n_train=40)
    (tr / "1001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt PNG
    (tr / "1002.png").unlink()  # missing image
    df = pd.read_csv(root / "boneage-training-dataset.csv", dtype=str)
    df.loc[3, "boneage"] = "300"  # impossible age
    df.loc[4, "male"] = "maybe"  # unknown sex
    df.to_csv(root / "boneage-training-dataset.csv", index=False)
    cfg = _cfg(root, "input.max_rejected_fraction=0.2")
    ds = load_dataset(cfg)
    assert sorted(ds.rejected["id"]) == ["1001", "1002", "1003", "1004"]
    assert len(ds.train) == 36
    rej = pd.read_csv(cfg.work_path / "rejected.csv", dtype=str)
    text = " ".join(rej["problem"])
    assert "cannot decode" in text and "no image named 1002" in text
    assert "outside 0..240" in text and "'maybe'" in text


def test_bad_training_rows_are_an_error_when_not_dropping(tmp_path):
    root = tmp_path / "input"
    tr, _ = _kaggle(root)
    (tr / "1001.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"1001.png: cannot decode"):
        load_dataset(_cfg(root, "input.drop_bad_train_rows=false"))


def test_too_many_bad_rows_stop_the_run(tmp_path):
    root = tmp_path / "input"
    tr, _ = _kaggle(root, n_train=6)
    (tr / "1001.png").unlink()
    with pytest.raises(InputError, match="above input.max_rejected_fraction"):
        load_dataset(_cfg(root))


def test_bad_test_row_is_always_an_error(tmp_path):
    root = tmp_path / "input"
    _, te = _kaggle(root)
    (te / "5001.png").unlink()
    with pytest.raises(InputError, match=r"boneage-test-dataset.csv row 3: no image named 5001"):
        load_dataset(_cfg(root))


def test_duplicate_and_unsafe_ids(tmp_path):
    root = tmp_path / "input"
    _kaggle(root, n_train=40)
    df = pd.read_csv(root / "boneage-training-dataset.csv", dtype=str)
    df.loc[1, "id"] = "1000"
    df.loc[2, "id"] = "../x"
    df.to_csv(root / "boneage-training-dataset.csv", index=False)
    with pytest.raises(InputError) as err:
        load_dataset(_cfg(root, "input.drop_bad_train_rows=false"))
    msg = str(err.value)
    assert "id '1000' appears more than once" in msg
    assert "id '../x' is not safe as a file name" in msg
    assert "row 4" in msg  # the CSV line of '../x'


def test_missing_input_folder_and_csvs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(_cfg(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no training CSV"):
        load_dataset(_cfg(tmp_path / "empty"))


def test_decode_results_are_cached(tmp_path):
    root = tmp_path / "input"
    _kaggle(root)
    cfg = _cfg(root)
    load_dataset(cfg)
    cache = pd.read_csv(cfg.work_path / "inputs_checked.csv")
    assert len(cache) == 9
    # a file changed after the check is checked again
    (root / "boneage-training-dataset" / "1003.png").write_bytes(b"garbage")
    with pytest.raises(InputError):
        load_dataset(_cfg(root, "input.drop_bad_train_rows=false"))
