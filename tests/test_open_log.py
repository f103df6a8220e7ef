"""The log as data (issue 15, item 10): ``dle_stream.open_log`` gives an xarray Dataset of the
committed windows with time and tile coordinates; plain ``xarray.open_zarr`` opens a log
without a warning and sees committed rows only; the log's attributes have one typed schema
(:mod:`dle_stream.log_attrs`) and logs of format 2 still read."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import dle_stream as dle
from dle_stream.errors import DleStreamError
from dle_stream.events import EstimateFlag, WindowEstimate
from dle_stream.log_attrs import LOG_FORMAT_VERSION, LogAttrs, LogRoi, LogSegment
from dle_stream.zarr_log import ZarrLog
from dle_stream.zarr_log import open_log as open_log_view

#: xarray is optional (not a dependency): the tests that need it are skipped without it
needs_xarray = pytest.mark.skipif(importlib.util.find_spec("xarray") is None,
                                  reason="xarray is not installed (pip install xarray)")

REPO = Path(__file__).resolve().parents[1]
#: 4 tiles of 20×20 px in a 40×40 px frame: row, col, height, width
BBOXES = np.array([[0, 0, 20, 20], [0, 20, 20, 20], [20, 0, 20, 20], [20, 20, 20, 20]])
ROIS = [{"name": "vessel", "bbox": [0, 0, 20, 40], "tiles": [0, 1]},
        {"name": "frame", "bbox": [0, 0, 40, 40], "tiles": [0, 1, 2, 3]}]
N_TILES = len(BBOXES)


def estimate(w: int) -> WindowEstimate:
    """Window ``w``: 400 frames every 50, 0.05 s per frame; values the tests recompute."""
    tiles = np.arange(N_TILES)
    d = (0.5 + 0.01 * w + 0.1 * tiles).astype(np.float32)
    return WindowEstimate(
        window=w, frame_start=50 * w, frame_stop=50 * w + 400, t_start_s=2.5 * w, t_stop_s=2.5 * w + 20.0,
        wall_time=1.7e9 + w, d_um2_s=d, sigma_um2_s=np.full(N_TILES, 0.05, dtype=np.float32),
        flags=np.where(tiles == 3, EstimateFlag.ABOVE_RANGE, 0).astype(np.uint8),
        interval68_um2_s=np.stack([d - 0.05, d + 0.05], axis=1), interval95_um2_s=np.stack([d - 0.1, d + 0.1], axis=1),
        p_above=np.where(tiles == 3, 0.95, 0.01).astype(np.float32),
    )


def write_log(path: Path, n_windows: int, n_frames: int = 0) -> None:
    with ZarrLog.create(path, tile_bboxes=BBOXES, rois=ROIS, attrs={"estimator": "dle", "mode": "replay"},
                        flush_interval_s=1e9) as log:
        for w in range(n_windows):
            log.add_estimate(estimate(w))
        for f in range(n_frames):
            log.add_frame(f, 0.05 * f, 1000 + f)
        log.add_gap(7, 2, "dropped_frames")


def open_zarr_strictly(path: Path):
    """Plain ``xarray.open_zarr(path)`` with every warning turned into an error."""
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(str(path))


# ------------------------------------------------------------------ open_log
@needs_xarray
def test_open_log_gives_the_windows_with_time_and_tile_coordinates(tmp_path):
    import xarray as xr

    path = tmp_path / "run.zarr"
    write_log(path, 6, n_frames=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = dle.open_log(path)
    assert isinstance(ds, xr.Dataset)
    assert dict(ds.sizes) == {"window": 6, "tile": 4, "frame": 30, "gap": 1, "roi": 2, "d_grid": ds.sizes["d_grid"]}
    want = [estimate(w) for w in range(6)]
    np.testing.assert_array_equal(ds.d.values, np.stack([e.d_um2_s for e in want]))
    np.testing.assert_allclose(ds.lo68.values, np.stack([e.interval68_um2_s[:, 0] for e in want]), rtol=1e-6)
    np.testing.assert_allclose(ds.hi95.values, np.stack([e.interval95_um2_s[:, 1] for e in want]), rtol=1e-6)
    np.testing.assert_array_equal(ds.sigma.values, 0.05 * np.ones((6, 4), dtype=np.float32))
    np.testing.assert_array_equal(ds.p_above.values[:, 3], np.float32(0.95))
    assert ds.flags.values[0, 3] == EstimateFlag.ABOVE_RANGE and ds.flags.values[0, 0] == 0
    assert "above_range" in ds.flags.attrs["flag_meanings"].split()
    assert ds.d.attrs["units"] == "µm²/s" and ds.d.dims == ("window", "tile")

    # window coordinates: frames and acquisition time; time_s (the window's middle) is indexed
    np.testing.assert_array_equal(ds.frame_start.values, 50 * np.arange(6))
    np.testing.assert_array_equal(ds.time_s.values, 2.5 * np.arange(6) + 10.0)
    np.testing.assert_array_equal(ds.segment.values, np.zeros(6))
    np.testing.assert_array_equal(ds.d.sel(time_s=slice(12, 16)).window.values, [1, 2])
    assert float(ds.d.sel(time_s=15.0, tile=1)) == pytest.approx(0.62)
    # tile coordinates: boxes in px, ROI membership
    np.testing.assert_array_equal(np.stack([ds.row, ds.col, ds.height, ds.width], axis=1), BBOXES)
    assert ds.row.attrs["units"] == "px"
    np.testing.assert_array_equal(ds.d.sel(tile=ds.in_roi.sel(roi="vessel")).tile.values, [0, 1])
    assert ds.in_roi.sel(roi="frame").values.all()
    assert ds.roi_height.sel(roi="vessel") == 20
    # frames and gaps
    np.testing.assert_array_equal(ds.image_number.values, 1000 + np.arange(30))
    assert float(ds.timestamp_s.sel(frame_index=4)) == pytest.approx(0.2)
    assert (int(ds.gap_frame_index[0]), int(ds.gap_n_lost[0]), str(ds.gap_kind[0].values)) == (7, 2, "dropped_frames")
    # the run's metadata
    assert ds.attrs["estimator"] == "dle" and ds.attrs["committed_windows"] == 6


@needs_xarray
def test_open_log_of_an_empty_log(tmp_path):
    write_log(tmp_path / "run.zarr", 0)
    ds = dle.open_log(tmp_path / "run.zarr")
    assert ds.sizes["window"] == 0 and ds.sizes["tile"] == 4 and ds.d.shape == (0, 4)


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_open_log import estimate, BBOXES, ROIS
    from dle_stream.zarr_log import ZarrLog
    log = ZarrLog.create({path!r}, tile_bboxes=BBOXES, rois=ROIS, attrs={{"estimator": "dle"}}, flush_interval_s=1e9)
    for w in range(3):
        log.add_estimate(estimate(w))
    log.flush()
    # the next flush writes the data of windows 3 and 4, then dies before its commit
    ZarrLog._write_commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    for w in range(3, 5):
        log.add_estimate(estimate(w))
    log.flush()
""")


