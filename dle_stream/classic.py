"""The classic estimator: trackpy tracking + the covariance-based estimator (CVE).

A fair reference for the deep-learning estimator (docs/design.md §7): the same call shape (a
movie of one tile in, D ± σ in µm²/s out), with every parameter derived from the scan
timing and the PSF, never tuned per movie.

Pipeline, per movie [T, H, W]:

1. **Background and noise.** Each frame's median is subtracted. The noise level σ_n is
   the robust std of all pixels of the movie, 1.4826 · median(|pixel|) after the median
   subtraction (particles are sparse, so it measures background shot + read noise; in a
   crowded tile it overestimates σ_n a little, which only makes detection stricter). The
   movie is divided by σ_n, so every later threshold is in units of the noise.
2. **Padding.** Each frame is padded by :data:`PAD_PX` = 4 px with its median (0 after
   step 1): trackpy never reports features within ``diameter // 2`` px of an image edge.
3. **Locate** (``trackpy.locate``, one call per movie). ``diameter`` = 2·round(1.5·s)+1
   px with s = σxy/dx the PSF std in pixels (odd, ≥ 3; 5 px for σxy = 0.21 µm at
   0.15 µm px); the mask's radius is then ≈ 1.5 s. The band pass (``trackpy.bandpass``,
   noise length 1 px, boxcar ``diameter``) is applied to each padded frame, the result is
   scaled to integers at :data:`LEVELS_PER_SIGMA` per σ_n (so trackpy's 8-bit rescaling
   of float images never changes with the brightest pixel), and the frames are laid out
   side by side in one mosaic that trackpy locates in a single call (the pads keep the
   frames apart: the filters reach ≤ 4 px, so this equals locating frame by frame, only
   ~50× faster). ``minmass`` is the 99.9th percentile of the masses of the features
   trackpy finds, with the same settings, on a movie of pure unit Gaussian noise of the
   same tile size (:data:`NOISE_CALIBRATION_FRAMES` frames, fixed seed, cached): so about
   one noise peak in a thousand passes, whatever the movie's noise level. ``percentile``
   and ``separation`` keep trackpy's defaults (64, diameter + 1).
4. **Link** (``trackpy.link``): ``search_range`` = 3.5·√(2·D_max·F)/dx px (3.5 σ of the
   largest frame-to-frame step in one axis the prior allows), capped at
   :data:`MAX_SEARCH_RANGE_PX` = 10 px and at least 1 px; ``memory=0`` (a trajectory
   never jumps a frame); oversize subnetworks shrink the range adaptively (×0.95 down to
   1 px) instead of failing. Trajectories shorter than :data:`MIN_TRACK_LENGTH` = 3
   positions are dropped (the CVE needs two steps).
5. **Field.** A particle whose PSF is cut by the tile edge is located too far inside
   (its mask reaches into the pad). Positions closer than m = diameter//2 − 1 px (1 px
   here: the mask reaches at most one pixel beyond the tile) to the edge are dropped and
   trajectories split there, keeping runs of ≥ 3 consecutive frames. (m = 2 gave the same
   accuracy on easy movies but 30 % fewer steps and a worse L1 on `low`.) Steps are then
   only seen between two positions inside a field of ℓ = (W − 1 − 2m)·dx µm per axis:
   long steps leave it more often, which biases ⟨Δx²⟩ low (≈ 10–25 % at D = 0.5–1.5
   µm²/s in a 20-px tile). Each step is weighted by the inverse of its probability of
   staying in the field, 1/(1 − |Δx|/ℓ), and each pair of steps by 1/(1 − span/ℓ), per
   axis (Horvitz–Thompson, for a uniform density of particles; see :func:`cve`).
6. **Step times.** A particle at row y (px) of frame k is imaged at k·F + y·L (+ x·δ on
   a unidirectional scan), so each step lasts Δt = F + (y_next − y)·L + (x_next − x)·δ
   (the x term is left out for bidirectional scans, where its sign alternates).
7. **D by the CVE** (Vestergaard, Blainey & Flyvbjerg, Phys. Rev. E 89, 022726, 2014),
   per axis and trajectory with N steps Δx_n and mean step time Δt̄:

       D̂ = ⟨Δx_n²⟩ / (2 Δt̄) + ⟨Δx_n Δx_{n+1}⟩ / Δt̄

   unbiased for any localisation error and motion blur; trajectories and the two axes
   are pooled (each trajectory counts by its number of steps, times the censoring
   weights of step 5). The localisation variance, estimated
   once from all trajectories, is σ² = R⟨Δx_n²⟩ + (2R − 1)⟨Δx_n Δx_{n+1}⟩, with the
   motion-blur coefficient R = (1/Δt) ∫₀^Δt S(t)(1 − S(t)) dt of the exposure's
   cumulative profile S (the paper's Eq. 8). A raster scan sees a particle on the lines
   that cross its PSF, each line weighted by the PSF's row profile, a Gaussian of std
   s·L in time, so ∫ S(1 − S) dt = s·L/√π and

       R = s · L / (√π · F)          (≈ 0.019 for the reference scan)

   (the same as a uniform shutter of ≈ diameter lines, R = (1/6)·5L/F ≈ 0.020).
8. **Uncertainty.** Per trajectory and axis, the CVE variance of the paper (Eq. 18),

       Var D̂ = D² [(6 + 4ε + 2ε²)/N + 4(1 + ε)²/N²],   ε = σ²/(D Δt̄) − 2R,

   written as (6D² + 4Da + 2a²)/N + 4(D + a)²/N² with a = σ²/Δt̄ − 2RD so that it stays
   finite at D = 0, evaluated at the pooled D̂ ≥ 0 and σ² ≥ 0; the pooled estimate
   has Var = Σ W_i² Var_i / (Σ W_i)² (W_i: trajectory i's summed step weights, = N_i
   without censoring), halved for the two independent axes. Tracking errors (false
   detections, wrong links) are not in that formula, so σ is the larger of it and the
   scatter of the trajectories' own estimates around the pooled one,
   Σ W_i² (D̂_i − D̂)² / (Σ W_i)² (a sandwich estimate).
9. **Prior range.** D̂ is clipped to [d_min, d_max] (flag ``"clipped"``), or, with
   ``point="posterior"``, replaced by the median (σ by the std) of the posterior under
   the uniform prior with N(D̂_CVE, σ²) as likelihood. With no trajectory left, D and σ
   are NaN and the flag is ``"no_tracks"``: no number is invented.

Measured (64 `low` movies, seed 123): L1 0.20 with clipping, 0.18 with the posterior,
NaN windows scored at the prior mean; 7 of 64 windows have no track; ≈ 0.16 s per
400-frame 20×20 window on one busy CPU core (the pure-noise ``minmass`` calibration,
≈ 1.5 s, runs once per process and tile size).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from dle_stream.per_movie import estimate_each
from dle_stream.timing import ScanTiming

#: Pixels of padding (with the frame's median) around each frame before locating.
PAD_PX = 4
#: Integer levels per noise σ of the band-passed image handed to trackpy.
LEVELS_PER_SIGMA = 1000.0
#: Quantile of noise-only feature masses used as ``minmass``.
NOISE_MASS_QUANTILE = 0.999
#: Frames of pure noise used to calibrate ``minmass`` (cached per tile size and diameter).
NOISE_CALIBRATION_FRAMES = 1000
#: Cap on trackpy's ``search_range``, px.
MAX_SEARCH_RANGE_PX = 10.0
#: Shortest trajectory kept, in positions.
MIN_TRACK_LENGTH = 3
#: Floor on the probability that a step stays in the field (caps the censoring weights at 10).
MIN_STAY_PROBABILITY = 0.1
#: MAD → standard deviation for Gaussian noise.
MAD_TO_STD = 1.4826


@dataclass
class ClassicResult:
    """One movie's classic estimate.

    Attributes:
        d_um2_s: D̂, µm²/s (NaN when nothing could be tracked).
        sigma_um2_s: its standard error, µm²/s (NaN with D̂).
        flags: ``"no_tracks"``, ``"clipped"`` (D̂ was outside the prior range),
            ``"link_failed"`` (trackpy could not link).
        n_tracks: trajectories used (≥ 3 positions each).
        n_steps: frame-to-frame steps in them.
        localization_var_um2: pooled localisation variance σ² per axis, µm² (CVE).
        noise_std: the movie's noise level σ_n, detector units.
        n_features: features located in the whole movie.
        d_cve_um2_s: the CVE's D̂ before the prior range was applied, µm²/s.
    """

    d_um2_s: float
    sigma_um2_s: float
    flags: set[str] = field(default_factory=set)
    n_tracks: int = 0
    n_steps: int = 0
    localization_var_um2: float = math.nan
    noise_std: float = math.nan
    n_features: int = 0
    d_cve_um2_s: float = math.nan


def _trackpy():
    import trackpy

    trackpy.quiet()
    return trackpy


def diameter_px(psf_sigma_xy_um: float, pixel_size_um: float) -> int:
    """trackpy's feature diameter: the odd integer 2·round(1.5·σxy/dx) + 1 px, ≥ 3."""
    s = psf_sigma_xy_um / pixel_size_um
    return int(2 * max(1, round(1.5 * s)) + 1)


