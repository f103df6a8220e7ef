"""Frame sources: the demo camera through a real UniMMCore (MDA, direct sequence, live),
gap and stall reporting, scan timing from device properties, and file replay."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dle_stream.errors import DleStreamError
from dle_stream.events import FrameEvent
from dle_stream.recording import write_recording
from dle_stream.sources import (
    DEMO_CAMERA_MAPPING,
    FileSource,
    MicroManagerSource,
    SourceStalled,
    timing_from_core,
)
from dle_stream.sources.scan_properties import check_mapping, parse_transform, read_scan_properties
from dle_stream.timing import ScanTiming

pytest.importorskip("pymmcore_plus")
from dle_stream.sources.demo_camera import SimulatedScan, create_demo_core, get_demo_camera  # noqa: E402

H, W = 40, 60  # 2 × 3 tiles of 20 px: small frames keep the simulator fast
TIMING = ScanTiming(pixel_size_um=0.2, dwell_us=4.0, line_period_us=500.0, frame_period_us=25000.0,
                    width_px=W, height_px=H, bidirectional=True)


@pytest.fixture
def make_core():
    cores = []

    def make(**kwargs):
        kwargs.setdefault("timing", TIMING)
        kwargs.setdefault("realtime", False)
        core = create_demo_core(**kwargs)
        cores.append(core)
        return core

    yield make
    for core in cores:
        try:
            if core.mda.is_running():
                core.mda.cancel()
            if core.isSequenceRunning():
                core.stopSequenceAcquisition()
        finally:
            core.unloadAllDevices()


def collect(source, limit=None, max_s=20.0):
    """Frames and notices from a source, with a safety limit on time."""
    frames, notices = [], []
    t0 = time.perf_counter()
    for item in source:
        (notices if isinstance(item, SourceStalled) else frames).append(item)
        if limit is not None and len(frames) >= limit:
            break
        assert time.perf_counter() - t0 < max_s, "source did not end"
    return frames, notices


# ------------------------------------------------------------------------ MDA
def test_mda_time_series_delivers_every_frame_in_order(make_core):
    core = make_core(seed=3, d_spec="0.3,1.2")
    assert core.getImageHeight() == H and core.getImageWidth() == W
    source = MicroManagerSource(core, n_frames=200, mode="mda", stall_timeout_s=10)
    assert source.effective_mode == "mda"
    with source:
        frames, notices = collect(source)
    assert source.error is None and not notices
    assert len(frames) == 200
    assert all(isinstance(f, FrameEvent) for f in frames)
    assert [f.index for f in frames] == list(range(200))
    assert [f.image_number for f in frames] == list(range(200))
    assert source.gaps == 0 and source.images_lost == 0
    assert all(f.frame.shape == (H, W) and f.frame.dtype == np.float32 for f in frames)
    stamps = np.array([f.timestamp_s for f in frames])
    assert np.all(np.diff(stamps) >= 0)
    assert [int(f.metadata["camera"]["Simulated-FrameNumber"]) for f in frames] == list(range(200))

    # exactly the simulator's frames, in order: same seed, same frames
    movie = np.stack([f.frame for f in frames])
    camera = get_demo_camera(core)
    reference = SimulatedScan(TIMING, camera.d_map, seed=3)
    try:
        expected = np.stack([reference.next_frame()[0] for _ in range(200)])
    finally:
        reference.close()
    np.testing.assert_array_equal(movie, expected)

    # ground truth: the D map per tile; particles only ever add light to the noise floor
    np.testing.assert_allclose(camera.d_map[:, : W // 2], 0.3)
    np.testing.assert_allclose(camera.d_map[:, W // 2:], 1.2)
    for tile in camera.ground_truth():
        r0, c0, h, w = tile["bbox"]
        assert tile["d_um2_s"] == pytest.approx(float(camera.d_map[r0:r0 + h, c0:c0 + w].mean()))
        level, noise = _noise_floor(tile)
        pixels = movie[:, r0:r0 + h, c0:c0 + w]
        assert float(np.median(pixels)) >= level - 0.1 * noise
        assert _robust_std(pixels) >= 0.9 * noise


READ_VAR = (0.5**2 + 0.5 * 2.5 + 2.5**2) / 3  # E[std²] of the read noise, std uniform on 0.5–2.5


def _noise_floor(tile: dict) -> tuple[float, float]:
    """Expected level and std of a pixel with no particle light: gain·(Poisson(bg) + read − offset)."""
    gain, bg = tile["gain"], tile["background_photons"]
    return gain * (bg - tile["offset"]), gain * np.sqrt(bg + READ_VAR)


def _robust_std(x: np.ndarray) -> float:
    return 1.4826 * float(np.median(np.abs(x - np.median(x))))


def test_noise_only_demo_frames_have_the_expected_level_and_noise(make_core):
    core = make_core(seed=5, priors={"particles": "fixed", "particles_max": 0})
    with MicroManagerSource(core, n_frames=60, mode="mda") as source:
        frames, _ = collect(source)
    movie = np.stack([f.frame for f in frames])
    for tile in get_demo_camera(core).ground_truth():
        r0, c0, h, w = tile["bbox"]
        assert tile["n_particles"] == 0
        level, noise = _noise_floor(tile)
        pixels = movie[:, r0:r0 + h, c0:c0 + w]
        assert float(pixels.mean()) == pytest.approx(level, abs=0.02 * noise)
        assert float(pixels.std()) == pytest.approx(noise, rel=0.03)


def test_mda_realtime_paces_frames_at_the_frame_period(make_core):
    core = make_core(realtime=True, repeat_frames=5)
    source = MicroManagerSource(core, n_frames=12, mode="mda")
    t0 = time.perf_counter()
    with source:
        frames, _ = collect(source)
    elapsed = time.perf_counter() - t0
    assert len(frames) == 12 and source.error is None
    assert elapsed >= 12 * TIMING.frame_period_us * 1e-6 * 0.95
    stamps = np.array([f.timestamp_s for f in frames])
    # frame n is not handed out before (n+1)·F: the stamps span at least 11 frame periods
    # (a loaded machine may deliver late frames in bursts, so single steps can be short)
    assert stamps[-1] - stamps[0] >= 11 * TIMING.frame_period_us * 1e-6 * 0.9
    assert np.all(np.diff(stamps) >= 0)


def test_mda_stop_cancels_the_acquisition(make_core):
    core = make_core(repeat_frames=10)
    source = MicroManagerSource(core, n_frames=5000, mode="mda", queue_size=8)
    frames, _ = collect(source, limit=20)
    t0 = time.perf_counter()
    source.stop()
    rest, _ = collect(source)
    assert time.perf_counter() - t0 < 5
    assert len(frames) == 20 and len(rest) <= 8 + 1
    assert not core.mda.is_running()
    assert source.error is None


def test_direct_sequence_for_endless_runs(make_core):
    core = make_core(repeat_frames=10)
    source = MicroManagerSource(core, n_frames=None, mode="mda")
    assert source.effective_mode == "sequence"
    frames, _ = collect(source, limit=50)
    source.stop()
    assert [f.image_number for f in frames] == list(range(50))
    assert not core.isSequenceRunning()


# ------------------------------------------------------------------------ live
def test_live_mode_yields_frames_and_stop_ends_it(make_core):
    core = make_core(realtime=True, repeat_frames=5)
    source = MicroManagerSource(core, mode="live")
    frames, _ = collect(source, limit=10)
    t0 = time.perf_counter()
    source.stop()
    collect(source)  # ends
    assert time.perf_counter() - t0 < 3
    assert len(frames) == 10 and all(f.frame.shape == (H, W) for f in frames)
    assert not core.isSequenceRunning()
    assert source.gaps == 0


def test_live_mode_overflow_is_counted_from_image_numbers(make_core):
    core = make_core(repeat_frames=10)
    core.setCircularBufferMemoryFootprint(1)  # ~100 frames of 40×60 float32
    source = MicroManagerSource(core, mode="live", queue_size=2)
    source.start()
    time.sleep(1.5)  # the consumer falls far behind: the circular buffer overwrites
    frames, _ = collect(source, limit=40)
    source.stop()
    numbers = [f.image_number for f in frames]
    assert source.gaps >= 1 and source.images_lost > 0
    lost = sum(f.metadata.get("images_lost", 0) for f in frames)
    assert lost == numbers[-1] - numbers[0] - (len(frames) - 1)
    assert [f.index for f in frames] == list(range(len(frames)))


def test_gap_in_image_number_is_reported_on_the_next_frame(make_core):
    core = make_core()
    source = MicroManagerSource(core, mode="mda", start=False)  # listens to frameReady
    source.start()
    img = np.zeros((H, W), np.float32)
    for n in (0, 1, 2, 5, 6, 10):  # a camera that skipped 3, 4 and 7–9
        meta = {"camera_metadata": {"ImageNumber": str(n), "ElapsedTime-ms": f"{n * 50.0}"}}
        core.mda.events.frameReady.emit(img, None, meta)
    source.stop()
    frames, notices = collect(source)
    assert [f.image_number for f in frames] == [0, 1, 2, 5, 6, 10]
    assert [f.index for f in frames] == list(range(6))
    assert [f.metadata.get("images_lost", 0) for f in frames] == [0, 0, 0, 2, 0, 3]
    assert source.gaps == 2 and source.images_lost == 5
    assert frames[3].timestamp_s == pytest.approx(0.25)


# ---------------------------------------------------------------------- stalls
def test_stalled_camera_gives_a_notice_instead_of_hanging(make_core):
    core = make_core(repeat_frames=5)
    camera = get_demo_camera(core)
    camera.stall(1.2)
    source = MicroManagerSource(core, mode="live", stall_timeout_s=0.3)
    t0 = time.perf_counter()
    items = []
    for item in source:
        items.append((time.perf_counter() - t0, item))
        if isinstance(item, FrameEvent):
            break
    source.stop()
    first_t, first = items[0]
    assert isinstance(first, SourceStalled)
    assert 0.25 <= first_t < 1.0 and first.waited_s >= 0.3 and first.frames_so_far == 0
    assert "no frame" in first.message
    assert isinstance(items[-1][1], FrameEvent)  # frames resume after the stall


def test_frames_timeout_overrides_the_default(make_core):
    source = MicroManagerSource(make_core(), mode="mda", start=False, stall_timeout_s=60)
    t0 = time.perf_counter()
    item = next(source.frames(timeout_s=0.2))  # no MDA runs: nothing comes
    assert isinstance(item, SourceStalled) and time.perf_counter() - t0 < 1.0
    source.stop()


# --------------------------------------------------------------- scan timing
def test_timing_read_from_demo_camera_properties_equals_the_configured_timing(make_core):
    core = make_core()
    fields, missing = timing_from_core(core, DEMO_CAMERA_MAPPING)
    assert missing == []
    assert ScanTiming.from_dict(fields) == TIMING


def test_mapping_transforms_constants_and_missing_properties(make_core):
    core = make_core()
    label = core.getCameraDevice()
    mapping = {
        "dwell_us": {"device": label, "property": "DwellTimeUs", "transform": "x*1000"},  # pretend ms
        "line_period_us": {"device": "$camera", "property": "LinePeriodUs", "transform": "1e6/x"},
        "frame_period_us": {"value": 1234.5},
        "pixel_size_um": {"device": label, "property": "NoSuchProperty"},
        "height_px": {"value": 512},
    }
    fields, missing, notes = read_scan_properties(core, mapping)
    assert fields["dwell_us"] == pytest.approx(4000.0)
    assert fields["line_period_us"] == pytest.approx(1e6 / 500.0)
    assert fields["frame_period_us"] == 1234.5
    assert fields["height_px"] == 512 and fields["width_px"] == W
    assert missing == ["pixel_size_um", "bidirectional"]
    assert any("NoSuchProperty" in n for n in notes)
    assert parse_transform("1e6/x")(125000.0) == pytest.approx(8.0)
    assert parse_transform("x/1000")(1500.0) == pytest.approx(1.5)
    for bad in ("__import__('os')", "x**2", "y*2", "x/0"):
        with pytest.raises(DleStreamError):
            parse_transform(bad)
    with pytest.raises(DleStreamError):
        check_mapping({"dwell": {"device": "a", "property": "b"}})
    with pytest.raises(DleStreamError):
        check_mapping({"dwell_us": {"device": "a"}})


# ------------------------------------------------------------------ replay
def _small_recording(tmp_path, n=10, period_us=50_000.0):
    timing = ScanTiming(pixel_size_um=0.15, dwell_us=1.0, line_period_us=100.0, frame_period_us=period_us,
                        width_px=16, height_px=12)
    movie = np.random.default_rng(0).normal(size=(n, 12, 16)).astype(np.float32)
    path = write_recording(tmp_path / "small.tif", movie, timing)
    return path, movie


def test_file_source_yields_every_frame(tmp_path):
    path, movie = _small_recording(tmp_path)
    with FileSource(path) as source:
        frames = list(source)
    assert len(frames) == 10 and [f.index for f in frames] == list(range(10))
    np.testing.assert_array_equal(np.stack([f.frame for f in frames]), movie)
    np.testing.assert_allclose([f.timestamp_s for f in frames], np.arange(10) * 0.05)


def test_file_source_paces_in_real_time(tmp_path):
    path, _ = _small_recording(tmp_path)
    t0 = time.perf_counter()
    with FileSource(path, realtime=True) as source:
        frames = list(source)
    elapsed = time.perf_counter() - t0
    assert len(frames) == 10
    assert 0.44 <= elapsed < 2.0
    t0 = time.perf_counter()
    with FileSource(path, realtime=True, frame_period_s=0.01) as source:
        assert len(list(source)) == 10
    assert 0.085 <= time.perf_counter() - t0 < 1.0
