"""What the user reads after combining: a number only where the data support one, and the
reason otherwise, on every path (dashboard, final summary, ``log show``, the API's tables).

Every likelihood here is an exact Gaussian one built by hand (no model): the disagreement
cases are far beyond their errors, so the expected words follow from the data alone."""

import io

import numpy as np
import pytest
from rich.console import Console

from dle_stream import report
from dle_stream.combine import RunningCombination
from dle_stream.likelihood import DGrid, gaussian_log_likelihood

D_MAX = 1.5
GRID = DGrid()


def gauss(d_um2_s, sigma_um2_s):
    return gaussian_log_likelihood(np.asarray(d_um2_s, float) / D_MAX, np.asarray(sigma_um2_s, float) / D_MAX, GRID)


def region_text(c, i=0):
    return report.estimate_text(c.region, i, spread=c.region_spread[i])


def test_an_roi_whose_d_changed_in_time_is_not_given_one_combined_number():
    """One tile (and an ROI of two tiles changing together): 0.3 µm²/s for four windows,
    then 1.2 — the tiles agree with each other, the windows do not."""
    for n_tiles in (1, 2):
        c = RunningCombination(n_tiles, [list(range(n_tiles))], windows_apart=1, keep=8, grid=GRID, d_max_um2_s=D_MAX)
        for k in range(8):
            c.add(gauss(np.full(n_tiles, 0.3 if k < 4 else 1.2), np.full(n_tiles, 0.1)))
        text = region_text(c)
        assert text.startswith("windows disagree"), text
        assert "D = " not in text and "±" not in text
        # the range of the windows' own values is shown: both periods inside it
        lo, hi = (float(v) for v in text.split(":", 1)[1].split("µm²/s")[0].replace("D changed over time,", "").split("–"))
        assert lo == pytest.approx(0.3, abs=0.05) and hi == pytest.approx(1.2, abs=0.05)


def test_tiles_that_disagree_win_over_above_range_and_above_range_tiles_are_not_shown_as_inside():
    # tiles at 0.3 and 2.7 (the range is 0–1.5): the ROI's combined posterior is above the range
    c = RunningCombination(3, [[0, 1, 2]], windows_apart=1, keep=8, grid=GRID, d_max_um2_s=D_MAX)
    for _ in range(4):
        c.add(gauss([0.3, 2.7, 2.7], [0.08, 0.08, 0.08]))
    text = region_text(c)
    assert text.startswith("tiles disagree"), text
    assert "0.3" in text and "above" in text
    # three tiles at 0.3, one far above the range: its value is not reported as ≈ 1.5 inside the range
    c = RunningCombination(4, [[0, 1, 2, 3]], windows_apart=1, keep=8, grid=GRID, d_max_um2_s=D_MAX)
    for _ in range(4):
        c.add(gauss([0.3, 0.3, 0.3, 2.7], [0.08, 0.08, 0.08, 0.4]))
    assert bool(c.tile.above_range[3])
    text = region_text(c)
    assert text.startswith("tiles disagree") and "above" in text, text
    lo, hi = c.region_tile_range[0]
    assert hi < 0.5, "a tile above the range counted as the largest value inside it"
    import re

    assert all(len(x) <= 3 for x in re.findall(r"\d\.(\d+)", text)), text  # decimals of the range, not of σ


def test_the_tile_map_marks_a_tile_whose_windows_disagree_even_above_the_range():
    """Two windows at 0.3 µm²/s, then six far above the range: the windows added read above
    the range, and the map must say first that they disagree; the ROI text shows both."""
    c = RunningCombination(1, [[0]], windows_apart=1, keep=8, grid=GRID, d_max_um2_s=D_MAX)
    for k in range(8):
        c.add(gauss([0.3 if k < 2 else 2.7], [0.15]))
    assert c.tile_disagree[0] and c.tile.above_range[0]
    assert report.cell_text(c.tile, 0, 7, bool(c.tile_disagree[0])).endswith(report.MARK_DISAGREE)
    text = region_text(c)
    assert text.startswith("windows disagree") and "0.30" in text and "above" in text, text
    import re

    assert all(len(x) <= 3 for x in re.findall(r"\d\.(\d+)", text)), text  # decimals of the range, not of σ


def test_homogeneous_windows_and_tiles_are_rarely_called_changed():
    """False alarms of both ROI tests (tiles, windows) on one true D: at most 5 %."""
    rng = np.random.default_rng(7)
    alarms = 0
    runs = 200
    for _ in range(runs):
        c = RunningCombination(4, [[0, 1, 2, 3]], windows_apart=1, keep=8, grid=GRID, d_max_um2_s=D_MAX)
        for _ in range(8):
            s = rng.uniform(0.05, 0.3, 4)
            c.add(gauss(0.7 + s * rng.standard_normal(4), s))
        alarms += c.region_spread[0] is not None
    assert alarms / runs <= 0.05


