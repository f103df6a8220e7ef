"""Data safety (issue 15): a user's files are never overwritten or deleted without
--overwrite (and never when dle-stream did not write them); incomplete recordings are
detected, analysed as far as they are valid, and said to be incomplete; output paths
that cannot be written give one line, not a traceback; paths are printed literally."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from dle_stream import ScanTiming
from dle_stream.cli import app
from dle_stream.errors import DleStreamError
from dle_stream.recording import open_recording, write_recording
from dle_stream.recording.writer import partial_path

runner = CliRunner()
MODEL_TIMING = ScanTiming.reference()
SIM = ["--frames", "20", "--size", "20x20"]


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), result.output
    text = " ".join(result.output.split())
    for w in words:
        assert w in text, (w, text)
    return text


def timing(h=20, w=20):
    return ScanTiming(**{**MODEL_TIMING.to_dict(), "width_px": w, "height_px": h})


def movie(n=60, h=20, w=20, seed=0):
    return np.random.default_rng(seed).poisson(100, (n, h, w)).astype(np.uint16)


# ------------------------------------------------------ item 1: never destroy a file
def test_simulate_refuses_an_existing_tiff(tmp_path):
    target = tmp_path / "keep.tif"
    target.write_bytes(b"my precious data")
    text = one_line_error(runner.invoke(app, ["simulate", str(target), *SIM]), "keep.tif", "--overwrite")
    assert "already exists" in text
    assert target.read_bytes() == b"my precious data"
    assert not (tmp_path / "keep.tif.truth.json").exists()


def test_simulate_overwrite_replaces_a_file(tmp_path):
    target = tmp_path / "old.tif"
    target.write_bytes(b"old")
    ok = runner.invoke(app, ["simulate", str(target), *SIM, "--overwrite"])
    assert ok.exit_code == 0, ok.output
    with open_recording(target) as rec:
        assert rec.n_frames == 20 and not rec.truncated
    assert not partial_path(target).exists()


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_simulate_never_deletes_a_foreign_folder(tmp_path, extra):
    folder = tmp_path / "data.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    one_line_error(runner.invoke(app, ["simulate", str(folder), *SIM, *extra]), "data.zarr", "did not write")
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_simulate_never_replaces_a_run_log(tmp_path, extra):
    from dle_stream.zarr_log import ZarrLog, open_log

    log_path = tmp_path / "run.zarr"
    ZarrLog.create(log_path, tile_bboxes=np.array([[0, 0, 20, 20]]), attrs={"estimator": "dle"}).close()
    before = sorted(str(p.relative_to(log_path)) for p in log_path.rglob("*"))
    one_line_error(runner.invoke(app, ["simulate", str(log_path), *SIM, *extra]), "run.zarr", "run log")
    assert sorted(str(p.relative_to(log_path)) for p in log_path.rglob("*")) == before
    open_log(log_path)  # still a readable log


def test_simulate_zarr_recording_needs_overwrite(tmp_path):
    target = tmp_path / "rec.zarr"
    assert runner.invoke(app, ["simulate", str(target), *SIM, "--seed", "1"]).exit_code == 0
    first = open_recording(target).read(0, 20)
    one_line_error(runner.invoke(app, ["simulate", str(target), *SIM, "--seed", "2"]), "rec.zarr", "--overwrite")
    assert np.array_equal(open_recording(target).read(0, 20), first)
    ok = runner.invoke(app, ["simulate", str(target), *SIM, "--seed", "2", "--overwrite"])
    assert ok.exit_code == 0, ok.output
    assert not np.array_equal(open_recording(target).read(0, 20), first)


def test_simulate_refuses_an_existing_truth_file(tmp_path):
    truth = tmp_path / "rec.tif.truth.json"
    truth.write_text('{"mine": 1}')
    one_line_error(runner.invoke(app, ["simulate", str(tmp_path / "rec.tif"), *SIM]), "truth", "--overwrite")
    assert truth.read_text() == '{"mine": 1}'
    assert not (tmp_path / "rec.tif").exists()


def camera_unplugged_at(k: int):
    """Frames of a camera that fails before its frame ``k``."""
    for _ in range(k):
        yield np.zeros((20, 20), np.uint16)
    raise RuntimeError("camera unplugged")


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    """The new TIFF is written beside the old one and renamed only when complete."""
    target = tmp_path / "rec.tif"
    target.write_bytes(b"old recording")
    with pytest.raises(RuntimeError):
        write_recording(target, camera_unplugged_at(5), timing(), n_frames=10, overwrite=True)
    assert target.read_bytes() == b"old recording"
    assert not partial_path(target).exists()


def test_failed_zarr_overwrite_keeps_the_old_store(tmp_path):
    """`write_recording(..., overwrite=True)` (simulate --overwrite) deleted the old Zarr
    recording first; a failure while writing the new one then left nothing at all."""
    target = write_recording(tmp_path / "rec.zarr", np.full((30, 20, 20), 7, np.uint16), timing())
    with pytest.raises(RuntimeError):
        write_recording(target, camera_unplugged_at(5), timing(), n_frames=30, overwrite=True)
    kept = open_recording(target)
    assert kept.n_frames == 30 and int(kept.read(0, 30).min()) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.zarr"]  # nothing half-written beside it
    # a finished overwrite replaces it, and leaves nothing beside it either
    write_recording(target, np.zeros((10, 20, 20), np.uint16), timing(), overwrite=True)
    assert open_recording(target).n_frames == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.zarr"]


@pytest.mark.parametrize("name", ["rec.tif.partial", "rec.tif.truth.json.tmp"])
def test_simulate_never_uses_a_users_file_as_its_scratch_file(tmp_path, name):
    """The TIFF's partial file and the ground truth's temporary file had fixed names: a user's
    file of that name was written over, then deleted."""
    mine = tmp_path / name
    mine.write_text("my notes")
    result = runner.invoke(app, ["simulate", str(tmp_path / "rec.tif"), *SIM])
    assert mine.read_text() == "my notes"
    if result.exit_code != 0:  # refusing is fine too, in one line that names the file
        one_line_error(result, name)


DEMO = ["--frames", "60", "--quiet"]


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_out_never_replaces_a_users_recording_or_log(tmp_path, small_model):
    """`demo --out DIR` replaced DIR/demo.tif, its truth file and DIR/demo.zarr whenever
    dle-stream had written them, e.g. the user's own `simulate` and `replay --log` of that name."""
    out = tmp_path / "experiment"
    out.mkdir()
    assert runner.invoke(app, ["simulate", str(out / "demo.tif"), "--frames", "60", "--size", "40x120",
                               "--seed", "7", "--d", "0.9"]).exit_code == 0
    assert runner.invoke(app, ["replay", str(out / "demo.tif"), "--model", str(small_model), "--window", "40",
                               "--hop", "20", "--log", str(out / "demo.zarr"), "--quiet", "--no-check"]).exit_code == 0
    before = _files(out)
    one_line_error(runner.invoke(app, ["demo", "--out", str(out), "--model", str(small_model), *DEMO]),
                   "demo.tif", "--overwrite")
    assert _files(out) == before
    # asked for, an earlier recording and run log of dle-stream's are replaced
    done = runner.invoke(app, ["demo", "--out", str(out), "--model", str(small_model), "--overwrite", *DEMO])
    assert done.exit_code == 0, done.output
    assert _files(out)[Path("demo.tif")] != before[Path("demo.tif")]


