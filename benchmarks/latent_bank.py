"""Encoded windows kept once, so that any head trained on the same frozen encoder is judged
and calibrated in seconds (issue 11: head-only experiments).

Every head trained from a package without end-to-end steps shares that package's encoder,
so the movies of the offline evaluations need simulating and encoding only once. ``make``
simulates exactly the windows of

- ``combine``: `bench --suite combine`'s cells (benchmarks/combine_raw_windows.py, cloud, n groups),
- ``suite``: the 1000-movie Table 1 suite (benchmarks/suite_raw_windows.py),
- ``tiles`` / ``cloud``: `calibrate`'s windows (benchmarks/calibration_windows.py),

with the same seeds and batches, and keeps their latents (float16, [..., frames, latent]).
``raw`` runs a package's head over them and writes the raw window log-likelihoods in the
formats those scripts write, so benchmarks/combine_offline.py, suite_offline.py and
calibration_windows.py fit take them unchanged.

    python benchmarks/latent_bank.py make MODEL BANK combine|suite|tiles|cloud [--n 100]
    python benchmarks/latent_bank.py raw BANK PACKAGE OUT_DIR

``tiles`` (84 min on one core) can be made on several cores: ``make ... tiles --shard I/N``
for I = 1..N at once (each cell's tiles split N ways, shard I simulated with seed + I, so
the windows are as valid as calibrate's but not the same ones), then ``merge-tiles BANK N``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.model_package import load_model_package

PARTS = ("combine", "suite", "tiles", "cloud")


def encoder_digest(model) -> str:
    """sha256 of the encoder's weights: a head may use a bank only if its encoder is the bank's."""
    h = hashlib.sha256()
    for name, t in sorted(model.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


class LatentRecorder(DiffusionEstimator):
    """An estimator that keeps the latents of every window it is given (and skips its head)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.kept: list[np.ndarray] = []

    def window_log_likelihoods_of_movies(self, movie, timing):
        x = np.asarray(movie, dtype=np.float32)
        b, t = x.shape[:2]
        latents = self.encode(x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1)
        self.kept.append(latents.astype(np.float16))
        return np.zeros((b, self.grid.n), dtype=np.float32), self.timing_check(timing).time_scale


def make(model_dir: str, bank: Path, part: str, n: int, shard: tuple[int, int] | None = None) -> None:
    from dle_stream.evaluation.bench_combine import BEYOND, INSIDE
    from dle_stream.training import calibration as cal
    from dle_stream.training.priors import get_preset
    from dle_stream.training.simulator import Simulator

    out = bank / (f"{part}.npy" if shard is None else f"{part}-shard{shard[0]}of{shard[1]}.npy")
    if out.exists() or (bank / f"{part}.npy").exists():
        raise SystemExit(f"{out}: exists; choose another bank")
    bank.mkdir(parents=True, exist_ok=True)
    model, card = load_model_package(model_dir)
    model.config = model.config.uncalibrated()
    est = LatentRecorder(model, card, Path(model_dir), "cpu")
    t0 = time.time()
    meta: dict = {"model": str(model_dir), "encoder_sha256": encoder_digest(model), "part": part}
    if part == "combine":
        fr = tuple(INSIDE + BEYOND)
        ll = cal.simulate_cells(est, fr, n * 16, seed=20_241_101, density="cloud")
        lat = np.concatenate(est.kept).reshape(*ll.shape[:2], *est.kept[0].shape[1:])
        meta.update(fractions=list(fr), n=n, density="cloud")
    elif part == "suite":
        suite = "low" if card.d_max_um2_s <= get_preset("low").priors.d_max_um2_s else "high"
        preset = get_preset(suite)
        sim = Simulator(preset.priors, preset.timing, preset.tile_height, preset.tile_width, preset.frames, "cpu")
        g = torch.Generator().manual_seed(20241001)
        d_true, done, scale = [], 0, 1.0
        while done < 1000:
            m = min(32, 1000 - done)
            b = sim.simulate(m, generator=g)
            d_true.append(b.d_um2_s.cpu().numpy())
            _, scale = est.window_log_likelihoods_of_movies(b.movies.cpu().numpy(), preset.timing)
            done += m
        lat = np.concatenate(est.kept)
        np.save(bank / "suite_d_true.npy", np.concatenate(d_true))
        meta.update(suite=suite, seed=20241001, d_max=float(card.d_max_um2_s) / scale,
                    prior_mean=preset.priors.d_mean_um2_s, prior_std=preset.priors.d_std_um2_s)
    else:
        fr = cal.INSIDE_FRACTIONS + cal.BEYOND_FRACTIONS
        if part == "tiles":
            tiles, seed = 512 // cal.TILE_WINDOWS, cal.CALIBRATION_SEED
            if shard is not None:
                tiles, seed = tiles // shard[1], seed + shard[0]
            ll = cal.simulate_tile_cells(est, fr, tiles, cal.TILE_WINDOWS, seed=seed)
            # kept per (cell, batch of tiles, window): [b, T, L] each → [cells, tiles, windows, T, L]
            per = np.stack(est.kept).reshape(len(fr), -1, cal.TILE_WINDOWS, *est.kept[0].shape)
            lat = np.moveaxis(per, 2, 3).reshape(len(fr), -1, cal.TILE_WINDOWS, *est.kept[0].shape[1:])
            assert lat.shape[:3] == ll.shape[:3]
        else:
            ll = cal.simulate_cells(est, fr, 512, seed=cal.CALIBRATION_SEED + 1)
            lat = np.concatenate(est.kept).reshape(*ll.shape[:2], *est.kept[0].shape[1:])
        meta.update(fractions=list(fr))
    tmp = bank / f"{out.stem}.part.npy"
    np.save(tmp, lat)
    tmp.rename(out)
    out.with_suffix(".json").write_text(json.dumps({**meta, "shard": shard}, indent=1))
    print(out, lat.shape, f"{time.time() - t0:.0f} s")


