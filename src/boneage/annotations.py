"""Keypoint annotation import: plain CSV, VGG Image Annotator (VIA) exports, COCO hand keypoints.

Every reader returns one table with columns `id, middle_tip_x, middle_tip_y, thumb_tip_x,
thumb_tip_y, capitate_x, capitate_y, file, row` (coordinates float, NaN = not marked; `file`
and `row` say where the values came from so a bad value can be reported precisely).

Formats:

- plain CSV (`input/annotations/keypoints.csv`): the columns above, an empty cell is a point
  nobody marked.
- VIA project JSON (VIA 2: `_via_img_metadata`; also VIA's "export annotations as JSON", which is
  that mapping alone): point regions `{"name": "point", "cx", "cy"}`, the point's name in any
  region attribute (or the attribute `cfg.keypoints.via_attribute`). Names are mapped to ours by
  `cfg.keypoints.point_names` (our name -> name in the file).
- VIA CSV export: `filename, file_size, file_attributes, region_count, region_id,
  region_shape_attributes, region_attributes` with JSON in the last two cells.
- COCO keypoint JSON in the 21-point hand layout (wrist, thumb1..4, index1..4, middle1..4,
  ring1..4, little1..4; 4 is the tip): thumb tip = point 4, middle tip = point 12; the capitate is
  not in that layout and stays missing. Visibility 0 means not marked.

Partial annotations stay partial: a missing point is never invented here (stage 3 masks it out
of the loss). Coordinates are checked against the image size when sizes are given; every bad row
is collected and reported together in one `InputError` naming the file and row.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.errors import InputError

log = logging.getLogger(__name__)

POINTS = ("middle_tip", "thumb_tip", "capitate")
COORD_COLUMNS = [f"{p}_{a}" for p in POINTS for a in ("x", "y")]
COLUMNS = ["id", *COORD_COLUMNS, "file", "row"]
DEFAULT_NAMES = {p: p for p in POINTS}

# 21-point hand layout (COCO-WholeBody hand, OpenPose): index of each of our points, None = absent.
COCO_HAND21_INDEX = {"middle_tip": 12, "thumb_tip": 4, "capitate": None}
# Names that a category's `keypoints` list may use for those indices (lower case).
COCO_NAME_ALIASES = {
    "middle_tip": ("middle_finger4", "middle_tip", "middle4", "middle_finger_tip", "middle_finger_4"),
    "thumb_tip": ("thumb4", "thumb_tip", "thumb_4"),
    "capitate": ("capitate",),
}


def _id_from_filename(name: str) -> str:
    return Path(str(name).replace("\\", "/")).stem


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=COLUMNS)


def _num(value) -> float:
    """A coordinate cell -> float; empty/None -> NaN; anything else not a number -> ValueError."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        s = value.strip()
        if s == "" or s.lower() in ("nan", "na", "none", "null"):
            return math.nan
        return float(s)
    return float(value)


