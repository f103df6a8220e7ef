"""Scan timing from the metadata that microscopes and tools write into recordings.

Each ``from_*`` function turns one kind of metadata (already parsed by tifffile or
zarr) into a :class:`TimingMetadata`: the :class:`~dle_stream.timing.ScanTiming` fields
it gives (pixel size in µm, times in µs, frame size in px, scan direction), per-frame
timestamps in s when recorded, and the raw values worth keeping. Fields a source does
not give are simply absent; :class:`~dle_stream.recording.base.Recording` lists them in
``timing_missing``.

dle-stream's own metadata document (written by :func:`~dle_stream.recording.write_recording`)
is a JSON object::

    {"schema": "dle-stream-recording/1",
     "software": {"name": "dle-stream", "version": "0.1.0"},
     "timing": {<ScanTiming.to_dict()>},
     "extra": {<caller's metadata, e.g. the simulator's ground truth>},
     "frame_timestamps_s": [...]            # TIFF only; Zarr keeps an array instead
    }

It is stored in TIFF files in the private ASCII tag :data:`DLE_TIFF_TAG` of the first
page, and in Zarr stores in the group attribute ``"dle_stream"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dle_stream.errors import DleStreamError
from dle_stream.files import jsonable
from dle_stream.timing import ScanTiming

#: Private TIFF tag (ASCII, first page only) holding dle-stream's JSON document.
#: Tags 65000-65535 are the TIFF "reusable" private range; tifffile knows none at 65111.
DLE_TIFF_TAG = 65111
#: Group attribute holding dle-stream's JSON document in Zarr stores.
DLE_ZARR_KEY = "dle_stream"
#: Schema tag of dle-stream's metadata document.
DLE_SCHEMA = "dle-stream-recording/1"

_LENGTH_TO_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "m": 1e6, "meter": 1e6,
}
_TIME_TO_S = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "millisecond": 1e-3,
    "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "microsecond": 1e-6, "ns": 1e-9, "nanosecond": 1e-9,
    "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0,
}


@dataclass
class TimingMetadata:
    """What one metadata source says about the scan.

    Attributes:
        source: name of the metadata kind (``"scanimage"``, ``"ome"``, ...), None if nothing found.
        fields: :class:`ScanTiming` fields found (µm, µs, px, bool).
        frame_timestamps_s: per-frame acquisition times in s, if recorded.
        raw: JSON-able metadata worth keeping, keyed by origin.
    """

    source: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    frame_timestamps_s: np.ndarray | None = None
    raw: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------- units
def length_um(value: Any, unit: str | None, default_unit: str = "µm") -> float | None:
    """``value`` in ``unit`` (default µm) as µm, or None when not a positive length."""
    factor = _LENGTH_TO_UM.get(str(unit if unit else default_unit).strip().lower())
    number = _positive(value)
    return None if factor is None or number is None else number * factor


def time_s(value: Any, unit: str | None, default_unit: str = "s") -> float | None:
    """``value`` in ``unit`` (default s) as seconds, or None when not a positive time."""
    factor = _TIME_TO_S.get(str(unit if unit else default_unit).strip().lower())
    number = _positive(value)
    return None if factor is None or number is None else number * factor


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


# ------------------------------------------------------ dle-stream document
def _software_version() -> str:
    from dle_stream import __version__

    return __version__


@dataclass(frozen=True)
class RecordingDocument:
    """dle-stream's own metadata document of a recording, schema :data:`DLE_SCHEMA` (see the
    module docstring); :meth:`to_json` gives the JSON object the writer stores. Reading goes
    through :func:`from_document`, which keeps what a damaged document still gives.

    Attributes:
        timing: the recording's scan timing.
        extra: the caller's JSON-able metadata (e.g. the simulator's ground truth).
        frame_timestamps_s: per-frame acquisition times, s (TIFF; a Zarr store keeps an array).
        software_version: the dle-stream version that wrote it.
    """

    timing: ScanTiming
    extra: dict[str, Any] | None = None
    frame_timestamps_s: np.ndarray | None = None
    software_version: str = field(default_factory=_software_version)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": DLE_SCHEMA,
            "software": {"name": "dle-stream", "version": self.software_version},
            "timing": self.timing.to_dict(),
            "extra": {},
        }
        if self.extra:
            try:
                doc["extra"] = json.loads(json.dumps(self.extra, default=_json_default, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise DleStreamError(f"recording metadata cannot be stored as JSON ({exc}); pass plain numbers, strings, lists and dicts") from None
        if self.frame_timestamps_s is not None:
            doc["frame_timestamps_s"] = [float(t) for t in self.frame_timestamps_s]
        return doc


def make_document(timing: ScanTiming, extra: dict[str, Any] | None, frame_timestamps_s: np.ndarray | None) -> dict:
    """dle-stream's metadata document (see the module docstring): :class:`RecordingDocument` as JSON."""
    return RecordingDocument(timing, extra, frame_timestamps_s).to_json()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def from_document(doc: Any, source: str) -> TimingMetadata | None:
    """Timing from dle-stream's own document (a dict or its JSON text); None if it is not ours."""
    if isinstance(doc, (str, bytes)):
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError):
            return None
    if not isinstance(doc, dict) or doc.get("schema") != DLE_SCHEMA:
        return None
    # A damaged document must not make the movie unreadable: keep the ScanTiming fields it
    # gives (a bad value is reported by resolve_timing, naming the flag that overrides it)
    # and drop anything else, so that flags or --timing FILE can still supply the timing.
    timing = doc.get("timing")
    fields = {k: v for k, v in timing.items() if k in ScanTiming.field_names()} if isinstance(timing, dict) else {}
    raw = jsonable({k: v for k, v in doc.items() if k != "frame_timestamps_s"})
    if not isinstance(timing, dict) or len(fields) != len(timing):
        raw["timing_error"] = "the scan timing in the dle-stream metadata is not a valid ScanTiming; ignored in part"
    return TimingMetadata(
        source="dle-stream" if fields else None,
        fields=fields,
        frame_timestamps_s=_timestamps(doc.get("frame_timestamps_s")),
        raw={"dle_stream": raw},
    )


