"""Calibrating a grid model's likelihood: one temperature, fitted on held-out movies.

A network trained with the likelihood loss on a finite budget can be too cautious or too
sure: its window log-likelihood ℓ is then too flat or too sharp, and so is everything
combined from it. Dividing ℓ by one temperature T (docs/design.md §7b) is the smallest
correction. T is chosen by the log score — the mean log posterior density of the true D —
on movies simulated with the model's own priors and scan and a seed used for nothing else
(not the validation, suite or combination seeds); the 68 %/95 % interval coverage before
and after is recorded beside it. Measured on the shipped models (BENCHMARKS.md): fitting T
to the 68 % level instead (T ≈ 0.35–0.44) made single windows' intervals hold the truth
68 % of the time, but sharpened systematically shifted likelihoods so much that 16 windows
combined held it in 0–56 % of cases; the log score's T (≈ 0.84–0.93) keeps single-window
intervals conservative (≈ 80 %) and combined ones far less wrong. T is stored in the card's
architecture (``grid_temperature``) with the numbers it was fitted on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dle_stream.errors import DleStreamError
from dle_stream.likelihood import log_posterior_at, posterior

#: Seed of the calibration movies (distinct from validation 20240917, suites 20241001, combine 20241101).
CALIBRATION_SEED = 20_241_201
#: Temperatures tried (a geometric grid; the log score is smooth in T).
TEMPERATURES = np.geomspace(0.25, 2.0, 61)


def fit_temperature(folder: str | Path, n_movies: int = 1000, seed: int = CALIBRATION_SEED, batch: int = 32,
                    device: str = "cpu") -> dict:
    """Fit and store the temperature of the grid model in ``folder``; returns what was measured."""
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.model_package import load_model_package, save_model_package
    from dle_stream.training.priors import SimulatorPriors
    from dle_stream.training.simulator import Simulator

    model, card = load_model_package(folder, device=device)
    if model.config.output != "d_grid":
        raise DleStreamError(f"{folder}: only a model with a grid likelihood output can be calibrated")
    raw = replace(model.config, grid_temperature=1.0)
    model.config = raw
    est = DiffusionEstimator(model, card, Path(folder), device)
    priors = SimulatorPriors.from_dict(card.simulator["priors"]).operating()
    sim = Simulator(priors, est.timing, card.tile_height, card.tile_width, card.window_frames, device)
    g = torch.Generator(device=device).manual_seed(seed)
    lls, ds = [], []
    for i in range(0, n_movies, batch):
        b = sim.simulate(min(batch, n_movies - i), generator=g)
        ll, _ = est.window_log_likelihoods_of_movies(b.movies.cpu().numpy(), est.timing)
        lls.append(ll)
        ds.append(b.d_um2_s.cpu().numpy())
    ll = np.concatenate(lls)
    d = np.concatenate(ds)
    d_max = float(card.d_max_um2_s)
    scores = np.array([np.mean(log_posterior_at(ll / t, est.grid, d / d_max)) for t in TEMPERATURES])

    def coverage(t: float, level: str = "68") -> float:
        post = posterior(ll / t, est.grid, d_max)
        lo, hi = (post.lo68, post.hi68) if level == "68" else (post.lo95, post.hi95)
        return float(np.mean((lo <= d) & (d <= hi)))

    i = int(np.argmax(scores))
    best = float(TEMPERATURES[i])
    at_one = int(np.argmin(np.abs(TEMPERATURES - 1.0)))
    covered = np.array([coverage(t) for t in TEMPERATURES])
    result = {"temperature": best, "fitted_to": "log score", "n_movies": n_movies, "seed": seed,
              "interval68_coverage_raw": float(covered[at_one]), "interval68_coverage": float(covered[i]),
              "interval95_coverage_raw": coverage(1.0, "95"), "interval95_coverage": coverage(best, "95"),
              "log_score_raw": float(scores[at_one]), "log_score": float(scores[i]),
              "temperature_for_68_percent_coverage": float(TEMPERATURES[int(np.argmin(np.abs(covered - 0.6827)))])}
    model.config = replace(raw, grid_temperature=best)
    card.training["likelihood_calibration"] = result
    save_model_package(folder, model, card)
    return result
