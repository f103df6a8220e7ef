"""Reading Zarr movies (a plain Zarr array, or an OME-Zarr group): :class:`ZarrRecording`.

Accepted layouts:

- a Zarr array [t, y, x] (axes named by ``dimension_names``, or any 3-D array);
- an OME-Zarr group (v0.5 ``attrs["ome"]["multiscales"]``, or v0.4 ``attrs["multiscales"]``):
  the first dataset (``"0"``) is read, its axes and ``scale`` give the pixel size (µm)
  and the frame period (s);
- dle-stream's own stores (:func:`~dle_stream.recording.write_recording`): the group
  attribute ``"dle_stream"`` holds the full scan timing, and the 1-D array
  ``"frame_timestamps_s"`` the per-frame times;
- stores written by pymmcore-plus / ome-writers: per-frame ``delta_t`` (s) in
  ``attrs["ome_writers"]["frame_metadata"]``;
- pymmcore-plus's TensorStoreHandler (a Zarr v2 array [t, y, x]): pixel size, camera
  timestamps (``ElapsedTime-ms``) and image numbers from ``attrs["frame_metadatas"]``.

Incomplete stores: a store written by :func:`~dle_stream.recording.write_recording`
says how many frames its writer completed (``"frames_written"``, ``"complete"`` in the
``"dle_stream"`` attribute); in any other store, trailing frames whose chunks were never
written (they would read as the fill value) are taken as missing. Either way
``n_frames`` counts only the written frames and ``truncated`` is True.

Frames are read chunk by chunk: :meth:`ZarrRecording.frames` reads one chunk of frames
at a time and yields its frames, so memory stays bounded by one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dle_stream.errors import DleStreamError
from dle_stream.recording import metadata as md
from dle_stream.recording.axes import plan_frames
from dle_stream.recording.base import Recording

_AXIS_LETTERS = {"t": "T", "time": "T", "c": "C", "channel": "C", "z": "Z", "y": "Y", "x": "X"}
#: Name of the per-frame timestamp array in dle-stream's Zarr recordings.
TIMESTAMPS_ARRAY = "frame_timestamps_s"


class ZarrRecording(Recording):
    """A movie in a Zarr store. Open with :func:`dle_stream.recording.open_recording`."""

    format = "zarr"

    def __init__(self, path: Path, channel: int | None = None) -> None:
        path = Path(path)
        try:
            node = zarr.open(store=str(path), mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises many types on a bad store
            raise DleStreamError(
                f"{path}: is not a readable Zarr store ({type(exc).__name__}: {exc}); "
                f"check the path (a .zarr folder with zarr.json)"
            ) from None
        try:
            array, names, meta = self._find_array(path, node, channel)
            axes = self._axes(path, array, names)
            layout = plan_frames(axes, tuple(array.shape), channel, str(path))
        except DleStreamError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DleStreamError(f"{path}: unreadable Zarr metadata ({type(exc).__name__}: {exc}); check the store") from None
        self._array = array
        self._layout = layout
        if isinstance(node, zarr.Group) and ("ome" in node.attrs or "multiscales" in node.attrs):
            self.format = "ome-zarr"
        timestamps = meta.frame_timestamps_s
        written, note = _written_frames(path, node, array, layout)
        frames = _pymmcore_frames(node) if isinstance(node, zarr.Array) else None
        numbers = md.from_pymmcore_frames(frames)[1] if frames and len(frames) >= written else None
        if timestamps is None and isinstance(node, zarr.Group):
            timestamps = _ome_writers_timestamps(node.attrs.asdict(), layout, axes, written)
        if timestamps is not None and len(timestamps) < written:
            timestamps = None
        super().__init__(
            path,
            n_frames=written,
            truncated=written < layout.n_frames,
            truncation_note=note,
            height=layout.height,
            width=layout.width,
            dtype=array.dtype,
            timing_fields=meta.fields,
            timing_source=meta.source,
            metadata=meta.raw,
            frame_timestamps_s=timestamps,
            frame_image_numbers=numbers,
        )
        time_chunk = array.chunks[layout.time_axis] if array.chunks else 1
        self._time_chunk = max(1, int(time_chunk))

    # -------------------------------------------------------------- metadata
    @staticmethod
    def _find_array(path: Path, node: Any, channel: int | None) -> tuple[Any, list[str] | None, md.TimingMetadata]:
        """The image array, its OME axis names (if any) and the timing its store records."""
        if isinstance(node, zarr.Array):
            doc = md.from_document(node.attrs.get(md.DLE_ZARR_KEY), str(path))
            frames = _pymmcore_frames(node)
            pmm = md.from_pymmcore_frames(frames)[0] if frames else None
            return node, None, md.merge(doc, pmm)
        attrs = node.attrs.asdict()
        doc = md.from_document(attrs.get(md.DLE_ZARR_KEY), str(path))
        if doc is not None and TIMESTAMPS_ARRAY in node:
            doc.frame_timestamps_s = np.asarray(node[TIMESTAMPS_ARRAY][...], dtype=np.float64)
        ome = attrs.get("ome", attrs)
        multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
        names: list[str] | None = None
        ome_meta: md.TimingMetadata | None = None
        if multiscales:
            first = multiscales[0]
            dataset = first["datasets"][0]
            key = str(dataset["path"])
            axes = first.get("axes") or []
            names = [str(a["name"] if isinstance(a, dict) else a) for a in axes] or None
            scale = next(
                (t.get("scale") for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"),
                None,
            )
            ome_meta = md.from_ome_zarr_axes([a if isinstance(a, dict) else {"name": a} for a in axes], scale)
        else:
            key = "0"
        if key not in node or not isinstance(node[key], zarr.Array):
            raise DleStreamError(
                f"{path}: the Zarr group holds no image array {key!r}; expected an OME-Zarr image "
                f"(multiscales dataset '0') or a plain [t, y, x] array"
            )
        return node[key], names, md.merge(doc, ome_meta)

    @staticmethod
    def _axes(path: Path, array: Any, names: list[str] | None) -> str:
        """Axis letters of ``array`` from OME axes or the array's ``dimension_names``."""
        if names is None:
            dims = getattr(array.metadata, "dimension_names", None) or array.attrs.get("_ARRAY_DIMENSIONS")
            names = list(dims) if dims and all(d is not None for d in dims) else None
        if names is None:
            if array.ndim == 3:
                return "TYX"
            if array.ndim == 2:
                return "YX"
            raise DleStreamError(
                f"{path}: a {array.ndim}-D Zarr array without dimension names; write it with "
                f"dimension_names such as ('t', 'c', 'y', 'x') or store a [t, y, x] array"
            )
        if len(names) != array.ndim:
            raise DleStreamError(f"{path}: axis names {names} do not match the array's {array.ndim} dimensions; fix the store's metadata")
        letters = "".join(_AXIS_LETTERS.get(str(n).lower(), "Q" if i == 0 else "O") for i, n in enumerate(names))
        return letters

    # --------------------------------------------------------------- reading
    def _read_block(self, start: int, stop: int) -> np.ndarray:
        try:
            return self._layout.take(self._array, start, stop)
        except Exception as exc:  # noqa: BLE001 - a damaged chunk must not leak a raw error
            raise DleStreamError(
                f"{self.path}: cannot read frames {start}:{stop} ({type(exc).__name__}: {exc}); the store is damaged there"
            ) from None

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Yield frames ``start:stop`` one at a time, reading one Zarr chunk of frames at a time."""
        start, stop = self._check_range(start, stop)
        t = start
        while t < stop:
            self._check_open()
            end = min(stop, (t // self._time_chunk + 1) * self._time_chunk)
            block = self._read_block(t, end)
            for frame in block:
                yield frame
            t = end

    def close(self) -> None:
        self._array = None
        super().close()


def _pymmcore_frames(node: Any) -> list[dict] | None:
    """pymmcore-plus TensorStoreHandler's per-frame metadata (``attrs["frame_metadatas"]``),
    ordered by time point; None unless it describes a plain time series."""
    frames = node.attrs.get("frame_metadatas")
    if not isinstance(frames, list) or not frames or not all(isinstance(f, dict) for f in frames):
        return None
    try:
        index: list[dict[str, Any]] = [dict((f.get("mda_event") or {}).get("index") or {}) for f in frames]
        if any(v for i in index for k, v in i.items() if k != "t"):
            return None  # channels, positions or z: not one frame per time point
        order = sorted(range(len(frames)), key=lambda k: int(index[k]["t"] if "t" in index[k] else k))
    except (TypeError, ValueError, AttributeError):
        return None
    return [frames[k] for k in order]


def _written_frames(path: Path, node: Any, array: Any, layout: Any) -> tuple[int, str]:
    """How many leading frames were really written, and a one-line note when not all were."""
    total = int(layout.n_frames)
    doc = node.attrs.get(md.DLE_ZARR_KEY) if isinstance(node, (zarr.Group, zarr.Array)) else None
    if isinstance(doc, dict) and doc.get("complete") is True:
        return total, ""
    if isinstance(doc, dict) and doc.get("complete") is False and isinstance(doc.get("frames_written"), int):
        n = max(0, min(total, int(doc["frames_written"])))
        if n < total:
            return n, (f"{path}: the store is incomplete: its writer stopped after {n} of {total} frames "
                       f"(the rest were never written); only those are read")
        return n, ""
    chunked = _frames_with_chunks(array, layout)
    if chunked is None or chunked >= total:
        return total, ""
    n = chunked
    return n, (f"{path}: the store is incomplete: frames {n}–{total - 1} of {total} were never written "
               f"(no data on disk); only the first {n} are read")


def _frames_with_chunks(array: Any, layout: Any) -> int | None:
    """Frames up to the end of the last time chunk that holds any data on disk (None: unknown)."""
    import itertools
    import math

    from zarr.core.sync import sync

    try:
        aa = array._async_array
        store, prefix = aa.store_path.store, aa.store_path.path
        storage = tuple(array.shards or array.chunks)
        shape = tuple(array.shape)
        grid = [math.ceil(n / c) if c else 0 for n, c in zip(shape, storage)]
        ta = layout.time_axis
        others = [range(g) if i != ta else None for i, g in enumerate(grid)]

        def key(coords: tuple[int, ...]) -> str:
            k = aa.metadata.encode_chunk_key(coords)
            return f"{prefix}/{k}" if prefix else k

        for tc in range(grid[ta] - 1, -1, -1):
            ranges = [range(tc, tc + 1) if r is None else r for r in others]
            for coords in itertools.islice(itertools.product(*ranges), 10_000):
                if sync(store.exists(key(coords))):
                    return min(shape[ta], (tc + 1) * storage[ta])
        return 0
    except Exception:  # noqa: BLE001 - a store we cannot list: assume complete
        return None


def _ome_writers_timestamps(attrs: dict[str, Any], layout: Any, axes: str, written: int | None = None) -> np.ndarray | None:
    """Per-frame ``delta_t`` (s) from ome-writers' frame metadata, for the chosen channel."""
    frames = (attrs.get("ome_writers") or {}).get("frame_metadata") if isinstance(attrs.get("ome_writers"), dict) else None
    if not frames:
        return None
    outer = [i for i, a in enumerate(axes) if a not in "YX"]
    stamps = np.full(layout.n_frames, np.nan)
    for record in frames:
        try:
            index = [int(i) for i in record["storage_index"]]
            value = float(record["delta_t"])
        except (KeyError, TypeError, ValueError):
            continue
        if len(index) != len(outer):
            continue
        position = dict(zip(outer, index))
        if any(position.get(i, 0) != v for i, v in layout.fixed.items() if i in position):
            continue
        t = position.get(layout.time_axis)
        if t is not None and 0 <= t < layout.n_frames:
            stamps[t] = value
    n = layout.n_frames if written is None else written
    return None if n == 0 or np.isnan(stamps[:n]).any() else stamps[:n]
