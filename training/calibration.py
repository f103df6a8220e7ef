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

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dle_stream.errors import DleStreamError
from dle_stream.likelihood import DGrid, combine, log_posterior_at, posterior, warp_log_likelihood

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


def simulate_cells(est, fractions: tuple[float, ...], n: int, seed: int = CALIBRATION_SEED, batch: int = 32,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Raw window log-likelihoods [cells, n, grid entries] of ``est`` for movies of D fixed at
    each fraction of d_max (the model's operating priors and scan otherwise)."""
    from dle_stream.training.priors import SimulatorPriors
    from dle_stream.training.simulator import Simulator

    card = est.card
    d_max = float(card.d_max_um2_s)
    priors = (SimulatorPriors.from_dict(card.simulator["priors"]).operating() if card.simulator.get("priors")
              else SimulatorPriors(d_max_um2_s=d_max))
    sim = Simulator(priors, est.timing, card.tile_height, card.tile_width, card.window_frames, est.device)
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


def mean_peak(log_likelihoods: np.ndarray, grid: DGrid) -> float:
    """Where the average of windows' log-likelihoods [n, entries] peaks (units of d_max, on [0, top])."""
    fine = np.mean(np.asarray(log_likelihoods, dtype=np.float64)[:, :-1], axis=0) @ grid.interp_matrix
    return float(grid.fine[int(np.argmax(fine))])


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
    m = np.clip(np.maximum.accumulate(f + smooth), 0.0, grid.top)
    return tuple((float(a), float(b)) for a, b in zip(f, m))


def combined_groups(cells: np.ndarray, k: int) -> np.ndarray:
    """Disjoint groups of ``k`` windows per cell, combined: [cells, n // k, entries]."""
    c, n, e = cells.shape
    g = n // k
    return combine(cells[:, : g * k].reshape(c, g, k, e), axis=2)


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


def calibrate(folder: str | Path, n_per_cell: int = 256, seed: int = CALIBRATION_SEED, batch: int = 32,
              device: str = "cpu", progress: Callable[[int], None] | None = None,
              fractions: tuple[float, ...] = INSIDE_FRACTIONS + BEYOND_FRACTIONS) -> dict:
    """Fit and store the warp and temperature of the grid model in ``folder``; returns what was measured.

    ``fractions``: the true D of the cells, units of d_max, increasing (default: 20 inside
    the range and 5 above it).
    """
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.model_package import load_model_package, save_model_package
    from dle_stream.training.output_basis import project_output_to_spline_basis

    if n_per_cell < 16:
        raise DleStreamError(f"calibration: {n_per_cell} movies per D value is too few (at least 16)")
    model, card = load_model_package(folder, device=device)
    if model.config.output != "d_grid":
        raise DleStreamError(f"{folder}: only a model with a grid likelihood output can be calibrated")
    projected = not model.config.grid_basis
    if projected:
        model = project_output_to_spline_basis(model)
    raw = replace(model.config, grid_temperature=1.0, grid_warp=(), grid_systematic_rel=0.0)
    model.config = raw
    est = DiffusionEstimator(model, card, Path(folder), device)
    grid = raw.grid
    fractions = tuple(float(f) for f in fractions)
    if not fractions or max(fractions) > grid.top:
        raise DleStreamError(f"calibration: true D values must lie within the grid (≤ {grid.top:g}·d_max)")
    cells = simulate_cells(est, fractions, n_per_cell, seed=seed, batch=batch, progress=progress)
    warp = fit_warp(fractions, cells, grid)
    warped = warp_log_likelihood(cells, grid, warp)
    # joint search: temperature (every window's width) and systematic error (shared by all),
    # for intervals that hold the truth as often as they say after 1, 4 and 16 windows. (The
    # log score instead favours wide likelihoods when a few windows miss badly: measured on
    # brain-qd-low, T = 1.28 and r = 0.03 held the truth in 83–86 % of 68 % intervals.)
    coarse = TEMPERATURES[::4]
    table = [(coverage_mismatch(warped, fractions, replace(grid, systematic_rel=r), t), t, r)
             for r in SYSTEMATICS for t in coarse]
    _, t0, systematic = min(table)
    smeared = replace(grid, systematic_rel=systematic)
    near = TEMPERATURES[(TEMPERATURES >= t0 / 1.2) & (TEMPERATURES <= t0 * 1.2)]
    mismatch = np.array([coverage_mismatch(warped, fractions, smeared, t) for t in near])
    best = float(near[int(np.argmin(mismatch))])
    scores = np.array([combined_log_score(warped, fractions, smeared, best)])
    before = combined_figures(cells, fractions, grid)
    after = combined_figures(warped / best, fractions, smeared)
    result = {
        "fitted_to": "68 % and 95 % interval coverage after combining 1, 4 and 16 windows, D fixed per cell",
        "coverage_mismatch": float(mismatch.min()),
        "temperature": best, "systematic_rel": systematic, "warp_points": len(warp), "n_per_cell": n_per_cell,
        "seed": seed, "cells_d_fraction": list(fractions), "projected_to_spline_basis": projected,
        "log_score_raw": combined_log_score(cells, fractions, grid, 1.0), "log_score": float(scores.max()),
        "before": before, "after": after,
    }
    model.config = replace(raw, grid_temperature=best, grid_warp=warp, grid_systematic_rel=systematic)
    card.training["likelihood_calibration"] = result
    save_model_package(folder, model, card)
    return result
