"""Speed of stage 1 inference plus stage 2 on real radiographs (issue 4): read, U-Net masks with stage 1's own
post-processing and retries (`boneage.segmentation.predict_masks`), clean (`boneage.masks.clean_radiograph`), PNG
encode of mask and clean image, in batches of `segment.predict_batch_size`, post-processing in
`segment.post_workers` threads and stage 2 in `clean.workers` threads (as stages 1 and 2 run them).

    .venv/bin/python bench/stage12_speed.py --unet WORK/models/unet --images ../shared/data/rsna-half/images \
        [--n 100] [--config configs/cpu.yaml] [--set key=value ...] [--device cpu|cuda] [--threads 2] [--out F.json]

The U-Net's `unet.pt` may be stored in half precision (to travel to a GPU box lighter): it is loaded into the
fp32 model. Prints one JSON line: images/s, ms per image per step, peak RSS and, on CUDA, peak GPU memory.
`--set segment.predict_batch_size=64 --set segment.amp=false` compare batch sizes and bf16 against fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from boneage.config import load_config  # noqa: E402
from boneage.fileio import atomic_write_text, read_gray  # noqa: E402


def encode_pair(mask_clean) -> None:
    """PNG-encode a mask and its clean radiograph, as stages 1 and 2 write them."""
    cv2.imencode(".png", mask_clean[0].astype(np.uint8) * 255)
    cv2.imencode(".png", mask_clean[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", required=True, type=Path, help="folder with unet.pt (a work dir's models/unet)")
    ap.add_argument("--images", required=True, type=Path, help="folder of radiographs (.jpg or .png)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="batches run once before timing (CUDA kernels, caches)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import boneage.segmentation as seg

    net_s = [0.0]
    probs_fn = seg.predict_probs

    def timed_probs(*a, **k):  # the network's share of stage 1 (the rest is post-processing at full size)
        t = time.perf_counter()
        out = probs_fn(*a, **k)  # returns host arrays: the GPU work is finished when it returns
        net_s[0] += time.perf_counter() - t
        return out

    seg.predict_probs = timed_probs  # put back when done: main() also runs inside the test process
    try:
        return _run(args, net_s)
    finally:
        seg.predict_probs = probs_fn


def _run(args, net_s: list[float]) -> int:
    """The timed run; `net_s[0]` collects the seconds spent in the network (see main)."""
    import torch

    from boneage.masks import clean_radiograph
    from boneage.runtime import thread_map
    from boneage.segmentation import load_unet, predict_masks

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.n]
    if not files:
        print(f"{args.images}: no .jpg or .png radiographs", file=sys.stderr)
        return 2
    model = load_unet(args.unet, cfg.segment, args.device)
    bs = max(1, int(cfg.segment.predict_batch_size))
    cuda = torch.device(args.device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for b0 in range(0, min(len(files), bs * args.warmup), bs):
        predict_masks(model, [read_gray(p) for p in files[b0:b0 + bs]], cfg.segment, args.device)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    net_s[0] = 0.0
    times = {"read": 0.0, "stage1": 0.0, "clean": 0.0, "encode": 0.0}
    t_all = time.perf_counter()
    for b0 in range(0, len(files), bs):
        t0 = time.perf_counter()
        imgs = [read_gray(p) for p in files[b0:b0 + bs]]
        t1 = time.perf_counter()
        masks = predict_masks(model, imgs, cfg.segment, args.device)
        sync()
        t2 = time.perf_counter()
        cleans = thread_map(lambda im_m: clean_radiograph(im_m[0], im_m[1], cfg.clean)[0], zip(imgs, masks),
                                cfg.clean.workers)
        t3 = time.perf_counter()
        thread_map(encode_pair, zip(masks, cleans), cfg.clean.workers)
        t4 = time.perf_counter()
        for k, (a, b) in zip(times, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            times[k] += b - a
    wall = time.perf_counter() - t_all
    n = len(files)
    res = {"n_images": n, "device": str(args.device), "batch": bs, "amp": bool(cfg.segment.amp and cuda),
           "post_workers": int(cfg.segment.post_workers), "clean_workers": int(cfg.clean.workers),
           "work_size_px": int(cfg.segment.work_size_px), "threads": args.threads,
           "images_per_s": round(n / wall, 2), "stage1_images_per_s": round(n / times["stage1"], 2),
           "ms_per_image": {**{k: round(1000 * v / n, 1) for k, v in times.items()},
                            "stage1_network": round(1000 * net_s[0] / n, 1)},
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
           "gpu": torch.cuda.get_device_name() if cuda else None}
    line = json.dumps(res)
    print(line)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
