"""The training prior: D beyond the range (for the grid output), steady-density movies mixed
with the paper's clouds, and bidirectional scans simulated at every tile position."""

import numpy as np
import torch

from dle_stream.timing import ScanTiming
from dle_stream.training.mixture import MixedSimulator
from dle_stream.training.priors import SimulatorPriors, get_preset
from dle_stream.training.simulator import Simulator


def test_d_beyond_the_range_is_drawn_in_the_stated_shares():
    priors = SimulatorPriors(d_max_um2_s=2.0, d_beyond=(0.3, 0.15), d_grid_top=2.0)
    sim = Simulator(priors, get_preset("low").timing, frames=4)
    d = sim.draw_d(20_000, torch.Generator().manual_seed(0)).numpy()
    shares = [np.mean(d <= 2.0), np.mean((d > 2.0) & (d <= 4.0)), np.mean(d > 4.0)]
    assert np.allclose(shares, [0.55, 0.30, 0.15], atol=0.015)  # binomial sd ≈ 0.0035
    assert d.min() >= 0 and d.max() <= 8.0
    inside = d[d <= 2.0]
    assert abs(np.mean(inside) - 1.0) < 0.03  # uniform on the range
    assert priors.operating().d_beyond == (0.0, 0.0) and priors.operating().box_fraction == 0.0


def test_a_share_of_movies_has_a_steady_density():
    priors = get_preset("low").priors.with_(box_fraction=0.5, particles="fixed", particles_max=60)
    mixed = MixedSimulator(priors, get_preset("low").timing, frames=40)
    g = torch.Generator().manual_seed(1)
    batches = [mixed.simulate(16, g) for _ in range(4)]
    steady = torch.cat([b.steady for b in batches]).numpy()
    assert 0.25 < steady.mean() < 0.75 and len(batches[0]) == 16
    # steady movies keep particles in view all the time; clouds start centred and spread, so
    # (at the high preset's D) a cloud's light fades while a steady field's does not
    fast = get_preset("high").priors.with_(d_min_um2_s=40.0, particles="fixed", particles_max=60)
    cloud = Simulator(fast, get_preset("high").timing, frames=200).simulate(8, seed=2)
    box = Simulator(fast.with_(density="box"), get_preset("high").timing, frames=200).simulate(8, seed=2)

    def visible_per_frame(batch):
        pos = batch.positions_um.numpy()
        w = 20 * batch.timing.pixel_size_um
        inside = (pos[..., 0] >= 0) & (pos[..., 0] < w) & (pos[..., 1] >= 0) & (pos[..., 1] < w)
        return inside.sum(axis=0)  # [T]

    b = visible_per_frame(box)
    assert b[-50:].mean() > 0.5 * b[:50].mean() > 0  # stationary
    c = visible_per_frame(cloud)
    peak = c.argmax()
    assert c[peak] > 3 * max(c[0], c[-1], 0.5)  # a cloud passes through view, then is gone


def test_bidirectional_training_movies_come_from_every_tile_position():
    bidi = ScanTiming(0.15, 8.0, 1508.0, 100_000.0, 100, 60, bidirectional=True)
    mixed = MixedSimulator(get_preset("low").priors, bidi, frames=8)
    batch = mixed.simulate(64, torch.Generator().manual_seed(3))
    r0, c0 = batch.offsets.numpy().T
    assert r0.min() >= 0 and r0.max() <= 60 - 20 and c0.min() >= 0 and c0.max() <= 100 - 20
    assert {0, 1} <= set((r0 % 2).tolist())  # both line directions start the tile
    assert c0.max() - c0.min() > 40  # spread along the line
    uni = MixedSimulator(get_preset("low").priors, get_preset("low").timing, frames=8)
    assert np.all(uni.simulate(8, torch.Generator().manual_seed(3)).offsets.numpy() == 0)
