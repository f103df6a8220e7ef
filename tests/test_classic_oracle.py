"""The reference estimators: classic tracking (trackpy + CVE) and the oracle."""

import math

import numpy as np
import pytest

from dle_stream import ScanTiming
from dle_stream.classic import ClassicEstimator, blur_coefficient, cve, diameter_px, search_range_px
from dle_stream.evaluation.oracle import oracle_batch, oracle_estimate, oracle_fit
from dle_stream.training.priors import get_preset
from dle_stream.training.simulator import Simulator

REF = ScanTiming.reference()
LOW = get_preset("low").priors


# ----------------------------------------------------------------- CVE by hand
def _walks(rng, n_tracks, n_pos, d, dt, loc_std, shutter=0.0, sub=30):
    """Brownian walks in 2 axes seen every ``dt`` s with Gaussian localisation noise;
    with ``shutter`` > 0 each position is the mean over that fraction of the interval
    (uniform exposure: blur coefficient R = shutter / 6)."""
    tracks = []
    for _ in range(n_tracks):
        if shutter == 0:
            steps = rng.normal(0, math.sqrt(2 * d * dt), (n_pos - 1, 2))
            path = np.vstack([np.zeros((1, 2)), np.cumsum(steps, 0)])
        else:
            fine = rng.normal(0, math.sqrt(2 * d * dt / sub), (n_pos * sub, 2))
            walk = np.cumsum(fine, 0).reshape(n_pos, sub, 2)
            path = walk[:, : max(1, round(shutter * sub))].mean(1)
        tracks.append((path + rng.normal(0, loc_std, path.shape), np.full(n_pos - 1, dt)))
    return tracks


def test_cve_recovers_d_and_localisation_variance():
    rng = np.random.default_rng(0)
    d, dt, loc = 0.5, 0.05, 0.1
    tracks = _walks(rng, 400, 51, d, dt, loc)
    d_hat, sigma, var, n_tracks, n_steps = cve(tracks, blur_r=0.0)
    assert (n_tracks, n_steps) == (400, 20000)
    assert d_hat == pytest.approx(d, rel=0.05)
    assert var == pytest.approx(loc**2, rel=0.15)
    # the paper's variance: ≈ D·√((6 + 4ε + 2ε²)/(2N)), ε = σ²/(DΔt), two axes
    eps = loc**2 / (d * dt)
    assert sigma == pytest.approx(d * math.sqrt((6 + 4 * eps + 2 * eps**2) / (2 * 20000)), rel=0.15)
    # the naive MSD estimate ⟨Δx²⟩/(2Δt) is biased by σ²/Δt: the covariance term matters
    naive = np.mean([np.mean(np.diff(p, axis=0) ** 2) for p, _ in tracks]) / (2 * dt)
    assert naive > 1.3 * d


def test_cve_motion_blur_coefficient_enters_the_localisation_variance():
    rng = np.random.default_rng(1)
    d, dt, loc, shutter = 1.0, 0.05, 0.1, 0.6
    tracks = _walks(rng, 300, 51, d, dt, loc, shutter=shutter)
    r = shutter / 6
    d_hat, _, var, _, _ = cve(tracks, blur_r=r)
    assert d_hat == pytest.approx(d, rel=0.05)
    assert var == pytest.approx(loc**2, rel=0.2)
    # ignoring the blur would underestimate σ² by 2RDΔt (half of it here)
    _, _, var_no_blur, _, _ = cve(tracks, blur_r=0.0)
    assert var_no_blur < 0.7 * loc**2


def test_cve_sigma_is_honest_over_repeats():
    rng = np.random.default_rng(2)
    d, dt, loc = 0.3, 0.06, 0.05
    z = []
    for _ in range(300):
        tracks = _walks(rng, 6, int(rng.integers(5, 30)), d, dt, loc)
        d_hat, sigma, _, _, _ = cve(tracks, blur_r=0.0)
        z.append((d_hat - d) / sigma)
    z = np.asarray(z)
    assert abs(z.mean()) < 0.2
    assert 0.8 < z.std() < 1.25


