"""Stage 6 networks: shapes and ranges of every head and sex mode, the expected-value head, the losses."""

import math

import pytest
import torch

from boneage.config import load_config
from boneage.errors import ConfigError
from boneage.models import (
    HEADS,
    N_CLASSES,
    SEX_MODES,
    BoneAgeNet,
    age_to_target,
    bone_age_loss,
    build_model,
    decode_output,
    soft_month_labels,
    target_to_age,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tcfg():
    return load_config("configs/smoke.yaml", ["train.timm_fc=16"]).train


GRID = [("vgg", h, s) for h in HEADS for s in SEX_MODES] + [("resnet18", "reg", "sex_input"),
                                                             ("resnet18", "cls", "pooled")]


@pytest.mark.parametrize(("backbone", "head", "sex_mode"), GRID)
def test_shapes_and_ranges(tcfg, backbone, head, sex_mode):
    torch.manual_seed(0)
    model = build_model(backbone, head, sex_mode, (56, 96), tcfg).eval()
    if head == "cls":  # the cls output layer starts at zero weights (a fixed prior); give it some
        torch.nn.init.normal_(model.out.weight, std=0.1)
    x = torch.rand(4, 1, 56, 96)
    male = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        out = model(x, male)
    assert out.shape == (4, 1 if head == "reg" else N_CLASSES)
    months, width = decode_output(out, head)
    assert months.shape == (4,) and torch.isfinite(months).all()
    if head == "cls":
        assert width.shape == (4,)
        assert ((months >= 1) & (months <= 240)).all()
        assert ((width > 0) & (width < 120)).all()
    else:
        assert width is None
        assert ((months > -240) & (months < 480)).all()  # untrained, but near the scaled range
    # only sex_input looks at sex (female/male models see one sex, pooled none)
    with torch.no_grad():
        flipped = model(x, 1.0 - male)
    assert (not torch.allclose(flipped, out)) == (sex_mode == "sex_input")


def test_vgg_is_the_papers_network(tcfg):
    t = load_config(None, []).train  # width 1, fc 2048
    model = build_model("vgg", "reg", "pooled", (520, 400), t)
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 128, 128, 256, 256, 384, 384]
    assert [m.out_features for m in model.mlp if isinstance(m, torch.nn.Linear)] == [2048, 2048]
    assert model.features.num_features == 384 * math.ceil(520 / 64) * math.ceil(400 / 64)
    assert isinstance(model, BoneAgeNet)


def test_target_scaling():
    age = torch.tensor([0.0, 120.0, 240.0])
    assert torch.allclose(age_to_target(age), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(target_to_age(age_to_target(age)), age)
    out = torch.tensor([[0.0], [0.5]])
    assert torch.allclose(decode_output(out, "reg")[0], torch.tensor([120.0, 180.0]))


def test_expected_value_on_constructed_distribution():
    # half the mass on month 100, half on month 110: mean 105, SD 5
    p = torch.full((1, N_CLASSES), 1e-12)
    p[0, 99] = p[0, 109] = 0.5
    months, width = decode_output(p.log(), "cls")
    assert months.item() == pytest.approx(105.0, abs=1e-3)
    assert width.item() == pytest.approx(5.0, abs=1e-3)
    # a uniform distribution over 1..240: mean 120.5, SD sqrt((240^2 - 1) / 12)
    months, width = decode_output(torch.zeros(1, N_CLASSES), "cls")
    assert months.item() == pytest.approx(120.5, abs=1e-3)
    assert width.item() == pytest.approx(math.sqrt((240**2 - 1) / 12), abs=1e-2)


def test_soft_labels():
    q = soft_month_labels(torch.tensor([60.0, 200.0]), 6.0)
    assert torch.allclose(q.sum(1), torch.ones(2))
    assert q.argmax(1).tolist() == [59, 199]  # class index k-1 is month k
    m, w = decode_output(q.clamp_min(1e-12).log(), "cls")
    assert m.tolist() == pytest.approx([60.0, 200.0], abs=0.01)
    assert w.tolist() == pytest.approx([6.0, 6.0], abs=0.1)


def test_losses(tcfg):
    age = torch.tensor([60.0, 180.0])
    # reg: MAE on the scaled target; predicting 120 months misses both by 60 months = 0.5
    assert bone_age_loss(torch.zeros(2, 1), age, "reg", tcfg).item() == pytest.approx(0.5)
    # cls: a distribution on the true months beats one 30 months off, and the flat one
    right = soft_month_labels(age, 3.0).clamp_min(1e-12).log()
    wrong = soft_month_labels(age + 30.0, 3.0).clamp_min(1e-12).log()
    l_right = bone_age_loss(right, age, "cls", tcfg).item()
    l_wrong = bone_age_loss(wrong, age, "cls", tcfg).item()
    l_flat = bone_age_loss(torch.zeros(2, N_CLASSES), age, "cls", tcfg).item()
    assert l_right < l_wrong and l_right < l_flat
    # the MAE term alone: expectation 30 months off -> 30 / 120
    t = load_config(None, ["train.cls_ce_weight=0"]).train
    assert bone_age_loss(wrong, age, "cls", t).item() == pytest.approx(30.0 / 120.0, abs=1e-3)


def test_per_image_norm(tcfg):
    t = load_config("configs/smoke.yaml", ["train.input_norm=per_image"]).train
    model = build_model("vgg", "reg", "pooled", (32, 32), t).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        # per-image standardisation makes the output blind to a global contrast and brightness change
        assert torch.allclose(model(x, torch.zeros(2)), model(0.5 * x + 0.2, torch.zeros(2)), atol=1e-4)


def test_cls_head_starts_as_a_broad_prior(tcfg):
    model = build_model("vgg", "cls", "sex_input", (32, 32), tcfg).eval()
    with torch.no_grad():
        months, width = decode_output(model(torch.rand(2, 1, 32, 32), torch.tensor([0.0, 1.0])), "cls")
    assert months.tolist() == pytest.approx([120.0, 120.0], abs=1.0)
    assert width.tolist() == pytest.approx([48.0, 48.0], abs=3.0)  # a Gaussian of SD 50, cut at 1 and 240


def test_unknown_names(tcfg):
    with pytest.raises(ConfigError, match="not_a_net"):
        build_model("not_a_net", "reg", "pooled", (32, 32), tcfg)
    with pytest.raises(ConfigError, match="heads"):
        build_model("vgg", "ordinal", "pooled", (32, 32), tcfg)
    with pytest.raises(ConfigError, match="sex_modes"):
        build_model("vgg", "reg", "both", (32, 32), tcfg)


def test_timm_weights_path_loads_state_dict(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=3)
    path = tmp_path / "r18.pt"
    torch.save(src.state_dict(), path)
    t = load_config(None, [f"train.weights_path={path}", "train.timm_fc=0"]).train
    model = build_model("resnet18", "reg", "pooled", (64, 64), t)
    # the 3-channel stem is folded into one channel; every other tensor is copied as it is
    assert torch.allclose(model.features.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert model.features.conv1.weight.shape[1] == 1
