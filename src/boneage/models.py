"""Stage 6 networks: the paper's VGG-style CNN or any timm backbone, with a regression or a
classification head, and four ways of using sex.

One builder, `build_model(backbone, head, sex_mode, input_hw, tcfg)`, looks the backbone up in
`BACKBONES` (an explicit table: `vgg` is the paper's network; any other name is handed to
`timm.create_model`). Every network takes a float image batch in [0, 1] of shape (B, 1, H, W) and
a `male` vector (B,) of 0/1, normalises the image itself (so training and single-radiograph
prediction cannot disagree), and returns raw outputs:

- `reg`: (B, 1), the scaled target y = age / 120 - 1 (MAE loss on y);
- `cls`: (B, 240) logits over the months 1..240; the estimate is the expected value
  sum_k p_k k and its spread sqrt(sum_k p_k (k - E)^2) the distribution's width.

`decode_output` turns either into months (and a width for cls); `bone_age_loss` is the training
loss of either head (see its docstring for the classification loss and why).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from boneage.errors import ConfigError

log = logging.getLogger(__name__)

HEADS = ("reg", "cls")
SEX_MODES = ("pooled", "sex_input", "female", "male")
N_CLASSES = 240  # one class per month 1..240
MONTHS_SCALE = 120.0  # y = age / 120 - 1 maps 0..240 months to [-1, 1]
VGG_FILTERS = (32, 64, 128, 128, 256, 384)


def age_to_target(age_months: torch.Tensor) -> torch.Tensor:
    return age_months / MONTHS_SCALE - 1.0


def target_to_age(y: torch.Tensor) -> torch.Tensor:
    return (y + 1.0) * MONTHS_SCALE


class InputNorm(nn.Module):
    """`fixed`: (x - 0.5) / 0.25 for every crop; `per_image`: each crop to mean 0, SD 1."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ("fixed", "per_image"):
            raise ConfigError(f"train.input_norm must be 'fixed' or 'per_image', got '{mode}'")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fixed":
            return (x - 0.5) / 0.25
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)


class VGGFeatures(nn.Module):
    """Six VGG modules (two 3x3 convolutions, each followed by ELU then batch norm, then 2x2 max
    pooling), then either the paper's flatten or global average pooling. Pooling rounds up so a
    small crop never shrinks to nothing."""

    def __init__(self, input_hw: tuple[int, int], width: float = 1.0, pool: str = "flatten"):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        h, w = int(input_hw[0]), int(input_hw[1])
        for f in VGG_FILTERS:
            c = max(4, int(round(f * width)))
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ELU(inplace=True), nn.BatchNorm2d(c)]
                c_in = c
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.body = nn.Sequential(*layers)
        if pool == "flatten":
            self.pool: nn.Module = nn.Flatten(1)
            self.num_features = c_in * h * w
        elif pool == "avg":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.num_features = c_in
        else:
            raise ConfigError(f"train.vgg_pool must be 'flatten' or 'avg', got '{pool}'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))


def _vgg_backbone(name: str, input_hw, tcfg) -> tuple[nn.Module, list[int]]:
    feats = VGGFeatures(input_hw, tcfg.vgg_width, tcfg.vgg_pool)
    return feats, [tcfg.vgg_fc, tcfg.vgg_fc]  # the paper: two fully connected layers of 2048


def _timm_backbone(name: str, input_hw, tcfg) -> tuple[nn.Module, list[int]]:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"train.backbones: '{name}' is neither 'vgg' nor a timm model name")
    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1)
    if tcfg.weights_path:
        load_backbone_weights(net, Path(tcfg.weights_path))
    return net, ([tcfg.timm_fc] if tcfg.timm_fc > 0 else [])


# The explicit table of backbones; names not listed are looked up in timm's registry.
BACKBONES: dict[str, Callable] = {"vgg": _vgg_backbone}


def load_backbone_weights(net: nn.Module, path: Path) -> None:
    """Load a local state dict into a timm backbone (no pickle); a 3-channel stem is summed to 1."""
    from timm.models import adapt_input_conv

    if not path.exists():
        raise ConfigError(f"train.weights_path: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = net.state_dict()
    fixed = {}
    for k, v in state.items():
        if k in own and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] != own[k].shape[1]:
            v = adapt_input_conv(own[k].shape[1], v)
        if k in own and own[k].shape == v.shape:
            fixed[k] = v
    missing, _ = net.load_state_dict(fixed, strict=False)
    log.info("backbone weights from %s: %d tensors loaded, %d missing", path, len(fixed), len(missing))


