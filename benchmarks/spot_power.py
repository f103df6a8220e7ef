"""How often the spot test (dle_stream/spots.py) sees particles: pure Poisson noise, and simulated
windows of a model's priors (steady "box" and cloud) at 0.1–1.5·d_max, at 8, 10 and 12 σ —
the figures behind SPOT_Z in BENCHMARKS.md, ninth pass.

    python benchmarks/spot_power.py MODEL
"""
import sys

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.model_package import resolve_model
from dle_stream.spots import frame_spot_features, particles_seen
from dle_stream.training.calibration import _operating_simulator

name = sys.argv[1]
est = DiffusionEstimator.load(resolve_model(name))
psf = est.card.psf_priors["sigma_xy_um"][0] / est.card.pixel_size_um
ZS = (8.0, 10.0, 12.0)
rng = np.random.default_rng(0)
for bg in (1, 5, 100):
    m = rng.poisson(bg, (128, 400, 20, 20)).astype(np.float32)
    f = frame_spot_features(m, psf)
    print("noise bg", bg, "seen", [particles_seen(f, z=z).mean() for z in ZS])
for dens in ("box", "cloud"):
    sim, dmax = _operating_simulator(est, density=dens)
    g = torch.Generator().manual_seed(1)
    for fr in (0.1, 0.5, 0.9, 1.5):
        b = sim.simulate(64, generator=g, d_um2_s=fr * dmax)
        f = frame_spot_features(b.movies.numpy(), psf)
        vt = b.visible_transitions.numpy()
        out = []
        for z in ZS:
            seen = particles_seen(f, z=z)
            out.append(f"z{z:g}: seen {seen.mean():.2f} (vt≥20: {seen[vt >= 20].mean():.2f}, vt=0: {seen[vt == 0].mean() if (vt == 0).any() else float('nan'):.2f})")
        print(f"{dens} D {fr}: vt=0 share {np.mean(vt == 0):.2f}; " + "; ".join(out), flush=True)
