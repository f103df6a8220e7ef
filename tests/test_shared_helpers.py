"""Logic that lived in two or three places now lives in one: the tile grid, the image-number
gap counter, the window schedule, JSON-safe values and atomic writes. These pin down the
one implementation's behaviour for every former user."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dle_stream.evaluation.metrics import json_safe
from dle_stream.events import FrameEvent, GapCounter
from dle_stream.files import jsonable, write_atomic
from dle_stream.tiling import grid_layout, tile_boxes
from dle_stream.windows import RollingWindows


def test_one_tile_grid_for_the_runner_and_the_simulator():
    from dle_stream.training.recording_sim import tile_grid

    whole = tile_boxes(45, 30, 20, 20)
    assert whole == [(0, 0, 20, 20), (20, 0, 20, 20)]  # leftover 5 rows and 10 columns not covered
    assert [tuple(b) for b in grid_layout(45, 30, 20, 20).bboxes] == whole
    covering = tile_boxes(45, 30, 20, 20, partial_edges=True)
    assert covering == tile_grid(45, 30, 20, 20)
    assert covering == [(0, 0, 20, 20), (0, 20, 20, 10), (20, 0, 20, 20), (20, 20, 20, 10), (40, 0, 5, 20),
                        (40, 20, 5, 10)]
    area = np.zeros((45, 30), int)
    for r, c, h, w in covering:
        area[r:r + h, c:c + w] += 1
    assert (area == 1).all()


def test_gap_counter_counts_jumps_not_restarts():
    gaps = GapCounter()
    assert [gaps.update(n) for n in (5, 6, 9, 10, None, 2, 3)] == [0, 0, 2, 0, 0, 0, 0]
    assert (gaps.gaps, gaps.images_lost, gaps.restarts, gaps.last) == (1, 2, 1, 3)


def test_runner_reads_image_number_gaps_as_the_source_does():
    """A jump is a gap (counted as the Micro-Manager source counts it); a counter that goes
    down (a new sequence) is not, and with image numbers the timestamps are not checked."""
    from dle_stream.likelihood import DGrid
    from dle_stream.runner import StreamRunner
    from dle_stream.timing import ScanTiming

    class Mean:
        name, tile_shape, window_frames, min_frames, d_max_um2_s, grid = "mean", (20, 20), 4, 2, 1.0, DGrid()

        def features(self, tiles):
            return tiles.reshape(len(tiles), -1).mean(axis=1, keepdims=True)

        def estimate(self, windows):
            return np.zeros((len(windows), self.grid.n))

    timing = ScanTiming(0.15, 8.0, 1508.0, 61652.0, 20, 20)
    runner = StreamRunner(Mean(), grid_layout(20, 20, 20, 20), timing, window=4, hop=2)
    numbers = [1, 2, 3, 7, 8, 1, 2]
    stamps = [0.0, 0.06, 0.12, 0.18, 5.0, 5.06, 5.12]  # the 4.8 s step comes with consecutive numbers
    for k, (n, t) in enumerate(zip(numbers, stamps)):
        runner.process(FrameEvent(np.zeros((20, 20), np.float32), k, timestamp_s=t, image_number=n))
    source_view = GapCounter()
    for n in numbers:
        source_view.update(n)
    assert runner.stats.gaps == source_view.gaps == 1
    assert runner.stats.images_lost == source_view.images_lost == 3


def test_window_schedule_counts_frames_not_yet_pushed():
    windows = RollingWindows(n_tiles=1, window=4, hop=2)
    due = []
    for k in range(10):
        due.append(windows.due_after(1))  # this frame, received but not pushed yet
        windows.push(np.zeros((1, 1)), k)
    assert [k for k, d in enumerate(due) if d] == [3, 5, 7, 9]
    assert windows.due_after(0) and not windows.due_after(1)


@dataclass
class _Settings:
    hop: int
    where: Path


def test_jsonable_gives_plain_json_for_every_former_caller():
    import datetime as dt

    value = {1: np.float32(0.5), "nan": float("nan"), "np_nan": np.float64("nan"), "inf": np.inf,
             "arr": np.array([[1, 2], [3, 4]], np.int16), "tuple": (np.int64(3), None, True), "flag": np.bool_(True),
             "path": Path("/data/rec.tif"), "when": dt.date(2026, 11, 29), "settings": _Settings(50, Path("x"))}
    out = jsonable(value)
    assert out == {"1": 0.5, "nan": None, "np_nan": None, "inf": None, "arr": [[1, 2], [3, 4]],
                   "tuple": [3, None, True], "flag": True, "path": "/data/rec.tif", "when": "2026-11-29",
                   "settings": {"hop": 50, "where": "x"}}
    json.dumps(out, allow_nan=False)  # strict JSON
    assert all(type(v) in (float, int, bool, str, type(None), list, dict) for v in out.values())
    # the benchmark and training documents (json_safe): NaN → None, everything else as it was
    doc = {"metrics": {"l1": 0.25, "nll": math.nan, "n": 3}, "rows": [1.5, math.inf, "a"]}
    assert json_safe(doc) == {"metrics": {"l1": 0.25, "nll": None, "n": 3}, "rows": [1.5, None, "a"]}


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    write_atomic(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, fail)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temporary file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
