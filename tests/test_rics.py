"""The correlation (RICS/STICS) estimator: lag times, the correlation itself, and D on
crowded simulated movies where tracking is hopeless."""

import math

import numpy as np
import pytest

from dle_stream import ScanTiming
from dle_stream.rics import RicsEstimator, correlation_segments, lag_time_us
from dle_stream.training.priors import SimulatorPriors
from dle_stream.training.simulator import Simulator

REF = ScanTiming.reference()
FRAMES = 300
N_MOVIES = 3


def _crowded(d_um2_s: float, d_max: float, seed: int, frames: int = FRAMES, n: int = N_MOVIES, particles: int = 90):
    """Movies with ~90 particles in a periodic box around the tile (stationary density,
    several particles in view at once), moderate brightness, the reference PSF."""
    priors = SimulatorPriors(d_max_um2_s=d_max, particles="fixed", particles_max=particles, density="box",
                             psf_sigma_xy_um=(0.21, 0.0), psf_sigma_z_um=(1.36, 0.0),
                             brightness_photons=(600.0, 0.0))
    return Simulator(priors, REF, 20, 20, frames).simulate(n, seed=seed, d_um2_s=d_um2_s)


@pytest.fixture(scope="module")
def slow():
    return _crowded(0.5, 1.5, seed=11)


@pytest.fixture(scope="module")
def fast():
    return _crowded(20.0, 50.0, seed=12)


# ------------------------------------------------------------------ lag → time
def test_lag_times_by_hand_unidirectional():
    tm = ScanTiming(pixel_size_um=0.1, dwell_us=2.0, line_period_us=50.0, frame_period_us=600.0,
                    width_px=10, height_px=8)
    xi = [3, -2, 0, -3, 2, 0]
    psi = [0, 1, 0, -2, -1, 3]
    k = [0, 0, 1, 1, 0, 2]
    # 3δ; L − 2δ; F; F − 2L − 3δ; |−L + 2δ|; 2F + 3L
    expected = [6.0, 46.0, 600.0, 494.0, 46.0, 1350.0]
    np.testing.assert_allclose(lag_time_us(tm, xi, psi, k), expected)


def test_lag_times_by_hand_bidirectional():
    tm = ScanTiming(pixel_size_um=0.1, dwell_us=2.0, line_period_us=50.0, frame_period_us=600.0,
                    width_px=10, height_px=2, bidirectional=True)
    # along a line the second pixel is one dwell later on forward rows, one earlier on
    # backward rows: |Δt| = δ either way (not their signed mean, 0)
    assert lag_time_us(tm, 1, 0, 0, 2, 10) == pytest.approx(2.0)
    # row 0 forward (c·δ), row 1 backward ((9 − c)·δ + L): Δt = L + (9 − 2c)·δ at ξ = 0,
    # mean of |Δt| over c = 0…9 is L (all positive, symmetric about L)
    assert lag_time_us(tm, 0, 1, 0, 2, 10) == pytest.approx(50.0)
    # one frame later on top
    assert lag_time_us(tm, 0, 1, 1, 2, 10) == pytest.approx(650.0)


# ------------------------------------------------------------- the correlation
def test_fft_correlation_matches_direct_sum():
    rng = np.random.default_rng(3)
    T, H, W = 12, 5, 6
    x = rng.standard_normal((T, H, W))
    ks = np.array([0, 1, 3])
    sums, frames = correlation_segments(x, ks, 4)
    for j, k in enumerate(ks):
        for psi in (-2, 0, 1, 4):
            for xi in (-5, -1, 0, 2):
                direct = 0.0
                for t in range(T - k):
                    for r in range(max(0, -psi), min(H, H - psi)):
                        for c in range(max(0, -xi), min(W, W - xi)):
                            direct += x[t, r, c] * x[t + k, r + psi, c + xi]
                assert sums[:, j, psi % (2 * H), xi % (2 * W)].sum() == pytest.approx(direct, abs=1e-9)
        assert frames[:, j].sum() == T - k


