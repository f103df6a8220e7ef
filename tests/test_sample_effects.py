"""Blinking, bleaching and whole-field motion in the simulator (training/sample_effects.py),
each checked against its physics: a power-law exponent, an on-time fraction, a bleaching
time constant, the displacement of an immobile particle's image at each row's scan time."""

import math

import numpy as np
import pytest
import torch

from dle_stream.training.priors import SimulatorPriors, get_preset
from dle_stream.training.sample_effects import blink_switch_times, emitting, truncated_power_law
from dle_stream.training.simulator import Simulator

TIMING = get_preset("low").timing


def one_still_dot(**effects) -> SimulatorPriors:
    """One immobile, very bright particle in focus at the tile's centre, no background."""
    return SimulatorPriors(
        particles="fixed", particles_max=1, cloud_lateral_std_tiles=(1e-4, 0.0), cloud_axial_std_um=1e-3,
        brightness_photons=(2e5, 0.0), background_photons=(0.0, 0.0), read_noise_photons=(0.0, 0.0),
        gain=(1.0, 0.0), subtract_offset=False, psf_sigma_xy_um=(0.21, 0.0), psf_sigma_z_um=(1.36, 0.0), **effects,
    )


def test_power_law_dwell_times_have_the_set_exponent():
    g = torch.Generator().manual_seed(0)
    tau = truncated_power_law((200_000,), 1.7, 1.0, 1e9, g, torch.device("cpu")).numpy()
    alpha_hat = 1 + tau.size / np.sum(np.log(tau / 1.0))  # maximum likelihood (Pareto)
    assert alpha_hat == pytest.approx(1.7, abs=0.02)
    assert tau.min() >= 1.0


def test_equal_exponents_give_half_the_time_on_and_unequal_ones_less():
    g = torch.Generator().manual_seed(1)
    starts = torch.zeros(2000, dtype=torch.float64)
    ends = torch.full((2000,), 20e6, dtype=torch.float64)  # 20 s movies
    t = torch.linspace(0, 20e6, 200, dtype=torch.float64)[None].expand(2000, -1)
    on = emitting(*blink_switch_times(starts, ends, SimulatorPriors(blink_alpha_on=1.7, blink_alpha_off=1.7), g), t)
    assert float(on.double().mean()) == pytest.approx(0.5, abs=0.04)
    # off-times heavier-tailed (smaller exponent) than on-times: mostly dark, as aged QDs are
    on = emitting(*blink_switch_times(starts, ends, SimulatorPriors(blink_alpha_on=2.0, blink_alpha_off=1.4), g), t)
    assert float(on.double().mean()) < 0.3


def test_a_blinking_dot_is_dark_in_whole_rows_as_often_as_its_on_time_says():
    pri = one_still_dot(blink_alpha_on=1.7, blink_alpha_off=1.7, blink_min_ms=5.0, blink_max_ms=2000.0)
    movies = Simulator(pri, TIMING, frames=200).simulate(24, seed=2, d_um2_s=0.0).movies.numpy()
    centre_rows = movies[:, :, 9:11, :].sum(axis=3)  # the two rows through the dot, per frame
    lit = centre_rows > 0.5 * np.median(centre_rows[centre_rows > 1e3])
    assert 0.35 < lit.mean() < 0.65
    # on and off both last many frames at a time (power-law dwells up to 2 s, frames 62 ms)
    flips = np.mean(lit[:, 1:, 0] != lit[:, :-1, 0])
    assert flips < 0.25


def test_bleaching_dims_a_field_with_the_set_time_constant():
    tau_s = 5.0
    pri = SimulatorPriors(particles="fixed", particles_max=40, density="box", background_photons=(0.0, 0.0),
                          read_noise_photons=(0.0, 0.0), subtract_offset=False, bleach_time_s=tau_s)
    batch = Simulator(pri, TIMING, frames=300).simulate(16, seed=3, d_um2_s=0.2)
    signal = batch.movies.numpy().sum(axis=(0, 2, 3))  # photons per frame, all movies
    t_s = np.arange(signal.size) * TIMING.frame_period_us * 1e-6
    slope = np.polyfit(t_s, np.log(signal), 1)[0]
    assert -1 / slope == pytest.approx(tau_s, rel=0.15)


def test_field_motion_moves_a_still_dot_by_the_displacement_at_each_rows_scan_time():
    pri = one_still_dot(heartbeat_px=(3.0, 3.0), heartbeat_hz=(2.0, 2.0))
    batch = Simulator(pri, TIMING, frames=40).simulate(3, seed=4, d_um2_s=0.0)
    movies = batch.movies.numpy()
    prm = {k: v.numpy() for k, v in batch.params.items()}
    dx = TIMING.pixel_size_um
    checked = 0
    for m in range(3):
        x0 = float(batch.positions_um[batch.particle_movie == m][0, 0, 0]) / dx
        for f in range(40):
            for r in range(20):
                row = movies[m, f, r]
                if row.sum() < 0.05 * 2e5:
                    continue
                t = (f * TIMING.frame_period_us + r * TIMING.line_period_us + 10 * TIMING.dwell_us) * 1e-6
                shift = prm["heartbeat_ax_um"][m] * math.sin(2 * math.pi * prm["heartbeat_hz"][m] * t + prm["heartbeat_phase"][m])
                centroid = float(np.sum(row * (np.arange(20) + 0.5)) / row.sum())
                assert centroid == pytest.approx(x0 + shift / dx, abs=0.15), (m, f, r)
                checked += 1
    assert checked > 300
    # the image really moves: its rows' centroids span most of the ±3 px
    assert np.ptp(movies.sum(axis=(2,)).argmax(axis=2)) >= 4


def test_every_stress_changes_what_it_names_at_two_strengths():
    from dle_stream.training.priors import STRESSES, stressed

    base = get_preset("low").priors
    assert stressed(base, "dim", "weak").brightness_photons[0] == pytest.approx(0.5 * base.brightness_photons[0])
    assert stressed(base, "dense", "weak").particles_exp_mean == pytest.approx(3 * base.particles_exp_mean)
    assert stressed(base, "wide-psf", "strong").psf_sigma_xy_um[0] == pytest.approx(2 * base.psf_sigma_xy_um[0])
    assert stressed(base, "motion", "strong").field_motion and stressed(base, "blinking", "weak").blinking
    for name in STRESSES:
        assert stressed(base, name, "weak") != base and stressed(base, name, "strong") != stressed(base, name, "weak")
