"""Stage 1: U-Net hand segmentation trained from zero (or few) manual masks.

- Network: `segmentation_models_pytorch.Unet` with batch normalisation in the decoder, one input
  channel, one logit, no pretrained download (`encoder_weights=None`); `cfg.weights_path` may
  point to a local state dict to start from.
- Loss: L = H - log J with H the mean binary cross-entropy and J the soft Jaccard index. The
  method's formula J = (1/n) sum_i y_i p_i / (y_i + p_i - y_i p_i), read per pixel, reduces to the
  mean of p over the positive pixels and never penalises a false positive; we use the form of the
  paper's authors' code (TernausNet): J = (sum y p + eps) / (sum y + sum p - sum y p + eps) over
  the batch, which is the same index computed on sums. J is in (0, 1], 1 for a perfect mask.
- Polarity: the network is trained with half of its samples inverted (`invert_aug_p`), so it
  segments normal and inverted radiographs alike and stage 1 needs no polarity decision; the
  classical first guess tries both polarities; stage 2 decides polarity from the mask.
- Working resolution: each radiograph is resized so its long side is `work_size_px` and padded
  (top-left anchored, black) to a square.
  Predictions are cropped back and resized to the radiograph's own size, then post-processed
  (`masks.postprocess_mask`).
- Labels: manual masks where present, else the classical first guess (`masks.classical_mask`)
  where its quality passes `pseudo_label_min_quality`; then `self_training_rounds` rounds of
  (train, predict every training image, re-score, keep the confident ones as the new labels); all of
  this at `bootstrap_work_size_px` when set. Then, when `relabel_epochs` > 0, one round whose labels
  are the whole pipeline's masks at each radiograph's own size (`relabel_unet`), trained at `work_size_px`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from boneage.masks import (
    axis_tilt,
    classical_mask,
    exposed_field,
    extend_fingertips,
    hand_length,
    hand_scale_px,
    invert_affine,
    mask_quality,
    polarity_score,
    postprocess_mask,
    refine_edges,
    rotate_expanded,
    select_hand_component,
    shed_tray,
)
from boneage.runtime import thread_map

log = logging.getLogger(__name__)

MODEL_FILE = "unet.pt"


# ----------------------------------------------------------------------------------------- network
def build_unet(cfg) -> torch.nn.Module:
    """The U-Net of `cfg` (SegmentConfig), from scratch or from `cfg.weights_path` when it is a file."""
    import segmentation_models_pytorch as smp

    depth = int(cfg.encoder_depth)
    dec = list(cfg.decoder_channels)[:depth]
    while len(dec) < depth:
        dec.append(max(8, dec[-1] // 2) if dec else 16)
    model = smp.Unet(encoder_name=cfg.encoder, encoder_depth=depth, encoder_weights=None,
                     decoder_use_norm="batchnorm", decoder_channels=dec, in_channels=1, classes=1)
    wp = cfg.weights_path
    if wp and Path(wp).is_file():
        state = torch.load(wp, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        log.info("U-Net: started from %s (%d missing, %d unexpected keys)", wp, len(missing), len(unexpected))
    return model


def soft_jaccard(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Jaccard index over the whole batch, in (0, 1]."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    union = p.sum() + target.sum() - inter
    return (inter + eps) / (union + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = BCE - log(soft Jaccard)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce - torch.log(soft_jaccard(logits, target))


# ----------------------------------------------------------------------------------------- working resolution
@dataclass
class WorkImage:
    image: np.ndarray  # (S, S) uint8, top-left anchored, zero padded
    size: tuple[int, int]  # (h, w) of the radiograph
    inner: tuple[int, int]  # (h, w) of the resized radiograph inside the square


def to_work(image: np.ndarray, work_px: int) -> WorkImage:
    """The radiograph resized into a `work_px` square (long side fits, top-left anchored)."""
    img = image
    h, w = img.shape
    s = work_px / max(h, w)
    nh, nw = max(1, min(work_px, round(h * s))), max(1, min(work_px, round(w * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    small = cv2.resize(img, (nw, nh), interpolation=interp)
    sq = np.zeros((work_px, work_px), np.uint8)
    sq[:nh, :nw] = small
    return WorkImage(sq, (h, w), (nh, nw))


def mask_to_work(mask: np.ndarray, work_px: int) -> np.ndarray:
    """A full-size bool mask into the working square (same geometry as `to_work`)."""
    h, w = mask.shape
    s = work_px / max(h, w)
    nh, nw = max(1, min(work_px, round(h * s))), max(1, min(work_px, round(w * s)))
    small = cv2.resize(mask.astype(np.uint8) * 255, (nw, nh), interpolation=cv2.INTER_AREA) > 127
    sq = np.zeros((work_px, work_px), bool)
    sq[:nh, :nw] = small
    return sq


def prob_to_masks(prob: np.ndarray, inner: tuple[int, int], size: tuple[int, int],
                  cfg, image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Working-resolution probability -> (raw, post-processed) bool masks at the radiograph's size.
    The raw mask keeps every component (two hands stay two, which the self-check needs to see);
    the post-processed one keeps only the hand's. With the radiograph (`image`, uint8 at `size`), the
    post-processed mask is clipped to the exposed field (`segment.clip_bright_bands`) and, after the
    optional dilation, its border is moved onto the soft-tissue edge (`segment.refine_edge_work_px`); last, it is
    grown at the fingertips into faint soft tissue (`segment.fingertip_grow_frac`, `fingertip_k_noise`,
    `fingertip_margin_frac`; `masks.extend_fingertips`). Before the growth, a mask that took in a tray around the
    hand is cut back to the hand (`segment.tray_fallback`; `masks.shed_tray`)."""
    nh, nw = inner
    h, w = size
    crop = np.ascontiguousarray(prob[:nh, :nw].astype(np.float32))
    raw = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
    field = exposed_field(image) if image is not None and cfg.clip_bright_bands else True
    # shares of the hand's length, not of the long side (`masks.hand_scale_px`): a rotated or cropped film's
    # canvas changes size, its hand does not
    hand = select_hand_component(raw & field)
    scale = hand_scale_px(hand, float(cfg.hand_scale_ratio))
    hand = postprocess_mask(hand, cfg.smooth_sigma_frac, cfg.dilate_frac, scale)
    band = round(float(cfg.refine_edge_work_px) * scale / max(nh, nw))
    if image is not None and band >= 1:  # after the dilation: a mask a little too wide is pulled back to the edge
        carve = float(cfg.refine_carve_frac)
        hand = select_hand_component(refine_edges(image, hand, band, carve_frac=carve, scale_px=scale) & field)
    if image is not None and cfg.tray_fallback:  # a tray or field box taken in around a small hand
        cut = shed_tray(image, hand, float(cfg.tray_max_quality), float(cfg.tray_min_gain))
        hand = hand if cut is None else cut
    grow = float(cfg.fingertip_grow_frac)
    margin = float(cfg.fingertip_margin_frac) * scale
    if image is not None and (grow > 0 or margin >= 0.5):  # faint fingertip soft tissue the network left out
        hand = extend_fingertips(image, hand, grow, float(cfg.fingertip_k_noise), margin_px=margin)
        if not isinstance(field, bool):
            hand = select_hand_component(hand & field)
    return raw, hand


