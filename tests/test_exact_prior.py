"""A smooth grid head with the training prior added exactly (ModelConfig.grid_prior_exact).

The training prior has a step at d_max (more movies inside the range than beyond it). A head
whose output is a smooth B-spline curve cannot follow that step when it must represent the
posterior, likelihood × prior; once the prior is divided out the likelihood carries a dip
below d_max and a bump above it, the same in every window, so that adding windows pulls the
combined D (measured on beads-high: the average log-likelihood of D = 0.5·d_max peaked at
1.33·d_max). The reference here is outside the code: the exact log-likelihood of a Gaussian
measurement (scipy), which the head represents as well as its basis allows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dle_stream.likelihood import window_log_likelihood
from dle_stream.model import DLEModel, ModelConfig
from dle_stream.training.output_basis import add_exact_prior


def _head_output(model: DLEModel) -> np.ndarray:
    latents = torch.zeros(1, model.config.min_frames, model.config.latent)
    with torch.no_grad():
        return model.head(latents)[0].double().numpy()


def _set_spline(model: DLEModel, coef: np.ndarray, overflow: float) -> None:
    """Make the head give these B-spline coefficients for every input (weights 0, bias = coef)."""
    last = model.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(np.concatenate([coef, [overflow]]), dtype=torch.float32))


def _best_head(exact: bool, true_ll: np.ndarray) -> DLEModel:
    """The head closest (least squares on the knots) to the exact posterior under its training prior."""
    cfg = ModelConfig(grid_prior_exact=exact)
    model = DLEModel(cfg).eval()
    prior = cfg.training_prior.log_density(cfg.grid)
    basis = cfg.grid.spline_basis(cfg.grid_basis)
    target = true_ll if exact else true_ll + prior[:-1]  # what the smooth part must give
    coef = np.linalg.lstsq(basis, target, rcond=None)[0]
    _set_spline(model, coef, overflow=-200.0 if exact else -200.0 + prior[-1])
    return model


@pytest.mark.parametrize("x", [0.5, 0.9, 1.1])
def test_the_read_likelihood_has_no_step_at_the_top_of_the_range(x: float):
    cfg = ModelConfig()
    knots = cfg.grid.knots
    true_ll = stats.norm.logpdf(x, knots, 0.25)  # a Gaussian measurement x of D (units of d_max)
    near = np.abs(knots - 1.0) < 0.4
    errors = {}
    for exact in (False, True):
        model = _best_head(exact, true_ll)
        ll = window_log_likelihood(_head_output(model)[None], cfg.grid, cfg.training_prior)[0, :-1]
        err = (ll - ll[near].max()) - (true_ll - true_ll[near].max())
        errors[exact] = np.abs(err[near]).max()
    assert errors[True] < 0.02, errors            # the likelihood itself, to spline accuracy
    assert errors[False] > 5 * errors[True], errors  # the old head: the prior's step left in it


def test_sixteen_windows_peak_at_the_truth():
    # adding windows multiplies a shared bump: 16 windows, each a wide (σ = d_max) measurement
    # at 0.5·d_max, as a window at high D is
    cfg = ModelConfig()
    knots = cfg.grid.knots
    peaks = {}
    for exact in (False, True):
        ll = window_log_likelihood(_head_output(_best_head(exact, stats.norm.logpdf(0.5, knots, 1.0)))[None],
                                   cfg.grid, cfg.training_prior)[0, :-1]
        peaks[exact] = knots[np.argmax(16 * ll)]
    assert abs(peaks[True] - 0.5) <= 0.02, peaks
    assert abs(peaks[False] - 0.5) > 0.3, peaks  # the old head: pulled to the bump above d_max


def test_warm_start_conversion_keeps_the_output_away_from_the_step():
    torch.manual_seed(0)
    old = DLEModel(ModelConfig(grid_prior_exact=False)).eval()
    with torch.no_grad():  # a head that says something (not the flat start)
        old.mlp[-1].weight.normal_(0.0, 0.3)
    new = add_exact_prior(old).eval()
    assert new.config.grid_prior_exact
    latents = torch.randn(4, old.config.min_frames, old.config.latent)
    with torch.no_grad():
        a, b = old.head(latents).double().numpy(), new.head(latents).double().numpy()
    knots = old.config.grid.knots
    far = np.abs(knots - 1.0) > 0.3
    diff = (b - a)[:, :-1]
    assert np.abs(diff[:, far]).max() < 0.05           # the same posterior away from d_max
    assert np.abs(diff[:, ~far]).max() > 0.1           # the prior's step is now exact there
    assert np.allclose(b[:, -1], a[:, -1], atol=1e-5)  # the overflow's mass unchanged


def test_packages_written_before_keep_their_meaning():
    arch = ModelConfig(grid_prior_exact=False).to_dict()
    del arch["grid_prior_exact"]
    assert ModelConfig.from_dict(arch).grid_prior_exact is False
    assert ModelConfig().grid_prior_exact is True