@pytest.mark.parametrize("name", ["demo.tif", "demo.tif.truth.json"])
def test_demo_out_never_replaces_a_foreign_file_even_with_overwrite(tmp_path, small_model, name):
    (tmp_path / name).write_bytes(b"my own file")
    for extra in ([], ["--overwrite"]):
        one_line_error(runner.invoke(app, ["demo", "--out", str(tmp_path), "--model", str(small_model), *DEMO, *extra]),
                       name)
        assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing simulated beside it
        assert (tmp_path / name).read_bytes() == b"my own file"

def test_write_recording_refuses_existing_by_default(tmp_path):
    target = write_recording(tmp_path / "a.ome.tif", movie(5), timing())
    stamp = target.stat().st_mtime_ns, target.read_bytes()
    with pytest.raises(DleStreamError, match="overwrite=True"):
        write_recording(target, movie(5, seed=1), timing())
    assert (target.stat().st_mtime_ns, target.read_bytes()) == stamp


def _log(tmp_path: Path) -> Path:
    from dle_stream.zarr_log import ZarrLog

    path = tmp_path / "run.zarr"
    ZarrLog.create(path, tile_bboxes=np.array([[0, 0, 20, 20]]), attrs={"estimator": "dle"}).close()
    return path


def test_log_export_refuses_an_existing_csv(tmp_path):
    log = _log(tmp_path)
    csv_path = tmp_path / "out.csv"
    csv_path.write_text("my spreadsheet\n")
    one_line_error(runner.invoke(app, ["log", "export", str(log), "--csv", str(csv_path)]), "out.csv", "--overwrite")
    assert csv_path.read_text() == "my spreadsheet\n"
    ok = runner.invoke(app, ["log", "export", str(log), "--csv", str(csv_path), "--overwrite"])
    assert ok.exit_code == 0, ok.output
    assert csv_path.read_text().startswith("window,")
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_log_export_to_a_folder_or_missing_folder(tmp_path):
    log = _log(tmp_path)
    one_line_error(runner.invoke(app, ["log", "export", str(log), "--csv", str(tmp_path)]), "--csv", "folder")
    one_line_error(runner.invoke(app, ["log", "export", str(log), "--csv", str(tmp_path / "no" / "x.csv")]), "--csv")