def prob_to_mask(prob: np.ndarray, inner: tuple[int, int], size: tuple[int, int], cfg) -> np.ndarray:
    """Working-resolution probability -> post-processed bool mask at the radiograph's size."""
    return prob_to_masks(prob, inner, size, cfg)[1]


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S) -> float (N, 1, S, S), each image standardised to zero mean, unit SD."""
    x = torch.from_numpy(batch).float().unsqueeze(1) / 255.0
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(0.02)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------- training
def _augment(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
             invert_p: float = 0.5, rotate_deg: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Flip, rotation (+-`rotate_deg`)/zoom/shift, gamma/contrast, and inverted polarity with probability
    `invert_p`."""
    s = img.shape[0]
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    ang = rng.uniform(-rotate_deg, rotate_deg)
    scale = rng.uniform(0.85, 1.15)
    tx, ty = rng.uniform(-0.08, 0.08, size=2) * s
    m = cv2.getRotationMatrix2D((s / 2, s / 2), ang, scale)
    m[:, 2] += (tx, ty)
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
    mask = cv2.warpAffine(np.ascontiguousarray(mask), m, (s, s), flags=cv2.INTER_NEAREST, borderValue=0)
    g = rng.uniform(0.7, 1.4)
    f = (img.astype(np.float32) / 255.0) ** g
    f = f * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    img = np.clip(f * 255, 0, 255).astype(np.uint8)
    if rng.random() < invert_p:  # the network learns both polarities
        img = 255 - img
    return img, mask


