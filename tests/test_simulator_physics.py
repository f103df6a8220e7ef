"""The simulator against physics: Brownian MSD at pixel and frame lags, the raster time
map, photon counts, shot noise, and which augmentations a raster scan allows."""

import math

import numpy as np
import pytest
import torch

from dle_stream import ScanTiming
from dle_stream.training.augment import reverse_raster_time
from dle_stream.training.priors import SimulatorPriors, get_preset
from dle_stream.training.simulator import Simulator

REF = ScanTiming.reference()


def quiet_priors(**kw) -> SimulatorPriors:
    """No background, no read noise, unit gain, no offset: photons only."""
    base = dict(
        background_photons=(0.0, 0.0), read_noise_photons=(0.0, 0.0), gain=(1.0, 0.0),
        subtract_offset=False, psf_sigma_xy_um=(0.21, 0.0), psf_sigma_z_um=(1.36, 0.0),
        brightness_photons=(600.0, 0.0),
    )
    base.update(kw)
    return SimulatorPriors(**base)


def test_pixel_time_increments_have_variance_2_d_tau():
    """Within a row, positions δ·n µs apart differ by N(0, 2Dδn) per axis."""
    d = 2.0
    priors = quiet_priors(particles="fixed", particles_max=40, cloud_lateral_std_tiles=(0.3, 0.0),
                          d_min_um2_s=0.0, d_max_um2_s=5.0)
    batch = Simulator(priors, REF, frames=40).simulate(4, seed=3, d_um2_s=d, keep_pixel_paths=True)
    xyz = batch.pixel_paths["xyz_um"].double()  # [Q, W, 3]
    times = batch.pixel_paths["times_us"]
    assert xyz.shape[0] > 2000
    for lag in (1, 5, 19):
        dt_s = (times[:, lag:] - times[:, :-lag]) * 1e-6
        np.testing.assert_allclose(dt_s.numpy(), lag * REF.dwell_us * 1e-6)
        disp2 = (xyz[:, lag:] - xyz[:, :-lag]) ** 2  # [Q, W-lag, 3]
        for axis in range(3):
            ratio = (disp2[..., axis] / (2 * d * dt_s)).mean().item()
            # adjacent increments overlap, so use a generous but bug-catching tolerance
            assert ratio == pytest.approx(1.0, rel=0.06), (lag, axis, ratio)


def test_increments_between_rows_have_variance_2_d_tau():
    """From the last pixel of a row to the first pixel of the next (retrace time)."""
    d = 1.0
    priors = quiet_priors(particles="fixed", particles_max=60, cloud_lateral_std_tiles=(0.2, 0.0))
    batch = Simulator(priors, REF, frames=30).simulate(2, seed=5, d_um2_s=d, keep_pixel_paths=True)
    pp = batch.pixel_paths
    key = (pp["particle"] * 10**6 + pp["frame"] * 100 + pp["row"]).numpy()
    index = {k: i for i, k in enumerate(key)}
    ratios = []
    for i, k in enumerate(key):
        j = index.get(k + 1)  # same particle, same frame, next row
        if j is None:
            continue
        dt = (pp["times_us"][j, 0] - pp["times_us"][i, -1]).item() * 1e-6
        assert dt == pytest.approx((REF.line_period_us - (REF.width_px - 1) * REF.dwell_us) * 1e-6)
        ratios.append(((pp["xyz_um"][j, 0] - pp["xyz_um"][i, -1]).double() ** 2 / (2 * d * dt)).numpy())
    ratios = np.array(ratios)
    assert len(ratios) > 1000
    np.testing.assert_allclose(ratios.mean(axis=0), 1.0, rtol=0.08)


@pytest.mark.parametrize("lag_frames", [1, 4, 25])
def test_frame_lag_msd_is_2_d_tau(lag_frames):
    d = 0.8
    priors = quiet_priors(particles="fixed", particles_max=50)
    batch = Simulator(priors, REF, frames=200).simulate(16, seed=11, d_um2_s=d)
    np.testing.assert_allclose(np.diff(batch.mid_times_us.numpy(), axis=1), REF.frame_period_us)
    pos = batch.positions_um.double()[:, ::lag_frames]  # non-overlapping steps: independent
    disp2 = (pos[:, 1:] - pos[:, :-1]) ** 2
    tau = lag_frames * REF.frame_period_us * 1e-6
    n = disp2[..., 0].numel()
    standard_error = math.sqrt(2 / n)  # of the mean of χ²(1)/1 variables
    for axis in range(3):
        ratio = (disp2[..., axis].mean() / (2 * d * tau)).item()
        assert abs(ratio - 1) < 4 * standard_error + 0.01, (axis, ratio, standard_error)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_simulated_pixel_times_match_the_timing_model(bidirectional):
    full = ScanTiming(0.15, 8.0, 1508.0, 61652.0 * 3, 60, 60, bidirectional=bidirectional)
    priors = quiet_priors(particles="fixed", particles_max=20, cloud_lateral_std_tiles=(0.2, 0.0))
    offsets = [(0, 0), (21, 33)]
    batch = Simulator(priors, full, 20, 20, frames=6).simulate(2, seed=2, d_um2_s=0.5, offsets=offsets,
                                                             keep_pixel_paths=True)
    pp = batch.pixel_paths
    for m, (r0, c0) in enumerate(offsets):
        expected = full.pixel_times_us(r0, c0, 20, 20, n_frames=6)
        sel = pp["movie"] == m
        assert sel.sum() > 10
        got = pp["times_us"][sel].numpy()
        want = expected[pp["frame"][sel].numpy(), pp["row"][sel].numpy()]
        np.testing.assert_allclose(got, want)


