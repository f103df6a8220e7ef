"""The streaming runner's mechanics: window schedule and content, gaps, ROIs, combination,
the Zarr log it writes, live skipping, and the dashboard (recorded console)."""

import io

import numpy as np
import pytest
from rich.console import Console

from dle_stream import DleStreamError, ScanTiming
from dle_stream.combine import DISAGREE_P, RunningCombination, disagreement_p, inverse_variance
from dle_stream.dashboard import Dashboard, sparkline
from dle_stream.errors import EstimatorChoiceError, ParameterError, RoiError
from dle_stream.events import EstimateFlag, FrameEvent
from dle_stream.likelihood import DGrid, gaussian_log_likelihood
from dle_stream.runner import StreamRunner
from dle_stream.tiling import Region, grid_layout, parse_roi, roi_layout
from dle_stream.zarr_log import ZarrLog, open_log

TIMING = ScanTiming(0.15, 8.0, 1508.0, 61652.0, 60, 40)


class FrameNumberEstimator:
    """A transparent estimator: the feature of a tile-frame is its mean (the frame
    number, in these tests); each window's first feature and the number of frames it
    spans are recorded in ``seen``, so window content and order can be checked exactly.
    Its likelihood is a Gaussian at D = ``d`` ± ``sigma`` µm²/s (range 0–10; ``d=None``:
    D = 2 + first frame / 20)."""

    name = "frame-number"
    tile_shape = (20, 20)
    window_frames = 40
    min_frames = 4
    d_range = (0.0, 10.0)
    d_max_um2_s = 10.0
    grid = DGrid()

    def __init__(self, d=3.0, sigma=1.0):
        self.encoded = 0
        self.seen = []
        self.d, self.sigma = d, sigma

    def features(self, tiles):
        self.encoded += len(tiles)
        return tiles.reshape(len(tiles), -1).mean(1, keepdims=True)

    def estimate(self, windows):
        first, last = windows[:, 0, 0], windows[:, -1, 0]
        self.seen.append((first.copy(), (last - first + 1).copy()))
        d = 2 + first / 20 if self.d is None else np.broadcast_to(np.asarray(self.d, float), first.shape)
        return gaussian_log_likelihood(d / 10.0, np.full(first.shape, self.sigma / 10.0), self.grid)


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
    assert len(est.seen) == len(out)
    for e, (first, span) in zip(out, est.seen):
        assert np.all(first == e.frame_start)  # the window starts with its first frame
        assert np.all(span == 40)  # and spans exactly 40 consecutive frames
        assert e.t_start_s == pytest.approx(e.frame_start * 0.061652)
        assert np.allclose(e.d_um2_s, 3.0, atol=0.01) and np.allclose(e.sigma_um2_s, 1.0, rtol=0.02)
        lo, hi = e.interval68_um2_s.T  # Gaussian: ±1σ
        assert np.allclose(lo, 2.0, atol=0.02) and np.allclose(hi, 4.0, atol=0.02)
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


def test_window_times_after_lost_images_are_acquisition_times():
    """Image n of a scan is acquired at n frame periods: after 100 images lost, a window's
    first frame (delivered as frame 50, image 150) started at 150 periods, not 50."""
    runner = StreamRunner(FrameNumberEstimator(), grid_layout(40, 60, 20, 20), TIMING, window=40, hop=20)
    numbers = list(range(50)) + list(range(150, 150 + 80))
    out = [e for ev in frames(130, image_numbers=numbers) for e in runner.process(ev)]
    period = TIMING.frame_period_us * 1e-6
    for e in out:
        image = numbers[e.frame_start]
        assert e.t_start_s == pytest.approx(image * period) and e.t_stop_s == pytest.approx((image + 40) * period)