def train_unet(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, cfg, device,
               seed: int = 0) -> list[float]:
    """Train in place on (N, S, S) uint8 images and (N, S, S) {0,1} labels; returns the mean loss per epoch."""
    if len(images) == 0 or epochs <= 0:
        return []
    model.to(device).train()
    cl = torch.device(device).type == "cpu"
    if cl:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(seed)
    bs = max(2, int(cfg.batch_size))
    n = len(images)
    losses = []
    from tqdm import tqdm

    invert_p = float(cfg.invert_aug_p)
    rotate_deg = float(cfg.aug_rotate_deg)
    steps = max(1, n // bs) if n >= bs else 1
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps), eta_min=0.02 * cfg.lr)
    for ep in range(epochs):
        order = rng.permutation(n)
        tot, cnt = 0.0, 0
        for b in tqdm(range(steps), desc=f"unet epoch {ep + 1}/{epochs}", leave=False, mininterval=5):
            idx = order[b * bs:(b + 1) * bs] if n >= bs else rng.choice(n, size=bs)
            xs, ys = zip(*(_augment(images[i], labels[i], rng, invert_p, rotate_deg) for i in idx))
            x = _to_tensor(np.stack(xs)).to(device)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(np.stack(ys).astype(np.float32)).unsqueeze(1).to(device)
            loss = segmentation_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
            cnt += 1
        losses.append(tot / max(cnt, 1))
        log.info("U-Net epoch %d/%d: loss %.4f", ep + 1, epochs, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: np.ndarray, device, batch_size: int = 16,
                  amp: bool = False) -> np.ndarray:
    """(N, S, S) uint8 -> (N, S, S) float32 probabilities. Channels-last on every device (about 1.6x faster on
    CPU); `amp`: bf16 autocast where the device is CUDA (ignored on CPU, which stays fp32)."""
    model.eval()
    model.to(memory_format=torch.channels_last)
    cuda = torch.device(device).type == "cuda"
    out = np.zeros(images.shape, np.float32)
    for i in range(0, len(images), batch_size):
        x = _to_tensor(images[i:i + batch_size]).to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(amp and cuda)):
            p = torch.sigmoid(model(x))
        out[i:i + batch_size] = p[:, 0].float().cpu().numpy()
    return out


def confidence(prob: np.ndarray) -> float:
    """Mean |2p - 1| over the image: 1 when every pixel is sure."""
    return float(np.abs(2.0 * prob - 1.0).mean())


# ----------------------------------------------------------------------------------------- bootstrap
@dataclass
class Bootstrap:
    model: torch.nn.Module
    rounds: list[dict] = field(default_factory=list)
    classical_quality: np.ndarray | None = None


def _work_mask_from_prob(prob: np.ndarray, inner: tuple[int, int], cfg) -> np.ndarray:
    """Post-processed mask in the working square (used for labels and scoring)."""
    nh, nw = inner
    m = np.zeros(prob.shape, bool)
    m[:nh, :nw] = postprocess_mask(prob[:nh, :nw] > 0.5, cfg.smooth_sigma_frac, 0.0)
    return m


def _summary(q: np.ndarray) -> dict:
    if len(q) == 0:
        return {"n": 0}
    return {"n": int(len(q)), "mean": round(float(np.mean(q)), 4), "median": round(float(np.median(q)), 4),
            "p10": round(float(np.percentile(q, 10)), 4), "min": round(float(np.min(q)), 4)}