def test_cve_censoring_weights_undo_the_loss_of_long_steps():
    """Positions kept only inside a field of width ℓ lose the long steps (they leave);
    the weights 1/(1 − |Δ|/ℓ) restore the free motion's ⟨Δx²⟩."""
    rng = np.random.default_rng(3)
    d, dt, ell = 1.0, 0.06, 2.0  # step std 0.35 µm: ~14% of the field
    tracks = []
    for _ in range(3000):
        start = rng.uniform(0, ell, 2)
        path = start + np.cumsum(np.vstack([np.zeros((1, 2)), rng.normal(0, math.sqrt(2 * d * dt), (40, 2))]), 0)
        inside = np.all((path >= 0) & (path <= ell), axis=1)
        n_in = int(np.argmin(inside)) if not inside.all() else len(inside)  # first run from the start
        if n_in >= 3:
            tracks.append((path[:n_in], np.full(n_in - 1, dt)))
    weighted = cve(tracks, 0.0, field_um=(ell, ell))[0]
    plain = cve(tracks, 0.0)[0]
    assert weighted == pytest.approx(d, rel=0.06)
    assert plain < 0.9 * d


def test_cve_without_usable_tracks_is_nan():
    d_hat, sigma, var, n_tracks, n_steps = cve([(np.zeros((2, 2)), np.ones(1))], 0.02)
    assert math.isnan(d_hat) and math.isnan(sigma) and n_tracks == 0 and n_steps == 0


# ----------------------------------------------------------- derived settings
def test_parameters_follow_the_psf_and_the_timing():
    assert diameter_px(0.21, 0.15) == 5
    assert diameter_px(0.30, 0.15) % 2 == 1 and diameter_px(0.30, 0.15) > 5
    # 3.5·√(2·0.1·F)/dx for a small D_max; capped at 10 px
    assert search_range_px(0.1, REF) == pytest.approx(3.5 * math.sqrt(2 * 0.1 * 0.061652) / 0.15)
    assert search_range_px(50.0, REF) == 10.0
    assert blur_coefficient(0.21, REF) == pytest.approx(0.0193, abs=0.001)


# ----------------------------------------------------------- classic on movies
def test_classic_recovers_d_on_easy_movies():
    priors = LOW.with_(
        particles="fixed", particles_max=6, density="box", box_margin_um=0.5, box_half_depth_um=2.0,
        brightness_photons=(3000.0, 0.0), background_photons=(10.0, 0.0), read_noise_photons=(0.5, 0.5),
        psf_sigma_xy_um=(0.21, 0.0),
    )
    d_true = 0.5
    batch = Simulator(priors, REF, frames=300).simulate(4, seed=11, d_um2_s=d_true)
    est = ClassicEstimator(REF, psf_sigma_xy_um=0.21, d_max_um2_s=1.5)
    d, sigma, flags = est.estimate_batch(batch.movies)
    assert d.shape == sigma.shape == (4,)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(sigma)) and np.all(sigma > 0)
    assert all("no_tracks" not in f for f in flags)
    assert np.mean(d) == pytest.approx(d_true, rel=0.2)
    assert np.all(np.abs(d - d_true) < 4 * sigma + 0.05)
    # invariant to detector gain and offset
    again = est.estimate(batch.movies[0].numpy() * 3.0 + 500.0)
    assert again.d_um2_s == pytest.approx(d[0], rel=1e-6)


def test_classic_on_pure_noise_is_nan_with_flag():
    priors = LOW.with_(particles="fixed", particles_max=0)
    batch = Simulator(priors, REF, frames=100).simulate(1, seed=5, d_um2_s=1.0)
    est = ClassicEstimator(REF, psf_sigma_xy_um=0.21, d_max_um2_s=1.5)
    r = est.estimate(batch.movies[0].numpy())
    assert math.isnan(r.d_um2_s) and math.isnan(r.sigma_um2_s)
    assert "no_tracks" in r.flags and r.n_tracks == 0
    flat = est.estimate(np.zeros((50, 20, 20)))
    assert math.isnan(flat.d_um2_s) and "no_tracks" in flat.flags


def test_classic_clips_to_the_prior_and_flags_it():
    priors = LOW.with_(
        particles="fixed", particles_max=6, density="box", box_margin_um=0.5, box_half_depth_um=2.0,
        brightness_photons=(3000.0, 0.0), background_photons=(10.0, 0.0), psf_sigma_xy_um=(0.21, 0.0),
    )
    batch = Simulator(priors, REF, frames=100).simulate(1, seed=12, d_um2_s=1.0)
    r = ClassicEstimator(REF, psf_sigma_xy_um=0.21, d_max_um2_s=1.5, d_min_um2_s=1.4).estimate(batch.movies[0].numpy())
    assert r.d_um2_s == 1.4 and "clipped" in r.flags and r.d_cve_um2_s < 1.4
    # the posterior under the uniform prior stays inside the range, with a smaller σ
    post = ClassicEstimator(REF, 0.21, 1.5, 1.4, point="posterior").estimate(batch.movies[0].numpy())
    assert 1.4 < post.d_um2_s < 1.5 and "clipped" in post.flags
    assert post.d_cve_um2_s == pytest.approx(r.d_cve_um2_s)
    assert 0 < post.sigma_um2_s < min(r.sigma_um2_s, 0.1 / math.sqrt(12) * 1.01)


