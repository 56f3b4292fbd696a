"""Stage 6: train the grid of bone age networks over the folds, and predict out of fold.

The grid is `train.regions x train.heads x train.sex_modes x train.backbones`; each cell is a
`ModelSpec` named `{head}_{region}_{sex_mode}_{backbone}` (e.g. `cls_C_female_vgg`).

Per model and fold k, in `work/models/{model}/fold{k}/`:

- `last.pt`  resume state: model, optimizer, scheduler state dicts, the epoch finished, best MAE;
  written atomically after every epoch and deleted once the fold is done;
- `best.pt`  the model's state dict at the epoch of lowest validation MAE (the fold's own rows);
- `metrics.jsonl` one JSON line per epoch; `train_ids.txt` the ids the fold trained on;
- `pred_val.csv`, `pred_test.csv`, `pred_holdout.csv` (`id,pred,width`) from `best.pt`;
- `done.json`  written last; a fold with it is skipped on rerun (unless `force`).

When every fold of a model is done, `oof/{model}.csv` (`id,fold,sex,boneage,pred`),
`oof/{model}.test.csv` (`id,sex,pred,pred_std[,pred_width]`) and, with hold-out rows,
`oof/{model}.holdout.csv` (`id,sex,boneage,pred,pred_std[,pred_width]`) are assembled from the
folds' prediction files. `female` / `male` models train, validate and predict on that sex only.

Fold discipline: fold k trains on rows with `fold != k` and `fold >= 0` (hold-out rows, fold -1,
are never trained on) and predicts the rows of fold k, so each out-of-fold prediction comes from
the one model that did not see it.

Spreading the work: each (model, fold) is an independent job (`--set train.only_models=[NAME]
--fold K`); they share nothing but the files above, so they can run on different GPUs at once;
a last run without `--fold` finds every fold done and assembles the oof files. Data parallel
training of one job over several GPUs: `torchrun --nproc_per_node=N src/06_train.py ...`
(DistributedDataParallel, a DistributedSampler per epoch, `train.batch_size` per GPU; rank 0
writes every file; predictions are sharded and gathered once per pass).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from boneage.errors import ConfigError, StageInputError
from boneage.fileio import atomic_write_csv, atomic_write_json, atomic_write_text
from boneage.folds import read_folds as read_folds_file
from boneage.models import HEADS, SEX_MODES, bone_age_loss, build_model, decode_output
from boneage.registration import BASELINE_INPUTS, input_hw

log = logging.getLogger(__name__)

REGIONS = ("A", "B", "C", *BASELINE_INPUTS)  # plus the ablation's whole radiographs, raw and clean (issue 8)


# ---------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class ModelSpec:
    name: str
    region: str
    head: str
    sex_mode: str
    backbone: str


def model_name(head: str, region: str, sex_mode: str, backbone: str) -> str:
    return f"{head}_{region}_{sex_mode}_{backbone}"


def list_model_specs(cfg) -> list[ModelSpec]:
    """Every model of the grid (filtered by `train.only_models` when that is set)."""
    t = cfg.train
    for r in t.regions:
        if r not in REGIONS:
            raise ConfigError(f"train.regions: '{r}' is not one of {', '.join(REGIONS)}")
    for h in t.heads:
        if h not in HEADS:
            raise ConfigError(f"train.heads: '{h}' is not one of {', '.join(HEADS)}")
    for s in t.sex_modes:
        if s not in SEX_MODES:
            raise ConfigError(f"train.sex_modes: '{s}' is not one of {', '.join(SEX_MODES)}")
    specs = [ModelSpec(model_name(h, r, s, b), r, h, s, b)
             for r, h, s, b in itertools.product(t.regions, t.heads, t.sex_modes, t.backbones)]
    if t.only_models:
        names = {s.name for s in specs}
        unknown = [m for m in t.only_models if m not in names]
        if unknown:
            raise ConfigError(f"train.only_models: {', '.join(unknown)} not in the grid ({', '.join(sorted(names))})")
        specs = [s for s in specs if s.name in t.only_models]
    return specs


def region_hw(cfg, region: str) -> tuple[int, int]:
    return input_hw(cfg.register, region)


def crop_path(cfg, region: str, image_id: str) -> Path:
    return cfg.work_path / "crops" / region / f"{image_id}.png"


def build_spec_model(spec: ModelSpec, cfg) -> torch.nn.Module:
    return build_model(spec.backbone, spec.head, spec.sex_mode, region_hw(cfg, spec.region), cfg.train)


# ---------------------------------------------------------------------------------------------
# Data


def build_train_transform(tcfg) -> A.Compose:
    """Zoom, rotation, shift (one affine, black fill like the cleaned background), gamma, brightness, then a loss of
    resolution (shrunk and enlarged back) and JPEG compression, each with its probability."""
    t: list = []
    if tcfg.aug_zoom > 0 or tcfg.aug_rotate_deg > 0 or tcfg.aug_shift > 0:
        s = tcfg.aug_shift
        t.append(A.Affine(scale=(1 - tcfg.aug_zoom, 1 + tcfg.aug_zoom), translate_percent={"x": (-s, s), "y": (-s, s)},
                          rotate=(-tcfg.aug_rotate_deg, tcfg.aug_rotate_deg), border_mode=cv2.BORDER_CONSTANT,
                          fill=0, p=1.0))
    g0, g1 = tcfg.aug_gamma
    if g0 < 1.0 or g1 > 1.0:
        t.append(A.RandomGamma(gamma_limit=(g0 * 100, g1 * 100), p=0.5))
    if tcfg.aug_brightness > 0:
        t.append(A.RandomBrightnessContrast(brightness_limit=tcfg.aug_brightness,
                                            contrast_limit=tcfg.aug_brightness, p=0.5))
    d0, d1 = tcfg.aug_downscale
    q0, q1 = tcfg.aug_jpeg_quality
    if not (0 < d0 <= d1 <= 1) or not (1 <= q0 <= q1 <= 100):
        raise ConfigError(f"train.aug_downscale must be 0 < lo <= hi <= 1 and train.aug_jpeg_quality 1 <= lo <= hi <= "
                          f"100, got {list(tcfg.aug_downscale)} and {list(tcfg.aug_jpeg_quality)}")
    if d0 < 1.0 and tcfg.aug_downscale_p > 0:
        t.append(A.Downscale(scale_range=(d0, min(d1, 0.99)), p=tcfg.aug_downscale_p,
                             interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}))
    if q0 < 100 and tcfg.aug_jpeg_p > 0:
        t.append(A.ImageCompression(quality_range=(int(q0), int(q1)), p=tcfg.aug_jpeg_p))
    return A.Compose(t)


def read_crop(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """A crop PNG as uint8 (H, W), resized to `hw` if stage 4 wrote another size."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise StageInputError(f"{path}: region crop missing or unreadable (run stage 4, 04_register)")
    return fit_crop(img, hw)


