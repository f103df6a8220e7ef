"""Reading TIFF movies (plain, ImageJ, OME-TIFF, ScanImage, Micro-Manager): :class:`TiffRecording`.

Frames are read lazily, so files larger than RAM replay in bounded memory:

- contiguous, uncompressed image data (what tifffile, ImageJ and most acquisition
  software write) is memory-mapped at the offset tifffile reports for the series, as
  :func:`tifffile.memmap` does; a frame is a view into the map, copied on read, and
  the pages just read are then released from the process (``madvise(MADV_DONTNEED)``;
  they stay in the kernel's page cache), so resident memory stays flat over a replay
  of any length;
- anything else (compressed, scattered pages such as ScanImage's interleaved IFDs) is
  read page by page through ``TiffFile.pages`` with ``useframes = True`` and
  ``cache = False``, so only the page offsets are kept in memory.

Scan timing comes, in order, from dle-stream's own JSON document (private tag
:data:`~dle_stream.recording.metadata.DLE_TIFF_TAG`), ScanImage frame data, OME-XML,
ImageJ metadata and Micro-Manager metadata (see :mod:`.metadata`).

A truncated file (the writer stopped mid-file) opens with ``n_frames`` counting the
frames that are completely on disk and ``truncated = True``.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import tifffile

from dle_stream.errors import DleStreamError
from dle_stream.recording import metadata as md
from dle_stream.recording.axes import FrameLayout, plan_frames
from dle_stream.recording.base import Recording

#: Micro-Manager's per-page JSON metadata tag.
MICROMANAGER_TAG = 51123
#: tifffile's format-specific series parsers, turned off when one of them fails on garbled metadata.
_SERIES_KINDS = ("shaped", "lsm", "mmstack", "ome", "imagej", "ndtiff", "fluoview", "stk", "sis", "svs", "scn", "qpi",
                 "ndpi", "bif", "avs", "eer", "philips", "scanimage", "nih", "mdgel", "micromanager")
#: Parts of tifffile's log messages that mean the chain of pages (IFDs) is broken.
_DAMAGE_SIGNS = ("corrupted", "invalid page offset", "invalid offset to page", "circular reference", "failed to reshape")


class _Collect(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@contextmanager
def _tifffile_messages() -> Iterator[list[str]]:
    """Collect tifffile's warnings (a damaged IFD chain is only logged) instead of printing them."""
    logger = logging.getLogger("tifffile")
    records: list[str] = []
    handler = _Collect(records)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


#: Bytes before a block that are released with it (≥ the kernel's fault-around window).
RELEASE_MARGIN_BYTES = 1 << 20


