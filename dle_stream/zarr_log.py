"""The run log: every window estimate and every frame's timestamps, in one Zarr v3 group.

Layout of a log (``<path>/``, a Zarr v3 group; open it with plain ``zarr``, with plain
``xarray.open_zarr(path)`` thanks to the dimension names, or as a labelled
:class:`xarray.Dataset` of the committed windows with :func:`dle_stream.open_log`)::

    attrs   dle_stream          {"kind": "run_log", "format_version": 3}
            committed_windows   rows of the window arrays that hold complete data
            committed_frames    rows of the frame arrays that hold complete data
            committed_gaps      rows of ``gaps`` that hold complete data
            rois                [{"name", "bbox": [row, col, h, w], "tiles": [...]}, ...]
            segments            one entry per run that wrote to the log (create, then
                                each --append): offsets, first rows, start time, its attrs
            ...                 whatever the caller passed as ``attrs`` when the log was
                                created (software version, model card, scan timing, ...)
                                (the schema: :class:`dle_stream.log_attrs.LogAttrs`)
    window      int64   [window]         running window number
    d           float32 [window, tile]   D̂, µm²/s (NaN: no estimate)
    sigma       float32 [window, tile]   σ̂, µm²/s
    flags       uint8   [window, tile]   EstimateFlag bits
    lo68, hi68  float32 [window, tile]   68 % highest-density interval, µm²/s
    lo95, hi95  float32 [window, tile]   95 % highest-density interval, µm²/s
    p_above     float32 [window, tile]   probability that D is above the model's range
    log_likelihood float16 [window, tile, d_grid]  log-likelihood of D at ``d_grid``
                                         (max 0); independent windows add
    d_grid      float64 [d_grid]         D at the grid's knots, µm²/s (last: inf = beyond)
    frame_start int64   [window]         first frame of the window
    frame_stop  int64   [window]         frame after the last one (half-open)
    t_start_s   float64 [window]         window span in acquisition time, s
    t_stop_s    float64 [window]
    wall_time   float64 [window]         Unix time the estimate was made, s
    tile_bbox   int32   [tile, bbox]     row, col, height, width of each tile, px
    frame_index int64   [frame]          position of the frame in the stream
    timestamp_s float64 [frame]          source timestamp, s (NaN if unknown)
    image_number int64  [frame]          camera frame counter (-1 if unknown)
    gaps        int64   [gap, gap_field] frame_index, n_lost, kind (index into
                                         ``gaps.attrs["kinds"]``)

The first axis of every record array grows. Records are buffered in memory and
appended in batches (:meth:`ZarrLog.flush`, about once a second); the committed counts
are written *after* the data, and only the rows below them are meaningful: an array may
be longer for a moment while a flush is under way, or after a run was killed in one.
Zarr's local store writes every file atomically (temporary file, then rename), so a run
killed at any instant leaves a store that opens and holds every committed row.

The commit is one atomic write of the root ``zarr.json`` (:func:`_write_root`): the
committed counts *and* the consolidated metadata of every array at its committed length,
copied from the arrays' own ``zarr.json`` after the data was written. A reader that uses
the consolidated metadata (plain ``xarray.open_zarr``, ``zarr.open_group``) therefore sees
exactly the committed rows, never a half-written flush and never a stale shape; the
writer and :class:`LogView` read the arrays' own metadata (``use_consolidated=False``)
and cut at the committed counts. Logs of format 2 have no consolidated metadata; they
read the same way (``xarray.open_zarr(path, consolidated=False)``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr
from psygnal import SignalInstance

from dle_stream.errors import DleStreamError, ParameterError, arg
from dle_stream.events import RECORD_PRIORITY, FrameEvent, GapEvent, RunnerEvents, WindowEstimate
from dle_stream.files import jsonable, write_atomic
from dle_stream.likelihood import DGrid
from dle_stream.log_attrs import LOG_FORMAT_VERSION, RESERVED_ATTRS, LogAttrs, LogRoi, LogSegment, is_log_marker

__all__ = ["LogView", "ZarrLog", "open_log", "LOG_FORMAT_VERSION"]

WINDOW_CHUNK = 256     # windows per chunk (all tiles in one chunk)
FRAME_CHUNK = 4096     # frames per chunk
GAP_CHUNK = 1024
UNITS_D = "µm²/s"
BBOX_FIELDS = ["row", "col", "height", "width"]
GAP_FIELDS = ["frame_index", "n_lost", "kind"]

# name: (dtype, fill value, units or None, description)
_WINDOW_SCALARS: dict[str, tuple[str, Any, str | None, str]] = {
    "window": ("int64", -1, None, "running window number"),
    "frame_start": ("int64", -1, None, "first frame the window covers"),
    "frame_stop": ("int64", -1, None, "frame after the last one the window covers (half-open)"),
    "t_start_s": ("float64", math.nan, "s", "start of the window in acquisition time"),
    "t_stop_s": ("float64", math.nan, "s", "end of the window in acquisition time"),
    "wall_time": ("float64", math.nan, "s", "Unix time when the estimate was made"),
}
_WINDOW_TILES: dict[str, tuple[str, Any, str | None, str]] = {
    "d": ("float32", math.nan, UNITS_D, "diffusion coefficient estimate D̂ (NaN: no estimate)"),
    "sigma": ("float32", math.nan, UNITS_D, "standard deviation σ̂ of the estimate"),
    "flags": ("uint8", 0, None, "dle_stream.events.EstimateFlag bits"),
    "lo68": ("float32", math.nan, UNITS_D, "lower end of the 68 % highest-density interval"),
    "hi68": ("float32", math.nan, UNITS_D, "upper end of the 68 % highest-density interval"),
    "lo95": ("float32", math.nan, UNITS_D, "lower end of the 95 % highest-density interval"),
    "hi95": ("float32", math.nan, UNITS_D, "upper end of the 95 % highest-density interval"),
    "p_above": ("float32", math.nan, None, "probability that D is above the model's range"),
}
#: the window log-likelihood of D on the grid ``d_grid`` (what independent windows combine by adding)
_LIKELIHOOD = ("float16", math.nan, None,
               "log-likelihood of D at d_grid (maximum 0, floor -60; NaN: no estimate); add over independent windows")
_FRAME_ARRAYS: dict[str, tuple[str, Any, str | None, str]] = {
    "frame_index": ("int64", -1, None, "position of the frame in the stream"),
    "timestamp_s": ("float64", math.nan, "s", "acquisition timestamp from the source (NaN: unknown)"),
    "image_number": ("int64", -1, None, "camera frame counter, e.g. Micro-Manager ImageNumber (-1: unknown)"),
}
_WINDOW_ARRAYS = (*_WINDOW_SCALARS, *_WINDOW_TILES, "log_likelihood")
_ALL_ARRAYS = (*_WINDOW_ARRAYS, *_FRAME_ARRAYS, "gaps", "tile_bbox", "d_grid")


# ----------------------------------------------------------------------------- helpers
def _attr_json(value: Any) -> Any:
    """A log attribute as plain JSON types: :func:`dle_stream.files.jsonable` with NaN kept
    (the root document is written with ``allow_nan``, as Zarr writes attributes) and an
    unknown type refused."""
    return jsonable(value, keep_nonfinite=True, strict=True)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _normalize_rois(rois: list[dict] | None, n_tiles: int) -> list[dict]:
    out = []
    for i, roi in enumerate(rois or []):
        try:
            name = str(roi["name"])
            bbox = [int(v) for v in roi["bbox"]]
            tiles = [int(t) for t in roi["tiles"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ROI {i} needs 'name', 'bbox' [row, col, h, w] and 'tiles': {roi!r}") from exc
        if len(bbox) != 4:
            raise ValueError(f"ROI {name!r}: bbox must be [row, col, height, width], got {bbox}")
        bad = [t for t in tiles if not 0 <= t < n_tiles]
        if bad:
            raise ValueError(f"ROI {name!r}: tile indices {bad} outside 0..{n_tiles - 1}")
        extra = {k: v for k, v in roi.items() if k not in ("name", "bbox", "tiles")}
        out.append({"name": name, "bbox": bbox, "tiles": tiles, **_attr_json(extra)})
    return out


#: run attributes that must match to append to a log, and how the user sets each (the
#: parameters are named with errors.arg: the command line shows its flags)
_SAME_SETTINGS = (("estimator", f"the estimator ({arg('estimator')})"), ("window_frames", f"the window ({arg('window')})"),
                  ("hop_frames", f"the hop ({arg('hop')})"), ("mode", "the kind of run (replay or run)"))


def _model_identity(attrs: dict) -> tuple | None:
    card = attrs.get("model_card") or {}
    return (card.get("name"), card.get("weights_sha256")) if card else None


def _check_same_settings(path: Path, old: dict, new: dict) -> None:
    """Refuse to append a run whose settings differ from the log's (naming which)."""
    differ = [label for key, label in _SAME_SETTINGS if key in old and key in new and old[key] != new[key]]
    old_model, new_model = _model_identity(old), _model_identity(new)
    if old_model != new_model and old_model and new_model:
        differ.append(f"the model ({old_model[0]} then, {new_model[0]} now, or other weights)")
    if old.get("mode") == "replay" and new.get("mode") == "replay" and old.get("source") != new.get("source"):
        differ.append(f"the recording ({old.get('source')} then, {new.get('source')} now)")
    if differ:
        raise ParameterError(f"run log {path} was written with other settings: {'; '.join(differ)} "
                             f"{'differs' if len(differ) == 1 else 'differ'}; "
                             f"{arg('append', True)} needs the same ones, or choose another {arg('log')} path")


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a log's group (every named node of a log is an array; zarr types them
    as ``Array | Group``)."""
    return cast(zarr.Array, group[name])


def _attrs(node: zarr.Group | zarr.Array) -> Mapping[str, Any]:
    """A node's attributes: JSON read from disk, typed Any (callers convert what they read)."""
    return node.attrs