def read_plain_csv(path: Path) -> pd.DataFrame:
    """The plain CSV of method.md. Bad numbers are reported with file and row (header = row 1)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    cols = {c.strip().lower(): c for c in df.columns}
    missing = [c for c in ["id", *COORD_COLUMNS] if c not in cols]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected id,{','.join(COORD_COLUMNS)}")
    rows, problems = [], []
    for i, rec in enumerate(df.to_dict("records")):
        line = i + 2  # header is line 1
        rid = str(rec[cols["id"]]).strip()
        if not rid:
            problems.append(f"{path} row {line}: empty id")
            continue
        out = {"id": rid, "file": str(path), "row": line}
        for c in COORD_COLUMNS:
            try:
                out[c] = _num(rec[cols[c]])
            except ValueError:
                problems.append(f"{path} row {line} (id {rid}): {c}={rec[cols[c]]!r} is not a number")
                out[c] = math.nan
        rows.append(out)
    if problems:
        raise InputError("bad keypoint annotation rows:\n  " + "\n  ".join(problems[:50]))
    return pd.DataFrame(rows, columns=COLUMNS) if rows else _empty()


def _name_lookup(point_names: dict[str, str] | None) -> dict[str, str]:
    """Name in the file (lower case) -> our point name."""
    names = dict(DEFAULT_NAMES)
    names.update(point_names or {})
    return {str(v).strip().lower(): k for k, v in names.items() if k in POINTS}


def _region_point_name(attrs: dict, lookup: dict[str, str], attribute: str) -> str | None:
    if not isinstance(attrs, dict):
        return None
    values = [attrs.get(attribute)] if attribute else list(attrs.values())
    for v in values:
        if isinstance(v, dict):  # checkbox attributes: {"middle_tip": true}
            keys = [k for k, on in v.items() if on]
            v = keys[0] if len(keys) == 1 else None
        if v is not None and str(v).strip().lower() in lookup:
            return lookup[str(v).strip().lower()]
    return None


def _via_records(entries, path: Path, lookup: dict[str, str], attribute: str) -> pd.DataFrame:
    """entries: iterable of (row label, filename, shape_attributes, region_attributes)."""
    by_id: dict[str, dict] = {}
    problems = []
    for where, filename, shape, attrs in entries:
        if not filename:
            problems.append(f"{path} {where}: no filename")
            continue
        rid = _id_from_filename(filename)
        rec = by_id.setdefault(rid, {"id": rid, "file": str(path), "row": where,
                                     **{c: math.nan for c in COORD_COLUMNS}})
        if not shape:
            continue  # an image without regions: nothing marked
        if not isinstance(shape, dict) or str(shape.get("name", "")).lower() != "point":
            continue  # boxes, polygons: not keypoints
        name = _region_point_name(attrs, lookup, attribute)
        if name is None:
            continue
        try:
            x, y = _num(shape.get("cx")), _num(shape.get("cy"))
        except (TypeError, ValueError):
            problems.append(f"{path} {where} ({filename}): point {name} has bad coordinates {shape!r}")
            continue
        if not (math.isnan(rec[f"{name}_x"])) and (rec[f"{name}_x"], rec[f"{name}_y"]) != (x, y):
            problems.append(f"{path} {where} ({filename}): point {name} marked twice")
            continue
        rec[f"{name}_x"], rec[f"{name}_y"] = x, y
        rec["row"] = where if isinstance(rec["row"], str) and rec["row"].startswith("region") else rec["row"]
    if problems:
        raise InputError("bad VIA annotation rows:\n  " + "\n  ".join(problems[:50]))
    return pd.DataFrame(list(by_id.values()), columns=COLUMNS) if by_id else _empty()


def read_via_json(path: Path, point_names: dict[str, str] | None = None, attribute: str = "") -> pd.DataFrame:
    """VIA 2 project JSON (`_via_img_metadata`) or VIA's JSON export (the metadata mapping itself)."""
    path = Path(path)
    data = _load_json(path)
    meta = data.get("_via_img_metadata", data) if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: not a VIA project or export (no image metadata mapping)")
    lookup = _name_lookup(point_names)
    entries = []
    for key, img in meta.items():
        if not isinstance(img, dict):
            raise InputError(f"{path}: entry '{key}' is not an image record")
        regions = img.get("regions", [])
        if isinstance(regions, dict):  # VIA 1 stored regions as {"0": {...}}
            regions = list(regions.values())
        fname = img.get("filename", "")
        if not regions:
            entries.append((f"entry '{key}'", fname, None, None))
        for j, reg in enumerate(regions):
            entries.append((f"entry '{key}' region {j}", fname, reg.get("shape_attributes"),
                            reg.get("region_attributes")))
    return _via_records(entries, path, lookup, attribute)


def read_via_csv(path: Path, point_names: dict[str, str] | None = None, attribute: str = "") -> pd.DataFrame:
    """VIA's CSV export: one row per region, JSON in `region_shape_attributes`/`region_attributes`."""
    path = Path(path)
    lookup = _name_lookup(point_names)
    entries, problems = [], []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lstrip("#").strip() for f in (reader.fieldnames or [])]
        reader.fieldnames = fields
        for need in ("filename", "region_shape_attributes", "region_attributes"):
            if need not in fields:
                raise InputError(f"{path}: not a VIA CSV export (no column '{need}')")
        for i, rec in enumerate(reader):
            line = i + 2
            try:
                shape = json.loads(rec["region_shape_attributes"] or "{}")
                attrs = json.loads(rec["region_attributes"] or "{}")
            except json.JSONDecodeError as exc:
                problems.append(f"{path} row {line}: region JSON does not parse ({exc.msg})")
                continue
            entries.append((line, rec["filename"], shape, attrs))
    if problems:
        raise InputError("bad VIA annotation rows:\n  " + "\n  ".join(problems[:50]))
    return _via_records(entries, path, lookup, attribute)


