"""The run log (DESIGN §6): round trip, commit-after-data, crash safety, append, summaries."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from dle_stream.errors import DleStreamError
from dle_stream.events import EstimateFlag, WindowEstimate
from dle_stream.log_summary import CSV_COLUMNS, export_csv, render_summary, summarize_log
from dle_stream.zarr_log import ZarrLog, open_log

REPO = Path(__file__).resolve().parents[1]
BBOXES = np.array([[0, 0, 20, 20], [0, 20, 20, 20], [20, 0, 20, 20]])
ROIS = [{"name": "vessel", "bbox": [0, 0, 20, 40], "tiles": [0, 1]}]
ATTRS = {
    "software_version": "0.1.0",
    "estimator": "dle",
    "start_time": "2026-01-01T12:00:00+00:00",
    "scan_timing": {"pixel_size_um": 0.15, "dwell_us": 8.0},
    "window_length": 400,
    "window_hop": 50,
}


def estimate(w: int, n_tiles: int = 3) -> WindowEstimate:
    """A deterministic estimate for window ``w`` (values the tests can recompute)."""
    tiles = np.arange(n_tiles)
    return WindowEstimate(
        window=w, frame_start=50 * w, frame_stop=50 * w + 400,
        t_start_s=0.25 * w, t_stop_s=0.25 * w + 2.0, wall_time=1.7e9 + w,
        d_um2_s=(0.5 + 0.01 * w + 0.1 * tiles).astype(np.float32),
        sigma_um2_s=np.full(n_tiles, 0.05 + 0.001 * w, dtype=np.float32),
        flags=np.where(tiles == 2, EstimateFlag.LITTLE_INFORMATION, 0).astype(np.uint8),
    )


def new_log(path: Path, **kw) -> ZarrLog:
    return ZarrLog.create(path, tile_bboxes=BBOXES, rois=ROIS, attrs=ATTRS, **kw)


# ------------------------------------------------------------------ round trip
def test_round_trip_three_flushes(tmp_path):
    path = tmp_path / "run.zarr"
    with new_log(path, flush_interval_s=1e9) as log:
        for flush in range(3):
            for w in range(4 * flush, 4 * flush + 4):
                log.add_estimate(estimate(w))
            for f in range(10 * flush, 10 * flush + 10):
                log.add_frame(f, None if f == 3 else 0.005 * f, None if f == 4 else 100 + f)
            assert log.committed_windows == 4 * flush
            log.flush()
            assert log.committed_windows == 4 * flush + 4
            assert log.committed_frames == 10 * flush + 10
        log.add_gap(17, 2, "dropped_frames")

    view = open_log(path)
    assert (view.n_windows, view.n_frames, view.n_gaps, view.n_tiles) == (12, 30, 1, 3)
    expected = [estimate(w) for w in range(12)]
    np.testing.assert_array_equal(view.window, np.arange(12))
    np.testing.assert_array_equal(view.d, np.stack([e.d_um2_s for e in expected]))
    np.testing.assert_array_equal(view.sigma, np.stack([e.sigma_um2_s for e in expected]))
    np.testing.assert_array_equal(view.flags, np.stack([e.flags for e in expected]))
    np.testing.assert_array_equal(view.frame_start, [e.frame_start for e in expected])
    np.testing.assert_array_equal(view.frame_stop, [e.frame_stop for e in expected])
    np.testing.assert_array_equal(view.t_start_s, [e.t_start_s for e in expected])
    np.testing.assert_array_equal(view.t_stop_s, [e.t_stop_s for e in expected])
    np.testing.assert_array_equal(view.wall_time, [e.wall_time for e in expected])
    np.testing.assert_array_equal(view.tile_bbox, BBOXES)
    np.testing.assert_array_equal(view.frame_index, np.arange(30))
    assert math.isnan(view.timestamp_s[3]) and view.timestamp_s[5] == 0.025
    assert view.image_number[4] == -1 and view.image_number[5] == 105
    assert view.gap_records() == [{"frame_index": 17, "n_lost": 2, "kind": "dropped_frames"}]
    assert view.rois == ROIS
    for key, value in ATTRS.items():
        assert view.attrs[key] == value

    # plain zarr sees the same, with dimension names (xarray) and units
    group = zarr.open_group(str(path), mode="r")
    assert group["d"].metadata.dimension_names == ("window", "tile")
    assert group["flags"].metadata.dimension_names == ("window", "tile")
    assert group["frame_start"].metadata.dimension_names == ("window",)
    assert group["timestamp_s"].metadata.dimension_names == ("frame",)
    assert group["tile_bbox"].metadata.dimension_names == ("tile", "bbox")
    assert group["d"].attrs["units"] == "µm²/s"
    assert group["d"].dtype == np.float32 and group["flags"].dtype == np.uint8
    assert group["frame_index"].dtype == np.int64 and group["tile_bbox"].dtype == np.int32
    # the root document's consolidated metadata describes the committed rows exactly (written
    # with the committed counts, in the same write); no per-record data in attributes
    meta = json.loads((path / "zarr.json").read_text())
    shapes = {name: node["shape"] for name, node in meta["consolidated_metadata"]["metadata"].items()}
    assert shapes["d"] == [12, 3] and shapes["window"] == [12] and shapes["timestamp_s"] == [30]
    assert shapes["gaps"] == [1, 3] and shapes["log_likelihood"][:2] == [12, 3]
    assert meta["attributes"]["dle_stream"] == {"kind": "run_log", "format_version": 3}
    assert len(json.dumps(meta["attributes"])) < 2000


def test_flush_runs_by_itself_after_interval(tmp_path):
    log = new_log(tmp_path / "run.zarr", flush_interval_s=0.05)
    log.add_estimate(estimate(0))
    assert log.committed_windows == 0 and log.pending == 1
    time.sleep(0.06)
    log.add_estimate(estimate(1))
    assert log.committed_windows == 2 and log.pending == 0
    log.add_frame(0, 0.0, 0)
    log.close()
    assert open_log(tmp_path / "run.zarr").n_frames == 1
    with pytest.raises(ValueError):
        log.add_frame(1)


def test_wrong_tile_count_is_refused(tmp_path):
    log = new_log(tmp_path / "run.zarr")
    with pytest.raises(ValueError, match="3 tiles"):
        log.add_estimate(estimate(0, n_tiles=4))


# ------------------------------------------------------------------ commit after data
def test_count_is_written_after_the_data(tmp_path, monkeypatch):
    path = tmp_path / "run.zarr"
    log = new_log(path, flush_interval_s=1e9)
    for w in range(3):
        log.add_estimate(estimate(w))
        log.add_frame(w, 0.1 * w, w)
    log.flush()

    order = []
    real_write_rows = ZarrLog._write_rows
    monkeypatch.setattr(ZarrLog, "_write_rows",
                        lambda self, name, start, block: (order.append(name), real_write_rows(self, name, start, block)))

    def crash(self):
        order.append("commit")
        raise RuntimeError("killed between the data and the count")

    monkeypatch.setattr(ZarrLog, "_write_commit", crash)
    for w in range(3, 6):
        log.add_estimate(estimate(w))
        log.add_frame(w, 0.1 * w, w)
    with pytest.raises(RuntimeError):
        log.flush()
    assert order[-1] == "commit" and {"d", "sigma", "frame_index"} <= set(order[:-1])

    # the data of windows 3..5 is on disk (the arrays' own metadata says 6 rows), but a reader
    # sees only the committed ones: ours, and plain zarr through the root's consolidated metadata
    assert zarr.open_group(str(path), mode="r", use_consolidated=False)["d"].shape[0] == 6
    assert zarr.open_group(str(path), mode="r")["d"].shape[0] == 3
    view = open_log(path)
    assert view.n_windows == 3 and view.d.shape == (3, 3) and view.n_frames == 3
    np.testing.assert_array_equal(view.window, [0, 1, 2])

    # the buffer was kept: a retried flush writes the same rows once, then commits
    monkeypatch.undo()
    log.flush()
    view = open_log(path)
    np.testing.assert_array_equal(view.window, np.arange(6))
    np.testing.assert_array_equal(view.frame_index, np.arange(6))


# ------------------------------------------------------------------ SIGKILL
CHILD = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {repo!r})
    from dle_stream.zarr_log import ZarrLog
    from dle_stream.events import WindowEstimate
    log = ZarrLog.create({path!r}, tile_bboxes=np.array({bboxes!r}), attrs={{"estimator": "test"}},
                         flush_interval_s=1e9)
    w = 0
    while True:
        n = {n_tiles}
        log.add_estimate(WindowEstimate(w, 10 * w, 10 * w + 40, 0.1 * w, 0.1 * w + 0.4, 1e9 + w,
                                        np.full(n, w, np.float32), np.full(n, w + 0.5, np.float32),
                                        np.full(n, w % 32, np.uint8)))
        for f in range(10 * w, 10 * w + 10):
            log.add_frame(f, 0.01 * f, f)
        log.flush()
        print("committed", log.committed_windows, flush=True)
        w += 1
""")


