"""Torch runtime choices in one place: device, threads, seeds."""

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