def read_coco_keypoints(path: Path) -> pd.DataFrame:
    """COCO keypoint JSON, 21-point hand layout. Tips mapped by name when the category names its
    keypoints, else by index (thumb tip 4, middle tip 12). Capitate absent."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise InputError(f"{path}: not a COCO JSON (needs 'images' and 'annotations')")
    index = dict(COCO_HAND21_INDEX)
    n_points = 21
    for cat in data.get("categories", []) or []:
        names = [str(n).strip().lower() for n in (cat.get("keypoints") or [])]
        if names:
            n_points = len(names)
            for p, aliases in COCO_NAME_ALIASES.items():
                hit = [names.index(a) for a in aliases if a in names]
                index[p] = hit[0] if hit else (index[p] if len(names) == 21 else None)
            break
    images = {}
    for img in data["images"]:
        images[img.get("id")] = img
    rows, problems = [], []
    by_id: dict[str, dict] = {}
    for j, ann in enumerate(data["annotations"]):
        where = f"annotation {j} (id {ann.get('id', '?')})"
        img = images.get(ann.get("image_id"))
        if img is None:
            problems.append(f"{path} {where}: image_id {ann.get('image_id')!r} not in 'images'")
            continue
        kp = ann.get("keypoints") or []
        if len(kp) != 3 * n_points:
            problems.append(f"{path} {where}: {len(kp)} keypoint values, expected {3 * n_points}")
            continue
        rid = _id_from_filename(img.get("file_name", ""))
        rec = by_id.setdefault(rid, {"id": rid, "file": str(path), "row": where,
                                     **{c: math.nan for c in COORD_COLUMNS}})
        for p, k in index.items():
            if k is None:
                continue
            try:
                x, y, v = float(kp[3 * k]), float(kp[3 * k + 1]), float(kp[3 * k + 2])
            except (TypeError, ValueError):
                problems.append(f"{path} {where}: point {p} is not numeric")
                continue
            if v > 0:
                rec[f"{p}_x"], rec[f"{p}_y"] = x, y
        if "width" in img and "height" in img:
            rec["_w"], rec["_h"] = img["width"], img["height"]
    if problems:
        raise InputError("bad COCO annotation rows:\n  " + "\n  ".join(problems[:50]))
    rows = list(by_id.values())
    return pd.DataFrame(rows).reindex(columns=COLUMNS + ["_w", "_h"]) if rows else _empty()


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: JSON does not parse at line {exc.lineno} ({exc.msg})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def detect_format(path: Path) -> str | None:
    """'plain', 'via_csv', 'via_json', 'coco' or None (not a keypoint annotation file)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig") as fh:
            header = fh.readline().strip().lower()
        if "region_shape_attributes" in header:
            return "via_csv"
        if "middle_tip_x" in header:
            return "plain"
        return None
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return "coco"
        if isinstance(data, dict) and ("_via_img_metadata" in data or
                                       any(isinstance(v, dict) and "regions" in v for v in data.values())):
            return "via_json"
    return None


def read_annotation_file(path: Path, point_names: dict[str, str] | None = None, attribute: str = "") -> pd.DataFrame:
    fmt = detect_format(path)
    if fmt == "plain":
        return read_plain_csv(path)
    if fmt == "via_csv":
        return read_via_csv(path, point_names, attribute)
    if fmt == "via_json":
        return read_via_json(path, point_names, attribute)
    if fmt == "coco":
        return read_coco_keypoints(path)
    raise InputError(f"{path}: not a keypoint annotation file (plain CSV, VIA JSON/CSV or COCO JSON)")