def write_log(path, windows):
    """A run log of non-overlapping 400-frame windows, each a list of per-tile (D, σ) µm²/s,
    written through the project's own ZarrLog (tiles side by side; ROI "a" = tile 0, "both" = all)."""
    import time

    from dle_stream.events import EstimateFlag, WindowEstimate
    from dle_stream.likelihood import posterior
    from dle_stream.zarr_log import ZarrLog

    n = len(windows[0])
    log = ZarrLog.create(path, tile_bboxes=np.array([[0, 20 * t, 20, 20] for t in range(n)]),
                         rois=[{"name": "a", "bbox": [0, 0, 20, 20], "tiles": [0]},
                               {"name": "both", "bbox": [0, 0, 20, 20 * n], "tiles": list(range(n))}],
                         attrs={"estimator": "test"}, grid=GRID, d_max_um2_s=D_MAX, flush_interval_s=0)
    for k, w in enumerate(windows):
        ll = gauss([d for d, _ in w], [s for _, s in w])
        post = posterior(ll, GRID, D_MAX)
        flags = np.zeros(n, np.uint8)
        flags[post.little_information] |= np.uint8(EstimateFlag.LITTLE_INFORMATION)
        flags[post.above_range] |= np.uint8(EstimateFlag.ABOVE_RANGE)
        log.add_estimate(WindowEstimate(k, 400 * k, 400 * (k + 1), 24.0 * k, 24.0 * (k + 1), time.time(),
                                        post.d.astype(np.float32), post.sigma.astype(np.float32), flags,
                                        np.stack([post.lo68, post.hi68], -1), np.stack([post.lo95, post.hi95], -1),
                                        post.p_above.astype(np.float32), post.lower95_wide.astype(np.float32),
                                        ll.astype(np.float32)))
    log.close()
    return path


def shown(renderable, width=240):
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def test_log_show_says_why_a_number_is_missing(tmp_path):
    """tile 0: D 0.3 then 1.2 (changed in time); tile 1: far above the range; one window of
    tile 2 that says little. ``log show`` must say so in each row — also in the last-window
    column — and never print a bare number for them."""
    from dle_stream.log_summary import render_summary, summarize_log

    windows = [[(0.3 if k < 4 else 1.2, 0.1), (2.7, 0.4), (0.7, 0.1)] for k in range(8)]
    windows[-1][2] = (0.8, 0.6)
    path = write_log(tmp_path / "run.zarr", windows)
    rows = {r["name"]: r for r in summarize_log(path)}
    assert rows["a"]["disagree"] and rows["tile 0"]["disagree"]
    out = shown(render_summary(path))
    roi_a = next(ln for ln in out.splitlines() if ln.strip("│┃ ").startswith("a "))
    assert "windows disagree" in roi_a and "D = " not in roi_a, roi_a
    tile1 = next(ln for ln in out.splitlines() if ln.strip("│┃ ").startswith("1 "))
    assert tile1.count("D > ") + tile1.count("> 2") >= 2, tile1  # last window and combined: both above
    tile2 = next(ln for ln in out.splitlines() if ln.strip("│┃ ").startswith("2 "))
    assert "little information" in tile2, tile2


def test_the_dashboard_roi_table_prints_an_estimate_note():
    """The live ROI table is a rich table: a note such as "[little information]" must be
    printed, not read as a style tag and dropped."""
    from dle_stream.dashboard import Dashboard
    from dle_stream.events import FrameEvent
    from dle_stream.runner import StreamRunner
    from dle_stream.tiling import grid_layout
    from dle_stream.timing import ScanTiming

    class Wide:
        name, tile_shape, window_frames, min_frames = "wide", (20, 20), 40, 4
        d_range, d_max_um2_s, grid = (0.0, D_MAX), D_MAX, GRID

        def features(self, tiles):
            return tiles.reshape(len(tiles), -1).mean(1, keepdims=True)

        def estimate(self, windows):
            return gauss(np.full(len(windows), 0.8), np.full(len(windows), 0.6))

    runner = StreamRunner(Wide(), grid_layout(20, 20, 20, 20), ScanTiming(0.15, 8.0, 1508.0, 61652.0, 20, 20),
                          window=40, hop=40)
    buf = io.StringIO()
    console = Console(file=buf, width=200, height=60, force_terminal=True, color_system=None)
    with Dashboard(runner, source="s", model="wide", mode="live", console=console) as dash:
        for i in range(40):
            runner.process(FrameEvent(np.zeros((20, 20), np.float32), i, timestamp_s=i * 0.061652, image_number=i))
        text = report.estimate_text(runner.combination.region, 0, spread=runner.combination.region_spread[0])
        assert "[little information]" in text
        table = shown(dash.roi_table())
    assert "little information" in table, table


