"""The attributes of a run log (its root ``zarr.json``): a versioned, typed schema.

A run log (:mod:`dle_stream.zarr_log`) keeps everything that is not a per-record array
in the attributes of its root group. This module is the one place that turns those
attributes into Python objects (:meth:`LogAttrs.from_json`) and back
(:meth:`LogAttrs.to_json`); the writer and the reader both go through it.

Root attributes (flat, as plain ``zarr`` and ``xarray`` show them)::

    dle_stream          {"kind": "run_log", "format_version": 3}
    committed_windows   rows of the window arrays that hold complete data
    committed_frames    rows of the frame arrays that hold complete data
    committed_gaps      rows of ``gaps`` that hold complete data
    rois                [{"name", "bbox": [row, col, height, width] px, "tiles": [...]}, ...]
    segments            one per run that wrote to the log (create, then each --append):
                        {"opened", "first_window_row", "first_frame_row", "window_offset",
                         "frame_offset", "attrs" (the appended run's metadata)}
    ...                 the run's own metadata, as the caller gave it when the log was
                        created; a run of ``replay`` or ``run`` writes the fields of
                        :class:`RunMetadata` (software, mode, source, estimator,
                        model_card, scan_timing, timing_source, timing_warnings,
                        tile_geometry, window_frames, hop_frames, start_time,
                        timing_comparison, recording_check); other keys are kept
                        as given

Format versions: 1 and 2 (earlier logs) have the same attributes as 3; format 3 adds,
in the same root document and written in the same write as the committed counts, the
consolidated metadata of every array at its committed length, so that plain
``xarray.open_zarr(path)`` opens the log without a warning and sees committed rows only.
A log of format 2 is read as it is; appending to it makes it format 3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from dle_stream.errors import DleStreamError

__all__ = ["LOG_FORMAT_VERSION", "LOG_KIND", "LogAttrs", "LogRoi", "LogSegment", "RESERVED_ATTRS", "RunMetadata",
           "is_log_marker"]

#: the format this version writes; it reads every format up to it
LOG_FORMAT_VERSION = 3
LOG_KIND = "run_log"
#: root attribute names that belong to the log itself (a run's metadata may not use them)
RESERVED_ATTRS = ("dle_stream", "committed_windows", "committed_frames", "committed_gaps", "rois", "segments")


def is_log_marker(marker: Any) -> TypeGuard[Mapping[str, Any]]:
    """True when the root attribute ``dle_stream`` says "a dle-stream run log"."""
    return isinstance(marker, Mapping) and marker.get("kind") == LOG_KIND


def _int(attrs: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = attrs.get(key, default)
    if value is None:
        raise ValueError(f"attribute {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise ValueError(f"attribute {key!r} is {value!r}, not a count")
    return int(value)


@dataclass(frozen=True)
class LogRoi:
    """A user ROI: its box in the frame (row, col, height, width, px) and the tiles covering it."""

    name: str
    bbox: tuple[int, int, int, int]
    tiles: tuple[int, ...]
    #: anything else the caller stored with the ROI (kept as given)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LogRoi:
        bbox = tuple(int(v) for v in doc["bbox"])
        if len(bbox) != 4:
            raise ValueError(f"ROI {doc.get('name')!r}: bbox must be [row, col, height, width], got {list(bbox)}")
        return cls(str(doc["name"]), (bbox[0], bbox[1], bbox[2], bbox[3]), tuple(int(t) for t in doc["tiles"]),
                   {k: v for k, v in doc.items() if k not in ("name", "bbox", "tiles")})

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bbox": list(self.bbox), "tiles": list(self.tiles), **self.extra}


def _opt(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


@dataclass(frozen=True)
class RunMetadata:
    """What a run records about itself in its log (the root attributes the caller gives).

    Every field is optional (a log written from Python may hold any of them, or other keys,
    kept in ``extra``); the versions are the log's (``format_version``).

    Attributes:
        software: "dle-stream X.Y.Z".
        mode: "replay" or "live".
        source: the recording's path, or the live source in words.
        estimator: "dle", "classic" or "rics".
        model_card: the model package's card (:class:`dle_stream.model_package.ModelCard`
            as a dict), None for none.
        scan_timing: the stream's :meth:`dle_stream.timing.ScanTiming.to_dict`.
        timing_source: where the timing came from, in words.
        timing_warnings: the warnings about the timing (e.g. assumed from the model card).
        tile_geometry: frame and tile sizes, px, number of tiles, uncovered pixels.
        window_frames, hop_frames: the window length and hop, frames.
        start_time: ISO 8601 time the run started.
        timing_comparison: the model's training scan against this one, in words.
        recording_check: the recording check's verdict
            (:func:`dle_stream.recording_check.replay_check`): {"status": "inside",
            "outside" or "skipped", "line": the line the user saw, "result": the measured
            values and trained ranges (null when skipped), "reference" or "reason"}; None
            where the run did not check (a live run, or a log written before the check).
        extra: any other key (kept as given).
    """

    software: str | None = None
    mode: str | None = None
    source: str | None = None
    estimator: str | None = None
    model_card: Mapping[str, Any] | None = None
    scan_timing: Mapping[str, Any] | None = None
    timing_source: str | None = None
    timing_warnings: tuple[str, ...] = ()
    tile_geometry: Mapping[str, Any] | None = None
    window_frames: int | None = None
    hop_frames: int | None = None
    start_time: str | None = None
    timing_comparison: str | None = None
    recording_check: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_json(cls, attrs: Mapping[str, Any]) -> RunMetadata:
        """The run's metadata from a log's root attributes (the log's own keys ignored)."""
        names = cls.field_names()
        get = attrs.get
        return cls(
            software=_opt(str, get("software")), mode=_opt(str, get("mode")), source=_opt(str, get("source")),
            estimator=_opt(str, get("estimator")), model_card=get("model_card"), scan_timing=get("scan_timing"),
            timing_source=_opt(str, get("timing_source")),
            timing_warnings=tuple(str(w) for w in get("timing_warnings") or ()),
            tile_geometry=get("tile_geometry"), window_frames=_opt(int, get("window_frames")),
            hop_frames=_opt(int, get("hop_frames")), start_time=_opt(str, get("start_time")),
            timing_comparison=_opt(str, get("timing_comparison")), recording_check=get("recording_check"),
            extra={k: v for k, v in attrs.items() if k not in names and k not in RESERVED_ATTRS},
        )

    def to_json(self) -> dict[str, Any]:
        """The root attributes of the run: every field (None as null), then ``extra``."""
        doc: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            if name == "timing_warnings":
                doc[name] = list(value)
            else:
                doc[name] = dict(value) if isinstance(value, Mapping) else value
        return {**doc, **self.extra}


@dataclass(frozen=True)
class LogSegment:
    """One run that wrote to the log: when it opened it, where its rows start, the offsets
    added to its window numbers and frame indices, and (for an appended run) its metadata."""

    opened: str
    first_window_row: int = 0
    first_frame_row: int = 0
    window_offset: int = 0
    frame_offset: int = 0
    run: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LogSegment:
        return cls(str(doc.get("opened", "")), _int(doc, "first_window_row", 0), _int(doc, "first_frame_row", 0),
                   int(doc.get("window_offset", 0)), int(doc.get("frame_offset", 0)), doc.get("attrs"))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"opened": self.opened, "first_window_row": self.first_window_row,
                               "first_frame_row": self.first_frame_row, "window_offset": self.window_offset,
                               "frame_offset": self.frame_offset}
        if self.run is not None:
            doc["attrs"] = dict(self.run)
        return doc


