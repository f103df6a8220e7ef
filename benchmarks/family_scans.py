"""A family model against the one-scan models on the same held-out movies (issue 16 item 3).

For every reference scan inside the family's box (:data:`dle_stream.scan_family.REFERENCE_SCANS`)
the held-out movies are simulated exactly as ``dle-stream train`` validates a run for that
scan (the operating priors of the range's preset, 20×20 px tiles of 400 frames, seed
:data:`~dle_stream.training.trainer.VALIDATION_SEED`, batches of 32), so they are the movies of
the one-scan runs' own card validations. Each model reads them with its own encoder (encoded
once per distinct encoder) and head; for each scan the table gives L1, best-half L1, relative
L1 (L1 / (d_max / 4), the prior mean's L1 for D uniform on [0, d_max]) and the share of true D
inside the 68 % interval.

    python benchmarks/family_scans.py FAMILY --range low --compare paper=models/brain-qd-low \\
        --compare 64x64-8us=runs/new-scans/low/64x64-8us-warm ... [--movies 512] [--out FILE.md]

``--compare SCAN=MODEL`` adds a one-scan model for that scan (any number; each must serve its
scan). ``--out`` refuses an existing file and writes through a temporary one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.evaluation.metrics import summarize
from dle_stream.files import write_atomic
from dle_stream.likelihood import posterior
from dle_stream.scan_family import REFERENCE_SCANS
from dle_stream.training.priors import get_preset
from dle_stream.training.simulator import Simulator
from dle_stream.training.trainer import VALIDATION_SEED

SIM_BATCH = 32


def encoder_key(est: DiffusionEstimator) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(est.model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def validation_movies(preset: str, timing, n: int, seed: int = VALIDATION_SEED):
    """(movies as batches [b, T, H, W], D µm²/s [n]): the trainer's validation for this scan
    (with ``seed`` another draw of the same kind)."""
    p = get_preset(preset)
    sim = Simulator(p.priors.operating(), timing, p.tile_height, p.tile_width, p.frames, "cpu")
    g = torch.Generator().manual_seed(seed)
    batches, d = [], []
    for i in range(0, n, SIM_BATCH):
        b = sim.simulate(min(SIM_BATCH, n - i), generator=g)
        batches.append(b.movies.cpu().numpy())
        d.append(b.d_um2_s.cpu().numpy())
    return batches, np.concatenate(d)


def score(est: DiffusionEstimator, latents: np.ndarray, d_true: np.ndarray, timing) -> dict:
    ll = np.concatenate([est.window_log_likelihoods(latents[i:i + 64], timing if est.is_family else None)
                         for i in range(0, latents.shape[0], 64)])
    post = posterior(ll, est.grid, est.d_max_um2_s)
    m = summarize(d_true, post.d, post.sigma)
    m["cov68"] = float(np.mean((post.lo68 <= d_true) & (d_true <= post.hi68)))
    m["relative_l1"] = m["l1"] / (est.d_max_um2_s / 4)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family")
    ap.add_argument("--range", choices=("low", "high"), required=True)
    ap.add_argument("--compare", action="append", default=[], help="SCAN=MODEL: a one-scan model for that scan")
    ap.add_argument("--movies", type=int, default=512)
    ap.add_argument("--seed", type=int, default=VALIDATION_SEED,
                    help="seed of the movies (default: the trainer's validation seed, the one-scan runs' card movies)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.out is not None and a.out.exists():
        sys.exit(f"{a.out}: exists; choose another file (nothing was written)")
    torch.set_num_threads(1)
    fam = DiffusionEstimator.load(a.family)
    if fam.card.family is None:
        sys.exit(f"{a.family}: not a family model")
    others: dict[str, list[tuple[str, DiffusionEstimator]]] = {}
    for spec in a.compare:
        scan, _, model = spec.partition("=")
        if scan not in REFERENCE_SCANS:
            sys.exit(f"--compare {spec}: unknown scan {scan!r} (one of {', '.join(REFERENCE_SCANS)})")
        est = DiffusionEstimator.load(model)
        est.timing_check(REFERENCE_SCANS[scan])  # raises unless the model serves the scan
        others.setdefault(scan, []).append((model, est))
    rows = []
    for scan, timing in REFERENCE_SCANS.items():
        if not fam.card.family.contains(timing):
            continue
        t0 = time.monotonic()
        batches, d_true = validation_movies(a.range, timing, a.movies, a.seed)
        encoded: dict[str, np.ndarray] = {}
        for label, est in [(f"{a.family} (family)", fam), *others.get(scan, [])]:
            key = encoder_key(est)
            if key not in encoded:
                encoded[key] = np.concatenate([est.encode(b.reshape(-1, *b.shape[2:])).reshape(b.shape[0], b.shape[1], -1)
                                               for b in batches])
            m = score(est, encoded[key], d_true, timing)
            rows.append((scan, label, m))
            print(f"{scan:12s} {label:44s} L1 {m['l1']:.4g}  best half {m['best_half_l1']:.4g}  relative "
                  f"{m['relative_l1']:.3f}  68% cov {m['cov68']:.2f}  ({time.monotonic() - t0:.0f} s)", flush=True)
    which = "the trainer's validation seed" if a.seed == VALIDATION_SEED else "seed"
    lines = [f"Held-out movies: {a.movies} per scan, {which} {a.seed}, preset {a.range}.",
             "", "| scan | model | L1 µm²/s | best half | relative L1 | 68 % interval holds D |", "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {label} | {m['l1']:.4g} | {m['best_half_l1']:.4g} | {m['relative_l1']:.3f} | {m['cov68']:.2f} |"
              for s, label, m in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        write_atomic(a.out, lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    main()
