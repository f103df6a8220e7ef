"""`dle-stream batch`: many recordings on a 2-worker local Dask cluster (needs the
``cluster`` extra, which the README's test command and .ci/run install).

The batch's table must hold exactly what replaying each recording on its own logs; a
recording that fails is reported and the others finish; a rerun skips complete logs and
continues a partial one (as a worker killed mid-recording leaves it).
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from dle_stream import ScanTiming
from dle_stream.batch import TABLE_COLUMNS, log_name
from dle_stream.recording import write_recording
from dle_stream.session import StreamOptions, replay
from dle_stream.zarr_log import open_log

VALUES = ("d", "sigma", "lo68", "hi68", "lo95", "hi95", "p_above", "flags")
COLUMN = {"d": "d_um2_s", "sigma": "sigma_um2_s", "lo68": "lo68_um2_s", "hi68": "hi68_um2_s", "lo95": "lo95_um2_s",
          "hi95": "hi95_um2_s", "p_above": "p_above", "flags": "flag_bits"}


def movie(frames: int, seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100, (frames, size, size)).astype(np.uint16)


def write(path, frames: int, seed: int):
    timing = ScanTiming(**{**ScanTiming.reference().to_dict(), "width_px": 40, "height_px": 40})
    return write_recording(path, movie(frames, seed), timing)


def serial(recording, model, folder):
    """The recording replayed on its own (as `dle-stream replay --log`): its log's values."""
    log = folder / log_name(recording)
    replay(recording, StreamOptions(model=str(model), hop=20, log=log, dashboard="quiet"))
    view = open_log(log)
    return {name: view.array(name) for name in VALUES}


def assert_rows_equal_serial(table: pd.DataFrame, recording, expected: dict) -> None:
    rows = table[table["recording"] == str(recording)].sort_values(["window", "tile"])
    n_windows, n_tiles = expected["d"].shape
    assert len(rows) == n_windows * n_tiles > 0
    assert rows["window"].tolist() == np.repeat(np.arange(n_windows), n_tiles).tolist()
    for name in VALUES:
        got = rows[COLUMN[name]].to_numpy().astype(expected[name].dtype).reshape(n_windows, n_tiles)
        np.testing.assert_array_equal(got, expected[name], err_msg=f"{recording.name}: {name}")


@pytest.fixture(scope="module")
def first_batch(tmp_path_factory, small_model_module):
    """Three recordings and a broken file, batched on 2 workers; the serial replays."""
    from typer.testing import CliRunner

    from dle_stream.cli import app

    tmp = tmp_path_factory.mktemp("batch")
    recs = [write(tmp / f"rec{i}.tif", 100, seed=i) for i in range(3)]
    bad = tmp / "broken.tif"
    bad.write_text("not a TIFF")
    out = tmp / "results"
    args = [*map(str, recs), str(bad), "--out", str(out), "--workers", "2", "--model", str(small_model_module),
            "--hop", "20"]
    result = CliRunner().invoke(app, ["batch", *args])
    expected = {r: serial(r, small_model_module, tmp / "serial") for r in recs}
    return tmp, recs, bad, out, args, result, expected


@pytest.fixture(scope="module")
def small_model_module(tmp_path_factory):
    from conftest import make_small_model

    return make_small_model(tmp_path_factory.mktemp("m") / "tiny")


def test_a_batch_on_two_workers_gives_what_replaying_each_recording_gives(first_batch):
    tmp, recs, bad, out, _, result, expected = first_batch
    table = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert tuple(table.columns) == TABLE_COLUMNS
    for rec in recs:
        assert (out / log_name(rec)).is_dir()
        assert_rows_equal_serial(table, rec, expected[rec])
    assert set(table["roi"]) == {"frame"} and set(table["tile"]) == {0, 1, 2, 3}
    # the window's time is its middle in acquisition time
    assert np.allclose(table["time_s"], (table["t_start_s"] + table["t_stop_s"]) / 2)


def test_a_failing_recording_is_reported_and_the_others_finish(first_batch):
    tmp, recs, bad, out, _, result, _ = first_batch
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"FAILED {bad}" in text and "not a readable TIFF" in text
    assert "4 recordings: 3 replayed, 1 failed" in text
    assert str(bad) not in set(pd.read_csv(out / "results.csv")["recording"])


def test_a_rerun_skips_complete_logs_and_continues_a_partial_one(first_batch, small_model_module):
    from typer.testing import CliRunner

    from dle_stream.cli import app

    tmp, recs, bad, out, args, _, expected = first_batch
    # a fourth recording whose log a killed worker left partial: its first 60 frames logged
    late = tmp / "late.tif"
    write(late, 60, seed=7)
    replay(late, StreamOptions(model=str(small_model_module), hop=20, log=out / log_name(late), dashboard="quiet"))
    late.unlink()
    write(late, 100, seed=7)  # the whole recording, the first 60 frames as before
    partial_windows = open_log(out / log_name(late)).n_windows
    assert 0 < partial_windows
    before = {rec: (out / log_name(rec) / "zarr.json").read_bytes() for rec in recs}
    result = CliRunner().invoke(app, ["batch", *args[:3], str(late), *args[3:]])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "3 already complete (skipped)" in text and "1 continued" in text, text
    for rec in recs:  # skipped: their logs untouched
        assert (out / log_name(rec) / "zarr.json").read_bytes() == before[rec]
    table = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    for rec in recs:
        assert_rows_equal_serial(table, rec, expected[rec])
    # the continued log holds every window of the whole recording, as a replay from scratch
    fresh = tmp / "fresh"
    fresh.mkdir()
    shutil.copy(late, fresh / late.name)
    full = serial(fresh / late.name, small_model_module, tmp / "serial-late")
    assert open_log(out / log_name(late)).n_windows == full["d"].shape[0] > partial_windows
    late_rows = table[table["recording"] == str(late)].copy()
    late_rows["recording"] = str(fresh / late.name)
    assert_rows_equal_serial(late_rows, fresh / late.name, full)


