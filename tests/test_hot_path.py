"""The streaming hot path gives the same numbers as the straightforward code it replaced:
tiles cut in one vectorised copy, pending tile-frames cut straight into one block, the
window a view into a doubled ring buffer (no copy per hop), the window handed to the
network without a copy, highest-density intervals from one sort for both levels, and
the network's chunks run side by side on worker threads.

Each test compares with the plain version (the former code, kept here as the reference)
bit for bit, except the network's threading, which agrees to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from dle_stream import ScanTiming
from dle_stream.events import FrameEvent
from dle_stream.likelihood import DGrid, _cdf, _hpd, _hpd_levels, combine, gaussian_log_likelihood, posterior
from dle_stream.runner import StreamRunner
from dle_stream.tiling import Tile, TileLayout, grid_layout, parse_roi, roi_layout
from dle_stream.windows import RollingWindows


def cut_each(layout: TileLayout, frame: np.ndarray) -> np.ndarray:
    """The former TileLayout.cut_all: one slice per tile, stacked."""
    return np.stack([t.cut(frame) for t in layout.tiles])


@pytest.mark.parametrize("layout", [
    grid_layout(512, 512, 20, 20),  # the full grid: a reshaped view
    grid_layout(45, 30, 20, 20),  # leftover pixels at the edges
    TileLayout(100, 100, [Tile(5, 7, 20, 20), Tile(5, 27, 20, 20), Tile(25, 7, 20, 20), Tile(25, 27, 20, 20)], []),
    roi_layout(512, 512, 20, 20, [parse_roi("a=3,5,100,70"), parse_roi("b=200,200,33,90")]),  # a gather
    TileLayout(60, 60, [Tile(0, 20, 20, 20), Tile(0, 0, 20, 20)], []),  # not in raster order
], ids=["grid512", "grid-edges", "offset-grid", "rois", "unordered"])
def test_cut_all_equals_cutting_each_tile(layout):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 60_000, (layout.frame_height, layout.frame_width)).astype(np.uint16)
    expected = cut_each(layout, frame)
    got = layout.cut_all(frame)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    out = np.full(expected.shape, -1.0, np.float32)
    assert layout.cut_all(frame, out=out) is out and np.array_equal(out, expected.astype(np.float32))
    layout.tiles.reverse()  # the layout changed: the cached plan follows it
    assert np.array_equal(layout.cut_all(frame), cut_each(layout, frame))


def test_ring_buffer_view_is_the_last_frames_in_order():
    windows = RollingWindows(n_tiles=3, window=5, hop=2)
    history: list[np.ndarray] = []
    rng = np.random.default_rng(1)
    for k in range(23):
        if k == 11:  # a gap: start afresh
            windows.restart()
            history.clear()
        feats = rng.normal(size=(3, 4)).astype(np.float32)
        windows.push(feats, k)
        history.append(feats)
        if windows.filled >= 5:
            expected = np.stack(history[-5:], axis=1)  # [tiles, T, features] in time order
            assert np.array_equal(windows.current(), expected)


def former_hpd(p, dens, x, level):
    order = np.argsort(-dens, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    cum = np.cumsum(sorted_p, axis=1)
    keep_sorted = (cum - sorted_p) < level
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    xs = np.where(keep, x[None, :], np.nan)
    return np.nanmin(xs, axis=1), np.nanmax(xs, axis=1)


def former_cdf(density, x):
    steps = 0.5 * (density[:, 1:] + density[:, :-1]) * np.diff(x)[None]
    return np.concatenate([np.zeros((density.shape[0], 1)), np.cumsum(steps, axis=1)], axis=1)


def test_interval_and_cdf_helpers_equal_the_former_ones_bit_for_bit():
    grid = DGrid()
    rng = np.random.default_rng(2)
    ll = np.concatenate([gaussian_log_likelihood(rng.uniform(0, 2.5, 300), rng.uniform(0.003, 0.8, 300), grid),
                         rng.normal(0, 4, (50, grid.n)), np.zeros((2, grid.n))])
    fine = ll[:, :-1] @ grid.interp_matrix
    dens = np.exp(fine - fine.max(axis=1, keepdims=True))
    x = grid.fine
    inr = x <= 1.0 + 1e-12
    p = dens[:, inr] / dens[:, inr].sum(axis=1, keepdims=True)
    assert np.array_equal(_cdf(dens, x), former_cdf(dens, x))
    assert np.array_equal(_cdf(dens[:, inr], x[inr]), former_cdf(dens[:, inr], x[inr]))
    both = _hpd_levels(p, dens[:, inr], x[inr], (0.6827, 0.9545))
    for level, (lo, hi) in zip((0.6827, 0.9545), both):
        lo0, hi0 = former_hpd(p, dens[:, inr], x[inr], level)
        assert np.array_equal(lo, lo0) and np.array_equal(hi, hi0)
        assert all(np.array_equal(a, b) for a, b in zip(_hpd(p, dens[:, inr], x[inr], level), (lo0, hi0)))
    nan_rows = np.full((2, inr.sum()), np.nan)  # no point kept: NaN, as nanmin gave
    assert np.isnan(_hpd_levels(nan_rows, nan_rows, x[inr], (0.68,))[0][0]).all()


def test_posterior_is_unchanged_on_pinned_values():
    """Posterior summaries of fixed log-likelihoods, pinned to the values the former code
    gave (a change of summation order would move them in the last digits)."""
    grid = DGrid()
    ll = gaussian_log_likelihood(np.array([0.0, 0.2, 0.5, 0.95, 1.6]), np.array([0.05, 0.1, 0.3, 0.02, 0.2]), grid)
    ll = np.concatenate([ll, combine(ll[1:3][:, None], axis=0)])
    post = posterior(ll, grid, 1.5)
    np.testing.assert_allclose(post.d, PINNED_D, rtol=1e-12)
    np.testing.assert_allclose(post.hi68, PINNED_HI68, rtol=1e-12)
    np.testing.assert_allclose(post.p_above, PINNED_P_ABOVE, rtol=1e-9, atol=1e-15)


# from the former code (commit 383be97), µm²/s for d_max 1.5 µm²/s
PINNED_D = np.array([0.05056782469962021, 0.30422768293768904, 0.7499603061409417, 1.424792682394468,
                     1.4384438310321692, 0.34631505250951844])
PINNED_HI68 = np.array([0.07527669270833333, 0.44437662760416663, 1.1416422526041665, 1.4535319010416667, 1.5,
                        0.4856974283854167])
PINNED_P_ABOVE = np.array([1.3975112922958723e-25, 1.899541078090689e-16, 0.01714392825599728,
                           0.0016992227813549896, 0.9957785285254671, 7.157361244708209e-17])


def test_the_network_reads_a_strided_window_as_a_contiguous_one(small_model):
    from dle_stream.estimator import DiffusionEstimator

    est = DiffusionEstimator.load(small_model)
    rng = np.random.default_rng(3)
    windows = RollingWindows(n_tiles=70, window=40, hop=10)
    for k in range(57):
        windows.push(rng.normal(size=(70, est.model.config.latent)).astype(np.float32), k)
    view = windows.current()
    assert not view.flags["C_CONTIGUOUS"]
    assert np.array_equal(est.window_log_likelihoods(view), est.window_log_likelihoods(np.ascontiguousarray(view)))


class Frames:
    """Features: each tile-frame's value (the frame's image number); records every window."""

    name, tile_shape, window_frames, min_frames, d_max_um2_s = "frames", (20, 20), 12, 2, 10.0
    grid = DGrid()

    def __init__(self):
        self.seen: list[np.ndarray] = []
        self.batches: list[int] = []

    def features(self, tiles):
        self.batches.append(len(tiles))
        return tiles[:, :1, 0].astype(np.float32)

    def estimate(self, windows):
        self.seen.append(windows[:, :, 0].copy())
        return gaussian_log_likelihood(np.full(len(windows), 0.3), np.full(len(windows), 0.1), self.grid)


def test_pending_frames_are_encoded_in_order_across_a_gap_and_a_dtype_change():
    """Frames wait in the pending block (encode_every = 4); a gap in the middle of a batch
    drops the frames before it, and the frame after the gap is the first of the next
    window; frames of another dtype start a new block."""
    est = Frames()
    timing = ScanTiming(0.15, 8.0, 1508.0, 130000.0, 60, 40)
    runner = StreamRunner(est, grid_layout(40, 60, 20, 20), timing, window=12, hop=3, encode_every=4)
    numbers = [*range(0, 22), *range(30, 60)]  # 8 images (22–29) lost before the frame at index 22
    for k, n in enumerate(numbers):
        dtype = np.uint16 if k < 40 else np.float64
        frame = np.full((40, 60), n, dtype)
        runner.process(FrameEvent(frame, k, image_number=n))
    assert runner.stats.gaps == 1 and runner.stats.images_lost == 8
    assert len(est.seen) == runner.stats.windows_done
    for window in est.seen:
        row = window[0]
        assert np.array_equal(row, np.arange(row[0], row[0] + 12)) and np.all(window == row)  # consecutive, all tiles
        assert row[0] >= 30 or row[-1] <= 21  # never across the gap
    firsts = [int(w[0, 0]) for w in est.seen]
    assert firsts == [0, 3, 6, 9, 30, 33, 36, 39, 42, 45, 48]
    # every tile-frame encoded once, except frame 21's: it was waiting (with encode_every 4)
    # when the gap came, and a window never mixes frames across a gap
    assert sum(est.batches) == (len(numbers) - 1) * 6


def test_estimator_results_do_not_depend_on_threads_or_batches(small_model):
    """The network runs chunks side by side on worker threads (single-threaded ops each):
    latents and window log-likelihoods agree for any batching and thread count (to float32
    rounding: torch's CPU kernels round differently for some batch sizes and thread counts,
    as they did before), and the process-wide torch thread count is left as the caller set it."""
    import torch

    from dle_stream.estimator import DiffusionEstimator

    before = torch.get_num_threads()
    est = DiffusionEstimator.load(small_model)
    rng = np.random.default_rng(4)
    frames = rng.poisson(100, (2500, 20, 20)).astype(np.uint16)
    latents = rng.normal(size=(150, 40, est.model.config.latent)).astype(np.float32)
    try:
        torch.set_num_threads(1)
        one_z, one_ll = est.encode(frames), est.window_log_likelihoods(latents)
        torch.set_num_threads(2)
        two_z, two_ll = est.encode(frames), est.window_log_likelihoods(latents)
        assert torch.get_num_threads() == 2
        same = {"rtol": 1e-5, "atol": 1e-6}
        np.testing.assert_allclose(one_z, two_z, **same)
        np.testing.assert_allclose(one_ll, two_ll, **same)
        parts = np.concatenate([est.encode(frames[:7]), est.encode(frames[7:1300]), est.encode(frames[1300:])])
        np.testing.assert_allclose(parts, two_z, **same)
        np.testing.assert_allclose(np.concatenate([est.window_log_likelihoods(latents[:3]),
                                                   est.window_log_likelihoods(latents[3:])]), two_ll, **same)
    finally:
        torch.set_num_threads(before)
