"""QC contact sheets: a grid of thumbnails with captions, worst first, as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from boneage.fileio import atomic_write_png


def to_bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def fit_tile(image: np.ndarray, size_px: int) -> np.ndarray:
    """Letterbox an image into a square tile of `size_px`, keeping its aspect ratio."""
    img = to_bgr(image)
    h, w = img.shape[:2]
    s = size_px / max(h, w)
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    tile = np.zeros((size_px, size_px, 3), np.uint8)
    y0 = (size_px - small.shape[0]) // 2
    x0 = (size_px - small.shape[1]) // 2
    tile[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return tile


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], path: Path,
                  tile_px: int = 192, columns: int = 8, title: str = "") -> Path:
    """Write a grid of `images` (grey or BGR), each with its caption underneath, to `path`."""
    cap_h = 18
    n = len(images)
    rows = max(1, -(-n // columns))
    title_h = 26 if title else 0
    sheet = np.full((title_h + rows * (tile_px + cap_h), columns * tile_px, 3), 32, np.uint8)
    if title:
        cv2.putText(sheet, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, columns)
        y = title_h + r * (tile_px + cap_h)
        x = c * tile_px
        sheet[y:y + tile_px, x:x + tile_px] = fit_tile(img, tile_px)
        cv2.putText(sheet, str(cap)[:32], (x + 3, y + tile_px + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    (230, 230, 230), 1, cv2.LINE_AA)
    atomic_write_png(path, sheet)
    return path


def outline_mask(image: np.ndarray, mask: np.ndarray, color=(0, 255, 0), thickness: int = 2) -> np.ndarray:
    """The radiograph in colour with the mask's outline drawn on it."""
    out = to_bgr(image).copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, color, thickness)
    return out
