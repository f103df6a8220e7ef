"""A movie on disk, read lazily one frame at a time: :class:`Recording`.

Concrete readers (:mod:`.tiff`, :mod:`.zarr_store`) implement :meth:`Recording._read_block`
and may override :meth:`Recording.frames` with a faster sequential path; everything else
(the attributes, bounds checks, the context manager) lives here.

Truncated files: ``n_frames`` counts only the frames that can be read completely; when
the file's own metadata announced more, ``truncated`` is True and ``truncation_note``
says how many were expected. Reading never goes past ``n_frames``, so a replay of a
truncated file processes every complete frame and the caller decides how loudly to warn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming


class Recording:
    """A movie [T, H, W] in a file, with the scan timing its metadata gives.

    Attributes:
        path: the file (or Zarr store folder).
        format: ``"tiff"``, ``"ome-tiff"``, ``"imagej"``, ``"scanimage"``, ``"zarr"`` or ``"ome-zarr"``.
        n_frames, height, width: frame count and frame size in pixels.
        dtype: pixel data type.
        timing: the :class:`ScanTiming` from the file's metadata, if it is complete.
        timing_source: which metadata gave it (``"dle-stream"``, ``"scanimage"``, ``"ome"``,
            ``"imagej"``, ``"micro-manager"``, ``"ome-zarr"``, ``"ome-writers"``,
            ``"pymmcore-plus"``), or None.
        frame_image_numbers: the camera's frame counter per frame, when recorded.
        timing_fields: the :class:`ScanTiming` fields the metadata gave (µm, µs, px, bool).
        timing_missing: :class:`ScanTiming` fields the metadata did not give (the frame
            size, ``width_px`` and ``height_px``, is taken from the frames when absent).
        metadata: parsed metadata worth keeping, JSON-able, keyed by its origin.
        truncated: the file holds fewer complete frames than its metadata announced.
        truncation_note: one line explaining the truncation ('' when not truncated).
    """

    format: str = "?"

    def __init__(
        self,
        path: Path,
        *,
        n_frames: int,
        height: int,
        width: int,
        dtype: np.dtype,
        timing_fields: dict[str, Any] | None = None,
        timing_source: str | None = None,
        metadata: dict[str, Any] | None = None,
        frame_timestamps_s: np.ndarray | None | Callable[[], np.ndarray | None] = None,
        truncated: bool = False,
        truncation_note: str = "",
        frame_image_numbers: np.ndarray | None = None,
    ) -> None:
        self.path = Path(path)
        self.n_frames = int(n_frames)
        self.height = int(height)
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        self.truncated = bool(truncated)
        self.truncation_note = truncation_note
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.timing_fields: dict[str, Any] = dict(timing_fields or {})
        fields = {"width_px": self.width, "height_px": self.height, **self.timing_fields}
        self.timing_source = timing_source
        self.timing_missing: list[str] = [n for n in ScanTiming.field_names() if n not in fields]
        self.timing: ScanTiming | None = None
        if not self.timing_missing:
            try:
                self.timing = ScanTiming.from_dict(fields, source=f"{self.path} ({timing_source} metadata)")
            except DleStreamError:
                # Inconsistent metadata: leave it to resolve_timing to report, with the fields.
                self.timing = None
        self._timestamps = frame_timestamps_s
        self._image_numbers = frame_image_numbers
        self._closed = False

    # ------------------------------------------------------------- timestamps
    @property
    def frame_timestamps_s(self) -> np.ndarray | None:
        """Acquisition time of each frame in seconds (float64 [n_frames]), when recorded.

        Some formats keep them in every page's metadata; those are read on first access.
        """
        if callable(self._timestamps):
            self._timestamps = self._timestamps()
        if self._timestamps is None:
            return None
        stamps = np.asarray(self._timestamps, dtype=np.float64)
        if stamps.ndim != 1 or len(stamps) < self.n_frames:
            return None
        return stamps[: self.n_frames]

    @property
    def frame_image_numbers(self) -> np.ndarray | None:
        """The camera's own frame counter per frame (int64 [n_frames], e.g. Micro-Manager's
        ``ImageNumber``), when recorded; a jump means frames were lost before they were saved."""
        if self._image_numbers is None:
            return None
        numbers = np.asarray(self._image_numbers)
        if numbers.ndim != 1 or len(numbers) < self.n_frames:
            return None
        return numbers[: self.n_frames].astype(np.int64)

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self.n_frames

    def _check_range(self, start: int, stop: int | None) -> tuple[int, int]:
        self._check_open()
        stop = self.n_frames if stop is None else stop
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))):
            raise DleStreamError(f"{self.path}: frame range must be integers, got {start!r}:{stop!r}")
        if not 0 <= start <= stop <= self.n_frames:
            raise DleStreamError(
                f"{self.path}: frames {start}:{stop} are outside the recording's {self.n_frames} frames; "
                f"choose a range within 0..{self.n_frames}"
            )
        return int(start), int(stop)

    def _check_open(self) -> None:
        if self._closed:
            raise DleStreamError(f"{self.path}: the recording was closed; open it again with open_recording")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` as one array [stop - start, H, W] of ``dtype``."""
        start, stop = self._check_range(start, stop)
        if start == stop:
            return np.empty((0, self.height, self.width), dtype=self.dtype)
        return self._read_block(start, stop)

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Yield frames ``start:stop`` one 2-D array [H, W] at a time, reading lazily."""
        start, stop = self._check_range(start, stop)
        for k in range(start, stop):
            self._check_open()
            yield self._read_block(k, k + 1)[0]

    def _read_block(self, start: int, stop: int) -> np.ndarray:
        """Read frames ``start:stop`` (already checked) as [n, H, W]."""
        raise NotImplementedError

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the file. Further reads raise :class:`DleStreamError`."""
        self._closed = True

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.path} {self.n_frames}×{self.height}×{self.width} {self.dtype}"
            f"{' truncated' if self.truncated else ''}, timing from {self.timing_source or 'nowhere'}>"
        )
