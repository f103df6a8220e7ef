"""16 windows combined, per true D: z = (D̂ − D)/σ̂ of a package's calibration on `calibrate`'s
own windows, the paper's spreading cloud and steady-density tiles apart, beside `bench --suite
combine`'s cloud cells (issue 11: whether one warp can serve both densities); the
single-window L1 on each density over the 20 D values inside the range; and how often the 68 %
intervals of steady windows hold D, single and 16 combined (mean over the D values in 10–90 %).

    python benchmarks/density_bias.py PACKAGE EVAL_DIR

EVAL_DIR: what `benchmarks/latent_bank.py raw` wrote for PACKAGE's weights (tiles.npy,
cloud.npy, raw-cloud.npz). Steady groups take one window from each of 16 different tiles
(independent samples); cloud groups are 16 consecutive independent windows.
"""
import sys
from pathlib import Path

import numpy as np

from dle_stream.likelihood import combine, posterior
from dle_stream.model_package import load_model_package
from dle_stream.training import calibration as cal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from combine_offline import calibrated, evaluate  # noqa: E402


def k16(ll: np.ndarray, f: float, grid) -> tuple[float, float, int, float]:
    """z mean, z std, groups and 68 % coverage of disjoint groups of 16 windows combined."""
    g = ll[: (ll.shape[0] // 16) * 16].reshape(-1, 16, ll.shape[-1])
    post = posterior(combine(g, axis=1), grid, 1.0, n_windows=np.full(g.shape[0], 16))
    z = (post.d - f) / post.sigma
    return float(np.mean(z)), float(np.std(z)), g.shape[0], float(np.mean((post.lo68 <= f) & (f <= post.hi68)))


def main() -> None:
    pkg, folder = sys.argv[1], Path(sys.argv[2])
    model, card = load_model_package(pkg)
    cfg = model.config
    d_max = float(card.d_max_um2_s)
    fr = np.array(cal.INSIDE_FRACTIONS + cal.BEYOND_FRACTIONS)
    tiles = np.load(folder / "tiles.npy", mmap_mode="r")
    cloud = np.load(folder / "cloud.npy", mmap_mode="r")
    bench = {round(r["f"], 3): r for r in evaluate(folder / "raw-cloud.npz", cfg) if r["k"] == 16}
    print("D/d_max  cloud z mean, std (groups)  steady z mean, std (groups)  bench cloud z mean, std at D")
    rows, l1 = [], {"cloud": [], "steady": []}
    for i, f in enumerate(fr):
        if f > 1.0:
            continue
        lc = calibrated(np.asarray(cloud[i], dtype=np.float64), cfg)
        t = np.asarray(tiles[i], dtype=np.float64)  # [tiles, windows, entries] → window-major
        lt = calibrated(t.transpose(1, 0, 2).reshape(-1, t.shape[-1]), cfg)
        a, b = k16(lc, f, cfg.grid), k16(lt, f, cfg.grid)
        single = {name: posterior(ll, cfg.grid, 1.0) for name, ll in (("cloud", lc), ("steady", lt))}
        for name, post in single.items():
            l1[name].append(np.mean(np.abs(post.d - f)) * d_max)
        steady_c68 = float(np.mean((single["steady"].lo68 <= f) & (f <= single["steady"].hi68)))
        near = min(bench, key=lambda x: abs(x - f))
        br = bench[near] if abs(near - f) < 0.03 else None
        rows.append((f, a[0], b[0], steady_c68, b[3]))
        print(f"{f:6.3f}   {a[0]:+.2f} {a[1]:.2f} ({a[2]})          {b[0]:+.2f} {b[1]:.2f} ({b[2]})          "
              + (f"{br['zm']:+.2f} {br['zs']:.2f} at {near}" if br else ""))
    r = np.array([x for x in rows if 0.1 <= x[0] <= 0.9])
    print(f"10–90 %: mean z cloud {r[:, 1].mean():+.2f}, steady {r[:, 2].mean():+.2f}; single-window L1 "
          f"over the 20 D values inside the range: cloud {np.mean(l1['cloud']):.4g}, steady {np.mean(l1['steady']):.4g} µm²/s")
    print(f"steady 68 % coverage, 10–90 %: single windows {r[:, 3].min():.2f}–{r[:, 3].max():.2f} (mean {r[:, 3].mean():.2f}), "
          f"16 combined {r[:, 4].min():.2f}–{r[:, 4].max():.2f} (mean {r[:, 4].mean():.2f})")


if __name__ == "__main__":
    main()