class BoneAgeNet(nn.Module):
    """Normalise -> backbone features (+ sex for `sex_input`) -> MLP -> 1 or 240 outputs."""

    def __init__(self, features: nn.Module, num_features: int, hidden: list[int], head: str, sex_mode: str,
                 dropout: float, input_norm: str):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"train.heads: '{head}' is not one of {', '.join(HEADS)}")
        if sex_mode not in SEX_MODES:
            raise ConfigError(f"train.sex_modes: '{sex_mode}' is not one of {', '.join(SEX_MODES)}")
        self.head_kind = head
        self.sex_mode = sex_mode
        self.norm = InputNorm(input_norm)
        self.features = features
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        d = num_features + (1 if sex_mode == "sex_input" else 0)
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ELU(inplace=True), nn.Dropout(dropout)]
            d = h
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(d, 1 if head == "reg" else N_CLASSES)
        if head == "cls":  # start from a broad distribution centred on the middle of the age range
            nn.init.zeros_(self.out.weight)
            with torch.no_grad():
                k = torch.arange(1, N_CLASSES + 1, dtype=torch.float32)
                self.out.bias.copy_(-0.5 * ((k - 120.0) / 50.0) ** 2)
        else:
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        f = self.features(self.norm(x)).flatten(1)
        if self.sex_mode == "sex_input":
            f = torch.cat([f, (male.to(f.dtype) * 2.0 - 1.0).view(-1, 1)], dim=1)
        return self.out(self.mlp(f))


def build_model(backbone: str, head: str, sex_mode: str, input_hw: tuple[int, int], tcfg) -> BoneAgeNet:
    """The network for one model spec. `input_hw` is the region crop's (height, width)."""
    maker = BACKBONES.get(backbone, _timm_backbone)
    features, hidden = maker(backbone, tuple(input_hw), tcfg)
    num_features = getattr(features, "num_features", None)
    if num_features is None:
        raise ConfigError(f"backbone '{backbone}' does not report num_features")
    return BoneAgeNet(features, int(num_features), hidden, head, sex_mode, tcfg.dropout, tcfg.input_norm)


def month_grid(device=None) -> torch.Tensor:
    return torch.arange(1, N_CLASSES + 1, dtype=torch.float32, device=device)


def decode_output(out: torch.Tensor, head: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw network output -> (bone age in months (B,), distribution SD in months (B,) or None)."""
    out = out.float()
    if head == "reg":
        return target_to_age(out[:, 0]), None
    p = out.softmax(dim=1)
    k = month_grid(out.device)
    mean = p @ k
    var = (p * (k.view(1, -1) - mean.view(-1, 1)) ** 2).sum(dim=1)
    return mean, var.clamp_min(0).sqrt()


def soft_month_labels(age_months: torch.Tensor, sigma_months: float) -> torch.Tensor:
    """A discretised Gaussian over the months 1..240 centred on each true age (rows sum to 1)."""
    k = month_grid(age_months.device)
    logits = -0.5 * ((k.view(1, -1) - age_months.float().view(-1, 1)) / max(sigma_months, 1e-3)) ** 2
    return logits.softmax(dim=1)


def bone_age_loss(out: torch.Tensor, age_months: torch.Tensor, head: str, tcfg) -> torch.Tensor:
    """Training loss.

    reg: MAE on y = age / 120 - 1.
    cls: `cls_ce_weight` x cross-entropy against a soft label (a Gaussian of SD
    `cls_label_sigma_months` around the true month) + `cls_mae_weight` x MAE of the expected value
    in the same scaled units as reg. Why: the hard one-hot cross-entropy treats a 1-month miss like
    a 100-month miss and gives only one target logit a pull, while the labels themselves carry
    several months of reader noise; the soft label encodes the order of the classes and that noise,
    and keeps the predicted distribution unimodal and its width meaningful (reported as
    `pred_width`). The expectation's MAE optimises the metric itself, as the regression head does;
    alone it leaves the distribution's shape free (often multimodal), hence the sum.
    """
    out = out.float()
    age = age_months.float()
    if head == "reg":
        return (out[:, 0] - age_to_target(age)).abs().mean()
    logp = out.log_softmax(dim=1)
    ce = -(soft_month_labels(age, tcfg.cls_label_sigma_months) * logp).sum(dim=1).mean()
    expected = logp.exp() @ month_grid(out.device)
    mae = ((expected - age).abs() / MONTHS_SCALE).mean()
    return tcfg.cls_ce_weight * ce + tcfg.cls_mae_weight * mae
