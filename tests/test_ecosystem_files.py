"""Files written by the ecosystem's own acquisition tools (issue 15, item 9): each is made
with the real pymmcore-plus writer driving the demo camera through a UniMMCore, then read
back with its timing evidence (pixel size, per-frame timestamps, image numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

pytest.importorskip("pymmcore_plus")
useq = pytest.importorskip("useq")

from dle_stream import ScanTiming  # noqa: E402
from dle_stream.cli import app  # noqa: E402
from dle_stream.recording import open_recording, resolve_timing  # noqa: E402
from dle_stream.sources.demo_camera import create_demo_core  # noqa: E402

H, W, N = 40, 60, 45
TIMING = ScanTiming(pixel_size_um=0.2, dwell_us=4.0, line_period_us=500.0, frame_period_us=25000.0,
                    width_px=W, height_px=H, bidirectional=True)
runner = CliRunner()


@pytest.fixture
def acquire():
    """Run an N-frame MDA time series of the demo camera (uint16, pixel size 0.2 µm) into ``output``."""
    cores = []

    def run(output, n=N):
        core = create_demo_core(timing=TIMING, realtime=False, dtype="uint16")
        cores.append(core)
        core.definePixelSizeConfig("px")
        core.setPixelSizeUm("px", 0.2)
        core.setPixelSizeConfig("px")
        frames = []
        core.mda.events.frameReady.connect(lambda img, event, meta: frames.append(np.array(img)))
        core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": n}), output=output)
        return np.stack(frames)

    yield run
    for core in cores:
        core.unloadAllDevices()


def check_evidence(rec, movie):
    assert (rec.n_frames, rec.height, rec.width) == (len(movie), H, W)
    assert rec.timing_fields["pixel_size_um"] == pytest.approx(0.2)
    stamps = rec.frame_timestamps_s
    assert stamps is not None and len(stamps) == len(movie) and np.all(np.diff(stamps) >= 0)
    np.testing.assert_array_equal(rec.read(0, rec.n_frames), movie)


def test_image_sequence_writer_folder(tmp_path, acquire):
    from pymmcore_plus.mda.handlers import ImageSequenceWriter

    folder = tmp_path / "seq"
    movie = acquire(ImageSequenceWriter(folder))
    with open_recording(folder) as rec:
        assert rec.format == "image-sequence" and rec.timing_source == "pymmcore-plus"
        check_evidence(rec, movie)
        np.testing.assert_array_equal(rec.frame_image_numbers, np.arange(N))
        assert not rec.truncated


def test_image_sequence_stopped_early_is_incomplete(tmp_path, acquire):
    from pymmcore_plus.mda.handlers import ImageSequenceWriter

    folder = tmp_path / "seq"
    acquire(ImageSequenceWriter(folder))
    last = sorted(folder.glob("*.tif"))
    for f in last[-5:]:
        f.unlink()
    last[-6].write_bytes(last[-6].read_bytes()[:1000])  # the frame being written when it stopped
    with open_recording(folder) as rec:
        assert rec.truncated and rec.n_frames == N - 6
        assert f"{N - 6} complete frames of the {N}" in rec.truncation_note


def test_image_sequence_replay_counts_a_lost_frame_as_a_gap(tmp_path, acquire):
    from pymmcore_plus.mda.handlers import ImageSequenceWriter

    from dle_stream.model import DLEModel, ModelConfig
    from dle_stream.model_package import ModelCard, save_model_package

    model = tmp_path / "tiny"
    cfg = ModelConfig(temporal_channels=16, head_hidden=16)
    save_model_package(model, DLEModel(cfg), ModelCard(
        name="tiny", tile_height=20, tile_width=20, window_frames=16, d_min_um2_s=0.0, d_max_um2_s=1.5,
        scan_timing=TIMING.to_dict(), pixel_size_um=0.2, architecture=cfg.to_dict()))
    folder = tmp_path / "seq"
    acquire(ImageSequenceWriter(folder))
    sorted(folder.glob("*.tif"))[20].unlink()  # a frame lost on the way to disk: its ImageNumber is missing
    meta = json.loads((folder / "_frame_metadata.json").read_text())
    (folder / "_frame_metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if (folder / k).exists()}))
    result = runner.invoke(app, ["replay", str(folder), "--model", str(model), "--window", "16", "--hop", "4",
                                 "--quiet", "--dwell-us", "4", "--line-period-us", "500", "--frame-period-us", "25000",
                                 "--bidirectional"])
    assert result.exit_code == 0, result.output
    assert f"{N - 1} frames" in result.stdout and "1 gaps" in result.stdout


def test_tensorstore_zarr(tmp_path, acquire):
    pytest.importorskip("tensorstore")
    from pymmcore_plus.mda.handlers import TensorStoreHandler

    path = tmp_path / "ts.zarr"
    movie = acquire(TensorStoreHandler(path=str(path)))
    with open_recording(path) as rec:
        assert rec.timing_source == "pymmcore-plus"
        check_evidence(rec, movie)
        np.testing.assert_array_equal(rec.frame_image_numbers, np.arange(N))


def test_ome_tiff_from_mda_run(tmp_path, acquire):
    path = tmp_path / "mda.ome.tif"
    movie = acquire(str(path))
    with open_recording(path) as rec:
        assert rec.format == "ome-tiff"
        check_evidence(rec, movie)


def test_ome_zarr_from_mda_run(tmp_path, acquire):
    path = tmp_path / "mda.ome.zarr"
    movie = acquire(str(path))
    with open_recording(path) as rec:
        assert rec.format == "ome-zarr"
        check_evidence(rec, movie)


# ------------------------------------------------------------- ImageJ tunit
@pytest.mark.parametrize("finterval, tunit", [(61.652, "ms"), (0.061652, "sec"), (0.061652, None), (61652, "us"),
                                              (61652, "usec")])
def test_imagej_time_unit(tmp_path, finterval, tunit):
    meta = {"axes": "TYX", "finterval": finterval, "unit": "um", **({"tunit": tunit} if tunit else {})}
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((5, 20, 20), np.uint16), imagej=True, resolution=(1 / 0.15, 1 / 0.15),
                     metadata=meta)
    with open_recording(path) as rec:
        assert rec.timing_fields["frame_period_us"] == pytest.approx(61652.0)


def test_imagej_negative_interval_is_named(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((5, 20, 20), np.uint16), imagej=True, resolution=(1 / 0.15, 1 / 0.15),
                     metadata={"axes": "TYX", "finterval": -0.5, "unit": "um"})
    with open_recording(path) as rec:
        assert "frame_period_us" not in rec.timing_fields
        _, _, warnings = resolve_timing(rec, fallback=ScanTiming.reference(), fallback_label="the model card")
    assert any("finterval=-0.5" in w and "not a positive time" in w for w in warnings)
