"""The oracle: what tracking could know at best (docs/design.md §7).

Given the simulator's *true* positions of the particles at each frame's mid-time, the
oracle keeps only what a perfect tracker could see: a particle is *visible* in a frame
when it is inside the tile laterally (0 ≤ x < W·dx, 0 ≤ y < H·dx) and within the axial
PSF width of focus (|z| ≤ σz), the same rule as the simulator's ``visible_transitions``.

Likelihood (exact for free Brownian motion, Δt = F the frame period, s² = 2DΔt per axis).
For every particle visible at frame k:

- visible again at k + 1, with 3-D step Δr: the Gaussian density
  (4πDΔt)^(−3/2) exp(−|Δr|²/(4DΔt));
- not visible at k + 1: the probability of *leaving view*,
  1 − Π_axes [Φ((b − r)/s) − Φ((a − r)/s)] over the view box [a, b] of each axis.

Leaving is informative (a fast particle leaves a 3-µm tile within a frame or two), and
dropping it would bias D low, since the steps that stay in view are the short ones.
Re-entries are not modelled (a particle's first visible position is taken as given):
that is a partial likelihood, consistent but not using every bit of information.

Estimate: the posterior under the suite's uniform prior on [d_min, d_max], evaluated on
a grid (a coarse pass over the whole range, then 2049 points where the posterior is
within e⁻³⁰ of its peak); D̂ is the posterior median and σ the posterior standard
deviation. With no visible step at all (not a single visible → visible pair), D̂ and
σ are NaN with the flag ``"no_visible_steps"``, even if some particles were seen to
leave (the benchmark decides how to score such windows: docs/design.md §7 counts them as a
floor under every estimator's L1).

Positions of a periodic-box simulation are wrapped into the box; a step that wraps
while visible in both frames cannot happen for boxes larger than tile + a few steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_ndtr, logsumexp

from dle_stream.timing import ScanTiming

#: Points of the fine posterior grid.
GRID_POINTS = 2049
#: Log-posterior drop (nats) that bounds the fine grid.
GRID_SPAN_NATS = 30.0


@dataclass
class OracleResult:
    """One movie's oracle estimate: D̂ (posterior median) and σ (posterior std), µm²/s."""

    d_um2_s: float
    sigma_um2_s: float
    flags: set[str] = field(default_factory=set)
    n_steps: int = 0
    n_leaves: int = 0


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def visible_mask(positions_um: np.ndarray, tile_h: int, tile_w: int, pixel_size_um: float,
                 psf_sigma_z_um: float) -> np.ndarray:
    """[N, T] True where a particle is inside the tile and within σz of focus."""
    x, y, z = positions_um[..., 0], positions_um[..., 1], positions_um[..., 2]
    return ((x >= 0) & (x < tile_w * pixel_size_um) & (y >= 0) & (y < tile_h * pixel_size_um)
            & (np.abs(z) <= psf_sigma_z_um))


def _log_leave(r: np.ndarray, lo: np.ndarray, hi: np.ndarray, s: np.ndarray) -> np.ndarray:
    """log P(leave the view box in one step) for positions r [M, 3] and step stds s [G]: [G]-summed.

    P(stay) = Π_a (1 − Φ((lo_a − r_a)/s) − Φ((r_a − hi_a)/s)); its complement is taken
    in log space so that tiny leaving probabilities (slow D) stay finite.
    """
    a = (lo[None, None, :] - r[None, :, :]) / s[:, None, None]  # [G, M, 3]
    b = (r[None, :, :] - hi[None, None, :]) / s[:, None, None]
    la, lb = log_ndtr(a), log_ndtr(b)
    tail = np.logaddexp(la, lb)  # log of the two tails per axis
    log_stay = np.sum(np.log1p(-np.minimum(np.exp(tail), 1 - 1e-16)), axis=2)  # [G, M]
    rare = log_stay > -1e-12  # leaving so unlikely that 1 − stay loses all digits
    with np.errstate(divide="ignore"):
        exact = np.log(-np.expm1(np.where(rare, -1.0, log_stay)))
    approx = logsumexp(tail, axis=2)  # log Σ tails: the rare-leave limit
    return np.where(rare, approx, exact).sum(axis=1)


