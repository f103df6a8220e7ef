"""Evenly spread training D values: the van der Corput quantiles, the prior's inverse CDF, and
the trainer's use of them (the cache holds no clusters or gaps of D for the head to learn)."""

import json

import numpy as np
import torch

from dle_stream.training.d_sequence import EvenQuantiles, van_der_corput
from dle_stream.training.priors import get_preset
from dle_stream.training.simulator import Simulator
from dle_stream.training.trainer import Trainer


def test_van_der_corput_is_the_bit_reversed_binary_fraction():
    # 1 = 0b1 → 0.1b = 1/2; 6 = 0b110 → 0.011b = 3/8; 11 = 0b1011 → 0.1101b = 13/16
    assert van_der_corput(0) == 0.0
    assert van_der_corput(1) == 0.5
    assert van_der_corput(6) == 3 / 8
    assert van_der_corput(11) == 13 / 16


def test_every_aligned_block_puts_one_quantile_in_each_stratum():
    seq = EvenQuantiles(shift=0.37, start=128)
    q = seq.next(64).numpy()
    strata = np.floor(((q - 0.37) % 1.0) * 64).astype(int)
    assert sorted(strata) == list(range(64))
    assert seq.index == 192


def test_the_latest_draws_of_a_refreshed_cache_stay_even_where_random_draws_cluster():
    """A ring buffer holds the latest 2048 of 5000 draws (not an aligned block): in bins of
    1/20 of the prior (≈ 0.1·d_max), even quantiles stay within a few draws of the expected
    102.4; independent draws scatter by about √102 ≈ 10."""
    even = EvenQuantiles(shift=0.61).next(5000).numpy()[-2048:]
    rand = np.random.default_rng(3).random(5000)[-2048:]
    dev_even = np.abs(np.histogram(even, bins=20, range=(0, 1))[0] - 102.4).max()
    dev_rand = np.abs(np.histogram(rand, bins=20, range=(0, 1))[0] - 102.4).max()
    assert dev_even <= 3
    assert dev_rand >= 3 * dev_even


def _ks_distance(samples, quantile_values):
    """Largest gap between the empirical CDF of ``samples`` and that of ``quantile_values``."""
    grid = np.sort(np.concatenate([samples, quantile_values]))
    a = np.searchsorted(np.sort(samples), grid, side="right") / samples.size
    b = np.searchsorted(np.sort(quantile_values), grid, side="right") / quantile_values.size
    return float(np.abs(a - b).max())


def test_the_quantile_function_inverts_the_distribution_the_simulator_draws_from():
    """d_quantile at evenly spaced quantiles has the distribution of draw_d (two-sample
    Kolmogorov distance; 200 000 draws: a few 0.001 by chance), for the training prior with
    movies beyond the range and for a log-uniform prior."""
    timing = get_preset("low").timing
    base = get_preset("low").priors
    for priors in (base.with_(d_beyond=(0.3, 0.15), d_grid_top=2.0),
                   base.with_(d_prior="log-uniform", d_min_um2_s=0.01)):
        sim = Simulator(priors, timing, 20, 20, 8)
        drawn = sim.draw_d(200_000, torch.Generator().manual_seed(0)).numpy()
        at_q = sim.d_quantile(torch.arange(20_000, dtype=torch.float64).add(0.5).div(20_000)).numpy()
        assert _ks_distance(drawn, at_q) < 0.01
        assert at_q.min() >= priors.d_min_um2_s
    wide = Simulator(base.with_(d_beyond=(0.3, 0.15), d_grid_top=2.0), timing, 20, 20, 8)
    d = wide.d_quantile(torch.tensor([0.0, 0.549, 0.56, 0.86, 0.999999]))
    assert 0 <= d[0] < 0.01 and 1.49 < d[1] <= 1.5          # 55 % of the mass inside [0, 1.5]
    assert 1.5 < d[2] < 3.0 and 3.0 < d[3] < 6.0 and d[4] < 6.0 + 1e-3


def _trainer(tmp_path, **kw):
    from dle_stream.model import ModelConfig
    from dle_stream.training.trainer import TrainConfig

    preset = get_preset("low")
    config = TrainConfig(name="even", priors=preset.priors, timing=preset.timing, out=tmp_path, frames=100,
                         architecture=ModelConfig(temporal_channels=16, head_hidden=32), seed=0, steps=1, **kw)
    return Trainer(config, log=lambda *a: None)


def test_the_trainer_draws_group_and_movie_d_values_evenly_and_resumes_the_sequence(tmp_path):
    t = _trainer(tmp_path / "a", d_draws="even")
    groups = np.array([float(t._draw_d(1, "group")[0]) for _ in range(128)])
    quantiles = np.floor(128 * np.array([_prior_cdf(t, d) for d in groups])).astype(int)
    assert len(set(quantiles.tolist())) >= 120              # one group per 1/128 of the prior, up to rounding
    singles = t._draw_d(256, "single").numpy()
    assert np.abs(np.histogram([_prior_cdf(t, d) for d in singles], bins=16, range=(0, 1))[0] - 16).max() <= 1
    # the sequence continues after a checkpoint: the state is plain JSON and restores the next draw
    saved = json.loads(json.dumps(t.state["even_d"]))
    nxt = float(t._draw_d(1, "group")[0])
    again = _trainer(tmp_path / "b", d_draws="even")
    again.state["even_d"] = saved
    assert float(again._draw_d(1, "group")[0]) == nxt
    # random draws: the simulator's own (None for single movies)
    assert _trainer(tmp_path / "c", d_draws="random")._draw_d(4, "single") is None
    assert _trainer(tmp_path / "d").cfg.d_draws == "random"  # the default


def _prior_cdf(t, d):
    """The training prior's CDF at d, by bisection on its quantile function."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(t.sim.d_quantile(torch.tensor([mid]))[0]) < d:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