def test_a_resumed_replay_times_its_windows_after_the_images_lost_before_it(tmp_path):
    """A replay continued from its log (killed, or a batch worker replaced) starts at a
    frame after a gap: its windows' times still count the images lost before that frame —
    also when continued twice, the second time after re-reading the gap (counted once)."""
    layout = grid_layout(40, 60, 20, 20)
    numbers = list(range(100)) + list(range(150, 150 + 300))  # 50 images lost before frame 100
    attrs = {"source": "test", "mode": "replay", "window_frames": 40, "hop_frames": 20}
    est = FrameNumberEstimator()
    period = TIMING.frame_period_us * 1e-6

    def run(stop, append):
        log = ZarrLog.create(tmp_path / "run.zarr", tile_bboxes=layout.bboxes, attrs=attrs, grid=est.grid,
                             d_max_um2_s=est.d_max_um2_s, append=append)
        start = log.resume_frame
        runner = StreamRunner(est, layout, TIMING, window=40, hop=20, images_lost_before=log.images_lost_before)
        runner.attach(log)
        out = [e for ev in frames(stop - start, start=start, image_numbers=numbers[start:stop])
               for e in runner.process(ev)]
        log.close()
        return start, out

    run(110, False)  # killed after frame 109: the gap at frame 100 is logged
    start, out = run(200, True)  # continued from before the gap: re-reads it
    assert start < 100 and out
    start, again = run(260, True)  # continued once more, after it
    assert start > 100 and again
    for e in out + again:
        assert e.t_start_s == pytest.approx(numbers[e.frame_start] * period)
    assert open_log(tmp_path / "run.zarr").n_gaps == 1


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
    est = FrameNumberEstimator(d=None, sigma=0.2)
    log = ZarrLog.create(tmp_path / "run.zarr", tile_bboxes=layout.bboxes, rois=[r.to_dict() for r in layout.regions],
                         attrs={"source": "test"}, grid=est.grid, d_max_um2_s=est.d_max_um2_s)
    runner = StreamRunner(est, layout, TIMING, window=40, hop=20, timing_assumed=True)
    runner.attach(log)
    runner.run(frames(100))
    log.close()
    view = open_log(tmp_path / "run.zarr")
    assert view.n_windows == 4 and view.n_frames == 100
    np.testing.assert_array_equal(np.asarray(view.frame_start), [0, 20, 40, 60])
    np.testing.assert_allclose(np.asarray(view.d)[:, 0], [2, 3, 4, 5], atol=0.01)
    # ±1σ of a Gaussian; σ is about one knot spacing here, so within 5 %
    np.testing.assert_allclose(view.array("hi68")[:, 0] - view.array("lo68")[:, 0], 0.4, rtol=0.05)
    ll = view.array("log_likelihood")
    assert ll.shape == (4, 6, est.grid.n) and np.all(ll.max(axis=-1) == 0)
    grid_um2_s = view.array("d_grid")
    assert grid_um2_s[-1] == np.inf and grid_um2_s[np.argmax(ll[2, 0])] == pytest.approx(4.0, abs=0.1)
    assert view.grid()[1] == 10.0
    assert np.all(np.asarray(view.flags) & EstimateFlag.TIMING_ASSUMED)
    np.testing.assert_array_equal(np.asarray(view.image_number), np.arange(100))


def _new_log(path, layout, est):
    return ZarrLog.create(path, tile_bboxes=layout.bboxes, rois=[r.to_dict() for r in layout.regions],
                          attrs={"source": "test"}, grid=est.grid, d_max_um2_s=est.d_max_um2_s)


class Probe:
    """A display-like sink: records what it saw of the log when each estimate reached it."""

    def __init__(self, log):
        self.log, self.committed_when_shown, self.gaps, self.finished = log, [], [], 0

    def attach(self, events):
        events.estimated.connect(lambda est: self.committed_when_shown.append((est.window, self.log.committed_windows)))
        events.gap.connect(self.gaps.append)
        events.finished.connect(lambda stats: setattr(self, "finished", stats.frames_in))