def test_a_failed_export_names_the_users_csv_not_a_temporary_file(tmp_path, monkeypatch):
    """A write error while exporting named the hidden temporary file (.out.csv.x1y2.tmp)."""
    import dle_stream.log_summary as log_summary

    class DiskFull:
        def __init__(self, fh):
            pass

        def writerow(self, row):
            raise OSError(28, "No space left on device")

    log = _log(tmp_path)
    monkeypatch.setattr(log_summary.csv, "writer", DiskFull)
    text = one_line_error(runner.invoke(app, ["log", "export", str(log), "--csv", str(tmp_path / "out.csv")]),
                          "--csv", "out.csv", "No space left")
    assert ".tmp" not in text
    assert not (tmp_path / "out.csv").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

# ------------------------------------------------ item 2: incomplete recordings
KILL_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from dle_stream import ScanTiming
    from dle_stream.recording import write_recording
    t = ScanTiming.reference().with_frame_size(64, 64)
    def frames():
        for k in range(600):
            if k == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)
            yield np.full((64, 64), k + 1, np.float32)
    write_recording(sys.argv[1], frames(), t, n_frames=600)
""")


def _killed_writer(tmp_path: Path, name: str, kill_at: int) -> Path:
    target = tmp_path / name
    proc = subprocess.run([sys.executable, "-c", KILL_WRITER, str(target), str(kill_at)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    return target


def test_killed_zarr_writer_leaves_a_store_that_says_it_is_incomplete(tmp_path):
    # 64×64 float32 frames: the writer stores blocks of 256 frames; killed at frame 530 → 512 written
    target = _killed_writer(tmp_path, "rec.zarr", 530)
    with open_recording(target) as rec:
        assert rec.truncated and rec.n_frames == 512
        assert "512 of 600" in rec.truncation_note and "rec.zarr" in rec.truncation_note
        data = rec.read(0, rec.n_frames)
    assert np.array_equal(data[:, 0, 0], np.arange(1, 513, dtype=np.float32))  # no zero-filled frame among them


def test_killed_tiff_writer_leaves_only_a_partial_file(tmp_path):
    target = _killed_writer(tmp_path, "rec.tif", 300)
    assert not target.exists()
    partial = partial_path(target)
    assert partial.exists()
    with pytest.raises(DleStreamError, match="incomplete recording"):
        open_recording(partial)
    one_line_error(runner.invoke(app, ["replay", str(partial)]), "rec.tif.partial", "simulate it again")
    # and writing it again works: the killed writer's partial TIFF is replaced, not in the way
    write_recording(target, movie(5), timing(), overwrite=False)
    assert open_recording(target).n_frames == 5 and not partial.exists()


def test_a_zarr_write_error_is_one_line_naming_the_store(tmp_path, monkeypatch):
    """zarr's own errors while writing frames become one line naming the store the user asked
    for (only the frame source's own errors pass through as they are)."""
    import zarr.core.array

    def broken(self, *args, **kwargs):
        raise ValueError("codec failure")

    monkeypatch.setattr(zarr.core.array.Array, "__setitem__", broken)
    with pytest.raises(DleStreamError, match=r"b\.zarr: cannot write the Zarr store \(ValueError: codec failure"):
        write_recording(tmp_path / "b.zarr", movie(5), timing())


def test_overwrite_never_swaps_a_linked_zarr_recording_for_a_local_copy(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_recording(tmp_path / "data" / "rec.zarr", movie(5), timing())
    (tmp_path / "work").mkdir()
    link = tmp_path / "work" / "rec.zarr"
    link.symlink_to(data, target_is_directory=True)
    with pytest.raises(DleStreamError, match="link"):
        write_recording(link, movie(3), timing(), overwrite=True)
    assert link.is_symlink() and open_recording(data).n_frames == 5
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["rec.zarr"]


def _incomplete_zarr(tmp_path: Path, n: int, written: int) -> Path:
    path = write_recording(tmp_path / "cut.zarr", movie(n), timing())
    group = zarr.open_group(str(path), mode="r+")
    doc = dict(group.attrs["dle_stream"])
    group.attrs["dle_stream"] = {**doc, "frames_written": written, "complete": False}
    return path


def test_replay_of_an_incomplete_store_uses_the_valid_frames_and_warns(tmp_path, small_model):
    path = _incomplete_zarr(tmp_path, 120, 80)
    result = runner.invoke(app, ["replay", str(path), "--model", str(small_model), "--window", "40", "--hop", "20",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert "80 frames" in result.stdout
    assert "INCOMPLETE" in result.stderr and "80 of 120" in result.stderr


def test_replay_with_nothing_estimable_exits_non_zero(tmp_path, small_model):
    path = _incomplete_zarr(tmp_path, 120, 30)
    one_line_error(runner.invoke(app, ["replay", str(path), "--model", str(small_model)]),
                   "cut.zarr", "30 usable frames", "--window", "30 of 120")


def test_foreign_zarr_with_unwritten_trailing_chunks(tmp_path):
    path = tmp_path / "acq.zarr"
    array = zarr.create_array(str(path), shape=(100, 20, 20), chunks=(10, 20, 20), dtype="uint16", fill_value=0,
                              dimension_names=("t", "y", "x"))
    array[:35] = movie(35)
    with open_recording(path) as rec:
        assert rec.truncated and rec.n_frames == 40  # the last written chunk holds frames 30–39
        assert "never written" in rec.truncation_note


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("name", ["cut.tif", "cut.ome.tif"])
def test_cut_tiff_is_never_analysed_as_whole(tmp_path, small_model, name, fraction):
    path = write_recording(tmp_path / name, movie(120), timing())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    result = runner.invoke(app, ["replay", str(path), "--model", str(small_model), "--window", "40", "--hop", "20",
                                 "--quiet"])
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        frames = int(result.stdout.split(" frames")[0].split()[-1])
        assert 40 <= frames <= 120  # a cut in the trailing page headers leaves every frame's pixels intact
        assert "INCOMPLETE" in result.stderr
    else:
        one_line_error(result, name)


# -------------------------------------------- item 6: impossible output paths
def test_simulate_onto_a_folder_named_like_a_tiff(tmp_path):
    (tmp_path / "x.ome.tif").mkdir()
    one_line_error(runner.invoke(app, ["simulate", str(tmp_path / "x.ome.tif"), *SIM]), "x.ome.tif", "folder")


def test_simulate_under_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    one_line_error(runner.invoke(app, ["simulate", str(tmp_path / "f" / "a.tif"), *SIM]), "a.tif", "is a file")


def test_simulate_into_a_read_only_folder(tmp_path, monkeypatch):
    import dle_stream.recording.writer as writer

    # tests may run as root, which writes anywhere: ask the check what a user would get
    monkeypatch.setattr(writer.os, "access", lambda path, mode: False)
    one_line_error(runner.invoke(app, ["simulate", str(tmp_path / "a.tif"), *SIM]), "a.tif", "not writable")


def test_a_refused_write_is_one_line(tmp_path, monkeypatch):
    """The system refusing a write (read-only disk, ...) mid-way: one line, no traceback, nothing left."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "a.tif.partial"))

    monkeypatch.setattr(tifffile, "TiffWriter", refuse)
    one_line_error(runner.invoke(app, ["simulate", str(tmp_path / "a.tif"), *SIM]), "a.tif", "Permission denied")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["train", "--steps", "1"], ["bench", "--n", "2"], ["demo", "--frames", "50"]])
def test_out_is_an_existing_file(tmp_path, command):
    f = tmp_path / "taken"
    f.write_text("mine")
    one_line_error(runner.invoke(app, [*command, "--out", str(f)]), "--out", "taken", "is a file")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("command", [["train", "--steps", "1"], ["bench", "--n", "2"], ["demo", "--frames", "50"]])
def test_out_under_a_file(tmp_path, command):
    (tmp_path / "f").write_text("")
    one_line_error(runner.invoke(app, [*command, "--out", str(tmp_path / "f" / "sub")]), "--out", "is a file")


def test_out_read_only(tmp_path, monkeypatch):
    import dle_stream.cli as cli

    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    one_line_error(runner.invoke(app, ["bench", "--n", "2", "--out", str(tmp_path / "b")]), "--out", "not writable")
    assert not (tmp_path / "b").exists()


# --------------------------------------------------- item 7: text printed literally
def test_markup_like_path_in_an_error(tmp_path):
    result = runner.invoke(app, ["replay", str(tmp_path / "nope[/]x.tif")])
    one_line_error(result, "nope[/]x.tif")


def test_bracketed_folder_names_are_not_mangled(tmp_path):
    folder = tmp_path / "data[raw]"
    folder.mkdir()
    one_line_error(runner.invoke(app, ["replay", str(folder / "rec.tif")]), "data[raw]/rec.tif")
    ok = runner.invoke(app, ["simulate", str(folder / "rec[1].tif"), *SIM])
    assert ok.exit_code == 0, ok.output
    assert f"wrote {folder / 'rec[1].tif'} (20 frames" in ok.stdout


def test_bracketed_roi_names_and_warnings_are_not_mangled(tmp_path, small_model):
    path = tmp_path / "plain[1].tif"
    tifffile.imwrite(path, movie(60))  # no timing metadata: the model's timing is assumed (a warning)
    result = runner.invoke(app, ["replay", str(path), "--model", str(small_model), "--window", "40", "--hop", "20",
                                 "--roi", "[b]cell[/b]=0,0,20,20", "--no-dashboard"])
    assert result.exit_code == 0, result.output
    assert "[b]cell[/b]:" in result.stdout


# ----------------------------------------- item 4: flags that gave nothing or a silent change
@pytest.fixture()
def rec60(tmp_path):
    return write_recording(tmp_path / "rec.tif", movie(60), timing())


@pytest.mark.parametrize("window", ["0", "-3"])
def test_window_below_one_is_refused(rec60, small_model, window):
    one_line_error(runner.invoke(app, ["replay", str(rec60), "--model", str(small_model), "--window", window]),
                   f"--window {window}", "at least 1")


def test_window_longer_than_the_recording_is_an_error(rec60, small_model, tmp_path):
    log = tmp_path / "run.zarr"
    result = runner.invoke(app, ["replay", str(rec60), "--model", str(small_model), "--window", "5000",
                                 "--log", str(log)])
    one_line_error(result, "rec.tif", "60 usable frames", "5000-frame window", "--window (at most 60)")
    assert not log.exists()  # nothing was started


@pytest.mark.parametrize("roi", ["0.5,0,20,20", "0,0,20.5,20", "a=0,0,1e-1,20"])
def test_fractional_roi_is_refused(rec60, small_model, roi):
    one_line_error(runner.invoke(app, ["replay", str(rec60), "--model", str(small_model), "--roi", roi]),
                   "--roi", "whole pixels")


def test_fractional_roi_in_a_file_is_refused(rec60, small_model, tmp_path):
    rois = tmp_path / "rois.csv"
    rois.write_text("name,x,y,w,h\na,0,0,20.5,20\n")
    one_line_error(runner.invoke(app, ["replay", str(rec60), "--model", str(small_model), "--rois", str(rois)]),
                   "--rois", "rois.csv", "whole pixels")


def test_whole_pixels_written_as_floats_are_accepted(rec60, small_model):
    ok = runner.invoke(app, ["replay", str(rec60), "--model", str(small_model), "--roi", "a=0,0,20.0,20",
                             "--window", "40", "--quiet"])
    assert ok.exit_code == 0, ok.output


def test_duplicate_roi_names_are_refused(rec60, small_model, tmp_path):
    result = runner.invoke(app, ["replay", str(rec60), "--model", str(small_model), "--roi", "cell=0,0,20,20",
                                 "--roi", "cell=20,20,20,20"])
    one_line_error(result, "'cell'", "2 times", "own name")
    rois = tmp_path / "rois.json"
    rois.write_text(json.dumps([{"name": "n", "x": 0, "y": 0, "w": 20, "h": 20}, {"name": "n", "x": 20, "y": 0, "w": 20, "h": 20}]))
    one_line_error(runner.invoke(app, ["replay", str(rec60), "--model", str(small_model), "--rois", str(rois)]), "'n'")


def test_quiet_still_shows_warnings_on_stderr(tmp_path, small_model):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, movie(60))  # no timing metadata: the model's timing is ASSUMED
    result = runner.invoke(app, ["replay", str(path), "--model", str(small_model), "--window", "40", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "ASSUMED" in result.stderr
    assert "warning" not in result.stdout  # the summary stays clean for scripts
    assert "60 frames, 1 windows" in result.stdout


# ------------------------------------------------------------ item 8: smaller things
@pytest.mark.parametrize("content", ["", "junk line\n"])
def test_mm_config_without_a_camera(tmp_path, content):
    cfg = tmp_path / "rig.cfg"
    cfg.write_text(content)
    one_line_error(runner.invoke(app, ["run", "--mm-config", str(cfg), "--frames", "5"]), "rig.cfg", "no camera")


def test_models_piped_keeps_whole_names_and_paths(tmp_path, small_model, monkeypatch):
    monkeypatch.setenv("DLE_STREAM_MODELS", str(small_model.parent))
    result = runner.invoke(app, ["models"])  # CliRunner output is not a terminal, like a pipe
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("name\tD range")
    assert any(ln.split("\t")[0] == "tiny" and ln.split("\t")[-1] == str(small_model) for ln in lines)


def test_format_suffix_error_names_the_flag(tmp_path):
    one_line_error(runner.invoke(app, ["simulate", str(tmp_path / "rec.avi"), *SIM]), "rec.avi", "--format")


def test_an_unknown_bench_suite_names_the_suite_flag(tmp_path):
    text = one_line_error(runner.invoke(app, ["bench", "--suite", "mid", "--n", "2", "--out", str(tmp_path / "b")]),
                          "--suite mid", "--suite low, high or combine")
    assert "--preset" not in text


@pytest.mark.parametrize("script", ["combine_raw_windows.py", "suite_raw_windows.py"])
def test_raw_window_benchmarks_never_replace_an_existing_file(tmp_path, script):
    """The benchmark scripts that save raw window likelihoods refuse an existing output file
    (combine_raw_windows.py overwrote it once the simulation was done) and leave it as it was."""
    out = tmp_path / "kept.npz"
    out.write_bytes(b"someone's results")
    root = Path(__file__).resolve().parents[1]
    args = {"combine_raw_windows.py": ["models/brain-qd-low", str(out), "cloud", "1"],
            "suite_raw_windows.py": ["models/brain-qd-low", "low", "2", str(out)]}[script]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args], capture_output=True, text=True,
                          cwd=root, timeout=600)
    assert done.returncode != 0
    assert "exists" in done.stderr and "Traceback" not in done.stderr
    assert out.read_bytes() == b"someone's results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.npz"]


def test_recording_check_benchmark_replaces_only_its_own_reports(tmp_path):
    """benchmarks/recording_check.py --out rewrites an earlier report of its own, never another file."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("recording_check_bench", root / "benchmarks" / "recording_check.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    other = tmp_path / "notes.md"
    other.write_text("my notes\n")
    with pytest.raises(SystemExit, match="not a report of this script"):
        bench.report(other, "Command: `python benchmarks/recording_check.py --suite low`\nnew\n", {"a": [1.0]})
    assert other.read_text() == "my notes\n" and not (tmp_path / "notes.json").exists()
    own = tmp_path / "check.md"
    bench.report(own, "Command: `python benchmarks/recording_check.py --suite low`\nfirst\n", {"a": [1.0]})
    bench.report(own, "Command: `python benchmarks/recording_check.py --suite low`\nsecond\n", {"a": [float("nan")]})
    assert own.read_text().endswith("second\n")
    assert json.loads((tmp_path / "check.json").read_text()) == {"a": [None]}


# ------------------------------------------------ bench --out: only its own files replaced
BENCH = ["bench", "--suite", "low", "--n", "6", "--estimators", "oracle", "--seed", "5"]


@pytest.mark.parametrize("name", ["results.json", "table.md", "z_distribution.png"])
def test_bench_never_overwrites_a_file_it_did_not_write(tmp_path, name):
    """A user's file in --out that bears one of the bench's names is refused before the suite
    runs (the old bench wrote over it after its run)."""
    mine = tmp_path / name
    mine.write_bytes(b"my own results")
    text = one_line_error(runner.invoke(app, [*BENCH, "--out", str(tmp_path)]), "--out", name, "did not write")
    assert "choose another --out folder" in text
    assert mine.read_bytes() == b"my own results"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_bench_combine_refuses_a_foreign_combine_json_before_running(tmp_path, monkeypatch):
    import dle_stream.evaluation.bench_combine as bench_combine

    def must_not_run(*args, **kwargs):
        raise AssertionError("the combine suite ran although its output could not be written")

    monkeypatch.setattr(bench_combine, "run_combine", must_not_run)
    mine = tmp_path / "beads-high" / "combine.json"
    mine.parent.mkdir()
    mine.write_text('{"mine": true}')
    one_line_error(runner.invoke(app, ["bench", "--suite", "combine", "--out", str(tmp_path)]),
                   "--out", "combine.json", "did not write")
    assert mine.read_text() == '{"mine": true}'


def test_bench_replaces_its_own_earlier_results(tmp_path):
    first = runner.invoke(app, [*BENCH, "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    before = json.loads((tmp_path / "results.json").read_text())
    again = runner.invoke(app, [*BENCH[:-1], "6", "--out", str(tmp_path)])
    assert again.exit_code == 0, again.output
    after = json.loads((tmp_path / "results.json").read_text())
    assert (before["seed"], after["seed"]) == (5, 6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_bench_cut_short_while_writing_leaves_whole_files(tmp_path, monkeypatch):
    """A plot that fails half-way (disk full, a kill) leaves the earlier plot whole and no
    partial file; the failure is one line naming --out."""
    from matplotlib.figure import Figure

    first = runner.invoke(app, [*BENCH, "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    old = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert len(old) == 3

    def half_written(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    one_line_error(runner.invoke(app, [*BENCH, "--out", str(tmp_path)]), "--out", "No space left on device")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == old
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bench_of_fewer_movies_than_its_rolling_mean(tmp_path):
    """Two movies: the error plot's rolling mean (5 movies) is left out instead of crashing
    (np.convolve swapped its arguments and the plot got arrays of different lengths)."""
    done = runner.invoke(app, ["bench", "--suite", "low", "--n", "2", "--estimators", "oracle", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "results.json").read_text())["n"] == 2
    assert (tmp_path / "error_vs_transitions.png").stat().st_size > 1000


# ------------------------------------- train --out: a trained model is never replaced
@pytest.mark.parametrize("held", ["package", "checkpoint only"])
def test_a_new_training_run_never_replaces_a_trained_model(tmp_path, small_model, held):
    """`train --out FOLDER` without --resume into a folder holding a package (or a run's
    checkpoint) used to write a new model over it: hours of training lost to a forgotten flag."""
    import shutil

    out = tmp_path / "my-scope"
    shutil.copytree(small_model, out)
    if held == "checkpoint only":
        for name in ("card.json", "weights.safetensors"):
            (out / name).unlink()
        (out / "checkpoint").mkdir(exist_ok=True)
        (out / "checkpoint" / "state.json").write_text("{}")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    text = one_line_error(runner.invoke(app, ["train", "--preset", "low", "--steps", "1", "--ae-steps", "1",
                                              "--cache-movies", "8", "--val-movies", "8", "--out", str(out)]),
                          "--out", "my-scope", "--resume")
    assert "never replaced" in text
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_training_api_never_replaces_a_trained_model_either(tmp_path, small_model):
    """`train(config)` (what scripts and notebooks call) wrote over a package just as the CLI
    did: the refusal was the CLI's alone."""
    import shutil

    from dle_stream.training.trainer import train
    from dle_stream.training.training_setup import config_for

    fresh = tmp_path / "fresh"
    config = config_for(out=fresh, preset="low", like=None, d_max=None, steps=1, minutes=None, device="cpu",
                        seed=0, resume=False, encoder_from=None, ae_steps=1, cache_movies=8, val_movies=8,
                        name=None, flags={}, timing_file=None)
    out = tmp_path / "my-scope"
    shutil.copytree(small_model, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DleStreamError, match="never replaced"):
        train(replace(config, out=out), log=lambda *a, **k: None)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

def test_a_new_training_run_may_use_a_folder_without_a_run_in_it(tmp_path, monkeypatch):
    """An existing folder holding other files (notes, recordings) is fine: the run's names are free."""
    import dle_stream.training.trainer as trainer

    class Stop(Exception):
        pass

    def fake(cfg, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer, "train", fake)
    (tmp_path / "notes.txt").write_text("scope settings")
    result = runner.invoke(app, ["train", "--preset", "low", "--steps", "1", "--out", str(tmp_path)])
    assert isinstance(result.exception, Stop), result.output
    assert (tmp_path / "notes.txt").read_text() == "scope settings"


# ------------------------------------- run: a run that could not estimate says so
def test_run_with_fewer_frames_than_a_window_is_refused_before_it_starts(tmp_path, small_model):
    """`run --demo --frames 5` (a 40-frame window) exited 0 with "0 windows … no estimate yet"."""
    result = runner.invoke(app, ["run", "--demo", "--frames", "5", "--fast", "--model", str(small_model),
                                 "--size", "20x20", "--no-dashboard", "--log", str(tmp_path / "live.zarr")])
    one_line_error(result, "--frames 5", "--window")


def test_run_whose_acquisition_fails_exits_non_zero_and_keeps_its_log(tmp_path, small_model, monkeypatch):
    """The camera failing mid-acquisition printed a warning on stdout and exited 0."""
    import dle_stream.sources.demo_camera as demo_camera

    make_core = demo_camera.create_demo_core

    def failing(**kwargs):
        core = make_core(**kwargs)
        real_run = core.mda.run

        def run(sequence):
            real_run(sequence)
            raise RuntimeError("camera disconnected")

        core.mda.run = run
        return core

    monkeypatch.setattr(demo_camera, "create_demo_core", failing)
    log = tmp_path / "live.zarr"
    result = runner.invoke(app, ["run", "--demo", "--frames", "100", "--fast", "--model", str(small_model),
                                 "--size", "20x20", "--no-dashboard", "--window", "40", "--hop", "20",
                                 "--log", str(log)])
    assert result.exit_code == 1, result.output
    assert "camera disconnected" in result.stderr
    from dle_stream.zarr_log import open_log

    assert open_log(log).n_windows >= 1  # what was estimated before the failure is kept



def test_train_from_a_missing_encoder_leaves_no_out_folder(tmp_path):
    """`train --encoder-from MISSING` printed "training …", made the --out folder, then failed."""
    out = tmp_path / "new" / "m"
    one_line_error(runner.invoke(app, ["train", "--out", str(out), "--encoder-from", str(tmp_path / "nope"),
                                       "--steps", "1"]), "--encoder-from", "nope")
    assert not out.exists()


def test_demo_without_out_leaves_no_temporary_folder_behind(tmp_path, small_model, monkeypatch):
    """`demo` without --out simulated into a fresh temporary folder (≈ 19 MB at its defaults)
    and left it there after every run: a user who runs the demo a few times fills /tmp."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    done = runner.invoke(app, ["demo", "--model", str(small_model), *DEMO])
    assert done.exit_code == 0, done.output
    assert list(scratch.iterdir()) == []
    assert "--out" in done.output  # the user is told how to keep the files
