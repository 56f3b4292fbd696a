"""Stage 5: K folds stratified by bone-age bin x sex, and an optional stratified hold-out."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from boneage.errors import InputError, StageInputError


def strata(male: np.ndarray, age_months: np.ndarray, bin_months: int, min_count: int) -> np.ndarray:
    """Stratum label per radiograph: sex x age bin, with bins too small for `min_count` merged
    into their neighbour (so every stratum can be split)."""
    labels = np.empty(len(age_months), dtype=object)
    for sex in (False, True):
        idx = np.flatnonzero(male == sex)
        if len(idx) == 0:
            continue
        bins = (age_months[idx] // bin_months).astype(int)
        edges = sorted(set(bins))
        # merge the smallest bin into its neighbour until every bin holds min_count or one bin remains
        while len(edges) > 1:
            counts = {b: int(np.sum(bins == b)) for b in edges}
            small = min(edges, key=lambda b: counts[b])
            if counts[small] >= min_count:
                break
            pos = edges.index(small)
            neighbour = edges[pos - 1] if pos == len(edges) - 1 else edges[pos + 1]
            if 0 < pos < len(edges) - 1:
                neighbour = min(edges[pos - 1], edges[pos + 1], key=lambda b: counts[b])
            bins[bins == small] = neighbour
            edges = sorted(set(bins))
        labels[idx] = [f"{'M' if sex else 'F'}{b}" for b in bins]
    return labels


def make_folds(train: pd.DataFrame, n_folds: int, seed: int, holdout_n: int = 0,
               bin_months: int = 24) -> pd.DataFrame:
    """`id,fold,holdout` for every training radiograph; hold-out rows get fold -1."""
    if n_folds < 2:
        raise InputError(f"folds.n_folds must be at least 2, got {n_folds}")
    n = len(train)
    if n < n_folds * 2 + holdout_n:
        raise InputError(f"{n} training radiographs are too few for {n_folds} folds and a hold-out of {holdout_n}")
    ids = train["id"].astype(str).to_numpy()
    male = train["male"].astype(bool).to_numpy()
    age = train["boneage"].astype(float).to_numpy()
    fold = np.full(n, -1, dtype=int)
    holdout = np.zeros(n, dtype=bool)
    pool = np.arange(n)
    if holdout_n > 0:
        s = strata(male, age, bin_months, max(2, n_folds))
        pool, held = train_test_split(pool, test_size=holdout_n, random_state=seed, stratify=s)
        holdout[held] = True
    s = strata(male[pool], age[pool], bin_months, n_folds)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(skf.split(pool, s)):
        fold[pool[val]] = k
    return pd.DataFrame({"id": ids, "fold": fold, "holdout": holdout})


def read_folds(path) -> pd.DataFrame:
    """`folds/folds.csv` (`id,fold,holdout`) with id as text, fold as int and holdout as bool."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise StageInputError(f"{path}: folds file not found; run stage 05 first (src/05_folds.py)")
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except Exception as exc:  # pandas raises several types for a broken CSV
        raise StageInputError(f"{path}: cannot read as CSV ({exc})") from None
    missing = [c for c in ("id", "fold", "holdout") if c not in df.columns]
    if missing:
        raise StageInputError(f"{path}: missing column(s) {', '.join(missing)}; expected id,fold,holdout")
    df["id"] = df["id"].astype(str).str.strip()
    df["holdout"] = df["holdout"].astype(str).str.strip().str.lower().isin(("true", "1", "yes"))
    df["fold"] = df["fold"].astype(int)
    return df[["id", "fold", "holdout"]]
