"""Recordings on disk: readers, writers, timing extraction, timing precedence, bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import dle_stream
from dle_stream.cli import CLI_FLAGS
from dle_stream.errors import DleStreamError, ParameterError, TimingError
from dle_stream.recording import open_recording, resolve_timing, write_recording
from dle_stream.recording import writer as writer_module
from dle_stream.timing import ScanTiming

TIMING = ScanTiming(
    pixel_size_um=0.15, dwell_us=8.0, line_period_us=200.0, frame_period_us=5000.0,
    width_px=16, height_px=12, bidirectional=True,
)


def movie(n: int = 25, dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, TIMING.height_px, TIMING.width_px)) * 4000).astype(dtype)


# ----------------------------------------------------------------- ScanImage
def scanimage_tiff(
    path: Path, frames: np.ndarray, frame_data: str, roi: dict | None, *, header: bool = True,
    timestamps: np.ndarray | None = None,
) -> Path:
    """A ScanImage ≥ 2016 BigTIFF, built by hand as ScanImage writes it.

    Layout (tifffile's ``read_scanimage_metadata``): BigTIFF header (16 bytes), then at
    offset 16 the ScanImage header ``<IIII`` (magic 117637889, version 3, length of the
    non-varying frame data, length of the ROI JSON), the frame data text ('SI.x = v'
    lines, NUL-terminated) and the ROI JSON; then per frame an IFD followed by its pixel
    data. Every page's Software tag repeats the frame data (that is how tifffile detects
    ScanImage files) and its ImageDescription holds the varying per-frame data.
    """
    n, h, w = frames.shape
    timestamps = np.arange(n) * 0.005 if timestamps is None else timestamps
    si_text = frame_data.encode() + b"\0"
    roi_json = json.dumps(roi or {}).encode() + b"\0"
    out = bytearray(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))
    if header:
        out += struct.pack("<IIII", 117637889, 3, len(si_text), len(roi_json)) + si_text + roi_json
    first_ifd_pointer = 8
    for k, frame in enumerate(frames):
        desc = (
            f"frameNumbers = {k + 1}\nacquisitionNumbers = 1\nframeNumberAcquisition = {k + 1}\n"
            f"frameTimestamps_sec = {timestamps[k]:.6f}\nepoch = [2024 1 1 0 0 0]\n"
        ).encode() + b"\0"
        tags = [  # (code, type, count, value or bytes)
            (256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 16), (259, 3, 1, 1), (262, 3, 1, 1),
            (270, 2, len(desc), desc), (273, 16, 1, None), (277, 3, 1, 1), (278, 4, 1, h),
            (279, 16, 1, frame.nbytes), (305, 2, len(si_text), si_text), (339, 3, 1, 1),
        ]
        ifd_pos = len(out) + (len(out) % 2)
        out += b"\0" * (ifd_pos - len(out))
        struct.pack_into("<Q", out, first_ifd_pointer, ifd_pos)
        ifd_size = 8 + 20 * len(tags) + 8
        extra_pos = ifd_pos + ifd_size
        extra = bytearray()
        entries = bytearray(struct.pack("<Q", len(tags)))
        for code, typ, count, value in tags:
            if isinstance(value, bytes):
                entries += struct.pack("<HHQQ", code, typ, count, extra_pos + len(extra))
                extra += value
            elif code == 273:
                entries += struct.pack("<HHQQ", code, typ, count, 0)  # patched below
            else:
                fmt = {3: "<H", 4: "<I", 16: "<Q"}[typ]
                entries += struct.pack("<HHQ", code, typ, count) + struct.pack(fmt, value).ljust(8, b"\0")
        data_pos = extra_pos + len(extra)
        strip_entry = 8 + 20 * [t[0] for t in tags].index(273)
        struct.pack_into("<Q", entries, strip_entry + 12, data_pos)
        first_ifd_pointer = ifd_pos + 8 + 20 * len(tags)  # next-IFD pointer of this page
        out += entries + struct.pack("<Q", 0) + extra + frame.astype("<u2").tobytes()
    path.write_bytes(bytes(out))
    return path


SI_FRAME_DATA = "\n".join(
    [
        "SI.VERSION_MAJOR = '2022'",
        "SI.hChannels.channelSave = 1",
        "SI.hStackManager.framesPerSlice = 6",
        "SI.hRoiManager.linePeriod = 0.0005",
        "SI.hRoiManager.scanFrameRate = 200",
        "SI.hRoiManager.pixelsPerLine = 16",
        "SI.hRoiManager.linesPerFrame = 8",
        "SI.hScan2D.bidirectional = true",
        "SI.hScan2D.fillFractionTemporal = 0.8",
        "SI.objectiveResolution = 15",
    ]
)
SI_ROI = {"RoiGroups": {"imagingRoiGroup": {"rois": {"scanfields": {"sizeXY": [1.6, 0.8], "pixelResolutionXY": [16, 8]}}}}}


def si_frames(n: int = 6) -> np.ndarray:
    return np.arange(n * 8 * 16, dtype=np.uint16).reshape(n, 8, 16)


def test_scanimage_tiff_timing_dwell_and_timestamps(tmp_path):
    frames = si_frames()
    stamps = np.array([0.0, 0.005, 0.0101, 0.015, 0.0203, 0.025])
    path = scanimage_tiff(tmp_path / "si.tif", frames, SI_FRAME_DATA, SI_ROI, timestamps=stamps)
    assert tifffile.TiffFile(path).scanimage_metadata["FrameData"]["SI.hRoiManager.linePeriod"] == 0.0005
    with open_recording(path) as rec:
        assert rec.format == "scanimage"
        assert rec.timing_source == "scanimage"
        assert rec.timing_missing == []
        t = rec.timing
        assert t.line_period_us == pytest.approx(500.0)
        assert t.dwell_us == pytest.approx(500.0 * 0.8 / 16)  # linePeriod · fillFractionTemporal / pixelsPerLine
        assert t.frame_period_us == pytest.approx(5000.0)
        assert t.pixel_size_um == pytest.approx(15 * 1.6 / 16)
        assert t.bidirectional is True
        assert (t.width_px, t.height_px) == (16, 8)
        np.testing.assert_allclose(rec.frame_timestamps_s, stamps)
        np.testing.assert_array_equal(np.stack(list(rec.frames())), frames)
        assert rec.metadata["scanimage"]["SI.hRoiManager.linePeriod"] == 0.0005
        json.dumps(rec.metadata)


def test_scanimage_without_pixel_size_reports_it_missing(tmp_path):
    text = SI_FRAME_DATA.replace("SI.objectiveResolution = 15", "")
    path = scanimage_tiff(tmp_path / "si.tif", si_frames(), text, None)
    with open_recording(path) as rec:
        assert rec.timing is None
        assert rec.timing_missing == ["pixel_size_um"]
        timing, source, warnings = resolve_timing(rec, flags={"pixel_size_um": 0.4})
    assert timing.pixel_size_um == 0.4 and timing.dwell_us == pytest.approx(25.0)
    assert "pixel_size_um from command-line flags" in source and "scanimage" in source
    assert warnings == []


def test_scanimage_frame_data_from_software_tag_without_header(tmp_path):
    path = scanimage_tiff(tmp_path / "si.tif", si_frames(), SI_FRAME_DATA, None, header=False)
    with open_recording(path) as rec:
        assert rec.timing_source == "scanimage"
        assert rec.timing_fields["line_period_us"] == pytest.approx(500.0)
        assert "pixel_size_um" in rec.timing_missing  # the ROI (scan field size) is only in the header


def test_scanimage_two_channels_interleaved_pages(tmp_path):
    frames = si_frames(12)  # pages alternate channel 1, channel 2
    text = SI_FRAME_DATA.replace("channelSave = 1", "channelSave = [1 2]")
    path = scanimage_tiff(tmp_path / "si2.tif", frames, text, SI_ROI)
    with pytest.raises(DleStreamError, match="use channel=N"):
        open_recording(path)
    with open_recording(path, channel=1) as rec:
        assert rec.n_frames == 6
        np.testing.assert_array_equal(rec.read(0, 6), frames[1::2])
        np.testing.assert_allclose(rec.frame_timestamps_s, np.arange(12)[1::2] * 0.005)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    ("name", "fmt", "expected_format"),
    [
        ("rec.tif", None, "imagej"),
        ("rec.ome.tif", None, "ome-tiff"),
        ("rec.zarr", None, "ome-zarr"),
        ("rec.tif", "tiff", "tiff"),
    ],
)
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_roundtrip_pixels_timing_metadata(tmp_path, name, fmt, expected_format, dtype):
    data = movie(dtype=dtype)
    stamps = np.arange(len(data)) * 0.005 + 1e-4 * np.sin(np.arange(len(data)))
    extra = {"simulator": {"d_um2_s": 0.731, "n_particles": np.int64(12)}, "seed": 7}
    path = write_recording(tmp_path / name, data, TIMING, format=fmt, metadata=extra, frame_timestamps_s=stamps)
    with open_recording(path) as rec:
        assert rec.format == expected_format
        assert (rec.n_frames, rec.height, rec.width, rec.dtype) == (25, 12, 16, np.dtype(dtype))
        assert len(rec) == 25
        assert rec.timing == TIMING  # exact, including bidirectional and the frame size
        assert rec.timing_source == "dle-stream"
        assert rec.timing_missing == []
        assert not rec.truncated
        ours = rec.metadata["dle_stream"]
        assert ours["extra"] == {"simulator": {"d_um2_s": 0.731, "n_particles": 12}, "seed": 7}
        assert ours["software"]["version"] == dle_stream.__version__
        json.dumps(rec.metadata)
        np.testing.assert_array_equal(rec.frame_timestamps_s, stamps)
        np.testing.assert_array_equal(rec.read(0, 25), data)
        np.testing.assert_array_equal(np.stack(list(rec.frames())), data)
        np.testing.assert_array_equal(np.stack(list(rec.frames(7, 11))), data[7:11])
        assert rec.read(3, 3).shape == (0, 12, 16)


def test_imagej_file_opens_in_fiji_with_scale_and_interval(tmp_path):
    path = write_recording(tmp_path / "rec.tif", movie(), TIMING)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        ij = tif.imagej_metadata
        assert ij["frames"] == 25 and ij["unit"] == "um"
        assert ij["finterval"] == pytest.approx(TIMING.frame_period_us / 1e6)
        assert 1 / tif.pages.first.resolution[0] == pytest.approx(TIMING.pixel_size_um)


def test_ome_tiff_has_physical_size_and_time_increment(tmp_path):
    path = write_recording(tmp_path / "rec.ome.tif", movie(), TIMING)
    with tifffile.TiffFile(path) as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pixels["PhysicalSizeX"] == pytest.approx(0.15) and pixels["PhysicalSizeXUnit"] == "µm"
    assert pixels["TimeIncrement"] == pytest.approx(0.005) and pixels["TimeIncrementUnit"] == "s"
    assert pixels["SizeT"] == 25


def test_zarr_store_is_ome_zarr_with_dimension_names(tmp_path):
    path = write_recording(tmp_path / "rec.zarr", movie(), TIMING)
    group = zarr.open_group(str(path), mode="r")
    assert group["0"].metadata.dimension_names == ("t", "y", "x")
    ms = group.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["t", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.005, 0.15, 0.15]
    assert ScanTiming.from_dict(group.attrs["dle_stream"]["timing"]) == TIMING


def test_streamed_generator_written_in_chunks(tmp_path, monkeypatch):
    data = movie(53)
    monkeypatch.setattr(writer_module, "ZARR_CHUNK_BYTES", 10 * data[0].nbytes)  # 10 frames per chunk
    gen = (frame for frame in data)  # no len(): the store grows chunk by chunk
    path = write_recording(tmp_path / "gen.zarr", gen, TIMING)
    assert zarr.open_array(str(path / "0"), mode="r").chunks == (10, 12, 16)
    with open_recording(path) as rec:
        assert rec.n_frames == 53
        np.testing.assert_array_equal(np.stack(list(rec.frames(5, 47))), data[5:47])
    tif = write_recording(tmp_path / "gen.tif", (f for f in data), TIMING, n_frames=53)
    with open_recording(tif) as rec:
        np.testing.assert_array_equal(rec.read(0, 53), data)


# ------------------------------------------------ other tools' metadata only
def test_imagej_tiff_without_our_metadata(tmp_path):
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(
        path, movie(), imagej=True, resolution=(1 / 0.2, 1 / 0.2),
        metadata={"axes": "TYX", "finterval": 0.05, "unit": "um"},
    )
    with open_recording(path) as rec:
        assert rec.timing_source == "imagej"
        assert rec.timing is None
        assert rec.timing_fields["pixel_size_um"] == pytest.approx(0.2)
        assert rec.timing_fields["frame_period_us"] == pytest.approx(50000.0)
        assert rec.timing_missing == ["dwell_us", "line_period_us", "bidirectional"]
        assert rec.frame_timestamps_s is None
        json.dumps(rec.metadata)


def test_ome_tiff_without_our_metadata_converts_units(tmp_path):
    path = tmp_path / "other.ome.tif"
    n = 25
    tifffile.imwrite(
        path, movie(n), ome=True,
        metadata={
            "axes": "TYX", "PhysicalSizeX": 300, "PhysicalSizeXUnit": "nm", "TimeIncrement": 40,
            "TimeIncrementUnit": "ms", "Plane": {"DeltaT": [0.041 * k for k in range(n)], "DeltaTUnit": ["s"] * n},
        },
    )
    with open_recording(path) as rec:
        assert rec.timing_source == "ome"
        assert rec.timing_fields["pixel_size_um"] == pytest.approx(0.3)
        assert rec.timing_fields["frame_period_us"] == pytest.approx(40000.0)
        assert rec.timing_missing == ["dwell_us", "line_period_us", "bidirectional"]
        np.testing.assert_allclose(rec.frame_timestamps_s, 0.041 * np.arange(n))
        json.dumps(rec.metadata)


def test_micromanager_page_metadata(tmp_path):
    path = tmp_path / "mm.tif"
    data = movie(6)
    with tifffile.TiffWriter(path, shaped=False) as tw:
        for k, frame in enumerate(data):
            meta = {"ElapsedTime-ms": 10.0 * k + 0.5, "PixelSizeUm": 0.25, "Interval_ms": 10}
            tw.write(frame, metadata=None, extratags=[(51123, "s", 0, json.dumps(meta), False)])
    with open_recording(path) as rec:
        assert rec.timing_source == "micro-manager"
        assert rec.timing_fields == {"pixel_size_um": 0.25, "frame_period_us": 10000.0}
        np.testing.assert_allclose(rec.frame_timestamps_s, 0.01 * np.arange(6) + 0.0005)
        assert not rec.truncated
        np.testing.assert_array_equal(rec.read(0, 6), data)


def test_ome_writers_zarr(tmp_path):
    ow = pytest.importorskip("ome_writers")
    data = movie(5)
    settings = ow.AcquisitionSettings(
        root_path=str(tmp_path / "mm.ome.zarr"),
        dimensions=(
            ow.Dimension(name="t", count=5, type="time", scale=0.06, unit="second"),
            ow.Dimension(name="y", count=12, type="space", scale=0.2, unit="micrometer"),
            ow.Dimension(name="x", count=16, type="space", scale=0.2, unit="micrometer"),
        ),
        dtype="uint16", format=ow.OmeZarrFormat(backend="zarr-python"), overwrite=True,
    )
    stream = ow.create_stream(settings)
    for k, frame in enumerate(data):
        stream.append(frame, frame_metadata={"delta_t": 0.061 * k})
    stream.close()
    with open_recording(tmp_path / "mm.ome.zarr") as rec:
        assert rec.timing_fields == {"pixel_size_um": 0.2, "frame_period_us": 60000.0}
        assert rec.timing_missing == ["dwell_us", "line_period_us", "bidirectional"]
        np.testing.assert_allclose(rec.frame_timestamps_s, 0.061 * np.arange(5))
        np.testing.assert_array_equal(rec.read(0, 5), data)


def test_plain_zarr_array(tmp_path):
    data = movie(9)
    arr = zarr.create_array(str(tmp_path / "plain.zarr"), shape=data.shape, chunks=(4, 12, 16), dtype=data.dtype,
                            dimension_names=("t", "y", "x"))
    arr[...] = data
    with open_recording(tmp_path / "plain.zarr") as rec:
        assert rec.timing_source is None
        assert rec.timing_missing == ["pixel_size_um", "dwell_us", "line_period_us", "frame_period_us", "bidirectional"]
        np.testing.assert_array_equal(np.stack(list(rec.frames(1))), data[1:])


# --------------------------------------------------------------- lazy reading
def test_uncompressed_tiff_is_memory_mapped(tmp_path):
    data = np.random.default_rng(1).integers(0, 60000, (2000, 12, 16)).astype(np.uint16)
    path = write_recording(tmp_path / "long.tif", data, TIMING)
    with open_recording(path) as rec:
        assert isinstance(rec._memmap, np.memmap)  # nothing read until frames are asked for
        it = rec.frames()
        first = next(it)
        first[...] = 0  # a copy: the file is untouched
        for k, frame in enumerate(it, start=1):
            if k % 97 == 0:
                np.testing.assert_array_equal(frame, data[k])
        np.testing.assert_array_equal(rec.read(1998, 2000), data[1998:])
        np.testing.assert_array_equal(rec.read(0, 1), data[:1])


def test_compressed_tiff_is_read_one_page_per_frame(tmp_path, monkeypatch):
    data = np.random.default_rng(2).integers(0, 60000, (2000, 12, 16)).astype(np.uint16)
    path = tmp_path / "long_zlib.tif"
    tifffile.imwrite(path, data, compression="zlib")
    decoded: list[int] = []
    original = tifffile.TiffFrame.asarray

    def counting(self, *args, **kwargs):
        decoded.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffFrame, "asarray", counting)
    with open_recording(path) as rec:
        assert rec._memmap is None and rec.n_frames == 2000
        assert rec._tif.pages.cache is False and rec._tif.pages.useframes is True
        it = rec.frames(1000)
        np.testing.assert_array_equal(next(it), data[1000])
        np.testing.assert_array_equal(next(it), data[1001])
        assert len(decoded) == 2  # lazily: only the frames asked for are decoded
        assert all(np.array_equal(f, d) for f, d in zip(it, data[1002:]))


def test_zarr_frames_read_chunk_by_chunk(tmp_path, monkeypatch):
    data = movie(50)
    monkeypatch.setattr(writer_module, "ZARR_CHUNK_BYTES", 8 * data[0].nbytes)
    path = write_recording(tmp_path / "c.zarr", data, TIMING)
    with open_recording(path) as rec:
        reads: list[tuple[int, int]] = []
        original = rec._read_block
        monkeypatch.setattr(rec, "_read_block", lambda a, b: reads.append((a, b)) or original(a, b))
        np.testing.assert_array_equal(np.stack(list(rec.frames(3, 30))), data[3:30])
    assert reads == [(3, 8), (8, 16), (16, 24), (24, 30)]


# ------------------------------------------------------------ resolve_timing
@pytest.fixture
def imagej_recording(tmp_path):
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, movie(), imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"axes": "TYX", "finterval": 0.05, "unit": "um"})
    with open_recording(path) as rec:
        yield rec


def timing_file(tmp_path, **fields) -> Path:
    path = tmp_path / "timing.json"
    path.write_text(json.dumps(fields))
    return path


def test_flag_beats_file_beats_metadata_beats_fallback(tmp_path, imagej_recording):
    tfile = timing_file(tmp_path, frame_period_us=55000.0, dwell_us=10.0, line_period_us=300.0)
    timing, source, warnings = resolve_timing(
        imagej_recording, flags={"dwell_us": 12.0, "pixel_size_um": None}, timing_file=tfile,
        fallback=ScanTiming.reference(),
    )
    assert timing.dwell_us == 12.0  # flag beats the timing file
    assert timing.frame_period_us == 55000.0  # timing file beats the metadata (50000)
    assert timing.line_period_us == 300.0
    assert timing.pixel_size_um == pytest.approx(0.2)  # metadata beats the fallback (0.15)
    assert (timing.width_px, timing.height_px) == (16, 12)  # the frame size, not the card's 20×20
    assert timing.bidirectional is False  # only the fallback knew
    assert "dwell_us from command-line flags" in source
    assert f"line_period_us, frame_period_us from timing file {tfile}" in source
    assert "pixel_size_um from fiji.tif metadata (imagej)" in source
    assert len(warnings) == 1 and "ASSUMED" in warnings[0] and "bidirectional" in warnings[0]


def test_fallback_fills_missing_fields_with_a_loud_warning(imagej_recording):
    card = ScanTiming.reference()
    timing, source, warnings = resolve_timing(imagej_recording, fallback=card, fallback_label="model card 'dle-low'")
    assert timing.dwell_us == card.dwell_us and timing.line_period_us == card.line_period_us
    assert timing.frame_period_us == pytest.approx(50000.0) and timing.pixel_size_um == pytest.approx(0.2)
    assert len(warnings) == 1
    assert "WARNING" in warnings[0] and "model card 'dle-low'" in warnings[0]
    assert "give dwell_us, line_period_us" in warnings[0] and "timing_file" in warnings[0]
    assert "--" not in warnings[0]  # a Python caller passed no flags: the fields are named as it gives them
    assert "from model card 'dle-low'" in source
    _, _, cli_warnings = resolve_timing(imagej_recording, fallback=card, fallback_label="model card 'dle-low'",
                                        names=CLI_FLAGS)
    assert "give --dwell-us, --line-period-us" in cli_warnings[0] and "(--timing)" in cli_warnings[0]


def test_the_result_names_the_fields_assumed_and_defaulted(tmp_path, imagej_recording):
    """Which fields were not read or given is a typed attribute, not a word in the warnings;
    the result still unpacks as (timing, source, warnings)."""
    card = ScanTiming.reference()
    resolved = resolve_timing(imagej_recording, fallback=card, fallback_label="model card 'dle-low'")
    timing, source, warnings = resolved
    assert (resolved.timing, resolved.source, resolved.warnings) == (timing, source, warnings)
    assert resolved.assumed == ("dwell_us", "line_period_us", "bidirectional")  # the ImageJ file has the rest
    assert resolved.defaulted == ()
    resolved = resolve_timing(imagej_recording, flags={"dwell_us": 10.0, "line_period_us": 300.0}, fallback=card)
    assert resolved.assumed == ("bidirectional",)
    resolved = resolve_timing(imagej_recording, flags={"dwell_us": 10.0, "line_period_us": 300.0})
    assert resolved.assumed == () and resolved.defaulted == ("bidirectional",)
    assert resolved.timing.bidirectional is False
    path = write_recording(tmp_path / "rec.tif", movie(), TIMING)
    with open_recording(path) as rec:
        resolved = resolve_timing(rec, fallback=card)
    assert resolved.assumed == () and resolved.defaulted == () and resolved.warnings == []


def test_missing_field_without_fallback_names_the_parameter(imagej_recording):
    with pytest.raises(TimingError, match="dwell_us, line_period_us unknown.*give dwell_us, line_period_us or a "
                                          r"timing file \(timing_file\)") as info:
        resolve_timing(imagej_recording)
    assert info.value.parameters == ("dwell_us", "line_period_us", "timing_file")
    assert "give --dwell-us, --line-period-us or a timing file (--timing)" in info.value.message_for(CLI_FLAGS)


def test_complete_without_recording_and_unidirectional_default(tmp_path):
    tfile = timing_file(tmp_path, **{k: v for k, v in TIMING.to_dict().items() if k != "bidirectional"})
    timing, _, warnings = resolve_timing(None, timing_file=tfile)
    assert timing == ScanTiming(**{**TIMING.to_dict(), "bidirectional": False})
    assert len(warnings) == 1 and "pass bidirectional=True if odd lines" in warnings[0]
    with pytest.raises(DleStreamError, match=r"width_px, height_px unknown.*a timing file \(timing_file\)"):
        resolve_timing(None, flags={"pixel_size_um": 0.1, "dwell_us": 1.0, "line_period_us": 50.0, "frame_period_us": 3000.0})


def test_timing_from_recording_alone(tmp_path):
    path = write_recording(tmp_path / "rec.tif", movie(), TIMING)
    with open_recording(path) as rec:
        timing, source, warnings = resolve_timing(rec, fallback=ScanTiming.reference())
    assert timing == TIMING and warnings == []
    assert "rec.tif metadata (dle-stream)" in source


def test_bad_timing_file_and_inconsistent_result(tmp_path, imagej_recording):
    with pytest.raises(DleStreamError, match="unknown scan timing field.*dwell"):
        resolve_timing(imagej_recording, timing_file=timing_file(tmp_path, dwel_us=3.0))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DleStreamError, match="bad.json.*not valid JSON"):
        resolve_timing(imagej_recording, timing_file=bad)
    with pytest.raises(DleStreamError, match="line period"):
        resolve_timing(imagej_recording, flags={"dwell_us": 100.0, "line_period_us": 300.0})  # 16 px × 100 µs > 300 µs
    with pytest.raises(DleStreamError, match="frame is 8×8 px.*16×12"):
        resolve_timing(imagej_recording, timing_file=timing_file(tmp_path, width_px=8, height_px=8),
                       flags={"dwell_us": 1.0, "line_period_us": 300.0})


# ------------------------------------------------------------------ bad input
def test_missing_file(tmp_path):
    with pytest.raises(DleStreamError, match=r"nope\.tif: no such file"):
        open_recording(tmp_path / "nope.tif")


def test_text_file_named_tif(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are my notes, not an image\n")
    with pytest.raises(DleStreamError, match=r"notes\.tif: is not a readable TIFF image"):
        open_recording(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "movie.avi"
    path.write_bytes(b"RIFF....AVI ")
    with pytest.raises(DleStreamError, match=r"movie\.avi: unsupported file type '\.avi'.*\.tif.*\.zarr"):
        open_recording(path)
    with pytest.raises(DleStreamError, match="cannot tell the format"):
        write_recording(tmp_path / "out.avi", movie(), TIMING)


def test_single_image_is_not_a_movie(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", movie(1)[0])
    with pytest.raises(DleStreamError, match="single 2-D image.*not a movie"):
        open_recording(tmp_path / "one.tif")
    zarr.create_array(str(tmp_path / "one.zarr"), shape=(12, 16), dtype="uint8")
    with pytest.raises(DleStreamError, match="single 2-D image"):
        open_recording(tmp_path / "one.zarr")


def test_frames_that_are_not_2d(tmp_path):
    zarr.create_array(str(tmp_path / "line.zarr"), shape=(5, 4, 16), dtype="uint8", dimension_names=("t", "c", "x"))
    with pytest.raises(DleStreamError, match="frames are not 2-D"):
        open_recording(tmp_path / "line.zarr")
    zarr.create_array(str(tmp_path / "anon.zarr"), shape=(5, 2, 4, 16), dtype="uint8")
    with pytest.raises(DleStreamError, match="without dimension names"):
        open_recording(tmp_path / "anon.zarr")


def test_multichannel_needs_channel(tmp_path):
    data = np.random.default_rng(3).integers(0, 255, (7, 3, 12, 16)).astype(np.uint16)
    path = tmp_path / "tcyx.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(ParameterError, match=r"tcyx\.tif: has 3 channels \(axis C\); use channel=N with N in 0\.\.2"):
        open_recording(path)
    with pytest.raises(ParameterError, match="channel=3 is out of range.*3 channels") as info:
        open_recording(path, channel=3)
    assert info.value.parameter == "channel" and "--" not in str(info.value)
    with open_recording(path, channel=2) as rec:
        assert rec.n_frames == 7 and not rec.truncated
        np.testing.assert_array_equal(rec.read(0, 7), data[:, 2])
    single = write_recording(tmp_path / "single.tif", movie(), TIMING)
    with pytest.raises(DleStreamError, match="channel=1 is out of range.*single channel"):
        open_recording(single, channel=1)


def test_rgb_and_z_planes_need_channel(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 255, (5, 12, 16, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.raises(DleStreamError, match="3 colour samples.*channel=N"):
        open_recording(tmp_path / "rgb.tif")
    with open_recording(tmp_path / "rgb.tif", channel=1) as rec:
        np.testing.assert_array_equal(np.stack(list(rec.frames())), rgb[..., 1])
    tz = np.random.default_rng(5).integers(0, 255, (4, 2, 12, 16)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "tz.tif", tz, imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(DleStreamError, match="2 planes.*channel=N"):
        open_recording(tmp_path / "tz.tif")
    with open_recording(tmp_path / "tz.tif", channel=0) as rec:
        np.testing.assert_array_equal(rec.read(0, 4), tz[:, 0])


def test_truncated_uncompressed_tiff_reads_complete_frames(tmp_path):
    data = movie(50)
    path = write_recording(tmp_path / "cut.tif", data, TIMING)
    with tifffile.TiffFile(path) as tif:
        offset = tif.series[0].dataoffset
    raw = path.read_bytes()
    path.write_bytes(raw[: offset + int(20.5 * data[0].nbytes)])  # the writer died in frame 20
    with open_recording(path) as rec:
        assert rec.truncated
        assert rec.n_frames == 20
        assert "truncated" in rec.truncation_note and "20 complete frames" in rec.truncation_note
        assert "of the 50" in rec.truncation_note
        np.testing.assert_array_equal(np.stack(list(rec.frames())), data[:20])
        assert rec.timing == TIMING  # the metadata sit before the pixel data
        with pytest.raises(DleStreamError, match="outside the recording's 20 frames"):
            rec.read(0, 21)


def test_truncated_compressed_tiff_reads_complete_pages(tmp_path):
    data = movie(40)
    path = tmp_path / "cut_zlib.tif"
    tifffile.imwrite(path, data, compression="zlib")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with open_recording(path) as rec:
        assert rec.truncated
        assert 0 < rec.n_frames < 40
        np.testing.assert_array_equal(np.stack(list(rec.frames())), data[: rec.n_frames])


def test_damaged_page_raises_one_line_error_mid_stream(tmp_path):
    data = movie(10)
    path = tmp_path / "bad_zlib.tif"
    tifffile.imwrite(path, data, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[5].dataoffsets[0], tif.pages[5].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(raw))
    with open_recording(path) as rec:
        frames = rec.frames()
        for k in range(5):
            np.testing.assert_array_equal(next(frames), data[k])
        with pytest.raises(DleStreamError, match=r"bad_zlib\.tif: cannot read frames 5:6.*damaged"):
            next(frames)


def test_closed_recording_and_bad_ranges(tmp_path):
    rec = open_recording(write_recording(tmp_path / "r.zarr", movie(), TIMING))
    with pytest.raises(DleStreamError, match="outside"):
        rec.read(20, 10)
    rec.close()
    with pytest.raises(DleStreamError, match="closed"):
        rec.read(0, 1)


def test_not_a_zarr_store(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(DleStreamError, match=r"empty\.zarr: is not a readable Zarr store"):
        open_recording(tmp_path / "empty.zarr")


def test_writer_rejects_bad_movies_and_leaves_no_partial_file(tmp_path):
    with pytest.raises(DleStreamError, match="ImageJ TIFF holds uint8, uint16 or float32.*float64.*ome.tif"):
        write_recording(tmp_path / "f64.tif", movie(dtype="float64"), TIMING)
    write_recording(tmp_path / "f64.ome.tif", movie(dtype="float64"), TIMING)  # OME-TIFF holds float64
    with pytest.raises(DleStreamError, match="n_frames="):
        write_recording(tmp_path / "gen.tif", (f for f in movie()), TIMING)

    def ragged():
        yield np.zeros((12, 16), np.uint16)
        yield np.zeros((12, 15), np.uint16)

    for name in ("ragged.tif", "ragged.zarr"):
        with pytest.raises(DleStreamError, match="frame 1 is"):
            write_recording(tmp_path / name, ragged(), TIMING, n_frames=2)
        assert not (tmp_path / name).exists()
    with pytest.raises(DleStreamError, match="2 frame timestamps for 25 frames"):
        write_recording(tmp_path / "ts.tif", movie(), TIMING, frame_timestamps_s=[0.0, 1.0])
    with pytest.raises(DleStreamError, match=r"must be \[T, H, W\]"):
        write_recording(tmp_path / "2d.tif", movie()[0], TIMING)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for resident memory")
def test_replaying_a_memory_mapped_tiff_keeps_resident_memory_flat(tmp_path):
    """Frames read from the memory map are released: the file-backed resident set does
    not grow with the part of the recording read so far (it did by ~the file size)."""
    timing = ScanTiming(0.15, 8.0, 1508.0, 61652.0 * 4, 64, 64)
    n = 2500  # 64×64 uint16 = 8 KB per frame, 20 MB in all
    rng = np.random.default_rng(3)
    path = tmp_path / "long.tif"
    write_recording(path, (rng.poisson(50, (64, 64)).astype(np.uint16) for _ in range(n)), timing,
                    format="tiff", n_frames=n)

    def rss_file_kb() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))

    with open_recording(path) as rec:
        assert rec._memmap is not None  # the memory-mapped path is the one under test
        first = rec.read(0, 1)
        before = rss_file_kb()
        total = 0
        for frame in rec.frames(1, n):
            total += int(frame[0, 0])
        grown_mb = (rss_file_kb() - before) / 1024
    assert first.shape == (1, 64, 64) and total > 0
    assert grown_mb < 5, f"file-backed resident memory grew by {grown_mb:.1f} MB over a 20 MB recording"


def test_recording_document_is_typed_and_reads_back():
    from dle_stream.recording import metadata as md

    timing = ScanTiming(**{**ScanTiming.reference().to_dict(), "width_px": 40, "height_px": 30})
    doc = md.RecordingDocument(timing, {"truth": {"d_um2_s": np.float32(0.5)}}, np.array([0.0, 0.06]),
                               software_version="9.9").to_json()
    assert doc["schema"] == md.DLE_SCHEMA and doc["software"] == {"name": "dle-stream", "version": "9.9"}
    assert doc["extra"] == {"truth": {"d_um2_s": 0.5}} and doc["frame_timestamps_s"] == [0.0, 0.06]
    read = md.from_document(json.dumps(doc), "x.tif")
    assert read is not None and ScanTiming(**read.fields) == timing
    np.testing.assert_array_equal(read.frame_timestamps_s, [0.0, 0.06])
    with pytest.raises(DleStreamError, match="cannot be stored as JSON"):
        md.RecordingDocument(timing, {"bad": float("nan")}).to_json()
