"""How often the running combination calls homogeneous data inconsistent (issue 11 item 4:
false alarms ≤ 5 %), on a model's own windows of steady-density tiles filmed over 8
independent windows (`calibrate`'s tiles, kept in a latent bank), fed through the real
:class:`dle_stream.combine.RunningCombination`.

    python benchmarks/roi_false_alarms.py PACKAGE EVAL_DIR

EVAL_DIR: what `benchmarks/latent_bank.py raw` wrote for PACKAGE (tiles.npy: [D cells,
tiles, 8 windows, grid]). Each D cell inside 10–90 % of the range: its tiles in ROIs of 1,
4 and 16 tiles, 8 windows added one by one; counted after the 8th: a tile's windows flagged
(the tile map's ≠), an ROI's tiles flagged, an ROI's windows flagged ("D changed"), and an
ROI given no number (either).
"""
import sys
from pathlib import Path

import numpy as np

from dle_stream.combine import RunningCombination
from dle_stream.model_package import load_model_package
from dle_stream.training import calibration as cal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from combine_offline import calibrated  # noqa: E402


def main() -> None:
    pkg, folder = sys.argv[1], Path(sys.argv[2])
    model, card = load_model_package(pkg)
    cfg = model.config
    fr = np.array(cal.INSIDE_FRACTIONS + cal.BEYOND_FRACTIONS)
    tiles = np.load(folder / "tiles.npy", mmap_mode="r")
    print(f"{pkg}: {tiles.shape[1]} tiles × {tiles.shape[2]} windows per D cell; rates over the cells in 10–90 %")
    print("ROI tiles | ROIs | tile windows ≠ | ROI tiles disagree | ROI windows disagree | ROI without a number")
    for size in (1, 4, 16):
        counts = np.zeros(4)
        n_rois = n_tiles = 0
        for i, f in enumerate(fr):
            if not 0.1 <= f <= 0.9:
                continue
            t = np.asarray(tiles[i], dtype=np.float64)  # [tiles, windows, n]
            n_t = (t.shape[0] // size) * size
            ll = calibrated(t[:n_t].reshape(-1, t.shape[-1]), cfg).reshape(n_t, t.shape[1], -1)
            regions = [list(range(j, j + size)) for j in range(0, n_t, size)]
            c = RunningCombination(n_t, regions, windows_apart=1, keep=t.shape[1], grid=cfg.grid, d_max_um2_s=1.0)
            for w in range(t.shape[1]):
                c.add(ll[:, w])
            counts += [c.tile_disagree.sum(), c.region_disagree.sum(), (c.region_changed & ~c.region_disagree).sum(),
                       sum(s is not None for s in c.region_spread)]
            n_rois += len(regions)
            n_tiles += n_t
        print(f"{size:9d} | {n_rois:4d} | {counts[0] / n_tiles:14.3f} | {counts[1] / n_rois:18.3f} | "
              f"{counts[2] / n_rois:20.3f} | {counts[3] / n_rois:20.3f}")


if __name__ == "__main__":
    main()
