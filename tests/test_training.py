"""Stage 6 training: oof files, fold discipline, resume after a kill, skipping finished folds,
eval mode at inference, state dicts loaded without pickle, errors naming the missing file."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from boneage.config import load_config
from boneage.errors import ConfigError, StageInputError
from boneage.models import decode_output
from boneage.training import _zoom as zoom
from boneage.training import (
    list_model_specs,
    load_fold_models,
    load_state,
    predict_batch,
    predict_crop,
    read_folds,
    train_all,
    tta_views,
)

torch.set_num_threads(1)  # tiny models: one thread is fastest

N_TRAIN, N_TEST, N_HOLD = 20, 4, 4
SIZES = {"A": [40, 32], "B": [32, 32], "C": [24, 40]}


def make_work(tmp_path, regions=("A",)):
    """A tiny fake run: random crops whose brightness grows with age, labels, test list, folds.csv."""
    rng = np.random.default_rng(0)
    ids = [f"t{i:03d}" for i in range(N_TRAIN + N_HOLD)]
    train = pd.DataFrame({"id": ids, "male": [i % 2 == 0 for i in range(len(ids))],
                          "boneage": rng.uniform(20, 220, len(ids)).round(1)})
    test = pd.DataFrame({"id": [f"x{i}" for i in range(N_TEST)], "male": [True, False, True, False]})
    fold = [(i // 2) % 2 for i in range(N_TRAIN)] + [-1] * N_HOLD
    folds = pd.DataFrame({"id": ids, "fold": fold, "holdout": [f < 0 for f in fold]})
    work = tmp_path / "work"
    ages = dict(zip(train["id"], train["boneage"]))
    for region in regions:
        h, w = SIZES[region]
        for i in ids + list(test["id"]):
            level = ages.get(i, 120.0) / 240.0 * 200
            img = np.clip(rng.normal(level, 20, (h, w)), 0, 255).astype(np.uint8)
            (work / "crops" / region).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(work / "crops" / region / f"{i}.png"), img)
    (tmp_path / "folds").mkdir()
    folds.to_csv(tmp_path / "folds" / "folds.csv", index=False)
    return train, test, folds


def make_cfg(tmp_path, *extra):
    sizes = "{" + ", ".join(f"{k}: [{v[0]}, {v[1]}]" for k, v in SIZES.items()) + "}"
    return load_config("configs/smoke.yaml", [
        f"work_dir={tmp_path / 'work'}", f"oof_dir={tmp_path / 'oof'}", f"folds_dir={tmp_path / 'folds'}",
        f"register.crop_sizes={sizes}", "device=cpu", "train.regions=[A]", "train.heads=[reg]",
        "train.sex_modes=[sex_input]", "train.epochs=1", "train.batch_size=4", "train.vgg_width=0.125",
        "train.vgg_fc=16", "train.num_workers=0", *extra])


def test_model_names_and_filter(tmp_path):
    cfg = make_cfg(tmp_path, "train.regions=[A, C]", "train.heads=[reg, cls]",
                   "train.sex_modes=[female, sex_input]", "train.backbones=[vgg, resnet18]")
    names = [s.name for s in list_model_specs(cfg)]
    assert len(names) == 16 and "cls_C_female_vgg" in names and "reg_A_sex_input_resnet18" in names
    spec = next(s for s in list_model_specs(cfg) if s.name == "cls_C_female_vgg")
    assert (spec.head, spec.region, spec.sex_mode, spec.backbone) == ("cls", "C", "female", "vgg")
    cfg.train.only_models = ["reg_A_female_vgg"]
    assert [s.name for s in list_model_specs(cfg)] == ["reg_A_female_vgg"]
    cfg.train.only_models = ["reg_Z_female_vgg"]
    with pytest.raises(ConfigError, match="reg_Z_female_vgg"):
        list_model_specs(cfg)


def test_oof_files_and_fold_discipline(tmp_path):
    train, test, folds = make_work(tmp_path, regions=("A", "C"))
    cfg = make_cfg(tmp_path, "train.regions=[A, C]", "train.heads=[reg, cls]", "train.epochs=2")
    done = train_all(cfg, train, test, read_folds(cfg))
    assert sorted(done) == ["cls_A_sex_input_vgg", "cls_C_sex_input_vgg", "reg_A_sex_input_vgg", "reg_C_sex_input_vgg"]
    hold_ids = set(folds.loc[folds["holdout"], "id"])
    for name in done:
        head = name.split("_")[0]
        oof = pd.read_csv(cfg.oof_path / f"{name}.csv", dtype={"id": str})
        assert list(oof.columns) == ["id", "fold", "sex", "boneage", "pred"]
        assert sorted(oof["id"]) == sorted(folds.loc[~folds["holdout"], "id"])  # every training id once
        assert set(oof["sex"]) == {"F", "M"} and oof["pred"].notna().all()
        assert (oof.set_index("id")["fold"] == folds.set_index("id").loc[oof["id"], "fold"]).all()
        for k in (0, 1):
            seen = set((cfg.work_path / "models" / name / f"fold{k}" / "train_ids.txt").read_text().split())
            assert not seen & set(oof.loc[oof["fold"] == k, "id"])  # never predicted by a model that saw it
            assert not seen & hold_ids  # hold-out rows are never trained on
            assert seen == set(folds.loc[(folds["fold"] >= 0) & (folds["fold"] != k), "id"])
            lines = (cfg.work_path / "models" / name / f"fold{k}" / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
            assert not (cfg.work_path / "models" / name / f"fold{k}" / "last.pt").exists()
        t = pd.read_csv(cfg.oof_path / f"{name}.test.csv", dtype={"id": str})
        cols = ["id", "sex", "pred", "pred_std"] + (["pred_width"] if head == "cls" else [])
        assert list(t.columns) == cols and list(t["id"]) == list(test["id"])
        assert (t["pred_std"] >= 0).all() and t["pred"].notna().all()
        h = pd.read_csv(cfg.oof_path / f"{name}.holdout.csv", dtype={"id": str})
        assert set(h["id"]) == hold_ids and "boneage" in h.columns
        if head == "cls":
            assert ((t["pred"] >= 1) & (t["pred"] <= 240)).all() and (t["pred_width"] > 0).all()


def test_sex_specific_models_see_one_sex(tmp_path):
    train, test, folds = make_work(tmp_path)
    cfg = make_cfg(tmp_path, "train.sex_modes=[female]")
    assert train_all(cfg, train, test, read_folds(cfg)) == ["reg_A_female_vgg"]
    oof = pd.read_csv(cfg.oof_path / "reg_A_female_vgg.csv", dtype={"id": str})
    females = set(train.loc[~train["male"], "id"]) - set(folds.loc[folds["holdout"], "id"])
    assert set(oof["id"]) == females and set(oof["sex"]) == {"F"}
    seen = (cfg.work_path / "models" / "reg_A_female_vgg" / "fold0" / "train_ids.txt").read_text().split()
    assert set(seen) <= set(train.loc[~train["male"], "id"])
    assert set(pd.read_csv(cfg.oof_path / "reg_A_female_vgg.test.csv")["sex"]) == {"F"}


class Killed(RuntimeError):
    pass


def test_resume_after_kill_and_skip_finished(tmp_path):
    train, test, _ = make_work(tmp_path)
    cfg = make_cfg(tmp_path, "train.epochs=3", "train.batch_size=2")  # 5 steps per epoch
    fold_dir = cfg.work_path / "models" / "reg_A_sex_input_vgg" / "fold0"

    def kill_after_epoch_1(spec, fold, epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_all(cfg, train, test, read_folds(cfg), hooks={"after_epoch": kill_after_epoch_1})
    state = load_state(fold_dir / "last.pt", "cpu")  # weights_only: no pickled objects in the checkpoint
    assert state["epoch"] == 1 and {"model", "optimizer", "scheduler"} <= set(state)
    assert not (fold_dir / "done.json").exists()

    seen = []
    train_all(cfg, train, test, read_folds(cfg), hooks={"after_epoch": lambda s, f, e: seen.append((f, e))})
    assert seen[:2] == [(0, 2), (0, 3)]  # fold 0 continued from epoch 2
    assert seen[2:] == [(1, 1), (1, 2), (1, 3)]
    epochs = [json.loads(x)["epoch"] for x in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    # optimizer and scheduler resumed too: the learning rates match those of fold 1, never interrupted
    lrs = [[json.loads(x)["lr"] for x in (fold_dir.parent / f"fold{k}" / "metrics.jsonl").read_text().splitlines()]
           for k in (0, 1)]
    assert lrs[0] == pytest.approx(lrs[1]) and lrs[0][0] > lrs[0][1] > lrs[0][2]

    best_mtime = (fold_dir / "best.pt").stat().st_mtime_ns
    seen.clear()
    assert train_all(cfg, train, test, read_folds(cfg), hooks={"after_epoch": lambda s, f, e: seen.append(e)})
    assert seen == [] and (fold_dir / "best.pt").stat().st_mtime_ns == best_mtime  # finished folds skipped


def test_inference_in_eval_mode_without_pickle(tmp_path):
    train, test, _ = make_work(tmp_path)
    cfg = make_cfg(tmp_path, "train.heads=[cls]", "train.dropout=0.5", "train.tta=true")
    train_all(cfg, train, test, read_folds(cfg))
    spec = list_model_specs(cfg)[0]
    for p in (cfg.work_path / "models" / spec.name).glob("fold*/best.pt"):
        state = torch.load(p, map_location="cpu", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    models = load_fold_models(cfg.work_path, spec, cfg, "cpu")
    assert len(models) == 2 and not any(m.training for m in models)
    crop = cv2.imread(str(cfg.work_path / "crops" / "A" / "x0.png"), cv2.IMREAD_GRAYSCALE)
    for m in models:
        m.train()  # whatever mode a caller left it in, inference runs in eval mode
    r1 = predict_crop(models, crop, True, spec, cfg, "cpu")
    r2 = predict_crop(models, crop, True, spec, cfg, "cpu")
    assert not any(m.training for m in models)
    assert r1 == r2 and 1 <= r1["pred"] <= 240 and r1["pred_std"] >= 0 and r1["pred_width"] > 0
    # the same crop at another size is resized to the region's size first
    big = cv2.resize(crop, (64, 80))
    assert predict_crop(models, big, True, spec, cfg, "cpu")["pred"] == pytest.approx(r1["pred"], abs=10)
    x = torch.rand(2, 1, 40, 32)
    a, _ = predict_batch(models[0].train(), x, torch.ones(2), "cls", cfg.train, torch.device("cpu"))
    b, _ = predict_batch(models[0].train(), x, torch.ones(2), "cls", cfg.train, torch.device("cpu"))
    assert np.array_equal(a, b)


def test_tta_views_shift_the_crop_and_average_in_one_batch():
    """Test-time views: the identity when off; the crop plus four diagonal shifts per scale when on; a shift
    moves the content by that share of the crop in the stated direction; predict_batch gives the mean of the
    views' outputs."""
    from types import SimpleNamespace

    off = SimpleNamespace(tta=False, tta_shift=0.02, tta_scales=[1.0])
    assert tta_views(off) == [(1.0, 0.0, 0.0)]
    on = SimpleNamespace(tta=True, tta_shift=0.1, tta_scales=[0.97, 1.0])
    views = tta_views(on)
    assert len(views) == 10 and (1.0, 0.0, 0.0) in views and (0.97, -0.1, 0.1) in views
    x = torch.zeros(1, 1, 40, 40)
    x[0, 0, 18:22, 18:22] = 1.0  # a bright square at the centre
    moved = zoom(x, 1.0, 0.1, -0.1)[0, 0]  # right by 4 px, up by 4 px
    ys, xs = torch.nonzero(moved > 0.5, as_tuple=True)
    assert float(xs.float().mean()) == pytest.approx(23.5, abs=0.6)
    assert float(ys.float().mean()) == pytest.approx(15.5, abs=0.6)

    class Probe(torch.nn.Module):  # the output is the mean brightness of the right half, so views differ
        def forward(self, x, male):
            return (x[:, :, :, x.shape[-1] // 2:].mean((1, 2, 3)) + 0.1 * male)[:, None]

    img = torch.rand(3, 1, 40, 40)
    male = torch.tensor([1.0, 0.0, 1.0])
    tcfg = SimpleNamespace(tta=True, tta_shift=0.1, tta_scales=[1.0], amp=False, channels_last=False)
    got, _ = predict_batch(Probe(), img, male, "reg", tcfg, torch.device("cpu"))
    want = np.mean([decode_output(Probe()(zoom(img, s, a, b), male), "reg")[0].numpy()
                    for s, a, b in tta_views(tcfg)], 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain, _ = predict_batch(Probe(), img, male, "reg", SimpleNamespace(**{**vars(tcfg), "tta": False}),
                             torch.device("cpu"))
    assert not np.allclose(got, plain)
    # a loader-sized batch runs the views in several passes (at most 64 images each), with the same result
    big, big_male = torch.rand(40, 1, 40, 40), (torch.rand(40) > 0.5).float()
    got, _ = predict_batch(Probe(), big, big_male, "reg", tcfg, torch.device("cpu"))
    want = np.mean([decode_output(Probe()(zoom(big, s, a, b), big_male), "reg")[0].numpy()
                    for s, a, b in tta_views(tcfg)], 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_missing_inputs_name_the_file(tmp_path):
    train, test, _ = make_work(tmp_path)
    cfg = make_cfg(tmp_path)
    (cfg.work_path / "crops" / "A" / "t003.png").unlink()
    with pytest.raises(StageInputError, match="t003.png"):
        train_all(cfg, train, test, read_folds(cfg))
    (cfg.folds_path / "folds.csv").unlink()
    with pytest.raises(StageInputError, match="folds.csv"):
        read_folds(cfg)


def test_changed_folds_refuse_to_reuse_a_trained_fold(tmp_path):
    train, test, folds = make_work(tmp_path)
    cfg = make_cfg(tmp_path)
    train_all(cfg, train, test, read_folds(cfg))
    # folds.csv changes after training (another seed, say): reusing fold 0 would leak its predictions
    changed = folds.copy()
    changed.loc[changed["fold"] >= 0, "fold"] = 1 - changed.loc[changed["fold"] >= 0, "fold"]
    changed.loc[0, "fold"] = 1 - changed.loc[0, "fold"]
    changed.to_csv(tmp_path / "folds" / "folds.csv", index=False)
    with pytest.raises(StageInputError, match="different split.*--force"):
        train_all(cfg, train, test, read_folds(cfg))
    assert train_all(cfg, train, test, read_folds(cfg), force=True)


def test_resolution_and_jpeg_augmentation_soften_or_block_the_crop():
    """train.aug_downscale / aug_jpeg_quality (issue 11: radiographs at a quarter resolution, JPEG 30): off by default;
    on, they take detail out of a crop without moving it; bad ranges are a clear config error."""
    from boneage.training import build_train_transform

    rng = np.random.default_rng(0)
    crop = np.clip(128 + rng.normal(0, 40, (96, 80)), 0, 255).astype(np.uint8)
    crop[:, :40] //= 3  # a dark half: the crop's layout must survive

    def base(**kw):
        over = ["train.aug_zoom=0", "train.aug_rotate_deg=0", "train.aug_shift=0", "train.aug_gamma=[1,1]",
                "train.aug_brightness=0"] + [f"train.{k}={v}" for k, v in kw.items()]
        return load_config(None, over).train

    assert np.array_equal(build_train_transform(base())(image=crop)["image"], crop)  # nothing on by default

    def detail(img):
        return float(np.abs(np.diff(img.astype(float), axis=1)).mean())

    for kw in ({"aug_downscale": "[0.25,0.3]", "aug_downscale_p": 1.0},
               {"aug_jpeg_quality": "[20,25]", "aug_jpeg_p": 1.0}):
        out = build_train_transform(base(**kw))(image=crop)["image"]
        assert out.shape == crop.shape and out.dtype == np.uint8
        assert detail(out) < 0.8 * detail(crop), kw
        assert out[:, :40].mean() < out[:, 40:].mean() - 40  # the same picture, only softer
    for kw in ({"aug_downscale": "[0.5,0.2]"}, {"aug_jpeg_quality": "[0,50]"}):
        with pytest.raises(ConfigError):
            build_train_transform(base(**kw))


def test_crops_travel_as_bytes_and_reach_the_model_in_unit_range(tmp_path):
    """The loader hands 8-bit crops (a quarter of the bytes through worker shared memory and the host-to-GPU copy);
    `_to_device` scales them to [0, 1] there; a float batch (a single crop at inference) passes unchanged; every
    augmentation the profiles switch on keeps crops 8-bit, as the dataset demands."""
    from boneage.training import CropDataset, _to_device, build_train_transform

    make_work(tmp_path)
    paths = sorted((tmp_path / "work" / "crops" / "A").glob("*.png"))[:3]
    img = cv2.imread(str(paths[0]), cv2.IMREAD_GRAYSCALE)
    full = load_config("configs/full.yaml", ["train.aug_downscale_p=1", "train.aug_jpeg_p=1"]).train
    ds = CropDataset(paths, [1, 0, 1], [10.0, 20.0, 30.0], tuple(SIZES["A"]), build_train_transform(full))
    plain = CropDataset(paths, [1, 0, 1], [10.0, 20.0, 30.0], tuple(SIZES["A"]))
    x, male, age, i = ds[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, *SIZES["A"]) and i == 0 and float(age) == 10.0
    tcfg = load_config("configs/smoke.yaml", ["train.channels_last=true"]).train
    xb = torch.stack([plain[k][0] for k in range(3)])
    on_device = _to_device(xb, torch.device("cpu"), tcfg)
    assert on_device.dtype == torch.float32 and on_device.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(on_device[0, 0], torch.from_numpy(img).float() / 255.0)
    assert 0.0 <= float(on_device.min()) and float(on_device.max()) <= 1.0
    already = torch.rand(2, 1, 8, 8)
    assert torch.equal(_to_device(already, torch.device("cpu"), tcfg), already)
