"""Atomic writes and image decoding shared by every stage.

Every output is written to a temporary file in the same folder and renamed into place, so an
interrupted stage never leaves a half-written file that a rerun would take as finished.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from boneage.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def encode_png(image: np.ndarray, path: Path | str = "image") -> bytes:
    """An 8-bit (or 16-bit) image as PNG bytes."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    return buf.tobytes()


def atomic_write_png(path: Path, image: np.ndarray) -> None:
    """Write an 8-bit (or 16-bit) PNG atomically."""
    atomic_write_bytes(path, encode_png(image, path))


def to_uint8(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Scale a 16-bit or float image to 8 bits by percentiles (robust to a few hot pixels)."""
    if image.dtype == np.uint8:
        return image
    img = image.astype(np.float32)
    lo, hi = np.percentile(img, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def read_dicom(path: Path) -> tuple[np.ndarray, dict]:
    """Decode a DICOM radiograph to 8-bit grey: rescale/VOI applied, MONOCHROME1 inverted.

    Returns the image and a dict of the tags a bone age reader uses (sex, laterality, body part).
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for a broken file
        raise InputError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = cv2.cvtColor(arr.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    elif arr.ndim != 2:
        raise InputError(f"{path}: DICOM pixel data has shape {arr.shape}; expected one 2-D image")
    img = apply_modality_lut(arr, ds)
    try:
        img = apply_voi_lut(img, ds)
    except Exception:  # a malformed VOI LUT: keep the modality values
        pass
    img = to_uint8(np.asarray(img, dtype=np.float32))
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        img = 255 - img
    tags = {
        "sex": str(getattr(ds, "PatientSex", "") or ""),
        "laterality": str(getattr(ds, "ImageLaterality", "") or getattr(ds, "Laterality", "") or ""),
        "body_part": str(getattr(ds, "BodyPartExamined", "") or ""),
        "photometric": str(getattr(ds, "PhotometricInterpretation", "") or ""),
    }
    return img, tags


def read_gray(path: str | Path) -> np.ndarray:
    """Read any supported radiograph as a 2-D uint8 array, or raise InputError naming the file.

    8- and 16-bit PNG (16-bit scaled by percentiles), JPEG, RGB turned to grey, DICOM.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found")
    if path.suffix.lower() in (".dcm", ".dicom") or _looks_like_dicom(path):
        return read_dicom(path)[0]
    raw = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise InputError(f"{path}: cannot decode the image (corrupt or not an image file)")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.ndim != 2 or min(img.shape) < 16:
        raise InputError(f"{path}: image has shape {img.shape}; expected a 2-D radiograph of 16 px or more")
    return to_uint8(img)


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def read_mask(path: str | Path) -> np.ndarray:
    """Read a 0/255 mask PNG as bool."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise InputError(f"{path}: cannot decode the mask")
    return img > 127
