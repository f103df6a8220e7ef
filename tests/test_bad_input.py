"""Bad input to `replay` and `run`: one line naming the file or flag and the fix, exit 2,
no traceback, nothing half-written."""

import numpy as np
import pytest
import tifffile

from dle_stream import ScanTiming
from dle_stream.recording import write_recording

MODEL_TIMING = ScanTiming.reference()


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for w in words:
        assert w in text, (w, text)


@pytest.fixture()
def recording(write_movie):
    return write_movie("rec.tif", frames=60, height=40, width=40)


def test_missing_file(tmp_path, small_model, cli):
    one_line_error(cli("replay", str(tmp_path / "nope.tif"), "--model", str(small_model)), "nope.tif")


def test_not_an_image(tmp_path, small_model, cli):
    bad = tmp_path / "notes.tif"
    bad.write_text("hello, this is not a TIFF")
    one_line_error(cli("replay", str(bad), "--model", str(small_model)), "notes.tif")


def test_single_2d_image(tmp_path, small_model, cli):
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, np.zeros((40, 40), np.uint16))
    one_line_error(cli("replay", str(path), "--model", str(small_model)), "one.tif")


def test_frames_smaller_than_a_tile(tmp_path, small_model, cli):
    timing = ScanTiming(**{**MODEL_TIMING.to_dict(), "width_px": 10, "height_px": 10})
    path = write_recording(tmp_path / "tiny.tif", np.zeros((50, 10, 10), np.uint16), timing)
    one_line_error(cli("replay", str(path), "--model", str(small_model)), "smaller than")


def test_incompatible_timing_points_to_train_like(recording, small_model, cli):
    result = cli("replay", str(recording), "--model", str(small_model), "--line-period-us", "1000")
    one_line_error(result, "dle-stream train --like")


def test_existing_log_is_refused_unless_overwrite(recording, small_model, tmp_path, cli):
    log = tmp_path / "run.zarr"
    ok = cli("replay", str(recording), "--model", str(small_model), "--window", "20", "--hop", "20",
                             "--log", str(log), "--no-dashboard")
    assert ok.exit_code == 0, ok.output
    one_line_error(cli("replay", str(recording), "--model", str(small_model), "--window", "20",
                                       "--log", str(log)), "--overwrite", "--append")
    again = cli("replay", str(recording), "--model", str(small_model), "--window", "20", "--hop", "20",
                                "--log", str(log), "--overwrite", "--quiet")
    assert again.exit_code == 0, again.output


def test_append_needs_a_log_and_the_same_recording(recording, small_model, tmp_path, cli, write_movie):
    one_line_error(cli("replay", str(recording), "--model", str(small_model), "--append"),
                   "--append", "--log")
    log = tmp_path / "run.zarr"
    ok = cli("replay", str(recording), "--model", str(small_model), "--window", "20", "--hop", "20",
                             "--log", str(log), "--no-dashboard")
    assert ok.exit_code == 0, ok.output
    other = write_movie("other.tif", frames=60, height=40, width=40, seed=1)
    one_line_error(cli("replay", str(other), "--model", str(small_model), "--window", "20", "--hop",
                                       "20", "--log", str(log), "--append"), "other settings", "recording")
    # the same recording again: nothing left to add, nothing duplicated
    again = cli("replay", str(recording), "--model", str(small_model), "--window", "20", "--hop", "20",
                                "--log", str(log), "--append", "--no-dashboard")
    assert again.exit_code == 0, again.output
    from dle_stream.zarr_log import open_log

    view = open_log(log)
    assert view.n_windows == 3 and list(view.frame_start) == [0, 20, 40] and view.n_frames == 60


def test_roi_outside_the_frame(recording, small_model, cli):
    one_line_error(cli("replay", str(recording), "--model", str(small_model), "--roi", "30,30,20,20"),
                   "outside", "--roi")


@pytest.mark.parametrize("flags, word", [(["--hop", "0"], "--hop"), (["--window", "3"], "--window"),
                                         (["--estimator", "guess"], "--estimator")])
def test_impossible_flags(recording, small_model, flags, word, cli):
    one_line_error(cli("replay", str(recording), "--model", str(small_model), *flags), word)


def test_rics_estimator_streams(recording, small_model, cli):
    result = cli("replay", str(recording), "--model", str(small_model), "--estimator", "rics",
                                 "--window", "40", "--hop", "20", "--no-dashboard")
    assert result.exit_code == 0, result.output
    assert "window 0 frames 0–40" in result.output


def test_unknown_model(recording, cli):
    one_line_error(cli("replay", str(recording), "--model", "no-such-model"), "no-such-model")


def test_timing_assumed_from_the_model_card_is_loud(tmp_path, small_model, cli):
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, np.random.default_rng(1).poisson(100, (50, 40, 40)).astype(np.uint16))
    result = cli("replay", str(path), "--model", str(small_model), "--window", "20", "--hop", "25",
                                 "--no-dashboard")
    assert result.exit_code == 0, result.output
    assert "ASSUMED" in result.output


def _timing_assumed_flags(log_path):
    from dle_stream.events import EstimateFlag
    from dle_stream.zarr_log import open_log

    flags = np.asarray(open_log(log_path).flags) & EstimateFlag.TIMING_ASSUMED
    assert flags.size and (flags.all() or not flags.any())  # every estimate or none
    return bool(flags.all())


def test_replay_flags_estimates_when_timing_is_assumed(tmp_path, small_model, write_movie):
    from dle_stream.session import StreamOptions, replay

    bare = tmp_path / "bare.tif"  # no timing metadata: the model card's timing is assumed
    tifffile.imwrite(bare, np.random.default_rng(1).poisson(100, (60, 20, 20)).astype(np.uint16))
    for path, assumed in ((bare, True), (write_movie("rec.tif", frames=60, height=20, width=20), False)):
        log = tmp_path / f"{path.stem}.zarr"
        replay(path, StreamOptions(model=str(small_model), window=40, hop=20, log=log, dashboard="quiet"))
        assert _timing_assumed_flags(log) is assumed, path


