"""A classic estimator that needs no tracking: raster image correlation (RICS / STICS).

Tracking fails where dle-stream is needed (crowded, blurred tiles); image correlation
does not look at particles one by one. :class:`RicsEstimator` has the call shape of the
classic (trackpy) estimator: a movie [T, H, W] of one tile in, D ± σ (µm²/s) out.

**Correlation.** The movie (detector units; any gain and offset) minus its mean over
the whole window, x = I − Ī, is correlated with itself at a lag of ξ pixels along the
line, ψ lines and k frames,

    C(ξ, ψ, k) = Σ x[t, r, c] · x[t + k, r + ψ, c + ξ] / n(ξ, ψ, k),

over all n = (T − k)(H − |ψ|)(W − |ξ|) pairs inside the window (per-frame 2D FFTs,
zero-padded to 2H × 2W so nothing wraps around, then a sum over frame pairs; the
normalisation by the overlap count n makes every lag an unbiased mean). The zero lag
(0, 0, 0) holds the shot and read noise and is never used.

**Lag → time.** The second pixel of a pair is recorded τ after the first: for a
unidirectional raster τ = |ξ·δ + ψ·L + k·F| (δ dwell, L line period, F frame period of
the *full* frame, which a tile inherits: :func:`lag_time_us`). For a bidirectional scan
τ depends on the row; the mean of |t₂ − t₁| over the pairs of the tile (placed at the
frame's origin) is used, an approximation good while W_full·δ ≪ L.

**Model** (3D Gaussian PSF, free diffusion, independent particles). The simulator's
PSF, in photons, is exp(−r²/2σxy²)·exp(−z²/2σz²). The correlation of the light of one
particle at two times is the overlap of the PSF with itself displaced by the lag and
blurred by the Brownian step (variance 2Dτ per axis): a Gaussian of variance
2σxy² + 2Dτ per lateral axis and 2σz² + 2Dτ along z. Written with w0 = 2σxy and
wz = 2σz (µm):

    G(ξ, ψ, k) = G0 · (1 + 4Dτ/w0²)^(−1) · (1 + 4Dτ/wz²)^(−1/2)
                 · exp(−((ξ·dx)² + (ψ·dx)²) / (w0² + 4Dτ)) + o_b

with dx the pixel size (µm), τ in s, D in µm²/s, G0 (detector units²) the amplitude and
o_b one offset per block of lags (below): the offsets absorb the bias of subtracting
the window mean and slow changes of the density (a cloud of particles drifting through
the tile), which are flat over a few pixels.

**Lags used.** Two blocks, so that both regimes carry information:

* *line lags* (k = 0; 0 ≤ ψ ≤ R, |ξ| ≤ R, (ξ, ψ) ≠ (0, 0), half plane by symmetry):
  τ from δ to R·L (µs–ms): they fix the PSF width (ξ, ψ small: τ ≈ 0) and carry fast
  diffusion (4Dτ comparable with w0² within a few lines);
* *frame lags* (k ≥ 1, |ξ|, |ψ| ≤ R): τ ≈ k·F (tens of ms to s): they carry slow
  diffusion. The frame lags k are 1, 2, 3, … up to k_max, thinned geometrically, with
  k_max the lag where a particle with D_ref = :data:`D_REF_FRACTION`·D_max spreads by
  w0² (4·D_ref·k·F = w0²), between :data:`MIN_FRAME_LAGS` and T/4. Each frame lag is
  its own block (own offset).

R = :data:`MAX_LAG_PX` px (capped by the tile: at most H − 1 − H//4 rows and likewise
columns, so every lag keeps ≥ a quarter of the tile). Every lag is weighted by √n
(its number of pairs), and each block's weights are scaled so every block has the same
total weight as the line block divided by the number of frame-lag blocks (i.e. line lags
and frame lags weigh the same in the fit whatever their counts).

**Fit.** Weighted least squares. G0 and the offsets enter linearly and are solved
exactly for every (D, σxy) (variable projection); D ≥ 0 and σxy are found by a grid
(D: 0 and log-spaced from 10⁻³·D_max to 5·D_max; σxy: ½–2× nominal, or fixed when
``psf_sigma_xy_um`` is given) refined by ``scipy.optimize.least_squares``. σz is
``psf_sigma_z_um`` when given, else :data:`AXIAL_RATIO`·σxy (the reference two-photon
PSF, 1.36/0.21 µm); its factor matters only for slow particles at long frame lags.

**Uncertainty.** Delete-one jackknife over :data:`N_SEGMENTS` consecutive segments of
the window: a pair of frames belongs to the segment of its first frame, the correlation
without segment s is refit (started at the full fit), and
σ² = (S − 1)/S · Σ_s (D̂₋ₛ − D̄)². This carries the strong correlation between lags
that a least-squares covariance would ignore. σ has a floor of
:data:`SIGMA_FLOOR_FRACTION`·(D_max − D_min).

**Flags.** ``"no_signal"`` (D̂ = σ = NaN): the correlation excess at the nearest lags
(mean of C over the line lags with ξ² + ψ² ≤ 2, minus the mean over the outer ring of
line lags) is below :data:`MIN_SIGNAL_Z` times its standard error under white noise
(C(0,0,0)·√(Σ 1/n)/count per group: a lag's C is a mean of n products of independent
pixels; the zero-lag variance includes any signal, so the test errs towards "no
signal"), or the fitted G0 ≤ 0 — a movie of pure noise, or too few particles seen.
``"fit_failed"`` (NaN): the fit, or more than one of its jackknife refits, did not
converge to a finite D.
``"clipped"``: D̂ fell outside [D_min, D_max] and was clipped into it.
``"psf_at_bound"``: the fitted σxy hit the edge of its range (D̂ is suspect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dle_stream.per_movie import estimate_each
from dle_stream.timing import ScanTiming

#: Largest spatial lag (px) used along lines and across lines.
MAX_LAG_PX = 7
#: D_ref = this × D_max sets the longest frame lag (where D_ref spreads the PSF by w0²).
D_REF_FRACTION = 0.02
#: Frame lags used at least (k = 1 … this), whatever the D range.
MIN_FRAME_LAGS = 3
#: At most this many distinct frame lags (geometrically thinned beyond).
MAX_FRAME_LAG_COUNT = 12
#: Segments of the window for the jackknife (σ) and for the signal test.
N_SEGMENTS = 8
#: Correlation excess at the nearest lags, in white-noise standard errors, below which a
#: movie is "no_signal" (one-sided p ≈ 3·10⁻⁷ for pure noise).
MIN_SIGNAL_Z = 5.0
#: σz / σxy when σz is not given (the reference two-photon PSF: 1.36 / 0.21 µm).
AXIAL_RATIO = 1.36 / 0.21
#: Nominal σxy in pixels when ``psf_sigma_xy_um`` is not given (centre of the search).
NOMINAL_PSF_PX = 1.4
#: σxy search range, × nominal.
PSF_RANGE = (0.5, 2.0)
#: Floor on σ, × (D_max − D_min).
SIGMA_FLOOR_FRACTION = 1e-3


@dataclass
class RicsResult:
    """One movie's correlation estimate.

    Attributes:
        d_um2_s: D̂, µm²/s (NaN when flagged ``no_signal`` or ``fit_failed``).
        sigma_um2_s: its jackknife standard error, µm²/s (NaN with D̂).
        flags: ``"no_signal"``, ``"fit_failed"``, ``"clipped"``, ``"psf_at_bound"``.
        d_fit_um2_s: D̂ before the prior range was applied, µm²/s.
        psf_sigma_xy_um: fitted (or given) σxy, µm.
        amplitude: fitted G0, detector units².
        signal_z: the correlation excess at the nearest lags, in white-noise standard errors.
    """

    d_um2_s: float
    sigma_um2_s: float
    flags: set[str] = field(default_factory=set)
    d_fit_um2_s: float = math.nan
    psf_sigma_xy_um: float = math.nan
    amplitude: float = math.nan
    signal_z: float = math.nan


def lag_time_us(timing: ScanTiming, xi, psi, k, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Time τ (µs, ≥ 0) between the two pixels of a pair at lag ξ px (along the line),
    ψ lines and k frames: |ξ·δ + ψ·L + k·F| for a unidirectional scan. For a bidirectional
    scan, the mean of |t₂ − t₁| over the pairs of a ``height`` × ``width`` tile at the
    frame's origin (odd lines run backwards, so the sign of the ξ·δ term alternates)."""
    xi, psi, k = np.broadcast_arrays(np.asarray(xi, dtype=np.float64), np.asarray(psi, dtype=np.float64),
                                     np.asarray(k, dtype=np.float64))
    if not timing.bidirectional:
        return np.abs(xi * timing.dwell_us + psi * timing.line_period_us + k * timing.frame_period_us)
    height = timing.height_px if height is None else height
    width = timing.width_px if width is None else width
    t0 = timing.pixel_times_us(0, 0, height, width, n_frames=1)[0]
    out = np.empty(xi.shape)
    for idx in np.ndindex(xi.shape):
        a, b, kk = int(xi[idx]), int(psi[idx]), k[idx]
        r1 = slice(max(0, -b), height - max(0, b))
        c1 = slice(max(0, -a), width - max(0, a))
        r2 = slice(max(0, b), height + min(0, b))
        c2 = slice(max(0, a), width + min(0, a))
        out[idx] = float(np.mean(np.abs(t0[r2, c2] - t0[r1, c1] + kk * timing.frame_period_us)))
    return out


