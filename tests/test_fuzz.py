"""Fuzzing (issue 6, item 5): the recording readers and the timing/metadata parsers under
property-based testing with hypothesis, for a fixed, deterministic budget.

Property: whatever the bytes, text or JSON, nothing escapes but
:class:`~dle_stream.errors.DleStreamError` with a one-line message. Where the pixel data
are intact and only a metadata string is garbled, the file must still open and give
back its pixels (bad metadata costs the timing, never the movie).

Inputs:
 (i)   random bytes named .tif / .ome.tif, with and without a TIFF header, and TIFF
       headers followed by a random IFD (real tag codes, random types, counts, values);
 (ii)  valid TIFFs (ImageJ, OME, plain, zlib-compressed pages, ScanImage, Micro-Manager)
       truncated and/or with bytes overwritten at random offsets;
 (iii) valid TIFFs with random or garbled ImageJ, OME-XML, ScanImage, Micro-Manager
       metadata and random text or JSON in dle-stream's private tag; Zarr stores with
       random ``dle_stream`` / OME attributes;
 (iv)  ScanTiming.from_dict / from_json and read_timing_file on random JSON values.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from test_recording import SI_FRAME_DATA, SI_ROI, scanimage_tiff

from dle_stream.errors import DleStreamError
from dle_stream.recording import DLE_TIFF_TAG, open_recording, read_timing_file, resolve_timing, write_recording
from dle_stream.recording.metadata import DLE_SCHEMA
from dle_stream.timing import ScanTiming

TIMING = ScanTiming(pixel_size_um=0.15, dwell_us=8.0, line_period_us=200.0, frame_period_us=5000.0,
                    width_px=16, height_px=12, bidirectional=True)
MOVIE = (np.random.default_rng(3).random((6, 12, 16)) * 4000).astype(np.uint16)
FIELDS = ScanTiming.field_names()


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def one_line(exc: DleStreamError) -> None:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, message


def exercise(path: Path, channel: int | None = None):
    """Open ``path`` and touch everything a replay uses; return the frames read, or the
    DleStreamError raised (any other exception fails the test)."""
    try:
        with open_recording(path, channel=channel) as rec:
            assert rec.n_frames >= 0 and rec.height >= 1 and rec.width >= 1
            repr(rec)
            rec.timing, rec.timing_missing, rec.truncated  # noqa: B018
            if rec.truncated:
                one_line(DleStreamError(rec.truncation_note))
            stamps = rec.frame_timestamps_s
            assert stamps is None or stamps.shape == (rec.n_frames,)
            json.dumps(rec.metadata)
            try:
                resolve_timing(rec, fallback=TIMING.with_frame_size(max(rec.height, 1), max(rec.width, 1)))
            except DleStreamError as exc:
                one_line(exc)
            frames = []
            for frame in rec.frames():
                assert frame.shape == (rec.height, rec.width)
                frames.append(frame)
            assert len(frames) == rec.n_frames
            if rec.n_frames:
                assert rec.read(0, rec.n_frames).shape == (rec.n_frames, rec.height, rec.width)
            return np.stack(frames) if frames else np.zeros((0, rec.height, rec.width))
    except DleStreamError as exc:
        one_line(exc)
        return exc


# ------------------------------------------------------------------ base files
def _imagej(path):
    return write_recording(path, MOVIE, TIMING, format="imagej")


def _ome(path):
    return write_recording(path, MOVIE, TIMING, format="ome-tiff", frame_timestamps_s=0.005 * np.arange(6))


def _plain(path):
    return write_recording(path, MOVIE, TIMING, format="tiff")


def _zlib_pages(path):
    tifffile.imwrite(path, MOVIE, compression="zlib", metadata={"axes": "TYX"})
    return path


def _micromanager(path):
    with tifffile.TiffWriter(path, shaped=False) as tw:
        for k, frame in enumerate(MOVIE):
            meta = {"ElapsedTime-ms": 10.0 * k, "PixelSizeUm": 0.25, "Interval_ms": 10}
            tw.write(frame, metadata=None, extratags=[(51123, "s", 0, json.dumps(meta), False)])
    return path


def _scanimage(path):
    return scanimage_tiff(path, MOVIE, SI_FRAME_DATA, SI_ROI)


BASES = {"imagej.tif": _imagej, "base.ome.tif": _ome, "plain.tif": _plain, "zlib.tif": _zlib_pages,
         "mm.tif": _micromanager, "si.tif": _scanimage}


class _Blobs(dict):
    def __repr__(self) -> str:   # keep hypothesis' failure reports short
        return f"<{len(self)} base files>"


@pytest.fixture(scope="module")
def base_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("bases")
    out = _Blobs()
    for name, make in BASES.items():
        path = make(folder / name)
        frames = exercise(path)
        assert isinstance(frames, np.ndarray) and frames.shape[0] == 6, (name, frames)
        out[name] = Path(path).read_bytes()
    return out


# --------------------------------------------------------------- (i) random bytes
TIFF_HEADERS = [b"", b"II*\x00", b"MM\x00*", b"II*\x00\x08\x00\x00\x00", b"MM\x00*\x00\x00\x00\x08",
                b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00"]
SUFFIXES = ["rec.tif", "rec.ome.tif", "rec.tiff", "rec.btf"]


@fuzz_settings(200)
@given(header=st.sampled_from(TIFF_HEADERS), body=st.binary(max_size=600), name=st.sampled_from(SUFFIXES))
def test_random_bytes(tmp_path, header, body, name):
    path = tmp_path / name
    path.write_bytes(header + body)
    exercise(path)


TAGS = [254, 256, 257, 258, 259, 262, 270, 273, 274, 277, 278, 279, 282, 283, 284, 296, 305, 317, 320, 322, 323,
        324, 325, 338, 339, 347, 530, 32997, 33550, 33922, 34665, 50838, 50839, 51123, DLE_TIFF_TAG]
ENTRY = st.tuples(st.sampled_from(TAGS), st.integers(1, 18), st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
                  st.one_of(st.integers(0, 512), st.integers(0, 2**32 - 1)))


@fuzz_settings(200)
@given(entries=st.lists(ENTRY, min_size=1, max_size=14), tail=st.binary(max_size=400),
       next_ifd=st.sampled_from([0, 8, 1 << 31]), name=st.sampled_from(SUFFIXES[:2]))
def test_random_ifd(tmp_path, entries, tail, next_ifd, name):
    """A little-endian TIFF header and one IFD of real tag codes with random contents."""
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, typ, count, value) for tag, typ, count, value in sorted(entries))
    ifd += struct.pack("<I", next_ifd)
    path = tmp_path / name
    path.write_bytes(b"II*\x00\x08\x00\x00\x00" + ifd + tail)
    exercise(path)


# ------------------------------------------------ (ii) truncated or corrupted TIFFs
@fuzz_settings(250)
@given(data=st.data(), base=st.sampled_from(sorted(BASES)))
def test_truncated_or_corrupted_tiff(tmp_path, base_files, data, base):
    blob = bytearray(base_files[base])
    size = len(blob)
    mode = data.draw(st.sampled_from(["truncate", "corrupt", "both", "corrupt-header"]), "mode")
    if mode in ("corrupt", "both", "corrupt-header"):
        limit = min(size, 512) if mode == "corrupt-header" else size
        for _ in range(data.draw(st.integers(1, 12), "n_bytes")):
            offset = data.draw(st.integers(0, limit - 1), "offset")
            blob[offset] = data.draw(st.integers(0, 255), "byte")
    if mode in ("truncate", "both"):
        del blob[data.draw(st.integers(0, size - 1), "cut"):]
    path = tmp_path / base
    path.write_bytes(bytes(blob))
    result = exercise(path)
    if mode == "truncate" and isinstance(result, np.ndarray) and base != "zlib.tif":
        # a cut never invents pixels: the frames read are the movie's first frames
        np.testing.assert_array_equal(result, MOVIE[: len(result)])


def test_corrupted_frame_height_zero_is_a_clear_error(tmp_path, base_files):
    """Found by the fuzzer: a zeroed ImageLength tag opened as a movie of 0-px-high frames."""
    blob = bytearray(base_files["imagej.tif"])
    blob[22] = 0   # low byte of ImageLength (12) in the first IFD
    path = tmp_path / "flat.tif"
    path.write_bytes(bytes(blob))
    with pytest.raises(DleStreamError, match="frames are empty"):
        open_recording(path)


# -------------------------------------------------- (iii) garbled metadata strings
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
NUMBERISH = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=12), st.sampled_from(["", "nan", "inf", "-1", "0", "1e400", "1,5", "true", "[1 2]", "'x'"]),
)
SPECIAL = st.sampled_from([None, True, False, 0, -1, 1, 2.5, 10**400, -(10**400), 1e308, 1e-320, "12", "", [], {},
                            [16], float("nan"), float("inf"), -float("inf")])
MUTATED_TIMING = st.builds(   # a valid timing with a few fields replaced, dropped or added
    lambda changes, drop, add: {**{k: v for k, v in TIMING.to_dict().items() if k not in drop}, **changes, **add},
    st.dictionaries(st.sampled_from(FIELDS), SPECIAL | JSON, min_size=1, max_size=2),
    st.sets(st.sampled_from(FIELDS), max_size=1), st.dictionaries(st.text(max_size=6), JSON, max_size=1))
TIMING_DICT = MUTATED_TIMING | st.dictionaries(st.sampled_from(FIELDS + ["frame_rate", ""]), JSON, max_size=9) | st.fixed_dictionaries(
    {f: (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70) | JSON) for f in FIELDS})


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\x00", "")


def _pixels_survive(path: Path) -> None:
    result = exercise(path)
    assert isinstance(result, np.ndarray), f"garbled metadata made the movie unreadable: {result}"
    np.testing.assert_array_equal(result, MOVIE)


def _our_tag_document(draw_text, draw_doc):
    return draw_text if draw_doc is None else json.dumps(draw_doc, allow_nan=True)


@fuzz_settings(200)
@given(text=st.text(max_size=200), doc=st.none() | JSON | st.fixed_dictionaries(
    {"schema": st.just(DLE_SCHEMA), "timing": JSON | TIMING_DICT},
    optional={"frame_timestamps_s": JSON | st.lists(st.floats(), max_size=8), "extra": JSON, "software": JSON}))
@example(text="", doc={"schema": DLE_SCHEMA, "timing": None})   # was: the whole file refused
@example(text="", doc={"schema": DLE_SCHEMA, "timing": {"dwell_us": 8.0, "frame_rate": 3}})
@example(text="", doc={"schema": DLE_SCHEMA, "timing": {}, "frame_timestamps_s": [{"a": 1}, "x"]})
def test_our_private_tag_with_random_text_or_json(tmp_path, text, doc):
    tag = _ascii(_our_tag_document(text, doc))
    path = tmp_path / "ours.tif"
    tifffile.imwrite(path, MOVIE, photometric="minisblack", metadata={"axes": "TYX"},
                     extratags=[(DLE_TIFF_TAG, "s", 0, tag, True)])
    _pixels_survive(path)


SHAPE_KEYS = ["images", "frames", "slices", "channels"]
IMAGEJ_KEYS = SHAPE_KEYS + ["finterval", "fps", "unit", "spacing", "hyperstack", "mode", "loop", "min", "max",
                            "ImageJ", "xunit", "cf"]
NOT_A_COUNT = st.sampled_from(["abc", "", "'x'", "[1 2]", "1,5", "inf", "-inf", "nan", "1e400", "-1", "0", "true"])


@fuzz_settings(200)
@given(lines=st.lists(st.tuples(st.sampled_from(IMAGEJ_KEYS) | st.text(max_size=8), NUMBERISH), max_size=8),
       counts=st.lists(st.tuples(st.sampled_from(SHAPE_KEYS), NOT_A_COUNT), max_size=3),
       garbage=st.text(max_size=40), resolution=st.tuples(st.floats(0, 1e9), st.floats(0, 1e9)),
       pages=st.booleans())
@example(lines=[], counts=[("images", "abc")], garbage="", resolution=(1.0, 1.0), pages=False)   # was: tifffile TypeError
@example(lines=[], counts=[("images", "inf")], garbage="", resolution=(1.0, 1.0), pages=True)     # was: OverflowError
@example(lines=[], counts=[("channels", "abc")], garbage="", resolution=(1.0, 1.0), pages=True)
def test_imagej_description_garbled(tmp_path, lines, counts, garbage, resolution, pages):
    # frame counts that are not counts, and anything in the other keys, leave the pixels
    # readable; a numeric count may legitimately reshape the movie (e.g. channels=2)
    free_text = "".join(k + v for k, v in lines) + garbage
    strong = not any(key in free_text for key in SHAPE_KEYS) and not any(c in free_text for c in "\n\r\x00")
    description = _ascii("ImageJ=1.54f\n" + "".join(f"{k}={v}\n" for k, v in counts + lines) + garbage)
    path = tmp_path / "ij.tif"
    assume(all(math.isfinite(r) and r > 0 for r in resolution))
    with tifffile.TiffWriter(path) as tw:
        if pages:   # description on the first page only, as ImageJ writes it
            for k, frame in enumerate(MOVIE):
                tw.write(frame, description=description if k == 0 else None, metadata=None, contiguous=True,
                         resolution=resolution)
        else:
            tw.write(MOVIE, description=description, metadata=None, resolution=resolution)
    if strong:
        _pixels_survive(path)
    else:
        exercise(path)


OME_ATTRS = ["PhysicalSizeX", "PhysicalSizeXUnit", "TimeIncrement", "TimeIncrementUnit", "SizeT", "SizeC", "SizeZ",
             "DimensionOrder", "Type", "SizeX", "SizeY"]
PLANE_ATTRS = ["TheT", "TheC", "TheZ", "DeltaT", "DeltaTUnit"]


def _xml_attr(value: str) -> str:
    return _ascii(value).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


@fuzz_settings(200)
@given(attrs=st.dictionaries(st.sampled_from(OME_ATTRS), NUMBERISH, max_size=6),
       planes=st.lists(st.dictionaries(st.sampled_from(PLANE_ATTRS), NUMBERISH, max_size=5), max_size=7),
       cut=st.none() | st.integers(0, 2000), keep_shape=st.booleans())
@example(attrs={}, planes=[{"TheC": "", "DeltaT": "0.1"}], cut=None, keep_shape=True)   # was: ValueError, file refused
@example(attrs={}, planes=[{"TheT": "7", "DeltaT": "0.1"}, {"TheT": "x", "DeltaT": "1"}], cut=None, keep_shape=True)
def test_ome_xml_garbled(tmp_path, attrs, planes, cut, keep_shape):
    base = {"SizeT": "6", "SizeC": "1", "SizeZ": "1", "SizeX": "16", "SizeY": "12", "DimensionOrder": "XYCZT",
            "Type": "uint16"}
    if keep_shape:
        attrs = {k: v for k, v in attrs.items() if k not in base}
    pixel_attrs = " ".join(f'{k}="{_xml_attr(v)}"' for k, v in {**base, **attrs}.items())
    plane_xml = "".join("<Plane " + " ".join(f'{k}="{_xml_attr(v)}"' for k, v in p.items()) + "/>" for p in planes)
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           f'<Image ID="Image:0"><Pixels ID="Pixels:0" {pixel_attrs}><Channel ID="Channel:0:0"/>'
           f'<TiffData/>{plane_xml}</Pixels></Image></OME>')
    if cut is not None:
        xml = xml[:cut] + "</OME>"
    path = tmp_path / "garbled.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, frame in enumerate(MOVIE):
            tw.write(frame, description=xml if k == 0 else None, metadata=None, contiguous=False)
    result = exercise(path)
    if keep_shape and cut is None:   # the pixels are described right: garbled values cost only the timing
        assert isinstance(result, np.ndarray), result
        np.testing.assert_array_equal(result, MOVIE)


SI_KEYS = ["SI.hRoiManager.linePeriod", "SI.hRoiManager.scanFrameRate", "SI.hRoiManager.scanFramePeriod",
           "SI.hRoiManager.pixelsPerLine", "SI.hRoiManager.linesPerFrame", "SI.hScan2D.bidirectional",
           "SI.hScan2D.fillFractionTemporal", "SI.objectiveResolution", "SI.VERSION_MAJOR", "SI.hChannels.channelSave"]


@fuzz_settings(120)
@given(values=st.dictionaries(st.sampled_from(SI_KEYS), NUMBERISH, max_size=10), roi=JSON,
       stamps=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=6, max_size=6),
       header=st.booleans())
def test_scanimage_metadata_garbled(tmp_path, values, roi, stamps, header):
    frame_data = "\n".join(f"{k} = {_ascii(v).replace(chr(10), ' ')}" for k, v in {
        **dict(line.split(" = ") for line in SI_FRAME_DATA.splitlines()), **values}.items())
    path = tmp_path / "si.tif"
    try:
        scanimage_tiff(path, MOVIE, frame_data, roi if isinstance(roi, dict) else {"rois": roi}, header=header,
                       timestamps=np.array(stamps))
    except (ValueError, OverflowError):
        assume(False)   # the hand-made writer cannot format this
    if "SI.hChannels.channelSave" in values:   # the saved channels shape the movie (tifffile reads it)
        exercise(path)
    else:   # the other values are only timing: garbled, they cost the timing, never the pixels
        _pixels_survive(path)


@fuzz_settings(150)
@given(pages=st.lists(st.one_of(st.text(max_size=60).map(_ascii), JSON.map(lambda v: json.dumps(v, allow_nan=True)),
                                st.dictionaries(st.sampled_from(["ElapsedTime-ms", "PixelSizeUm", "Interval_ms",
                                                                 "Summary", "ImageNumber"]), JSON, max_size=4)
                                .map(lambda v: json.dumps(v, allow_nan=True))), min_size=6, max_size=6))
def test_micromanager_page_metadata_garbled(tmp_path, pages):
    path = tmp_path / "mm.tif"
    with tifffile.TiffWriter(path, shaped=False) as tw:
        for frame, meta in zip(MOVIE, pages):
            tw.write(frame, metadata=None, extratags=[(51123, "s", 0, _ascii(meta), False)])
    _pixels_survive(path)


@pytest.fixture(scope="module")
def zarr_base(tmp_path_factory) -> Path:
    return write_recording(tmp_path_factory.mktemp("zarr") / "base.zarr", MOVIE, TIMING,
                           frame_timestamps_s=0.005 * np.arange(6))


@fuzz_settings(80)
@given(key=st.sampled_from(["dle_stream", "ome", "multiscales", "ome_writers"]), value=JSON | st.fixed_dictionaries(
    {"schema": st.just(DLE_SCHEMA), "timing": JSON | TIMING_DICT}), drop_ome=st.booleans())
def test_zarr_attributes_garbled(tmp_path, zarr_base, key, value, drop_ome):
    import shutil

    path = tmp_path / "z.zarr"
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(zarr_base, path)
    doc = json.loads((path / "zarr.json").read_text())
    attrs = doc.setdefault("attributes", {})
    if drop_ome:
        attrs.pop("ome", None)
    attrs[key] = value
    (path / "zarr.json").write_text(json.dumps(doc, allow_nan=True))
    if key in ("dle_stream", "ome_writers") and not drop_ome:   # timing only: the movie must still read
        _pixels_survive(path)
    else:
        exercise(path)


# -------------------------------------------------------- (iv) timing parsers
def _timing_call(fn, *args):
    try:
        timing = fn(*args)
    except DleStreamError as exc:
        one_line(exc)
        return None
    assert isinstance(timing, ScanTiming)
    for name in ("pixel_size_um", "dwell_us", "line_period_us", "frame_period_us"):
        assert math.isfinite(getattr(timing, name)) and getattr(timing, name) > 0
    assert timing.width_px >= 1 and timing.height_px >= 1
    return timing


@fuzz_settings(300)
@given(value=JSON | TIMING_DICT)
@example(value={**TIMING.to_dict(), "width_px": 10**400})     # was: OverflowError
@example(value={**TIMING.to_dict(), "dwell_us": 10**400})     # was: OverflowError
@example(value={**TIMING.to_dict(), "height_px": "12"})       # was: ValueError
@example(value={**TIMING.to_dict(), "width_px": None})        # was: TypeError
@example(value={**TIMING.to_dict(), "width_px": float("nan")})  # was: ValueError
@example(value={**TIMING.to_dict(), "bidirectional": "false"})  # was: silently True
def test_scan_timing_from_dict_and_from_json(value):
    _timing_call(ScanTiming.from_dict, value, "fuzz")
    _timing_call(ScanTiming.from_json, json.dumps(value, allow_nan=True), "fuzz")


@fuzz_settings(150)
@given(text=st.text(max_size=120))
def test_scan_timing_from_json_random_text(text):
    _timing_call(ScanTiming.from_json, text, "fuzz")


@fuzz_settings(150)
@given(value=JSON | TIMING_DICT | st.fixed_dictionaries({"timing": JSON | TIMING_DICT}), raw=st.none() | st.binary(max_size=80))
def test_read_timing_file(tmp_path, value, raw):
    path = tmp_path / "timing.json"
    if raw is None:
        path.write_text(json.dumps(value, allow_nan=True))
    else:
        path.write_bytes(raw)
    try:
        fields = read_timing_file(path)
    except DleStreamError as exc:
        one_line(exc)
        return
    assert isinstance(fields, dict) and set(fields) <= set(FIELDS)
    # what a timing file gives then goes through resolve_timing (the flags path of `run`)
    try:
        resolve_timing(None, timing_file=path, fallback=TIMING)
    except DleStreamError as exc:
        one_line(exc)


def test_timing_flag_given_as_text_is_refused_not_read_as_true():
    """Found by the fuzzer: ``"bidirectional": "false"`` in a timing file became True."""
    with pytest.raises(DleStreamError, match="bidirectional must be true or false"):
        ScanTiming.from_dict({**TIMING.to_dict(), "bidirectional": "false"})
    assert ScanTiming.from_dict({**TIMING.to_dict(), "bidirectional": 0}).bidirectional is False