def test_estimator_correlation_is_the_overlap_mean_at_each_lag():
    """C at the layout's lags (and its leave-one-segment-out versions) against a direct
    mean over the pairs: catches sign, index and normalisation slips."""
    rng = np.random.default_rng(4)
    T, H, W = 32, 8, 8
    movie = 5.0 + rng.standard_normal((T, H, W))
    est = RicsEstimator(REF, None, d_max_um2_s=1.5)
    lay, c, c_jk, var = est.correlation(movie)
    x = movie - movie.mean()
    assert var == pytest.approx(np.mean(x * x))
    assert lay["k"].max() >= 1 and (lay["psi"] < 0).any() and (lay["xi"] < 0).any()
    picks = rng.choice(len(c), 25, replace=False)
    seg_len = T // c_jk.shape[0]
    for i in picks:
        xi, psi, k = int(lay["xi"][i]), int(lay["psi"][i]), int(lay["k"][i])
        a = x[: T - k, max(0, -psi): H - max(0, psi), max(0, -xi): W - max(0, xi)]
        b = x[k:, max(0, psi): H + min(0, psi), max(0, xi): W + min(0, xi)]
        prod = (a * b).sum(axis=(1, 2))
        assert c[i] == pytest.approx(prod.sum() / (prod.size * a.shape[1] * a.shape[2]))
        keep = np.ones(T - k, bool)
        keep[:seg_len] = False  # leave out segment 0 (pairs whose first frame is in it)
        assert c_jk[0, i] == pytest.approx(prod[keep].sum() / (keep.sum() * a.shape[1] * a.shape[2]))


# ------------------------------------------------------------------- D on movies
def test_recovers_slow_diffusion_in_a_crowded_tile(slow):
    est = RicsEstimator(REF, None, d_max_um2_s=1.5)
    d, sigma, flags = est.estimate_batch(slow.movies)
    assert all(not f & {"no_signal", "fit_failed"} for f in flags)
    assert np.mean(d) == pytest.approx(0.5, rel=0.2)
    assert np.all(sigma > 0) and np.all(sigma < 0.5)


def test_recovers_fast_diffusion_in_a_crowded_tile(fast):
    est = RicsEstimator(REF, None, d_max_um2_s=50.0)
    d, sigma, flags = est.estimate_batch(fast.movies)
    assert all(not f & {"no_signal", "fit_failed"} for f in flags)
    assert np.mean(d) == pytest.approx(20.0, rel=0.2)
    assert np.all(sigma > 0) and np.all(sigma < 10)


def test_known_psf_gives_the_same_answer(slow, fast):
    for movies, d_true, d_max in ((slow.movies, 0.5, 1.5), (fast.movies, 20.0, 50.0)):
        est = RicsEstimator(REF, 0.21, d_max_um2_s=d_max)
        results = [est.estimate(m.numpy()) for m in movies]
        assert all(r.psf_sigma_xy_um == 0.21 for r in results)
        assert np.mean([r.d_um2_s for r in results]) == pytest.approx(d_true, rel=0.2)


def test_gain_and_offset_do_not_matter(slow):
    movie = slow.movies[0].numpy()
    est = RicsEstimator(REF, 0.21, d_max_um2_s=1.5)
    a = est.estimate(movie)
    b = est.estimate(3.7 * movie - 250.0)
    assert math.isfinite(a.d_um2_s)
    assert b.d_um2_s == pytest.approx(a.d_um2_s, rel=1e-6)
    assert b.sigma_um2_s == pytest.approx(a.sigma_um2_s, rel=1e-4)


def test_prior_range_clips_with_a_flag(fast):
    est = RicsEstimator(REF, 0.21, d_max_um2_s=5.0)
    r = est.estimate(fast.movies[0].numpy())
    assert "clipped" in r.flags
    assert r.d_um2_s == 5.0
    assert r.d_fit_um2_s > 10.0


def test_pure_noise_is_no_signal_not_a_number():
    noise = _crowded(1.0, 1.5, seed=13, frames=200, n=3, particles=0).movies
    est = RicsEstimator(REF, None, d_max_um2_s=1.5)
    d, sigma, flags = est.estimate_batch(noise)
    assert np.all(np.isnan(d)) and np.all(np.isnan(sigma))
    assert all("no_signal" in f for f in flags)
    r = est.estimate(noise[0].numpy())
    assert abs(r.signal_z) < 5


def test_bad_input_is_refused():
    est = RicsEstimator(REF, None, d_max_um2_s=1.5)
    with pytest.raises(ValueError):
        est.estimate(np.zeros((10, 20)))
    with pytest.raises(ValueError):
        RicsEstimator(REF, None, d_max_um2_s=1.0, d_min_um2_s=2.0)
