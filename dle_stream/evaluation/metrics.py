"""Accuracy and calibration of D estimates (docs/design.md §7), as in the paper's Table 1.

All functions take plain arrays of the true D, the estimate D̂ and its σ̂, in one unit
(µm²/s). L2 is the mean *squared* error, as the paper's "L2"; NLL is the paper's Eq. 2
averaged over movies. "Best half" is the half of the movies with the smallest σ̂ (each
estimator chooses its own half). Movies with a NaN estimate (an estimator that found
nothing usable) are counted and excluded from the error metrics.
"""

from __future__ import annotations

import math

import numpy as np

from dle_stream.files import jsonable


def _clean(d_true, d_hat, sigma):
    d_true = np.asarray(d_true, dtype=np.float64).reshape(-1)
    d_hat = np.asarray(d_hat, dtype=np.float64).reshape(-1)
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if not (d_true.shape == d_hat.shape == sigma.shape):
        raise ValueError("d_true, d_hat and sigma must have the same length")
    ok = np.isfinite(d_hat) & np.isfinite(sigma) & (sigma > 0)
    return d_true[ok], d_hat[ok], sigma[ok], int((~ok).sum())


def error_metrics(d_true, d_hat, sigma) -> dict[str, float]:
    """L1, L2 (mean squared error) and Gaussian NLL over the movies given."""
    d_true, d_hat, sigma, _ = _clean(d_true, d_hat, sigma)
    if d_true.size == 0:
        return {"l1": math.nan, "l2": math.nan, "nll": math.nan}
    err = d_hat - d_true
    return {
        "l1": float(np.mean(np.abs(err))),
        "l2": float(np.mean(err**2)),
        "nll": float(np.mean(err**2 / (2 * sigma**2) + np.log(sigma))),
    }


def expected_calibration_error(d_true, d_hat, sigma, bins: int = 10) -> float:
    """ENCE: mean over σ̂-quantile bins of |RMV − RMSE| / RMV (RMV = root mean σ̂²)."""
    d_true, d_hat, sigma, _ = _clean(d_true, d_hat, sigma)
    if d_true.size < bins:
        return math.nan
    order = np.argsort(sigma)
    values = []
    for idx in np.array_split(order, bins):
        rmv = math.sqrt(np.mean(sigma[idx] ** 2))
        rmse = math.sqrt(np.mean((d_hat[idx] - d_true[idx]) ** 2))
        values.append(abs(rmv - rmse) / rmv)
    return float(np.mean(values))


def _rank(x: np.ndarray) -> np.ndarray:
    ranks = np.empty(x.size)
    ranks[np.argsort(x, kind="mergesort")] = np.arange(x.size)
    return ranks


def calibration(d_true, d_hat, sigma) -> dict[str, float]:
    """How honest σ̂ is: z = (D̂ − D)/σ̂ statistics, coverage, ENCE, and the rank
    correlation of σ̂ with |error| (what makes the "best half" meaningful)."""
    d_true, d_hat, sigma, _ = _clean(d_true, d_hat, sigma)
    if d_true.size < 2:
        return {k: math.nan for k in ("within_1_sigma", "within_2_sigma", "z_mean", "z_std", "ence", "sigma_error_spearman")}
    z = (d_hat - d_true) / sigma
    abs_err = np.abs(d_hat - d_true)
    rs, re = _rank(sigma), _rank(abs_err)
    corr = np.corrcoef(rs, re)[0, 1] if rs.std() > 0 and re.std() > 0 else math.nan
    return {
        "within_1_sigma": float(np.mean(np.abs(z) < 1)),
        "within_2_sigma": float(np.mean(np.abs(z) < 2)),
        "z_mean": float(np.mean(z)),
        "z_std": float(np.std(z)),
        "ence": expected_calibration_error(d_true, d_hat, sigma),
        "sigma_error_spearman": float(corr),
    }


def summarize(d_true, d_hat, sigma) -> dict[str, float]:
    """Everything of Table 1 for one estimator: all movies, the best half by σ̂, calibration."""
    d_true_c, d_hat_c, sigma_c, n_failed = _clean(d_true, d_hat, sigma)
    out: dict[str, float] = {"n": int(np.asarray(d_true).size), "n_failed": n_failed}
    out.update(error_metrics(d_true_c, d_hat_c, sigma_c))
    half = np.argsort(sigma_c)[: max(1, d_true_c.size // 2)] if d_true_c.size else np.array([], dtype=int)
    for k, v in error_metrics(d_true_c[half], d_hat_c[half], sigma_c[half]).items():
        out[f"best_half_{k}"] = v
    out.update(calibration(d_true_c, d_hat_c, sigma_c))
    return out


def prior_baseline(d_true, d_mean: float, d_std: float) -> dict[str, float]:
    """The zero-knowledge baseline: always guess the prior mean, with the prior's std as σ."""
    d_true = np.asarray(d_true, dtype=np.float64)
    n = d_true.size
    return summarize(d_true, np.full(n, d_mean), np.full(n, d_std))


def json_safe(obj):
    """``obj`` as plain JSON types, NaN and infinities as None (JSON has no NaN):
    :func:`dle_stream.files.jsonable`."""
    return jsonable(obj)
