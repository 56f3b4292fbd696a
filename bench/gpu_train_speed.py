"""Training speed of the paper's VGG network (stage 6), for one run on a GPU (about 3-4 minutes on an H100).

(1) pure compute: synthetic tensors already on the GPU, batch 64, forward + backward + AdamW step,
    at the full-profile region sizes A 520x400, B 300x300, C 480x800 (height x width), bf16
    autocast + channels-last against fp32;
(2) the real training loop of `boneage.training` (CropDataset reading PNG crops from disk,
    albumentations augmentation, DataLoader with workers and pinned memory, `train_one_epoch`)
    on random crops written to a temporary folder first, with and without bf16 + channels-last,
    and the DataLoader alone (no model), to tell a loader bound from a compute bound.

Prints a table and writes `gpu_train_speed.json` to $OUT (or --out) when set.

    python bench/gpu_train_speed.py                       # on the GPU box (the lead runs it once)
    python bench/gpu_train_speed.py --device cpu --profile cpu --threads 2   # small sizes, 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import torch

from boneage.config import load_config
from boneage.models import bone_age_loss, build_model

SIZES = {"full": {"A": (520, 400), "B": (300, 300), "C": (480, 800)},
         "cpu": {"A": (256, 200), "B": (192, 192), "C": (144, 256)}}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compute_bound(hw, tcfg, device, batch: int, fast: bool, seconds: float) -> float:
    """Images per second of forward + backward + optimizer step on tensors already on the device."""
    model = build_model("vgg", "reg", "sex_input", hw, tcfg).to(device)
    x = torch.rand(batch, 1, *hw, device=device)
    if fast and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    male = (torch.rand(batch, device=device) > 0.5).float()
    age = torch.rand(batch, device=device) * 240
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=fast and device.type == "cuda"):
            out = model(x, male)
        loss = bone_age_loss(out, age, "reg", tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
        if n % 5 == 0:
            sync(device)
    sync(device)
    return n * batch / (time.perf_counter() - t0)


def write_crops(folder: Path, hw, n: int) -> list[Path]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (hw[0] // 8 + 1, hw[1] // 8 + 1), dtype=np.uint8)
    paths = []
    for i in range(n):  # smooth random images (PNG sizes like real crops, not incompressible noise)
        img = cv2.resize(np.roll(base, i, axis=1), (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        p = folder / f"{i}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def crop_loader(paths, hw, t, device):
    """The training DataLoader of stage 6 over `paths`, with random sexes and ages."""
    from boneage.training import CropDataset, build_train_transform, make_loader

    rng = np.random.default_rng(1)
    ds = CropDataset(paths, rng.integers(0, 2, len(paths)), rng.uniform(1, 240, len(paths)), hw,
                     build_train_transform(t))
    return make_loader(ds, t, device, shuffle=True, drop_last=True)


def loader_only(paths, hw, cfg, device) -> float:
    """Images per second the real DataLoader delivers (read, augment, collate, pin, copy to the device), no model."""
    from boneage.training import _to_device

    t = cfg.train
    loader = crop_loader(paths, hw, t, device)
    for x, *_ in loader:  # warm-up epoch: workers start
        _to_device(x, device, t)
    sync(device)
    t0, n = time.perf_counter(), 0
    for x, *_ in loader:
        _to_device(x, device, t)
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def real_loop(paths, hw, cfg, device, fast: bool, epochs: int) -> float:
    """Images per second of `train_one_epoch` over PNG crops read by the real DataLoader (first epoch: warm-up)."""
    from boneage.training import make_optimizer, make_scheduler, train_one_epoch

    t = cfg.train
    t.amp, t.channels_last = fast, fast
    loader = crop_loader(paths, hw, t, device)
    model = build_model("vgg", "reg", "sex_input", hw, t).to(device)
    if fast and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, t)
    sched = make_scheduler(opt, t, (epochs + 1) * len(loader))
    train_one_epoch(model, loader, opt, sched, "reg", t, device)  # warm-up: workers start, cudnn picks kernels
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        train_one_epoch(model, loader, opt, sched, "reg", t, device)
    sync(device)
    return epochs * len(loader) * t.batch_size / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", default="full", choices=list(SIZES))
    ap.add_argument("--regions", default="A,B,C")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per compute-bound figure")
    ap.add_argument("--n-crops", type=int, default=1024, help="PNG crops per size for the real loop")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs of the real loop (after one warm-up)")
    ap.add_argument("--repeat", type=int, default=4,
                    help="each crop appears this many times per epoch (epochs as long as a real one's, so that the "
                         "loader's start at each epoch does not dominate; written once, read from the page cache)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                    help="config overrides, e.g. train.vgg_width=0.25 for the cpu profile's network")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("CUDA is not available; use --device cpu")
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"train.batch_size={args.batch}", f"train.num_workers={args.workers}", *args.overrides])
    regions = args.regions.split(",")
    modes = [("bf16+channels_last", True), ("fp32", False)] if device.type == "cuda" else [("fp32", False)]
    rows = []
    t_start = time.perf_counter()
    for r in regions:
        hw = SIZES[args.profile][r]
        for label, fast in modes:
            ips = compute_bound(hw, cfg.train, device, args.batch, fast, args.seconds)
            rows.append({"part": "compute", "region": r, "hw": list(hw), "mode": label, "img_per_s": round(ips, 1)})
            print(f"compute  {r} {hw[0]}x{hw[1]:<4} {label:<20} {ips:8.1f} img/s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.skip_real:
        try:
            import albumentations  # noqa: F401
            import cv2  # noqa: F401
        except ImportError as exc:
            print(f"real loop skipped: {exc} (install requirements.txt)")
            args.skip_real = True
    if not args.skip_real:
        with tempfile.TemporaryDirectory() as tmp:
            for r in regions:
                hw = SIZES[args.profile][r]
                t0 = time.perf_counter()
                paths = write_crops(Path(tmp) / r, hw, args.n_crops)
                print(f"  wrote {len(paths)} crops {hw[0]}x{hw[1]} in {time.perf_counter() - t0:.1f} s", flush=True)
                paths = paths * max(1, args.repeat)
                ips = loader_only(paths, hw, cfg, device)
                rows.append({"part": "loader_only", "region": r, "hw": list(hw), "mode": "uint8 to device",
                             "img_per_s": round(ips, 1), "workers": args.workers})
                print(f"loader   {r} {hw[0]}x{hw[1]:<4} {'no model':<20} {ips:8.1f} img/s", flush=True)
                for label, fast in modes:
                    ips = real_loop(paths, hw, cfg, device, fast, args.epochs)
                    rows.append({"part": "real_loop", "region": r, "hw": list(hw), "mode": label,
                                 "img_per_s": round(ips, 1), "workers": args.workers})
                    print(f"real     {r} {hw[0]}x{hw[1]:<4} {label:<20} {ips:8.1f} img/s", flush=True)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
            "profile": args.profile, "overrides": args.overrides,
            "seconds_total": round(time.perf_counter() - t_start, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    print("\n| part | region | size | mode | img/s |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        size = f"{row['hw'][0]}x{row['hw'][1]}"
        print(f"| {row['part']} | {row['region']} | {size} | {row['mode']} | {row['img_per_s']} |")
    print(f"{info['device']}, torch {info['torch']}, {info['seconds_total']} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_train_speed.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
