"""Write a family model package with its per-scan validation in the card (as the trainer
writes it at the end of a run), e.g. from a run's last checkpoint package instead of its
best-validated weights.

    python benchmarks/package_family.py SOURCE OUT --range low [--note TEXT] [--smooth KNOTS]

SOURCE: a family package (e.g. a copy of a run folder's package taken before the run ended);
OUT: a new folder (refused if it exists). The card's ``validation`` becomes the trainer's:
for each reference scan in the box, ``val_movies`` (512) held-out movies of the trainer's
validation seed (``benchmarks/family_scans.py``'s movies), their metrics under ``per_scan``
and the pooled ones under ``dle``; ``--note`` goes to ``training.note``; ``--smooth`` sets
the architecture's ``grid_smooth_knots`` (the window log-likelihood smoothed over that many
knots before combining) before validating.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from dle_stream.estimator import DiffusionEstimator
from dle_stream.evaluation.metrics import json_safe, prior_baseline
from dle_stream.model_package import save_model_package
from dle_stream.scan_family import REFERENCE_SCANS
from dle_stream.training.priors import get_preset
from dle_stream.training.trainer import VALIDATION_SEED

_spec = importlib.util.spec_from_file_location("family_scans", Path(__file__).with_name("family_scans.py"))
assert _spec is not None and _spec.loader is not None
family_scans = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(family_scans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("out", type=Path)
    ap.add_argument("--range", choices=("low", "high"), required=True)
    ap.add_argument("--movies", type=int, default=512)
    ap.add_argument("--note", default="")
    ap.add_argument("--smooth", type=float, default=None)
    a = ap.parse_args()
    if a.out.exists():
        sys.exit(f"{a.out}: exists; choose a new folder (nothing was written)")
    est = DiffusionEstimator.load(a.source)
    card = est.card
    if card.family is None:
        sys.exit(f"{a.source}: not a family model")
    if a.smooth is not None:
        est.model.config = replace(est.model.config, grid_smooth_knots=float(a.smooth))
        card.architecture = est.model.config.to_dict()
    p = get_preset(a.range).priors
    per_scan, truths, preds = {}, [], []
    for name, timing in REFERENCE_SCANS.items():
        if not card.family.contains(timing):
            continue
        batches, d_true = family_scans.validation_movies(a.range, timing, a.movies)
        latents = np.concatenate([est.encode(b.reshape(-1, *b.shape[2:])).reshape(b.shape[0], b.shape[1], -1)
                                  for b in batches])
        m = family_scans.score(est, latents, d_true, timing)
        per_scan[name] = {"n_movies": int(d_true.size), "dle": m, "scan": timing.to_dict(),
                          "prior_baseline": prior_baseline(d_true, p.d_mean_um2_s, p.d_std_um2_s)}
        truths.append(d_true)
        preds.append(m)
        print(f"{name:12s} L1 {m['l1']:.4g} best half {m['best_half_l1']:.4g} 68% {m['cov68']:.2f}", flush=True)
    d_all = np.concatenate(truths)
    pooled = {k: float(np.average([m[k] for m in preds], weights=[t.size for t in truths]))
              for k in ("l1", "best_half_l1", "cov68")}
    card.validation = json_safe({"n_movies": int(d_all.size), "seed": VALIDATION_SEED, "dle": pooled,
                                 "prior_baseline": prior_baseline(d_all, p.d_mean_um2_s, p.d_std_um2_s),
                                 "per_scan": per_scan,
                                 "note": "pooled dle figures: the per-scan figures averaged, weighted by movies"})
    if a.note:
        card.training = {**card.training, "note": a.note}
    save_model_package(a.out, est.model, card)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