def fit_crop(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.shape != tuple(hw):
        img = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    return img


class CropDataset(Dataset):
    """Region crops read from disk; items are (image (1, H, W) uint8, male, age, index). The image stays 8-bit
    until it reaches the device (`_to_device` scales it to [0, 1]): a quarter of the bytes through the
    workers' shared memory and the host-to-GPU copy."""

    def __init__(self, paths: list[Path], male, age, hw: tuple[int, int], transform=None):
        self.paths = [Path(p) for p in paths]
        self.male = np.asarray(male, dtype=np.float32)
        n = len(self.paths)
        self.age = np.asarray(age, dtype=np.float32) if age is not None else np.full(n, np.nan, np.float32)
        self.hw = hw
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = read_crop(self.paths[i], self.hw)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        if img.dtype != np.uint8:  # every transform of build_train_transform keeps 8-bit images 8-bit
            raise TypeError(f"{self.paths[i]}: augmented crop is {img.dtype}, expected uint8")
        x = torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0)
        return x, torch.tensor(self.male[i]), torch.tensor(self.age[i]), i


def make_loader(ds: Dataset, tcfg, device: torch.device, shuffle: bool, sampler=None, drop_last: bool = False,
                batch_size: int | None = None) -> DataLoader:
    workers = max(0, int(tcfg.num_workers))
    return DataLoader(ds, batch_size=batch_size or tcfg.batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      drop_last=drop_last and len(ds) > (batch_size or tcfg.batch_size),
                      persistent_workers=workers > 0)