def test_bad_batch_arguments_are_one_line_errors(tmp_path, cli, write_movie):
    rec = write_movie("a.tif")
    other = tmp_path / "sub"
    other.mkdir()
    twin = write_movie("sub/a.tif")
    assert "--workers 0: must be at least 1" in cli.error("batch", rec, "--out", tmp_path / "o", "--workers", "0")
    assert "--workers 2 sizes a local cluster" in cli.error("batch", rec, "--out", tmp_path / "o", "--workers", "2",
                                                           "--scheduler", "tcp://127.0.0.1:1")
    assert "would share the log" in cli.error("batch", rec, twin, "--out", tmp_path / "o")
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in cli.error("batch", rec, "--out", tmp_path / "file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("a,b\n1,2\n")
    assert "did not write" in cli.error("batch", rec, "--out", mine)
    assert (mine / "results.csv").read_text() == "a,b\n1,2\n"  # never overwritten
    png = tmp_path / "png"
    png.mkdir()
    (png / "results.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")  # not text at all
    assert "did not write" in cli.error("batch", rec, "--out", png)  # one line, not a UnicodeDecodeError
    assert (png / "results.csv").read_bytes().startswith(b"\x89PNG")


def test_an_interrupted_rerun_leaves_the_earlier_table_whole(tmp_path, monkeypatch, write_movie):
    """A rerun opened results.csv for writing at its start: Ctrl-C (or a kill) while the
    cluster worked left a table of its header alone, or with a half row."""
    import dask.distributed
    from typer.testing import CliRunner

    import dle_stream.batch as batch
    from dle_stream.cli import app

    out = tmp_path / "results"
    out.mkdir()
    table = out / "results.csv"
    earlier = ",".join(TABLE_COLUMNS) + "\n" + "a.tif,,0,0,0,20,20,0,0,40,0,1,0.5,0.3,0.1,0.2,0.4,0.1,0.5,0,,,0\n"
    table.write_text(earlier)

    class Client:
        def submit(self, *args, **kwargs):
            return object()

        def close(self):
            pass

    def interrupted(futures):
        raise KeyboardInterrupt  # Ctrl-C while the cluster works on the first recording
        yield

    monkeypatch.setattr(batch, "_client", lambda scheduler, workers: (Client(), None))
    monkeypatch.setattr(dask.distributed, "as_completed", interrupted)
    result = CliRunner().invoke(app, ["batch", str(write_movie("a.tif")), "--out", str(out)])
    assert result.exit_code != 0
    assert table.read_text() == earlier


@pytest.mark.parametrize("header", ["now", "before lower95_um2_s"])
def test_a_recording_that_fails_in_a_rerun_keeps_its_rows_in_the_table(tmp_path, monkeypatch, write_movie, header):
    """A rerun in which recordings failed (a share briefly unreachable, a wrong --model)
    replaced results.csv with a table without their rows: every row, if all failed. A table
    an earlier version wrote (without the column lower95_um2_s) is taken too, its rows
    carried under the right columns."""
    import dask.distributed
    from typer.testing import CliRunner

    import dle_stream.batch as batch
    from dle_stream.cli import app

    out = tmp_path / "results"
    out.mkdir()
    table = out / "results.csv"
    rec = write_movie("a.tif")
    row = f"{rec.absolute()},frame,0,0,0,20,20,0,0,40,0,1,0.5,0.3,0.1,0.2,0.4,0.1,0.5,0,,,0\n"
    earlier = ",".join(TABLE_COLUMNS) + "\n" + row
    if header == "now":
        table.write_text(earlier)
    else:  # the same row as the version before wrote it
        old_columns = [c for c in TABLE_COLUMNS if c != "lower95_um2_s"]
        table.write_text(",".join(old_columns) + "\n" + row.replace(",,,0\n", ",,0\n"))

    class Failed:
        def __init__(self, recording, log):
            self.outcome = batch.RecordingOutcome(recording, log, "failed", error="the share is unreachable")

        def result(self):
            return self.outcome

    class Client:
        def submit(self, fn, recording, log, *args, **kwargs):
            return Failed(recording, log)

        def close(self):
            pass

    monkeypatch.setattr(batch, "_client", lambda scheduler, workers: (Client(), None))
    monkeypatch.setattr(dask.distributed, "as_completed", lambda futures: iter(futures))
    result = CliRunner().invoke(app, ["batch", str(rec), "--out", str(out)])
    assert result.exit_code == 1
    assert table.read_text() == earlier
    text = " ".join(result.output.split())
    assert "1 failed recordings keep their rows from the earlier table" in text
    assert not (out / "results.csv.partial").exists()