def test_the_log_commits_each_estimate_before_any_other_sink_sees_it(tmp_path):
    layout = grid_layout(40, 60, 20, 20)
    est = FrameNumberEstimator()
    log = _new_log(tmp_path / "run.zarr", layout, est)
    runner = StreamRunner(est, layout, TIMING, window=40, hop=20)
    probe = Probe(log)
    runner.attach(probe)  # attached first, still served after the log (RECORD_PRIORITY)
    runner.attach(log)
    numbers = list(range(50)) + list(range(53, 53 + 80))  # 3 images lost before frame 50
    runner.run(frames(130, image_numbers=numbers))
    # windows from frames 0, 50, 70, 90, each committed when shown
    assert probe.committed_when_shown == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [(g.frame_index, g.n_lost, g.kind) for g in probe.gaps] == [(50, 3, "gap")]
    assert probe.finished == 130 and log.pending == 0  # finished: the frames after the last window are written
    log.close()
    view = open_log(tmp_path / "run.zarr")
    assert view.n_frames == 130 and view.n_windows == 4
    assert [(g["frame_index"], g["n_lost"], g["kind"]) for g in view.gap_records()] == [(50, 3, "gap")]


def test_a_sink_error_reaches_the_caller_as_itself_and_stops_the_event(tmp_path, monkeypatch):
    layout = grid_layout(40, 60, 20, 20)
    est = FrameNumberEstimator()
    log = _new_log(tmp_path / "run.zarr", layout, est)
    runner = StreamRunner(est, layout, TIMING, window=40, hop=20)
    probe = Probe(log)
    runner.attach(log, probe)

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log, "_write_data", disk_full)
    with pytest.raises(DleStreamError, match="cannot write the run log"):
        for ev in frames(40):
            runner.process(ev)
    assert probe.committed_when_shown == []  # never shown, since it was not committed


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
    with pytest.raises(ParameterError, match="^hop=0: must be at least 1 frame") as info:
        StreamRunner(FrameNumberEstimator(), layout, TIMING, window=40, hop=0)
    assert info.value.parameter == "hop"
    with pytest.raises(EstimatorChoiceError, match="^window=2: ") as info:
        StreamRunner(FrameNumberEstimator(), layout, TIMING, window=2, hop=1)
    assert info.value.parameter == "window"


def test_rois_are_covered_by_model_tiles_inside_the_frame():
    layout = roi_layout(100, 100, 20, 20, [parse_roi("10,10,30,30", "a"), Region("b", (90, 90, 10, 10)),
                                           parse_roi("0,0,70,45", "c")])
    a, b, c = layout.regions
    assert len(a.tiles) == 1  # 30 px hold one whole 20-px tile per direction, centred
    assert layout.tiles[a.tiles[0]].bbox == (15, 15, 20, 20)
    assert len(c.tiles) == 3 * 2  # 70 × 45 px: 3 × 2 tiles, side by side
    for roi in (a, c):
        r0, c0, h0, w0 = roi.bbox
        boxes = [layout.tiles[i].bbox for i in roi.tiles]
        for r, col, h, w in boxes:
            assert r0 <= r and r + h <= r0 + h0 and c0 <= col and col + w <= c0 + w0
        covered = np.zeros((100, 100), int)
        for r, col, h, w in boxes:
            covered[r:r + h, col:col + w] += 1
        assert covered.max() == 1  # disjoint: no pixel in two tiles, so they combine as independent
    (tb,) = b.tiles  # an ROI at the corner, smaller than a tile: one tile, kept inside the frame
    assert layout.tiles[tb].bbox == (80, 80, 20, 20)
    with pytest.raises(RoiError, match="outside.*fix rois") as info:
        roi_layout(100, 100, 20, 20, [parse_roi("90,90,20,20")])
    assert info.value.parameter == "rois" and "--" not in str(info.value)
    with pytest.raises(RoiError, match="^roi='1,2,3': use x,y,w,h"):
        parse_roi("1,2,3")
    with pytest.raises(DleStreamError, match="smaller than"):
        grid_layout(10, 100, 20, 20)
    g = grid_layout(45, 70, 20, 20)
    assert len(g.tiles) == 6 and g.uncovered_px == 45 * 70 - 40 * 60