def check_coordinates(df: pd.DataFrame, sizes: dict[str, tuple[int, int]] | None) -> list[str]:
    """Problems (file, row, id, what) for coordinates outside the image or negative. sizes: id -> (h, w)."""
    problems = []
    for rec in df.to_dict("records"):
        h = w = None
        if sizes and rec["id"] in sizes:
            h, w = sizes[rec["id"]]
        elif not pd.isna(rec.get("_w", math.nan)):
            h, w = rec["_h"], rec["_w"]
        for p in POINTS:
            x, y = rec[f"{p}_x"], rec[f"{p}_y"]
            if pd.isna(x) != pd.isna(y):
                problems.append(f"{rec['file']} row {rec['row']} (id {rec['id']}): {p} has only one coordinate")
                continue
            if pd.isna(x):
                continue
            if not (np.isfinite(x) and np.isfinite(y)) or x < 0 or y < 0 or \
                    (w is not None and (x > w or y > h)):
                size = f" {w}x{h}" if w is not None else ""
                problems.append(f"{rec['file']} row {rec['row']} (id {rec['id']}): {p} ({x}, {y}) "
                                f"outside the image{size}")
    return problems


def load_annotations(ann_dir: Path | None, sizes: dict[str, tuple[int, int]] | None = None,
                     point_names: dict[str, str] | None = None, attribute: str = "",
                     known_ids: set[str] | None = None) -> pd.DataFrame:
    """Every keypoint annotation file below `ann_dir` merged into one row per id.

    Files: `keypoints.csv` and any `*.csv`/`*.json` below `ann_dir` (masks/ skipped) whose format
    is recognised. Several files marking the same point of the same id must agree within 1 px.
    `sizes` (id -> (h, w)) checks coordinates; ids not in `known_ids` are ignored with a warning.
    Returns columns `id` + the six coordinates (NaN = not marked) + `n_points`.
    """
    out_cols = ["id", *COORD_COLUMNS, "n_points"]
    if ann_dir is None or not Path(ann_dir).is_dir():
        return pd.DataFrame(columns=out_cols)
    files = sorted(p for p in Path(ann_dir).rglob("*") if p.suffix.lower() in (".csv", ".json")
                   and "masks" not in p.relative_to(ann_dir).parts)
    tables = []
    for f in files:
        fmt = detect_format(f)
        if fmt is None:
            log.debug("annotations: %s is not a keypoint file, skipped", f)
            continue
        t = read_annotation_file(f, point_names, attribute)
        log.info("annotations: %s (%s): %d radiographs", f, fmt, len(t))
        tables.append(t)
    if not tables:
        return pd.DataFrame(columns=out_cols)
    allrows = pd.concat(tables, ignore_index=True)
    problems = check_coordinates(allrows, sizes)
    merged: dict[str, dict] = {}
    for rec in allrows.to_dict("records"):
        m = merged.setdefault(rec["id"], {"id": rec["id"], **{c: math.nan for c in COORD_COLUMNS}})
        for p in POINTS:
            x, y = rec[f"{p}_x"], rec[f"{p}_y"]
            if pd.isna(x) or pd.isna(y) or any(f"row {rec['row']} (id {rec['id']}): {p} " in q for q in problems):
                continue
            if not pd.isna(m[f"{p}_x"]) and math.hypot(m[f"{p}_x"] - x, m[f"{p}_y"] - y) > 1.0:
                problems.append(f"{rec['file']} row {rec['row']} (id {rec['id']}): {p} disagrees with "
                                f"another file ({m[f'{p}_x']}, {m[f'{p}_y']}) vs ({x}, {y})")
                continue
            m[f"{p}_x"], m[f"{p}_y"] = float(x), float(y)
    if problems:
        raise InputError(f"{len(problems)} bad keypoint annotation(s):\n  " + "\n  ".join(problems[:50]))
    df = pd.DataFrame(list(merged.values()), columns=["id", *COORD_COLUMNS])
    if known_ids is not None:
        unknown = sorted(set(df["id"]) - set(known_ids))
        if unknown:
            log.warning("annotations: %d id(s) not in the data set ignored (e.g. %s)", len(unknown), unknown[:5])
        df = df[df["id"].isin(known_ids)]
    df["n_points"] = df[[f"{p}_x" for p in POINTS]].notna().sum(axis=1)
    return df.reset_index(drop=True)


def annotation_arrays(row) -> tuple[np.ndarray, np.ndarray]:
    """One merged row -> (3, 2) points (NaN where missing) and (3,) visibility."""
    pts = np.array([[row[f"{p}_x"], row[f"{p}_y"]] for p in POINTS], dtype=np.float64)
    vis = np.isfinite(pts).all(axis=1)
    return pts, vis
