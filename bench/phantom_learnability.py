"""Are phantom bone ages learnable but not trivial? A small CNN on small phantoms, fixed CPU budget.

    .venv/bin/python bench/phantom_learnability.py [--n-train 1500] [--n-test 400] [--size 128]
        [--budget-s 240] [--threads 2]

For artefacts off and on: render n_train + n_test phantoms (RSNA label distribution) at `size` px
long side, train a 4-block CNN (image + sex) with an L1 loss for `budget_s` seconds of wall time,
and report the test MAE next to the sex-mean baseline and the generator's noise floor
(mean |appearance_age - bone_age| of the test phantoms, the error of a perfect reader).
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import numpy as np
import torch
from torch import nn

from boneage.phantom import PhantomConfig, make_phantom


def render_set(cfg, seed, start, n):
    imgs, ages, males, app = [], [], [], []
    for i in range(start, start + n):
        s = make_phantom(cfg, seed, i)
        imgs.append(s.image)
        ages.append(s.bone_age_months)
        males.append(s.sex == "M")
        app.append(s.params["appearance_age_months"])
    return (np.stack(imgs).astype(np.float32) / 255.0, np.array(ages, np.float32), np.array(males, np.float32),
            np.array(app, np.float32))


class Net(nn.Module):
    """Stride-2 stem, four double-conv blocks (8-64 channels), global average pool, sex into the head."""

    def __init__(self, width=8):
        super().__init__()
        layers = [nn.Conv2d(1, width, 5, stride=2, padding=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
        for k in range(4):
            o = width * 2 ** k
            layers += [nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                       nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = o
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c + 1, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))

    def forward(self, x, male):
        f = self.features(x).mean(dim=(2, 3))
        return self.head(torch.cat([f, male[:, None]], 1))[:, 0]


def train_eval(tr, te, budget_s, seed, device="cpu"):
    torch.manual_seed(seed)
    xtr, ytr, mtr, _ = (torch.from_numpy(a).to(device) for a in tr)
    xte, yte, mte, _ = (torch.from_numpy(a).to(device) for a in te)
    xtr, xte = xtr[:, None], xte[:, None]
    mu, sd = float(ytr.mean()), float(ytr.std())
    net = Net().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    bs, n = 64, len(ytr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    epochs, total_epochs = 0, None
    while True:
        net.train()
        perm = torch.randperm(n, generator=g).to(device)
        for b in range(0, n - bs + 1, bs):
            idx = perm[b:b + bs]
            x = xtr[idx]
            if torch.rand(1, generator=g).item() < 0.5:  # light augmentation: brightness jitter
                x = x * (0.9 + 0.2 * torch.rand(len(idx), 1, 1, 1, generator=g)).to(device)
            loss = (net(x, mtr[idx]) - (ytr[idx] - mu) / sd).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
        el = time.perf_counter() - t0
        if total_epochs is None:
            total_epochs = max(2, int(budget_s / el))
        for pg in opt.param_groups:  # cosine decay over the epochs that fit the budget
            pg["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, epochs / total_epochs)))
        if epochs >= total_epochs:
            break
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(xte[b:b + 256], mte[b:b + 256]) for b in range(0, len(yte), 256)]) * sd + mu
    if device != "cpu":
        torch.cuda.synchronize()
    return float((pred - yte).abs().mean()), epochs, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (the benchmark) or cuda (a longer-training reference)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for artefacts in (False, True):
        cfg = PhantomConfig(long_side_px=a.size, artefacts=artefacts)
        t = time.perf_counter()
        tr = render_set(cfg, a.seed, 0, a.n_train)
        te = render_set(cfg, a.seed, 100_000, a.n_test)
        t_render = time.perf_counter() - t
        base = np.where(te[2] > 0, tr[1][tr[2] > 0].mean(), tr[1][tr[2] == 0].mean())
        mae_base = float(np.abs(base - te[1]).mean())
        floor = float(np.abs(te[3] - te[1]).mean())
        mae, epochs, secs = train_eval(tr, te, a.budget_s, a.seed, a.device)
        print(f"[{a.device}] artefacts={artefacts}: size {a.size} px, {a.n_train} train / {a.n_test} test phantoms "
              f"(rendered in {t_render:.0f} s); CNN test MAE {mae:.1f} mo after {epochs} epochs / {secs:.0f} s; "
              f"sex-mean baseline {mae_base:.1f} mo; noise floor (perfect reader) {floor:.1f} mo", flush=True)


if __name__ == "__main__":
    main()