def _is_log(group: zarr.Group) -> bool:
    return is_log_marker(group.attrs.get("dle_stream"))


def _open_group(path: Path, mode: Literal["r", "r+", "a", "w", "w-"]) -> zarr.Group | None:
    """The Zarr group at ``path``, or None if there is none (or it is no group).

    The arrays' own metadata is read, not the consolidated copy in the root document: the
    writer must see the true shapes (a killed flush may have grown an array past the
    commit), and readers cut at the committed counts anyway."""
    try:
        node = zarr.open_group(store=str(path), mode=mode, zarr_format=3, use_consolidated=False)
    except PermissionError:
        raise
    except Exception:  # noqa: BLE001 - zarr raises many kinds of errors for a broken store
        return None
    return node


def _write_root(path: Path, attrs: LogAttrs) -> None:
    """Commit: write the root ``zarr.json`` with ``attrs`` and the consolidated metadata of
    every array, in one atomic file write (:func:`dle_stream.files.write_atomic`).

    The consolidated metadata is each array's own ``zarr.json`` as it is on disk now; the
    caller has resized every array to its committed length before, so a reader that uses
    the consolidated metadata sees the committed rows and nothing else. The document is
    that of a Zarr v3 group with inline consolidated metadata, as ``zarr.consolidate_metadata``
    writes it.
    """
    members = {name: json.loads((path / name / "zarr.json").read_bytes()) for name in _ALL_ARRAYS}
    doc = {"zarr_format": 3, "node_type": "group", "attributes": _attr_json(attrs.to_json()),
           "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": members}}
    text = json.dumps(doc, indent=1, allow_nan=True)
    write_atomic(path / "zarr.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- writer
class ZarrLog:
    """Writes the run log of one run (see the module docstring for the layout).

    Create with :meth:`ZarrLog.create`. In a run it is a sink
    (:class:`dle_stream.protocols.Sink`): ``runner.attach(log)`` subscribes it to the
    runner's events, frames (``frame``), gaps (``gap``) and estimates (``estimated``, each
    committed at once and before any display sees it: :data:`~dle_stream.events.RECORD_PRIORITY`);
    ``finished`` flushes. The records can also be added by hand with :meth:`add_frame`,
    :meth:`add_estimate` and :meth:`add_gap`; they are buffered in memory and written by
    :meth:`flush`, which runs by itself at the next add once ``flush_interval_s`` has
    passed since the last flush, and on :meth:`close` (also via ``with``, which also
    detaches the log from the runner's events).

    When a log is reopened with ``append=True`` the records of the new run are numbered
    after the ones already committed: every window number added is stored plus
    :attr:`window_offset` and every frame index (``add_frame``'s index, an estimate's
    ``frame_start``/``frame_stop``, a gap's frame index) plus :attr:`frame_offset`, so
    the resumed run counts from 0 as usual. Both offsets are 0 for a new log.
    Acquisition times (``t_start_s``, ``timestamp_s``) are stored as given.
    """

    def __init__(self, group: zarr.Group, path: Path, header: LogAttrs, *, flush_interval_s: float = 1.0,
                 window_offset: int = 0, frame_offset: int = 0):
        """Use :meth:`ZarrLog.create`; this wraps an already prepared group whose root
        attributes on disk are ``header``."""
        self.path = Path(path)
        self.flush_interval_s = float(flush_interval_s)
        self.window_offset = int(window_offset)
        self.frame_offset = int(frame_offset)
        self._group = group
        self._header = header
        self._arrays: dict[str, zarr.Array] = {name: _array(group, name) for name in _ALL_ARRAYS}
        self.tile_bbox = np.asarray(self._arrays["tile_bbox"][:], dtype=np.int32)
        self.n_tiles = int(self.tile_bbox.shape[0])
        self._committed = {
            "windows": header.committed_windows,
            "frames": header.committed_frames,
            "gaps": header.committed_gaps,
        }
        self._gap_kinds: list[str] = list(_attrs(self._arrays["gaps"]).get("kinds", []))
        self._gap_kinds_written = len(self._gap_kinds)
        self._estimates: list[WindowEstimate] = []
        self._frames: list[tuple[int, float, int]] = []
        self._gaps: list[tuple[int, int, int]] = []
        self._last_flush = time.monotonic()
        self._closed = False
        self._attached: list[tuple[SignalInstance, Callable[..., None]]] = []
        #: replaying the same recording into its log again (--append): the first frame to
        #: read, and frames below ``logged_until`` are already in the log (not logged twice);
        #: ``images_lost_before``: images lost in the log's gaps up to ``resume_frame``
        self.resume_frame = 0
        self.images_lost_before = 0
        self.logged_until = 0

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        tile_bboxes: np.ndarray,
        rois: list[dict] | None = None,
        attrs: dict | None = None,
        overwrite: bool = False,
        append: bool = False,
        flush_interval_s: float = 1.0,
        grid: DGrid | None = None,
        d_max_um2_s: float = 1.0,
    ) -> "ZarrLog":
        """Start the log of a run at ``path`` (a folder; ``.zarr`` suffix customary).

        Args:
            path: where the Zarr group goes.
            tile_bboxes: [n_tiles, 4] row, col, height, width of each tile, px.
            rois: user ROIs, each ``{"name": str, "bbox": [row, col, h, w],
                "tiles": [tile indices]}``.
            attrs: run metadata (software version, model card, scan timing, source,
                tile geometry, window length and hop, start time, estimator; JSON-able).
            overwrite: replace an existing log at ``path``.
            append: continue an existing log (e.g. of a killed run) after its committed
                records; its tile geometry must match. A missing ``path`` is created.
            flush_interval_s: flush buffered records at the next add once this long has
                passed since the last flush (0: at every add).
            grid, d_max_um2_s: the estimator's D grid and the top of its operating range
                in this stream's units (the grid of ``log_likelihood``, stored as ``d_grid``
                in µm²/s; its last entry, +inf, stands for D beyond the grid).

        Raises:
            DleStreamError: the path exists and neither flag is given, it is not a log,
                the geometry does not match (append), or it cannot be written.
        """
        path = Path(path)
        if overwrite and append:
            raise ParameterError(f"{arg('overwrite', True)} and {arg('append', True)} exclude each other; "
                                 f"give only one")
        bboxes = np.asarray(tile_bboxes)
        if bboxes.ndim != 2 or bboxes.shape[1] != 4 or bboxes.shape[0] < 1:
            raise ValueError(f"tile_bboxes must be [n_tiles >= 1, 4] (row, col, h, w), got shape {bboxes.shape}")
        bboxes = bboxes.astype(np.int32)
        rois_n = _normalize_rois(rois, bboxes.shape[0])
        user_attrs = _attr_json(dict(attrs or {}))
        clash = [k for k in user_attrs if k in RESERVED_ATTRS]
        if clash:
            raise ValueError(f"log attrs {clash} are reserved for the log itself")

        exists = path.exists() and not (path.is_dir() and not any(path.iterdir()))
        if exists:
            if path.is_file():
                raise ParameterError(
                    f"run log path {path} is a file, not a run log; choose another {arg('log')} path")
            group = _open_group(path, "r+")
            is_log = group is not None and _is_log(group)
            if not (overwrite or append):
                raise ParameterError(
                    f"run log {path} already exists; use {arg('overwrite', True)} or {arg('append', True)}, "
                    f"or choose another {arg('log')} path")
            if not is_log:
                raise ParameterError(
                    f"{path} exists and is not a dle-stream run log; refusing to "
                    f"{'overwrite' if overwrite else 'append to'} it; choose another {arg('log')} path")
            if append:
                assert group is not None  # is_log
                return cls._reopen(group, path, bboxes, rois_n, user_attrs, flush_interval_s)
        try:
            group, header = cls._new_store(path, bboxes, rois_n, user_attrs, grid or DGrid(), float(d_max_um2_s),
                                           overwrite=exists)
        except DleStreamError:
            raise
        except OSError as exc:
            raise ParameterError(
                f"cannot write the run log at {path} ({exc.strerror or exc}); "
                f"choose a writable location for the run log ({arg('log')})") from exc
        return cls(group, path, header, flush_interval_s=flush_interval_s)

    @staticmethod
    def _new_store(path: Path, bboxes: np.ndarray, rois: list[dict], user_attrs: dict, grid: DGrid,
                   d_max_um2_s: float, *, overwrite: bool) -> tuple[zarr.Group, LogAttrs]:
        # The marker and committed counts go in last: a store whose creation was cut
        # short is not taken for a log.
        group = zarr.open_group(store=str(path), mode="w" if overwrite else "w-",
                                zarr_format=3, attributes=user_attrs)
        n_tiles = bboxes.shape[0]

        def make(name: str, spec: tuple, shape: tuple, chunks: tuple, dims: tuple) -> None:
            dtype, fill, units, description = spec
            attributes = {"description": description}
            if units:
                attributes["units"] = units
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                               dimension_names=dims, attributes=attributes)

        for name, spec in _WINDOW_SCALARS.items():
            make(name, spec, (0,), (WINDOW_CHUNK,), ("window",))
        for name, spec in _WINDOW_TILES.items():
            make(name, spec, (0, n_tiles), (WINDOW_CHUNK, n_tiles), ("window", "tile"))
        d_grid = np.concatenate([grid.knots * d_max_um2_s, [np.inf]])
        n_grid = d_grid.size
        make("log_likelihood", _LIKELIHOOD, (0, n_tiles, n_grid), (WINDOW_CHUNK // 8, n_tiles, n_grid),
             ("window", "tile", "d_grid"))
        grid_arr = group.create_array(
            "d_grid", shape=d_grid.shape, chunks=d_grid.shape, dtype="float64", fill_value=0.0,
            dimension_names=("d_grid",),
            attributes={"description": "D at the knots of log_likelihood (log-linear between knots); "
                                       "the last entry (inf) stands for D beyond the grid", "units": UNITS_D,
                        "grid": grid.to_dict(), "d_max_um2_s": d_max_um2_s})
        grid_arr[...] = d_grid
        for name, spec in _FRAME_ARRAYS.items():
            make(name, spec, (0,), (FRAME_CHUNK,), ("frame",))
        group.create_array(
            "gaps", shape=(0, 3), chunks=(GAP_CHUNK, 3), dtype="int64", fill_value=-1,
            dimension_names=("gap", "gap_field"),
            attributes={"description": "detected gaps in the stream", "fields": GAP_FIELDS, "kinds": []})
        tb = group.create_array(
            "tile_bbox", shape=bboxes.shape, chunks=bboxes.shape, dtype="int32", fill_value=0,
            dimension_names=("tile", "bbox"),
            attributes={"description": "tile bounding boxes in the frame, px", "fields": BBOX_FIELDS})
        tb[...] = bboxes
        header = LogAttrs(rois=tuple(LogRoi.from_json(r) for r in rois), segments=(LogSegment(_now_iso()),),
                          run=user_attrs)
        _write_root(path, header)
        return group, header

    @classmethod
    def _reopen(cls, group: zarr.Group, path: Path, bboxes: np.ndarray, rois: list[dict],
                user_attrs: dict, flush_interval_s: float) -> "ZarrLog":
        try:
            missing = [n for n in _ALL_ARRAYS if n not in group]
            try:
                old_header = LogAttrs.from_json(group.attrs.asdict())
            except ValueError as exc:
                missing.append(f"readable attributes: {exc}")
            if missing:
                raise ParameterError(
                    f"run log {path} is incomplete (missing {', '.join(missing)}); "
                    f"use {arg('overwrite', True)} or choose another {arg('log')} path")
            old = np.asarray(_array(group, "tile_bbox")[:])
            if old.shape != bboxes.shape or not np.array_equal(old, bboxes):
                raise ParameterError(
                    f"run log {path} has a different tile geometry ({old.shape[0]} tiles) than this run "
                    f"({bboxes.shape[0]} tiles, or other positions); {arg('append', True)} needs the same tiles: "
                    f"use {arg('overwrite', True)} or choose another {arg('log')} path")
            _check_same_settings(path, dict(old_header.run), user_attrs)
            cw, cf, cg = old_header.committed_windows, old_header.committed_frames, old_header.committed_gaps
            # Drop anything a killed flush wrote past the committed rows.
            for name in _WINDOW_ARRAYS:
                arr = _array(group, name)
                if arr.shape[0] != cw:
                    arr.resize((cw, *arr.shape[1:]))
            for name in _FRAME_ARRAYS:
                if _array(group, name).shape[0] != cf:
                    _array(group, name).resize((cf,))
            if _array(group, "gaps").shape[0] != cg:
                _array(group, "gaps").resize((cg, 3))
            window_offset = int(np.asarray(_array(group, "window")[cw - 1])) + 1 if cw else 0
            logged_until = int(np.asarray(_array(group, "frame_index")[cf - 1])) + 1 if cf else 0
            last_stop = int(np.max(_array(group, "frame_stop")[:cw])) if cw else 0
            resume_frame = lost_before = 0
            if user_attrs.get("mode") == "replay":
                # the same recording again: continue it where the committed windows end (frame
                # numbers are the recording's own, so they need no offset)
                frame_offset = 0
                hop, window = int(user_attrs.get("hop_frames", 1)), int(user_attrs.get("window_frames", 1))
                resume_frame = max(0, last_stop + hop - window) if cw else 0
                # images lost before that frame (a resumed run cannot see gaps before its first frame)
                gaps = np.asarray(_array(group, "gaps")[:cg]).reshape(-1, 3)
                # each gap once (logs written before resumed replays skipped re-read gaps hold it twice)
                seen = np.unique(gaps[gaps[:, 0] <= resume_frame][:, :2], axis=0)
                lost_before = int(np.sum(np.maximum(seen[:, 1], 0)))
            else:
                # a new acquisition continues the log: its frames are numbered on after the old ones
                frame_offset = max(logged_until, last_stop)
                logged_until = 0
            segment = LogSegment(_now_iso(), cw, cf, window_offset, frame_offset, user_attrs)
            new_rois = tuple(LogRoi.from_json(r) for r in rois)
            # appending writes the current format (a format-2 log gains its consolidated metadata)
            header = old_header.replace(segments=(*old_header.segments, segment),
                                        rois=new_rois if new_rois else old_header.rois,
                                        format_version=LOG_FORMAT_VERSION)
            _write_root(path, header)
        except OSError as exc:
            raise ParameterError(
                f"cannot write the run log at {path} ({exc.strerror or exc}); "
                f"choose a writable location for the run log ({arg('log')})") from exc
        log = cls(group, path, header, flush_interval_s=flush_interval_s,
                  window_offset=window_offset, frame_offset=frame_offset)
        log.resume_frame = resume_frame
        log.images_lost_before = lost_before
        log.logged_until = logged_until
        return log

    # ------------------------------------------------------------------ state
    @property
    def committed_windows(self) -> int:
        """Window rows on disk below the committed count."""
        return self._committed["windows"]

    @property
    def committed_frames(self) -> int:
        """Frame rows on disk below the committed count."""
        return self._committed["frames"]

    @property
    def committed_gaps(self) -> int:
        return self._committed["gaps"]

    @property
    def pending(self) -> int:
        """Records buffered and not yet flushed (windows + frames + gaps)."""
        return len(self._estimates) + len(self._frames) + len(self._gaps)

    # ------------------------------------------------------------------ a sink of the runner
    def attach(self, events: RunnerEvents) -> None:
        """Subscribe to a runner's events (:class:`dle_stream.protocols.Sink`): every frame,
        gap and window estimate is recorded; an estimate is committed (flushed) before any
        display handles it."""
        for signal, slot, priority in ((events.frame, self._on_frame, 0), (events.gap, self._on_gap, 0),
                                       (events.estimated, self._on_estimate, RECORD_PRIORITY),
                                       (events.finished, self._on_finished, 0)):
            signal.connect(slot, priority=priority)
            self._attached.append((signal, slot))

    def _on_frame(self, event: FrameEvent) -> None:
        self.add_frame(event.index, event.timestamp_s, event.image_number)

    def _on_gap(self, gap: GapEvent) -> None:
        self.add_gap(gap.frame_index, gap.n_lost, gap.kind)

    def _on_estimate(self, est: WindowEstimate) -> None:
        # committed before it is reported: a kill never loses an estimate already shown
        self.add_estimate(est)
        self.flush()

    def _on_finished(self, _stats: object) -> None:
        self.flush()

    def _detach(self) -> None:
        for signal, slot in self._attached:
            signal.disconnect(slot, missing_ok=True)
        self._attached.clear()

    # ------------------------------------------------------------------ adding
    def add_frame(self, index: int, timestamp_s: float | None = None, image_number: int | None = None) -> None:
        """Buffer one frame's index, source timestamp (s) and camera frame counter
        (skipped when a resumed replay re-reads a frame the log already holds)."""
        self._check_open()
        if int(index) + self.frame_offset < self.logged_until:
            return
        self._frames.append((
            int(index) + self.frame_offset,
            math.nan if timestamp_s is None else float(timestamp_s),
            -1 if image_number is None else int(image_number),
        ))
        self._maybe_flush()

    def add_estimate(self, est: WindowEstimate) -> None:
        """Buffer the estimates of one window position for every tile."""
        self._check_open()
        for name in ("d_um2_s", "sigma_um2_s", "flags"):
            shape = np.shape(getattr(est, name))
            if shape != (self.n_tiles,):
                raise ValueError(f"WindowEstimate.{name} has shape {shape}, the log has {self.n_tiles} tiles")
        n_grid = self._arrays["d_grid"].shape[0]
        if est.log_likelihood is not None and np.shape(est.log_likelihood) != (self.n_tiles, n_grid):
            raise ValueError(f"WindowEstimate.log_likelihood has shape {np.shape(est.log_likelihood)}, "
                             f"the log has {self.n_tiles} tiles × {n_grid} grid points")
        self._estimates.append(est)
        self._maybe_flush()

    def add_gap(self, frame_index: int, n_lost: int, kind: str = "dropped_frames") -> None:
        """Buffer a gap seen at ``frame_index`` (``n_lost`` frames lost, -1 if unknown;
        skipped when a resumed replay re-reads a gap the log already holds).

        ``kind`` is free text (e.g. "dropped_frames", "timestamp_jump",
        "skipped_windows"); it is stored as an index into ``gaps.attrs["kinds"]``.
        """
        self._check_open()
        if int(frame_index) + self.frame_offset < self.logged_until:
            return  # a resumed replay re-read a gap the log already holds
        kind = str(kind)
        if kind not in self._gap_kinds:
            self._gap_kinds.append(kind)
        self._gaps.append((int(frame_index) + self.frame_offset, int(n_lost), self._gap_kinds.index(kind)))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"run log {self.path} is closed")

    # ------------------------------------------------------------------ writing
    def flush(self) -> None:
        """Write the buffered records, then the committed counts.

        Rows are written at the committed counts (not at the arrays' current length), so
        a flush that failed halfway can simply be retried: the buffers are kept until
        the counts are written.
        """
        self._last_flush = time.monotonic()
        if not self.pending:
            return
        try:
            self._write_data()
            self._write_commit()
        except OSError as exc:
            raise DleStreamError(
                f"cannot write the run log at {self.path} ({exc.strerror or exc}); "
                f"check the disk and the log's location") from exc
        self._estimates.clear()
        self._frames.clear()
        self._gaps.clear()
        self._last_flush = time.monotonic()

    def _write_rows(self, name: str, start: int, block: np.ndarray) -> None:
        arr = self._arrays[name]
        stop = start + block.shape[0]
        if arr.shape[0] != stop:
            arr.resize((stop, *arr.shape[1:]))
        arr[start:stop] = block

    def _write_data(self) -> None:
        if self._estimates:
            ests = self._estimates
            cw = self._committed["windows"]
            cols: dict[str, np.ndarray] = {
                "window": np.array([e.window + self.window_offset for e in ests], dtype=np.int64),
                "frame_start": np.array([e.frame_start + self.frame_offset for e in ests], dtype=np.int64),
                "frame_stop": np.array([e.frame_stop + self.frame_offset for e in ests], dtype=np.int64),
                "t_start_s": np.array([e.t_start_s for e in ests], dtype=np.float64),
                "t_stop_s": np.array([e.t_stop_s for e in ests], dtype=np.float64),
                "wall_time": np.array([e.wall_time for e in ests], dtype=np.float64),
                "d": np.stack([np.asarray(e.d_um2_s, dtype=np.float32) for e in ests]),
                "sigma": np.stack([np.asarray(e.sigma_um2_s, dtype=np.float32) for e in ests]),
                "flags": np.stack([np.asarray(e.flags).astype(np.uint8) for e in ests]),
                **self._interval_columns(ests),
            }
            for name, block in cols.items():
                self._write_rows(name, cw, block)
        if self._frames:
            cf = self._committed["frames"]
            idx, ts, num = zip(*self._frames)
            self._write_rows("frame_index", cf, np.array(idx, dtype=np.int64))
            self._write_rows("timestamp_s", cf, np.array(ts, dtype=np.float64))
            self._write_rows("image_number", cf, np.array(num, dtype=np.int64))
        if self._gaps:
            if len(self._gap_kinds) != self._gap_kinds_written:
                gaps = self._arrays["gaps"]
                gaps.update_attributes({"kinds": list(self._gap_kinds)})
                self._gap_kinds_written = len(self._gap_kinds)
            self._write_rows("gaps", self._committed["gaps"], np.array(self._gaps, dtype=np.int64))

    def _interval_columns(self, ests: list[WindowEstimate]) -> dict[str, np.ndarray]:
        n, n_grid = self.n_tiles, self._arrays["d_grid"].shape[0]
        nan = np.full(n, np.nan, dtype=np.float32)

        def col(get) -> np.ndarray:
            return np.stack([np.asarray(v, dtype=np.float32) if (v := get(e)) is not None else nan for e in ests])

        ll = [np.asarray(e.log_likelihood, dtype=np.float16) if e.log_likelihood is not None
              else np.full((n, n_grid), np.nan, dtype=np.float16) for e in ests]
        return {
            "lo68": col(lambda e: None if e.interval68_um2_s is None else np.asarray(e.interval68_um2_s)[:, 0]),
            "hi68": col(lambda e: None if e.interval68_um2_s is None else np.asarray(e.interval68_um2_s)[:, 1]),
            "lo95": col(lambda e: None if e.interval95_um2_s is None else np.asarray(e.interval95_um2_s)[:, 0]),
            "hi95": col(lambda e: None if e.interval95_um2_s is None else np.asarray(e.interval95_um2_s)[:, 1]),
            "p_above": col(lambda e: e.p_above),
            "log_likelihood": np.stack(ll),
        }

    def _write_commit(self) -> None:
        """Write the committed counts (one metadata write, after all the data)."""
        counts = {
            "windows": self._committed["windows"] + len(self._estimates),
            "frames": self._committed["frames"] + len(self._frames),
            "gaps": self._committed["gaps"] + len(self._gaps),
        }
        header = self._header.replace(committed_windows=counts["windows"], committed_frames=counts["frames"],
                                      committed_gaps=counts["gaps"])
        _write_root(self.path, header)
        self._header = header
        self._committed = counts

    def close(self) -> None:
        """Flush what is buffered and detach from the runner's events; the log cannot be added
        to afterwards."""
        if self._closed:
            return
        self._detach()
        self.flush()
        self._closed = True

    def __enter__(self) -> "ZarrLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ZarrLog({str(self.path)!r}, tiles={self.n_tiles}, committed_windows="
                f"{self.committed_windows}, committed_frames={self.committed_frames}, pending={self.pending})")