def test_the_classic_and_rics_streams_combine_as_the_gaussians_they_are():
    """The tracker and RICS give D ± σ, turned into exact Gaussian likelihoods: two windows of
    the same D ± σ combine to σ/√2. The network's calibration (its windows count as K^(1−β)
    and its likelihood-ratio scale) describes the network, not them."""
    from dle_stream.stream_estimators import make_stream_estimator
    from dle_stream.timing import ScanTiming

    timing = ScanTiming(0.15, 8.0, 1508.0, 61652.0, 188, 40)
    for kind in ("classic", "rics"):
        est, _ = make_stream_estimator(kind, "brain-qd-low", timing)
        dmax = est.d_max_um2_s
        one = gaussian_log_likelihood(np.array([0.4]), np.array([0.05]), est.grid)
        c = RunningCombination(1, [[0]], windows_apart=1, keep=2, grid=est.grid, d_max_um2_s=dmax)
        c.add(one)
        c.add(one)
        assert float(c.tile_sigma[0]) == pytest.approx(0.05 * dmax / np.sqrt(2), rel=0.01), kind
        # exact Gaussians they are not (their combined intervals missed simulated truths): said
        from dle_stream.stream_estimators import calibration_note

        assert "not calibrated" in calibration_note(est, est.window_frames), kind


def test_window_tables_carry_the_d_above_x_bound_of_windows_above_the_range(tmp_path):
    """A window far above the range (2.7 ± 0.2 µm²/s; range 0–1.5) is reported "D > x": the
    per-window tables a user analyses (``log export``'s CSV, ``batch``'s results table) give
    x, a bound above the range's top that the truth exceeds, beside the flag."""
    import csv

    from dle_stream.batch import log_table
    from dle_stream.log_summary import export_csv

    path = write_log(tmp_path / "run.zarr", [[(2.7, 0.2), (0.5, 0.1)] for _ in range(3)])
    export_csv(path, tmp_path / "run.csv")
    rows = list(csv.DictReader(open(tmp_path / "run.csv", encoding="utf-8")))
    table = log_table(path, "rec.tif")
    for above in ([r for r in rows if r["tile"] == "0"], table[table.tile == 0].to_dict("records")):
        for r in above:
            x = float(r["lower95_um2_s"])
            assert 1.5 < x < 2.7, x
    for r in (r for r in rows if r["tile"] == "1"):
        assert r["lower95_um2_s"] == ""  # only where the window is above the range


def test_the_api_tables_give_no_number_where_the_parts_disagree():
    """The API's per-ROI table: an ROI of a tile at 0.3 and a tile far above the range has
    no D (NaN) but says what disagrees, with the tiles' values; a homogeneous ROI keeps its D."""
    from dle_stream.api import EstimateStream

    c = RunningCombination(3, [[0, 1], [2]], windows_apart=1, keep=8, grid=GRID, d_max_um2_s=D_MAX)
    for _ in range(4):
        c.add(gauss([0.3, 2.7, 0.6], [0.08, 0.08, 0.08]))
    cols = EstimateStream._estimate_columns(c.region, np.zeros(2, np.uint8), c.region_spread)
    assert np.isnan(cols["d_um2_s"][0]) and np.isnan(cols["lo95_um2_s"][0])
    assert cols["disagree"].tolist() == ["tiles", ""]
    assert cols["spread_lo_um2_s"][0] == pytest.approx(0.3, abs=0.03) and 1.5 < cols["spread_above_um2_s"][0] < 2.7
    assert cols["d_um2_s"][1] == pytest.approx(0.6, abs=0.03) and np.isnan(cols["spread_lo_um2_s"][1])


def test_the_dashboard_trend_leaves_out_numbers_it_does_not_show():
    """An ROI reported "D > x" (far above the range) gets no point in its trend: the
    sparkline plotted the capped median the text refuses to give."""
    from dle_stream.dashboard import Dashboard
    from dle_stream.events import FrameEvent
    from dle_stream.runner import StreamRunner
    from dle_stream.tiling import grid_layout
    from dle_stream.timing import ScanTiming

    class Fast:
        name, tile_shape, window_frames, min_frames = "fast", (20, 20), 40, 4
        d_range, d_max_um2_s, grid = (0.0, D_MAX), D_MAX, GRID

        def features(self, tiles):
            return tiles.reshape(len(tiles), -1).mean(1, keepdims=True)

        def estimate(self, windows):
            return gauss(np.full(len(windows), 2.7), np.full(len(windows), 0.1))

    runner = StreamRunner(Fast(), grid_layout(20, 20, 20, 20), ScanTiming(0.15, 8.0, 1508.0, 61652.0, 20, 20),
                          window=40, hop=40)
    console = Console(file=io.StringIO(), width=120, height=40, force_terminal=True, color_system=None)
    with Dashboard(runner, source="s", model="fast", mode="live", console=console) as dash:
        for i in range(80):
            runner.process(FrameEvent(np.zeros((20, 20), np.float32), i, timestamp_s=i * 0.061652, image_number=i))
        assert bool(runner.combination.region.above_range[0])
        assert len(dash.history[0]) == 2 and np.all(np.isnan(np.asarray(dash.history[0], dtype=float)))
