"""Raw (uncalibrated) window log-likelihoods of bench --suite combine's cells, saved for offline evaluation.

    python benchmarks/combine_raw_windows.py MODEL OUT.npz cloud|box N
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.evaluation.bench_combine import BEYOND, INSIDE
from dle_stream.model_package import load_model_package
from dle_stream.training.calibration import simulate_cells

m, out, density, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if out.exists():
    raise SystemExit(f"{out}: exists; choose another file")
torch.set_num_threads(1)
model, card = load_model_package(m)
model.config = model.config.uncalibrated()
est = DiffusionEstimator(model, card, Path(m), "cpu")
fr = tuple(INSIDE + BEYOND)
t = time.time()
cells = simulate_cells(est, fr, n * 16, seed=20_241_101, density=density)
tmp = out.with_name(out.name + ".part.npz")
np.savez(tmp, cells=cells.astype(np.float32), fractions=np.asarray(fr), density=density, n=n)
if out.exists():
    raise SystemExit(f"{out}: appeared while simulating; the windows are in {tmp}")
tmp.rename(out)
print(out, cells.shape, f"{time.time()-t:.0f} s")
