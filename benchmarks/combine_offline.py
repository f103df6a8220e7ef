"""Evaluate a model's calibration offline on raw windows saved by benchmarks/combine_raw_windows.py.

    python benchmarks/combine_offline.py MODEL RAW.npz [--beta B]
"""

import numpy as np

from dle_stream.likelihood import LOG_FLOOR, combine, posterior


def calibrated(raw, cfg):
    """raw: window ll = network output - prior (what the raw-config estimator returned). Apply cfg's calibration."""
    from dle_stream.likelihood import smooth_log_likelihood, warp_log_likelihood, window_temperatures
    ll = np.asarray(raw, dtype=np.float64)
    if cfg.grid_smooth_knots > 0:
        ll = smooth_log_likelihood(ll, cfg.grid_smooth_knots)
    if len(cfg.grid_warp):
        ll = warp_log_likelihood(ll, cfg.grid, cfg.grid_warp)
    ll = ll - ll.max(-1, keepdims=True)
    ll = ll / window_temperatures(ll, cfg.grid, cfg.grid_temperature, cfg.grid_temperature_profile)[..., None]
    return np.maximum(ll, LOG_FLOOR)


def evaluate(path, cfg, n=None, ks=(1, 4, 16), verbose=False):
    d = np.load(path)
    cells, fr = d["cells"], d["fractions"]
    n = n or int(d["n"])
    grid = cfg.grid
    rows = []
    for f, raw in zip(fr, cells):
        ll = calibrated(raw, cfg)
        for k in ks:
            n_k = n * max(ks) // k  # every window at every K, as bench --suite combine
            g = ll[: n_k * k].reshape(n_k, k, -1)
            post = posterior(combine(g, axis=1), grid, 1.0, n_windows=np.full(n_k, k))
            z = (post.d - f) / post.sigma
            rows.append(dict(f=float(f), k=k, bias=float(np.mean(post.d - f)), zm=float(np.mean(z)), zs=float(np.std(z)),
                             c68=float(np.mean((post.lo68 <= f) & (f <= post.hi68))),
                             c95=float(np.mean((post.lo95 <= f) & (f <= post.hi95))),
                             above=float(np.mean(post.above_range)),
                             above_or_little=float(np.mean(post.above_range | post.little_information))))
    return rows


def summary(rows):
    ins = [r for r in rows if 0.1 <= r["f"] <= 0.9]
    k16 = [r for r in ins if r["k"] == 16]
    low = [r for r in rows if r["f"] <= 0.8]
    hi1 = [r for r in rows if r["f"] >= 1.2 and r["k"] == 1]
    hi16 = [r for r in rows if r["f"] >= 1.2 and r["k"] == 16]
    return (f"K16 |zm| ≤ {max(abs(r['zm']) for r in k16):.2f}, zs {min(r['zs'] for r in k16):.2f}–{max(r['zs'] for r in k16):.2f}; "
            f"c68 all K {min(r['c68'] for r in ins):.2f}–{max(r['c68'] for r in ins):.2f}; "
            f"above ≤0.8: {max(r['above'] for r in low):.2f}; ≥1.2 K1 flagged ≥ {min(r['above_or_little'] for r in hi1):.2f}; "
            f"K16 above ≥ {min(r['above'] for r in hi16):.2f}")


def cells_meeting(rows) -> tuple[int, int]:
    """Cells inside 10–90 % of the range meeting issue 11's per-cell criteria: K = 16 |z mean|
    ≤ 0.25 and z std 0.8–1.25, 68 % coverage 60–76 % at every K. (met, judged)."""
    cells = sorted({r["f"] for r in rows if 0.1 <= r["f"] <= 0.9})
    met = 0
    for f in cells:
        mine = [r for r in rows if r["f"] == f]
        k16 = [r for r in mine if r["k"] == 16]
        ok = all(abs(r["zm"]) <= 0.25 and 0.8 <= r["zs"] <= 1.25 for r in k16)
        met += ok and all(0.60 <= r["c68"] <= 0.76 for r in mine)
    return met, len(cells)


def table(rows):
    for r in rows:
        print(f"{r['f']:5.2f} K{r['k']:<2d} bias {r['bias']:+.4f} z {r['zm']:+.2f} ± {r['zs']:.2f}  c68 {r['c68']:.2f} c95 {r['c95']:.2f} above {r['above']:.2f} a|l {r['above_or_little']:.2f}")


if __name__ == "__main__":
    import sys
    from dataclasses import replace

    from dle_stream.model_package import load_model_package
    model, _ = load_model_package(sys.argv[1])
    cfg = model.config
    if len(sys.argv) > 3:  # e.g. `--beta 0`: the combine exponent β replaced (what-if)
        if sys.argv[3] != "--beta" or len(sys.argv) != 5:
            raise SystemExit("usage: combine_offline.py MODEL RAW.npz [--beta B]")
        cfg = replace(cfg, grid_combine_exponent=float(sys.argv[4]))
    rows = evaluate(sys.argv[2], cfg)
    table(rows)
    print(summary(rows))
    print("cells meeting the per-cell criteria: %d of %d" % cells_meeting(rows))
