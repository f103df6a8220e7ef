"""The streaming runner's mechanics: window schedule and content, gaps, ROIs, combination,
the Zarr log it writes, live skipping, and the dashboard (recorded console)."""

import io

import numpy as np
import pytest
from rich.console import Console

from dle_stream import DleStreamError, ScanTiming
from dle_stream.combine import RunningCombination, inverse_variance
from dle_stream.dashboard import Dashboard, sparkline
from dle_stream.events import EstimateFlag, FrameEvent
from dle_stream.runner import StreamRunner
from dle_stream.tiling import Region, grid_layout, parse_roi, roi_layout
from dle_stream.zarr_log import ZarrLog, open_log

TIMING = ScanTiming(0.15, 8.0, 1508.0, 61652.0, 60, 40)


class FrameNumberEstimator:
    """A transparent estimator: the feature of a tile-frame is its mean (the frame
    number, in these tests), and a window's 'D' is its first feature and 'σ' the number
    of frames it spans, so window content and order can be checked exactly."""

    name = "frame-number"
    tile_shape = (20, 20)
    window_frames = 40
    min_frames = 4
    d_range = (0.0, 1000.0)

    def __init__(self):
        self.encoded = 0

    def features(self, tiles):
        self.encoded += len(tiles)
        return tiles.reshape(len(tiles), -1).mean(1, keepdims=True)

    def estimate(self, windows):
        first, last = windows[:, 0, 0], windows[:, -1, 0]
        return first.astype(float), (last - first + 1).astype(float)


def frames(n, start=0, image_numbers=None, h=40, w=60):
    for i in range(start, start + n):
        num = image_numbers[i - start] if image_numbers is not None else i
        yield FrameEvent(np.full((h, w), float(num), np.float32), i, timestamp_s=i * 0.061652, image_number=num)


def test_windows_follow_the_hop_and_hold_their_frames_in_order():
    est = FrameNumberEstimator()
    layout = grid_layout(40, 60, 20, 20)
    runner = StreamRunner(est, layout, TIMING, window=40, hop=20)
    out = [e for ev in frames(130) for e in runner.process(ev)]
    assert [e.frame_start for e in out] == [0, 20, 40, 60, 80]
    assert [e.frame_stop for e in out] == [40, 60, 80, 100, 120]
    for e in out:
        assert np.all(e.d_um2_s == e.frame_start)  # the window starts with its first frame
        assert np.all(e.sigma_um2_s == 40)  # and spans exactly 40 consecutive frames
        assert e.t_start_s == pytest.approx(e.frame_start * 0.061652)
    assert est.encoded == 130 * len(layout.tiles)  # each tile-frame encoded exactly once
    assert runner.stats.windows_done == 5


def test_a_gap_restarts_the_windows_and_is_counted():
    est = FrameNumberEstimator()
    runner = StreamRunner(est, grid_layout(40, 60, 20, 20), TIMING, window=40, hop=20)
    numbers = list(range(50)) + list(range(53, 53 + 80))  # 3 images lost before frame 50
    out = [e for ev in frames(130, image_numbers=numbers) for e in runner.process(ev)]
    assert runner.stats.gaps == 1 and runner.stats.images_lost == 3
    assert [e.frame_start for e in out] == [0, 50, 70, 90]  # none spans frames 49→50
    assert any("gap" in w for w in runner.stats.warnings)


def test_a_timestamp_jump_is_a_gap_too():
    runner = StreamRunner(FrameNumberEstimator(), grid_layout(40, 60, 20, 20), TIMING, window=40, hop=20)
    events = list(frames(60))
    events[30:] = [FrameEvent(ev.frame, ev.index, ev.timestamp_s + 1.0, None) for ev in events[30:]]
    events[:30] = [FrameEvent(ev.frame, ev.index, ev.timestamp_s, None) for ev in events[:30]]
    for ev in events:
        runner.process(ev)
    assert runner.stats.gaps == 1 and runner.stats.images_lost == round(1.0 / 0.061652)


def test_late_frames_with_consecutive_image_numbers_are_not_a_gap():
    runner = StreamRunner(FrameNumberEstimator(), grid_layout(40, 60, 20, 20), TIMING, window=40, hop=20)
    events = list(frames(60))
    events[30:] = [FrameEvent(ev.frame, ev.index, ev.timestamp_s + 1.0, ev.image_number) for ev in events[30:]]
    for ev in events:
        runner.process(ev)
    assert runner.stats.gaps == 0


def test_runner_writes_every_window_and_frame_to_the_log(tmp_path):
    layout = grid_layout(40, 60, 20, 20)
    log = ZarrLog.create(tmp_path / "run.zarr", tile_bboxes=layout.bboxes, rois=[r.to_dict() for r in layout.regions],
                         attrs={"source": "test"})
    runner = StreamRunner(FrameNumberEstimator(), layout, TIMING, window=40, hop=20, log=log, timing_assumed=True)
    runner.run(frames(100))
    log.close()
    view = open_log(tmp_path / "run.zarr")
    assert view.n_windows == 4 and view.n_frames == 100
    np.testing.assert_array_equal(np.asarray(view.frame_start), [0, 20, 40, 60])
    np.testing.assert_array_equal(np.asarray(view.d)[:, 0], [0, 20, 40, 60])
    assert np.all(np.asarray(view.flags) & EstimateFlag.TIMING_ASSUMED)
    np.testing.assert_array_equal(np.asarray(view.image_number), np.arange(100))


