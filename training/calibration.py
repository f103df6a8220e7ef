"""Calibrating a grid model's likelihood so that *combined* windows are honest.

A window log-likelihood ℓ(D) from a network trained on a finite budget is right on average
over its training prior but can be wrong in two ways that only show once windows are added
up (docs/design.md §7b; measured on the shipped models in BENCHMARKS.md):

- **shifted**: for true D the average ℓ peaks at m(D) ≠ D (a pull toward the middle of the
  range of a few % of d_max). One window's interval hides it; 16 windows combined, 4× narrower,
  do not.
- **too wide or too narrow**: a temperature;
- **wrong in a way shared by all windows** of one D (what is left of the shift between
  the D values where it was measured, and anything the windows have in common): a
  relative systematic error r, which smears every posterior by a Gaussian of sd r·D
  (:attr:`dle_stream.likelihood.DGrid.systematic_rel`) and does not shrink as windows
  are added.

Both are fitted here on movies of *known, fixed* D simulated with the model's own priors
and scan (seed :data:`CALIBRATION_SEED`, used for nothing else — not the validation,
suite or combination seeds): for each D on a grid inside and above the range, ``n``
windows. The warp takes m(D) as the peak of their average raw ℓ (made non-decreasing and
lightly smoothed) and reads ℓ'(D) = ℓ(m(D)) (:func:`dle_stream.likelihood.warp_log_likelihood`),
which puts the average log-likelihood's maximum back at the true D. The temperature T
(ℓ' divided by T) and the systematic error r are then chosen together so that the 68 %
and 95 % intervals hold the true D as often as they say after combining K = 1, 4 and 16
windows: the numbers a user reads after 1, 4 or 16 windows (:func:`coverage_mismatch`).
Coverage, z of the combined estimates and the log score before and after are stored with
the fit in the card (``training.likelihood_calibration``); warp, T and r in its architecture.

A package whose head predates the smooth output (``grid_basis`` 0) is first projected on
the B-spline basis (:mod:`~dle_stream.training.output_basis`): a zigzag from knot to knot
would otherwise become spikes when windows are added.
"""

from __future__ import annotations

import contextlib
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from dle_stream.errors import DleStreamError
from dle_stream.likelihood import (
    DGrid,
    combine,
    log_posterior_at,
    posterior,
    smooth_log_likelihood,
    warp_log_likelihood,
    window_temperatures,
)

#: Seed of the calibration movies (distinct from validation 20240917, suites 20241001, combine 20241101).
CALIBRATION_SEED = 20_241_201
#: True D of the calibration cells, units of d_max: 20 inside the range, 5 above it (≤ the grid's top).
INSIDE_FRACTIONS = tuple(float(f) for f in np.round(np.arange(0.025, 1.0, 0.05), 3))
BEYOND_FRACTIONS = (1.1, 1.25, 1.5, 1.75, 2.0)
#: Numbers of combined windows whose log score the temperature maximises (equal weight).
GROUP_SIZES = (1, 4, 16)
#: Temperatures tried (a geometric grid; the log score is smooth in T).
TEMPERATURES = np.geomspace(0.1, 2.0, 81)
#: Relative systematic errors tried (``DGrid.systematic_rel``).
SYSTEMATICS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2)


def _operating_simulator(est, density: str = "cloud"):
    """A simulator of ``est``'s operating priors, scan and window, and its d_max (µm²/s);
    ``density`` "cloud" (the paper's spreading cloud, as the accuracy suites) or "box"."""
    from dle_stream.training.priors import SimulatorPriors
    from dle_stream.training.simulator import Simulator

    card = est.card
    d_max = float(card.d_max_um2_s)
    priors = (SimulatorPriors.from_dict(card.simulator["priors"]).operating() if card.simulator.get("priors")
              else SimulatorPriors(d_max_um2_s=d_max))
    priors = priors.with_(density=density)
    return Simulator(priors, est.timing, card.tile_height, card.tile_width, card.window_frames, est.device), d_max


def tile_film_simulator(est):
    """The simulator of a tile filmed for many windows (:func:`simulate_tile_cells`): a
    steady density (particles uniform in a periodic box around the tile, entering and
    leaving), as in a sample. The paper's cloud spreads out: at the top of the low range
    (1.5 µm²/s) it is ≈ 12 µm wide after one 400-frame window against a 3 µm tile, so a
    cloud tile's later windows are nearly empty — uninformative windows that calibration
    then fitted as if they were a tile's running estimate (measured on beads-high: single
    windows' posteriors nearly flat at every D, the average log-likelihood peaking up to
    1.2·d_max away from the truth)."""
    return _operating_simulator(est, density="box")


def simulate_cells(est, fractions: tuple[float, ...], n: int, seed: int = CALIBRATION_SEED, batch: int = 32,
                   progress: Callable[[int], None] | None = None, density: str = "cloud") -> np.ndarray:
    """Raw window log-likelihoods [cells, n, grid entries] of ``est`` for independent movies of
    D fixed at each fraction of d_max (the model's operating priors and scan otherwise;
    ``density`` "cloud", the paper's, or "box", a steady density)."""
    sim, d_max = _operating_simulator(est, density=density)
    g = torch.Generator(device=est.device).manual_seed(seed)
    cells = []
    for f in fractions:
        lls = []
        for i in range(0, n, batch):
            b = sim.simulate(min(batch, n - i), generator=g, d_um2_s=f * d_max)
            ll, _ = est.window_log_likelihoods_of_movies(b.movies.cpu().numpy(), est.timing)
            lls.append(ll)
            if progress:
                progress(min(batch, n - i))
        cells.append(np.concatenate(lls))
    return np.stack(cells)


