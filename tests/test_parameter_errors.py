"""Library errors name the parameter a Python caller passed, never a command-line flag;
the CLI shows the same errors with its flags (docs/design.md §2: the CLI is a thin layer).

Each case calls a library function as a Python caller would, checks the error's class,
that ``parameters`` names the keyword argument, that the message holds ``name=value``
and no ``--flag``, and that :meth:`ParameterError.message_for` with the CLI's flags
gives the flag."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from dle_stream import ScanTiming
from dle_stream.cli import CLI_FLAGS
from dle_stream.errors import (
    DleStreamError,
    EstimatorChoiceError,
    ParameterError,
    RoiError,
    TimingError,
    arg,
    render_parameters,
)
from dle_stream.recording import write_recording

REFERENCE = ScanTiming.reference()


def no_flags(error: DleStreamError) -> str:
    text = str(error)
    assert "--" not in text, text
    assert "\ue000" not in text, text  # no parameter mark left in the message
    return text


def test_arg_reads_as_python_and_as_the_cli_flag():
    error = ParameterError(f"{arg('hop', 0)}: must be at least 1 frame; or give {arg('demo', True)} or "
                           f"{arg('roi', '1,2')} or {arg('channel', placeholder='N')} or {arg('unmapped', 3)}")
    assert str(error) == "hop=0: must be at least 1 frame; or give demo=True or roi='1,2' or channel=N or unmapped=3"
    assert error.parameters == ("hop", "demo", "roi", "channel", "unmapped") and error.parameter == "hop"
    assert error.message_for(CLI_FLAGS) == ("--hop 0: must be at least 1 frame; or give --demo or --roi '1,2' or "
                                            "--channel N or unmapped=3")
    prefixed = error.with_prefix("rec.tif: ")
    assert type(prefixed) is ParameterError and prefixed.message_for(CLI_FLAGS).startswith("rec.tif: --hop 0:")
    assert render_parameters(f"pass {arg('dwell_us')}", {"dwell_us": "--dwell-us"}) == "pass --dwell-us"


def test_scan_timing_names_its_fields():
    with pytest.raises(TimingError) as info:
        ScanTiming(0.15, 8.0, 100.0, 61652.0, 20, 20)  # 20 px × 8 µs do not fit in a 100 µs line
    text = no_flags(info.value)
    assert "fix line_period_us, dwell_us or the frame width" in text
    assert info.value.parameters == ("line_period_us", "dwell_us")
    assert "fix --line-period-us, --dwell-us or the frame width" in info.value.message_for(CLI_FLAGS)
    with pytest.raises(TimingError, match="dwell_us must be a positive"):
        ScanTiming(0.15, -1.0, 1508.0, 61652.0, 20, 20)


def test_runner_settings_and_rois_name_the_argument():
    from dle_stream.runner import StreamRunner
    from dle_stream.stream_estimators import make_stream_estimator
    from dle_stream.tiling import TileLayout, grid_layout, parse_roi, read_rois

    class Tiny:
        name, tile_shape, window_frames, min_frames, d_max_um2_s = "tiny", (20, 20), 40, 4, 1.0
        from dle_stream.likelihood import DGrid as _G
        grid = _G()

    layout = grid_layout(40, 40, 20, 20)
    with pytest.raises(ParameterError) as info:
        StreamRunner(Tiny(), layout, REFERENCE, window=40, hop=0)
    assert no_flags(info.value).startswith("hop=0:") and info.value.message_for(CLI_FLAGS).startswith("--hop 0:")
    with pytest.raises(RoiError) as info:
        StreamRunner(Tiny(), TileLayout(40, 40, [], []), REFERENCE, window=40, hop=10)
    assert "check layout" in no_flags(info.value) and "--tiles/--roi/--rois" in info.value.message_for(CLI_FLAGS)
    with pytest.raises(RoiError) as info:
        parse_roi("0,0,4.5,4")
    assert no_flags(info.value).startswith("roi='0,0,4.5,4': use x,y,w,h in whole pixels")
    assert info.value.message_for(CLI_FLAGS).startswith("--roi '0,0,4.5,4': use x,y,w,h")
    with pytest.raises(RoiError) as info:
        read_rois("no-such-rois.csv")
    assert no_flags(info.value).startswith("rois_file=no-such-rois.csv: no such file")
    with pytest.raises(EstimatorChoiceError) as info:
        make_stream_estimator("guess", "brain-qd-low", REFERENCE)
    assert no_flags(info.value).startswith("estimator='guess': use one of dle, classic, rics")
    assert info.value.message_for(CLI_FLAGS).startswith("--estimator 'guess':")


def test_file_source_names_frame_period_s_not_a_flag(tmp_path):
    """It told users to pass --frame-period-ms, a flag that does not exist."""
    from dle_stream.sources import FileSource

    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, np.zeros((5, 20, 20), np.uint16))  # no timestamps, no scan timing
    with pytest.raises(ParameterError) as info:
        FileSource(path, realtime=True)
    text = no_flags(info.value)
    assert "frame_period_s" in text and "realtime=False" in text
    with pytest.raises(ParameterError, match=r"^frame_period_s=-1\.0: "):
        FileSource(path, frame_period_s=-1.0)


def test_run_log_recording_writer_and_bench_name_their_parameters(tmp_path):
    """They told Python callers to pass --overwrite, --append, --log, --suite, --n, --estimators."""
    from dle_stream.evaluation.bench import run_suite
    from dle_stream.evaluation.bench_combine import run_combine
    from dle_stream.zarr_log import ZarrLog

    bboxes = np.array([[0, 0, 20, 20]])
    path = tmp_path / "run.zarr"
    ZarrLog.create(path, tile_bboxes=bboxes, attrs={"mode": "replay", "hop_frames": 50}).close()
    with pytest.raises(ParameterError) as info:
        ZarrLog.create(path, tile_bboxes=bboxes)
    assert "use overwrite=True or append=True, or choose another log path" in no_flags(info.value)
    assert "use --overwrite or --append, or choose another --log path" in info.value.message_for(CLI_FLAGS)
    with pytest.raises(ParameterError) as info:
        ZarrLog.create(path, tile_bboxes=bboxes, overwrite=True, append=True)
    assert no_flags(info.value) == "overwrite=True and append=True exclude each other; give only one"
    with pytest.raises(ParameterError) as info:
        ZarrLog.create(path, tile_bboxes=bboxes, attrs={"mode": "replay", "hop_frames": 20}, append=True)
    assert "the hop (hop) differs; append=True needs the same ones" in no_flags(info.value)
    assert "the hop (--hop) differs; --append needs the same ones, or choose another --log path" in \
        info.value.message_for(CLI_FLAGS)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ParameterError) as info:
        ZarrLog.create(blocker / "run.zarr", tile_bboxes=bboxes)
    assert no_flags(info.value).endswith("choose a writable location for the run log (log)")
    assert info.value.message_for(CLI_FLAGS).endswith("choose a writable location for the run log (--log)")

    rec = write_recording(tmp_path / "rec.tif", np.zeros((3, 20, 20), np.uint16),
                          ScanTiming(**{**REFERENCE.to_dict(), "width_px": 20, "height_px": 20}))
    with pytest.raises(ParameterError) as info:
        write_recording(rec, np.zeros((3, 20, 20), np.uint16),
                        ScanTiming(**{**REFERENCE.to_dict(), "width_px": 20, "height_px": 20}))
    assert "pass overwrite=True to replace it" in no_flags(info.value)
    assert "pass --overwrite to replace it" in info.value.message_for(CLI_FLAGS)

    with pytest.raises(ParameterError) as info:
        run_suite("mid", 10, 1, ["dle"])
    assert no_flags(info.value) == "suite=mid: no such suite; use suite=low, high or combine"
    assert info.value.message_for(CLI_FLAGS) == "--suite mid: no such suite; use --suite low, high or combine"
    with pytest.raises(ParameterError) as info:
        run_suite("low", 10, 1, ["magic"])
    assert no_flags(info.value).startswith("estimators=magic: choose from dle,")
    with pytest.raises(ParameterError) as info:
        run_suite("low", 1, 1, ["dle"])
    assert info.value.message_for(CLI_FLAGS) == "--n 1: need at least 2 movies"
    with pytest.raises(ParameterError) as info:
        run_combine("brain-qd-low", n=1)
    assert no_flags(info.value) == "n=1: need at least 2 groups per cell"
    with pytest.raises(ParameterError) as info:
        run_combine("brain-qd-low", n=2, density="fog")
    assert "density='fog'" in no_flags(info.value) and "box" in no_flags(info.value)


def test_session_names_its_options(tmp_path, small_model):
    from dle_stream.session import StreamOptions, replay, run_live

    rec = write_recording(tmp_path / "rec.tif", np.zeros((30, 20, 20), np.uint16),
                          ScanTiming(**{**REFERENCE.to_dict(), "width_px": 20, "height_px": 20}))
    with pytest.raises(ParameterError) as info:
        replay(rec, StreamOptions(model=str(small_model), window=0))
    assert no_flags(info.value).startswith("window=0: must be at least 1 frame")
    with pytest.raises(ParameterError) as info:
        replay(rec, StreamOptions(model=str(small_model), window=100, dashboard="quiet"))
    assert "use a shorter window (at most 30)" in no_flags(info.value)
    with pytest.raises(RoiError) as info:
        replay(rec, StreamOptions(model=str(small_model), tiles="hexagons", dashboard="quiet"))
    assert no_flags(info.value).startswith("tiles='hexagons': only 'grid' is supported (or give ROIs: roi or rois_file)")
    with pytest.raises(ParameterError) as info:
        run_live(StreamOptions(model=str(small_model)))
    assert "give either demo=True or mm_config" in no_flags(info.value)
    with pytest.raises(ParameterError) as info:
        run_live(StreamOptions(model=str(small_model)), mm_config=tmp_path / "rig.cfg")
    assert no_flags(info.value).startswith(f"mm_config={tmp_path / 'rig.cfg'}: no such file")


def test_timing_assumed_warning_names_fields_for_python_and_flags_for_the_cli(tmp_path, small_model, cli):
    from dle_stream.session import StreamOptions, replay

    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, np.random.default_rng(1).poisson(100, (45, 20, 20)).astype(np.uint16))
    result = replay(path, StreamOptions(model=str(small_model), window=20, hop=25, dashboard="quiet"))
    (assumed,) = [w for w in result.warnings if "ASSUMED" in w]
    assert "--" not in assumed and "give pixel_size_um, dwell_us, line_period_us, frame_period_us" in assumed
    result = cli("replay", path, "--model", small_model, "--window", "20", "--hop", "25", "--no-dashboard")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("give --pixel-size-um, --dwell-us, --line-period-us, --frame-period-us, --bidirectional or a timing file "
            "(--timing)") in text


def test_cli_names_its_flags(tmp_path, small_model, cli, write_movie):
    rec = write_movie("rec.tif", frames=30, height=40, width=40)
    error = cli.error

    assert "--roi '0,0,4.5,4': use x,y,w,h" in error("replay", str(rec), "--model", str(small_model),
                                                     "--roi", "0,0,4.5,4")
    assert "--window 0: must be at least 1 frame" in error("replay", str(rec), "--model", str(small_model),
                                                          "--window", "0")
    assert "fix --line-period-us, --dwell-us or the frame width" in error(
        "replay", str(rec), "--model", str(small_model), "--line-period-us", "100")
    multi = tmp_path / "tcyx.tif"
    tifffile.imwrite(multi, np.zeros((7, 3, 40, 40), np.uint16), imagej=True, metadata={"axes": "TCYX"})
    assert "use --channel N with N in 0..2" in error("replay", str(multi), "--model", str(small_model))
    assert "--channel 5 is out of range" in error("replay", str(multi), "--model", str(small_model), "--channel", "5")


def test_combine_bench_on_a_steady_density_says_so_in_its_results():
    """`bench --suite combine --density box`: independent steady-density windows, recorded in the results."""
    from dle_stream.evaluation.bench_combine import markdown, run_combine

    doc = run_combine("brain-qd-low", n=2, fractions=(0.5,), ks=(1, 2), density="box")
    assert doc["density"] == "box" and "box density" in doc["priors"]
    assert [c["k"] for c in doc["cells"]] == [1, 2]
    # every simulated window counts at every K: 2 groups of 2 are also 4 single windows
    assert [c["n"] for c in doc["cells"]] == [4, 2]
    assert all(np.isfinite(c["z_mean"]) and c["d_true_um2_s"] == 0.75 for c in doc["cells"])
    assert "box density" in markdown(doc)