def test_static_in_focus_particle_integrates_to_its_brightness():
    priors = quiet_priors(particles="fixed", particles_max=1, cloud_lateral_std_tiles=(1e-4, 0.0),
                          cloud_axial_std_um=1e-6)
    batch = Simulator(priors, REF, frames=400).simulate(1, seed=0, d_um2_s=0.0)
    frame_sums = batch.movies[0].sum(dim=(1, 2)).double()
    # Poisson(600) per frame: the mean over 400 frames is 600 ± 1.2
    assert frame_sums.mean().item() == pytest.approx(600.0, abs=5.0)
    assert frame_sums.var().item() == pytest.approx(600.0, rel=0.2)
    mean_img = batch.movies[0].mean(0)
    peak = np.unravel_index(mean_img.argmax().item(), mean_img.shape)
    assert peak[0] in (9, 10) and peak[1] in (9, 10)  # centred on the tile
    # peak ≈ brightness / (2π s²) with s = σxy/dx px, sampled at ±½ px from the centre
    s = 0.21 / 0.15
    expected_peak = 600 / (2 * math.pi * s**2) * math.exp(-(0.25 + 0.25) / (2 * s**2))
    assert mean_img.max().item() == pytest.approx(expected_peak, rel=0.05)
    assert batch.visible_transitions.item() == 400


def test_out_of_focus_particle_is_dimmed_by_the_axial_psf():
    """Photons of a static particle at height z: brightness × exp(−z²/2σz²)."""
    priors = quiet_priors(particles="fixed", particles_max=1, cloud_lateral_std_tiles=(1e-4, 0.0),
                          cloud_axial_std_um=1.36)
    batch = Simulator(priors, REF, frames=200).simulate(64, seed=1, d_um2_s=0.0)
    z = batch.positions_um[:, 0, 2].double()
    expected = 600 * torch.exp(-z**2 / (2 * 1.36**2))
    got = batch.movies.sum(dim=(2, 3)).mean(1).double()
    assert z.abs().max() > 2.0  # some particles well out of focus
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0.03, atol=3)


def test_shot_noise_variance_equals_the_mean():
    priors = quiet_priors(particles="fixed", particles_max=0, background_photons=(50.0, 0.0))
    movies = Simulator(priors, REF, frames=200).simulate(4, seed=7).movies.double()
    assert movies.mean().item() == pytest.approx(50.0, rel=0.01)
    assert (movies.var() / movies.mean()).item() == pytest.approx(1.0, rel=0.03)
    # with gain g the variance is g² × photons while the mean is g × photons
    gained = quiet_priors(particles="fixed", particles_max=0, background_photons=(50.0, 0.0), gain=(3.0, 0.0))
    m = Simulator(gained, REF, frames=200).simulate(4, seed=7).movies.double()
    assert (m.var() / m.mean()).item() == pytest.approx(3.0, rel=0.03)
    # read noise adds its variance
    noisy = quiet_priors(particles="fixed", particles_max=0, background_photons=(50.0, 0.0),
                         read_noise_photons=(2.0, 2.0))
    m = Simulator(noisy, REF, frames=200).simulate(4, seed=7).movies.double()
    assert (m.var() - m.mean()).item() == pytest.approx(4.0, abs=1.0)


def brownian_at_pixel_times(timing: ScanTiming, d: float, frames: int, rng: np.random.Generator) -> np.ndarray:
    """An independent reference path: Brownian motion sampled at every pixel time, [T, H, W, 3]."""
    t = timing.pixel_times_us(0, 0, n_frames=frames) * 1e-6
    order = np.argsort(t, axis=None)
    ts = t.reshape(-1)[order]
    steps = rng.normal(size=(ts.size, 3)) * np.sqrt(2 * d * np.diff(ts, prepend=ts[0]))[:, None]
    path = np.empty((ts.size, 3))
    path[order] = np.cumsum(steps, axis=0)
    return path.reshape(*t.shape, 3)