def test_killed_at_any_moment_leaves_a_readable_log(tmp_path):
    rng = random.Random(1234)
    n_tiles = 40   # window chunks of 256 × 40: every flush rewrites a chunk holding committed rows
    bboxes = [[20 * (t // 8), 20 * (t % 8), 20, 20] for t in range(n_tiles)]
    for trial in range(10):
        path = tmp_path / f"run{trial}.zarr"
        script = tmp_path / "child.py"
        script.write_text(CHILD.format(repo=str(REPO), path=str(path), bboxes=bboxes, n_tiles=n_tiles))
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        assert first.startswith("committed"), first
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
        reported = [int(line.split()[1]) for line in [first, *rest.splitlines()] if line.startswith("committed")]

        view = open_log(path)   # opens, and holds every window the child reported
        assert view.n_windows >= reported[-1]
        n = view.n_windows
        np.testing.assert_array_equal(view.window, np.arange(n))
        np.testing.assert_array_equal(view.d, np.repeat(np.arange(n, dtype=np.float32)[:, None], n_tiles, 1))
        np.testing.assert_array_equal(view.sigma[:, 0], np.arange(n) + 0.5)
        np.testing.assert_array_equal(view.frame_stop, 10 * np.arange(n) + 40)
        np.testing.assert_array_equal(view.frame_index, np.arange(view.n_frames))
        group = zarr.open_group(str(path), mode="r")   # every array opens and reads with plain zarr
        for name in group.array_keys():
            group[name][:]

        if trial == 0:   # a resumed run continues after the committed rows
            with ZarrLog.create(path, tile_bboxes=np.array(bboxes), append=True) as log:
                assert log.window_offset == n
                for w in range(2):
                    e = estimate(w, n_tiles)
                    log.add_estimate(e)
            view = open_log(path)
            assert view.n_windows == n + 2
            np.testing.assert_array_equal(view.window, np.arange(n + 2))
            np.testing.assert_array_equal(view.d[n:], np.stack([estimate(w, n_tiles).d_um2_s for w in range(2)]))


# ------------------------------------------------------------------ existing stores, append
def test_existing_store_is_refused_without_a_flag(tmp_path):
    path = tmp_path / "run.zarr"
    new_log(path).close()
    with pytest.raises(DleStreamError, match="use overwrite=True or append=True") as info:
        new_log(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)

    log = new_log(path, overwrite=True)
    log.add_estimate(estimate(0))
    log.close()
    assert open_log(path).n_windows == 1

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(DleStreamError, match="not a dle-stream run log"):
        new_log(other, overwrite=True)
    assert (other / "cat.jpg").exists()


def test_append_continues_numbering(tmp_path):
    path = tmp_path / "run.zarr"
    with new_log(path) as log:
        for w in range(5):
            log.add_estimate(estimate(w))
        for f in range(600):
            log.add_frame(f, 0.005 * f, f)

    with new_log(path, append=True) as log:
        assert (log.committed_windows, log.window_offset, log.frame_offset) == (5, 5, 600)
        for w in range(3):                     # the resumed run counts from 0 again
            log.add_estimate(estimate(w))
        log.add_frame(0, 0.0, 0)
        log.add_gap(0, -1, "restart")

    view = open_log(path)
    np.testing.assert_array_equal(view.window, np.arange(8))
    np.testing.assert_array_equal(view.frame_start[5:], 600 + 50 * np.arange(3))
    assert view.frame_index[-1] == 600 and view.n_frames == 601
    assert view.gap_records() == [{"frame_index": 600, "n_lost": -1, "kind": "restart"}]
    assert [s["first_window_row"] for s in view.attrs["segments"]] == [0, 5]

    with pytest.raises(DleStreamError, match="tile geometry"):
        ZarrLog.create(path, tile_bboxes=BBOXES[:2], append=True)
    with pytest.raises(DleStreamError, match="exclude"):
        new_log(path, append=True, overwrite=True)


def test_run_attributes_keep_nan_and_refuse_what_json_cannot_hold(tmp_path):
    from dle_stream.timing import ScanTiming

    timing = ScanTiming.reference()
    attrs = {**ATTRS, "offset": math.nan, "gain": np.float32(2.0), "timing": timing, "when": Path("/data/x.tif")}
    ZarrLog.create(tmp_path / "run.zarr", tile_bboxes=BBOXES, rois=ROIS, attrs=attrs).close()
    view = open_log(tmp_path / "run.zarr")
    assert math.isnan(view.attrs["offset"])  # NaN stays NaN (not None): the root document allows it
    assert view.attrs["gain"] == 2.0 and view.attrs["when"] == "/data/x.tif"
    assert view.attrs["timing"] == timing.to_dict()  # an object with to_dict() is stored as its dict
    with pytest.raises(TypeError, match="object"):
        ZarrLog.create(tmp_path / "other.zarr", tile_bboxes=BBOXES, attrs={**ATTRS, "bad": object()})


def test_run_metadata_is_typed_and_keeps_other_keys(tmp_path):
    from dle_stream.log_attrs import RunMetadata

    meta = RunMetadata(software="dle-stream 0.1.0", mode="replay", source="rec.tif", estimator="dle",
                       scan_timing={"dwell_us": 8.0}, timing_warnings=("timing ASSUMED",), window_frames=400,
                       hop_frames=50, extra={"operator": "kk"})
    doc = meta.to_json()
    assert list(doc)[:4] == ["software", "mode", "source", "estimator"] and doc["operator"] == "kk"
    assert doc["model_card"] is None and doc["timing_warnings"] == ["timing ASSUMED"]
    ZarrLog.create(tmp_path / "run.zarr", tile_bboxes=BBOXES, attrs=doc).close()
    header = open_log(tmp_path / "run.zarr").header
    assert header.metadata == meta
    assert (header.mode, header.window_frames, header.hop_frames) == ("replay", 400, 50)
    # a log written from Python with keys of its own: typed fields None, the rest kept
    loose = RunMetadata.from_json(ATTRS)
    assert loose.estimator == "dle" and loose.mode is None and loose.extra["window_length"] == 400


# ------------------------------------------------------------------ bad paths
def test_unwritable_path_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DleStreamError, match="a writable location for the run log") as info:
        new_log(blocker / "run.zarr")
    assert str(blocker / "run.zarr") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_no_permission_is_a_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DleStreamError, match="a writable location for the run log"):
            new_log(locked / "run.zarr")
    finally:
        locked.chmod(0o700)


def test_open_log_refuses_missing_and_foreign_paths(tmp_path):
    with pytest.raises(DleStreamError, match="does not exist"):
        open_log(tmp_path / "nope.zarr")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(DleStreamError, match="not a dle-stream run log"):
        open_log(plain)
    junk = tmp_path / "junk.zarr"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    with pytest.raises(DleStreamError, match=str(junk)):
        open_log(junk)


# ------------------------------------------------------------------ summaries
def test_summary_combines_independent_windows_and_disjoint_tiles(tmp_path):
    """Windows logged as D ± σ (no likelihood) enter as Gaussians: the combination of
    independent ones is then the inverse-variance mean (worked by hand); windows that
    overlap a later one are left out, and disagreeing tiles are flagged."""
    path = tmp_path / "run.zarr"
    nan = float("nan")
    # frames: [0, 400), [400, 800), [450, 850) (overlaps the 2nd), [800, 1200)
    spans = [(0, 400), (400, 800), (450, 850), (800, 1200)]
    # tile 0: 1.0 ± 0.1, 9.0 ± 0.1 (overlapped: left out), 2.0 ± 0.2, NaN    tile 1: 3.0 ± 0.5 always
    d = [[1.0, 3.0, nan], [9.0, 3.0, nan], [2.0, 3.0, nan], [nan, 3.0, nan]]
    s = [[0.1, 0.5, nan], [0.1, 0.5, nan], [0.2, 0.5, nan], [nan, 0.5, nan]]
    fl = [[0, 0, 16], [0, 0, 16], [1, 0, 16], [16, 0, 16]]
    with new_log(path, d_max_um2_s=10.0) as log:
        for w, (a, b) in enumerate(spans):
            log.add_estimate(WindowEstimate(w, a, b, 0.0, 2.0, 0.0, np.array(d[w], np.float32),
                                            np.array(s[w], np.float32), np.array(fl[w], np.uint8)))
    rows = {r["name"]: r for r in summarize_log(path)}
    t0, t1, t2, roi = rows["tile 0"], rows["tile 1"], rows["tile 2"], rows["vessel"]

    # by hand: w = 100, 25 → D = (100·1 + 25·2)/125 = 1.2, σ = 125^-1/2
    assert t0["n_windows"] == 2
    assert t0["d_um2_s"] == pytest.approx(1.2, abs=0.005)
    assert t0["sigma_um2_s"] == pytest.approx(125 ** -0.5, rel=0.02)
    assert (t0["last_d_um2_s"], t0["last_sigma_um2_s"]) == pytest.approx((2.0, 0.2), rel=0.01)
    assert t0["flagged_share"] == pytest.approx(2 / 4)
    # three independent windows of 3.0 ± 0.5 → 3.0 ± 0.5/√3
    assert t1["n_windows"] == 3
    assert t1["d_um2_s"] == pytest.approx(3.0, abs=0.005) and t1["sigma_um2_s"] == pytest.approx(0.5 / 3 ** 0.5, rel=0.02)
    assert t1["flagged_share"] == 0 and not t1["disagree"]
    assert t2["n_windows"] == 0 and math.isnan(t2["d_um2_s"]) and t2["flagged_share"] == 1
    # ROI = tiles 0 (1.2 ± 0.089) and 1 (3.0 ± 0.29): far apart for their errors → flagged, with the range
    assert roi["kind"] == "roi" and roi["tiles"] == [0, 1]
    assert roi["disagree"] and roi["tile_range_um2_s"] == pytest.approx([1.2, 3.0], abs=0.01)

    from rich.console import Console
    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    console.print(render_summary(path))
    text = console.file.getvalue()
    assert "vessel" in text and re.search(r"tiles disagree: 1\.(19|20)\d*–3\.00", text) and "4 committed × 3 tiles" in text


def test_log_show_names_the_software_as_runs_record_it(tmp_path):
    """replay and run record ``software`` ("dle-stream X.Y"); log show printed only ``software_version``."""
    from rich.console import Console

    path = tmp_path / "run.zarr"
    ZarrLog.create(path, tile_bboxes=BBOXES, attrs={"software": "dle-stream 9.9.9", "estimator": "dle",
                                                     "source": "rec.tif"}).close()
    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    console.print(render_summary(path))
    text = console.file.getvalue()
    assert re.search(r"software\s+dle-stream 9\.9\.9", text), text
    assert re.search(r"source\s+rec\.tif", text), text


def test_log_show_prints_bracketed_paths_and_roi_names_literally(tmp_path):
    """Rich markup used to eat "[raw]" in a source path and "[b]" in an ROI name (issue 15 item 7)."""
    from rich.console import Console

    path = tmp_path / "data[raw]" / "run.zarr"
    path.parent.mkdir()
    ZarrLog.create(path, tile_bboxes=BBOXES, rois=[{"name": "a[b]c", "bbox": [0, 0, 20, 20], "tiles": [0]}],
                   attrs={"source": "data[raw]/rec.tif", "estimator": "dle"}).close()
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    console.print(render_summary(path))
    text = console.file.getvalue()
    assert "data[raw]/rec.tif" in text and "a[b]c" in text and str(path) in text, text


def test_export_csv(tmp_path):
    path = tmp_path / "run.zarr"
    with new_log(path) as log:
        for w in range(4):
            log.add_estimate(estimate(w))
    out = tmp_path / "run.csv"
    assert export_csv(path, out) == 4 * 3
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 12
    r = rows[3 * 2 + 1]                     # window 2, tile 1
    e = estimate(2)
    assert (int(r["window"]), int(r["tile"]), int(r["row"]), int(r["col"])) == (2, 1, 0, 20)
    assert (int(r["frame_start"]), int(r["frame_stop"])) == (100, 500)
    assert float(r["t_start_s"]) == 0.5 and float(r["wall_time"]) == 1.7e9 + 2
    assert np.float32(r["d_um2_s"]) == e.d_um2_s[1] and np.float32(r["sigma_um2_s"]) == e.sigma_um2_s[1]
    assert int(rows[3 * 2 + 2]["flags"]) == EstimateFlag.LITTLE_INFORMATION and int(r["flags"]) == 0
    assert r["d_um2_s"] == "0.62"           # float32 written as its shortest text

    with pytest.raises(DleStreamError, match="CSV"):
        export_csv(path, tmp_path / "missing_dir" / "x.csv")