def test_inverse_variance_combination():
    d, s = inverse_variance(np.array([1.0, 2.0, np.nan]), np.array([1.0, 2.0, 1.0]))
    # weights 1 and 1/4: (1 + 0.5) / 1.25 = 1.2; σ = 1/√1.25
    assert d == pytest.approx(1.2) and s == pytest.approx(1 / np.sqrt(1.25))
    grid = DGrid()

    def gauss(d, s):  # µm²/s, range 0–10
        return gaussian_log_likelihood(np.asarray(d) / 10, np.asarray(s) / 10, grid)

    comb = RunningCombination(2, [[0, 1]], windows_apart=2, keep=2, grid=grid, d_max_um2_s=10.0)
    comb.add(gauss([4.0, 6.0], [1.0, 1.0]))
    comb.add(gauss([7.0, 7.0], [1.0, 1.0]))  # overlaps the first: not combined with it
    assert comb.tile_d[0] == pytest.approx(7.0, abs=0.01)
    comb.add(gauss([6.0, 4.0], [1.0, 1.0]))  # two windows after the first: combined
    # two Gaussian measurements 4 and 6 (σ 1): 5 ± 1/√2; two such tiles: 5 ± 1/2
    assert comb.tile_d[0] == pytest.approx(5.0, abs=0.01) and comb.tile_sigma[0] == pytest.approx(1 / np.sqrt(2), rel=0.02)
    assert comb.region_d[0] == pytest.approx(5.0, abs=0.01) and comb.region_sigma[0] == pytest.approx(0.5, rel=0.02)
    assert comb.tile_windows.tolist() == [2, 2] and not comb.region_disagree[0]


def test_disagreeing_tiles_are_flagged_and_homogeneous_ones_rarely():
    grid = DGrid()
    comb = RunningCombination(4, [[0, 1], [2, 3]], windows_apart=1, keep=1, grid=grid, d_max_um2_s=10.0)
    comb.add(gaussian_log_likelihood(np.array([0.30, 0.31, 0.30, 0.70]), np.full(4, 0.02), grid))
    assert comb.region_disagree.tolist() == [False, True]
    assert comb.region_tile_range[1] == pytest.approx([3.0, 7.0], abs=0.02)
    # false alarms on homogeneous data: 16 parts with random widths, one true D
    rng = np.random.default_rng(3)
    alarms = []
    for _ in range(400):
        s = rng.uniform(0.03, 0.2, 16)
        y = 0.5 + s * rng.standard_normal(16)
        alarms.append(disagreement_p(gaussian_log_likelihood(y, s, grid)) < DISAGREE_P)
    assert np.mean(alarms) <= 0.03  # the test's level is 1 %


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
    for expected in ("test source", "frame-number", "left", "right", "D = 3.0", "68 %", "camera stalled",
                     "3.00", "above the model's range", "true 0.3"):
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


def test_an_information_exponent_makes_k_windows_count_as_k_to_the_one_minus_beta():
    """Sixteen identical Gaussian windows of σ = 0.05·d_max: as exact likelihoods the
    combined σ is 0.05/√16; counted as 16^(1−β) windows (β = 0.5) it is 0.05/16^0.25 — in
    a tile's running estimate over time and in an ROI that adds 4 tiles' windows."""
    from dataclasses import replace

    from dle_stream.likelihood import posterior

    grid = DGrid()
    one = gaussian_log_likelihood(np.array([0.5]), np.array([0.05]), grid)[0]
    sixteen = 16 * one
    assert float(posterior(sixteen, grid, 1.0).sigma) == pytest.approx(0.05 / 4, rel=0.03)
    weak = replace(grid, combine_exponent=0.5)
    assert float(posterior(sixteen, weak, 1.0, n_windows=16).sigma) == pytest.approx(0.05 / 2, rel=0.03)
    # the running combination: 4 tiles × 4 non-overlapping windows, one ROI of all 4 tiles
    comb = RunningCombination(4, [[0, 1, 2, 3]], windows_apart=1, keep=4, grid=weak, d_max_um2_s=1.0)
    for _ in range(4):
        comb.add(np.tile(one, (4, 1)))
    assert comb.tile_windows.tolist() == [4, 4, 4, 4] and comb.region_windows.tolist() == [16]
    assert comb.tile_sigma == pytest.approx(np.full(4, 0.05 / 4 ** 0.25), rel=0.03)
    assert float(comb.region_sigma[0]) == pytest.approx(0.05 / 2, rel=0.03)
