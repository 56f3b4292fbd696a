"""The input contract: find the labels and images of a data set, check them once, hand out tables.

Layouts understood (detected from the CSV columns, not from file names, so renamed files work):

- Kaggle: `boneage-training-dataset.csv` (`id,boneage,male`) with the images in
  `boneage-training-dataset/` (flat, or doubly nested as the Kaggle zip unpacks), and
  `boneage-test-dataset.csv` (`Case ID,Sex`) with `boneage-test-dataset/`.
- RSNA challenge: `train.csv` (`id,boneage,male`), the validation CSV
  (`Image ID,male,Bone Age (months)`, used as further training rows) and a test folder with a CSV
  of `Case ID,Sex`.
- A plain folder of images with a CSV `id,male[,boneage]`: rows with ages are training rows,
  a CSV without ages lists test radiographs.

`input.train_csv` / `input.test_csv` name the files explicitly when detection is not wanted.
Images are found by id anywhere below the input folder (`{id}.png|jpg|jpeg|dcm|tif`), except
under `annotations/` and `ground_truth/`.

One validation pass runs before any heavy work: every listed image exists and decodes, ids are
unique and safe as file names, ages are numbers in 0..240, sex is known. Problems are reported
together, each naming the file or row. A bad training row is dropped with a warning written to
`work_dir/rejected.csv` (unless `input.drop_bad_train_rows` is false); a bad test row is always
an error, because the submission must have a row for every test radiograph. Decode results are
cached in `work_dir/inputs_checked.csv` (keyed by path, size and modification time) so later
stages do not decode everything again.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from boneage.errors import InputError
from boneage.fileio import IMAGE_SUFFIXES, atomic_write_csv, read_gray

log = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SKIP_DIRS = {"annotations", "ground_truth", "__MACOSX"}
ID_COLUMNS = ("id", "image id", "case id", "image_id", "case_id")
AGE_COLUMNS = ("boneage", "bone age (months)", "bone_age", "boneage_months", "bone age")
SEX_COLUMNS = ("male", "sex", "gender")
MAX_AGE_MONTHS = 240


@dataclass
class Dataset:
    """Validated labels and image paths. Ids are strings; `male` is bool; `boneage` months."""

    input_dir: Path
    train: pd.DataFrame  # id, male, boneage, path
    test: pd.DataFrame  # id, male, path
    rejected: pd.DataFrame  # id, split, file, problem

    @property
    def annotations_dir(self) -> Path:
        return self.input_dir / "annotations"

    @property
    def ground_truth_dir(self) -> Path:
        return self.input_dir / "ground_truth"

    @property
    def all(self) -> pd.DataFrame:
        train = self.train.assign(split="train")
        test = self.test.assign(split="test", boneage=float("nan"))
        return pd.concat([train, test], ignore_index=True)


def parse_sex(value) -> bool | None:
    """True for male, False for female, None when unknown. Accepts True/False, M/F, 1/0, male/female."""
    if isinstance(value, bool):
        return value
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().lower()
    if text in ("true", "m", "1", "male", "1.0", "t"):
        return True
    if text in ("false", "f", "0", "female", "0.0"):
        return False
    return None


def _find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {c.strip().lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for a broken CSV
        raise InputError(f"{path}: cannot read the CSV ({type(exc).__name__}: {exc})") from None


def classify_csv(path: Path) -> str | None:
    """'train' for a CSV with ids, sex and ages; 'test' for ids and sex only; None otherwise."""
    try:
        head = pd.read_csv(path, dtype=str, nrows=5, keep_default_na=False)
    except Exception:
        return None
    cols = list(head.columns)
    if _find_column(cols, ID_COLUMNS) is None or _find_column(cols, SEX_COLUMNS) is None:
        return None
    age_col = _find_column(cols, AGE_COLUMNS)
    if age_col is not None and (head[age_col].str.strip() != "").any():
        return "train"
    return "test"


def _candidate_csvs(input_dir: Path) -> list[Path]:
    out = []
    for depth_glob in ("*.csv", "*/*.csv", "*/*/*.csv"):
        for p in sorted(input_dir.glob(depth_glob)):
            if not SKIP_DIRS.intersection(p.relative_to(input_dir).parts):
                out.append(p)
    return out


def index_images(input_dir: Path) -> dict[str, list[Path]]:
    """Map each image's stem to every path holding it below `input_dir` (skipping annotations)."""
    index: dict[str, list[Path]] = {}
    for p in input_dir.rglob("*"):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if SKIP_DIRS.intersection(p.relative_to(input_dir).parts):
            continue
        index.setdefault(p.stem, []).append(p)
    return index


