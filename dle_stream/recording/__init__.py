"""Recordings on disk: reading movies lazily with their scan timing, and writing them.

- :func:`open_recording` opens TIFF (plain, ImageJ, OME-TIFF, ScanImage, Micro-Manager)
  and Zarr (plain array, OME-Zarr, ome-writers) movies as a :class:`Recording` that
  yields 2-D frames one at a time in bounded memory;
- :func:`write_recording` writes a movie (an array or a stream of frames) with its
  :class:`~dle_stream.timing.ScanTiming` as ImageJ TIFF, OME-TIFF or OME-Zarr;
- :func:`resolve_timing` decides the timing of a stream from flags, a timing file, the
  recording's metadata and a fallback, in that order, as a :class:`ResolvedTiming` that
  names the fields it assumed.

Every problem with a file raises :class:`~dle_stream.errors.DleStreamError` with one line
naming the file and the fix.
"""

from dle_stream.recording.base import Recording
from dle_stream.recording.formats import open_recording
from dle_stream.recording.metadata import DLE_TIFF_TAG, DLE_ZARR_KEY
from dle_stream.recording.timing_sources import (
    GIVEN_FIELDS,
    ResolvedTiming,
    read_timing_file,
    resolve_timing,
)
from dle_stream.recording.writer import write_recording

__all__ = [
    "DLE_TIFF_TAG",
    "DLE_ZARR_KEY",
    "GIVEN_FIELDS",
    "Recording",
    "ResolvedTiming",
    "open_recording",
    "read_timing_file",
    "resolve_timing",
    "write_recording",
]