def bootstrap_unet(images: np.ndarray, inners: list[tuple[int, int]], manual: dict[int, np.ndarray], cfg,
                   device, seed: int = 0) -> Bootstrap:
    """Train the U-Net from manual masks (index -> (S, S) bool) and classical pseudo-labels, then
    self-train. `images` are working squares of the training radiographs."""
    n, s, _ = images.shape
    t0 = time.perf_counter()
    labels = np.zeros(images.shape, np.uint8)
    use = np.zeros(n, bool)
    cq = np.zeros(n, np.float32)
    for i in range(n):
        if i in manual:
            labels[i] = manual[i]
            use[i] = True
            cq[i] = 1.0
            continue
        nh, nw = inners[i]
        m, q, _ = classical_mask(images[i, :nh, :nw], work_px=s)
        cq[i] = q
        labels[i, :nh, :nw] = m
        use[i] = q >= cfg.pseudo_label_min_quality
    rounds = [{"round": 0, "source": "classical", "manual": len(manual), "kept": int(use.sum()), "of": int(n),
               "quality": _summary(cq[[i for i in range(n) if i not in manual]]),
               "seconds": round(time.perf_counter() - t0, 1)}]
    log.info("bootstrap round 0 (classical): kept %d of %d (%d manual)", use.sum(), n, len(manual))
    if not use.any():  # nothing plausible: train on every classical guess rather than nothing
        use[:] = True
    torch.manual_seed(seed)
    model = build_unet(cfg).to(device)
    losses = train_unet(model, images[use], labels[use], int(cfg.epochs), cfg, device, seed)
    rounds[0]["train_losses"] = [round(x, 4) for x in losses]
    for r in range(1, int(cfg.self_training_rounds) + 1):
        t1 = time.perf_counter()
        probs = predict_probs(model, images, device, max(2, int(cfg.batch_size)), amp=cfg.amp)
        pq = np.zeros(n, np.float32)
        conf = np.zeros(n, np.float32)
        new_labels = labels.copy()
        new_use = np.zeros(n, bool)
        for i in range(n):
            if i in manual:
                new_use[i] = True
                continue
            m = _work_mask_from_prob(probs[i], inners[i], cfg)
            nh, nw = inners[i]
            pq[i], _ = mask_quality(m[:nh, :nw])
            conf[i] = confidence(probs[i, :nh, :nw])
            ok = pq[i] >= cfg.pseudo_label_min_quality and conf[i] >= cfg.pseudo_label_min_confidence
            if ok:
                new_labels[i] = m
                new_use[i] = True
            elif use[i] and cq[i] >= pq[i]:  # keep the earlier label when the network did worse
                new_use[i] = True
        labels, use = new_labels, new_use
        auto = [i for i in range(n) if i not in manual]
        rounds.append({"round": r, "source": "self_training", "manual": len(manual), "kept": int(use.sum()),
                       "of": int(n), "quality": _summary(pq[auto]), "confidence": _summary(conf[auto])})
        log.info("self-training round %d: kept %d of %d, mean quality %.3f", r, use.sum(), n,
                 float(pq[auto].mean()) if auto else 1.0)
        if not use.any():
            use[:] = True
        losses = train_unet(model, images[use], labels[use], int(cfg.epochs_per_round), cfg, device, seed + r)
        rounds[-1]["train_losses"] = [round(x, 4) for x in losses]
        rounds[-1]["seconds"] = round(time.perf_counter() - t1, 1)
    return Bootstrap(model, rounds, cq)


def bootstrap_px(cfg) -> int:
    """Working size of the bootstrap's rounds (`bootstrap_work_size_px`, else `work_size_px`)."""
    return int(cfg.bootstrap_work_size_px or cfg.work_size_px)


