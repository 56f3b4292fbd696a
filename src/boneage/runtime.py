"""Runtime choices in one place: device, threads (torch's and a thread pool for OpenCV/numpy work), seeds."""

from __future__ import annotations

import random

import numpy as np


def select_device(name: str = "auto"):
    """`auto` picks CUDA when present, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_torch(threads: int = 0, seed: int = 0) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def thread_map(fn, items, workers: int, desc: str | None = None) -> list:
    """[fn(x) for x in items], in `workers` threads when more than one (order kept; OpenCV and numpy release the
    GIL, so per-radiograph image work runs side by side); `desc`: a tqdm progress bar with that label."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        if desc is None:
            return [fn(x) for x in items]
        from tqdm import tqdm

        return [fn(x) for x in tqdm(items, desc=desc, mininterval=5)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        results = pool.map(fn, items)
        if desc is not None:
            from tqdm import tqdm

            results = tqdm(results, total=len(items), desc=desc, mininterval=5)
        return list(results)
