"""Combining window estimates over time and over the tiles of an ROI, honestly.

Each window gives a log-likelihood of D on a grid (:mod:`dle_stream.likelihood`).
*Independent* windows combine exactly by adding them; then D ± σ and the intervals are
read from the sum. Two rules keep the inputs independent:

- **over time**, a tile's running estimate adds only non-overlapping windows: the latest
  and every ⌈T/H⌉-th window back (with T = 400 and H = 50, every 8th), at most ``keep``;
- **over space**, an ROI's tiles are disjoint (:mod:`dle_stream.tiling` places them so), and
  its running estimate adds the tiles' running log-likelihoods.

Disagreement is a finding, not something to average away: before summing, a likelihood-
ratio test asks whether the parts are consistent with one D,
Λ = 2·(Σ_k max ℓ_k − max Σ_k ℓ_k), referred to χ² with K − 1 degrees of freedom; at
p < :data:`DISAGREE_P` the combination is flagged ``DISAGREE`` (a tile whose successive
windows disagree: D changed in time; an ROI whose tiles disagree: heterogeneous; an ROI
whose successive windows, its tiles added in each, disagree: D changed in time). A flagged
combination is not reported as one number but as the :class:`Spread` of its parts' values.
The false-alarm rate on homogeneous data is measured by ``dle-stream bench --suite combine``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dle_stream.likelihood import DGrid, Posterior, combine, posterior

#: p-value of the likelihood-ratio test below which combined parts are called inconsistent.
DISAGREE_P = 0.01


def inverse_variance(d: np.ndarray, sigma: np.ndarray, axis=None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean and its σ, ignoring NaN or non-positive σ entries.

    Only for Gaussian, unbiased inputs (e.g. old logs without likelihoods); window
    outputs of a model are combined with :func:`dle_stream.likelihood.combine`.
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


def disagreement_p(log_likelihoods: np.ndarray, axis: int = 0, lr_scale: float = 1.0) -> np.ndarray:
    """p-value of "the parts along ``axis`` share one D" (likelihood-ratio test).

    ``log_likelihoods`` [..., n] on one grid (each part's own maximum need not be 0);
    NaN parts are left out. Fewer than two parts give p = 1. ``lr_scale``: the statistic is
    divided by it before it is referred to χ² (a model's calibration,
    :attr:`dle_stream.likelihood.DGrid.lr_scale`: its likelihoods are not exact, and the
    statistic of homogeneous parts was measured this many times larger than χ²'s, on
    single windows and on tiles' and ROIs' sums alike, unweighted: see
    :func:`dle_stream.training.calibration.calibrate`).
    """
    ll = np.moveaxis(np.asarray(log_likelihoods, dtype=np.float64), axis, 0)
    ok = np.all(np.isfinite(ll), axis=-1)  # [K, ...]
    safe = np.where(ok[..., None], ll, 0.0)
    separate = np.where(ok, safe.max(axis=-1), 0.0).sum(axis=0)
    joint = safe.sum(axis=0).max(axis=-1)
    lam = np.maximum(2.0 * (separate - joint), 0.0) / lr_scale
    dof = ok.sum(axis=0) - 1
    with np.errstate(invalid="ignore"):
        p = stats.chi2.sf(lam, np.maximum(dof, 1))
    return np.where(dof >= 1, p, 1.0)


@dataclass(frozen=True)
class Spread:
    """The values of parts that disagree, shown instead of their combination (µm²/s).

    ``what``: "tiles" (an ROI's tiles: heterogeneous) or "windows" (successive independent
    windows: D changed over time). ``lo_um2_s`` / ``hi_um2_s``: the smallest and largest
    posterior median among the parts inside the range that say something (NaN if none);
    ``above_um2_s``: the lowest "D > x" bound among parts above the range (NaN if none)."""

    what: str
    lo_um2_s: float
    hi_um2_s: float
    above_um2_s: float = math.nan


def spread_of(parts: Posterior, what: str) -> Spread:
    """The :class:`Spread` of parts summarised in ``parts`` (1-d arrays over the parts).
    Parts above the range give the "D > x" bound, never their median capped at the range's
    top; parts that say little are left out of the range unless no part says more."""
    d = np.asarray(parts.d, dtype=np.float64)
    above = np.asarray(parts.above_range, dtype=bool) & np.isfinite(d)
    inside = np.isfinite(d) & ~above
    telling = inside & ~np.asarray(parts.little_information, dtype=bool)
    use = telling if telling.any() else inside
    lo, hi = (float(d[use].min()), float(d[use].max())) if use.any() else (math.nan, math.nan)
    x = float(np.min(parts.lower95_wide[above])) if above.any() else math.nan
    return Spread(what, lo, hi, x)


def window_spread(per_window: np.ndarray, used: np.ndarray, grid: DGrid, d_max_um2_s: float) -> Spread:
    """The :class:`Spread` of successive windows [K, n] (a tile's, or an ROI's with its tiles
    added in each); ``used`` [K]: windows (tiles) summed into each, for the information weight."""
    post = posterior(per_window, grid, d_max_um2_s, n_windows=np.maximum(np.asarray(used), 1))
    return spread_of(post, "windows")


class RunningCombination:
    """Per-tile and per-ROI running estimates from the latest independent windows.

    Args:
        n_tiles: tiles in the stream.
        regions: tile indices of each ROI (disjoint tiles).
        windows_apart: windows between two non-overlapping windows (⌈T/H⌉).
        keep: non-overlapping windows combined per tile (K).
        grid: the D grid of the window log-likelihoods.
        d_max_um2_s: top of the operating range in this stream's units.

    After each :meth:`add`: ``tile`` and ``region`` (:class:`~dle_stream.likelihood.Posterior`
    over tiles / ROIs), ``tile_windows`` (windows combined per tile), ``tile_disagree``
    (a tile's windows disagree), ``region_disagree`` (an ROI's tiles disagree),
    ``region_changed`` (an ROI's windows, its tiles added in each, disagree),
    ``region_tile_range`` ([n_regions, 2] smallest and largest value of its tiles inside the
    range, see :func:`spread_of`), ``tile_spread`` / ``region_spread`` (a :class:`Spread`
    where the combination is flagged, None where one number stands), and the shortcuts
    ``tile_d``, ``tile_sigma``, ``region_d``, ``region_sigma``.
    """

    def __init__(self, n_tiles: int, regions: list[list[int]], windows_apart: int, keep: int = 8,
                 grid: DGrid | None = None, d_max_um2_s: float = 1.0):
        self.n_tiles = n_tiles
        self.regions = regions
        self.apart = max(1, int(windows_apart))
        self.keep = max(1, int(keep))
        self.grid = grid or DGrid()
        self.d_max_um2_s = float(d_max_um2_s)
        self.history: deque[np.ndarray] = deque(maxlen=self.apart * (self.keep - 1) + 1)
        nan_tiles = np.full((n_tiles, self.grid.n), np.nan)
        nan_regions = np.full((len(regions), self.grid.n), np.nan)
        self.tile_log_likelihood = nan_tiles
        self.region_log_likelihood = nan_regions
        self.tile: Posterior = posterior(nan_tiles, self.grid, self.d_max_um2_s)
        self.region: Posterior = posterior(nan_regions, self.grid, self.d_max_um2_s)
        self.tile_windows = np.zeros(n_tiles, dtype=int)
        self.region_windows = np.zeros(len(regions), dtype=int)
        self.tile_disagree = np.zeros(n_tiles, dtype=bool)
        self.region_disagree = np.zeros(len(regions), dtype=bool)
        self.region_changed = np.zeros(len(regions), dtype=bool)
        self.region_p = np.ones(len(regions))
        self.region_tile_range = np.full((len(regions), 2), np.nan)
        self.tile_spread: list[Spread | None] = [None] * n_tiles
        self.region_spread: list[Spread | None] = [None] * len(regions)

    @property
    def tile_d(self) -> np.ndarray:
        return self.tile.d

    @property
    def tile_sigma(self) -> np.ndarray:
        return self.tile.sigma

    @property
    def region_d(self) -> np.ndarray:
        return self.region.d

    @property
    def region_sigma(self) -> np.ndarray:
        return self.region.sigma

    def add(self, log_likelihood: np.ndarray) -> None:
        """Take one window's log-likelihoods [n_tiles, n_grid] and update every combination."""
        self.history.append(np.asarray(log_likelihood, dtype=np.float64))
        chosen = np.stack(list(self.history)[::-1][:: self.apart])  # latest, then every `apart` back
        self.tile_windows = np.all(np.isfinite(chosen), axis=-1).sum(axis=0)
        self.tile_log_likelihood = combine(chosen, axis=0)
        self.tile_disagree = disagreement_p(chosen, axis=0, lr_scale=self.grid.lr_scale) < DISAGREE_P
        self.tile = posterior(self.tile_log_likelihood, self.grid, self.d_max_um2_s, n_windows=self.tile_windows)
        usable = np.all(np.isfinite(chosen), axis=-1)  # [K, tiles]
        self.tile_spread = [window_spread(chosen[:, t], usable[:, t], self.grid, self.d_max_um2_s)
                            if self.tile_disagree[t] else None for t in range(self.n_tiles)]
        parts = []
        for i, tiles in enumerate(self.regions):
            own = self.tile_log_likelihood[tiles]
            parts.append(combine(own, axis=0))
            self.region_p[i] = disagreement_p(own, axis=0, lr_scale=self.grid.lr_scale)
            by_tile = spread_of(self.tile.take(tiles), "tiles")
            self.region_tile_range[i] = (by_tile.lo_um2_s, by_tile.hi_um2_s)
            in_time = combine(chosen[:, tiles], axis=1) if tiles else np.full((len(chosen), self.grid.n), np.nan)
            self.region_changed[i] = disagreement_p(in_time, axis=0, lr_scale=self.grid.lr_scale) < DISAGREE_P
            self.region_spread[i] = (by_tile if self.region_p[i] < DISAGREE_P else
                                     window_spread(in_time, usable[:, tiles].sum(axis=1), self.grid, self.d_max_um2_s)
                                     if self.region_changed[i] else None)
        self.region_log_likelihood = np.stack(parts) if parts else np.zeros((0, self.grid.n))
        self.region_windows = np.array([int(self.tile_windows[t].sum()) for t in self.regions], dtype=int)
        self.region_disagree = self.region_p < DISAGREE_P
        self.region = posterior(self.region_log_likelihood, self.grid, self.d_max_um2_s, n_windows=self.region_windows)
