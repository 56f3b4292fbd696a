import pytest

from boneage.config import load_config
from boneage.errors import ConfigError


def test_defaults_and_profile(tmp_path):
    cfg = load_config("configs/smoke.yaml")
    assert cfg.folds.n_folds == 2
    assert cfg.train.regions == ["A", "C", "raw"]
    assert cfg.input_dir == "input"
    assert cfg.work_path.is_absolute()


def test_overrides_are_typed():
    cfg = load_config("configs/smoke.yaml", ["segment.epochs=7", "train.heads=[reg]", "clean.clahe_clip_limit=3",
                                             "input.drop_bad_train_rows=false", "work_dir=/tmp/elsewhere"])
    assert cfg.segment.epochs == 7 and isinstance(cfg.segment.epochs, int)
    assert cfg.train.heads == ["reg"]
    assert cfg.clean.clahe_clip_limit == 3.0 and isinstance(cfg.clean.clahe_clip_limit, float)
    assert cfg.input.drop_bad_train_rows is False
    assert str(cfg.work_path) == "/tmp/elsewhere"


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="segment.epoch'"):
        load_config(None, ["segment.epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  regoins: [A]\n")
    with pytest.raises(ConfigError, match="train.regoins"):
        load_config(bad)


def test_wrong_type_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="segment.epochs.*int"):
        load_config(None, ["segment.epochs=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["segment.epochs"])


@pytest.mark.parametrize("profile", ["smoke", "demo", "cpu", "full"])
def test_every_profile_loads(profile):
    cfg = load_config(f"configs/{profile}.yaml")
    assert cfg.folds.n_folds >= 2