# --------------------------------------------------------------------- oracle
def test_oracle_recovers_d_on_crowded_movies():
    priors = LOW.with_(particles="fixed", particles_max=80, density="box")
    batch = Simulator(priors, REF, frames=400).simulate(2, seed=7, d_um2_s=1.0)
    d, sigma = oracle_batch(batch, 0.0, 1.5)
    assert np.all(np.abs(d - 1.0) < 0.05)
    assert np.all((sigma > 0.005) & (sigma < 0.05))


def test_oracle_counts_particles_that_leave_view():
    """At high D most visible particles leave within a frame: the steps that stay in
    view are the short ones, and only the leaving probability corrects for that."""
    priors = get_preset("high").priors.with_(particles="fixed", particles_max=80, density="box", box_margin_um=4.0)
    batch = Simulator(priors, REF, frames=400).simulate(1, seed=8, d_um2_s=20.0)
    r = oracle_fit(batch.positions_of(0), REF, 20, 20, float(batch.params["psf_sigma_z_um"][0]), 0.0, 50.0)
    assert r.n_leaves > r.n_steps / 2
    assert abs(r.d_um2_s - 20.0) < max(4 * r.sigma_um2_s, 0.15 * 20.0)
    # steps alone (plain maximum likelihood) are biased low
    pos = batch.positions_of(0).numpy().astype(np.float64)
    sz = float(batch.params["psf_sigma_z_um"][0])
    vis = (pos[..., 0] >= 0) & (pos[..., 0] < 3) & (pos[..., 1] >= 0) & (pos[..., 1] < 3) & (np.abs(pos[..., 2]) <= sz)
    stay = vis[:, :-1] & vis[:, 1:]
    steps = (pos[:, 1:] - pos[:, :-1])[stay]
    naive = np.sum(steps**2) / (6 * len(steps) * REF.frame_period_us * 1e-6)
    assert naive < 0.8 * 20.0


def test_oracle_matches_the_plain_maximum_likelihood_when_nothing_leaves():
    rng = np.random.default_rng(4)
    dt = REF.frame_period_us * 1e-6
    d = 0.05  # small steps in a big view: no particle leaves
    n, t = 20, 200
    steps = rng.normal(0, math.sqrt(2 * d * dt), (n, t - 1, 3))
    pos = np.concatenate([np.zeros((n, 1, 3)), np.cumsum(steps, 1)], 1) + np.array([150.0, 150.0, 0.0])
    r = oracle_fit(pos, REF, 2000, 2000, 50.0, 0.0, 1.5)
    mle = np.sum(steps**2) / (6 * steps[..., 0].size * dt)
    assert r.n_leaves == 0 and r.n_steps == n * (t - 1)
    assert r.d_um2_s == pytest.approx(mle, rel=0.002)
    assert r.sigma_um2_s == pytest.approx(mle * math.sqrt(2 / (3 * r.n_steps)), rel=0.05)


def test_oracle_without_visible_steps_is_nan():
    rng = np.random.default_rng(5)
    pos = rng.normal(0, 0.1, (5, 100, 3)) + np.array([-2.0, 1.0, 0.0])  # left of the tile
    d, s = oracle_estimate(pos, REF, 20, 20, 1.36, 0.0, 1.5)
    assert math.isnan(d) and math.isnan(s)
    out_of_focus = rng.normal(0, 0.1, (5, 100, 3)) + np.array([1.5, 1.5, 3.0])  # in the tile, 3 µm deep
    r = oracle_fit(out_of_focus, REF, 20, 20, 1.36, 0.0, 1.5)
    assert math.isnan(r.d_um2_s) and "no_visible_steps" in r.flags
    # one frame in view only: a leave, still no step
    pos[0, 10] = [1.5, 1.5, 0.0]
    r = oracle_fit(pos, REF, 20, 20, 1.36, 0.0, 1.5)
    assert math.isnan(r.d_um2_s) and r.n_leaves == 1
