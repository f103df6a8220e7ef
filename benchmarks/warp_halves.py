"""How noisy is the warp's statistic? Bench-combine raw windows of one model split in halves:
the warp fitted on the first half at the bench's own cells (peak of the average
log-likelihood, then optionally refined by combined medians), judged on the second half.

    python benchmarks/warp_halves.py MODEL RAW.npz
"""
import sys
from dataclasses import replace

import numpy as np

from dle_stream.likelihood import smooth_log_likelihood
from dle_stream.model_package import load_model_package
from dle_stream.training.calibration import (
    MEDIAN_WARP_K,
    SMOOTH_KNOTS,
    disjoint_groups,
    fit_warp,
    mean_peak,
    refine_warp_by_medians,
)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from combine_offline import cells_meeting, evaluate, summary  # noqa: E402

model, _ = load_model_package(sys.argv[1])
cfg = model.config
d = np.load(sys.argv[2])
cells, fr, n = d["cells"].astype(np.float64), tuple(float(f) for f in d["fractions"]), int(d["n"])
half = cells.shape[1] // 2
first = smooth_log_likelihood(cells[:, :half], SMOOTH_KNOTS)
second = smooth_log_likelihood(cells[:, half:], SMOOTH_KNOTS)
inside = [i for i, f in enumerate(fr) if f < 1]
for name, part in (("first", first), ("second", second)):
    print(f"peak shift, {name} half:", " ".join(f"{mean_peak(part[i], cfg.grid) - fr[i]:+.4f}" for i in inside))
peaks = fit_warp(fr, first, cfg.grid)
medians = refine_warp_by_medians(fr, disjoint_groups(first, MEDIAN_WARP_K), cfg.grid, peaks)
out = "/tmp/warp_halves_second.npz"
np.savez(out, cells=cells[:, half:], fractions=np.asarray(fr), n=n // 2)
for name, c in (("package's own calibration", cfg), ("warp from peaks, first half", replace(cfg, grid_warp=peaks)),
                ("warp from medians, first half", replace(cfg, grid_warp=medians))):
    rows = evaluate(out, c)
    print(f"{name}: {summary(rows)}; cells {cells_meeting(rows)[0]} of {cells_meeting(rows)[1]}")
