"""The `calibrate` windows of a model, simulated in two processes (steady tiles | cloud windows),
then fitted offline — what BENCHMARKS "Honest numbers, sixth pass" ran.

    python benchmarks/calibration_windows.py tiles MODEL TILES.npy     # 64 tiles × 8 windows per D
    python benchmarks/calibration_windows.py cloud MODEL CLOUD.npy     # 512 cloud windows per D
    python benchmarks/calibration_windows.py fit MODEL TILES.npy CLOUD.npy OUT_DIR peaks|medians 0|1|posterior

``fit`` copies MODEL to the new folder OUT_DIR and calibrates the copy on the saved windows
(warp from peaks or combined medians; 1: with the per-window temperature profile;
posterior: with the profile read where combined log-likelihoods peak). The seeds are
`calibrate`'s (tiles 20241201, cloud 20241202), so the windows are the ones it simulates.
"""
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dle_stream.training import calibration as cal

part, model_dir = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
t = time.time()
if part in ("tiles", "cloud"):
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.model_package import load_model_package

    out = Path(sys.argv[3])
    if out.exists():
        raise SystemExit(f"{out}: exists; choose another file")
    model, card = load_model_package(model_dir)
    model.config = model.config.uncalibrated()
    est = DiffusionEstimator(model, card, Path(model_dir), "cpu")
    fr = cal.INSIDE_FRACTIONS + cal.BEYOND_FRACTIONS
    x = (cal.simulate_tile_cells(est, fr, 512 // cal.TILE_WINDOWS, cal.TILE_WINDOWS, seed=cal.CALIBRATION_SEED)
         if part == "tiles" else cal.simulate_cells(est, fr, 512, seed=cal.CALIBRATION_SEED + 1))
    tmp = out.with_name(out.name + ".part.npy")
    np.save(tmp, x.astype(np.float32))
    tmp.rename(out)
    print(part, x.shape, f"{time.time() - t:.0f} s")
elif part == "fit":
    tiles, cloud, dst = np.load(sys.argv[3]), np.load(sys.argv[4]), Path(sys.argv[5])
    if dst.exists():
        raise SystemExit(f"{dst}: exists; choose a new folder")
    shutil.copytree(model_dir, dst)
    r = cal.calibrate(dst, tiles=tiles.astype(np.float64), cloud=cloud.astype(np.float64), log=print,
                      warp_from=sys.argv[6], temperature_profile=sys.argv[7] == "1",
                      posterior_profile=sys.argv[7] == "posterior")
    print({k: r[k] for k in ("temperature", "temperature_profile", "posterior_profile", "systematic_rel",
                             "combine_exponent", "lr_scale")},
          f"{time.time() - t:.0f} s")
else:
    raise SystemExit(f"{part}: use tiles, cloud or fit")
