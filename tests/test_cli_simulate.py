"""`dle-stream simulate` and the CLI shell: files, metadata, truth, and one-line errors."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dle_stream import ScanTiming, __version__
from dle_stream.cli import app
from dle_stream.recording import open_recording
from dle_stream.training.recording_sim import parse_d_map, tile_grid

runner = CliRunner()


def test_version_and_help_of_every_command():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    for cmd in ("simulate", "train", "models"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_simulate_writes_a_recording_with_timing_and_truth(tmp_path):
    out = tmp_path / "rec.tif"
    result = runner.invoke(app, ["simulate", str(out), "--size", "40x60", "--frames", "30", "--d", "0.3,1.2",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    with open_recording(out) as rec:
        assert (rec.n_frames, rec.height, rec.width) == (30, 40, 60)
        # 40 lines of 60 px fit in the preset's line and frame period: its timing is kept
        ref = ScanTiming.reference()
        assert rec.timing == ScanTiming(**{**ref.to_dict(), "width_px": 60, "height_px": 40})
        frames = rec.read(0, 30)
    truth = json.loads((tmp_path / "rec.tif.truth.json").read_text())
    assert len(truth["tiles"]) == 6
    by_col = {tuple(t["bbox"][:2]): t["d_um2_s"] for t in truth["tiles"]}
    assert by_col[(0, 0)] == pytest.approx(0.3) and by_col[(20, 40)] == pytest.approx(1.2)
    assert np.isfinite(frames).all() and frames.std() > 0
    # same seed, same movie
    out2 = tmp_path / "rec2.tif"
    runner.invoke(app, ["simulate", str(out2), "--size", "40x60", "--frames", "30", "--d", "0.3,1.2", "--seed", "3"])
    with open_recording(out2) as rec2:
        assert np.array_equal(rec2.read(0, 30), frames)


def test_simulate_frame_too_large_for_the_preset_periods_keeps_dwell_and_retrace(tmp_path):
    out = tmp_path / "big.ome.tif"
    result = runner.invoke(app, ["simulate", str(out), "--size", "64x64", "--frames", "3"])
    assert result.exit_code == 0, result.output
    with open_recording(out) as rec:
        assert rec.timing == ScanTiming.reference().with_frame_size(64, 64)
        assert rec.timing.line_period_us == pytest.approx(64 * 8 + 1348)
        assert rec.timing.frame_period_us == pytest.approx(64 * rec.timing.line_period_us + 61652 - 20 * 1508)


def test_simulate_long_recording_in_chunks_to_zarr(tmp_path):
    from dle_stream.training.priors import get_preset
    from dle_stream.training.recording_sim import simulate_recording

    p = get_preset("low")
    rec = simulate_recording(tmp_path / "r.zarr", p, frames=45, height=20, width=20, timing=p.timing,
                             d_spec="1.0", seed=0, chunk_frames=20)
    with open_recording(rec.path) as r:
        assert r.n_frames == 45 and r.timing == p.timing
        data = r.read(0, 45)
    assert data.shape == (45, 20, 20) and np.isfinite(data).all()
    # every chunk was written: the last partial chunk holds light like the first
    assert data[40:].std() > 0.5 * data[:20].std()


@pytest.mark.parametrize("args, word", [
    (["--d", "fast"], "--d"),
    (["--d", "-1"], "≥ 0"),
    (["--size", "ax3"], "--size"),
    (["--preset", "medium"], "--preset"),
    (["--frames", "0"], "--frames"),
    (["--dwell-us", "-3"], "dwell"),
])
def test_bad_flags_give_one_line_errors(tmp_path, args, word):
    result = runner.invoke(app, ["simulate", str(tmp_path / "x.tif"), *args])
    assert result.exit_code == 2
    assert word in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.tif").exists()


def test_d_map_bands_and_tiles():
    m = parse_d_map("0.3,1.2", 10, 40, None)
    assert np.all(m[:, :20] == 0.3) and np.all(m[:, 20:] == 1.2)
    assert parse_d_map(None, 4, 4, None) is None
    tiles = tile_grid(45, 30, 20, 20)
    covered = np.zeros((45, 30), int)
    for r0, c0, h, w in tiles:
        covered[r0:r0 + h, c0:c0 + w] += 1
    assert np.all(covered == 1)


def test_the_tiles_of_a_simulated_recording_share_one_microscope(tmp_path):
    """The tiles of a recording were simulated with their own PSF, background, brightness and
    gain each, as independent training movies: a recording whose background level jumped
    from tile to tile (the 20th percentile of the pixel values, which the background sets,
    spread over 17–19 counts across 8 tiles), and whose tiles looked more independent
    than a real recording's. One instrument now serves every tile, and the truth file says
    which."""
    from dle_stream.training.priors import get_preset
    from dle_stream.training.recording_sim import simulate_recording

    timing = ScanTiming(**{**ScanTiming.reference().to_dict(), "width_px": 80, "height_px": 40})
    rec = simulate_recording(tmp_path / "r.tif", get_preset("low"), frames=60, height=40, width=80, timing=timing,
                             d_spec="0.3", seed=6)
    with open_recording(rec.path) as r:
        frames = r.read(0, 60).astype(float)
    floor = [np.percentile(frames[:, r0:r0 + 20, c0:c0 + 20], 20) for r0 in (0, 20) for c0 in (0, 20, 40, 60)]
    assert max(floor) - min(floor) < 6.0
    instrument = json.loads((tmp_path / "r.tif.truth.json").read_text())["instrument"]
    assert set(instrument) == {"psf_sigma_xy_um", "psf_sigma_z_um", "background_photons", "brightness_photons",
                               "gain", "offset"}
    assert 0.02 <= instrument["psf_sigma_xy_um"] < 1.0 and instrument["background_photons"] > 0