# ----------------------------------------------------------------------------- reader
class LogView:
    """Read-only view of the committed part of a run log (see :func:`open_log`).

    Window arrays (``window``, ``d``, ``sigma``, ``flags``, ``frame_start``,
    ``frame_stop``, ``t_start_s``, ``t_stop_s``, ``wall_time``) hold ``n_windows``
    rows, frame arrays (``frame_index``, ``timestamp_s``, ``image_number``)
    ``n_frames`` rows, ``gaps`` ``n_gaps`` rows; each is read on first access. The
    counts are those committed when the log was opened.
    """

    def __init__(self, group: zarr.Group, path: Path):
        self.path = Path(path)
        self._group = group
        #: the root attributes, typed (:class:`~dle_stream.log_attrs.LogAttrs`)
        self.header = LogAttrs.from_json(group.attrs.asdict())
        #: the same as plain JSON (the run's metadata and the log's own keys, flat)
        self.attrs: dict = _attr_json(self.header.to_json())
        self.n_windows = self.header.committed_windows
        self.n_frames = self.header.committed_frames
        self.n_gaps = self.header.committed_gaps
        self.rois: list[dict] = [r.to_json() for r in self.header.rois]
        self.tile_bbox = np.asarray(_array(group, "tile_bbox")[:])
        self.n_tiles = int(self.tile_bbox.shape[0])
        self.gap_kinds: list[str] = list(_attrs(_array(group, "gaps")).get("kinds", []))
        self._cache: dict[str, np.ndarray] = {}

    def grid(self) -> tuple[DGrid, float]:
        """The D grid of ``log_likelihood`` and the top of the operating range (µm²/s)."""
        attrs = _attrs(_array(self._group, "d_grid"))
        return DGrid.from_dict(attrs.get("grid")), float(attrs.get("d_max_um2_s", 1.0))

    def array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Committed rows [start, stop) of the array ``name`` (all committed by default)."""
        if name in _WINDOW_ARRAYS:
            n = self.n_windows
        elif name in _FRAME_ARRAYS:
            n = self.n_frames
        elif name == "gaps":
            n = self.n_gaps
        elif name == "tile_bbox":
            return self.tile_bbox
        elif name == "d_grid":
            return np.asarray(_array(self._group, "d_grid")[:])
        else:
            raise KeyError(f"the run log has no array {name!r}")
        stop = n if stop is None else min(int(stop), n)
        start = max(0, min(int(start), stop))
        full = start == 0 and stop == n
        if full and name in self._cache:
            return self._cache[name]
        arr = _array(self._group, name)
        data = np.asarray(arr[start:stop]) if stop > start else np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        if full:
            self._cache[name] = data
        return data

    window = property(lambda self: self.array("window"), doc="[window] running window number")
    d = property(lambda self: self.array("d"), doc="[window, tile] D̂, µm²/s")
    sigma = property(lambda self: self.array("sigma"), doc="[window, tile] σ̂, µm²/s")
    flags = property(lambda self: self.array("flags"), doc="[window, tile] EstimateFlag bits")
    frame_start = property(lambda self: self.array("frame_start"))
    frame_stop = property(lambda self: self.array("frame_stop"))
    t_start_s = property(lambda self: self.array("t_start_s"))
    t_stop_s = property(lambda self: self.array("t_stop_s"))
    wall_time = property(lambda self: self.array("wall_time"))
    frame_index = property(lambda self: self.array("frame_index"))
    timestamp_s = property(lambda self: self.array("timestamp_s"))
    image_number = property(lambda self: self.array("image_number"))
    gaps = property(lambda self: self.array("gaps"), doc="[gap, 3] frame_index, n_lost, kind index")

    def gap_records(self) -> list[dict]:
        """The committed gaps as ``{"frame_index", "n_lost", "kind"}`` dicts."""
        return [
            {"frame_index": int(f), "n_lost": int(n),
             "kind": self.gap_kinds[k] if 0 <= k < len(self.gap_kinds) else str(k)}
            for f, n, k in self.gaps
        ]

    def to_xarray(self) -> Any:
        """The committed records as an :class:`xarray.Dataset` (needs xarray, an optional package).

        Variables keep the log's names and units (``d``, ``sigma``, ``lo68``, ``hi68``,
        ``lo95``, ``hi95`` in µm²/s, ``p_above``, ``flags`` [window, tile];
        ``log_likelihood`` [window, tile, d_grid]; ``timestamp_s``, ``image_number`` [frame]);
        only the committed rows are there (the counts when this view was opened). Coordinates:

        - ``window`` (running number), ``frame_start``, ``frame_stop``, ``t_start_s``,
          ``t_stop_s`` (acquisition time, s), ``wall_time`` (Unix time, s), ``time_s``,
          the middle of the window in acquisition time (indexed: ``sel(time_s=...)``), and
          ``segment``, the run that wrote the window (0, then one more per ``--append``; a
          live run appended to a log starts its acquisition time at 0 again);
        - ``tile`` (0..n-1) with its box ``row``, ``col``, ``height``, ``width`` (px);
        - ``roi`` (names) with ``roi_row``, ``roi_col``, ``roi_height``, ``roi_width`` (px)
          and ``in_roi`` [roi, tile] (True for the tiles covering the ROI):
          ``ds.d.sel(tile=ds.in_roi.sel(roi="vessel"))``;
        - ``frame_index`` (indexed) on the frame axis, ``d_grid`` (µm²/s) on the likelihood's.

        Gaps are ``gap_frame_index``, ``gap_n_lost`` and ``gap_kind`` (text) [gap]; ``flags``
        carries CF ``flag_masks``/``flag_meanings``. The arrays are read when first used
        (``ds.load()`` reads them all); ``ds.attrs`` holds the run's metadata.
        """
        from dle_stream.events import EstimateFlag
        from dle_stream.results import require_xarray

        xr = require_xarray("open_log")
        # xarray's own zarr reader (lazy), cut at this view's committed counts: arrays only grow
        # past them (a flush under way, or a killed one), so every row kept is complete
        ds = xr.open_zarr(self.path, consolidated=False, chunks=None, zarr_format=3)
        ds = ds.isel(window=slice(0, self.n_windows), frame=slice(0, self.n_frames), gap=slice(0, self.n_gaps))
        gaps = self.gap_records()
        ds = ds.drop_vars(["gaps", "tile_bbox"]).drop_dims(["gap_field", "bbox"], errors="ignore")
        ds = ds.set_coords(["frame_start", "frame_stop", "t_start_s", "t_stop_s", "wall_time", "frame_index"])
        bbox = self.tile_bbox.reshape(-1, 4)
        px = {"units": "px"}
        roi_box = np.array([r["bbox"] for r in self.rois], dtype=np.int64).reshape(-1, 4)
        in_roi = np.zeros((len(self.rois), self.n_tiles), dtype=bool)
        for i, roi in enumerate(self.rois):
            in_roi[i, roi["tiles"]] = True
        t_start, t_stop = self.t_start_s, self.t_stop_s
        first_rows = [seg.first_window_row for seg in self.header.segments] or [0]
        segment = np.searchsorted(np.asarray(first_rows), np.arange(self.n_windows), side="right") - 1
        ds = ds.assign_coords(
            time_s=("window", (t_start + t_stop) / 2,
                    {"units": "s", "description": "middle of the window in acquisition time"}),
            segment=("window", np.maximum(segment, 0),
                     {"description": "the run that wrote the window: 0, then one more per --append"}),
            tile=("tile", np.arange(self.n_tiles), {"description": "tile number"}),
            row=("tile", bbox[:, 0], px), col=("tile", bbox[:, 1], px),
            height=("tile", bbox[:, 2], px), width=("tile", bbox[:, 3], px),
            roi=("roi", np.array([str(r["name"]) for r in self.rois], dtype=object)),
            roi_row=("roi", roi_box[:, 0], px), roi_col=("roi", roi_box[:, 1], px),
            roi_height=("roi", roi_box[:, 2], px), roi_width=("roi", roi_box[:, 3], px),
            in_roi=(("roi", "tile"), in_roi, {"description": "the tile is one of those covering the ROI"}),
        )
        ds = ds.set_xindex("time_s").set_xindex("frame_index")
        ds = ds.assign(
            gap_frame_index=("gap", np.array([g["frame_index"] for g in gaps], dtype=np.int64),
                             {"description": "frame at which the gap was seen"}),
            gap_n_lost=("gap", np.array([g["n_lost"] for g in gaps], dtype=np.int64),
                        {"description": "frames lost (-1: unknown)"}),
            gap_kind=("gap", np.array([g["kind"] for g in gaps], dtype=object)),
        )
        masks = [int(f.value) for f in EstimateFlag if f.value]
        ds["flags"].attrs.update(flag_masks=masks, flag_meanings=" ".join(
            (f.name or "").lower() for f in EstimateFlag if f.value))
        ds.attrs = dict(self.attrs)
        return ds

    def __repr__(self) -> str:
        return (f"LogView({str(self.path)!r}, windows={self.n_windows}, tiles={self.n_tiles}, "
                f"frames={self.n_frames}, gaps={self.n_gaps})")


def open_log(path: str | os.PathLike) -> LogView:
    """Open the run log at ``path`` read-only; only committed records are visible.

    Raises:
        DleStreamError: ``path`` is missing, unreadable or not a dle-stream run log.
    """
    path = Path(path)
    if not path.exists():
        raise DleStreamError(f"run log {path} does not exist; check the path (the folder a run wrote its log to)")
    try:
        group = _open_group(path, "r")
    except PermissionError as exc:
        raise DleStreamError(f"cannot read the run log {path} (permission denied)") from exc
    if group is None or not _is_log(group):
        raise DleStreamError(
            f"{path} is not a dle-stream run log (no Zarr v3 group with dle_stream attributes); "
            f"check the path (the folder a run wrote its log to)")
    try:
        return LogView(group, path)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise DleStreamError(f"run log {path} is damaged or incomplete ({exc}); it cannot be read") from exc
