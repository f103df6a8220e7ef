"""The spot test (dle_stream/spots.py) and what it is for: a region without particles gets no number.

Expected values come from physics: pure Poisson noise holds no spot; a point source of a
few hundred photons above the background, blurred by the PSF, is a spot; a window without
particles carries no information about D, so any number of them added together must leave
the posterior where the prior is ("little information")."""

from __future__ import annotations

import numpy as np
import pytest

from dle_stream.likelihood import combine, posterior
from dle_stream.spots import frame_spot_features, particles_seen

PSF_PX = 1.4  # 0.21 µm at 0.15 µm pixels (the presets' PSF)


@pytest.mark.parametrize("background", [2.0, 20.0, 200.0])
def test_pure_noise_holds_no_spot(background):
    rng = np.random.default_rng(int(background))
    windows = rng.poisson(background, (40, 100, 20, 20)).astype(np.float32) - background  # offset removed
    assert not particles_seen(frame_spot_features(windows, PSF_PX)).any()


def test_a_point_source_in_a_few_frames_is_seen():
    """600 photons (the presets' mean brightness) spread by a Gaussian PSF of 1.4 px on a
    background of 100 photons per pixel, in 5 of 100 frames: seen (the matched filter's
    signal-to-noise ratio is 600 / (10 · √(4π) · 1.4) ≈ 12 against the threshold's 8); the
    same frames without it: not seen."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:20, 0:20]
    spot = 600.0 * np.exp(-((yy - 9.3) ** 2 + (xx - 11.6) ** 2) / (2 * PSF_PX**2)) / (2 * np.pi * PSF_PX**2)
    light = np.full((100, 20, 20), 100.0)
    light[[10, 30, 50, 70, 90]] += spot
    with_spot = rng.poisson(light).astype(np.float32)
    without = rng.poisson(np.full((100, 20, 20), 100.0)).astype(np.float32)
    seen = particles_seen(frame_spot_features(np.stack([with_spot, without]), PSF_PX))
    assert seen.tolist() == [True, False]


def test_a_region_without_particles_gets_no_number():
    """32 windows of pure background (no particle at all) combined: the shipped brain-qd-low
    gave D = 0.020 ± 0.002 µm²/s, not flagged — a confident number built from windows that
    each said almost nothing, all tilted the same way. Now: "little information", through
    the movie path and the stream's features alike."""
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.model_package import resolve_model
    from dle_stream.stream_estimators import DLEStream

    est = DiffusionEstimator.load(resolve_model("brain-qd-low"))
    rng = np.random.default_rng(0)
    movies = (rng.poisson(100.0, (32, est.card.window_frames, 20, 20)) - 100.0).astype(np.float32)
    ll, _ = est.window_log_likelihoods_of_movies(movies, est.timing)
    post = posterior(combine(ll, axis=0), est.grid, est.card.d_max_um2_s, n_windows=32)
    assert bool(post.little_information) and not bool(post.above_range)
    assert float(post.sigma) > 0.25 * est.card.d_max_um2_s  # (a flat prior on the range: 0.29·d_max)
    stream = DLEStream(est)
    feats = stream.features(movies[:4].reshape(-1, 20, 20)).reshape(4, est.card.window_frames, -1)
    np.testing.assert_allclose(stream.estimate(feats), ll[:4], atol=1e-6)
