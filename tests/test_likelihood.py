"""The combinable window output: grid likelihoods, their exact combination, posterior summaries.

Expected values come from outside the code under test: scipy's normal distribution, the
closed-form combination of Gaussian measurements, and the coverage of intervals over
repeated draws with a known truth (Brownian steps, whose likelihood is known exactly).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dle_stream.likelihood import (
    DGrid,
    TrainingPrior,
    combine,
    gaussian_log_likelihood,
    posterior,
    window_log_likelihood,
)
from dle_stream.model import GridLoss

GRID = DGrid()


def gaussian_output(mu: float, s: float, overflow: float = -1e4) -> torch.Tensor:
    """A network output whose density is N(mu, s) (units of d_max), nothing beyond the grid."""
    x = GRID.knots
    return torch.tensor(np.concatenate([stats.norm.logpdf(x, mu, s), [overflow]]), dtype=torch.float32)[None]


def test_grid_loss_is_the_density_nll():
    loss = GridLoss(GRID)
    for d in (0.55, 0.8, 1.1):
        got = loss(gaussian_output(0.8, 0.15), torch.tensor([d])).item()
        assert got == pytest.approx(-stats.norm.logpdf(d, 0.8, 0.15), abs=0.01)
    # all the mass beyond the grid: a D beyond it costs nothing, one inside costs a lot
    beyond = torch.cat([torch.full((1, GRID.n - 1), -50.0), torch.zeros(1, 1)], dim=1)
    assert loss(beyond, torch.tensor([2.5])).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(beyond, torch.tensor([0.5])).item() > 40


def test_grid_loss_gradient_prefers_the_truth():
    out = torch.zeros(1, GRID.n, requires_grad=True)
    GridLoss(GRID)(out, torch.tensor([0.7])).backward()
    near = np.argsort(np.abs(GRID.knots - 0.7))[:2]
    assert (out.grad[0, near] < 0).all()  # raising the density at the truth lowers the loss
    assert out.grad[0, -1] > 0  # and the overflow's mass is pushed down


def test_gaussian_summaries_match_scipy():
    post = posterior(gaussian_log_likelihood(0.5, 0.05, GRID), GRID, d_max_um2_s=1.0)
    lo, hi = stats.norm.interval(0.6827, 0.5, 0.05)
    assert float(post.d) == pytest.approx(0.5, abs=2e-3)
    assert float(post.sigma) == pytest.approx(0.05, rel=0.02)
    assert float(post.lo68) == pytest.approx(lo, abs=3e-3) and float(post.hi68) == pytest.approx(hi, abs=3e-3)
    assert float(post.p_above) < 1e-6 and not post.above_range and not post.little_information


def test_interval_near_zero_is_asymmetric_and_holds_zero():
    post = posterior(gaussian_log_likelihood(0.0, 0.05, GRID), GRID, d_max_um2_s=1.5)
    assert float(post.lo68) == 0.0
    # half-normal: 68.27 % of the mass below 1σ·Φ⁻¹(0.841) ≈ 0.9998σ... in µm²/s
    assert float(post.hi68) == pytest.approx(1.5 * stats.halfnorm.ppf(0.6827, scale=0.05), rel=0.03)


def test_out_of_range_likelihood_is_flagged():
    above = posterior(gaussian_log_likelihood(1.5, 0.1, GRID), GRID, d_max_um2_s=50.0)
    assert float(above.p_above) > 0.99 and above.above_range
    assert float(above.lower95_wide) == pytest.approx(50 * (1.5 - 1.645 * 0.1), rel=0.02)
    flat = posterior(np.zeros(GRID.n), GRID, d_max_um2_s=1.0)  # no information at all
    assert flat.little_information and not flat.above_range


def test_training_prior_is_divided_out():
    prior = TrainingPrior(in_range=0.55, beyond=0.30)
    # a network that learned nothing outputs its training prior: the likelihood is then flat
    log_prior = prior.log_density(GRID)
    ll = window_log_likelihood(log_prior[None], GRID, prior)
    assert np.allclose(ll, 0.0)


def test_combining_gaussian_measurements_recovers_mean_and_width():
    rng = np.random.default_rng(1)
    truth, k = 0.6, 16
    sig = rng.uniform(0.1, 0.3, size=k)
    y = truth + sig * rng.standard_normal(k)
    post = posterior(combine(gaussian_log_likelihood(y, sig, GRID)), GRID, d_max_um2_s=1.0)
    w = 1 / sig**2
    assert float(post.d) == pytest.approx(np.sum(w * y) / np.sum(w), abs=3e-3)
    assert float(post.sigma) == pytest.approx(np.sum(w) ** -0.5, rel=0.03)


@pytest.mark.parametrize("d_true", [0.05, 0.5])
def test_combined_brownian_likelihoods_cover_the_truth(d_true: float):
    """K windows of a few Brownian steps each (exact likelihood ∝ D^(-n/2) e^(−Σx²/4Dτ)),
    combined: the 68 % interval holds the true D in ≈ 68 % of repeats, also near D = 0."""
    rng = np.random.default_rng(7)
    tau, n_steps, k, repeats = 1.0, 6, 8, 400
    x = GRID.knots[1:]  # D > 0
    hits = []
    for _ in range(repeats):
        steps = rng.normal(0, np.sqrt(2 * d_true * tau), size=(k, n_steps))
        ss = (steps**2).sum(axis=1)
        ll = -n_steps / 2 * np.log(x)[None] - ss[:, None] / (4 * x[None] * tau)
        ll = np.concatenate([np.full((k, 1), -60.0), ll, np.full((k, 1), -60.0)], axis=1)
        ll = np.maximum(ll - ll.max(axis=1, keepdims=True), -60)
        post = posterior(combine(ll), GRID, d_max_um2_s=1.0)
        hits.append(post.lo68 <= d_true <= post.hi68)
    assert 0.62 <= np.mean(hits) <= 0.74


def test_combine_skips_missing_windows():
    ll = gaussian_log_likelihood(np.array([0.4, np.nan, 0.5]), np.array([0.1, 0.1, 0.1]), GRID)
    both = posterior(combine(ll), GRID, 1.0)
    assert float(both.d) == pytest.approx(0.45, abs=3e-3)
    assert np.isnan(posterior(combine(ll[1:2]), GRID, 1.0).d)


def test_a_window_above_the_range_is_not_also_called_uninformative():
    """Data that place D well above the range leave the in-range posterior wide (its σ
    is that of a flat prior), yet they say something: "D > x", not "little information"."""
    from dle_stream.likelihood import DGrid, posterior

    grid = DGrid()
    ll = np.where(grid.knots <= 1.0, -4.0, 0.0)  # flat and 4 nats lower inside the range
    post = posterior(np.concatenate([ll, [0.0]])[None], grid, 1.0)
    assert bool(post.above_range[0])
    assert float(post.sigma[0]) > 0.2  # the in-range part alone is nearly flat
    assert not bool(post.little_information[0])


def test_posterior_profile_widens_a_sum_by_the_factor_read_where_the_sum_peaks():
    """A profile (D, factor) divides the summed log-likelihood by the factor at the sum's
    peak: 16 Gaussian measurements of σ combine to σ/4 (closed form), read with factor 4
    there to 2·σ/4; where the profile is 1 nothing changes; one shared factor, so the
    combined centre stays the closed-form weighted mean."""
    from dataclasses import replace

    rng = np.random.default_rng(4)
    profile = ((0.0, 1.0), (0.3, 1.0), (0.6, 4.0), (1.0, 4.0))
    for truth, factor in ((0.15, 1.0), (0.8, 4.0)):
        y = truth + 0.1 * rng.standard_normal(16)
        summed = combine(gaussian_log_likelihood(y, np.full(16, 0.1), GRID))
        plain = posterior(summed, GRID, 1.0)
        read = posterior(summed, replace(GRID, posterior_profile=profile), 1.0)
        assert float(plain.sigma) == pytest.approx(0.1 / 4, rel=0.03)
        assert float(read.sigma) == pytest.approx(0.1 / 4 * np.sqrt(factor), rel=0.03)
        assert float(read.d) == pytest.approx(float(np.mean(y)), abs=3e-3)
    with pytest.raises(ValueError, match="posterior_profile"):
        DGrid(posterior_profile=((0.5, 1.0), (0.2, 2.0)))
    assert DGrid.from_dict(replace(GRID, posterior_profile=profile).to_dict()).posterior_profile == profile
    assert DGrid.from_dict({"intervals": 96, "top": 2.0}).posterior_profile == ()  # a log written before it