def test_a_writer_killed_in_a_flush_shows_no_half_written_window(tmp_path):
    path = tmp_path / "run.zarr"
    code = CHILD.format(repo=str(REPO), tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    # the arrays on disk hold 5 rows; only the 3 committed are shown, by open_log and by plain xarray
    assert zarr.open_group(str(path), mode="r", use_consolidated=False)["d"].shape[0] == 5
    assert zarr.open_group(str(path), mode="r")["d"].shape[0] == 3      # plain zarr: the consolidated shapes
    assert open_log_view(path).n_windows == 3
    if importlib.util.find_spec("xarray") is None:
        return
    ds = dle.open_log(path)
    np.testing.assert_array_equal(ds.window.values, [0, 1, 2])
    np.testing.assert_array_equal(ds.d.values, np.stack([estimate(w).d_um2_s for w in range(3)]))
    plain = open_zarr_strictly(path)
    assert plain.sizes["window"] == 3
    np.testing.assert_array_equal(plain.d.values, ds.d.values)


# ------------------------------------------------------------- plain xarray
@needs_xarray
def test_plain_xarray_open_zarr_gives_no_warning_and_the_same_numbers(tmp_path):
    path = tmp_path / "run.zarr"
    write_log(path, 4, n_frames=12)
    plain = open_zarr_strictly(path)
    ds = dle.open_log(path)
    for name in ("d", "sigma", "lo68", "hi68", "lo95", "hi95", "p_above", "flags", "frame_start", "t_stop_s"):
        np.testing.assert_array_equal(plain[name].values, ds[name].values)
    assert plain.d.dims == ("window", "tile") and plain.timestamp_s.sizes["frame"] == 12


@needs_xarray
def test_every_commit_refreshes_what_plain_xarray_sees(tmp_path):
    path = tmp_path / "run.zarr"
    log = ZarrLog.create(path, tile_bboxes=BBOXES, rois=ROIS, flush_interval_s=1e9)
    for n in (2, 5):
        while log.committed_windows + log.pending < n:
            log.add_estimate(estimate(log.committed_windows + log.pending))
        log.flush()
        assert open_zarr_strictly(path).sizes["window"] == n
    log.close()


# ----------------------------------------------------------------- format 2
def as_format_2(path: Path) -> None:
    """Make ``path`` a log as format 2 wrote it: the same store, a root document without
    consolidated metadata, marker format_version 2."""
    root = path / "zarr.json"
    doc = json.loads(root.read_text())
    doc.pop("consolidated_metadata")
    doc["attributes"]["dle_stream"]["format_version"] = 2
    root.write_text(json.dumps(doc))


def test_a_format_2_log_reads_and_appending_makes_it_format_3(tmp_path):
    path = tmp_path / "run.zarr"
    with ZarrLog.create(path, tile_bboxes=BBOXES, rois=ROIS, attrs={"estimator": "dle", "mode": "run"},
                        flush_interval_s=1e9) as log:
        for w in range(3):
            log.add_estimate(estimate(w))
    as_format_2(path)
    view = open_log_view(path)
    assert view.header.format_version == 2 and view.n_windows == 3 and view.rois == ROIS
    if importlib.util.find_spec("xarray") is not None:
        import xarray as xr

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dle.open_log(path).sizes["window"] == 3
            assert xr.open_zarr(str(path), consolidated=False).sizes["window"] == 3

    with ZarrLog.create(path, tile_bboxes=BBOXES, rois=ROIS, attrs={"estimator": "dle", "mode": "run"},
                        append=True, flush_interval_s=1e9) as log:
        log.add_estimate(estimate(0))
    view = open_log_view(path)
    assert view.header.format_version == LOG_FORMAT_VERSION and view.n_windows == 4
    assert len(view.header.segments) == 2 and view.header.segments[1].window_offset == 3
    if importlib.util.find_spec("xarray") is not None:
        np.testing.assert_array_equal(dle.open_log(path).segment.values, [0, 0, 0, 1])
    assert zarr.open_group(str(path), mode="r")["window"].shape == (4,)   # consolidated: the committed rows
    if importlib.util.find_spec("xarray") is not None:
        np.testing.assert_array_equal(open_zarr_strictly(path).window.values, [0, 1, 2, 3])


def test_a_log_of_a_newer_format_is_refused_naming_the_fix(tmp_path):
    path = tmp_path / "run.zarr"
    write_log(path, 1)
    root = path / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["dle_stream"]["format_version"] = LOG_FORMAT_VERSION + 1
    root.write_text(json.dumps(doc))
    with pytest.raises(DleStreamError, match="newer.*upgrade") as err:
        open_log_view(path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ schema
def test_the_attribute_schema_round_trips_and_types_what_it_reads(tmp_path):
    path = tmp_path / "run.zarr"
    write_log(path, 2)
    doc = zarr.open_group(str(path), mode="r").attrs.asdict()
    header = LogAttrs.from_json(doc)
    assert header.committed_windows == 2 and header.committed_gaps == 1
    assert header.rois[0] == LogRoi("vessel", (0, 0, 20, 40), (0, 1))
    assert isinstance(header.segments[0], LogSegment) and header.segments[0].run is None
    assert header.mode == "replay" and header.run == {"estimator": "dle", "mode": "replay"}
    assert LogAttrs.from_json(header.to_json()) == header
    assert header.to_json() == doc   # the only writer of these attributes
    with pytest.raises(ValueError, match="count"):
        LogAttrs.from_json({**doc, "committed_windows": -1})
    with pytest.raises(ValueError, match="run_log"):
        LogAttrs.from_json({"committed_windows": 0})


# ----------------------------------------------------------------- errors
def test_open_log_without_xarray_says_how_to_install_it(tmp_path, monkeypatch):
    write_log(tmp_path / "run.zarr", 1)
    monkeypatch.setitem(sys.modules, "xarray", None)   # as if it were not installed
    with pytest.raises(DleStreamError) as err:
        dle.open_log(tmp_path / "run.zarr")
    assert "pip install xarray" in str(err.value) and "\n" not in str(err.value)


@needs_xarray
@pytest.mark.parametrize("make", ["missing", "file", "folder"])
def test_open_log_of_something_else_is_a_one_line_error(tmp_path, make):
    path = tmp_path / "x.zarr"
    if make == "file":
        path.write_text("not a log")
    elif make == "folder":
        path.mkdir()
        (path / "a.txt").write_text("x")
    with pytest.raises(DleStreamError, match=re.escape(str(path))) as err:
        dle.open_log(path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ README
@needs_xarray
def test_the_readme_lines_run(tmp_path, monkeypatch):
    """The code block of the README section "Reading a log in Python" runs on a log."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Reading a log in Python", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 3
    monkeypatch.chdir(tmp_path)
    write_log(tmp_path / "run.zarr", 60)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)   # noqa: S102 - the README's own lines
    assert os.path.isdir(tmp_path / "run.zarr") and "ds" in env and env["ds"].sizes["window"] == 60