def _log_likelihood(d_grid: np.ndarray, sq: np.ndarray, leave_pos: np.ndarray, lo, hi, dt_s: float) -> np.ndarray:
    n = sq.size
    ll = -1.5 * n * np.log(4 * math.pi * d_grid * dt_s) - sq.sum() / (4 * d_grid * dt_s)
    if leave_pos.size:
        s = np.sqrt(2 * d_grid * dt_s)
        for chunk in np.array_split(leave_pos, max(1, leave_pos.shape[0] // 256)):
            ll = ll + _log_leave(chunk, lo, hi, s)
    return ll


def oracle_fit(positions_um, timing: ScanTiming, tile_h: int, tile_w: int, psf_sigma_z_um: float,
               d_min: float, d_max: float) -> OracleResult:
    """The oracle's estimate for one movie from its particles' true positions [N, T, 3] µm."""
    pos = _as_numpy(positions_um)
    if pos.ndim == 2:  # one particle [T, 3]
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[-1] != 3:
        raise ValueError(f"oracle: positions must be [N, T, 3] µm, got shape {pos.shape}")
    if pos.shape[0] == 0 or pos.shape[1] < 2:
        return OracleResult(math.nan, math.nan, {"no_visible_steps"}, 0, 0)
    dx = timing.pixel_size_um
    sz = float(psf_sigma_z_um)
    vis = visible_mask(pos, tile_h, tile_w, dx, sz)
    dt_s = timing.frame_period_us * 1e-6
    stay = vis[:, :-1] & vis[:, 1:]
    leave = vis[:, :-1] & ~vis[:, 1:]
    steps = (pos[:, 1:] - pos[:, :-1])[stay]  # [n, 3]
    leave_pos = pos[:, :-1][leave]  # [m, 3]
    n, m = steps.shape[0], leave_pos.shape[0]
    if n == 0:
        return OracleResult(math.nan, math.nan, {"no_visible_steps"}, 0, m)
    sq = np.sum(steps**2, axis=1)
    lo = np.array([0.0, 0.0, -sz])
    hi = np.array([tile_w * dx, tile_h * dx, sz])
    d_lo = d_min if d_min > 0 else d_max * 1e-6
    coarse = np.unique(np.concatenate([np.geomspace(d_lo, d_max, 200), np.linspace(d_lo, d_max, 200)]))
    ll = _log_likelihood(coarse, sq, leave_pos, lo, hi, dt_s)
    keep = np.flatnonzero(ll >= ll.max() - GRID_SPAN_NATS)
    a = coarse[max(keep[0] - 1, 0)]
    b = coarse[min(keep[-1] + 1, coarse.size - 1)]
    grid = np.linspace(a, b, GRID_POINTS)
    ll = _log_likelihood(grid, sq, leave_pos, lo, hi, dt_s)
    p = np.exp(ll - ll.max())
    # trapezoid CDF on the grid (uniform prior: posterior ∝ likelihood)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(grid))])
    total = cdf[-1]
    median = float(np.interp(0.5 * total, cdf, grid))
    w = p / p.sum()
    mean = float(np.sum(w * grid))
    sigma = float(math.sqrt(max(np.sum(w * (grid - mean) ** 2), (grid[1] - grid[0]) ** 2 / 12)))
    return OracleResult(median, sigma, set(), n, m)


def oracle_estimate(positions_um, timing: ScanTiming, tile_h: int, tile_w: int, psf_sigma_z_um: float,
                    d_min: float, d_max: float) -> tuple[float, float]:
    """(D̂, σ) in µm²/s of one movie from its particles' true positions [N, T, 3] µm
    (NaN, NaN when no particle is visible in two consecutive frames)."""
    r = oracle_fit(positions_um, timing, tile_h, tile_w, psf_sigma_z_um, d_min, d_max)
    return r.d_um2_s, r.sigma_um2_s


def oracle_batch(batch, d_min: float, d_max: float, with_flags: bool = False):
    """The oracle for every movie of a :class:`dle_stream.training.simulator.SimulatedBatch`:
    (D̂ [B], σ [B]) in µm²/s, plus the flags per movie when ``with_flags``."""
    B = len(batch)
    tile_h, tile_w = int(batch.movies.shape[-2]), int(batch.movies.shape[-1])
    sz = _as_numpy(batch.params["psf_sigma_z_um"]).reshape(-1)
    d = np.full(B, math.nan)
    s = np.full(B, math.nan)
    flags = []
    for i in range(B):
        r = oracle_fit(batch.positions_of(i), batch.timing, tile_h, tile_w, float(sz[i]), d_min, d_max)
        d[i], s[i] = r.d_um2_s, r.sigma_um2_s
        flags.append(r.flags)
    return (d, s, flags) if with_flags else (d, s)