def _timestamps(value: Any) -> np.ndarray | None:
    """Per-frame timestamps (s) as a 1-D float array, or None when absent or not a list of numbers."""
    if value is None:
        return None
    try:
        stamps = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    return stamps if stamps.ndim == 1 else None


# ------------------------------------------------------------------ ScanImage
#: ScanImage FrameData keys dle-stream keeps in ``Recording.metadata``.
SCANIMAGE_KEYS = (
    "SI.VERSION_MAJOR", "SI.VERSION_MINOR", "SI.hRoiManager.linePeriod", "SI.hRoiManager.scanFrameRate",
    "SI.hRoiManager.scanFramePeriod", "SI.hRoiManager.pixelsPerLine", "SI.hRoiManager.linesPerFrame",
    "SI.hRoiManager.scanZoomFactor", "SI.hScan2D.bidirectional", "SI.hScan2D.fillFractionTemporal",
    "SI.hScan2D.fillFractionSpatial", "SI.hScan2D.scannerType", "SI.hScan2D.sampleRate",
    "SI.hChannels.channelSave", "SI.objectiveResolution",
)


def from_scanimage(frame_data: dict[str, Any], roi_data: dict[str, Any] | None = None) -> TimingMetadata:
    """Timing from ScanImage's non-varying frame data (``SI.*`` keys, times in s).

    ScanImage gives no dwell time directly: δ = linePeriod · fillFractionTemporal /
    pixelsPerLine (the fraction of the line period during which pixels are acquired).
    The pixel size follows from ``SI.objectiveResolution`` (µm per scan degree) and the
    ROI's scan field size (degrees) over its pixel count, when both are recorded.
    """
    g = frame_data.get
    fields: dict[str, Any] = {}
    pixels = _positive(g("SI.hRoiManager.pixelsPerLine"))
    lines = _positive(g("SI.hRoiManager.linesPerFrame"))
    if pixels:
        fields["width_px"] = int(pixels)
    if lines:
        fields["height_px"] = int(lines)
    line_s = _positive(g("SI.hRoiManager.linePeriod"))
    if line_s:
        fields["line_period_us"] = line_s * 1e6
        fill = _positive(g("SI.hScan2D.fillFractionTemporal"))
        if fill and pixels and fill <= 1:
            fields["dwell_us"] = line_s * fill / pixels * 1e6
    frame_s = _positive(g("SI.hRoiManager.scanFramePeriod"))
    if frame_s is None and (rate := _positive(g("SI.hRoiManager.scanFrameRate"))):
        frame_s = 1.0 / rate
    if frame_s:
        fields["frame_period_us"] = frame_s * 1e6
    bidi = g("SI.hScan2D.bidirectional")
    if isinstance(bidi, (bool, int, np.integer)):
        fields["bidirectional"] = bool(bidi)
    pixel_um = _scanimage_pixel_size_um(frame_data, roi_data or {})
    if pixel_um:
        fields["pixel_size_um"] = pixel_um
    raw = {k: jsonable(frame_data[k]) for k in SCANIMAGE_KEYS if k in frame_data}
    return TimingMetadata(source="scanimage", fields=fields, raw={"scanimage": raw})