def relabel_unet(model: torch.nn.Module, items, cfg, device, seed: int = 7) -> dict:
    """The relabel round, in place. `items`: an iterable (read lazily) of (uint8 radiograph at its own size, its
    manual bool mask or None). Each radiograph without a manual mask is segmented by the whole pipeline at the
    bootstrap's working size, without dilation or fingertip margin; the masks whose `mask_quality` passes
    `pseudo_label_min_quality` and the manual ones, brought to `work_size_px`, are the labels of `relabel_epochs`
    epochs at `work_size_px`. Returns the round's record for rounds.json."""
    from dataclasses import replace

    t0 = time.perf_counter()
    s = int(cfg.work_size_px)
    label_cfg = replace(cfg, work_size_px=bootstrap_px(cfg), dilate_frac=0.0, fingertip_margin_frac=0.0)
    works, labels, quals, chunk = [], [], [], []
    n_manual = 0

    def keep(img, m):
        works.append(to_work(img, s).image)
        labels.append(mask_to_work(m, s).astype(np.uint8))

    def flush():
        for img, m in zip(chunk, predict_masks(model, chunk, label_cfg, device)):
            q, _ = mask_quality(m)
            quals.append(q)
            if q >= cfg.pseudo_label_min_quality:
                keep(img, m)
        chunk.clear()

    for img, manual in items:
        if manual is not None:
            keep(img, np.asarray(manual) > 0)
            n_manual += 1
            continue
        chunk.append(img)
        if len(chunk) == 64:
            flush()
    flush()
    t_lab = time.perf_counter() - t0
    log.info("relabel: kept %d of %d pipeline masks as labels (%.0f s)", len(works), len(quals), t_lab)
    losses = []
    if works:
        losses = train_unet(model, np.stack(works), np.stack(labels), int(cfg.relabel_epochs), cfg, device, seed)
    return {"round": "relabel", "source": "stage-1 pipeline masks at full size", "manual": n_manual,
            "kept": len(works), "of": len(quals) + n_manual, "quality": _summary(np.array(quals, np.float32)),
            "work_size_px": s,
            "label_work_size_px": label_cfg.work_size_px, "epochs": int(cfg.relabel_epochs),
            "train_losses": [round(x, 4) for x in losses], "label_seconds": round(t_lab, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------- API for other stages
def load_unet(model_dir: Path, cfg, device) -> torch.nn.Module:
    """The trained U-Net from `model_dir` (state dict, weights_only), in eval mode."""
    from boneage.errors import StageInputError

    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        raise StageInputError(f"{path}: no trained U-Net; run stage 01_segment first")
    model = build_unet(_no_weights(cfg))
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model.to(device).eval()


def _no_weights(cfg):
    import copy

    c = copy.copy(cfg)
    c.weights_path = ""
    return c


def predict_mask(model: torch.nn.Module, image: np.ndarray, cfg, device) -> np.ndarray:
    """One uint8 radiograph -> post-processed bool mask at the radiograph's size."""
    return predict_masks(model, [image], cfg, device)[0]


def work_probs(model: torch.nn.Module, works: list, cfg, device) -> np.ndarray:
    """(N, S, S) probabilities of `to_work` images; with `cfg.flip_tta` the mean of the direct and the mirrored
    reading (`_flip_inner`; their maximum with `cfg.flip_tta_max`), so that a mirrored radiograph gets exactly the
    mirrored probabilities. Every U-Net reading at predict time goes through here (the retries too)."""
    bs = max(1, int(cfg.predict_batch_size))
    probs = predict_probs(model, np.stack([w.image for w in works]), device, bs, amp=cfg.amp)
    if not cfg.flip_tta:
        return probs
    mirrored = np.stack(_flip_inner(predict_probs(model, np.stack(_flip_inner([w.image for w in works], works)),
                                                  device, bs, amp=cfg.amp), works))
    return np.maximum(probs, mirrored) if cfg.flip_tta_max else 0.5 * (probs + mirrored)


def _flip_inner(arrays, works: list) -> list[np.ndarray]:
    """Each work-size array with its radiograph's part (`inner`, top left; the padding stays where it is) mirrored
    left to right: the U-Net then sees a mirrored film exactly as it sees the film's mirror image (`flip_tta`)."""
    out = []
    for a, wk in zip(arrays, works):
        a = np.array(a, copy=True)
        nh, nw = wk.inner
        a[:nh, :nw] = a[:nh, :nw][:, ::-1]
        out.append(a)
    return out


def predict_mask_and_raw(model: torch.nn.Module, image: np.ndarray, cfg, device) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 radiograph -> (raw, post-processed) bool masks from the same prediction (see `prob_to_masks`)."""
    return predict_masks_with_raw(model, [image], cfg, device)[0]


def predict_masks(model: torch.nn.Module, images: list[np.ndarray], cfg, device) -> list[np.ndarray]:
    """Radiographs (uint8, any sizes) -> post-processed bool masks at their own sizes, batched."""
    return [mask for _, mask in predict_masks_with_raw(model, images, cfg, device)]


def predict_masks_with_raw(model: torch.nn.Module, images: list[np.ndarray], cfg,
                           device) -> list[tuple[np.ndarray, np.ndarray]]:
    """Radiographs (uint8, any sizes) -> (raw, post-processed) bool masks at their own sizes, batched.

    Polarity: a radiograph whose polarity score is negative (possibly inverted) or whose mask
    scores below `polarity_retry_quality` (default 0: off, because on real radiographs the retry
    picked background blobs) is predicted a second time inverted, and the inverted mask wins only
    when clearly more hand-like (`mask_quality` + 0.2); the network is trained on both polarities.
    """
    if not images:
        return []
    full = cfg
    if cfg.canonical_view:
        # the first reading only finds the hand and its raw mask (the canonical view reads its outline): one pass,
        # without the mirror and the steps that shape the outline (stage 1 + 2 on 2 cores: 5.52 images/s; 3.44 with
        # both readings mirrored)
        cfg = replace(cfg, flip_tta=False, work_size_px=int(cfg.canonical_locate_px or cfg.work_size_px),
                      tray_fallback=False, fingertip_grow_frac=0.0, fingertip_margin_frac=0.0)
    s = int(cfg.work_size_px)
    workers = int(getattr(cfg, "post_workers", 1))
    works = [to_work(img, s) for img in images]
    probs = work_probs(model, works, cfg, device)
    pairs = thread_map(lambda k: prob_to_masks(probs[k], works[k].inner, works[k].size, cfg, images[k]),
                       range(len(images)), workers)
    retry_q = float(cfg.polarity_retry_quality)
    quals = [mask_quality(m)[0] for _, m in pairs]
    redo = [k for k, img in enumerate(images) if quals[k] < retry_q or polarity_score(img) < 0.0]
    if redo:
        inverted = []
        for k in redo:
            w = works[k].image.copy()
            nh, nw = works[k].inner
            w[:nh, :nw] = 255 - w[:nh, :nw]
            inverted.append(replace(works[k], image=w))
        probs2 = work_probs(model, inverted, cfg, device)
        for k, p in zip(redo, probs2):
            pair2 = prob_to_masks(p, works[k].inner, works[k].size, cfg, images[k])
            q2 = mask_quality(pair2[1])[0]
            if q2 > quals[k] + 0.2:  # clearly more hand-like: quality alone also likes background blobs
                pairs[k], quals[k] = pair2, q2
    tilt_deg = float(cfg.upright_retry_deg)
    if tilt_deg > 0:
        done = thread_map(lambda k: _upright_retry(model, images[k], pairs[k], quals[k], tilt_deg, cfg, device),
                          range(len(images)), workers)
        pairs, quals = [pair for pair, _ in done], [q for _, q in done]
    if full.canonical_view:
        pairs = _canonical_pass(model, images, pairs, quals, full, device)
    return pairs


def canonical_frame(image: np.ndarray, mask: np.ndarray, margin_frac: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The radiograph turned so that the mask's long axis is vertical with the fingers up, a right hand mirrored
    into a left one, and cut to the mask's box with `margin_frac` of the hand's length on each side (the film's
    edge repeated beyond it): (view, 2x3 matrix from radiograph px to view px), or None when the mask cannot say
    where the hand lies. A film turned, mirrored, cropped or scaled gives the same view of its hand (up to the
    resampling), so the U-Net reads it as it reads the original (`canonical_view`); one reading of it does what the
    mirrored second reading (`flip_tta`) does for the film."""
    from boneage.registration import finger_end_sign, thumb_side_sign  # registration imports keypoints -> masks

    m = np.asarray(mask).astype(bool)
    if m.sum() < 100:
        return None
    tilt = axis_tilt(m)
    # rotate_expanded's rotation by `tilt` takes the image direction R^T (0, -1) to the view's up
    up = np.array([-np.sin(tilt), -np.cos(tilt)])
    ys, xs = np.nonzero(m[::2, ::2])
    mu = np.array([xs.mean() * 2.0, ys.mean() * 2.0])
    if finger_end_sign(m, up, mu) < 0:
        tilt, up = tilt + np.pi, -up  # fingers down: turn the other way round
    # a right hand (the thumb on the view's left, as registration tells it) is mirrored into a left one
    mirror = thumb_side_sign(m, up, np.array([-up[1], up[0]]), mu) < 0
    c, sn = np.cos(tilt), np.sin(tilt)
    R = np.array([[c, -sn], [sn, c]]) * np.array([[-1.0], [1.0]]) if mirror else np.array([[c, -sn], [sn, c]])
    outline = np.vstack(cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0])
    q = outline.reshape(-1, 2).astype(np.float64) @ R.T
    pad = float(margin_frac) * hand_length(m)
    lo, hi = q.min(0) - 0.5 - pad, q.max(0) + 0.5 + pad
    size = (max(1, int(np.ceil(hi[0] - lo[0]))), max(1, int(np.ceil(hi[1] - lo[1]))))
    M = np.hstack([R, -lo[:, None]])
    view = cv2.warpAffine(image, M, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return view, M


def _canonical_pass(model: torch.nn.Module, images: list[np.ndarray], pairs: list, quals: list[float], cfg,
                    device) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each hand segmented a second time in its `canonical_frame` (the first pass's mask says where it lies), the
    mask mapped back to the radiograph. The first pass depends on the film's angle, framing and size (IoU 0.97
    between a film's mask and its 10-degree copy's, turned back); the second sees every copy of a hand alike (issue
    11). The raw mask stays the first pass's, which sees the whole film (a second hand, a second film). The second
    mask is kept unless it scores below the first by `canonical_max_loss` (a view cut from a wrong first mask); then
    the first pass's mask stays, as that pass made it (without the tray cut and the fingertip growth)."""
    s = int(cfg.work_size_px)
    todo, frames = [], []
    for k, (img, (_, mask)) in enumerate(zip(images, pairs)):
        fr = canonical_frame(img, mask, float(cfg.canonical_margin_frac)) if mask.any() else None
        if fr is not None and min(fr[0].shape) >= 16:
            todo.append(k)
            frames.append(fr)
    if not todo:
        return pairs
    works = [to_work(v, s) for v, _ in frames]
    probs = work_probs(model, works, replace(cfg, flip_tta=cfg.canonical_flip_tta), device)

    def back(j):
        k = todo[j]
        (v, M), wk = frames[j], works[j]
        _, mask_v = prob_to_masks(probs[j], wk.inner, wk.size, cfg, v)
        h, w = images[k].shape[:2]
        full = cv2.warpAffine(mask_v.astype(np.uint8), invert_affine(M), (w, h), flags=cv2.INTER_NEAREST) > 0
        full = select_hand_component(full) if full.any() else full
        return k, full

    out = list(pairs)
    for k, full in thread_map(back, range(len(todo)), int(getattr(cfg, "post_workers", 1))):
        if full.any() and mask_quality(full)[0] >= quals[k] - float(cfg.canonical_max_loss):
            out[k] = (pairs[k][0], full)
    return out


def _upright_retry(model: torch.nn.Module, image: np.ndarray, pair: tuple[np.ndarray, np.ndarray], quality: float,
                   tilt_deg: float, cfg, device) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """The U-Net learnt upright hands (+-`aug_rotate_deg` of augmentation): a hand whose mask lies further off the
    vertical is segmented again turned upright along the mask's long axis, both ways (fingers up or down), the
    masks mapped back; the most hand-like of the three wins, the upright ones on a tie (issue 11: rotations)."""
    mask = pair[1]
    tilt = axis_tilt(mask) if mask.any() else 0.0
    if abs(np.degrees(tilt)) <= tilt_deg:
        return pair, quality
    s = int(cfg.work_size_px)
    h, w = image.shape[:2]
    views = [rotate_expanded(image, a) for a in (tilt, tilt + np.pi)]
    works = [to_work(v, s) for v, _ in views]
    probs = work_probs(model, works, cfg, device)
    best, best_q = pair, quality
    for (v, M), wk, p in zip(views, works, probs):
        raw_r, mask_r = prob_to_masks(p, wk.inner, wk.size, cfg, v)
        back = invert_affine(M)
        raw_b, mask_b = (cv2.warpAffine(m.astype(np.uint8), back, (w, h), flags=cv2.INTER_NEAREST) > 0
                         for m in (raw_r, mask_r))
        q = mask_quality(mask_b)[0]
        margin = 0.05 if best is pair else 0.0  # the network's own view is preferred unless clearly worse
        if q >= best_q - margin:
            best, best_q = (raw_b, mask_b), q
    return best, best_q


def save_unet(model: torch.nn.Module, model_dir: Path) -> Path:
    import io

    from boneage.fileio import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    path = Path(model_dir) / MODEL_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path