def simulate_tile_cells(est, fractions: tuple[float, ...], tiles: int, windows: int, seed: int = CALIBRATION_SEED,
                        batch: int = 32, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Raw window log-likelihoods [cells, tiles, windows, grid entries] of ``est``: per fraction
    of d_max, ``tiles`` independent tiles (their own particles, brightness, PSF, background, as
    the model's priors draw them) each filmed for ``windows`` consecutive, non-overlapping
    windows — what a stream's running estimate of one tile combines (the windows of a tile
    share its sample, so their errors are not independent). Steady density
    (:func:`tile_film_simulator`)."""
    sim, d_max = tile_film_simulator(est)
    g = torch.Generator(device=est.device).manual_seed(seed)
    cells = []
    for f in fractions:
        per_tile = []
        for i in range(0, tiles, batch):
            b = min(batch, tiles - i)
            state = None
            lls = []
            for _ in range(windows):
                out = (sim.simulate(b, generator=g, d_um2_s=f * d_max) if state is None
                       else sim.simulate(b, generator=g, continue_from=state))
                state = out.state
                ll, _ = est.window_log_likelihoods_of_movies(out.movies.cpu().numpy(), est.timing)
                lls.append(ll)
                if progress:
                    progress(b)
            per_tile.append(np.stack(lls, axis=1))  # [b, windows, entries]
        cells.append(np.concatenate(per_tile))
    return np.stack(cells)


def mean_peak(log_likelihoods: np.ndarray, grid: DGrid) -> float:
    """Where the average of windows' log-likelihoods [n, entries] peaks (units of d_max, on [0, top]).

    The vertex of the parabola through the highest knot and its two neighbours (clamped to
    them), not the highest knot itself: between knots the likelihood is interpolated
    linearly, so the highest point of that interpolation is always a knot, and a peak read
    there moves in steps of a knot (0.01–0.02·d_max, as large as the σ of 16 windows
    combined) as the windows change.
    """
    mean = np.mean(np.asarray(log_likelihoods, dtype=np.float64)[:, :-1], axis=0)
    x = np.asarray(grid.knots, dtype=np.float64)
    k = int(np.argmax(mean))
    if k == 0 or k == x.size - 1:
        return float(x[k])
    (x0, x1, x2), (y0, y1, y2) = x[k - 1:k + 2], mean[k - 1:k + 2]
    # vertex of the quadratic through three points (any spacing)
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        return float(x1)
    return float(np.clip(x1 - 0.5 * num / den, x0, x2))


def fit_warp(fractions: tuple[float, ...], cells: np.ndarray, grid: DGrid) -> tuple[tuple[float, float], ...]:
    """Warp points (D, m(D)) from cells [len(fractions), n, entries] of fixed true D.

    m(D) is the peak of each cell's average log-likelihood, smoothed over neighbouring cells
    (weights 1-2-1 on the shift m(D) − D, ends kept) and made non-decreasing (running maximum).
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.size < 3 or np.any(np.diff(f) <= 0):
        raise DleStreamError("calibration: needs at least three increasing D values")
    shift = np.array([mean_peak(c, grid) for c in cells]) - f
    smooth = shift.copy()
    smooth[1:-1] = 0.25 * shift[:-2] + 0.5 * shift[1:-1] + 0.25 * shift[2:]
    return _monotone_warp(f, f + smooth, grid)


def _monotone_warp(fractions: np.ndarray, m: np.ndarray, grid: DGrid) -> tuple[tuple[float, float], ...]:
    """Warp points (D, m(D)) with m made non-decreasing (running maximum) and kept on [0, top]."""
    m = np.clip(np.maximum.accumulate(m), 0.0, grid.top)
    return tuple((float(a), float(b)) for a, b in zip(fractions, m))


def refine_warp_by_medians(fractions: tuple[float, ...], groups: np.ndarray, grid: DGrid,
                           warp: tuple[tuple[float, float], ...], up_to: float | None = None,
                           iterations: int = 4) -> tuple[tuple[float, float], ...]:
    """Move the warp points at true D ≤ ``up_to`` (units of d_max) until groups of windows of
    each cell, combined, have posterior medians that average to that cell's D.

    ``groups`` [cells, n, K, entries]: disjoint groups of K windows of the cell's D (smoothed,
    not warped). Why: the warp from :func:`fit_warp` puts the peak of each cell's *average*
    log-likelihood at its D, but what a user reads is the median after combining, and that
    peak is a noisy statistic where the average is flat-topped (measured on brain-qd-low,
    800 cloud windows per D: the peak moved by up to 0.017·d_max between two halves of the
    same cell, and 16 windows combined stayed biased by up to 0.014·d_max, z −0.68). Each
    point is moved by the remaining bias of its cell (fixed-point iterations, the warp kept
    non-decreasing); points above ``up_to`` keep ``warp``'s, because medians are read on the
    operating range [0, 1] and are pulled below the top by it.
    """
    up_to = MEDIAN_WARP_UP_TO if up_to is None else up_to
    f = np.asarray(fractions, dtype=np.float64)
    pts = np.array(warp, dtype=np.float64)
    if pts.shape[0] != f.size or not np.allclose(pts[:, 0], f):
        raise DleStreamError("calibration: the warp's points must be the cells' D values")
    m = pts[:, 1].copy()
    sel = np.flatnonzero(f <= up_to)
    _, n, k, e = groups.shape
    for _ in range(iterations):
        current = _monotone_warp(f, m, grid)
        for i in sel:
            warped = warp_log_likelihood(groups[i].reshape(n * k, e), grid, current).reshape(n, k, e)
            post = posterior(combine(warped, axis=1), grid, 1.0)
            m[i] += float(np.nanmean(post.d)) - f[i]
    return _monotone_warp(f, m, grid)


def disjoint_groups(cells: np.ndarray, k: int) -> np.ndarray:
    """Disjoint groups of ``k`` windows per cell, in order: [cells, n, entries] → [cells, n // k, k, entries]."""
    c, n, e = cells.shape
    return cells[:, : (n // k) * k].reshape(c, n // k, k, e)


def combined_groups(cells: np.ndarray, k: int) -> np.ndarray:
    """Disjoint groups of ``k`` windows per cell, combined: [cells, n // k, entries]."""
    return combine(disjoint_groups(cells, k), axis=2)


def combined_log_score(cells: np.ndarray, fractions: tuple[float, ...], grid: DGrid, temperature: float,
                       ks: tuple[int, ...] = GROUP_SIZES) -> float:
    """Mean over K of the mean log posterior density of the true D after combining K windows
    (cells inside the range only; ``cells`` already warped)."""
    inside = np.asarray(fractions) <= 1.0
    scores = []
    for k in ks:
        groups = combined_groups(cells[inside] / temperature, k)
        truth = np.repeat(np.asarray(fractions)[inside], groups.shape[1])
        scores.append(float(np.mean(log_posterior_at(groups.reshape(-1, groups.shape[-1]), grid, truth))))
    return float(np.mean(scores))


def coverage_mismatch(cells: np.ndarray, fractions: tuple[float, ...], grid: DGrid, temperature: float,
                      ks: tuple[int, ...] = GROUP_SIZES, max_groups: int = 64) -> float:
    """Σ over K of the squared distances of the 68 % and 95 % interval coverage from 68.3 %
    and 95.4 % after combining K windows (cells inside the range; ``cells`` already warped;
    at most ``max_groups`` groups per cell and K)."""
    f = np.asarray(fractions)
    inside = f <= 1.0
    total = 0.0
    for k in ks:
        groups = combined_groups(cells[inside][:, : max_groups * k] / temperature, k)
        post = posterior(groups, grid, 1.0)
        truth = f[inside][:, None]
        c68 = np.mean((post.lo68 <= truth) & (truth <= post.hi68))
        c95 = np.mean((post.lo95 <= truth) & (truth <= post.hi95))
        total += (c68 - 0.6827) ** 2 + (c95 - 0.9545) ** 2
    return float(total)


def combined_figures(cells: np.ndarray, fractions: tuple[float, ...], grid: DGrid,
                     ks: tuple[int, ...] = GROUP_SIZES) -> dict:
    """68 % coverage per K and z = (D̂ − D)/σ̂ of the largest K, over the cells inside 10–90 % of the range."""
    f = np.asarray(fractions)
    sel = (f >= 0.1) & (f <= 0.9)
    out: dict = {}
    for k in ks:
        groups = combined_groups(cells[sel], k)
        post = posterior(groups, grid, 1.0)
        truth = f[sel][:, None]
        out[f"coverage68_k{k}"] = float(np.mean((post.lo68 <= truth) & (truth <= post.hi68)))
        z = (post.d - truth) / post.sigma
        cell_z = np.mean(z, axis=1)
        out[f"max_abs_cell_z_mean_k{k}"] = float(np.max(np.abs(cell_z)))
        out[f"z_std_k{k}"] = float(np.mean(np.std(z, axis=1)))
    return out


#: Knots over which window log-likelihoods are smoothed before the warp (``grid_smooth_knots``):
#: measured on brain-qd-low-combined (512 windows per D), the average log-likelihood's peak
#: wandered ±0.021·d_max (mean) from one D to the next unsmoothed, ±0.010 at 3 knots, ±0.007 at 5.
SMOOTH_KNOTS = 3.0
#: Cells up to this D (units of d_max) have their warp points set from combined medians
#: (:func:`refine_warp_by_medians`); above it the peak of the average log-likelihood is kept.
MEDIAN_WARP_UP_TO = 0.9
#: Windows per group whose combined medians set the warp.
MEDIAN_WARP_K = 16
#: Consecutive windows per simulated tile: a stream's running tile estimate combines 8.
TILE_WINDOWS = 8
#: Largest shift m(D) − D inside the range (units of d_max) that calibration accepts without a warning.
WARP_SHIFT_WARNING = 0.25
#: Tiles per ROI-like group in the disagreement calibration.
ROI_TILES = 4
#: Tiles of the ROI-like groups whose coverage is judged (all their windows added: K = 64).
ROI_TILES_WIDE = 8
#: Exponents β tried: K windows added count as K^(1 − β) (``DGrid.combine_exponent``).
EXPONENTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
#: p at which a disagreement is called (dle_stream.combine.DISAGREE_P) and the false-alarm
#: rate the statistic's scale is fitted to keep every null group type at or below.
LR_P = 0.01
LR_TARGET = 0.02
LR_SCALES = np.geomspace(1.0, 8.0, 46)
#: Where the temperature profile has its points (units of d_max; constant beyond the last).
PROFILE_NODES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Slopes b and curvatures c of the profile's log factor tried (see :func:`fit_temperature_profile`).
PROFILE_SLOPES = tuple(np.linspace(-2.0, 2.0, 9))
PROFILE_CURVES = tuple(np.linspace(-4.0, 4.0, 9))


def fit_temperature_profile(sets: dict[str, np.ndarray], fractions: np.ndarray, grid: DGrid, temperature: float,
                            cells: np.ndarray, slopes: Sequence[float] = PROFILE_SLOPES,
                            curves: Sequence[float] = PROFILE_CURVES) -> tuple[float, tuple[tuple[float, float], ...]]:
    """A temperature and a smooth profile over where windows peak — log factor(x) =
    b·(x − ½) + c·(x − ½)² at :data:`PROFILE_NODES` — that bring the coverage of every cell
    closest to what the intervals say (:func:`cell_mismatch`): b and c on a grid, then the
    temperature around ``temperature``, then b and c again. A smooth form, because a free
    value per point followed the noise of single cells (measured: factors 0.24 and 4.3 at
    neighbouring points, and 68 % coverage of 53–85 % per decile of the 1000-movie suite)."""
    return _fit_smooth_profile(
        lambda t, prof: cell_mismatch(coverage_table(sets, fractions, grid, t, cells, prof)), temperature, slopes, curves)


def _smooth_profile(b: float, c: float) -> tuple[tuple[float, float], ...]:
    """Points (D, factor) at :data:`PROFILE_NODES` of log factor b·(x − ½) + c·(x − ½)²."""
    return tuple((float(n), float(np.exp(b * (n - 0.5) + c * (n - 0.5) ** 2))) for n in PROFILE_NODES)


def _fit_smooth_profile(mismatch: Callable[[float, tuple[tuple[float, float], ...]], float], temperature: float,
                        slopes: Sequence[float], curves: Sequence[float]) -> tuple[float, tuple[tuple[float, float], ...]]:
    """The search of the two profile fits: b and c on a grid, then the temperature within
    ×/÷ 1.5 of ``temperature``, then b and c again, minimising ``mismatch(temperature, profile)``."""
    t = float(temperature)
    shapes = [(float(b), float(c)) for b in slopes for c in curves]
    _, b, c = min((mismatch(t, _smooth_profile(b, c)), b, c) for b, c in shapes)
    near = TEMPERATURES[(TEMPERATURES >= t / 1.5) & (TEMPERATURES <= t * 1.5)]
    _, t = min((mismatch(float(v), _smooth_profile(b, c)), float(v)) for v in near)
    _, b, c = min((mismatch(t, _smooth_profile(b, c)), b, c) for b, c in shapes)
    return t, _smooth_profile(b, c)


def fit_posterior_profile(sets: dict[str, np.ndarray], fractions: np.ndarray, grid: DGrid, temperature: float,
                          cells: np.ndarray, slopes: Sequence[float] = PROFILE_SLOPES,
                          curves: Sequence[float] = PROFILE_CURVES) -> tuple[float, tuple[tuple[float, float], ...]]:
    """A temperature (every window's) and a smooth profile read where each *combined*
    log-likelihood peaks (:attr:`DGrid.posterior_profile`; the same form as
    :func:`fit_temperature_profile`) that bring the coverage of every cell and group set
    closest to what the intervals say (:func:`cell_mismatch`): b and c on a grid, then the
    temperature around ``temperature``, then b and c again. Unlike a profile per window, it
    can be fitted on combined groups too: all windows of a group share its factor, so it
    does not weight the windows of one combination unequally."""
    return _fit_smooth_profile(
        lambda t, prof: cell_mismatch(coverage_table(sets, fractions, replace(grid, posterior_profile=prof), t, cells)),
        temperature, slopes, curves)


def independent_groups(tiles: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Groups of ``k`` windows from *different* tiles (independent samples), per cell:
    tiles [cells, tiles, windows, entries] → [cells, groups, k, entries]; every window used once."""
    c, nt, nw, e = tiles.shape
    rng = np.random.default_rng(seed)
    out = []
    for j in range(nw):
        p = rng.permutation(nt)[: (nt // k) * k]
        out.append(tiles[:, p, j].reshape(c, nt // k, k, e))
    return np.concatenate(out, axis=1)


def group_sets(tiles: np.ndarray) -> dict[str, np.ndarray]:
    """What the calibration judges [cells, groups, K, entries]: single windows, 4 and 16
    independent windows combined (``dle-stream bench --suite combine``), one tile's
    consecutive windows (a stream's running estimate of a tile) and those of
    :data:`ROI_TILES_WIDE` tiles (an ROI's)."""
    c, nt, nw, e = tiles.shape
    roi = tiles[:, : (nt // ROI_TILES_WIDE) * ROI_TILES_WIDE].reshape(c, nt // ROI_TILES_WIDE, ROI_TILES_WIDE * nw, e)
    return {"k1": tiles.reshape(c, nt * nw, 1, e), "independent_k4": independent_groups(tiles, 4),
            "independent_k16": independent_groups(tiles, 16), f"tile_k{nw}": tiles,
            f"roi_{ROI_TILES_WIDE}_tiles_k{ROI_TILES_WIDE * nw}": roi}


def cloud_sets(cells: np.ndarray) -> dict[str, np.ndarray]:
    """Single windows and disjoint groups of 4 and 16 of independent cloud-density windows
    [cells, n, entries] → {name: [cells, groups, K, entries]}."""
    return {"cloud_k1": cells[:, :, None], "cloud_k4": disjoint_groups(cells, 4),
            "cloud_k16": disjoint_groups(cells, 16)}


def coverage_table(sets: dict[str, np.ndarray], fractions: np.ndarray, grid: DGrid, temperature: float,
                   cells: np.ndarray | None = None, profile: Sequence[Sequence[float]] = ()) -> dict[str, np.ndarray]:
    """68 % and 95 % interval coverage [len(cells), 2] per group set, each window divided by
    its temperature (``temperature`` × ``profile`` at its peak; ``cells``: which cells; default all)."""
    idx = np.arange(len(fractions)) if cells is None else np.asarray(cells)
    out = {}
    for name, g in sets.items():
        g = g[idx]
        combined = combine(g / window_temperatures(g, grid, temperature, profile)[..., None], axis=2)  # [cells, groups, entries]
        post = posterior(combined, grid, 1.0, n_windows=np.full(combined.shape[:-1], g.shape[2]))
        truth = np.asarray(fractions)[idx][:, None]
        out[name] = np.stack([np.mean((post.lo68 <= truth) & (truth <= post.hi68), axis=1),
                              np.mean((post.lo95 <= truth) & (truth <= post.hi95), axis=1)], axis=1)
    return out


def cell_mismatch(table: dict[str, np.ndarray]) -> float:
    """Mean over cells and group sets of the squared distance of (68 %, 95 %) coverage from (68.3 %, 95.4 %)."""
    target = np.array([0.6827, 0.9545])
    return float(np.mean([np.mean(np.sum((v - target) ** 2, axis=1)) for v in table.values()]))


def lr_statistics(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Likelihood-ratio statistic Λ and its degrees of freedom for groups [..., K, entries]."""
    sep = groups.max(axis=-1).sum(axis=-1)
    joint = groups.sum(axis=-2).max(axis=-1)
    return np.maximum(2.0 * (sep - joint), 0.0).reshape(-1), np.full(sep.size, groups.shape[-2] - 1)


def lr_false_alarms(null_sets: dict[str, np.ndarray], scale: float) -> dict[str, float]:
    """False-alarm rates (p < :data:`LR_P`) of each set of homogeneous groups [..., K, entries]
    with Λ divided by ``scale``."""
    from scipy import stats

    out = {}
    for k, v in null_sets.items():
        lam, dof = lr_statistics(v)
        out[k] = float(np.mean(stats.chi2.sf(lam / scale, dof) < LR_P))
    return out


def fit_lr_scale(null_sets: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """Smallest scale c (on :data:`LR_SCALES`) at which Λ/c of every set of homogeneous groups
    exceeds the χ² (1 − LR_P) quantile in at most :data:`LR_TARGET` of the groups; with the
    false-alarm rates at that c."""
    for c in LR_SCALES:
        r = lr_false_alarms(null_sets, float(c))
        if max(r.values()) <= LR_TARGET:
            return float(c), r
    return float(LR_SCALES[-1]), lr_false_alarms(null_sets, float(LR_SCALES[-1]))


def save_tile_cells(path: str | Path, tiles: np.ndarray, fractions: Sequence[float], seed: int,
                    weights_sha256: str | None, cloud: np.ndarray | None = None) -> Path:
    """Write simulated raw window log-likelihoods [cells, tiles, windows, entries] with the true
    D of each cell (units of d_max), the seed and the weights they came from
    (:func:`weights_fingerprint`; .npz, written atomically; an existing file is never replaced);
    ``cloud``: the independent cloud-density windows [cells, n, entries] if simulated too."""
    from dle_stream.files import write_atomic

    path = Path(path)
    if path.exists():
        raise DleStreamError(f"{path}: exists; choose another file for the simulated windows")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            arrays: dict[str, Any] = {"tiles": np.asarray(tiles, dtype=np.float32),
                                      "fractions": np.asarray(fractions, dtype=float), "seed": np.int64(seed),
                                      "weights_sha256": np.str_(weights_sha256 or "")}
            if cloud is not None:
                arrays["cloud"] = np.asarray(cloud, dtype=np.float32)
            np.savez(fh, **arrays)

    write_atomic(path, write)
    return path


def weights_fingerprint(model) -> str:
    """sha256 of a model's tensors (names and values): the same for a package whose card or
    calibration changed but whose weights did not (the weights file's own sha256 changes
    whenever the package is written again)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def load_tile_cells(path: str | Path) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(tiles, fractions, seed, weights sha256) as written by :func:`save_tile_cells`.

    Raises:
        DleStreamError: one line naming the file when it is not such a file.
    """
    with _saved_windows(path) as data:
        return (data["tiles"].astype(np.float64), data["fractions"], int(data["seed"]), str(data["weights_sha256"]))


def load_cloud_cells(path: str | Path) -> np.ndarray | None:
    """The independent cloud-density windows [cells, n, entries] saved beside the tiles, or None."""
    with _saved_windows(path) as data:
        return data["cloud"].astype(np.float64) if "cloud" in data.files else None


@contextlib.contextmanager
def _saved_windows(path: str | Path) -> Iterator[Any]:
    """The .npz of :func:`save_tile_cells`, opened without pickles; any other file is one line."""
    path = Path(path)
    fix = "write one with `dle-stream calibrate MODEL --save-windows FILE`"
    try:
        data = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise DleStreamError(f"{path}: cannot read it ({exc.strerror or exc}); {fix}") from None
    except (ValueError, EOFError, zipfile.BadZipFile):
        raise DleStreamError(f"{path}: not a file of calibration windows (not an .npz archive of arrays); {fix}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DleStreamError(f"{path}: not a file of calibration windows (one array, not an .npz archive); {fix}")
    with data:
        missing = [k for k in ("tiles", "fractions", "seed", "weights_sha256") if k not in data.files]
        if missing:
            raise DleStreamError(f"{path}: not a file of calibration windows (it lacks {', '.join(missing)}); {fix}")
        yield data


def calibrate(folder: str | Path, n_per_cell: int = 512, seed: int = CALIBRATION_SEED, batch: int = 32,
              device: str = "cpu", progress: Callable[[int], None] | None = None,
              fractions: tuple[float, ...] = INSIDE_FRACTIONS + BEYOND_FRACTIONS,
              tiles: np.ndarray | None = None, log: Callable[[str], None] | None = None,
              temperature_profile: bool = False, save_windows: str | Path | None = None,
              cloud: np.ndarray | None = None, with_cloud: bool = True, warp_from: str = "peaks",
              validation_movies: int | None = None, posterior_profile: bool = False) -> dict:
    """Fit and store the smoothing, warp, temperature, systematic error and likelihood-ratio
    scale of the grid model in ``folder``; returns what was measured.

    ``n_per_cell`` windows per true D: ``n_per_cell // 8`` simulated tiles filmed for 8
    consecutive windows each. ``fractions``: the true D of the cells, units of d_max,
    increasing (default: 20 inside the range and 5 above it). ``tiles``: the raw window
    log-likelihoods [cells, tiles, 8, entries] if already simulated (tests). ``log``: told
    what is being fitted. ``temperature_profile``: also fit a temperature that depends on
    where each window peaks (off by default: on brain-qd-low-combined it widened windows
    near the top of the range 5.8-fold and the 1000-movie suite's L1 rose from 0.115 to
    0.123 µm²/s, the top decile's bias to −0.28 µm²/s).
    ``save_windows``: also write the simulated raw window log-likelihoods there
    (:func:`save_tile_cells`), so that other calibrations can be tried on them offline.
    ``with_cloud``: also fit on ``n_per_cell`` independent windows per D of the paper's
    spreading cloud (seed ``seed`` + 1; ``cloud`` [cells, n, entries] if already simulated):
    the network's pull differs between a steady density and the cloud (measured on
    brain-qd-low: fitted on steady tiles alone, 16 cloud windows combined were biased by up
    to −0.019·d_max, z −0.98), and the intervals must hold on both.
    ``warp_from``: "peaks" (each cell's average log-likelihood peaks at its D,
    :func:`fit_warp`) or "medians" (then refined until 16 windows combined have unbiased
    medians, :func:`refine_warp_by_medians`).
    ``posterior_profile``: also fit a width that depends on D, read where each combined
    log-likelihood peaks (:attr:`dle_stream.likelihood.DGrid.posterior_profile`; not with
    ``temperature_profile``): on brain-qd-low it brought the 1000-movie suite's per-decile
    68 % coverage from 0.56–0.84 to 0.63–0.80 (BENCHMARKS.md, "A width that depends on D").
    ``validation_movies``: the card's validation is measured again on this many held-out
    movies with the calibrated package (:func:`dle_stream.training.validation.measure_validation`;
    default: as many as the card's validation had, else 512; 0: not measured, the card then
    says its validation predates the calibration); the trainer's figures are kept as
    ``training.validation_before_calibration``.
    """
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.model_package import load_model_package, save_model_package
    from dle_stream.training.output_basis import project_output_to_spline_basis

    if temperature_profile and posterior_profile:
        raise DleStreamError("calibration: choose one of the per-window and the posterior temperature profile")
    if n_per_cell < 16 * TILE_WINDOWS:
        raise DleStreamError(f"calibration: {n_per_cell} movies per D value is too few (at least {16 * TILE_WINDOWS})")
    if save_windows is not None and Path(save_windows).exists():
        raise DleStreamError(f"{save_windows}: exists; choose another file for the simulated windows")
    model, card = load_model_package(folder, device=device)
    if model.config.output != "d_grid":
        raise DleStreamError(f"{folder}: only a model with a grid likelihood output can be calibrated")
    if card.family is not None:
        # the warp and temperature were measured to differ with the model's training; a family's
        # would differ across its box too, and fitting them at one scan would claim the rest
        raise DleStreamError(f"{folder}: {card.name} is a family model; calibration over a box of scans is not "
                             f"implemented (its intervals are the network's own, see its card's validation)")
    projected = not model.config.grid_basis
    if projected:
        model = project_output_to_spline_basis(model)
    raw = model.config.uncalibrated()
    model.config = raw
    grid = raw.grid
    fractions = tuple(float(f) for f in fractions)
    if not fractions or max(fractions) > grid.top:
        raise DleStreamError(f"calibration: true D values must lie within the grid (≤ {grid.top:g}·d_max)")
    simulated = tiles is None or (with_cloud and cloud is None)
    est = DiffusionEstimator(model, card, Path(folder), device) if simulated else None
    if tiles is None:
        tiles = simulate_tile_cells(est, fractions, n_per_cell // TILE_WINDOWS, TILE_WINDOWS, seed=seed, batch=batch,
                                    progress=progress)
    if with_cloud and cloud is None:
        cloud = simulate_cells(est, fractions, n_per_cell, seed=seed + 1, batch=batch, progress=progress)
    if save_windows is not None and simulated:
        save_tile_cells(save_windows, tiles, fractions, seed, weights_fingerprint(model), cloud if with_cloud else None)
    if not with_cloud:
        cloud = None
    f = np.asarray(fractions)
    inside = np.flatnonzero(f <= 1.0)
    judged = np.flatnonzero((f >= 0.1) & (f <= 0.9))
    c, nt, nw, e = tiles.shape
    smooth = smooth_log_likelihood(tiles, SMOOTH_KNOTS)
    pooled = smooth.reshape(c, nt * nw, e)
    if cloud is not None:
        cloud_smooth = smooth_log_likelihood(np.asarray(cloud, dtype=np.float64), SMOOTH_KNOTS)
        pooled = np.concatenate([pooled, cloud_smooth], axis=1)
    warp = fit_warp(fractions, pooled, grid)
    if warp_from == "medians":
        groups = independent_groups(smooth, MEDIAN_WARP_K)
        if cloud is not None:
            groups = np.concatenate([groups, disjoint_groups(cloud_smooth, MEDIAN_WARP_K)], axis=1)
        warp = refine_warp_by_medians(fractions, groups, grid, warp)
    elif warp_from != "peaks":
        raise DleStreamError(f"calibration: warp_from must be 'medians' or 'peaks', not {warp_from!r}")
    inside_pts = [(a, b) for a, b in warp if a <= 1.0]
    largest_shift = float(max(abs(b - a) for a, b in inside_pts)) if inside_pts else 0.0
    if largest_shift > WARP_SHIFT_WARNING:
        (log or (lambda _: None))(
            f"warning: the average likelihood of a true D peaks up to {largest_shift:.2f}·d_max away from it inside "
            f"the range: the model tells those D apart poorly, and combined numbers there rest on the warp; check "
            f"them with `bench --suite combine` before use")
    warped = warp_log_likelihood(smooth, grid, warp)
    warped = warped - warped.max(axis=-1, keepdims=True)
    sets = group_sets(warped)
    if cloud is not None:
        cw = warp_log_likelihood(cloud_smooth, grid, warp)
        sets.update(cloud_sets(cw - cw.max(axis=-1, keepdims=True)))
    # joint search: temperature (every window's width) and systematic error (shared by all
    # windows of one D), for intervals that hold the truth as often as they say in every
    # cell, after 1, 4 and 16 independent windows and after a tile's 8 consecutive windows.
    # (The log score instead favours wide likelihoods when a few windows miss badly: measured
    # on brain-qd-low, T = 1.28 and r = 0.03 held the truth in 83–86 % of 68 % intervals.)
    say = log or (lambda _: None)
    say(f"simulated {c} D values × {nt} tiles × {nw} windows; fitting the temperatures and the systematic error")
    # Temperatures (each window's width, as a profile over where it peaks) and the systematic
    # error (shared by all windows of one D) are fitted so that the intervals hold the truth
    # as often as they say in every cell, after 1, 4 and 16 independent windows and after a
    # tile's 8 consecutive windows. (The log score instead favours wide likelihoods when a
    # few windows miss badly: measured on brain-qd-low, T = 1.28 and r = 0.03 held the truth
    # in 83–86 % of 68 % intervals.) Alternating: temperature with r = 0 on single windows
    # and groups of 4, then r, then both again on every set.
    search = {**sets, "k1": sets["k1"][:, ::4]}  # a quarter of the single windows while searching
    single = {"k1": sets["k1"][:, ::2]}
    if "cloud_k1" in sets:
        search["cloud_k1"] = sets["cloud_k1"][:, ::4]
        single["cloud_k1"] = sets["cloud_k1"][:, ::2]
    _, t0 = min((cell_mismatch(coverage_table(single, f, grid, t, inside)), t) for t in TEMPERATURES[::4])
    t0, profile = (fit_temperature_profile(single, f, grid, t0, inside) if temperature_profile
                   else fit_temperature_profile(single, f, grid, t0, inside, slopes=(0.0,), curves=(0.0,)))
    if all(v == 1.0 for _, v in profile):
        profile = ()
    say(f"single windows: temperature {t0:.3g} × ({', '.join(f'{v:.2f}' for _, v in profile)}) at D = "
        f"({', '.join(f'{x:g}' for x, _ in profile)})·d_max")
    combined_profile: tuple[tuple[float, float], ...] = ()
    if posterior_profile:
        t0, combined_profile = fit_posterior_profile(search, f, grid, t0, inside)
    _, exponent, systematic = min(
        (cell_mismatch(coverage_table(search, f, replace(grid, systematic_rel=r, combine_exponent=b,
                                                         posterior_profile=combined_profile), t0, inside, profile)),
         b, r) for b in EXPONENTS for r in SYSTEMATICS)
    say(f"combined windows: information of K windows counted as K^{1 - exponent:.2g}, systematic error {systematic:.0%}")
    if posterior_profile:  # again, with the combination's exponent and systematic error in place
        t0, combined_profile = fit_posterior_profile(
            search, f, replace(grid, systematic_rel=systematic, combine_exponent=exponent), t0, inside)
        if all(v == 1.0 for _, v in combined_profile):
            combined_profile = ()
        say(f"combined log-likelihoods: temperature {t0:.3g}, divided by ({', '.join(f'{v:.2f}' for _, v in combined_profile)})"
            f" where they peak, at D = ({', '.join(f'{x:g}' for x, _ in combined_profile)})·d_max")
    smeared = replace(grid, systematic_rel=systematic, combine_exponent=exponent, posterior_profile=combined_profile)
    best = float(t0)
    mismatch = [cell_mismatch(coverage_table(sets, f, smeared, best, inside, profile))]
    tempered = warped / window_temperatures(warped, grid, best, profile)[..., None]
    temper = {k: v / window_temperatures(v, grid, best, profile)[..., None] for k, v in sets.items()}
    tile_sums = combine(tempered, axis=2)  # [cells, tiles, entries]: each tile's running likelihood
    roi = tile_sums[:, : (nt // ROI_TILES) * ROI_TILES].reshape(c, nt // ROI_TILES, ROI_TILES, e)
    # an ROI's successive windows, its tiles added in each (the "D changed over time" test)
    roi_windows = combine(tempered[:, : (nt // ROI_TILES) * ROI_TILES].reshape(c, nt // ROI_TILES, ROI_TILES, nw, e),
                          axis=2)
    null = {"independent_k4": temper["independent_k4"][inside],  # Λ is read from plain sums
            "independent_k16": temper["independent_k16"][inside],
            f"tile_k{nw}": tempered[inside], f"roi_{ROI_TILES}_tiles": roi[inside],
            f"roi_{ROI_TILES}_windows": roi_windows[inside]}
    if "cloud_k4" in temper:
        null.update({"cloud_k4": temper["cloud_k4"][inside], "cloud_k16": temper["cloud_k16"][inside]})
    say(f"temperature {best:.3g}, systematic error {systematic:.0%}; fitting the disagreement scale")
    lr_scale, false_alarms = fit_lr_scale(null)
    lr_raw = lr_false_alarms(null, 1.0)

    def summary(table: dict[str, np.ndarray]) -> dict:
        return {k: {"coverage68_min": float(v[:, 0].min()), "coverage68_max": float(v[:, 0].max()),
                    "coverage68_mean": float(v[:, 0].mean()), "coverage95_mean": float(v[:, 1].mean())}
                for k, v in table.items()}

    raw_sets = group_sets(tiles - tiles.max(axis=-1, keepdims=True))
    if cloud is not None:
        raw_sets.update(cloud_sets(np.asarray(cloud) - np.max(cloud, axis=-1, keepdims=True)))
    before = summary(coverage_table(raw_sets, f, grid, 1.0, judged))
    after = summary(coverage_table(sets, f, smeared, best, judged, profile))
    say("68 % intervals hold the true D (10–90 % of the range, cell by cell): "
        + "; ".join(f"{k}: {v['coverage68_min']:.0%}–{v['coverage68_max']:.0%}" for k, v in after.items()))
    result = {
        "fitted_to": ("68 % and 95 % interval coverage in every cell (D fixed per cell) after 1, 4 and 16 independent "
                      f"windows and after one tile's {nw} consecutive windows (steady density)"
                      + (f", and after 1, 4 and 16 independent windows of the paper's spreading cloud ({cloud.shape[1]} "
                         "per D)" if cloud is not None else "")
                      + "; likelihood-ratio scale for at most "
                      f"{LR_TARGET:.0%} false alarms at p < {LR_P} on homogeneous groups"),
        "coverage_mismatch": float(min(mismatch)), "smooth_knots": SMOOTH_KNOTS,
        "temperature": best, "temperature_profile": [list(p) for p in profile],
        "posterior_profile": [list(p) for p in combined_profile], "systematic_rel": systematic,
        "combine_exponent": exponent,
        "lr_scale": lr_scale,
        "disagreement_false_alarms": false_alarms, "disagreement_false_alarms_unscaled": lr_raw,
        "warp_points": len(warp), "warp_largest_shift": largest_shift, "warp_from": warp_from, "n_per_cell": nt * nw, "tiles_per_cell": nt, "windows_per_tile": nw,
        "seed": seed, "cells_d_fraction": list(fractions), "projected_to_spline_basis": projected,
        "judged_cells": "10–90 % of the range", "before": before, "after": after,
    }
    model.config = replace(raw, grid_temperature=best, grid_warp=warp, grid_systematic_rel=systematic,
                           grid_smooth_knots=SMOOTH_KNOTS, grid_lr_scale=lr_scale, grid_temperature_profile=profile,
                           grid_combine_exponent=exponent, grid_posterior_profile=combined_profile)
    card.training["likelihood_calibration"] = result
    previous = card.validation if isinstance(card.validation, dict) else {}
    n_val = int(previous.get("n_movies", 512)) if validation_movies is None else int(validation_movies)
    if n_val > 0:
        from dle_stream.training.validation import record_validation

        say(f"measuring the card's validation again with the calibration ({n_val} held-out movies)")
        record_validation(card, DiffusionEstimator(model, card, Path(folder), device), n_val)
    else:
        card.training.setdefault("validation_before_calibration", previous)  # the trainer's, kept on recalibration
        card.validation = {**previous, "measured": "before this calibration (not measured again)"}
    save_model_package(folder, model, card)
    return result