def test_live_mode_skips_windows_when_behind_but_keeps_every_frame():
    est = FrameNumberEstimator()
    runner = StreamRunner(est, grid_layout(40, 60, 20, 20), TIMING, window=40, hop=20, live=True)
    for ev in frames(100):
        runner.process(ev, backlog=25 if ev.index == 59 else 0)
    assert runner.stats.windows_skipped == 1 and runner.stats.windows_done == 3
    assert est.encoded == 100 * 6


def test_bad_frames_and_flags_are_refused():
    layout = grid_layout(40, 60, 20, 20)
    runner = StreamRunner(FrameNumberEstimator(), layout, TIMING, window=40, hop=20)
    bad = np.zeros((40, 60), np.float32)
    bad[5, 5] = np.nan
    with pytest.raises(DleStreamError, match="NaN"):
        runner.process(FrameEvent(bad, 0))
    with pytest.raises(DleStreamError, match="image size"):
        runner.process(FrameEvent(np.zeros((20, 20), np.float32), 0))
    with pytest.raises(DleStreamError, match="--hop"):
        StreamRunner(FrameNumberEstimator(), layout, TIMING, window=40, hop=0)
    with pytest.raises(DleStreamError, match="--window"):
        StreamRunner(FrameNumberEstimator(), layout, TIMING, window=2, hop=1)


def test_rois_are_covered_by_model_tiles_inside_the_frame():
    layout = roi_layout(100, 100, 20, 20, [parse_roi("10,10,30,30", "a"), Region("b", (90, 90, 10, 10))])
    a, b = layout.regions
    assert len(a.tiles) == 4  # 30 px need two 20-px tiles per direction
    for i in a.tiles:
        r, c, h, w = layout.tiles[i].bbox
        assert 10 <= r and r + h <= 40 and 10 <= c and c + w <= 40
    (tb,) = b.tiles  # an ROI at the corner, smaller than a tile: one tile, kept inside the frame
    assert layout.tiles[tb].bbox == (80, 80, 20, 20)
    with pytest.raises(DleStreamError, match="outside"):
        roi_layout(100, 100, 20, 20, [parse_roi("90,90,20,20")])
    with pytest.raises(DleStreamError, match="smaller than"):
        grid_layout(10, 100, 20, 20)
    g = grid_layout(45, 70, 20, 20)
    assert len(g.tiles) == 6 and g.uncovered_px == 45 * 70 - 40 * 60


def test_inverse_variance_combination():
    d, s = inverse_variance(np.array([1.0, 2.0, np.nan]), np.array([1.0, 2.0, 1.0]))
    # weights 1 and 1/4: (1 + 0.5) / 1.25 = 1.2; σ = 1/√1.25
    assert d == pytest.approx(1.2) and s == pytest.approx(1 / np.sqrt(1.25))
    comb = RunningCombination(2, [[0, 1]], windows_apart=2, keep=2)
    comb.add(np.array([1.0, 3.0]), np.array([1.0, 1.0]))
    comb.add(np.array([5.0, 5.0]), np.array([1.0, 1.0]))  # overlaps the first: not combined with it
    assert comb.tile_d[0] == pytest.approx(5.0)
    comb.add(np.array([3.0, 1.0]), np.array([1.0, 1.0]))  # two windows after the first: combined
    assert comb.tile_d[0] == pytest.approx(2.0) and comb.tile_sigma[0] == pytest.approx(1 / np.sqrt(2))
    assert comb.region_d[0] == pytest.approx(2.0) and comb.region_sigma[0] == pytest.approx(0.5)


def test_dashboard_renders_map_table_and_warnings():
    layout = roi_layout(40, 60, 20, 20, [parse_roi("0,0,20,40", "left"), parse_roi("40,0,20,40", "right")])
    runner = StreamRunner(FrameNumberEstimator(), layout, TIMING, window=40, hop=20)
    buf = io.StringIO()
    console = Console(file=buf, width=100, height=60, force_terminal=True, color_system=None)
    with Dashboard(runner, source="test source", model="frame-number", mode="live", console=console,
                   truth={"left": 0.3}) as dash:
        for ev in frames(90):
            runner.process(ev)
        runner.warn("camera stalled for 2.0 s")
        dash.refresh(force=True)
    text = buf.getvalue()
    for expected in ("test source", "frame-number", "left", "right", "D ± σ", "camera stalled", "██", "0.3"):
        assert expected in text, expected
    assert sparkline([0, 1, 2, 3]) == "▁▃▆█"


def test_plain_mode_prints_one_line_per_window():
    layout = grid_layout(40, 60, 20, 20)
    runner = StreamRunner(FrameNumberEstimator(), layout, TIMING, window=40, hop=20)
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=False, color_system=None)
    with Dashboard(runner, source="s", model="m", mode="plain", console=console):
        for ev in frames(80):
            runner.process(ev)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("window")]
    assert len(lines) == 3 and "frames 0–40" in lines[0]
