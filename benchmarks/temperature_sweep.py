"""Temperature and contamination sweep of a grid model's combined estimates (issue 11 study).

Simulates 320 independent windows at each of D = 0.15, 0.5, 0.85 × d_max (the model's own
priors and scan, seed 777), takes the raw window log-likelihoods (temperature 1), and for a
grid of temperatures T and contamination shares eps (a window's likelihood mixed with a
flat one) prints: single-window 68 % coverage (K1), and for 20 disjoint groups of 16
windows the 68 % coverage, z = (D̂ − D)/σ̂ mean/std and the disagreement test's false
alarm rate (fa). Usage: python benchmarks/temperature_sweep.py brain-qd-low
"""
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from dle_stream.combine import disagreement_p
from dle_stream.estimator import DiffusionEstimator
from dle_stream.likelihood import combine, posterior
from dle_stream.model_package import load_model_package
from dle_stream.training.priors import SimulatorPriors
from dle_stream.training.simulator import Simulator

name = sys.argv[1]
m, c = load_model_package(f"models/{name}")
m.config = replace(m.config, grid_temperature=1.0)
est = DiffusionEstimator(m, c)
pri = SimulatorPriors.from_dict(c.simulator["priors"]).operating()
sim = Simulator(pri, est.timing, 20, 20, 400)
g = torch.Generator().manual_seed(777)
dmax = c.d_max_um2_s
data = {}
t0 = time.time()
for f in (0.15, 0.5, 0.85):
    lls = []
    for _ in range(10):
        b = sim.simulate(32, generator=g, d_um2_s=f * dmax)
        ll, _ = est.window_log_likelihoods_of_movies(b.movies.numpy(), est.timing)
        lls.append(ll)
    data[f] = np.concatenate(lls)  # 320 windows
print("sim s", time.time() - t0, flush=True)
grid = est.grid
def robust(ll, T, eps):
    """ll / T, normalised to a density over the grid, mixed with a flat density (share eps)."""
    scaled = ll / T
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    fine = scaled[:, :-1] @ grid.interp_matrix
    Z = np.log((np.exp(fine) * grid.fine_weights).sum(1) + np.exp(scaled[:, -1]) * grid.top)
    dens = scaled - Z[:, None]
    flat = np.log(1.0 / (2 * grid.top))  # flat density over [0, 2 top]
    out = np.logaddexp(np.log1p(-eps) + dens, np.log(eps) + flat) if eps > 0 else dens
    return out - out.max(axis=-1, keepdims=True)
for T in (0.35, 0.6, 1.0, 1.5):
    for eps in (0.0, 0.02, 0.1, 0.3):
        row = []
        for f, ll in data.items():
            r = robust(ll, T, eps)
            p1 = posterior(r, grid, dmax)
            cov1 = np.mean((p1.lo68 <= f * dmax) & (f * dmax <= p1.hi68))
            groups = r[:320].reshape(20, 16, -1)
            p = posterior(combine(groups, axis=1), grid, dmax)
            z = (p.d - f * dmax) / p.sigma
            cov = np.mean((p.lo68 <= f * dmax) & (f * dmax <= p.hi68))
            fa = np.mean(disagreement_p(groups, axis=1) < 0.01)
            row.append(f"f{f}: K1 {cov1:.2f} K16 cov {cov:.2f} z {z.mean():+.1f}/{z.std():.1f} fa {fa:.2f}")
        print(f"T {T} eps {eps}: " + " | ".join(row), flush=True)
