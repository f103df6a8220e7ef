"""Combining D estimates: inverse-variance weighting across tiles and across windows.

Independent estimates D_i ± σ_i combine to D = Σ w_i D_i / Σ w_i with w_i = 1/σ_i² and
σ = (Σ w_i)^(-1/2) (the paper's red line in Fig. 3E). Only *independent* estimates may be
combined this way: tiles of a grid are disjoint, but consecutive windows of one tile
overlap in time when the hop is shorter than the window, so the running estimate of a
tile combines only non-overlapping windows (every ⌈T/H⌉-th window back from the latest).
"""

from __future__ import annotations

from collections import deque

import numpy as np


def inverse_variance(d: np.ndarray, sigma: np.ndarray, axis=None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean and its σ, ignoring NaN or non-positive σ entries.

    Returns NaN where nothing is left to combine.
    """
    d = np.asarray(d, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    ok = np.isfinite(d) & np.isfinite(sigma) & (sigma > 0)
    w = np.where(ok, 1.0 / np.where(ok, sigma, 1.0) ** 2, 0.0)
    wsum = w.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(wsum > 0, (w * np.where(ok, d, 0.0)).sum(axis=axis) / np.where(wsum > 0, wsum, 1.0), np.nan)
        sig = np.where(wsum > 0, 1.0 / np.sqrt(np.where(wsum > 0, wsum, 1.0)), np.nan)
    return mean, sig


class RunningCombination:
    """Per-tile and per-ROI running estimates from the latest windows.

    Args:
        n_tiles: tiles in the stream.
        regions: tile indices of each ROI.
        windows_apart: windows between two non-overlapping windows (⌈T/H⌉).
        keep: non-overlapping windows combined per tile (K).
    """

    def __init__(self, n_tiles: int, regions: list[list[int]], windows_apart: int, keep: int = 4):
        self.n_tiles = n_tiles
        self.regions = regions
        self.apart = max(1, int(windows_apart))
        self.keep = max(1, int(keep))
        self.history: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=self.apart * (self.keep - 1) + 1)
        self.tile_d = np.full(n_tiles, np.nan)
        self.tile_sigma = np.full(n_tiles, np.nan)
        self.region_d = np.full(len(regions), np.nan)
        self.region_sigma = np.full(len(regions), np.nan)

    def add(self, d: np.ndarray, sigma: np.ndarray) -> None:
        self.history.append((np.asarray(d, float), np.asarray(sigma, float)))
        chosen = list(self.history)[::-1][:: self.apart]  # latest, then every `apart` back
        ds = np.stack([c[0] for c in chosen])
        ss = np.stack([c[1] for c in chosen])
        self.tile_d, self.tile_sigma = inverse_variance(ds, ss, axis=0)
        for i, tiles in enumerate(self.regions):
            # tiles are independent: combine each tile's running estimate
            self.region_d[i], self.region_sigma[i] = inverse_variance(self.tile_d[tiles], self.tile_sigma[tiles])
