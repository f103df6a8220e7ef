"""Raw (uncalibrated) window log-likelihoods of a Table 1 suite, saved for offline evaluation.

The suite's movies are simulated exactly as ``dle-stream bench --suite SUITE --n N`` does
(same seed, same batches), so a calibration applied offline to these windows
(benchmarks/suite_offline.py) gives the numbers that bench would give with that
calibration in the package, in seconds instead of the suite's minutes of simulation.

    python benchmarks/suite_raw_windows.py MODEL low|high N OUT.npz [--seed S]
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.model_package import load_model_package
from dle_stream.training.priors import get_preset
from dle_stream.training.simulator import Simulator

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("suite", choices=("low", "high"))
ap.add_argument("n", type=int)
ap.add_argument("out", type=Path)
ap.add_argument("--seed", type=int, default=20241001)
ap.add_argument("--batch", type=int, default=32)
a = ap.parse_args()
if a.out.exists():
    raise SystemExit(f"{a.out}: exists; choose another file")
torch.set_num_threads(1)
model, card = load_model_package(a.model)
model.config = model.config.uncalibrated()
est = DiffusionEstimator(model, card, Path(a.model), "cpu")
preset = get_preset(a.suite)
sim = Simulator(preset.priors, preset.timing, preset.tile_height, preset.tile_width, preset.frames, "cpu")
g = torch.Generator().manual_seed(a.seed)
t0 = time.time()
d_true, lls, done = [], [], 0
while done < a.n:
    m = min(a.batch, a.n - done)
    b = sim.simulate(m, generator=g)
    d_true.append(b.d_um2_s.cpu().numpy())
    ll, scale = est.window_log_likelihoods_of_movies(b.movies.cpu().numpy(), preset.timing)
    lls.append(ll)
    done += m
tmp = a.out.with_name(a.out.name + ".part.npz")
np.savez(tmp, raw=np.concatenate(lls).astype(np.float32), d_true=np.concatenate(d_true), suite=a.suite, seed=a.seed,
         d_max=float(card.d_max_um2_s) / scale, prior_mean=preset.priors.d_mean_um2_s, prior_std=preset.priors.d_std_um2_s)
if a.out.exists():
    raise SystemExit(f"{a.out}: appeared while simulating; the windows are in {tmp}")
tmp.rename(a.out)
print(a.out, done, f"{time.time() - t0:.0f} s")
