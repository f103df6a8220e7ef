"""A model package's held-out validation, measured on the package as it is now.

The trainer validates the head it keeps with the output as trained; `calibrate` then changes
how that output is read (smoothing, warp, temperature), which moves the posterior median a
little and the intervals a lot. The card's validation is a claim about the shipped numbers,
so `calibrate` measures it again afterwards with :func:`measure_validation` and keeps the
trainer's figures beside it (``training.validation_before_calibration``).
"""

from __future__ import annotations

import numpy as np
import torch

from dle_stream.evaluation.metrics import json_safe, prior_baseline, summarize
from dle_stream.training.trainer import VALIDATION_SEED  # the trainer's held-out movies' seed


def measure_validation(est, n: int, seed: int = VALIDATION_SEED, batch: int = 32) -> dict:
    """Validation of the estimator ``est`` (a :class:`dle_stream.estimator.DiffusionEstimator`
    as loaded, calibration included) on ``n`` movies of its card's operating priors and scan
    (the paper's spreading cloud, D drawn from the prior, ``seed``): the card's ``validation``
    block (``dle``: L1, best half, share of errors within 1σ and 2σ, …, and the 68 %
    interval's coverage; ``prior_baseline``). D in µm²/s."""
    from dle_stream.training.calibration import _operating_simulator

    sim, _ = _operating_simulator(est)
    g = torch.Generator(device=est.device).manual_seed(seed)
    d_true, d_hat, sigma, inside = [], [], [], []
    for i in range(0, n, batch):
        b = sim.simulate(min(batch, n - i), generator=g)
        post = est.estimate_posterior(b.movies.cpu().numpy(), est.timing)
        truth = b.d_um2_s.cpu().numpy().astype(np.float64)
        d_true.append(truth)
        d_hat.append(np.asarray(post.d, dtype=np.float64))
        sigma.append(np.asarray(post.sigma, dtype=np.float64))
        inside.append((np.asarray(post.lo68) <= truth) & (truth <= np.asarray(post.hi68)))
    truth = np.concatenate(d_true)
    metrics = summarize(truth, np.concatenate(d_hat), np.concatenate(sigma))
    metrics["interval68_coverage"] = float(np.mean(np.concatenate(inside)))
    p = sim.priors
    return json_safe({"n_movies": int(truth.size), "seed": int(seed), "dle": metrics,
                      "prior_baseline": prior_baseline(truth, p.d_mean_um2_s, p.d_std_um2_s),
                      "measured": "with the package as shipped (its calibration included), the paper's spreading cloud"})


def record_validation(card, est, n: int) -> dict:
    """Measure ``card``'s validation again with ``est`` (:func:`measure_validation`, ``n``
    movies) and store it in the card (a :class:`dle_stream.model_package.ModelCard`), the
    trainer's figures kept as ``training.validation_before_calibration`` (the first ones
    only, on a recalibration). Returns the new validation."""
    previous = card.validation if isinstance(card.validation, dict) else {}
    card.training.setdefault("validation_before_calibration", previous)
    card.validation = measure_validation(est, n)
    return card.validation
