"""Judge a grid model's likelihood calibration on fresh tiles filmed over time.

Simulates, per true D (the calibration's 25 values, units of d_max), ``--tiles`` tiles each
filmed for 8 consecutive windows with a seed other than the calibration's, applies the
model's calibration (smoothing, warp, temperature, information exponent, systematic error)
and prints, per kind of combination (single windows, 4 and 16 independent windows, a tile's
8, 8 tiles' 64), how often the 68 % and 95 % intervals hold the true D, cell by cell over
10–90 % of the range, and the disagreement test's false-alarm rate on these homogeneous
groups (BENCHMARKS.md, "Honest numbers, third pass").

    python benchmarks/calibration_check.py --model brain-qd-low --tiles 64 --seed 777
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.likelihood import combine, smooth_log_likelihood, warp_log_likelihood, window_temperatures
from dle_stream.model_package import resolve_model
from dle_stream.training.calibration import (
    BEYOND_FRACTIONS,
    INSIDE_FRACTIONS,
    ROI_TILES,
    TILE_WINDOWS,
    coverage_table,
    group_sets,
    lr_false_alarms,
    simulate_tile_cells,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brain-qd-low")
    ap.add_argument("--tiles", type=int, default=64, help="tiles per true D (each filmed for 8 windows)")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    est = DiffusionEstimator.load(resolve_model(args.model))
    cfg = est.model.config
    calibrated = cfg
    est.model.config = cfg.uncalibrated()
    f = np.asarray(INSIDE_FRACTIONS + BEYOND_FRACTIONS)
    raw = simulate_tile_cells(est, tuple(f), args.tiles, TILE_WINDOWS, seed=args.seed)
    grid = calibrated.grid
    x = smooth_log_likelihood(raw, calibrated.grid_smooth_knots) if calibrated.grid_smooth_knots else raw
    if calibrated.grid_warp:
        x = warp_log_likelihood(x, grid, calibrated.grid_warp)
    x = x - x.max(axis=-1, keepdims=True)
    t, prof = calibrated.grid_temperature, calibrated.grid_temperature_profile
    sets = group_sets(x)
    judged = np.flatnonzero((f >= 0.1) & (f <= 0.9))
    print(f"{est.card.name}: T {t:.3g}, exponent {grid.combine_exponent:g}, systematic {grid.systematic_rel:g}, "
          f"lr_scale {grid.lr_scale:.3g}, smoothing {calibrated.grid_smooth_knots:g} knots; {args.tiles} tiles × "
          f"{TILE_WINDOWS} windows per D, seed {args.seed}")
    print("| | 68 % by cell (fewest–most) | 68 % all cells | 95 % by cell | 95 % all cells |\n|---|---|---|---|---|")
    for name, v in coverage_table(sets, f, grid, t, judged, prof).items():
        print(f"| {name} | {v[:, 0].min():.2f}–{v[:, 0].max():.2f} | {v[:, 0].mean():.2f} | "
              f"{v[:, 1].min():.2f}–{v[:, 1].max():.2f} | {v[:, 1].mean():.2f} |")

    def tempered(v: np.ndarray) -> np.ndarray:
        return v / window_temperatures(v, grid, t, prof)[..., None]

    inside = np.flatnonzero(f <= 1.0)
    tiles = tempered(x)
    c, nt, nw, e = tiles.shape
    roi = combine(tiles, axis=2)[:, : (nt // ROI_TILES) * ROI_TILES].reshape(c, nt // ROI_TILES, ROI_TILES, e)
    null = {"independent_k4": tempered(sets["independent_k4"])[inside],
            "independent_k16": tempered(sets["independent_k16"])[inside],
            f"tile_k{nw}": tiles[inside], f"roi_{ROI_TILES}_tiles": roi[inside]}
    scaled, plain = lr_false_alarms(null, grid.lr_scale), lr_false_alarms(null, 1.0)
    print("disagreement false alarms (p < 0.01), with the model's scale / χ² as is: "
          + ", ".join(f"{k} {scaled[k]:.1%} / {plain[k]:.1%}" for k in null))


if __name__ == "__main__":
    main()
