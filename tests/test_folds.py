import numpy as np
import pandas as pd
import pytest

from boneage.errors import InputError
from boneage.folds import make_folds


def _train(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": [str(i) for i in range(n)], "male": rng.random(n) < 0.54,
                         "boneage": rng.uniform(1, 228, n)})


def test_folds_are_stratified_and_complete():
    train = _train()
    f = make_folds(train, n_folds=5, seed=1)
    assert list(f["id"]) == list(train["id"])
    assert set(f["fold"]) == {0, 1, 2, 3, 4}
    assert not f["holdout"].any()
    merged = f.merge(train, on="id")
    sizes = merged.groupby("fold").size()
    assert sizes.max() - sizes.min() <= 2
    # each fold's sex ratio and mean age close to the whole set's
    for _, g in merged.groupby("fold"):
        assert abs(g["male"].mean() - merged["male"].mean()) < 0.05
        assert abs(g["boneage"].mean() - merged["boneage"].mean()) < 8


def test_deterministic_and_seed_is_used():
    train = _train()
    a = make_folds(train, 5, seed=3, holdout_n=30)
    b = make_folds(train, 5, seed=3, holdout_n=30)
    c = make_folds(train, 5, seed=4, holdout_n=30)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_holdout_never_in_a_fold():
    train = _train()
    f = make_folds(train, 4, seed=0, holdout_n=40)
    assert f["holdout"].sum() == 40
    assert (f.loc[f["holdout"], "fold"] == -1).all()
    assert (f.loc[~f["holdout"], "fold"] >= 0).all()
    # no id in two folds, no overlap between hold-out and folds
    assert f["id"].is_unique


def test_too_few_rows_is_a_clear_error():
    with pytest.raises(InputError, match="too few"):
        make_folds(_train(5), 5, seed=0)