def frame_lags(timing: ScanTiming, d_max_um2_s: float, psf_sigma_xy_um: float, n_frames: int) -> np.ndarray:
    """The frame lags k ≥ 1 used (see the module docstring)."""
    w0sq = 4 * psf_sigma_xy_um**2
    d_ref = D_REF_FRACTION * d_max_um2_s
    k_max = math.ceil(w0sq / (4 * d_ref * timing.frame_period_us * 1e-6))
    k_max = int(min(max(k_max, MIN_FRAME_LAGS), max(1, n_frames // 4)))
    if k_max <= MAX_FRAME_LAG_COUNT:
        return np.arange(1, k_max + 1)
    for n in range(MAX_FRAME_LAG_COUNT, 20 * MAX_FRAME_LAG_COUNT):  # geometric, 1, 2, 3, … thinned
        ks = np.unique(np.round(np.geomspace(1, k_max, n)).astype(int))
        if ks.size >= MAX_FRAME_LAG_COUNT:
            break
    return ks


def correlation_segments(movie: np.ndarray, ks: np.ndarray, n_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-segment sums of x[t]·x[t+k] at every spatial lag, and their pair counts.

    Args:
        movie: [T, H, W], already mean-subtracted.
        ks: frame lags (k = 0 included by the caller where wanted).
        n_segments: S; a pair belongs to the segment of its first frame t, segment s
            holding t in [s·T/S, (s+1)·T/S).

    Returns:
        sums [S, K, 2H, 2W] (index [ψ mod 2H, ξ mod 2W]: Σ x[t, r, c]·x[t+k, r+ψ, c+ξ]),
        frame pairs per segment [S, K] (multiply by (H − |ψ|)(W − |ξ|) for pair counts).
    """
    T, H, W = movie.shape
    spec = np.fft.rfft2(movie, s=(2 * H, 2 * W))  # [T, 2H, W+1]
    bounds = (np.arange(n_segments + 1) * T) // n_segments
    sums = np.empty((n_segments, len(ks), 2 * H, W + 1), dtype=np.complex128)
    counts = np.zeros((n_segments, len(ks)))
    for j, k in enumerate(ks):
        k = int(k)
        prod = np.conj(spec[: T - k]) * spec[k:]
        cs = np.concatenate([np.zeros((1,) + prod.shape[1:], prod.dtype), np.cumsum(prod, axis=0)])
        b = np.minimum(bounds, T - k)
        sums[:, j] = cs[b[1:]] - cs[b[:-1]]
        counts[:, j] = b[1:] - b[:-1]
    return np.fft.irfft2(sums, s=(2 * H, 2 * W)), counts


class RicsEstimator:
    """Raster/spatio-temporal image correlation fit (see the module docstring).

    Args:
        timing: the scan timing of the recording (δ, L, F of the full frame; pixel size dx).
        psf_sigma_xy_um: lateral PSF std σxy, µm: fixed in the fit when given, fitted
            jointly with D when ``None`` (recommended when only a prior of σxy is known:
            a wrong σxy biases D).
        d_max_um2_s: top of the D prior, µm²/s (D̂ is clipped to it; sets the frame lags).
        d_min_um2_s: bottom of the D prior, µm²/s.
        psf_sigma_z_um: axial PSF std σz, µm; ``None``: :data:`AXIAL_RATIO` × σxy.
    """

    def __init__(self, timing: ScanTiming, psf_sigma_xy_um: float | None, d_max_um2_s: float,
                 d_min_um2_s: float = 0.0, psf_sigma_z_um: float | None = None) -> None:
        if not (d_max_um2_s > d_min_um2_s >= 0):
            raise ValueError("rics estimator: need 0 ≤ d_min < d_max (µm²/s)")
        if psf_sigma_xy_um is not None and not psf_sigma_xy_um > 0:
            raise ValueError("rics estimator: σxy must be > 0 µm (or None to fit it)")
        if psf_sigma_z_um is not None and not psf_sigma_z_um > 0:
            raise ValueError("rics estimator: σz must be > 0 µm (or None)")
        self.timing = timing
        self.psf_sigma_xy_um = None if psf_sigma_xy_um is None else float(psf_sigma_xy_um)
        self.psf_sigma_z_um = None if psf_sigma_z_um is None else float(psf_sigma_z_um)
        self.d_min_um2_s = float(d_min_um2_s)
        self.d_max_um2_s = float(d_max_um2_s)
        self._layouts: dict[tuple[int, int, int], dict] = {}

    # ---------------------------------------------------------------- lags
    @property
    def nominal_psf_um(self) -> float:
        if self.psf_sigma_xy_um is not None:
            return self.psf_sigma_xy_um
        return NOMINAL_PSF_PX * self.timing.pixel_size_um

    def layout(self, T: int, H: int, W: int) -> dict:
        """Lags, their times, blocks and weights for a window of this shape (cached)."""
        key = (T, H, W)
        if key in self._layouts:
            return self._layouts[key]
        R_psi = min(MAX_LAG_PX, H - 1 - H // 4)
        R_xi = min(MAX_LAG_PX, W - 1 - W // 4)
        ks = frame_lags(self.timing, self.d_max_um2_s, self.nominal_psf_um, T)
        ks = ks[ks < T - 1]
        xi_l, psi_l, k_l, blk = [], [], [], []
        for psi in range(0, R_psi + 1):  # line lags: half plane
            for xi in range(-R_xi, R_xi + 1):
                if psi == 0 and xi <= 0:
                    continue
                xi_l.append(xi)
                psi_l.append(psi)
                k_l.append(0)
                blk.append(0)
        for j, k in enumerate(ks):
            for psi in range(-R_psi, R_psi + 1):
                for xi in range(-R_xi, R_xi + 1):
                    xi_l.append(xi)
                    psi_l.append(psi)
                    k_l.append(int(k))
                    blk.append(j + 1)
        xi_a, psi_a, k_a, blk_a = (np.array(v) for v in (xi_l, psi_l, k_l, blk))
        all_k = np.concatenate([[0], ks]).astype(int)
        kidx = np.searchsorted(all_k, k_a)
        spatial = (H - np.abs(psi_a)) * (W - np.abs(xi_a))
        n_pairs = spatial * (T - k_a)
        w = np.sqrt(n_pairs.astype(np.float64))
        n_blocks = 1 + len(ks)
        line_total = w[blk_a == 0].sum()
        for b in range(1, n_blocks):  # frame lags together weigh as much as the line lags
            m = blk_a == b
            w[m] *= line_total / (len(ks) * w[m].sum())
        w /= w.max()
        tau_s = lag_time_us(self.timing, xi_a, psi_a, k_a, H, W) * 1e-6
        rho2 = ((xi_a**2 + psi_a**2) * self.timing.pixel_size_um**2).astype(np.float64)
        near = (k_a == 0) & (xi_a**2 + psi_a**2 <= 2)
        far = (k_a == 0) & (np.maximum(np.abs(xi_a), psi_a) == max(R_psi, R_xi))
        onehot = np.zeros((blk_a.size, n_blocks))
        onehot[np.arange(blk_a.size), blk_a] = 1.0
        lay = dict(onehot=onehot, ks=all_k, xi=xi_a, psi=psi_a, k=k_a, kidx=kidx, block=blk_a, n_blocks=n_blocks,
                   spatial=spatial, w=w, tau_s=tau_s, rho2=rho2, near=near, far=far, H=H, W=W)
        self._layouts[key] = lay
        return lay

    # ---------------------------------------------------------------- model
    def _sigma_z(self, sxy):
        return self.psf_sigma_z_um if self.psf_sigma_z_um is not None else AXIAL_RATIO * sxy

    def shape(self, lay: dict, d, sxy) -> np.ndarray:
        """Model correlation without G0 and offsets at every lag; broadcasts over leading
        axes of ``d`` and ``sxy`` ([..., 1] against the lags)."""
        d = np.asarray(d, dtype=np.float64)[..., None]
        sxy = np.asarray(sxy, dtype=np.float64)[..., None]
        w0sq = 4 * sxy**2
        wzsq = 4 * self._sigma_z(sxy) ** 2
        spread = 4 * d * lay["tau_s"]
        return (1 + spread / w0sq) ** -1 * (1 + spread / wzsq) ** -0.5 * np.exp(-lay["rho2"] / (w0sq + spread))

    @staticmethod
    def _project(lay: dict, y: np.ndarray, g: np.ndarray):
        """Weighted LS of y ≈ G0·g + o_block, solved in closed form per model shape.

        ``g`` [..., N]; returns the weighted residual sum of squares [...], G0 [...], the
        blocks' weighted means of y [n_blocks] and of g [M, n_blocks] (offsets follow as
        ȳ_b − G0·ḡ_b)."""
        w2 = lay["w"] ** 2
        blk, nb = lay["block"], lay["n_blocks"]
        sw = np.bincount(blk, weights=w2, minlength=nb)
        ybar = np.bincount(blk, weights=w2 * y, minlength=nb) / sw
        yc = y - ybar[blk]
        gflat = g.reshape(-1, g.shape[-1])
        gbar = ((gflat * w2) @ lay["onehot"]) / sw
        gc = gflat - gbar[:, blk]
        sgy = gc @ (w2 * yc)
        sgg = (gc**2) @ w2
        g0 = sgy / np.maximum(sgg, 1e-300)
        rss = (w2 * yc**2).sum() - sgy * g0
        return rss.reshape(g.shape[:-1]), g0.reshape(g.shape[:-1]), ybar, gbar

    def _residual(self, lay, y, d, sxy):
        g = self.shape(lay, d, sxy)
        _, g0, ybar, gbar = self._project(lay, y, g)
        blk = lay["block"]
        g0 = float(g0)
        model = g0 * g + (ybar - g0 * gbar[0])[blk]
        return lay["w"] * (y - model), g0

    def _sxy_bounds(self) -> tuple[float, float]:
        if self.psf_sigma_xy_um is not None:
            return self.psf_sigma_xy_um, self.psf_sigma_xy_um
        return PSF_RANGE[0] * self.nominal_psf_um, PSF_RANGE[1] * self.nominal_psf_um

    def fit(self, lay: dict, y: np.ndarray, start: tuple[float, float] | None = None) -> tuple[float, float, float, bool]:
        """(D µm²/s, σxy µm, G0, success) of the correlation values ``y`` at the layout's lags."""
        from scipy.optimize import least_squares

        lo_s, hi_s = self._sxy_bounds()
        fixed_s = lo_s == hi_s
        d_hi = 5 * self.d_max_um2_s
        if start is None:
            d_grid = np.concatenate([[0.0], np.geomspace(1e-3 * self.d_max_um2_s, d_hi, 48)])
            s_grid = np.array([lo_s]) if fixed_s else np.geomspace(lo_s, hi_s, 17)
            dd, ss = np.meshgrid(d_grid, s_grid, indexing="ij")
            rss, g0, _, _ = self._project(lay, y, self.shape(lay, dd, ss))
            rss = np.where(g0 > 0, rss, np.inf)
            if not np.isfinite(rss).any():
                return math.nan, math.nan, math.nan, False
            i = np.unravel_index(np.argmin(rss), rss.shape)
            start = (float(dd[i]), float(ss[i]))
        d0, s0 = start
        x_scale = np.array([max(0.05 * self.d_max_um2_s, d0), 0.1 * self.nominal_psf_um])
        if fixed_s:
            fun = lambda p: self._residual(lay, y, p[0], lo_s)[0]  # noqa: E731
            res = least_squares(fun, [d0], bounds=([0.0], [d_hi]), x_scale=x_scale[:1], method="trf")
            d, s = float(res.x[0]), lo_s
        else:
            fun = lambda p: self._residual(lay, y, p[0], p[1])[0]  # noqa: E731
            res = least_squares(fun, [d0, min(max(s0, lo_s), hi_s)], bounds=([0.0, lo_s], [d_hi, hi_s]),
                                x_scale=x_scale, method="trf")
            d, s = float(res.x[0]), float(res.x[1])
        _, g0 = self._residual(lay, y, d, s)
        ok = bool(res.status > 0 and math.isfinite(d) and math.isfinite(g0))
        return d, s, g0, ok

    @staticmethod
    def null_std(lay: dict, variance: float, shape) -> float:
        """Std of the signal statistic (near-lag minus outer-ring mean of C) for white noise
        of this variance: each lag's C is a mean of n products of std ``variance``; the near
        and far means are taken as independent and each lag counted with its own n."""
        T = shape[0]
        n = lay["spatial"] * (T - lay["k"])
        var_near = np.sum(1.0 / n[lay["near"]]) / lay["near"].sum() ** 2
        var_far = np.sum(1.0 / n[lay["far"]]) / lay["far"].sum() ** 2
        return float(variance * math.sqrt(var_near + var_far)) if variance > 0 else math.inf

    # ------------------------------------------------------------- estimate
    def correlation(self, movie) -> tuple[dict, np.ndarray, np.ndarray, float]:
        """(layout, C at the layout's lags [N], leave-one-segment-out C [S, N], C at the zero
        lag (the variance)) of a movie."""
        movie = np.asarray(movie, dtype=np.float64)
        if movie.ndim != 3:
            raise ValueError(f"rics estimator: movie must be [T, H, W], got shape {movie.shape}")
        T, H, W = movie.shape
        if T < 2 * N_SEGMENTS or H < 4 or W < 4:
            raise ValueError(f"rics estimator: need ≥ {2 * N_SEGMENTS} frames of ≥ 4×4 px, got {movie.shape}")
        lay = self.layout(T, H, W)
        x = movie - movie.mean()
        sums, frames = correlation_segments(x, lay["ks"], N_SEGMENTS)
        ii = lay["psi"] % (2 * H)
        jj = lay["xi"] % (2 * W)
        seg = sums[:, lay["kidx"], ii, jj]  # [S, N]
        npairs = frames[:, lay["kidx"]] * lay["spatial"][None]  # [S, N]
        total, ntot = seg.sum(0), npairs.sum(0)
        c = total / ntot
        c_jk = (total[None] - seg) / np.maximum(ntot[None] - npairs, 1)
        return lay, c, c_jk, float(np.mean(x * x))

    def estimate(self, movie) -> RicsResult:
        """D̂ ± σ (µm²/s) of one movie [T, H, W] of one tile (any gain and offset)."""
        movie_shape = np.shape(movie)
        lay, c, c_jk, c0 = self.correlation(movie)
        S = c_jk.shape[0]
        flags: set[str] = set()

        def excess(v):
            return v[..., lay["near"]].mean(-1) - v[..., lay["far"]].mean(-1)

        a = float(excess(c))
        z = a / self.null_std(lay, c0, movie_shape)
        if not z >= MIN_SIGNAL_Z:
            return RicsResult(math.nan, math.nan, {"no_signal"}, signal_z=float(z))
        try:
            d, s, g0, ok = self.fit(lay, c)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            d, s, g0, ok = math.nan, math.nan, math.nan, False
        if not ok:
            return RicsResult(math.nan, math.nan, {"fit_failed"}, signal_z=float(z))
        if not g0 > 0:
            return RicsResult(math.nan, math.nan, {"no_signal"}, signal_z=float(z))
        lo_s, hi_s = self._sxy_bounds()
        if lo_s < hi_s and (s <= lo_s * 1.001 or s >= hi_s * 0.999):
            flags.add("psf_at_bound")
        d_jk = []
        for row in c_jk:
            try:
                dj, _, _, okj = self.fit(lay, row, start=(d, s))
            except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                okj = False
            if okj:
                d_jk.append(dj)
        if len(d_jk) < S - 1:
            flags.add("fit_failed")
            return RicsResult(math.nan, math.nan, flags, d, s, g0, float(z))
        d_jk_a = np.asarray(d_jk)
        n = d_jk_a.size
        sigma = math.sqrt((n - 1) / n * float(np.sum((d_jk_a - d_jk_a.mean()) ** 2)))
        sigma = max(sigma, SIGMA_FLOOR_FRACTION * (self.d_max_um2_s - self.d_min_um2_s))
        raw = d
        if d < self.d_min_um2_s or d > self.d_max_um2_s:
            flags.add("clipped")
            d = min(max(d, self.d_min_um2_s), self.d_max_um2_s)
        return RicsResult(d, sigma, flags, raw, s, g0, float(z))

    def estimate_batch(self, movies) -> tuple[np.ndarray, np.ndarray, list[set[str]]]:
        """D̂ [B], σ [B] (µm²/s) and flags of movies [B, T, H, W] (numpy or CPU torch)."""
        return estimate_each(self.estimate, movies, "rics")
