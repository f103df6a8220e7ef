"""The combinable window output: a log-likelihood of D on a grid, and posteriors from it.

Why (docs/design.md §7b): a network trained under a prior π(D) reports
a posterior summary, pulled toward π's middle near the ends of the range and for
uninformative windows. Such summaries must not be averaged: the pull stays while σ
shrinks. Independent windows combine exactly through their likelihoods,

    p(D | w₁…w_K) ∝ π₀(D) · Π_k p(D | w_k) / π_train(D),

so a model with ``output="d_grid"`` gives, per window, the log-density of p(D | w) at the
knots of a :class:`DGrid` (plus the log-mass of D beyond the grid), trained with the exact
negative log-likelihood of the true D; dividing by the training prior turns it into a
log-likelihood that adds over independent windows and tiles.

Grid (in units of the model's d_max, the top of its operating range): knots spaced as
x = (j/m)² on [0, 1] (fine near D = 0, where windows are most precise) and then evenly, at
the spacing reached at x = 1, up to ``top`` (2 by default); one more entry holds D > top
(the "overflow"). Between knots the log-density is linear.

Priors (documented, used everywhere a number is shown):

- **numbers** (D, σ, 68 %/95 % intervals) are posterior summaries under a flat prior on the
  operating range [0, d_max]: the range the user chose the model for;
- **out of range** is judged with prior odds 1:1 for "D in [0, d_max]" against "D above
  it", the latter uniform on [d_max, 2·top·d_max] (the overflow standing for the part
  beyond the grid): ``p_above`` is the posterior probability that D > d_max, a Bayes
  factor B read as B / (1 + B). A window that says nothing has p_above = 0.5.

All functions here are numpy (no torch), vectorised over leading axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike

from dle_stream.errors import DleStreamError

#: Fine points per knot interval used for integrals and quantiles.
SUBDIVISIONS = 8
#: Log-likelihoods are stored relative to their maximum and clipped here (float16-safe).
LOG_FLOOR = -60.0
#: p_above at or beyond which a D is reported as above the model's range (Bayes factor ≥ 9).
P_ABOVE_FLAG = 0.9
#: p_above below which D ≤ d_max is established (otherwise, with little information, "cannot tell").
P_ABOVE_RULED_OUT = 0.05
#: Operating-range posterior std, as a fraction of d_max, above which a window says little:
#: a flat prior on [0, d_max] has std 0.289·d_max.
LITTLE_INFORMATION_STD = 0.2


@dataclass(frozen=True)
class DGrid:
    """Knots of the window log-likelihood, in units of d_max.

    Attributes:
        intervals: knot intervals on [0, 1] (spaced as (j/m)²).
        top: upper end of the grid, units of d_max (> 1); D above it is one "overflow" entry.
        systematic_rel: relative systematic uncertainty of the likelihoods read on this grid
            (a model's calibration, ``ModelConfig.grid_systematic_rel``): an error of the D
            scale shared by all windows, so adding windows does not shrink it. Every
            posterior read on the grid is smeared by it (:attr:`systematic_kernel`).
        lr_scale: the likelihood-ratio statistic of K parts that share one D, computed from
            this model's likelihoods, is on average this many times the χ²(K − 1) variable
            of exact likelihoods (the model's calibration, ``ModelConfig.grid_lr_scale``);
            the disagreement test (:func:`dle_stream.combine.disagreement_p`) divides by it.
        combine_exponent: β; K windows of this model added together carry the information
            of K^(1 − β) exact ones: their summed log-likelihood is multiplied by K^(−β)
            before a posterior is read from it (``posterior(..., n_windows=K)``; the model's
            calibration, ``ModelConfig.grid_combine_exponent``; 0: the windows' likelihoods
            are taken as exact).
        posterior_profile: points (D, factor), D in units of d_max, linear between them and
            constant beyond the ends: before a posterior is read, a (combined) log-likelihood
            is divided by the factor read where it peaks (``ModelConfig.grid_posterior_profile``;
            empty: 1). It corrects a width that is wrong by a factor depending on D — measured
            on brain-qd-low: too wide at 0.1–0.3·d_max, too narrow above 0.7·d_max — and is read
            where the *sum* peaks, so all windows of one combination share one factor: a
            factor per window (``window_temperatures``) weights the windows that peak where it
            is small more than the others, which biases the combination (:func:`combined_factor`).
    """

    intervals: int = 96
    top: float = 2.0
    systematic_rel: float = 0.0
    lr_scale: float = 1.0
    combine_exponent: float = 0.0
    posterior_profile: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.intervals < 4 or not self.top > 1.0:
            raise ValueError("DGrid needs at least 4 intervals and top > 1")
        if not 0.0 <= self.systematic_rel < 1.0:
            raise ValueError("DGrid: systematic_rel must be in [0, 1)")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError("DGrid: lr_scale must be a positive number")
        if not 0.0 <= self.combine_exponent < 1.0:
            raise ValueError("DGrid: combine_exponent must be in [0, 1)")
        profile = tuple((float(a), float(b)) for a, b in self.posterior_profile)
        object.__setattr__(self, "posterior_profile", profile)
        if profile_problem(profile):
            raise ValueError(f"DGrid: posterior_profile {profile_problem(profile)}")

    @cached_property
    def knots(self) -> np.ndarray:
        """Knot positions [n], units of d_max."""
        m = self.intervals
        inner = (np.arange(m + 1) / m) ** 2
        step = 2.0 / m  # d(x)/dj at x = 1
        extra = int(math.ceil((self.top - 1.0) / step - 1e-9))
        outer = 1.0 + step * np.arange(1, extra + 1)
        outer[-1] = self.top
        return np.concatenate([inner, outer])

    @property
    def n(self) -> int:
        """Entries of a window output: knots + 1 overflow."""
        return self.knots.size + 1

    @cached_property
    def fine(self) -> np.ndarray:
        """Fine points [F] (units of d_max) where densities are evaluated."""
        k = self.knots
        s = np.linspace(0.0, 1.0, SUBDIVISIONS + 1)[:-1]
        pts = (k[:-1, None] + s[None, :] * np.diff(k)[:, None]).reshape(-1)
        return np.concatenate([pts, k[-1:]])

    @cached_property
    def interp_matrix(self) -> np.ndarray:
        """[knots, F]: log-values at the fine points = knot log-values @ this (linear)."""
        return _linear_interp_matrix(self.knots, self.fine)

    @cached_property
    def fine_weights(self) -> np.ndarray:
        """Trapezoid weights [F] for ∫ over [0, top] on the fine points."""
        return _trapezoid_weights(self.fine)

    @cached_property
    def systematic_kernel(self) -> np.ndarray | None:
        """[F, F]: density at the fine points → the same smeared by a Gaussian error of
        relative size :attr:`systematic_rel` (sd r·D at D; none at D = 0), by
        ``density @ kernel``; mass-preserving on the grid. None without a systematic error."""
        if self.systematic_rel <= 0:
            return None
        x, w = self.fine, self.fine_weights
        sd = np.maximum(self.systematic_rel * x, 1e-9)[:, None]  # [F (from), 1]
        k = np.exp(-0.5 * ((x[None, :] - x[:, None]) / sd) ** 2)  # [from, to]
        k = k / np.maximum((k * w[None, :]).sum(axis=1, keepdims=True), 1e-300)
        k[0] = 0.0
        k[0, 0] = 1.0 / w[0]  # D = 0 stays at 0
        return w[:, None] * k

    def spline_basis(self, controls: int) -> np.ndarray:
        """[knots, controls]: cubic B-splines, evenly spaced over the knot *index*.

        A head that outputs ``controls`` coefficients gives knot log-densities
        ``basis @ c``: smooth on the scale of a few knots (no knot-to-knot noise, which
        adding many windows would amplify into spikes), while any locally quadratic
        log-likelihood, i.e. a Gaussian of any width, is still represented exactly.
        """
        from scipy.interpolate import BSpline

        n = self.knots.size
        degree = 3
        inner = np.linspace(0.0, n - 1.0, controls - degree + 1)
        step = inner[1] - inner[0]
        t = np.concatenate([inner[0] - step * np.arange(degree, 0, -1), inner, inner[-1] + step * np.arange(1, degree + 1)])
        return BSpline.design_matrix(np.arange(n, dtype=float), t, degree).toarray()

    def to_dict(self) -> dict:
        return {"intervals": self.intervals, "top": self.top, "systematic_rel": self.systematic_rel,
                "lr_scale": self.lr_scale, "combine_exponent": self.combine_exponent,
                "posterior_profile": [list(p) for p in self.posterior_profile]}

    @classmethod
    def from_dict(cls, data: dict | None) -> "DGrid":
        data = data or {}
        return cls(intervals=int(data.get("intervals", 96)), top=float(data.get("top", 2.0)),
                   systematic_rel=float(data.get("systematic_rel", 0.0)), lr_scale=float(data.get("lr_scale", 1.0)),
                   combine_exponent=float(data.get("combine_exponent", 0.0)),
                   posterior_profile=tuple(tuple(p) for p in data.get("posterior_profile", ())))


def profile_problem(profile: Sequence[Sequence[float]]) -> str | None:
    """What is wrong with a profile of points (D, factor), or None: two or more points, D
    increasing, every factor a positive number (an empty profile is fine: none)."""
    pts = [tuple(p) for p in profile]
    if not pts:
        return None
    if any(len(p) != 2 for p in pts) or len(pts) < 2 or any(b[0] <= a[0] for a, b in zip(pts, pts[1:])) \
            or not all(f > 0 and math.isfinite(f) for _, f in pts):
        return "needs two or more points (D, factor), D increasing, factor > 0"
    return None


@dataclass(frozen=True)
class TrainingPrior:
    """The D prior a grid model was trained under (units of d_max), to be divided out.

    ``in_range`` of the movies had D uniform on [0, 1], ``beyond`` uniform on [1, top],
    and the rest uniform on [top, 2·top] (the overflow entry).
    """

    in_range: float = 0.55
    beyond: float = 0.30

    @property
    def overflow(self) -> float:
        return max(0.0, 1.0 - self.in_range - self.beyond)

    def log_density(self, grid: DGrid) -> np.ndarray:
        """[n]: log π at the knots (densities per unit of d_max) and log mass of the overflow."""
        k = grid.knots
        dens = np.where(k <= 1.0, self.in_range, self.beyond / (grid.top - 1.0))
        over = max(self.overflow, 1e-12)
        with np.errstate(divide="ignore"):
            return np.concatenate([np.log(dens), [math.log(over)]])

    def to_dict(self) -> dict:
        return {"in_range": self.in_range, "beyond": self.beyond, "overflow": self.overflow}

    @classmethod
    def from_dict(cls, data: dict | None) -> "TrainingPrior":
        data = data or {}
        return cls(in_range=float(data.get("in_range", 0.55)), beyond=float(data.get("beyond", 0.30)))


def window_log_likelihood(log_density: np.ndarray, grid: DGrid, prior: TrainingPrior,
                          temperature: float = 1.0, warp: Sequence[Sequence[float]] = (),
                          smooth_knots: float = 0.0,
                          temperature_profile: Sequence[Sequence[float]] = ()) -> np.ndarray:
    """Network output (log p(D | w) at the knots + log P(overflow), any constant) → log-likelihood.

    Divides out the training prior, applies the model's calibration — smoothing over
    ``smooth_knots`` knots (:func:`smooth_log_likelihood`), the D-axis ``warp``
    (:func:`warp_log_likelihood`) and the ``temperature`` (ℓ is divided by it; < 1 sharpens
    an under-confident network), both fitted on held-out movies of known D
    (:mod:`dle_stream.training.calibration`) —, subtracts the maximum; clipped at
    :data:`LOG_FLOOR`. Shape [..., n] → [..., n].
    """
    ll = np.asarray(log_density, dtype=np.float64) - prior.log_density(grid)
    if smooth_knots > 0:
        ll = smooth_log_likelihood(ll, smooth_knots)
    if len(warp):
        ll = warp_log_likelihood(ll, grid, warp)
    ll = ll - np.max(ll, axis=-1, keepdims=True)
    ll = ll / window_temperatures(ll, grid, temperature, temperature_profile)[..., None]
    return np.maximum(ll, LOG_FLOOR)


def window_temperatures(log_likelihood: np.ndarray, grid: DGrid, temperature: float,
                        profile: Sequence[Sequence[float]] = ()) -> np.ndarray:
    """Each window's temperature [...]: ``temperature`` times the ``profile`` (points (D, factor),
    D in units of d_max, linear between them, constant beyond the ends) read at the D where
    the window's log-likelihood [..., n] peaks (its overflow entry not counted).

    Why a profile: one temperature leaves single windows too wide at small D and too narrow
    near the top of the range (measured on brain-qd-low-combined: 68 % intervals held the
    truth in 83–92 % of windows at D < 0.5·d_max and 65–73 % above); the peak is the
    window's own reading of where it stands.
    """
    ll = np.asarray(log_likelihood, dtype=np.float64)
    t = np.full(ll.shape[:-1], float(temperature))
    if len(profile):
        pts = np.asarray(profile, dtype=np.float64)
        peak = grid.knots[np.argmax(np.where(np.isfinite(ll[..., :-1]), ll[..., :-1], -np.inf), axis=-1)]
        t = t * np.interp(peak, pts[:, 0], pts[:, 1])
    return t


def smooth_log_likelihood(log_likelihood: np.ndarray, knots_sd: float) -> np.ndarray:
    """The knot log-likelihoods [..., n] smoothed by a Gaussian of ``knots_sd`` knots (over
    the knot index; weights renormalised at the ends of the grid); the overflow entry is kept.

    Why: a network's log-likelihood carries small bumps on the scale of a few knots that
    are the same for every window (measured on brain-qd-low-combined: the average
    log-likelihood of 512 windows of one D peaked ±0.015–0.05·d_max away from where its
    neighbours put it, alternating from one D to the next). Adding K windows multiplies
    the bumps by K, and they pin the combined D to a few knots. Smoothing a log-likelihood
    leaves a quadratic one (a Gaussian likelihood) as it is up to a constant, so the width
    and place of a smooth peak are kept.
    """
    ll = np.asarray(log_likelihood, dtype=np.float64)
    return np.concatenate([ll[..., :-1] @ _smoothing_matrix(ll.shape[-1] - 1, float(knots_sd)), ll[..., -1:]], axis=-1)


def _smoothing_matrix(n: int, sd: float) -> np.ndarray:
    """[n, n]: a Gaussian of ``sd`` entries over the index, columns summing to one."""
    i = np.arange(n, dtype=np.float64)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sd) ** 2)
    return k / k.sum(axis=0, keepdims=True)


def warp_function(grid: DGrid, warp: Sequence[Sequence[float]]) -> Callable[[np.ndarray], np.ndarray]:
    """The calibration's map m: true D → the D at which the network's likelihood peaks on average.

    ``warp`` holds points (D, m(D)) in units of d_max, D increasing, m non-decreasing;
    between them m is linear, beyond the last point it continues with the last slope,
    below the first with the first slope; clipped to [0, top].
    """
    pts = np.asarray(warp, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2:
        raise DleStreamError("likelihood warp: needs at least two (D, m(D)) points")
    a, b = pts[:, 0], pts[:, 1]
    if np.any(np.diff(a) <= 0) or np.any(np.diff(b) < 0):
        raise DleStreamError("likelihood warp: D must increase and m(D) must not decrease")
    lo = (b[1] - b[0]) / (a[1] - a[0])
    hi = (b[-1] - b[-2]) / (a[-1] - a[-2])

    def m(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        y = np.interp(x, a, b)
        y = np.where(x < a[0], b[0] + lo * (x - a[0]), y)
        y = np.where(x > a[-1], b[-1] + hi * (x - a[-1]), y)
        return np.clip(y, 0.0, grid.top)

    return m


def warp_log_likelihood(log_likelihood: np.ndarray, grid: DGrid, warp: Sequence[Sequence[float]]) -> np.ndarray:
    """ℓ'(D) = ℓ(m(D)) at the knots (linear between knots); the overflow entry is kept.

    A network trained on a finite budget can put the peak of its average likelihood for
    true D at m(D) ≠ D (measured: a pull toward the middle of the range of a few % of
    d_max). One window cannot show it, but adding many windows turns it into a confident
    error; reading ℓ at m(D) puts the expected log-likelihood's maximum back at the true D
    (and widens ℓ where m is flat: D that the network cannot tell apart stay apart).
    """
    ll = np.asarray(log_likelihood, dtype=np.float64)
    k = grid.knots
    warped = ll[..., :-1] @ _linear_interp_matrix(k, warp_function(grid, warp)(k))
    return np.concatenate([warped, ll[..., -1:]], axis=-1)


def gaussian_log_likelihood(d: np.ndarray, sigma: np.ndarray, grid: DGrid) -> np.ndarray:
    """A Gaussian D ± σ (units of d_max, arrays [...]) as a log-likelihood on ``grid`` → [..., n].

    For estimators that give only D ± σ (the classic tracker, RICS, "gaussian" models);
    the overflow entry is the value at 1.5·top. NaN inputs give NaN rows.
    """
    d = np.asarray(d, dtype=np.float64)[..., None]
    s = np.asarray(sigma, dtype=np.float64)[..., None]
    x = np.concatenate([grid.knots, [1.5 * grid.top]])
    with np.errstate(invalid="ignore", divide="ignore"):
        ll = -0.5 * ((x - d) / s) ** 2
        ll = ll - np.max(ll, axis=-1, keepdims=True)
    ll = np.maximum(ll, LOG_FLOOR)
    return np.where(np.isfinite(d) & np.isfinite(s) & (s > 0), ll, np.nan)


def information_weight(grid: DGrid, n_windows: ArrayLike | None) -> np.ndarray | float:
    """K^(−β): the factor on the summed log-likelihood of K windows (:attr:`DGrid.combine_exponent`);
    1 for one window, without an exponent, or when ``n_windows`` is not given."""
    if n_windows is None or grid.combine_exponent <= 0:
        return 1.0
    n = np.maximum(np.asarray(n_windows, dtype=np.float64), 1.0)
    return np.power(n, -grid.combine_exponent)


def combined_factor(log_likelihood: np.ndarray, grid: DGrid, n_windows: ArrayLike | None = None) -> np.ndarray:
    """[...]: the factor on each (summed) log-likelihood [..., n] before its posterior is read:
    the information weight of its ``n_windows`` (:func:`information_weight`) divided by the
    grid's posterior profile read where the row peaks (its overflow entry not counted).
    One factor per row: every window added into it is weighted alike."""
    ll = np.asarray(log_likelihood, dtype=np.float64)
    factor = np.broadcast_to(np.asarray(information_weight(grid, n_windows), dtype=np.float64), ll.shape[:-1])
    if grid.posterior_profile:
        pts = np.asarray(grid.posterior_profile, dtype=np.float64)
        knots = ll[..., :-1]
        peak = grid.knots[np.argmax(np.where(np.isfinite(knots), knots, -np.inf), axis=-1)]
        factor = factor / np.interp(peak, pts[:, 0], pts[:, 1])
    return np.array(factor, dtype=np.float64)


def log_posterior_at(log_likelihood: np.ndarray, grid: DGrid, d_norm: np.ndarray,
                     n_windows: ArrayLike | None = None) -> np.ndarray:
    """Log posterior density (flat prior on the operating range [0, 1], units of d_max) of each
    row of ``log_likelihood`` [N, n] at ``d_norm`` [N] (inside the range): the log score.
    ``n_windows`` [N]: windows summed in each row (see :func:`combined_factor`)."""
    ll = np.asarray(log_likelihood, dtype=np.float64)
    ll = ll * np.reshape(combined_factor(ll, grid, n_windows), (-1, 1))
    fine = ll[:, :-1] @ grid.interp_matrix
    inr = grid.fine <= 1.0 + 1e-12
    x = grid.fine[inr]
    if grid.systematic_kernel is not None:
        top = fine.max(axis=1, keepdims=True)
        fine = np.log(np.maximum(np.exp(fine - top) @ grid.systematic_kernel, 1e-300)) + top
    f = fine[:, inr]
    m = f.max(axis=1, keepdims=True)
    z = np.log(_cdf(np.exp(f - m), x)[:, -1]) + m[:, 0]
    at = np.array([np.interp(d, x, row) for d, row in zip(np.asarray(d_norm, float), f)])
    return at - z


def combine(log_likelihoods: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sum of independent log-likelihoods along ``axis``, NaN rows skipped; max subtracted.

    A slice with no finite row stays all-NaN.
    """
    ll = np.asarray(log_likelihoods, dtype=np.float64)
    ok = np.all(np.isfinite(ll), axis=-1, keepdims=True)
    total = np.where(ok, ll, 0.0).sum(axis=axis)
    any_ok = np.any(ok, axis=axis)
    total = total - np.max(total, axis=-1, keepdims=True)
    return np.where(any_ok, total, np.nan)


@dataclass
class Posterior:
    """Summaries of combined log-likelihoods (arrays over the leading axes), µm²/s.

    ``d`` is the posterior median and ``sigma`` the posterior std under a flat prior on
    the operating range; ``lo68..hi95`` are highest-density intervals under that prior
    (asymmetric near D = 0); ``p_above`` is the probability that D exceeds the range
    (prior odds 1:1, see the module's docstring); ``lower95_wide`` the 5 % quantile under
    that prior (the "D > x" shown when out of range).
    """

    d: np.ndarray
    sigma: np.ndarray
    lo68: np.ndarray
    hi68: np.ndarray
    lo95: np.ndarray
    hi95: np.ndarray
    p_above: np.ndarray
    lower95_wide: np.ndarray
    d_max: float

    def take(self, index) -> Posterior:
        """The summaries of entries ``index`` of the leading axis (a new Posterior)."""
        arrays = {f: np.asarray(getattr(self, f))[index]
                  for f in ("d", "sigma", "lo68", "hi68", "lo95", "hi95", "p_above", "lower95_wide")}
        return Posterior(**arrays, d_max=self.d_max)

    @property
    def above_range(self) -> np.ndarray:
        """The data say D is at or above the top of the range (report "D > lower95_wide")."""
        return self.p_above >= P_ABOVE_FLAG

    @property
    def little_information(self) -> np.ndarray:
        """Too little information: the range cannot be told apart, or the posterior is nearly the prior.
        Never together with :attr:`above_range` (then the data do say something: D > x)."""
        above = self.above_range
        undecided = (self.p_above >= P_ABOVE_RULED_OUT) & ~above
        return (undecided | (self.sigma > LITTLE_INFORMATION_STD * self.d_max)) & ~above


def posterior(log_likelihood: np.ndarray, grid: DGrid, d_max_um2_s: float,
              n_windows: ArrayLike | None = None) -> Posterior:
    """Posterior summaries of (combined) log-likelihoods [..., n] on ``grid``; D in µm²/s.

    ``d_max_um2_s`` is the operating range's top in the stream's units (the card's d_max
    divided by the stream's time scale). ``n_windows`` [...]: how many windows were added
    into each row (their information is weighted by :func:`information_weight`; None: one);
    the grid's posterior profile, if any, applies too (:func:`combined_factor`).
    """
    ll = np.asarray(log_likelihood, dtype=np.float64)
    weight = combined_factor(ll, grid, n_windows)  # (a scalar count too: `log show` passes one per row)
    if np.any(weight != 1.0):
        ll = ll * weight[..., None]
    lead = ll.shape[:-1]
    flat = ll.reshape(-1, ll.shape[-1])
    bad = ~np.all(np.isfinite(flat), axis=-1)
    flat = np.where(bad[:, None], 0.0, flat)
    fine_ll = flat[:, :-1] @ grid.interp_matrix  # [N, F]
    over_ll = flat[:, -1]
    x = grid.fine
    w = grid.fine_weights
    m = np.maximum(fine_ll.max(axis=1), over_ll)
    dens = np.exp(fine_ll - m[:, None])
    if grid.systematic_kernel is not None:
        dens = dens @ grid.systematic_kernel

    # out of range: prior odds 1:1 for D in [0, 1] against D above it, the latter uniform on
    # [1, 2·top] (the beyond part of the grid, then the overflow standing for [top, 2·top])
    in_w = np.where(x <= 1.0, 0.5, 0.5 / (2 * grid.top - 1.0)) * w
    mass = dens * in_w
    over_mass = np.exp(over_ll - m) * 0.5 * grid.top / (2 * grid.top - 1.0)
    total = mass.sum(axis=1) + over_mass
    above = mass[:, x > 1.0].sum(axis=1) + over_mass
    p_above = above / total
    lower95 = _quantile(_cdf(dens * np.where(x <= 1.0, 0.5, 0.5 / (2 * grid.top - 1.0)), x) / total[:, None], x, 0.05)

    # operating range [0, 1] (boolean indexing makes a column-ordered copy; the sums over it
    # below depend on that order in their last bits, so it is kept)
    inr = x <= 1.0 + 1e-12
    xo = x[inr]
    dens_in = dens[:, inr]
    wo = _trapezoid_weights(xo)
    mo = dens_in * wo
    zo = mo.sum(axis=1)
    po = mo / zo[:, None]
    median = _quantile(_cdf(dens_in, xo) / zo[:, None], xo, 0.5)
    mean = (po * xo).sum(axis=1)
    std = np.sqrt(np.maximum((po * xo**2).sum(axis=1) - mean**2, 0.0))
    (lo68, hi68), (lo95, hi95) = _hpd_levels(po, dens_in, xo, (0.6827, 0.9545))

    def out(a: np.ndarray, scale: float = d_max_um2_s) -> np.ndarray:
        a = np.where(bad, np.nan, a * scale)
        return a.reshape(lead)

    return Posterior(
        d=out(median), sigma=out(std), lo68=out(lo68), hi68=out(hi68), lo95=out(lo95), hi95=out(hi95),
        p_above=out(p_above, 1.0), lower95_wide=out(lower95), d_max=float(d_max_um2_s),
    )


def _linear_interp_matrix(knots: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[knots, points]: values at ``points`` (within [knots[0], knots[-1]]) = knot values @ this,
    linear between knots."""
    idx = np.clip(np.searchsorted(knots, points, side="right") - 1, 0, knots.size - 2)
    t = (points - knots[idx]) / (knots[idx + 1] - knots[idx])
    mat = np.zeros((knots.size, points.size))
    mat[idx, np.arange(points.size)] = 1 - t
    mat[idx + 1, np.arange(points.size)] += t
    return mat


def _trapezoid_weights(x: np.ndarray) -> np.ndarray:
    """Weights [F] such that Σ w·f is the trapezoid rule for ∫ f over the points ``x``."""
    w = np.zeros_like(x)
    d = np.diff(x)
    w[:-1] += d / 2
    w[1:] += d / 2
    return w


def _cdf(density: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cumulative trapezoid integral of ``density`` [N, F] over ``x`` [F], 0 at x[0]."""
    out = np.empty(density.shape)
    out[:, 0] = 0.0
    np.cumsum(0.5 * (density[:, 1:] + density[:, :-1]) * np.diff(x)[None], axis=1, out=out[:, 1:])
    return out


def _quantile(cdf: np.ndarray, x: np.ndarray, q: float) -> np.ndarray:
    """x where each row's cdf (non-decreasing, ending ≤ 1) first reaches q, linearly interpolated."""
    idx = np.clip((cdf < q).sum(axis=1), 0, x.size - 1)
    prev = np.clip(idx - 1, 0, x.size - 1)
    c1 = cdf[np.arange(cdf.shape[0]), idx]
    c0 = np.where(idx > 0, cdf[np.arange(cdf.shape[0]), prev], 0.0)
    x1 = x[idx]
    x0 = np.where(idx > 0, x[prev], x[0])
    t = np.where(c1 > c0, (q - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.0)
    return x0 + np.clip(t, 0, 1) * (x1 - x0)


def _hpd(p: np.ndarray, dens: np.ndarray, x: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-density interval: the points of highest density holding ``level`` of the
    mass; returned as [min, max] of those points (one interval; exact for unimodal rows)."""
    return _hpd_levels(p, dens, x, (level,))[0]


def _hpd_levels(p: np.ndarray, dens: np.ndarray, x: np.ndarray,
                levels: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`_hpd` for several levels from one sort of the densities (rows with no point: NaN)."""
    order = np.argsort(-dens, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass of the denser points
    xs = x[order]
    out = []
    for level in levels:
        keep = before < level
        lo = np.where(keep, xs, np.inf).min(axis=1)
        hi = np.where(keep, xs, -np.inf).max(axis=1)
        none = ~keep.any(axis=1)
        out.append((np.where(none, np.nan, lo), np.where(none, np.nan, hi)))
    return out