class TiffRecording(Recording):
    """A movie in a TIFF file. Open with :func:`dle_stream.recording.open_recording`."""

    def __init__(self, path: Path, channel: int | None = None) -> None:
        self._tif: tifffile.TiffFile | None = None
        self._memmap: np.ndarray | None = None
        try:
            with _tifffile_messages() as messages:
                self._tif = tifffile.TiffFile(path)
                self._series_error = ""
                try:
                    self._tif.series  # noqa: B018 - parses the format's metadata (ImageJ, OME, ...)
                except Exception as exc:  # noqa: BLE001 - tifffile chokes on some garbled descriptions
                    # Garbled format metadata (e.g. ImageJ 'images=abc') must not make the pixels
                    # unreadable: read the pages as a plain TIFF and ignore that metadata.
                    self._series_error = f"{type(exc).__name__}: {exc}"
                    self._tif.close()
                    plain: dict[str, Any] = {f"is_{kind}": False for kind in _SERIES_KINDS}
                    self._tif = tifffile.TiffFile(path, **plain)
                self._open(Path(path), channel, messages)
        except DleStreamError:
            self._close_file()
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on damaged files
            self._close_file()
            raise DleStreamError(
                f"{path}: is not a readable TIFF image ({type(exc).__name__}: {exc}); "
                f"check that the file is a complete TIFF movie"
            ) from None

    # ------------------------------------------------------------------ open
    def _open(self, path: Path, channel: int | None, messages: list[str]) -> None:
        tif = self._tif
        assert tif is not None
        if not tif.series:
            raise DleStreamError(f"{path}: the TIFF holds no image data; check the file")
        series = tif.series[0]
        keyframe = series.keyframe
        self.format = (
            "scanimage" if tif.is_scanimage else "ome-tiff" if tif.is_ome else "imagej" if tif.is_imagej else "tiff"
        )
        n_file_pages = len(tif.pages)
        axes, shape = series.axes, tuple(series.shape)
        announced = _declared_frames(tif)
        declared: int | None = None
        offset = series.dataoffset if keyframe.compression == 1 else None
        # A damaged file can make tifffile fall back to a one-page series: read the pages
        # that are there, or map the frames the description announces after the first page.
        if len(shape) == len(keyframe.shape) and (n_file_pages > 1 or (announced or 0) > 1):
            declared = announced
            if n_file_pages > 1:
                axes, shape, offset = "I" + keyframe.axes, (n_file_pages, *keyframe.shape), None
            elif announced is not None and keyframe.is_contiguous and keyframe.compression == 1:
                axes, shape, offset = "I" + keyframe.axes, (announced, *keyframe.shape), keyframe.dataoffsets[0]
        layout = plan_frames(axes, shape, channel, str(path))
        self._layout = layout
        if declared is None or layout.n_frames > declared:
            declared = layout.n_frames
        self._pages_ok = self._setup_pages(layout, keyframe)
        if offset is not None:
            readable = self._map(path, int(offset), np.dtype(series.dtype).newbyteorder(tif.byteorder), layout)
        else:
            readable = self._index_pages(path, layout, keyframe, n_file_pages)
        damaged = any(sign in m for m in messages for sign in _DAMAGE_SIGNS)
        truncated = readable < declared or damaged
        note = ""
        if truncated:
            note = (
                f"{path}: the file is truncated or damaged: {readable} complete frames"
                + (f" of the {declared} its metadata announces" if declared > readable else "")
                + "; only those are read"
            )
        meta = self._metadata(path, channel)
        if self._series_error:
            meta.raw["tiff"] = {"ignored_format_metadata": f"unreadable, pages read as a plain TIFF ({self._series_error[:200]})"}
        timestamps: np.ndarray | None | Callable[[], np.ndarray | None] = meta.frame_timestamps_s
        if timestamps is None and self.format == "scanimage":
            timestamps = self._scanimage_timestamps
        elif timestamps is None and MICROMANAGER_TAG in tif.pages.first.tags:
            timestamps = self._micromanager_timestamps
        super().__init__(
            path,
            n_frames=readable,
            height=layout.height,
            width=layout.width,
            dtype=series.dtype,
            timing_fields=meta.fields,
            timing_source=meta.source,
            metadata=meta.raw,
            frame_timestamps_s=timestamps,
            truncated=truncated,
            truncation_note=note,
        )

    def _map(self, path: Path, offset: int, dtype: np.dtype, layout: FrameLayout) -> int:
        """Memory-map contiguous image data at ``offset``; return the number of complete frames."""
        shape = list(layout.shape)
        available = path.stat().st_size - offset
        outer = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        complete = max(available, 0) // outer if outer else 0
        if complete < shape[0]:
            if layout.time_axis != 0:
                raise DleStreamError(f"{path}: the file is truncated (image data end early) and cannot be read; re-export it")
            shape[0] = int(complete)
        if shape[0] == 0:
            self._memmap = np.empty(shape, dtype=dtype)
            return 0
        self._memmap = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
        return int(shape[layout.time_axis])

    def _setup_pages(self, layout: FrameLayout, keyframe: Any) -> bool:
        """Map frame numbers to page numbers; False when the series is not one page per 2-D plane."""
        tif = self._tif
        assert tif is not None
        self._n_outer = len(layout.axes) - len(keyframe.axes)
        self._outer_shape = layout.shape[: self._n_outer]
        self._first_page = int(keyframe.index if isinstance(keyframe.index, int) else keyframe.index[-1])
        tif.pages.cache = False
        tif.pages.useframes = True
        tif.pages.set_keyframe(self._first_page)
        return layout.axes.endswith(keyframe.axes)

    def _index_pages(self, path: Path, layout: FrameLayout, keyframe: Any, n_file_pages: int) -> int:
        """Prepare page-by-page reading; return the number of frames whose pages are all on disk."""
        tif = self._tif
        assert tif is not None
        if not self._pages_ok:
            raise DleStreamError(
                f"{path}: unsupported TIFF page layout (series {layout.axes}, page {keyframe.axes}); "
                f"re-save as a [T, Y, X] TIFF"
            )
        size = path.stat().st_size
        # Pages whose data lie beyond the end of the file are lost; only the last few can be.
        valid = n_file_pages
        while valid > self._first_page:
            page = tif.pages[valid - 1]
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
            if ends and max(ends) <= size:
                break
            valid -= 1
        frames = 0
        for t in range(layout.n_frames):
            if self._page_of(t) >= valid:
                break
            frames = t + 1
        return frames

    def _page_of(self, t: int) -> int:
        index = self._layout.index(t)[: self._n_outer]
        if not index:
            return self._first_page
        return self._first_page + int(np.ravel_multi_index(tuple(int(cast(int, i)) for i in index), self._outer_shape))

    # -------------------------------------------------------------- metadata
    def _metadata(self, path: Path, channel: int | None) -> md.TimingMetadata:
        tif = self._tif
        assert tif is not None
        first = tif.pages.first
        sources: list[md.TimingMetadata | None] = []
        tag = first.tags.get(md.DLE_TIFF_TAG)
        if tag is not None:
            sources.append(md.from_document(tag.value, str(path)))
        if tif.is_scanimage:
            si = tif.scanimage_metadata or {}
            frame_data = si.get("FrameData") or _matlab(first.software)
            roi = {k: v for k, v in si.items() if k not in ("FrameData", "version")}
            if not roi and first.tags.get(315) is not None:  # Artist tag holds the ROI JSON in ScanImage ≥ 2016
                roi = _json_object(first.tags[315].value)
            sources.append(md.from_scanimage(frame_data, roi))
        if tif.is_ome and tif.ome_metadata:
            sources.append(md.from_ome_xml(tif.ome_metadata, channel, str(path)))
        if tif.is_imagej and tif.imagej_metadata is not None:
            sources.append(md.from_imagej(tif.imagej_metadata, first.resolution))
        mm_tag = first.tags.get(MICROMANAGER_TAG)
        if mm_tag is not None and isinstance(mm_tag.value, dict):
            summary = None
            try:
                summary = (tif.micromanager_metadata or {}).get("Summary")
            except Exception:  # noqa: BLE001 - the non-TIFF MM header is optional
                summary = None
            sources.append(md.from_micromanager(mm_tag.value, summary if isinstance(summary, dict) else None))
        return md.merge(*sources)

    def _page_values(self, read: Callable[[Any], float | None]) -> np.ndarray | None:
        """One value per frame, read from each frame's full page (per-page timestamps)."""
        tif = self._tif
        if tif is None or not self._pages_ok:
            return None
        out = np.full(self.n_frames, np.nan)
        useframes = tif.pages.useframes
        tif.pages.useframes = False
        try:
            for t in range(self.n_frames):
                value = read(tif.pages[self._page_of(t)])
                if value is None:
                    return None
                out[t] = value
        except Exception:  # noqa: BLE001 - timestamps are optional; a damaged page just means none
            return None
        finally:
            tif.pages.useframes = useframes
            tif.pages.set_keyframe(self._first_page)
        return out

    def _scanimage_timestamps(self) -> np.ndarray | None:
        return self._page_values(lambda page: md.scanimage_frame_timestamp_s(page.description))

    def _micromanager_timestamps(self) -> np.ndarray | None:
        def elapsed(page: Any) -> float | None:
            tag = page.tags.get(MICROMANAGER_TAG)
            value = tag.value.get("ElapsedTime-ms") if tag is not None and isinstance(tag.value, dict) else None
            return None if value is None else float(value) / 1e3

        return self._page_values(elapsed)

    # --------------------------------------------------------------- reading
    def _read_block(self, start: int, stop: int) -> np.ndarray:
        try:
            if self._memmap is not None:
                # A copy: frames must outlive the map (closed with the file).
                block = np.array(self._layout.take(self._memmap, start, stop), dtype=self.dtype)
                self._release(start, stop)
                return block
            out = np.empty((stop - start, self.height, self.width), dtype=self.dtype)
            for i, t in enumerate(range(start, stop)):
                out[i] = self._page_frame(t)
            return out
        except DleStreamError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged page must not leak a raw error
            raise DleStreamError(
                f"{self.path}: cannot read frames {start}:{stop} ({type(exc).__name__}: {exc}); the file is damaged there"
            ) from None

    def _release(self, start: int, stop: int) -> None:
        """Drop frames [start, stop) of the memory map from this process's resident set.

        Measured before this existed: a 20,000-frame replay's RSS grew by the size of the
        recording read so far (file-backed pages), although anonymous memory was flat;
        releasing only the block itself still leaked ~7 of 12.5 pages per 160×160 frame
        (fault-around), hence the margin.
        """
        memmap = self._memmap
        mm = getattr(memmap, "_mmap", None)  # only a np.memmap has one
        if not isinstance(memmap, np.memmap) or mm is None or self._layout.time_axis != 0 or not hasattr(mm, "madvise"):
            return
        frame_bytes = int(np.prod(memmap.shape[1:], dtype=np.int64)) * memmap.itemsize
        base = memmap.offset % mmap.ALLOCATIONGRANULARITY  # where the array starts in the map
        begin = base + start * frame_bytes
        end = min(base + stop * frame_bytes, len(mm))
        # The kernel maps pages *around* a faulting one (fault-around, 64 KB by default),
        # which re-maps the tail of the previous frames: release a margin before the block.
        begin = max(0, begin - RELEASE_MARGIN_BYTES)
        begin -= begin % mmap.PAGESIZE
        if end > begin:
            try:
                mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)
            except (OSError, ValueError):  # advice only: never fail a read for it
                pass

    def _page_frame(self, t: int) -> np.ndarray:
        tif = self._tif
        assert tif is not None
        page = tif.pages[self._page_of(t)]
        data = page.asarray()
        inner = self._layout.index(t)[self._n_outer :]
        return np.asarray(data.reshape(self._layout.shape[self._n_outer :])[inner])

    # ------------------------------------------------------------- lifecycle
    def _close_file(self) -> None:
        self._memmap = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def close(self) -> None:
        self._close_file()
        super().close()


def _matlab(text: str | None) -> dict[str, Any]:
    """ScanImage's ``SI.* = value`` lines (Software tag) parsed with tifffile."""
    if not text:
        return {}
    try:
        value = tifffile.matlabstr2py(text)
    except Exception:  # noqa: BLE001
        return {}
    return value if isinstance(value, dict) else {}


def _json_object(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _declared_frames(tif: tifffile.TiffFile) -> int | None:
    """Frame count the file's own description announces (shaped JSON or ImageJ), if any."""
    try:
        if tif.is_imagej and tif.imagej_metadata:
            images = tif.imagej_metadata.get("images")
            return None if images is None else int(images)
        if tif.is_shaped and tif.shaped_metadata:
            shape = tif.shaped_metadata[0].get("shape")
            return int(np.prod(shape[:-2])) if shape and len(shape) > 2 else None
    except (TypeError, ValueError, OverflowError):
        return None
    return None