# ---------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    raise ConfigError(f"train.optimizer must be 'adam' or 'adamw', got '{tcfg.optimizer}'")


def make_scheduler(opt: torch.optim.Optimizer, tcfg, total_steps: int):
    total_steps = max(1, total_steps)
    if tcfg.schedule == "onecycle":  # torch's one-cycle needs a few steps per phase; tiny runs stop early
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=max(total_steps, 8),
                                                   pct_start=0.25)
    if tcfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=tcfg.lr * 0.01)
    raise ConfigError(f"train.schedule must be 'onecycle' or 'cosine', got '{tcfg.schedule}'")


def _autocast(device: torch.device, tcfg):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=bool(tcfg.amp) and device.type == "cuda")


def _to_device(x: torch.Tensor, device: torch.device, tcfg) -> torch.Tensor:
    """A batch on the device as float in [0, 1] (8-bit batches are scaled there), channels-last if configured."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if tcfg.channels_last:  # on CUDA and on the CPU alike (about 2x faster convolutions on 2 cores)
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(model, loader, opt, sched, head: str, tcfg, device: torch.device) -> float:
    """One pass over `loader`; the scheduler steps per batch. Returns the mean loss."""
    model.train()
    total, n = torch.zeros((), device=device), 0  # summed on the device: no host sync per batch
    for x, male, age, _ in loader:
        x = _to_device(x, device, tcfg)
        male, age = male.to(device, non_blocking=True), age.to(device, non_blocking=True)
        with _autocast(device, tcfg):
            out = model(x, male)
        loss = bone_age_loss(out, age, head, tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach().float() * len(x)
        n += len(x)
    return float(total) / max(n, 1)


def _zoom(x: torch.Tensor, scale: float, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    """Zoom a batch about its centre (scale > 1 enlarges) and shift it by (dx, dy) of its width and height,
    black outside."""
    if scale == 1.0 and dx == 0.0 and dy == 0.0:
        return x
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -2.0 * dx / scale, -2.0 * dy / scale  # normalised coordinates span 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def tta_views(tcfg) -> list[tuple[float, float, float]]:
    """(scale, dx, dy) of each test-time view: the identity without `train.tta`; with it, every scale of
    `train.tta_scales` times the unshifted crop and, when `train.tta_shift` > 0, the crop shifted diagonally by that
    share of its size in the four directions. Averaging over small moves of the crop smooths the networks' steep
    response to a pixel's difference in registration (issue 11: a 1-3 px move of the crop moved the cpu-profile
    blend by 1.6 months median, 0.8 with these five views; a 3 x 3 grid did no better, at twice the cost)."""
    if not tcfg.tta:
        return [(1.0, 0.0, 0.0)]
    d = float(tcfg.tta_shift)
    shifts = [(0.0, 0.0)] + ([(a, b) for a in (-d, d) for b in (-d, d)] if d > 0 else [])
    scales = list(tcfg.tta_scales)
    return [(float(s), a, b) for s in scales for a, b in shifts]


@torch.inference_mode()
def predict_batch(model, x: torch.Tensor, male: torch.Tensor, head: str, tcfg, device: torch.device):
    """Months (B,) and cls width (B,) or None, averaged over the TTA views (`tta_views`). Views run together in
    forward passes of at most max(B, 64) images (one pass for a single crop; a loader's batch does not grow)."""
    model.eval()
    x = _to_device(x, device, tcfg)
    male = male.to(device)
    views = tta_views(tcfg)
    per_pass = max(1, 64 // len(x))
    months, widths = [], []
    for k in range(0, len(views), per_pass):
        chunk = views[k:k + per_pass]
        xs = torch.cat([_zoom(x, s, a, b) for s, a, b in chunk]) if len(chunk) > 1 else _zoom(x, *chunk[0])
        with _autocast(device, tcfg):
            out = model(xs, male.repeat(len(chunk)))
        m, w = decode_output(out, head)
        months.append(m.float().view(len(chunk), len(x)))
        widths.append(None if w is None else w.float().view(len(chunk), len(x)))
    m = torch.cat(months).mean(0).cpu().numpy()
    w = None if widths[0] is None else torch.cat(widths).mean(0).cpu().numpy()
    return m, w


def predict_loader(model, loader, head: str, tcfg, device: torch.device):
    """(indices, months, widths) over a loader in eval mode; widths are NaN for reg."""
    idx, months, widths = [], [], []
    for x, male, _, i in loader:
        m, w = predict_batch(model, x, male, head, tcfg, device)
        idx.append(np.asarray(i))
        months.append(m)
        widths.append(w if w is not None else np.full(len(m), np.nan, np.float32))
    if not idx:
        return np.zeros(0, int), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(idx), np.concatenate(months), np.concatenate(widths)


# ---------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun) helpers; a plain run is world size 1


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device_name: str) -> tuple[DistContext, torch.device | None]:
    """Under torchrun (WORLD_SIZE > 1) join the process group; returns the context and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), None
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistContext(rank, world, local), device


def predict_dataset(model, ds: Dataset, head: str, tcfg, device, ctx: DistContext):
    """Predict every item of `ds`, sharded over ranks and gathered once; returns arrays in ds order."""
    if len(ds) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    sampler = None
    if ctx.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=False)
    loader = make_loader(ds, tcfg, device, shuffle=False, sampler=sampler, batch_size=tcfg.batch_size * 2)
    idx, months, widths = predict_loader(model, loader, head, tcfg, device)
    if ctx.enabled:
        parts = [None] * ctx.world
        torch.distributed.all_gather_object(parts, (idx, months, widths))
        idx = np.concatenate([p[0] for p in parts])
        months = np.concatenate([p[1] for p in parts])
        widths = np.concatenate([p[2] for p in parts])
    out_m = np.full(len(ds), np.nan, np.float32)
    out_w = np.full(len(ds), np.nan, np.float32)
    out_m[idx], out_w[idx] = months, widths  # padded duplicates write the same value twice
    return out_m, out_w


# ---------------------------------------------------------------------------------------------
# One fold


def _save_state(path: Path, state: dict) -> None:
    """torch.save to a temporary file, renamed into place (a kill mid-write leaves the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def _frame(ids, male, age, cfg, region: str) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "male": male, "boneage": age,
                         "path": [crop_path(cfg, region, i) for i in ids]})