def msd_at_raster_lags(path: np.ndarray, timing: ScanTiming, d: float) -> dict[str, float]:
    """MSD / (2Dτ) per axis-averaged, at a column lag (δ), a row lag (L) and a frame lag (F),
    read with the recording's own pixel-time map."""
    out = {}
    for name, sl_a, sl_b, tau in (
        ("column", np.s_[:, :, 1:], np.s_[:, :, :-1], timing.dwell_us),
        ("row", np.s_[:, 1:, :], np.s_[:, :-1, :], timing.line_period_us),
        ("frame", np.s_[1:], np.s_[:-1], timing.frame_period_us),
    ):
        disp2 = ((path[sl_a] - path[sl_b]) ** 2).mean()
        out[name] = disp2 / (2 * d * tau * 1e-6)
    return out


def test_time_reversal_keeps_msd_and_transposition_breaks_it():
    timing = ScanTiming.reference()
    d = 1.0
    path = brownian_at_pixel_times(timing, d, 60, np.random.default_rng(0))
    t = torch.from_numpy(np.moveaxis(path, -1, 0).copy())  # [3, T, H, W]: each axis as a "movie"
    original = msd_at_raster_lags(path, timing, d)
    reversed_ = msd_at_raster_lags(np.moveaxis(reverse_raster_time(t).numpy(), 0, -1), timing, d)
    transposed = msd_at_raster_lags(np.moveaxis(t.transpose(-1, -2).numpy(), 0, -1), timing, d)
    for lag in ("column", "row", "frame"):
        assert original[lag] == pytest.approx(1.0, rel=0.08)
        assert reversed_[lag] == pytest.approx(1.0, rel=0.08)
    # a transposed tile puts a line period between "adjacent" pixels of a line
    assert transposed["column"] > 50


def test_same_seed_same_movies_and_truth():
    p = get_preset("high")
    sim = Simulator(p.priors, p.timing, frames=50)
    a, b = sim.simulate(3, seed=42), sim.simulate(3, seed=42)
    assert torch.equal(a.movies, b.movies)
    assert torch.equal(a.d_um2_s, b.d_um2_s)
    assert torch.equal(a.positions_um, b.positions_um)
    c = sim.simulate(3, seed=43)
    assert not torch.equal(a.movies, c.movies)


def test_presets_carry_the_reference_numbers():
    low, high = get_preset("low"), get_preset("high")
    assert (low.priors.d_min_um2_s, low.priors.d_max_um2_s) == (0.0, 1.5)
    assert high.priors.d_max_um2_s == 50.0
    assert low.priors.psf_sigma_xy_um == (0.21, 0.05) and low.priors.psf_sigma_z_um == (1.36, 0.2)
    assert low.timing == ScanTiming.reference() and low.frames == 400
    counts = Simulator(low.priors, low.timing, frames=2).draw_particle_counts(20000, torch.Generator().manual_seed(0))
    assert counts.float().mean().item() == pytest.approx(37, abs=2)
    assert counts.max().item() <= 98


def test_particles_leave_and_enter_the_tile():
    p = get_preset("low")
    batch = Simulator(p.priors.with_(d_min_um2_s=1.0), p.timing, frames=400).simulate(16, seed=1)
    pos = batch.positions_um
    inside = ((pos[..., 0] >= 0) & (pos[..., 0] < 3.0) & (pos[..., 1] >= 0) & (pos[..., 1] < 3.0))
    enters = (~inside[:, :-1] & inside[:, 1:]).sum().item()
    leaves = (inside[:, :-1] & ~inside[:, 1:]).sum().item()
    assert enters > 20 and leaves > 20
    box = Simulator(p.priors.with_(density="box"), p.timing, frames=400).simulate(8, seed=1, d_um2_s=1.0)
    lo, hi = -2.0, 3.0 + 2.0
    assert (box.positions_um[..., :2] >= lo).all() and (box.positions_um[..., :2] < hi).all()
    # a stationary density: as many particles in view in the first as in the last 100 frames
    vis = ((box.positions_um[..., 0] >= 0) & (box.positions_um[..., 0] < 3.0)
           & (box.positions_um[..., 1] >= 0) & (box.positions_um[..., 1] < 3.0)).float()
    assert vis[:, :100].mean().item() == pytest.approx(vis[:, -100:].mean().item(), rel=0.3)


def test_continued_chunks_are_one_brownian_recording():
    """A long recording simulated in chunks: same particles, steps of 2DF across the seam."""
    d = 1.2
    priors = quiet_priors(particles="fixed", particles_max=200)
    sim = Simulator(priors, REF, frames=50)
    g = torch.Generator().manual_seed(4)
    first = sim.simulate(4, generator=g, d_um2_s=d)
    second = sim.simulate(4, generator=g, continue_from=first.state)
    assert second.first_frame == 50
    np.testing.assert_allclose(second.mid_times_us[:, 0] - first.mid_times_us[:, -1], REF.frame_period_us)
    assert torch.equal(second.particle_movie, first.particle_movie)
    for key in first.params:
        assert torch.equal(first.params[key], second.params[key])
    step = (second.positions_um[:, 0] - first.positions_um[:, -1]).double()
    ratio = (step**2).mean(0) / (2 * d * REF.frame_period_us * 1e-6)
    n = step.shape[0]
    assert torch.all((ratio - 1).abs() < 4 * math.sqrt(2 / n)), ratio