def _normalise(df: pd.DataFrame, path: Path, split: str) -> pd.DataFrame:
    """Columns id, male (bool or None), boneage (float or NaN), plus the CSV row for messages."""
    cols = list(df.columns)
    id_col = _find_column(cols, ID_COLUMNS)
    sex_col = _find_column(cols, SEX_COLUMNS)
    age_col = _find_column(cols, AGE_COLUMNS)
    if id_col is None or sex_col is None:
        raise InputError(f"{path}: needs an id column ({'/'.join(ID_COLUMNS)}) and a sex column "
                         f"({'/'.join(SEX_COLUMNS)}); found {cols}")
    if split == "train" and age_col is None:
        raise InputError(f"{path}: a training CSV needs a bone age column ({'/'.join(AGE_COLUMNS)})")
    out = pd.DataFrame({
        "id": df[id_col].astype(str).str.strip(),
        "male": [parse_sex(v) for v in df[sex_col]],
        "sex_raw": df[sex_col].astype(str),
        "boneage_raw": df[age_col].astype(str) if age_col else "",
        "csv": str(path),
        "row": range(2, len(df) + 2),  # the line number a person sees in an editor (header is 1)
    })
    return out


def _check_rows(rows: pd.DataFrame, split: str) -> tuple[pd.DataFrame, list[dict]]:
    problems: list[dict] = []
    ages = []
    for r in rows.itertuples(index=False):
        where = f"{r.csv} row {r.row}"
        bad = []
        if not SAFE_ID.match(r.id) or ".." in r.id:
            bad.append(f"id {r.id!r} is not safe as a file name (letters, digits, '.', '_', '-' only)")
        if r.male is None:
            bad.append(f"sex {r.sex_raw!r} is not one of True/False, M/F, 1/0")
        age = float("nan")
        if split == "train":
            try:
                age = float(r.boneage_raw)
                if not (0 <= age <= MAX_AGE_MONTHS):
                    bad.append(f"bone age {r.boneage_raw!r} is outside 0..{MAX_AGE_MONTHS} months")
            except ValueError:
                bad.append(f"bone age {r.boneage_raw!r} is not a number")
        ages.append(age)
        for b in bad:
            problems.append({"id": r.id, "split": split, "file": where, "problem": b})
    rows = rows.assign(boneage=ages)
    return rows, problems


def _cache_key(p: Path) -> tuple[str, int, int]:
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


def _check_decodes(paths: list[Path], cache_path: Path | None) -> dict[Path, str]:
    """Decode every image once (cached); returns {path: problem} for the ones that fail."""
    cached: dict[tuple, str] = {}
    if cache_path is not None and cache_path.exists():
        try:
            c = pd.read_csv(cache_path, dtype={"path": str, "problem": str}, keep_default_na=False)
            cached = {(p, int(s), int(m)): e for p, s, m, e in c[["path", "size", "mtime_ns", "problem"]].itertuples(
                index=False)}
        except Exception:
            cached = {}
    keys = {p: _cache_key(p) for p in paths}
    todo = [p for p in paths if keys[p] not in cached]

    def check(p: Path) -> str:
        try:
            read_gray(p)
            return ""
        except InputError as exc:
            return str(exc).split(": ", 1)[-1]

    if todo:
        log.info("checking that %d images decode", len(todo))
        with ThreadPoolExecutor(max_workers=4) as pool:
            for p, problem in zip(todo, pool.map(check, todo)):
                cached[keys[p]] = problem
        if cache_path is not None:
            rows = [{"path": k[0], "size": k[1], "mtime_ns": k[2], "problem": v} for k, v in cached.items()]
            atomic_write_csv(cache_path, pd.DataFrame(rows))
    return {p: cached[keys[p]] for p in paths if cached[keys[p]]}


def find_label_csvs(input_dir: Path, train_csv: str = "", test_csv: str = "") -> tuple[list[Path], list[Path]]:
    """The training CSVs and test CSVs of a data set folder."""
    def resolve(name: str) -> Path:
        p = Path(name)
        p = p if p.is_absolute() else input_dir / p
        if not p.exists():
            raise InputError(f"{p}: the configured label CSV does not exist")
        return p

    trains = [resolve(train_csv)] if train_csv else []
    tests = [resolve(test_csv)] if test_csv else []
    if not train_csv or not test_csv:
        for p in _candidate_csvs(input_dir):
            kind = classify_csv(p)
            if kind == "train" and not train_csv:
                trains.append(p)
            elif kind == "test" and not test_csv:
                tests.append(p)
    return trains, tests