def merge_tiles(bank: Path, n_shards: int) -> None:
    """tiles.npy from ``tiles-shard{I}of{N}.npy`` (their tiles side by side, per cell)."""
    parts = [bank / f"tiles-shard{i}of{n_shards}.npy" for i in range(1, n_shards + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing or (bank / "tiles.npy").exists():
        raise SystemExit(f"{bank}: missing {missing} or tiles.npy exists")
    lat = np.concatenate([np.load(p, mmap_mode="r") for p in parts], axis=1)
    meta = json.loads(parts[0].with_suffix(".json").read_text())
    tmp = bank / "tiles.part.npy"
    np.save(tmp, lat)
    tmp.rename(bank / "tiles.npy")
    (bank / "tiles.json").write_text(json.dumps({**meta, "shard": None, "merged_shards": n_shards}, indent=1))
    for p in parts:
        p.unlink()
    print(bank / "tiles.npy", lat.shape)


def raw(bank: Path, package: str, out_dir: Path) -> None:
    model, card = load_model_package(package)
    model.config = model.config.uncalibrated()
    est = DiffusionEstimator(model, card, Path(package), "cpu")
    if out_dir.exists():
        raise SystemExit(f"{out_dir}: exists; choose a new folder (raw never overwrites)")
    out_dir.mkdir(parents=True)
    digest = encoder_digest(model)
    for part in PARTS:
        src = bank / f"{part}.npy"
        if not src.exists():
            continue
        meta = json.loads((bank / f"{part}.json").read_text())
        if meta["encoder_sha256"] != digest:
            raise SystemExit(f"{package}: its encoder is not the one of {bank} ({meta['model']}); make a bank for it")
        t0 = time.time()
        lat = np.load(src, mmap_mode="r")
        flat = lat.reshape(-1, *lat.shape[-2:])
        ll = np.concatenate([est.window_log_likelihoods(np.asarray(flat[i:i + 256], dtype=np.float32))
                             for i in range(0, flat.shape[0], 256)]).reshape(*lat.shape[:-2], -1)
        if part == "combine":
            dst = out_dir / "raw-cloud.npz"
            np.savez(dst, cells=ll.astype(np.float32), fractions=np.asarray(meta["fractions"]),
                     density=meta["density"], n=meta["n"])
        elif part == "suite":
            dst = out_dir / "suite-raw.npz"
            np.savez(dst, raw=ll.astype(np.float32), d_true=np.load(bank / "suite_d_true.npy"), suite=meta["suite"],
                     seed=meta["seed"], d_max=meta["d_max"], prior_mean=meta["prior_mean"], prior_std=meta["prior_std"])
        else:
            dst = out_dir / f"{part}.npy"
            np.save(dst, ll.astype(np.float32))
        print(dst, ll.shape, f"{time.time() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("model")
    mk.add_argument("bank", type=Path)
    mk.add_argument("part", choices=PARTS)
    mk.add_argument("--n", type=int, default=100, help="combine: groups of 16 per cell")
    mk.add_argument("--shard", default=None, help="tiles only: I/N, this process's share of N")
    mg = sub.add_parser("merge-tiles")
    mg.add_argument("bank", type=Path)
    mg.add_argument("n_shards", type=int)
    rw = sub.add_parser("raw")
    rw.add_argument("bank", type=Path)
    rw.add_argument("package")
    rw.add_argument("out_dir", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.cmd == "make":
        shard = None
        if a.shard:
            i, _, n_shards = a.shard.partition("/")
            if a.part != "tiles" or not (i.isdigit() and n_shards.isdigit() and 1 <= int(i) <= int(n_shards)):
                raise SystemExit(f"--shard {a.shard}: I/N with 1 ≤ I ≤ N, tiles only")
            shard = (int(i), int(n_shards))
        make(a.model, a.bank, a.part, a.n, shard)
    elif a.cmd == "merge-tiles":
        merge_tiles(a.bank, a.n_shards)
    else:
        raw(a.bank, a.package, a.out_dir)


if __name__ == "__main__":
    main()