def _scanimage_pixel_size_um(frame_data: dict[str, Any], roi_data: dict[str, Any]) -> float | None:
    um_per_deg = _positive(frame_data.get("SI.objectiveResolution"))
    if not um_per_deg:
        return None
    try:
        rois = roi_data["RoiGroups"]["imagingRoiGroup"]["rois"]
        roi = rois[0] if isinstance(rois, list) else rois
        fields = roi["scanfields"]
        scanfield = fields[0] if isinstance(fields, list) else fields
        size_deg = float(scanfield["sizeXY"][0])
        n_px = float(scanfield["pixelResolutionXY"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return _positive(um_per_deg * size_deg / n_px) if n_px > 0 else None


def scanimage_frame_timestamp_s(description: str) -> float | None:
    """``frameTimestamps_sec`` from one ScanImage page description, in s."""
    from tifffile import matlabstr2py

    try:
        value = matlabstr2py(description).get("frameTimestamps_sec")
        return float(value)
    except (AttributeError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------- ImageJ
def from_imagej(ij: dict[str, Any], resolution: tuple[float, float] | None) -> TimingMetadata:
    """Pixel size (from the X resolution and ``unit``) and frame period (``finterval`` s, or ``fps``)."""
    fields: dict[str, Any] = {}
    unit = ij.get("unit")
    if unit and resolution and _positive(resolution[0]):
        pixel = length_um(1.0 / float(resolution[0]), str(unit))
        if pixel:
            fields["pixel_size_um"] = pixel
    # ImageJ's frame interval is in its time unit ``tunit`` (Fiji writes "sec"; "ms", "us", "min" occur)
    tunit = str(ij.get("tunit") or "s").strip().lower()
    tunit = {"sec": "s", "secs": "s", "msec": "ms", "usec": "us", "\\u00b5s": "µs"}.get(tunit, tunit)
    ignored: list[str] = []
    frame_s = time_s(ij.get("finterval"), tunit) if "finterval" in ij else None
    if "finterval" in ij and frame_s is None:
        ignored.append(f"finterval={ij.get('finterval')!r} {ij.get('tunit') or 's'} is not a positive time in a "
                       f"known unit; ignored")
    if frame_s is None and (fps := _positive(ij.get("fps"))):
        frame_s = 1.0 / fps
    if frame_s:
        fields["frame_period_us"] = frame_s * 1e6
    keep = {k: jsonable(v) for k, v in ij.items() if k in ("ImageJ", "images", "frames", "slices", "channels", "finterval", "fps", "unit", "tunit", "spacing")}
    if ignored:
        keep["ignored"] = ignored
    return TimingMetadata(source="imagej" if fields else None, fields=fields, raw={"imagej": keep})


# ------------------------------------------------------------------------ OME
def from_ome_xml(xml: str, channel: int | None, source: str) -> TimingMetadata:
    """Pixel size (``PhysicalSizeX``), frame period (``TimeIncrement``) and per-plane ``DeltaT``."""
    from tifffile import xml2dict

    try:
        ome = xml2dict(xml)["OME"]
        image = ome["Image"]
        image = image[0] if isinstance(image, list) else image
        pixels = image["Pixels"]
    except Exception:  # noqa: BLE001 - any malformed XML means "no OME timing"
        return TimingMetadata(raw={"ome": {"error": f"{source}: unreadable OME-XML"}})
    fields: dict[str, Any] = {}
    pixel = length_um(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"))
    if pixel:
        fields["pixel_size_um"] = pixel
    frame_s = time_s(pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit"))
    if frame_s:
        fields["frame_period_us"] = frame_s * 1e6
    planes = pixels.get("Plane") or []
    planes = planes if isinstance(planes, list) else [planes]
    stamps: dict[int, float] = {}
    for plane in planes:
        if not isinstance(plane, dict) or "DeltaT" not in plane:
            continue
        try:  # a garbled plane (empty or non-numeric attributes) gives no timestamp, not an error
            if int(plane.get("TheC", 0)) != (channel or 0) or int(plane.get("TheZ", 0)) != 0:
                continue
            t = float(plane["DeltaT"]) * _TIME_TO_S.get(str(plane.get("DeltaTUnit", "s")).lower(), 1.0)
            stamps[int(plane.get("TheT", len(stamps)))] = t
        except (TypeError, ValueError, OverflowError):
            continue
    # only a complete run of time points 0, 1, 2, ... lines up with the frames
    timestamps = np.array([stamps[k] for k in range(len(stamps))]) if stamps and sorted(stamps) == list(range(len(stamps))) else None
    keep = {k: jsonable(v) for k, v in pixels.items() if not isinstance(v, (dict, list))}
    return TimingMetadata(source="ome" if fields else None, fields=fields, frame_timestamps_s=timestamps, raw={"ome": keep})


# -------------------------------------------------------------- Micro-Manager
def from_micromanager(page_meta: dict[str, Any] | None, summary: dict[str, Any] | None) -> TimingMetadata:
    """Pixel size (``PixelSizeUm``/``PixelSize_um``) and frame interval (``Interval_ms``)."""
    fields: dict[str, Any] = {}
    page_meta = page_meta or {}
    summary = summary or {}
    pixel = _positive(page_meta.get("PixelSizeUm", summary.get("PixelSize_um")))
    if pixel:
        fields["pixel_size_um"] = pixel
    interval = _positive(summary.get("Interval_ms", page_meta.get("Interval_ms")))
    if interval:
        fields["frame_period_us"] = interval * 1e3
    keep = {k: jsonable(v) for k, v in {**summary, **page_meta}.items() if not isinstance(v, (dict, list))}
    return TimingMetadata(source="micro-manager" if fields else None, fields=fields, raw={"micro-manager": keep})


# -------------------------------------------------------------- pymmcore-plus
def from_pymmcore_frames(frames: list[Any], interval_s: Any = None) -> tuple[TimingMetadata, np.ndarray | None]:
    """Pixel size, per-frame timestamps (s) and image numbers from pymmcore-plus frame
    metadata (``FrameMetaV1`` dicts, one per frame in storage order, as its
    ImageSequenceWriter and TensorStoreHandler write them), and the frame period from a
    positive MDA time-plan ``interval_s``.

    Timestamps are the camera's ``ElapsedTime-ms`` (else ``runner_time_ms``): software
    times, good for detecting dropped frames, not for time lags. Image numbers are the
    camera's ``ImageNumber``; a jump means frames were lost.
    """
    fields: dict[str, Any] = {}
    records = [f for f in frames if isinstance(f, dict)]
    pixel = next((_positive(f.get("pixel_size_um")) for f in records if _positive(f.get("pixel_size_um"))), None)
    if pixel:
        fields["pixel_size_um"] = pixel
    if (interval := _positive(interval_s)) is not None:
        fields["frame_period_us"] = interval * 1e6
    stamps: np.ndarray | None = None
    numbers: np.ndarray | None = None
    if records and len(records) == len(frames):
        cams: list[dict] = [c if isinstance(c := f.get("camera_metadata"), dict) else {} for f in records]
        try:
            stamps = np.array([float(c["ElapsedTime-ms"]) / 1e3 for c in cams])
        except (KeyError, TypeError, ValueError):
            try:
                stamps = np.array([float(f["runner_time_ms"]) / 1e3 for f in records])
            except (KeyError, TypeError, ValueError):
                stamps = None
        if stamps is not None and not np.all(np.isfinite(stamps)):
            stamps = None
        try:
            numbers = np.array([int(c["ImageNumber"]) for c in cams], dtype=np.int64)
        except (KeyError, TypeError, ValueError, OverflowError):
            numbers = None
    first = records[0] if records else {}
    keep = {k: jsonable(v) for k, v in first.items() if not isinstance(v, (dict, list))}
    if isinstance(first.get("camera_metadata"), dict):
        keep["camera_metadata"] = jsonable(first["camera_metadata"])
    meta = TimingMetadata(source="pymmcore-plus" if fields else None, fields=fields, frame_timestamps_s=stamps,
                          raw={"pymmcore_plus": {"first_frame": keep, "frames": len(frames)}})
    return meta, numbers


# ------------------------------------------------------------------- OME-Zarr
def from_ome_zarr_axes(axes: list[dict[str, Any]], scale: list[float] | None) -> TimingMetadata:
    """Pixel size and frame period from OME-Zarr axes (name, unit) and the dataset's scale."""
    fields: dict[str, Any] = {}
    if scale and len(scale) == len(axes):
        for ax, value in zip(axes, scale):
            name, unit = str(ax.get("name", "")).lower(), ax.get("unit")
            if name == "x" and unit and (pixel := length_um(value, unit)):
                fields["pixel_size_um"] = pixel
            elif name == "t" and unit and (frame := time_s(value, unit)):
                fields["frame_period_us"] = frame * 1e6
    return TimingMetadata(source="ome-zarr" if fields else None, fields=fields, raw={"ome": {"axes": jsonable(axes), "scale": jsonable(scale)}})


def merge(*sources: TimingMetadata | None) -> TimingMetadata:
    """Combine sources, earlier ones winning field by field; the source name is the first that gave fields."""
    out = TimingMetadata()
    names: list[str] = []
    for meta in sources:
        if meta is None:
            continue
        for key, value in meta.fields.items():
            out.fields.setdefault(key, value)
        if meta.fields and meta.source and meta.source not in names:
            names.append(meta.source)
        if out.frame_timestamps_s is None and meta.frame_timestamps_s is not None:
            out.frame_timestamps_s = meta.frame_timestamps_s
        for key, value in meta.raw.items():
            out.raw.setdefault(key, value)
    out.source = names[0] if names else None
    return out