def load_dataset(cfg, require_test: bool = True, require_train: bool = True) -> Dataset:
    """Find, check and return the data set in `cfg.input_dir` (see the module docstring)."""
    input_dir = cfg.input_path
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: the input folder does not exist (set input_dir, or run `make demo`)")
    icfg = cfg.input
    trains, tests = find_label_csvs(input_dir, icfg.train_csv, icfg.test_csv)
    if require_train and not trains:
        raise InputError(f"{input_dir}: no training CSV found (a CSV with id, sex and bone age columns, "
                         "e.g. boneage-training-dataset.csv)")
    if require_test and not tests:
        raise InputError(f"{input_dir}: no test CSV found (a CSV with 'Case ID,Sex' or 'id,male', "
                         "e.g. boneage-test-dataset.csv)")
    if len(tests) > 1:
        raise InputError(f"{input_dir}: several test CSVs found ({', '.join(map(str, tests))}); "
                         "name one with input.test_csv")

    train_rows = pd.concat([_normalise(_read_csv(p), p, "train") for p in trains], ignore_index=True) \
        if trains else _normalise(pd.DataFrame(columns=["id", "male", "boneage"]), Path("-"), "train")
    test_rows = pd.concat([_normalise(_read_csv(p), p, "test") for p in tests], ignore_index=True) \
        if tests else _normalise(pd.DataFrame(columns=["id", "male"]), Path("-"), "test")
    train_rows, problems = _check_rows(train_rows, "train")
    test_rows, test_problems = _check_rows(test_rows, "test")
    problems += test_problems

    # Duplicate ids: every copy is a bad row (which copy is right cannot be known).
    both = pd.concat([train_rows.assign(split="train"), test_rows.assign(split="test")], ignore_index=True)
    dup = both[both["id"].duplicated(keep=False)]
    for r in dup.itertuples(index=False):
        problems.append({"id": r.id, "split": r.split, "file": f"{r.csv} row {r.row}",
                         "problem": f"id {r.id!r} appears more than once"})

    index = index_images(input_dir)
    paths: dict[str, Path] = {}
    for r in both.itertuples(index=False):
        if not SAFE_ID.match(r.id) or ".." in r.id:
            continue  # already reported; never used to build a path
        found = index.get(r.id, [])
        where = f"{r.csv} row {r.row}"
        if not found:
            problems.append({"id": r.id, "split": r.split, "file": where,
                             "problem": f"no image named {r.id}.png/.jpg/.dcm below {input_dir}"})
        elif len({p.resolve() for p in found}) > 1 and len({p.name for p in found}) > 1:
            problems.append({"id": r.id, "split": r.split, "file": where,
                             "problem": f"several images for id {r.id}: {', '.join(map(str, found))}"})
        else:
            paths[r.id] = found[0]
    cache = cfg.work_path / "inputs_checked.csv"
    undecodable = _check_decodes(sorted(set(paths.values())), cache)
    for r in both.itertuples(index=False):
        p = paths.get(r.id)
        if p is not None and p in undecodable:
            problems.append({"id": r.id, "split": r.split, "file": str(p), "problem": undecodable[p]})

    rejected = pd.DataFrame(problems, columns=["id", "split", "file", "problem"])
    bad_test = rejected[rejected["split"] == "test"]
    bad_train = rejected[rejected["split"] == "train"]
    if len(bad_test):
        raise InputError(_summarise(bad_test, "test rows are broken; the submission needs every test row, "
                                              "so fix or remove them"))
    if len(bad_train):
        n_bad = bad_train["id"].nunique()
        frac = n_bad / max(1, len(train_rows))
        if not icfg.drop_bad_train_rows or frac > icfg.max_rejected_fraction:
            why = ("input.drop_bad_train_rows is false" if not icfg.drop_bad_train_rows
                   else f"{frac:.1%} of training rows are bad, above input.max_rejected_fraction="
                        f"{icfg.max_rejected_fraction}")
            raise InputError(_summarise(bad_train, f"training rows are broken ({why})"))
        out = cfg.work_path / "rejected.csv"
        atomic_write_csv(out, bad_train)
        log.warning("%s", _summarise(bad_train, f"training rows dropped; listed in {out}"))
    bad_ids = set(bad_train["id"])

    train = train_rows[~train_rows["id"].isin(bad_ids)]
    train = pd.DataFrame({"id": train["id"].values, "male": train["male"].astype(bool).values,
                          "boneage": train["boneage"].astype(float).values,
                          "path": [paths[i] for i in train["id"]]})
    test = pd.DataFrame({"id": test_rows["id"].values, "male": test_rows["male"].astype(bool).values,
                         "path": [paths[i] for i in test_rows["id"]]})
    log.info("data set %s: %d training, %d test radiographs", input_dir, len(train), len(test))
    return Dataset(input_dir=input_dir, train=train.reset_index(drop=True), test=test.reset_index(drop=True),
                   rejected=rejected)


def _summarise(problems: pd.DataFrame, headline: str, limit: int = 20) -> str:
    lines = [f"{problems['id'].nunique()} {headline}:"]
    for r in problems.head(limit).itertuples(index=False):
        lines.append(f"  {r.file}: {r.problem}")
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