@pytest.mark.parametrize("assumed", [True, False])
@pytest.mark.parametrize("mode", ["replay", "live"])
def test_timing_assumed_flag_keys_off_the_typed_result_not_the_warning_text(tmp_path, small_model, write_movie,
                                                                            monkeypatch, assumed, mode):
    """replay and run flag estimates TIMING_ASSUMED from resolve_timing's ``assumed``
    fields, whatever its warnings say (here: the word ASSUMED exactly when nothing was)."""
    import dle_stream.recording as recording
    from dle_stream.recording import ResolvedTiming
    from dle_stream.session import StreamOptions, replay, run_live

    real = recording.resolve_timing

    def resolve(*args, **kwargs):
        r = real(*args, **kwargs)
        assert r.assumed == ()  # the timing is complete: only the fake below assumes
        return ResolvedTiming(r.timing, r.source, [] if assumed else ["nothing ASSUMED here"],
                              assumed=("dwell_us",) if assumed else (), defaulted=r.defaulted)

    monkeypatch.setattr(recording, "resolve_timing", resolve)
    log = tmp_path / "run.zarr"
    opts = StreamOptions(model=str(small_model), window=40, hop=20, log=log, dashboard="quiet")
    if mode == "replay":
        replay(write_movie("rec.tif", frames=60, height=20, width=20), opts)
    else:
        run_live(opts, demo=True, frames=60, height=20, width=20, realtime=False)
    assert _timing_assumed_flags(log) is assumed


def test_run_needs_a_source(cli):
    one_line_error(cli("run"), "--demo", "--mm-config")
    one_line_error(cli("run", "--mm-config", "/no/such/rig.cfg"), "rig.cfg")


def test_nan_or_infinite_pixels_stop_with_the_file_and_frame_named(tmp_path, small_model, cli):
    """A NaN pixel in frame 50 (after the first 40-frame window): exit 2 with one line that
    names the recording and the frame; the window logged before it stays in the log."""
    from dle_stream.zarr_log import open_log

    timing = ScanTiming(**{**MODEL_TIMING.to_dict(), "width_px": 40, "height_px": 40})
    movie = np.random.default_rng(1).poisson(100, (60, 40, 40)).astype(np.float32)
    movie[50, 7, 9] = np.nan
    movie[55, 3, 3] = np.inf
    path = write_recording(tmp_path / "nan.tif", movie, timing)
    log = tmp_path / "nan.zarr"
    result = cli("replay", str(path), "--model", str(small_model), "--hop", "10", "--log", str(log),
                                 "--no-dashboard")
    one_line_error(result, "nan.tif", "frame 50", "NaN or infinite")
    view = open_log(log)
    assert view.n_windows == 2  # windows ending at frames 40 and 50 (frame 49): logged before the bad frame
    assert np.isfinite(np.asarray(view.d)).all()


def test_a_scan_no_model_serves_names_the_nearest_model_and_the_train_command(tmp_path, cli):
    """The recording says how it was scanned (lines of 1000 dwell times: outside the shipped
    models' scan and the shipped family's box): the refusal names the scan, the nearest model
    and the exact train command."""
    timing = ScanTiming(0.15, 8.0, 8000.0, 344_000.0, 40, 40)
    path = write_recording(tmp_path / "slow.tif", np.random.default_rng(0).poisson(100, (50, 40, 40)).astype(np.uint16),
                           timing)
    result = cli("replay", str(path), "--no-dashboard")
    one_line_error(result, "does not serve this scan", "line/dwell 1000", "nearest: brain-qd-low",
                   f"dle-stream train --like {path} --warm-from brain-qd-low")


def test_a_scan_in_the_shipped_family_s_box_is_replayed_by_it_without_flags(tmp_path, cli):
    """Lines of 377 dwell times (2× the paper's ratio): no one-scan model serves it, the shipped
    family-low does; replay uses it with no flags, says so, and logs it."""
    from dle_stream.zarr_log import open_log

    timing = ScanTiming(0.15, 8.0, 3016.0, 130_000.0, 40, 40)
    path = write_recording(tmp_path / "slow.tif", np.random.default_rng(0).poisson(100, (410, 40, 40)).astype(np.uint16),
                           timing)
    log = tmp_path / "slow.zarr"
    result = cli("replay", str(path), "--no-dashboard", "--no-check", "--log", str(log))
    assert result.exit_code == 0, result.output
    assert "using family-low" in " ".join(result.output.split())
    card = open_log(log).attrs["model_card"]
    assert card["name"] == "family-low" and card["scan_family"]  # the log names the model that ran


@pytest.mark.parametrize("content", ["junk", "npz without the windows", "an npy array"])
def test_calibrate_windows_that_are_not_saved_windows(tmp_path, small_model, cli, content):
    """`calibrate --windows FILE` with a file that is not what --save-windows writes gave a
    ValueError, KeyError or TypeError traceback."""
    path = tmp_path / "w.npz"
    if content == "junk":
        path.write_text("junk")
    elif content == "an npy array":
        with path.open("wb") as fh:
            np.save(fh, np.zeros(3))
    else:
        np.savez(path, other=np.zeros(3))
    result = cli("calibrate", str(small_model), "--windows", str(path))
    one_line_error(result, "--windows", "w.npz", "--save-windows")
    assert "allow_pickle" not in result.output  # numpy's advice to load pickles is not ours to give