def search_range_px(d_max_um2_s: float, timing: ScanTiming) -> float:
    """3.5·√(2·D_max·F)/dx px, within [1, MAX_SEARCH_RANGE_PX]."""
    step = math.sqrt(2 * d_max_um2_s * timing.frame_period_us * 1e-6)
    return float(min(MAX_SEARCH_RANGE_PX, max(1.0, 3.5 * step / timing.pixel_size_um)))


def blur_coefficient(psf_sigma_xy_um: float, timing: ScanTiming) -> float:
    """Motion-blur coefficient R = s·L/(√π·F) of a raster scan (s = σxy/dx in px)."""
    s = psf_sigma_xy_um / timing.pixel_size_um
    return float(s * timing.line_period_us / (math.sqrt(math.pi) * timing.frame_period_us))


def _locate(normalised: np.ndarray, diameter: int, minmass: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Locate features in a noise-normalised, median-subtracted movie [T, H, W].

    Returns frame, x, y (px in tile coordinates, pixel centres at integers) and mass
    (band-passed, in σ_n units) of every feature with mass > ``minmass``.
    """
    tp = _trackpy()
    T, H, W = normalised.shape
    p = PAD_PX
    ch, cw = H + 2 * p, W + 2 * p
    ncols = int(math.ceil(math.sqrt(T * ch / cw)))
    nrows = int(math.ceil(T / ncols))
    padded = np.zeros((nrows * ncols, ch, cw), dtype=np.float64)
    padded[:T, p:p + H, p:p + W] = normalised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(T):
            padded[k] = tp.bandpass(padded[k], 1, diameter, threshold=1 / 255)
    ints = np.round(padded * LEVELS_PER_SIGMA).astype(np.int32)
    mosaic = ints.reshape(nrows, ncols, ch, cw).transpose(0, 2, 1, 3).reshape(nrows * ch, ncols * cw)
    empty = np.empty(0)
    if not mosaic.any():
        return empty.astype(int), empty, empty, empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = tp.locate(mosaic, diameter, minmass=minmass * LEVELS_PER_SIGMA, preprocess=False,
                      characterize=False, engine="python")
    if len(f) == 0:
        return empty.astype(int), empty, empty, empty
    x = f["x"].to_numpy(dtype=np.float64)
    y = f["y"].to_numpy(dtype=np.float64)
    col = np.clip((x // cw).astype(int), 0, ncols - 1)
    row = np.clip((y // ch).astype(int), 0, nrows - 1)
    frame = row * ncols + col
    keep = frame < T
    return (frame[keep], x[keep] - col[keep] * cw - p, y[keep] - row[keep] * ch - p,
            f["mass"].to_numpy(dtype=np.float64)[keep] / LEVELS_PER_SIGMA)


@lru_cache(maxsize=32)
def noise_minmass(tile_height: int, tile_width: int, diameter: int) -> float:
    """``minmass`` (σ_n units): the 99.9th percentile of the masses trackpy finds in
    :data:`NOISE_CALIBRATION_FRAMES` frames of unit Gaussian noise of this tile size."""
    rng = np.random.default_rng(20140226)
    noise = rng.standard_normal((NOISE_CALIBRATION_FRAMES, tile_height, tile_width))
    _, _, _, mass = _locate(noise, diameter, minmass=0.0)
    if mass.size == 0:
        return 0.0
    return float(np.quantile(mass, NOISE_MASS_QUANTILE))


def cve(
    tracks: list[tuple[np.ndarray, np.ndarray]], blur_r: float, field_um=None,
) -> tuple[float, float, float, int, int]:
    """The covariance-based estimator over trajectories (Vestergaard et al. 2014).

    Args:
        tracks: per trajectory, (positions [n, k] µm of k independent axes at n ≥ 3
            consecutive frames, step times [n − 1] s).
        blur_r: motion-blur coefficient R.
        field_um: optional length (µm) per axis of the field in which positions were
            kept. A step Δ between two kept positions is seen with probability
            1 − |Δ|/ℓ (uniform density), so large steps are under-represented; each
            step is then weighted by 1/(1 − |Δ|/ℓ), each pair of consecutive steps by
            1/(1 − span/ℓ) (span of its three positions), per axis (Horvitz–Thompson),
            which makes ⟨Δx²⟩ and ⟨Δx_n Δx_{n+1}⟩ those of the uncensored motion.
            ``None``: no censoring (all weights 1).

    Returns:
        (D̂ µm²/s, σ of D̂ µm²/s, localisation variance σ² µm² per axis, trajectories, steps);
        NaNs and zeros when no trajectory has two steps. D̂ is not clipped.
    """
    rows = []
    for pos, dt in tracks:
        pos = np.asarray(pos, dtype=np.float64)
        if pos.ndim == 1:
            pos = pos[:, None]
        dx = np.diff(pos, axis=0)  # [N, k]
        if dx.shape[0] < 2:
            continue
        dt = np.broadcast_to(np.asarray(dt, dtype=np.float64), (dx.shape[0],))
        if field_um is None:
            w = np.ones_like(dx)
            w2 = np.ones_like(dx[1:])
        else:
            ell = np.asarray(field_um, dtype=np.float64)
            w = 1.0 / np.clip(1.0 - np.abs(dx) / ell, MIN_STAY_PROBABILITY, 1.0)
            c1, c2 = dx[:-1], dx[:-1] + dx[1:]
            span = np.maximum(np.maximum(0.0, c1), c2) - np.minimum(np.minimum(0.0, c1), c2)
            w2 = 1.0 / np.clip(1.0 - span / ell, MIN_STAY_PROBABILITY, 1.0)
        rows.append((dx, dt, w, w2))
    if not rows:
        return math.nan, math.nan, math.nan, 0, 0

    def moments(items):
        """Per-axis weighted ⟨Δx²⟩, ⟨Δx_n Δx_{n+1}⟩ and Δt̄ over ``items``."""
        sw = sum(r[2].sum(axis=0) for r in items)
        sw2 = sum(r[3].sum(axis=0) for r in items)
        s2 = sum((r[2] * r[0] ** 2).sum(axis=0) for r in items) / sw
        cv = sum((r[3] * r[0][1:] * r[0][:-1]).sum(axis=0) for r in items) / sw2
        tbar = sum((r[2] * r[1][:, None]).sum(axis=0) for r in items) / sw
        return s2, cv, tbar

    def d_of(items) -> float:
        s2, cv, tbar = moments(items)
        return float(np.mean(s2 / (2 * tbar) + cv / tbar))

    s2, cv, tbar = moments(rows)
    d_hat = float(np.mean(s2 / (2 * tbar) + cv / tbar))
    loc_var = float(np.mean(blur_r * s2 + (2 * blur_r - 1) * cv))
    n_axes = rows[0][0].shape[1]
    # uncertainty: CVE variance (paper's Eq. 18) per trajectory at the pooled D̂ and σ²,
    # combined with the trajectories' weights; or the trajectories' scatter if larger
    d0, v0 = max(d_hat, 0.0), max(loc_var, 0.0)
    weight = np.array([r[2].sum() / n_axes for r in rows])
    n = np.array([r[0].shape[0] for r in rows], dtype=np.float64)
    tb = np.array([float(np.mean(r[1])) for r in rows])
    a = v0 / tb - 2 * blur_r * d0
    var_i = (6 * d0**2 + 4 * d0 * a + 2 * a**2) / n + 4 * (d0 + a) ** 2 / n**2
    f = weight / weight.sum()
    var_model = float(np.sum(f**2 * var_i)) / n_axes
    d_i = np.array([d_of([r]) for r in rows])
    var_scatter = float(np.sum(f**2 * (d_i - d_hat) ** 2))
    sigma = math.sqrt(max(var_model, var_scatter))
    return d_hat, sigma, loc_var, len(rows), int(n.sum())


def _truncated_normal_median_std(mu: float, sigma: float, lo: float, hi: float) -> tuple[float, float]:
    """Median and std of N(mu, sigma²) restricted to [lo, hi] (the posterior of D under a
    uniform prior when the CVE's sampling distribution is taken as Gaussian)."""
    from scipy.stats import truncnorm

    if not sigma > 0:
        return min(max(mu, lo), hi), sigma
    dist = truncnorm((lo - mu) / sigma, (hi - mu) / sigma, loc=mu, scale=sigma)
    med, std = float(dist.median()), float(dist.std())
    if not (math.isfinite(med) and math.isfinite(std)):  # far outside the range: a point mass at the edge
        return min(max(mu, lo), hi), (hi - lo) * 1e-3
    return med, std


class ClassicEstimator:
    """trackpy tracking + CVE, with the DLE's call shape (see the module docstring).

    Args:
        timing: the scan timing of the recording (frame period F, line period L, dwell δ,
            pixel size dx).
        psf_sigma_xy_um: lateral PSF std σxy, µm (sets ``diameter`` and R).
        d_max_um2_s: top of the D prior, µm²/s (sets ``search_range``; D̂ is clipped to it).
        d_min_um2_s: bottom of the D prior, µm²/s.
        point: how the prior range [d_min, d_max] is applied: ``"clip"`` (D̂ clipped into
            it, σ the CVE's) or ``"posterior"`` (median and std of the posterior under the
            uniform prior, with the CVE's sampling distribution N(D̂, σ²) as likelihood:
            uninformative windows shrink to the middle of the range). Either way the flag
            ``"clipped"`` says the CVE's D̂ fell outside the range.
    """

    def __init__(self, timing: ScanTiming, psf_sigma_xy_um: float, d_max_um2_s: float,
                 d_min_um2_s: float = 0.0, point: str = "clip") -> None:
        if not (psf_sigma_xy_um > 0 and d_max_um2_s > d_min_um2_s >= 0):
            raise ValueError("classic estimator: need σxy > 0 and 0 ≤ d_min < d_max (µm²/s)")
        if point not in ("clip", "posterior"):
            raise ValueError(f"classic estimator: point must be 'clip' or 'posterior', got {point!r}")
        self.point = point
        self.timing = timing
        self.psf_sigma_xy_um = float(psf_sigma_xy_um)
        self.d_min_um2_s = float(d_min_um2_s)
        self.d_max_um2_s = float(d_max_um2_s)
        self.diameter = diameter_px(psf_sigma_xy_um, timing.pixel_size_um)
        self.search_range = search_range_px(d_max_um2_s, timing)
        self.blur_r = blur_coefficient(psf_sigma_xy_um, timing)
        self.edge_margin = max(0, self.diameter // 2 - 1)

    def minmass(self, tile_height: int, tile_width: int) -> float:
        """``minmass`` for this tile size, in units of the noise σ_n."""
        return noise_minmass(int(tile_height), int(tile_width), self.diameter)

    def trajectories(self, movie) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
        """Locate and link: per trajectory (positions [n, 2] µm (x, y), step times [n−1] s),
        and a dict with ``noise_std``, ``n_features`` and ``flags``."""
        movie = np.asarray(movie, dtype=np.float64)
        if movie.ndim != 3:
            raise ValueError(f"classic estimator: movie must be [T, H, W], got shape {movie.shape}")
        T, H, W = movie.shape
        info: dict = {"noise_std": math.nan, "n_features": 0, "flags": set()}
        m = movie - np.median(movie.reshape(T, -1), axis=1)[:, None, None]
        noise = MAD_TO_STD * float(np.median(np.abs(m)))
        if not (noise > 0 and math.isfinite(noise)):
            noise = float(np.std(m))
        info["noise_std"] = noise
        if not (noise > 0 and math.isfinite(noise)) or T < MIN_TRACK_LENGTH:
            return [], info
        frame, x, y, _ = _locate(m / noise, self.diameter, self.minmass(H, W))
        info["n_features"] = int(frame.size)
        if frame.size == 0:
            return [], info
        tp = _trackpy()
        import pandas as pd

        feats = pd.DataFrame({"x": x, "y": y, "frame": frame})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                linked = tp.link(feats, self.search_range, memory=0, adaptive_stop=1.0, adaptive_step=0.95)
        except Exception:  # SubnetOversizeException and friends: nothing trustworthy
            info["flags"].add("link_failed")
            return [], info
        tm = self.timing
        dx_um = tm.pixel_size_um
        m = self.edge_margin
        tracks = []
        for _, g in linked.groupby("particle", sort=False):
            if len(g) < MIN_TRACK_LENGTH:
                continue
            g = g.sort_values("frame")
            fr = g["frame"].to_numpy()
            gx = g["x"].to_numpy(dtype=np.float64)
            gy = g["y"].to_numpy(dtype=np.float64)
            inner = (gx >= m) & (gx <= W - 1 - m) & (gy >= m) & (gy <= H - 1 - m)
            # runs of consecutive frames inside the field
            breaks = np.flatnonzero(~inner | np.r_[True, np.diff(fr) != 1])
            for run in np.split(np.arange(len(g)), breaks):
                run = run[inner[run]]
                if run.size < MIN_TRACK_LENGTH:
                    continue
                rx, ry = gx[run], gy[run]
                dt_us = tm.frame_period_us + np.diff(ry) * tm.line_period_us
                if not tm.bidirectional:
                    dt_us = dt_us + np.diff(rx) * tm.dwell_us
                tracks.append((np.stack([rx, ry], axis=1) * dx_um, dt_us * 1e-6))
        return tracks, info

    def field_um(self, tile_height: int, tile_width: int) -> tuple[float, float]:
        """Lengths (x, y) in µm of the field in which positions are used."""
        dx = self.timing.pixel_size_um
        return ((tile_width - 1 - 2 * self.edge_margin) * dx, (tile_height - 1 - 2 * self.edge_margin) * dx)

    def estimate(self, movie) -> ClassicResult:
        """D̂ ± σ (µm²/s) of one movie [T, H, W] of one tile (any gain and offset)."""
        movie = np.asarray(movie)
        tracks, info = self.trajectories(movie)
        flags: set[str] = set(info["flags"])
        d, sigma, loc_var, n_tracks, n_steps = cve(tracks, self.blur_r, self.field_um(*movie.shape[1:]))
        if n_tracks == 0 or not math.isfinite(d):
            flags.add("no_tracks")
            return ClassicResult(math.nan, math.nan, flags, 0, 0, math.nan, info["noise_std"], info["n_features"])
        raw = d
        if d < self.d_min_um2_s or d > self.d_max_um2_s:
            flags.add("clipped")
        if self.point == "posterior":
            d, sigma = _truncated_normal_median_std(raw, sigma, self.d_min_um2_s, self.d_max_um2_s)
        else:
            d = min(max(d, self.d_min_um2_s), self.d_max_um2_s)
        return ClassicResult(d, sigma, flags, n_tracks, n_steps, loc_var, info["noise_std"], info["n_features"], raw)

    def estimate_batch(self, movies) -> tuple[np.ndarray, np.ndarray, list[set[str]]]:
        """D̂ [B], σ [B] (µm²/s) and flags of movies [B, T, H, W] (numpy or CPU torch)."""
        return estimate_each(self.estimate, movies, "classic")
