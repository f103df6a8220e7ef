"""Do an ROI's tiles combine honestly when they share one microscope and sample?

`calibrate` and the latent bank film every tile with its own draw of PSF widths,
background, brightness and gain, as independent training movies have them. The tiles of
one recording share those. If a model's error depends on them, the errors of an ROI's
tiles are correlated, and an ROI's interval (its tiles' windows added as independent)
claims more than it holds. This measures it: for each D cell inside 10–90 % of the range
(the bank's cells 0.125, 0.225, …, 0.825·d_max), groups of 4 steady-density tiles that
share one instrument (``Simulator.draw_instrument``), each filmed for 8 consecutive
windows; then an ROI = one group (32 windows), read with a package's calibration through
the real :class:`dle_stream.combine.RunningCombination`, against ROIs of 4 tiles with their
own instruments (the bank's ``tiles.npy``, same cells).

    python benchmarks/shared_instrument.py simulate MODEL OUT.npy [--groups 16]
    python benchmarks/shared_instrument.py judge PACKAGE OUT.npy EVAL_DIR

``simulate`` writes raw window log-likelihoods [cells, groups, 4 tiles, 8 windows, grid]
of MODEL's network (uncalibrated; seed 20241301, used for nothing else); ``judge`` reads
them and EVAL_DIR/tiles.npy (benchmarks/latent_bank.py raw, the same network) with
PACKAGE's calibration.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

SEED = 20_241_301
TILES = 4
WINDOWS = 8
#: The bank's cells (calibration.INSIDE_FRACTIONS) inside 10–90 % of the range, every other one.
CELLS = (0.125, 0.225, 0.325, 0.425, 0.525, 0.625, 0.725, 0.825)


def simulate(model_dir: str, out: Path, groups: int, batch_groups: int = 8) -> None:
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.model_package import load_model_package
    from dle_stream.training.calibration import tile_film_simulator

    if out.exists():
        raise SystemExit(f"{out}: exists; choose another file")
    torch.set_num_threads(1)
    model, card = load_model_package(model_dir)
    model.config = model.config.uncalibrated()
    est = DiffusionEstimator(model, card, Path(model_dir), "cpu")
    sim, d_max = tile_film_simulator(est)
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    cells = []
    for f in CELLS:
        per_group = []
        for start in range(0, groups, batch_groups):
            n_groups = min(batch_groups, groups - start)
            kits = [sim.draw_instrument(g) for _ in range(n_groups)]
            instrument = {k: np.repeat([kit[k] for kit in kits], TILES) for k in kits[0]}
            state, lls = None, []
            for _ in range(WINDOWS):
                b = (sim.simulate(n_groups * TILES, generator=g, d_um2_s=f * d_max, instrument=instrument)
                     if state is None else sim.simulate(n_groups * TILES, generator=g, continue_from=state))
                state = b.state
                ll, _ = est.window_log_likelihoods_of_movies(b.movies.cpu().numpy(), est.timing)
                lls.append(ll)
            per_group.append(np.stack(lls, axis=1).reshape(n_groups, TILES, WINDOWS, -1))
        cells.append(np.concatenate(per_group))
        print(f"D = {f:g}·d_max done, {time.time() - t0:.0f} s", flush=True)
    tmp = out.with_name(out.name + ".part.npy")
    np.save(tmp, np.stack(cells).astype(np.float32))
    tmp.rename(out)


def judge(package: str, shared_path: Path, eval_dir: Path) -> None:
    import sys

    from dle_stream.combine import RunningCombination
    from dle_stream.model_package import load_model_package
    from dle_stream.training import calibration as cal

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from combine_offline import calibrated

    cfg = load_model_package(package)[0].config
    shared = np.load(shared_path)
    bank = np.load(eval_dir / "tiles.npy", mmap_mode="r")
    fr = list(cal.INSIDE_FRACTIONS + cal.BEYOND_FRACTIONS)

    def read(groups: np.ndarray, f: float) -> dict:
        """groups [G, tiles, windows, n] raw → figures of the ROIs (one per group)."""
        n_g, n_t, n_w, n = groups.shape
        ll = calibrated(groups.reshape(-1, n), cfg).reshape(n_g * n_t, n_w, n)
        regions = [list(range(j * n_t, (j + 1) * n_t)) for j in range(n_g)]
        c = RunningCombination(n_g * n_t, regions, windows_apart=1, keep=n_w, grid=cfg.grid, d_max_um2_s=1.0)
        for w in range(n_w):
            c.add(ll[:, w])
        post = c.region
        z = (post.d - f) / post.sigma
        flagged = c.region_disagree | c.region_changed
        ok = ~flagged
        return {"c68": float(np.mean((post.lo68 <= f) & (f <= post.hi68))),
                "c68_shown": float(np.mean(((post.lo68 <= f) & (f <= post.hi68))[ok])) if ok.any() else float("nan"),
                "z_mean": float(np.mean(z)), "z_std": float(np.std(z)), "flagged": float(np.mean(flagged)), "n": n_g}

    print(f"{package}: ROIs of {TILES} steady tiles × {WINDOWS} windows, one D per cell; 68 % coverage "
          f"(all ROIs | ROIs given a number), z mean ± std, share flagged (tiles or windows disagree)")
    print("D/d_max | own instruments (bank)                      | one shared instrument")
    rows = []
    for i, f in enumerate(CELLS):
        own = np.asarray(bank[fr.index(f)], dtype=np.float64)  # [tiles, windows, n]
        own = own[: (own.shape[0] // TILES) * TILES].reshape(-1, TILES, own.shape[1], own.shape[2])
        a, b = read(own, f), read(np.asarray(shared[i], dtype=np.float64), f)
        rows.append((a, b))
        print(f"{f:7.3f} | " + " | ".join(f"{r['c68']:.2f} {r['c68_shown']:.2f}  z {r['z_mean']:+.2f} ± {r['z_std']:.2f}  "
                                          f"flag {r['flagged']:.2f} (n {r['n']})" for r in (a, b)))
    for name, j in (("own instruments", 0), ("shared instrument", 1)):
        r = [row[j] for row in rows]
        print(f"{name}: 68 % coverage {np.mean([x['c68'] for x in r]):.2f} (given a number "
              f"{np.nanmean([x['c68_shown'] for x in r]):.2f}), z std {np.mean([x['z_std'] for x in r]):.2f}, "
              f"flagged {np.mean([x['flagged'] for x in r]):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("simulate", "judge"))
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("c", nargs="?")
    ap.add_argument("--groups", type=int, default=16)
    args = ap.parse_args()
    if args.part == "simulate":
        simulate(args.a, Path(args.b), args.groups)
    else:
        judge(args.a, Path(args.b), Path(args.c))


if __name__ == "__main__":
    main()
