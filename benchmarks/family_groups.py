"""Combining 16 windows with a family model, per reference scan, for several smoothings of
its window log-likelihood (issue 16 item 3; the bumps of issue 11).

For every reference scan inside the package's box: ``--groups`` groups of 16 independent
movies of one D (D uniform on the range, the preset's operating priors, seed ``--seed``);
each window's log-likelihood is read with the package's settings except the smoothing
(``--smooth``: Gaussian sd in knots, :func:`dle_stream.likelihood.smooth_log_likelihood`),
the 16 are added, and the table gives single-window L1 and 68 % coverage, and the combined
z = (median − D)/σ: mean, std and largest |z|.

    python benchmarks/family_groups.py PACKAGE --range low [--groups 24] [--seed 4242] [--smooth 0,3,6]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.likelihood import posterior
from dle_stream.scan_family import REFERENCE_SCANS
from dle_stream.training.priors import get_preset
from dle_stream.training.simulator import Simulator

K = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--range", choices=("low", "high"), required=True)
    ap.add_argument("--groups", type=int, default=24)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--smooth", default="0,3,6")
    a = ap.parse_args()
    torch.set_num_threads(1)
    est = DiffusionEstimator.load(a.package)
    smooths = [float(s) for s in a.smooth.split(",")]
    p = get_preset(a.range)
    box = est.card.family
    print(f"{est.card.name}: {a.groups} groups of {K} windows per scan, seed {a.seed}")
    print("| scan | smoothing (knots) | single L1 | single 68 % | K=16 z mean | z std | max abs z |")
    print("|---|---|---|---|---|---|---|")
    base = est.model.config
    for name, timing in REFERENCE_SCANS.items():
        if box is not None and not box.contains(timing):
            continue
        if box is None and not est.card.timing.compare(timing).compatible:
            continue
        sim = Simulator(p.priors.operating(), timing, p.tile_height, p.tile_width, p.frames, "cpu")
        g = torch.Generator().manual_seed(a.seed)
        latents, truth = [], []
        for _ in range(a.groups):
            d = sim.draw_d(1, g)
            b = sim.simulate(K, generator=g, d_um2_s=d.repeat(K))
            movies = b.movies.cpu().numpy()
            latents.append(est.encode(movies.reshape(-1, *movies.shape[2:])).reshape(K, movies.shape[1], -1))
            truth.append(float(d[0]))
        truth_arr = np.array(truth)
        for s in smooths:
            est.model.config = replace(base, grid_smooth_knots=s)
            ll = np.stack([est.window_log_likelihoods(x, timing) for x in latents])  # [groups, K, n]
            single = posterior(ll, est.grid, est.d_max_um2_s)
            combined = posterior(ll.sum(axis=1), est.grid, est.d_max_um2_s)
            l1 = float(np.mean(np.abs(single.d - truth_arr[:, None])))
            cov = float(np.mean((single.lo68 <= truth_arr[:, None]) & (truth_arr[:, None] <= single.hi68)))
            z = (combined.d - truth_arr) / combined.sigma
            print(f"| {name} | {s:g} | {l1:.4g} | {cov:.2f} | {z.mean():+.2f} | {z.std():.2f} | {np.abs(z).max():.1f} |",
                  flush=True)
        est.model.config = base


if __name__ == "__main__":
    main()
