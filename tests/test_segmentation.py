"""U-Net loss, working-resolution geometry, API, and the bootstrap from zero masks on phantoms."""

import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from boneage.config import load_config
from boneage.segmentation import (
    bootstrap_unet,
    build_unet,
    load_unet,
    mask_to_work,
    predict_mask,
    predict_masks,
    prob_to_mask,
    relabel_unet,
    save_unet,
    segmentation_loss,
    soft_jaccard,
    to_work,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_cfg(**kw):
    over = ["segment.work_size_px=64", "segment.encoder_depth=3", "segment.decoder_channels=[32,16,8]",
            "segment.batch_size=4", "segment.dilate_frac=0.0"] + [f"segment.{k}={v}" for k, v in kw.items()]
    return load_config(None, over).segment


def test_loss_on_known_inputs():
    y = torch.zeros(1, 1, 4, 4)
    y[..., :2, :] = 1.0  # half the pixels
    # p = 0.5 everywhere: BCE = ln 2, J = (n/4) / (n/2 + n/2 - n/4) = 1/3
    half = torch.zeros_like(y)
    assert soft_jaccard(half, y).item() == pytest.approx(1 / 3, abs=1e-5)
    assert segmentation_loss(half, y).item() == pytest.approx(math.log(2) + math.log(3), abs=1e-4)
    # a confident perfect prediction: J -> 1, loss -> 0
    perfect = (y * 2 - 1) * 30
    assert soft_jaccard(perfect, y).item() == pytest.approx(1.0, abs=1e-6)
    assert segmentation_loss(perfect, y).item() == pytest.approx(0.0, abs=1e-5)
    # confidently wrong: J close to 0 (never exactly, eps), loss large
    assert soft_jaccard(-perfect, y).item() < 1e-6
    assert segmentation_loss(-perfect, y).item() > 10
    # p = sigmoid(1) on the positives, sigmoid(-1) on the negatives
    p1 = 1 / (1 + math.exp(-1))
    logits = (y * 2 - 1)
    j = p1 / (2 - p1)  # sum y p = 8 p1, sum y = 8, sum p = 8 p1 + 8 (1 - p1) = 8
    assert soft_jaccard(logits, y).item() == pytest.approx(j, abs=1e-5)
    bce = -math.log(p1)
    assert segmentation_loss(logits, y).item() == pytest.approx(bce - math.log(j), abs=1e-4)


def test_unet_shape_batchnorm_and_local_weights(tmp_path):
    cfg = small_cfg()
    model = build_unet(cfg)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    # start from a local state dict
    w = tmp_path / "w.pt"
    torch.save(model.state_dict(), w)
    other = build_unet(small_cfg(weights_path=str(w)))
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_work_geometry_round_trip():
    mask = np.zeros((300, 200), bool)
    cv2.ellipse(mask.view(np.uint8), (100, 160), (60, 110), 0, 0, 360, 1, -1)
    wi = to_work((mask * 200).astype(np.uint8), 128)
    assert wi.image.shape == (128, 128) and wi.size == (300, 200) and wi.inner == (128, 85)
    assert (wi.image[:, 85:] == 0).all()
    sq = mask_to_work(mask, 128)
    back = prob_to_mask(sq.astype(np.float32), wi.inner, wi.size, small_cfg())
    assert back.shape == mask.shape
    assert (back & mask).sum() / (back | mask).sum() > 0.97


def test_load_unet_and_predict_mask_api(tmp_path):
    cfg = small_cfg()
    torch.manual_seed(0)
    save_unet(build_unet(cfg), tmp_path)
    model = load_unet(tmp_path, cfg, torch.device("cpu"))
    assert not model.training
    img = np.random.default_rng(0).integers(0, 255, (90, 70), dtype=np.uint8)
    m = predict_mask(model, img, cfg, torch.device("cpu"))
    assert m.shape == (90, 70) and m.dtype == bool


def test_load_unet_missing_raises_stage_error(tmp_path):
    from boneage.errors import StageInputError

    with pytest.raises(StageInputError):
        load_unet(tmp_path, small_cfg(), torch.device("cpu"))


def _phantom_set(n, px, seed=3):
    from boneage.phantom import PhantomConfig, make_phantom

    pc = PhantomConfig(long_side_px=px)
    return [make_phantom(pc, seed, i) for i in range(n)]


def test_classical_pseudo_labels_on_phantoms():
    """The first guess that seeds the bootstrap: most phantoms get a usable label, scored honestly."""
    pytest.importorskip("boneage.phantom")
    from boneage.masks import classical_mask

    ious, quals = [], []
    for s in _phantom_set(16, 256):
        m, q, _ = classical_mask(s.image)
        gt = s.mask > 127
        ious.append((m & gt).sum() / max((m | gt).sum(), 1))
        quals.append(q)
    ious, quals = np.array(ious), np.array(quals)
    assert np.median(ious) > 0.8, ious
    # the quality score ranks: labels it keeps are better than those it rejects
    keep = quals >= 0.6
    assert keep.sum() >= 10
    if (~keep).any():
        assert ious[keep].mean() > ious[~keep].mean()


def test_bootstrap_on_phantoms_from_zero_masks_reaches_the_iou_bar():
    """Issue 4's phantom bar (median IoU >= 0.97 with zero manual masks) in a profile scaled to the test suite: 128
    training phantoms at 256 px, the U-Net at 80 px, classical pseudo-labels -> 20 epochs -> one self-training round
    of 4; stage 1's own post-processing at the phantoms' size; median IoU on 24 phantoms it never saw. (0.985 when
    written, about 2.5 CPU minutes; with 13 manual masks also 0.985. The demo profile's figures, 0.991 with zero and
    with 10 % manual masks, are in BENCHMARKS.md.)"""
    pytest.importorskip("boneage.phantom")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ws = 80
    train, test = _phantom_set(128, 256, seed=3), _phantom_set(24, 256, seed=4)
    cfg = load_config(None, [f"segment.work_size_px={ws}", "segment.epochs=20", "segment.epochs_per_round=4",
                             "segment.self_training_rounds=1", "segment.batch_size=8", "segment.lr=3e-3"]).segment
    works = [to_work(s.image, ws) for s in train]
    boot = bootstrap_unet(np.stack([w.image for w in works]), [w.inner for w in works], {}, cfg,
                          torch.device("cpu"), seed=0)
    assert [r["round"] for r in boot.rounds] == [0, 1] and boot.rounds[0]["kept"] > 0
    masks = predict_masks(boot.model, [s.image for s in test], cfg, torch.device("cpu"))
    ious = [float((m & (s.mask > 127)).sum() / max((m | (s.mask > 127)).sum(), 1)) for m, s in zip(masks, test)]
    assert np.median(ious) >= 0.97, np.round(ious, 3)


def test_relabel_round_takes_the_pipeline_masks_at_full_size(monkeypatch):
    """The relabel round's labels: the pipeline's masks predicted at the bootstrap size without dilation or
    fingertip margin, kept by quality, manual masks as given; trained at work_size_px."""
    import boneage.segmentation as seg

    samples = _phantom_set(5, 128)
    cfg = small_cfg(work_size_px=64, bootstrap_work_size_px=32, relabel_epochs=2, dilate_frac=0.01,
                    fingertip_margin_frac=0.01)
    seen = {}

    def fake_predict(model, images, c, device):
        seen.setdefault("cfgs", []).append((c.work_size_px, c.dilate_frac, c.fingertip_margin_frac))
        # a good mask for every radiograph but the last, which gets an empty (implausible) one
        chosen = samples[1:1 + len(images)]
        return [s.mask > 127 if k < 3 else np.zeros_like(s.mask, bool) for k, s in enumerate(chosen)]

    def fake_train(model, images, labels, epochs, c, device, seed=0):
        seen["train"] = (images.shape, labels.copy(), epochs)
        return [0.5] * epochs

    monkeypatch.setattr(seg, "predict_masks", fake_predict)
    monkeypatch.setattr(seg, "train_unet", fake_train)
    items = [(samples[0].image, samples[0].mask > 127)] + [(s.image, None) for s in samples[1:]]
    rec = relabel_unet(build_unet(cfg), iter(items), cfg, torch.device("cpu"))
    assert seen["cfgs"] == [(32, 0.0, 0.0)]  # one batch of the four without a manual mask
    assert rec["manual"] == 1 and rec["of"] == 5 and rec["kept"] == 4  # the empty mask is no label
    shape, labels, epochs = seen["train"]
    assert shape == (4, 64, 64) and epochs == 2 and rec["work_size_px"] == 64 and rec["label_work_size_px"] == 32
    assert np.array_equal(labels[0], mask_to_work(samples[0].mask > 127, 64).astype(np.uint8))
    assert rec["train_losses"] == [0.5, 0.5]


@pytest.mark.parametrize("rotate_deg, lo, hi", [(20.0, 0, 25), (180.0, 60, 180)])
def test_unet_rotation_augmentation_range(rotate_deg, lo, hi):
    """`segment.aug_rotate_deg`: a vertical bar's axis after augmentation stays within +-20 degrees of the vertical
    by default; with 180 some hands come out far off the vertical."""
    from boneage.segmentation import _augment

    img = np.zeros((64, 64), np.uint8)
    img[8:56, 28:36] = 200
    rng = np.random.default_rng(0)
    tilts = []
    for _ in range(60):
        _, m = _augment(img, (img > 0).astype(np.uint8), rng, 0.0, rotate_deg)
        ys, xs = np.nonzero(m)
        cov = np.cov(np.stack([xs, ys]).astype(float))
        ev = np.linalg.eigh(cov)[1][:, -1]
        tilts.append(np.degrees(np.arccos(min(1.0, abs(ev[1])))))
    assert lo <= max(tilts) <= hi, max(tilts)


def test_stages_01_02_end_to_end(tmp_path):
    """Tiny phantom data set through stages 0-2: files, columns, resume, an inverted radiograph."""
    pytest.importorskip("boneage.demo_data")
    sets = ["--set", f"input_dir={tmp_path}/input", "--set", f"work_dir={tmp_path}/work", "--set", "demo.n_train=6",
            "--set", "demo.n_test=3", "--set", "phantom.long_side_px=128", "--set", "segment.work_size_px=32",
            "--set", "segment.encoder_depth=3", "--set", "segment.decoder_channels=[16,8,8]",
            "--set", "segment.epochs=1", "--set", "segment.epochs_per_round=1", "--set", "threads=2",
            "--set", "segment.bootstrap_work_size_px=24", "--set", "segment.relabel_epochs=1"]

    def run(script, *extra):
        r = subprocess.run([sys.executable, str(REPO_ROOT / "src" / script), "--config", "configs/smoke.yaml",
                            *sets, *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    run("00_make_demo_data.py")
    # make one test radiograph inverted: stage 1 must still segment it, stage 2 must turn it right
    test_dir = tmp_path / "input" / "boneage-test-dataset"
    inv_path = sorted(test_dir.glob("*.png"))[0]
    img = cv2.imread(str(inv_path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(inv_path), 255 - img)
    run("01_segment.py")
    work = tmp_path / "work"
    masks = pd.read_csv(work / "masks.csv", dtype={"id": str}, keep_default_na=False)
    assert list(masks.columns) == ["id", "quality", "area_frac", "n_components", "flag"]
    assert len(masks) == 9
    assert (work / "models" / "unet" / "unet.pt").exists() and (work / "models" / "unet" / "rounds.json").exists()
    import json

    rounds = json.loads((work / "models" / "unet" / "rounds.json").read_text())
    assert rounds[-1]["round"] == "relabel" and rounds[-1]["work_size_px"] == 32 and rounds[-1]["of"] == 6
    assert (work / "models" / "unet" / "cache_24.npz").exists()  # the bootstrap ran at its own size
    assert (work / "qc" / "01_masks.png").exists()
    for sid in masks.id:
        m = cv2.imread(str(work / "masks" / f"{sid}.png"), cv2.IMREAD_GRAYSCALE)
        assert set(np.unique(m)) <= {0, 255}
    run("02_clean.py")
    clean = pd.read_csv(work / "clean.csv", dtype={"id": str}, keep_default_na=False)
    assert list(clean.columns) == ["id", "inverted", "kept_area_frac", "flag"]
    assert len(clean) == 9 and (work / "qc" / "02_clean.png").exists()
    inv_id = inv_path.stem
    assert str(clean.set_index("id").loc[inv_id, "inverted"]) == "True"
    # stage 2 in three threads writes the same files and table
    first = {p.name: p.read_bytes() for p in (work / "clean").glob("*.png")}
    run("02_clean.py", "--force", "--set", "clean.workers=3")
    assert {p.name: p.read_bytes() for p in (work / "clean").glob("*.png")} == first
    pd.testing.assert_frame_equal(pd.read_csv(work / "clean.csv", dtype={"id": str}, keep_default_na=False), clean)
    # a low-contrast film saved through heavy JPEG compression is flagged for stage 7's list of cases to check
    jpg_path = sorted(test_dir.glob("*.png"))[1]
    img = cv2.imread(str(jpg_path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    low = (50 + 16 * (img - img.min()) / max(1.0, float(np.ptp(img)))).astype(np.uint8)
    cv2.imwrite(str(jpg_path), cv2.imdecode(cv2.imencode(".jpg", low, [cv2.IMWRITE_JPEG_QUALITY, 20])[1], 0))
    run("02_clean.py", "--force")
    flags = pd.read_csv(work / "clean.csv", dtype={"id": str}, keep_default_na=False).set_index("id")["flag"]
    assert flags[jpg_path.stem].startswith("jpeg_blocks:step")
    assert not any("jpeg_blocks" in f for i, f in flags.items() if i != jpg_path.stem)
    # resume: nothing redone, same outputs; a deleted mask is redone
    (work / "masks" / f"{inv_id}.png").unlink()
    r = run("01_segment.py")
    assert "1 of 9 radiographs need a mask" in r.stderr
    assert (work / "masks" / f"{inv_id}.png").exists()


class _BrightIsHand(torch.nn.Module):
    """A stand-in network: 'hand' wherever the standardised input is bright (normal polarity only)."""

    def forward(self, x):
        return (x - 0.0) * 20.0


def test_predict_mask_retries_inverted_radiographs():
    from test_masks import hand_mask, radiograph

    cfg = small_cfg(work_size_px=128)
    hand = hand_mask()
    img = radiograph(hand, letters=False, band=False)
    model = _BrightIsHand()
    normal = predict_mask(model, img, cfg, torch.device("cpu"))
    inverted = predict_mask(model, 255 - img, cfg, torch.device("cpu"))
    for m in (normal, inverted):
        assert m.shape == hand.shape
        assert (m & hand).sum() / (m | hand).sum() > 0.85


def test_post_processing_in_threads_gives_the_same_masks_in_order():
    from boneage.runtime import thread_map
    from boneage.segmentation import predict_masks_with_raw
    from test_masks import hand_mask, radiograph

    assert thread_map(lambda x: x * x, range(7), 3) == [x * x for x in range(7)]
    cfg = small_cfg(work_size_px=128)
    hand = hand_mask()
    imgs = [radiograph(hand, letters=False, band=False), 255 - radiograph(hand, letters=False, band=False),
            np.ascontiguousarray(radiograph(hand, letters=True, band=True)[:, ::-1])]
    model = _BrightIsHand()
    one = predict_masks_with_raw(model, imgs, cfg, torch.device("cpu"))
    cfg.post_workers = 3
    three = predict_masks_with_raw(model, imgs, cfg, torch.device("cpu"))
    assert len(one) == len(three) == 3
    for (r1, m1), (r3, m3) in zip(one, three):
        assert np.array_equal(r1, r3) and np.array_equal(m1, m3)
    assert not np.array_equal(one[0][1], one[2][1])  # the third is mirrored: order kept, not a copy of the first


class _LeansRight(torch.nn.Module):
    """A stand-in network that is not mirror-symmetric: 'hand' where the input 3 px to the left is bright."""

    def forward(self, x):
        return torch.nn.functional.pad(x, (3, 0))[..., :-3] * 20.0


@pytest.mark.parametrize("tta,fuse_max", [(False, False), (True, False), (True, True)])
def test_flip_tta_gives_a_mirrored_film_exactly_the_mirrored_probabilities(tta, fuse_max):
    from boneage.segmentation import work_probs
    from test_masks import hand_mask, radiograph

    cfg = small_cfg(work_size_px=128, flip_tta=tta, flip_tta_max=fuse_max)
    img = radiograph(hand_mask(), letters=False, band=False)  # 320 x 256: the work square pads it on the right
    mirrored = np.ascontiguousarray(img[:, ::-1])
    works, works_m = [to_work(img, 128)], [to_work(mirrored, 128)]
    nh, nw = works[0].inner
    assert nw < 128 and np.array_equal(works_m[0].image[:nh, :nw], works[0].image[:nh, :nw][:, ::-1])
    p = work_probs(_LeansRight(), works, cfg, torch.device("cpu"))[0][:nh, :nw]
    p_m = work_probs(_LeansRight(), works_m, cfg, torch.device("cpu"))[0][:nh, :nw]
    gap = np.abs(p_m[:, ::-1] - p).max()
    if tta:
        assert gap < 1e-6
    else:
        assert gap > 0.5  # the network alone reads the mirror image differently