def _dataset(df: pd.DataFrame, hw, transform=None) -> CropDataset:
    age = df["boneage"].to_numpy(dtype=np.float32) if "boneage" in df else None
    return CropDataset(list(df["path"]), df["male"].to_numpy(dtype=np.float32), age, hw, transform)


def train_fold(spec: ModelSpec, cfg, fold: int, train_rows: pd.DataFrame, val_rows: pd.DataFrame,
               predict_sets: dict[str, pd.DataFrame], fold_dir: Path, device: torch.device,
               ctx: DistContext | None = None, hooks: dict | None = None) -> dict:
    """Train one fold (resuming from `last.pt`), keep the best epoch, predict the given sets."""
    ctx = ctx or DistContext()
    hooks = hooks or {}
    tcfg = cfg.train
    hw = region_hw(cfg, spec.region)
    fold_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        atomic_write_text(fold_dir / "train_ids.txt", "\n".join(train_rows["id"]) + "\n")
    torch.manual_seed(cfg.seed * 1000 + fold)
    np.random.seed(cfg.seed * 1000 + fold)

    model = build_spec_model(spec, cfg).to(device)
    if tcfg.channels_last:  # on CUDA and on the CPU alike (about 2x faster convolutions on 2 cores)
        model = model.to(memory_format=torch.channels_last)
    train_ds = _dataset(train_rows, hw, build_train_transform(tcfg))
    val_ds = _dataset(val_rows, hw)
    sampler = None
    if ctx.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed + fold, drop_last=True)
    loader = make_loader(train_ds, tcfg, device, shuffle=True, sampler=sampler, drop_last=True)
    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg, tcfg.epochs * len(loader))

    start_epoch, best_mae = 0, float("inf")
    last = fold_dir / "last.pt"
    if last.exists():
        state = load_state(last, device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best_mae = int(state["epoch"]), float(state["best_mae"])
        log.info("%s fold %d: resuming after epoch %d (best val MAE %.2f)", spec.name, fold, start_epoch, best_mae)

    train_model = model
    if ctx.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile:
        train_model = torch.compile(train_model)

    epoch_cfg = replace(tcfg, tta=False)  # the per-epoch model choice reads one view; the saved predictions all
    for epoch in range(start_epoch, tcfg.epochs):
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss = train_one_epoch(train_model, loader, opt, sched, spec.head, tcfg, device)
        pred, _ = predict_dataset(model, val_ds, spec.head, epoch_cfg, device, ctx)
        val_mae = float(np.mean(np.abs(pred - val_rows["boneage"].to_numpy()))) if len(val_ds) else float("nan")
        improved = len(val_ds) == 0 or val_mae < best_mae
        if improved:
            best_mae = val_mae if len(val_ds) else best_mae
        if ctx.is_main:
            if improved:
                _save_state(fold_dir / "best.pt", model.state_dict())
            record = {"epoch": epoch + 1, "train_loss": round(loss, 5), "val_mae": round(val_mae, 3),
                      "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2),
                      "best": improved}
            with open(fold_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            _save_state(last, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "epoch": epoch + 1, "best_mae": best_mae})
        ctx.barrier()
        log.info("%s fold %d epoch %d/%d: loss %.4f, val MAE %.2f months%s", spec.name, fold, epoch + 1,
                 tcfg.epochs, loss, val_mae, " (best)" if improved else "")
        if "after_epoch" in hooks:
            hooks["after_epoch"](spec, fold, epoch + 1)

    best_path = fold_dir / "best.pt"
    if best_path.exists():
        model.load_state_dict(load_state(best_path, device))
    for key, rows in predict_sets.items():
        pred, width = predict_dataset(model, _dataset(rows, hw), spec.head, tcfg, device, ctx)
        if ctx.is_main:
            atomic_write_csv(fold_dir / f"pred_{key}.csv", pd.DataFrame({"id": rows["id"].to_numpy(),
                                                                         "pred": pred, "width": width}))
    summary = {"model": spec.name, "fold": fold, "best_val_mae": best_mae, "epochs": tcfg.epochs,
               "n_train": len(train_rows), "n_val": len(val_rows)}
    if ctx.is_main:
        atomic_write_json(fold_dir / "done.json", summary)
        last.unlink(missing_ok=True)
    ctx.barrier()
    return summary


# ---------------------------------------------------------------------------------------------
# Every fold of every model


def _sex_subset(df: pd.DataFrame, sex_mode: str) -> pd.DataFrame:
    if sex_mode == "female":
        return df[~df["male"].astype(bool)]
    if sex_mode == "male":
        return df[df["male"].astype(bool)]
    return df


def _sex_letter(male) -> np.ndarray:
    return np.where(np.asarray(male, dtype=bool), "M", "F")


def check_crops(cfg, region: str, ids) -> None:
    missing = [crop_path(cfg, region, i) for i in ids if not crop_path(cfg, region, i).exists()]
    if missing:
        raise StageInputError(f"{missing[0]}: region crop missing ({len(missing)} of {len(ids)} for region "
                              f"{region}; run stage 4, 04_register)")


def read_folds(cfg) -> pd.DataFrame:
    """The run's `folds.csv` (see `boneage.folds.read_folds`)."""
    return read_folds_file(cfg.folds_path / "folds.csv")


def _merge_folds(train_df: pd.DataFrame, folds_df: pd.DataFrame) -> pd.DataFrame:
    folds = folds_df[["id", "fold", "holdout"]].copy()
    folds["id"] = folds["id"].astype(str)
    df = train_df[["id", "male", "boneage"]].copy()
    df["id"] = df["id"].astype(str)
    df = df.merge(folds, on="id", how="left")
    if df["fold"].isna().any():
        missing = df.loc[df["fold"].isna(), "id"].tolist()
        raise StageInputError(f"folds.csv has no row for {len(missing)} training ids (e.g. {missing[0]}); "
                              "rerun stage 5 (05_folds) after the labels changed")
    df["fold"] = df["fold"].astype(int)
    df.loc[df["holdout"].astype(bool), "fold"] = -1
    return df


def train_model(spec: ModelSpec, cfg, labelled: pd.DataFrame, test_df: pd.DataFrame, device: torch.device,
                force: bool = False, only_folds: list[int] | None = None, ctx: DistContext | None = None,
                hooks: dict | None = None) -> bool:
    """Train the folds of one model; assemble its oof files when every fold is done. True when assembled."""
    ctx = ctx or DistContext()
    model_dir = cfg.work_path / "models" / spec.name
    lab = _sex_subset(labelled, spec.sex_mode)
    test = _sex_subset(test_df, spec.sex_mode)
    folds = sorted(int(f) for f in labelled["fold"].unique() if f >= 0)
    for k in folds:
        if only_folds and k not in only_folds:
            continue
        fold_dir = model_dir / f"fold{k}"
        if force and ctx.is_main and fold_dir.exists():
            shutil.rmtree(fold_dir)
        ctx.barrier()
        train_rows = lab[(lab["fold"] >= 0) & (lab["fold"] != k)]
        val_rows = lab[lab["fold"] == k]
        _check_same_split(fold_dir, train_rows["id"])
        if (fold_dir / "done.json").exists():
            log.info("%s fold %d: done, skipped", spec.name, k)
            continue
        if len(train_rows) == 0:
            raise StageInputError(f"{spec.name} fold {k}: no training radiographs (sex mode {spec.sex_mode}); "
                                  "check folds.csv and the labels")
        sets = {"val": val_rows, "test": test, "holdout": lab[lab["fold"] < 0]}
        train_fold(spec, cfg, k, _frame_of(train_rows, cfg, spec), _frame_of(val_rows, cfg, spec),
                   {key: _frame_of(v, cfg, spec) for key, v in sets.items()}, fold_dir, device, ctx, hooks)
    if not all((model_dir / f"fold{k}" / "done.json").exists() for k in folds):
        log.info("%s: some folds are not done yet; oof files are written once all are", spec.name)
        return False
    if ctx.is_main:
        assemble_oof(spec, cfg, lab, test, folds)
    ctx.barrier()
    return True


def _check_same_split(fold_dir: Path, train_ids: pd.Series) -> None:
    """Refuse to resume or reuse a fold trained on other radiographs (folds.csv changed since): its
    out-of-fold predictions would leak. The user decides with --force, which retrains the fold."""
    record = fold_dir / "train_ids.txt"
    if not record.exists():
        return
    before = set(record.read_text().split())
    if before != set(map(str, train_ids)):
        raise StageInputError(f"{fold_dir}: this fold was trained on a different split ({len(before)} ids) than "
                              f"folds.csv now gives ({len(train_ids)} ids); rerun stage 6 with --force to retrain")


def _frame_of(rows: pd.DataFrame, cfg, spec: ModelSpec) -> pd.DataFrame:
    age = rows["boneage"].to_numpy() if "boneage" in rows else np.full(len(rows), np.nan)
    return _frame(rows["id"].astype(str).to_numpy(), rows["male"].astype(bool).to_numpy(), age, cfg, spec.region)


def assemble_oof(spec: ModelSpec, cfg, lab: pd.DataFrame, test: pd.DataFrame, folds: list[int]) -> None:
    model_dir = cfg.work_path / "models" / spec.name
    out = cfg.oof_path
    parts = []
    for k in folds:
        p = pd.read_csv(model_dir / f"fold{k}" / "pred_val.csv", dtype={"id": str})
        p["fold"] = k
        parts.append(p)
    val = pd.concat(parts, ignore_index=True)
    oof = lab[lab["fold"] >= 0][["id", "fold", "male", "boneage"]].merge(val[["id", "fold", "pred"]],
                                                                        on=["id", "fold"], how="left")
    if oof["pred"].isna().any():
        raise StageInputError(f"{model_dir}: out-of-fold predictions missing for {int(oof['pred'].isna().sum())} ids;"
                              " rerun 06_train with --force for this model")
    oof["sex"] = _sex_letter(oof["male"])
    atomic_write_csv(out / f"{spec.name}.csv", oof[["id", "fold", "sex", "boneage", "pred"]])

    def fold_mean(key: str, rows: pd.DataFrame, with_age: bool) -> pd.DataFrame:
        preds = [pd.read_csv(model_dir / f"fold{k}" / f"pred_{key}.csv", dtype={"id": str}).set_index("id")
                 .reindex(rows["id"].astype(str)) for k in folds]
        p = np.stack([x["pred"].to_numpy(dtype=float) for x in preds])
        w = np.stack([x["width"].to_numpy(dtype=float) for x in preds])
        df = pd.DataFrame({"id": rows["id"].astype(str).to_numpy(), "sex": _sex_letter(rows["male"])})
        if with_age:
            df["boneage"] = rows["boneage"].to_numpy()
        df["pred"] = p.mean(0) if len(rows) else []
        df["pred_std"] = p.std(0) if len(rows) else []
        if spec.head == "cls":
            df["pred_width"] = w.mean(0) if len(rows) else []
        return df

    atomic_write_csv(out / f"{spec.name}.test.csv", fold_mean("test", test, False))
    hold = lab[lab["fold"] < 0]
    if len(hold):
        atomic_write_csv(out / f"{spec.name}.holdout.csv", fold_mean("holdout", hold, True))
    mae = float(np.mean(np.abs(oof["pred"] - oof["boneage"])))
    log.info("%s: out-of-fold MAE %.2f months over %d radiographs", spec.name, mae, len(oof))


def train_all(cfg, train_df: pd.DataFrame, test_df: pd.DataFrame, folds_df: pd.DataFrame, force: bool = False,
              only_folds: list[int] | None = None, device: torch.device | None = None,
              hooks: dict | None = None) -> list[str]:
    """Train every model of the grid on every fold; returns the names whose oof files are complete.

    `train_df`: id, male, boneage; `test_df`: id, male; `folds_df`: id, fold, holdout.
    """
    from boneage.runtime import select_device

    ctx, ddp_device = init_distributed(cfg.device)
    device = ddp_device or device or select_device(cfg.device)
    labelled = _merge_folds(train_df, folds_df)
    test = test_df[["id", "male"]].copy()
    test["id"] = test["id"].astype(str)
    specs = list_model_specs(cfg)
    for region in sorted({s.region for s in specs}):
        check_crops(cfg, region, list(labelled["id"]) + list(test["id"]))
    only = only_folds if only_folds is not None else list(cfg.train.only_folds)
    done = []
    for spec in specs:
        log.info("model %s (%d of %d)", spec.name, specs.index(spec) + 1, len(specs))
        if train_model(spec, cfg, labelled, test, device, force, only, ctx, hooks):
            done.append(spec.name)
    return done


# ---------------------------------------------------------------------------------------------
# Inference for other stages (predict.py, the report)


def load_fold_models(work_dir: Path, spec: ModelSpec, cfg, device) -> list[torch.nn.Module]:
    """Every fold's best weights of one model, in eval mode (state dicts only, no pickle)."""
    model_dir = Path(work_dir) / "models" / spec.name
    # only finished folds (done.json): a fold still training has a best.pt that may change
    paths = sorted((d / "best.pt" for d in model_dir.glob("fold*") if (d / "done.json").exists()),
                   key=lambda p: int(p.parent.name[4:]))
    if not paths:
        raise StageInputError(f"{model_dir}: no finished folds found; run stage 6, 06_train")
    models = []
    for p in paths:
        m = build_spec_model(spec, cfg)
        m.load_state_dict(load_state(p, "cpu"))
        models.append(m.to(device).eval())
    return models


def predict_crop(models: list[torch.nn.Module], crop: np.ndarray, male: bool, spec: ModelSpec, cfg, device) -> dict:
    """One region crop (uint8 2-D) -> {"pred": fold-mean months, "pred_std": SD over folds,
    "pred_width": mean cls distribution SD in months, or None for reg}."""
    img = fit_crop(np.asarray(crop), region_hw(cfg, spec.region))
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.uint8)).view(1, 1, *img.shape)
    sex = torch.tensor([1.0 if male else 0.0])
    preds, widths = [], []
    for m in models:
        p, w = predict_batch(m, x, sex, spec.head, cfg.train, torch.device(device))
        preds.append(float(p[0]))
        if w is not None:
            widths.append(float(w[0]))
    return {"pred": float(np.mean(preds)), "pred_std": float(np.std(preds)),
            "pred_width": float(np.mean(widths)) if widths else None}
