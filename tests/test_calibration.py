"""Calibrating window likelihoods for combination (training/calibration.py).

The synthetic "networks" here report a Gaussian likelihood centred on a noisy reading
x ~ N(m(D), s) of the true D: with m(D) ≠ D they are shifted, with a reported width ≠ s
too wide or too narrow. What is checked is the physics of combining: after calibration,
16 windows combined hold the true D in their 68 % interval about 68 % of the time.
"""

import numpy as np
import pytest

from dle_stream.likelihood import DGrid, gaussian_log_likelihood, posterior, warp_log_likelihood
from dle_stream.training.calibration import (
    INSIDE_FRACTIONS,
    combined_figures,
    combined_groups,
    combined_log_score,
    disjoint_groups,
    fit_warp,
    refine_warp_by_medians,
)

GRID = DGrid(96, 2.0)
FRACTIONS = INSIDE_FRACTIONS + (1.1, 1.25, 1.5)


def synthetic_cells(shift, noise: float, reported: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = []
    for f in FRACTIONS:
        x = shift(f) + noise * rng.standard_normal(n)
        cells.append(gaussian_log_likelihood(x, np.full(n, reported), GRID))
    return np.stack(cells)


def pulled(f):
    """A pull toward the middle of the range: 15 % of the distance to 0.5."""
    return f + 0.15 * (0.5 - f)


def coverage16(cells) -> float:
    groups = combined_groups(cells[2:18], 16)  # D from 0.125 to 0.875 of the range
    post = posterior(groups, GRID, 1.0)
    truth = np.asarray(FRACTIONS[2:18])[:, None]
    return float(np.mean((post.lo68 <= truth) & (truth <= post.hi68)))


def test_warp_recovers_a_known_pull_and_restores_combined_coverage():
    cells = synthetic_cells(pulled, noise=0.08, reported=0.08, n=512, seed=1)
    warp = dict(fit_warp(FRACTIONS, cells, GRID))
    for f in (0.225, 0.525, 0.825):
        assert warp[f] == pytest.approx(pulled(f), abs=0.01)
    fresh = synthetic_cells(pulled, noise=0.08, reported=0.08, n=512, seed=2)  # judged on other draws
    assert coverage16(fresh) < 0.5  # the pull, 4× the combined σ at the ends, hides the truth
    assert 0.6 <= coverage16(warp_log_likelihood(fresh, GRID, tuple(warp.items()))) <= 0.76


def test_warp_from_combined_medians_recovers_a_known_pull_and_leaves_16_windows_unbiased():
    """Started from a warp that is 0.03·d_max off at every cell up to 0.9·d_max, the median
    refinement finds the pull m(D) of a shifted "network" there, and 16 fresh windows
    combined then have posterior medians centred on the truth (mean z within the noise of
    128 groups)."""
    cells = synthetic_cells(pulled, noise=0.08, reported=0.08, n=512, seed=1)
    start = tuple((f, m + 0.03 if f <= 0.9 else m) for f, m in fit_warp(FRACTIONS, cells, GRID))
    warp = dict(refine_warp_by_medians(FRACTIONS, disjoint_groups(cells, 16), GRID, start))
    for f in (0.125, 0.325, 0.525, 0.725, 0.875):
        assert warp[f] == pytest.approx(pulled(f), abs=0.01)
    assert warp[1.1] == dict(start)[1.1]  # above 0.9·d_max the given points are kept
    fresh = synthetic_cells(pulled, noise=0.08, reported=0.08, n=2048, seed=2)
    groups = disjoint_groups(warp_log_likelihood(fresh, GRID, tuple(warp.items())), 16)
    for i, f in enumerate(FRACTIONS):
        if 0.1 <= f <= 0.9:
            post = posterior(groups[i].sum(axis=1), GRID, 1.0)
            assert abs(np.mean((post.d - f) / post.sigma)) < 0.4, f  # ≈ 4 standard errors of 128 groups


def test_log_score_prefers_the_temperature_that_makes_a_too_wide_likelihood_right():
    """Reported σ twice the true one: ℓ/T is right at T = 1/4."""
    cells = synthetic_cells(lambda f: f, noise=0.04, reported=0.08, n=256, seed=3)
    temps = np.geomspace(0.1, 2.0, 41)
    best = temps[np.argmax([combined_log_score(cells, FRACTIONS, GRID, t) for t in temps])]
    assert 0.19 <= best <= 0.33
    before, after = combined_figures(cells, FRACTIONS, GRID), combined_figures(cells / best, FRACTIONS, GRID)
    assert before["coverage68_k16"] > 0.9 and 0.6 <= after["coverage68_k16"] <= 0.76


def test_warp_of_an_unshifted_likelihood_is_nearly_the_identity():
    cells = synthetic_cells(lambda f: f, noise=0.05, reported=0.05, n=256, seed=4)
    pts = np.array(fit_warp(FRACTIONS, cells, GRID))
    assert np.max(np.abs(pts[:20, 1] - pts[:20, 0])) < 0.01


def test_projecting_a_free_knot_head_keeps_its_smooth_part_and_drops_the_zigzag():
    import torch

    from dle_stream.model import DLEModel, ModelConfig
    from dle_stream.training.output_basis import project_output_to_spline_basis

    cfg = ModelConfig(temporal_channels=8, head_hidden=8, grid_basis=0, grid_prior_exact=False)  # an old head
    model = DLEModel(cfg).eval()
    k = cfg.grid.knots
    smooth = -0.5 * ((k - 0.6) / 0.15) ** 2  # a Gaussian log-likelihood: representable by the basis
    zigzag = np.where(np.arange(k.size) % 2 == 0, 0.5, -0.5)
    with torch.no_grad():
        model.mlp[-1].weight.zero_()
        model.mlp[-1].bias.copy_(torch.as_tensor(np.concatenate([smooth + zigzag, [-3.0]]), dtype=torch.float32))
    new = project_output_to_spline_basis(model).eval()
    assert new.config.grid_basis == 48
    with torch.no_grad():
        out = new.head(torch.randn(2, 64, cfg.latent)).numpy()
    j = np.arange(k.size)
    inside = (j >= 3) & (j < k.size - 3)  # away from the grid's ends, where the basis has few neighbours
    assert np.max(np.abs(out[0, :-1][inside] - smooth[inside])) < 0.1
    assert out[0, -1] == pytest.approx(-3.0)


def test_combined_loss_rewards_more_windows_of_an_honest_likelihood_and_punishes_a_shifted_one():
    """The trainer's combination loss (GridLoss.combined): for windows whose likelihood is
    right, adding windows sharpens the posterior around the truth (NLL falls with K); for a
    likelihood shifted by 2 σ/√16, 16 windows are confidently wrong (NLL rises)."""
    import torch

    from dle_stream.likelihood import TrainingPrior
    from dle_stream.model import GridLoss

    loss = GridLoss(GRID)
    prior = TrainingPrior()
    prior_log = torch.tensor(prior.log_density(GRID), dtype=torch.float32)
    rng = np.random.default_rng(7)
    truth = rng.uniform(0.2, 0.8, 256)
    s = 0.1

    def nll(k, shift):
        x = truth[:, None] + shift + s * rng.standard_normal((256, k))
        ll = gaussian_log_likelihood(x, np.full_like(x, s), GRID)  # [256, k, n]
        out = torch.tensor(ll + prior.log_density(GRID), dtype=torch.float32)  # posterior under the prior
        return float(loss.combined(out, torch.tensor(truth, dtype=torch.float32), prior_log))

    honest = [nll(k, 0.0) for k in (1, 4, 16)]
    assert honest[0] > honest[1] > honest[2]
    shifted = nll(16, 2 * s / 4)
    assert shifted > honest[2] + 1.0


def test_latent_cache_groups_hold_movies_of_one_d():
    import torch

    from dle_stream.training.latent_cache import LatentCache

    cache = LatentCache(64, frames=3, latent=2)
    for gid, d in enumerate((0.1, 0.5, 0.9)):
        lat = torch.full((6, 3, 2), float(gid))  # each movie's latents name its group
        cache.add(lat, torch.full((6,), d), torch.zeros(6), torch.full((6,), gid))
    cache.add(torch.full((10, 3, 2), -1.0), torch.rand(10), torch.zeros(10))  # movies of their own
    assert cache.sample_groups(4, 4, torch.Generator().manual_seed(0)) is None  # only 3 groups
    lat, d = cache.sample_groups(3, 4, torch.Generator().manual_seed(0))
    assert lat.shape == (3, 4, 3, 2)
    for g in range(3):
        gid = int(lat[g, 0, 0, 0])
        assert torch.all(lat[g] == gid) and float(d[g]) == pytest.approx((0.1, 0.5, 0.9)[gid])


def test_a_shared_scale_error_is_covered_by_the_systematic_term_and_not_by_more_windows():
    """Each group of 16 windows shares a scale error of 6 % (as a mis-calibrated D axis
    would give); independent window noise averages down, the shared error does not."""
    from dataclasses import replace

    rng = np.random.default_rng(9)
    f = np.linspace(0.2, 0.8, 7)
    groups = 200
    scale = 1 + 0.06 * rng.standard_normal((f.size, groups, 1))
    x = f[:, None, None] * scale + 0.05 * rng.standard_normal((f.size, groups, 16))
    ll = gaussian_log_likelihood(x, np.full_like(x, 0.05), GRID)

    def coverage(grid):
        post = posterior(ll.sum(axis=2), grid, 1.0)
        return float(np.mean((post.lo68 <= f[:, None]) & (f[:, None] <= post.hi68)))

    assert coverage(GRID) < 0.5
    assert 0.6 <= coverage(replace(GRID, systematic_rel=0.06)) <= 0.76
    # one sharp window at D = 0.5 read with a 10 % systematic error has sd ≈ 0.05
    one = gaussian_log_likelihood(np.array([0.5]), np.array([0.001]), GRID)
    assert float(posterior(one, replace(GRID, systematic_rel=0.1), 1.0).sigma[0]) == pytest.approx(0.05, rel=0.05)


def test_smoothing_keeps_a_gaussian_likelihood_and_removes_knot_scale_bumps():
    """A Gaussian log-likelihood in the knot index (quadratic) keeps its peak and width
    under smoothing; an alternating bump on top of it, the same for every window, is
    damped — so 64 windows added no longer stick to the bumps."""
    from dle_stream.likelihood import smooth_log_likelihood

    j = np.arange(GRID.knots.size, dtype=float)
    quad = -0.5 * ((j - 70.3) / 6.0) ** 2
    bumps = 0.4 * np.cos(np.pi * j / 1.5)  # a period of 3 knots
    ll = np.concatenate([quad + bumps, [-50.0]])
    smoothed = smooth_log_likelihood(ll, 3.0)[:-1]
    inner = (j > 20) & (j < j.size - 20)
    residual = smoothed - quad
    assert np.ptp(residual[inner]) < 0.02  # a constant offset only: same peak, same width
    assert smooth_log_likelihood(ll, 3.0)[-1] == -50.0
    assert int(np.argmax(64 * smoothed)) == 70


def test_likelihood_ratio_scale_recovers_the_false_alarm_rate_of_over_confident_parts():
    """Parts that report σ/√2 for errors of σ make Λ twice a χ² variable: referred to χ² as
    they are, far more than 1 % of homogeneous groups are called inconsistent; the fitted
    scale is near 2 and, on fresh draws, brings the rate back to about 1 %."""
    from dle_stream.combine import disagreement_p
    from dle_stream.training.calibration import fit_lr_scale

    def draws(seed, k=8, groups=3000):
        rng = np.random.default_rng(seed)
        truth = rng.uniform(0.3, 0.7, (groups, 1))
        x = truth + 0.05 * rng.standard_normal((groups, k))
        return gaussian_log_likelihood(x, np.full_like(x, 0.05 / np.sqrt(2)), GRID)

    fit = draws(11)
    scale, rates = fit_lr_scale({"k8": fit})
    assert 1.6 <= scale <= 2.6
    fresh = draws(12)
    assert np.mean(disagreement_p(fresh, axis=1) < 0.01) > 0.1
    assert np.mean(disagreement_p(fresh, axis=1, lr_scale=scale) < 0.01) <= 0.035


def test_temperature_profile_makes_windows_honest_where_one_temperature_cannot():
    """Windows report σ 2.2 times their true error near D = 0 falling to 0.8 times near
    the top: no single temperature makes both halves' 68 % intervals right; the fitted
    profile (read at each window's own peak) does, on fresh draws."""
    from dle_stream.likelihood import window_temperatures
    from dle_stream.training.calibration import coverage_table, fit_temperature_profile

    f = np.round(np.arange(0.125, 0.9, 0.05), 3)

    def draws(seed, n=256):
        rng = np.random.default_rng(seed)
        x = f[:, None] + 0.04 * rng.standard_normal((f.size, n))
        reported = 0.04 * (2.2 - 1.6 * f[:, None]) * np.ones_like(x)
        return gaussian_log_likelihood(x, reported, GRID)[:, :, None, :]  # [cells, n, K = 1, entries]

    cells = np.arange(f.size)
    low, high = f < 0.5, f > 0.5

    def coverage(sets, t, profile=()):
        return coverage_table(sets, f, GRID, t, cells, profile)["k1"][:, 0]

    fit = {"k1": draws(21)}
    one_t = [coverage(fit, t) for t in (0.25, 0.5, 1.0)]
    assert all(abs(c[low].mean() - 0.683) > 0.08 or abs(c[high].mean() - 0.683) > 0.08 for c in one_t)
    t_fit, profile = fit_temperature_profile(fit, f, GRID, 1.0, cells)
    fresh = {"k1": draws(22)}
    c = coverage(fresh, t_fit, profile)
    assert 0.6 <= c[low].mean() <= 0.76 and 0.6 <= c[high].mean() <= 0.76
    # the profile is read where each window peaks: a window peaking at 0.2 gets the low-D temperature
    t = window_temperatures(gaussian_log_likelihood(np.array([0.2, 0.8]), np.array([0.05, 0.05]), GRID), GRID, t_fit, profile)
    assert t[0] < 0.5 < 0.8 < t[1]


def test_a_tile_filmed_for_eight_windows_keeps_its_particles_in_view():
    """Calibration films tiles for 8 consecutive windows, as a stream's running estimate adds
    them. In a sample the density is steady; the paper's spreading cloud empties the tile
    within a window or two at the top of the range (its later windows carry almost no
    information), so tiles over time must be simulated with a steady density."""
    import torch

    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.model_package import resolve_model
    from dle_stream.training.calibration import _operating_simulator, tile_film_simulator

    est = DiffusionEstimator.load(resolve_model("brain-qd-low"))

    def visible_by_window(sim, d_max):
        g = torch.Generator().manual_seed(3)
        out = sim.simulate(8, generator=g, d_um2_s=d_max)
        seen = [float(out.visible_transitions.float().mean())]
        for _ in range(7):
            out = sim.simulate(8, generator=g, continue_from=out.state)
            seen.append(float(out.visible_transitions.float().mean()))
        return np.asarray(seen)

    steady = visible_by_window(*tile_film_simulator(est))
    cloud = visible_by_window(*_operating_simulator(est, density="cloud"))
    assert steady[-1] > 0.5 * steady[0] and steady[-4:].mean() > 0.5 * steady[:4].mean(), steady
    assert cloud[-1] < 0.2 * cloud[0], cloud  # why the cloud is not used for tiles over time


def test_the_peak_of_the_average_likelihood_is_read_between_knots():
    """Windows of one true D whose readings scatter around c = 0.4123·d_max (between two
    knots): the average log-likelihood peaks at c up to the readings' own scatter
    (s/√n = 0.0016·d_max); reading the highest knot instead was off by up to half a knot
    spacing, and jumped a whole knot between two halves of one cell."""
    from dle_stream.training.calibration import mean_peak

    rng = np.random.default_rng(0)
    c, s, n = 0.4123, 0.05, 1000
    readings = c + s * rng.standard_normal(n)
    lls = gaussian_log_likelihood(readings, np.full(n, s), GRID)
    peak = mean_peak(lls, GRID)
    assert abs(peak - readings.mean()) < 2e-4          # the Gaussians' average peaks at the mean reading
    assert abs(peak - c) < 3 * s / np.sqrt(n)
    spacing = np.diff(GRID.knots)[np.searchsorted(GRID.knots, c) - 1]
    assert min(abs(GRID.knots - peak)) > 0.05 * spacing  # not snapped to a knot


def test_a_width_wrong_by_a_factor_of_the_true_d_is_fixed_on_the_sum_not_per_window():
    """Windows of true D read x ~ N(D, 0.06) but report 0.06·(0.4 + 1.2·D): too narrow at
    small D, too wide near the top, as a function of the *true* D. A temperature profile
    per window (read at each window's own peak) weights the windows of one D unequally by
    where each happens to read, so 16 windows combined are biased (measured: z mean +0.54).
    The profile read where the *sum* peaks gives every window of a group one factor: 16
    fresh windows combine without that bias (+0.05), and single windows keep their coverage."""
    from dataclasses import replace

    from dle_stream.likelihood import combine, window_temperatures
    from dle_stream.training.calibration import coverage_table, fit_posterior_profile, fit_temperature_profile

    f = np.round(np.arange(0.125, 0.9, 0.1), 3)
    cells = np.arange(f.size)

    def draws(seed, n=256):
        rng = np.random.default_rng(seed)
        x = f[:, None] + 0.06 * rng.standard_normal((f.size, n))
        return gaussian_log_likelihood(x, 0.06 * (0.4 + 1.2 * f[:, None]) * np.ones_like(x), GRID)

    fit = draws(31)
    shapes = dict(slopes=(-2.0, -1.0, 0.0, 1.0, 2.0), curves=(-2.0, 0.0, 2.0))
    t_w, per_window = fit_temperature_profile({"k1": fit[:, :, None]}, f, GRID, 1.0, cells, **shapes)
    t_p, on_sum = fit_posterior_profile({"k1": fit[:, :, None], "k16": disjoint_groups(fit, 16)}, f, GRID, 1.0,
                                        cells, **shapes)
    fresh = draws(32, n=512)

    def z16(grid, t, profile):
        g = disjoint_groups(fresh, 16)
        g = g / window_temperatures(g, grid, t, profile)[..., None]
        post = posterior(combine(g, axis=2), grid, 1.0, n_windows=np.full(g.shape[:2], 16))
        return float(np.mean((post.d - f[:, None]) / post.sigma))

    summed = replace(GRID, posterior_profile=on_sum)
    assert abs(z16(GRID, t_w, per_window)) > 0.3
    assert abs(z16(summed, t_p, ())) < 0.15
    c1 = coverage_table({"k1": fresh[:, :, None]}, f, summed, t_p, cells)["k1"][:, 0]
    assert 0.6 <= c1.min() and c1.max() <= 0.78