@dataclass(frozen=True)
class LogAttrs:
    """Everything in a run log's root attributes (see the module docstring)."""

    committed_windows: int = 0
    committed_frames: int = 0
    committed_gaps: int = 0
    rois: tuple[LogRoi, ...] = ()
    segments: tuple[LogSegment, ...] = ()
    #: the run's own metadata (the caller's ``attrs`` when the log was created)
    run: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = LOG_FORMAT_VERSION

    # ---------------------------------------------------------- run settings
    @property
    def metadata(self) -> RunMetadata:
        """The run's metadata, typed (:class:`RunMetadata`)."""
        return RunMetadata.from_json(self.run)

    @property
    def mode(self) -> str | None:
        """"replay" or "live" (the kind of run that created the log), when recorded."""
        return self.metadata.mode

    @property
    def window_frames(self) -> int | None:
        return self.metadata.window_frames

    @property
    def hop_frames(self) -> int | None:
        return self.metadata.hop_frames

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_json(cls, attrs: Mapping[str, Any]) -> LogAttrs:
        """Parse a log's root attributes.

        Raises:
            ValueError: not a run log, or a damaged one (a count missing or not a count).
            DleStreamError: a log written by a newer dle-stream (a format this one cannot read).
        """
        marker = attrs.get("dle_stream")
        if not is_log_marker(marker):
            raise ValueError("no 'dle_stream' marker of kind 'run_log'")
        version = int(marker.get("format_version", 1))
        if version > LOG_FORMAT_VERSION:
            raise DleStreamError(f"the run log is of format {version}, newer than this dle-stream reads "
                                 f"(up to {LOG_FORMAT_VERSION}); upgrade dle-stream (pip install -U dle-stream)")
        return cls(
            committed_windows=_int(attrs, "committed_windows"),
            committed_frames=_int(attrs, "committed_frames"),
            committed_gaps=_int(attrs, "committed_gaps", 0),
            rois=tuple(LogRoi.from_json(r) for r in attrs.get("rois") or []),
            segments=tuple(LogSegment.from_json(s) for s in attrs.get("segments") or []),
            run={k: v for k, v in attrs.items() if k not in RESERVED_ATTRS},
            format_version=version,
        )

    def to_json(self) -> dict[str, Any]:
        """The root attributes (the run's metadata first, then the log's own keys)."""
        return {
            **self.run,
            "rois": [r.to_json() for r in self.rois],
            "segments": [s.to_json() for s in self.segments],
            "committed_windows": self.committed_windows,
            "committed_frames": self.committed_frames,
            "committed_gaps": self.committed_gaps,
            "dle_stream": {"kind": LOG_KIND, "format_version": self.format_version},
        }

    def replace(self, **changes: Any) -> LogAttrs:
        """A copy with ``changes`` (e.g. new committed counts)."""
        return dataclasses.replace(self, **changes)
