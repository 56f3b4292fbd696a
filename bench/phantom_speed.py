"""Phantom generator speed: images/s at the default 1024-px long side with 1 and 2 processes.

    .venv/bin/python bench/phantom_speed.py [--n 60] [--long-side 1024] [--workers 1 2] [--no-artefacts]

Times rendering only (no PNG writing) and, separately, rendering + PNG encoding (what stage 00 does).
"""

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import cv2

from boneage.phantom import PhantomConfig, make_phantom


def _work(args):
    cfg, start, n, encode = args
    cv2.setNumThreads(1)  # one core per process (as stage 00's workers do)
    for i in range(start, start + n):
        s = make_phantom(cfg, 0, i)
        if encode:
            cv2.imencode(".png", s.image)
            cv2.imencode(".png", s.mask)
    return n


def measure(cfg: PhantomConfig, n: int, workers: int, encode: bool) -> float:
    if workers == 1:
        _work((cfg, 10_000, 2, False))  # warm-up (texture bank, imports)
        t, c = time.perf_counter(), time.process_time()
        _work((cfg, 0, n, encode))
        cpu_ms = 1000 * (time.process_time() - c) / n
        print(f"  (1 process, encode={encode}: {cpu_ms:.0f} CPU-ms per image -> {2000 / cpu_ms:.0f} images/s "
              f"on 2 otherwise idle cores)")
        return n / (time.perf_counter() - t)
    per = n // workers
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_work, [(cfg, 10_000 + 10 * k, 2, False) for k in range(workers)]))  # warm-up
        t = time.perf_counter()
        done = sum(ex.map(_work, [(cfg, k * per, per, encode) for k in range(workers)]))
        return done / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--long-side", type=int, default=1024)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-artefacts", action="store_true")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    cfg = PhantomConfig(long_side_px=a.long_side, artefacts=not a.no_artefacts)
    for w in a.workers:
        r = measure(cfg, a.n, w, False)
        e = measure(cfg, a.n, w, True)
        print(f"long side {a.long_side} px, artefacts={cfg.artefacts}, workers={w}: "
              f"{r:.1f} images/s render only ({1000 * w / r:.0f} ms/image/core), {e:.1f} images/s with PNG encode")


if __name__ == "__main__":
    main()
