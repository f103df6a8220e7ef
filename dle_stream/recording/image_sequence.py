"""Reading a folder of one image file per frame, as pymmcore-plus's ``ImageSequenceWriter``
writes it: :class:`ImageSequenceRecording`.

The writer puts each frame in its own TIFF (``00000_t0000.tif``, ``00001_t0001.tif``, ...:
the frame counter first, so name order is acquisition order), the MDA sequence in
``_useq_MDASequence.json`` (written first) and each frame's metadata in
``_frame_metadata.json`` (rewritten every 10 frames and at the end): pixel size,
camera timestamps (``ElapsedTime-ms``) and image numbers (``ImageNumber``).

A time series of one channel is read. An acquisition that stopped early (its sequence
announces more time points than there are frame files, or the last file is cut short)
opens with the complete frames only and ``truncated = True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from dle_stream.errors import DleStreamError, ParameterError, arg
from dle_stream.recording import metadata as md
from dle_stream.recording.base import Recording

#: Files pymmcore-plus's ImageSequenceWriter writes beside the frames.
SEQUENCE_FILE = "_useq_MDASequence.json"
FRAME_METADATA_FILE = "_frame_metadata.json"
_FRAME_SUFFIXES = (".tif", ".tiff")


def is_image_sequence_folder(path: Path) -> bool:
    """True for a folder written by pymmcore-plus's ImageSequenceWriter."""
    return path.is_dir() and ((path / SEQUENCE_FILE).is_file() or (path / FRAME_METADATA_FILE).is_file())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


class ImageSequenceRecording(Recording):
    """A movie stored as one TIFF per frame. Open with :func:`dle_stream.recording.open_recording`."""

    format = "image-sequence"

    def __init__(self, path: Path, channel: int | None = None) -> None:
        path = Path(path)
        seq = _read_json(path / SEQUENCE_FILE)
        seq = seq if isinstance(seq, dict) else {}
        self._check_time_series(path, seq, channel)
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in _FRAME_SUFFIXES
                       and not f.name.startswith("."))
        if not files:
            raise DleStreamError(f"{path}: an image-sequence folder without frame files (.tif); "
                                 f"check the folder or the acquisition")
        try:
            with tifffile.TiffFile(files[0]) as tif:
                first = tif.pages.first
                shape, dtype = tuple(first.shape), np.dtype(first.dtype)
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on a damaged file
            raise DleStreamError(f"{files[0]}: is not a readable TIFF ({type(exc).__name__}); "
                                 f"check the image-sequence folder {path}") from None
        if len(shape) != 2:
            raise DleStreamError(f"{files[0]}: frames must be 2-D images, this one has shape {shape}; "
                                 f"dle-stream replays a time series of one channel")
        expected_bytes = int(np.prod(shape)) * dtype.itemsize
        complete = len(files)
        # a writer stopped mid-frame leaves its last file short
        while complete and files[complete - 1].stat().st_size < expected_bytes:
            complete -= 1
        loops = _time_points(seq)
        announced = max(loops or 0, len(files))
        truncated = complete < announced
        note = ""
        if truncated:
            note = (f"{path}: the acquisition is incomplete: {complete} complete frames of the {announced} "
                    f"its sequence announces; only those are read")
        self._files = files[:complete]
        frame_meta = _read_json(path / FRAME_METADATA_FILE)
        frame_meta = frame_meta if isinstance(frame_meta, dict) else {}
        per_frame = [frame_meta.get(f.name) for f in self._files]
        interval = (seq.get("time_plan") or {}).get("interval") if isinstance(seq.get("time_plan"), dict) else None
        meta, numbers = md.from_pymmcore_frames(per_frame, interval_s=interval)
        if any(m is None for m in per_frame):
            # metadata for the last frames not yet written: keep the pixel size, drop per-frame data
            meta.frame_timestamps_s, numbers = None, None
        super().__init__(
            path,
            n_frames=complete,
            height=shape[0],
            width=shape[1],
            dtype=dtype,
            timing_fields=meta.fields,
            timing_source=meta.source,
            metadata={**meta.raw, "useq_sequence": md.jsonable(seq)},
            frame_timestamps_s=meta.frame_timestamps_s,
            truncated=truncated,
            truncation_note=note,
            frame_image_numbers=numbers,
        )

    @staticmethod
    def _check_time_series(path: Path, seq: dict[str, Any], channel: int | None) -> None:
        other = [name for name in ("channels", "stage_positions", "z_plan", "grid_plan")
                 if seq.get(name) not in (None, [], {}, ())]
        if other:
            raise DleStreamError(f"{path}: the acquisition has {', '.join(other)}; dle-stream replays a time series "
                                 f"of one channel at one position: acquire or export one")
        if channel not in (None, 0):
            raise ParameterError(f"{path}: {arg('channel', channel)}: the image sequence has one channel; leave "
                                 f"{arg('channel')} out")

    def _read_block(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.height, self.width), dtype=self.dtype)
        for i, k in enumerate(range(start, stop)):
            try:
                frame = tifffile.imread(self._files[k])
            except Exception as exc:  # noqa: BLE001
                raise DleStreamError(f"{self._files[k]}: cannot read frame {k} ({type(exc).__name__}); "
                                     f"the file is damaged") from None
            if frame.shape != (self.height, self.width):
                raise DleStreamError(f"{self._files[k]}: frame {k} is {frame.shape}, the first frame "
                                     f"{(self.height, self.width)}; every frame must have the same size")
            out[i] = frame
        return out


def _time_points(seq: dict[str, Any]) -> int | None:
    """Time points a useq MDASequence announces (``time_plan.loops``), if it says."""
    plan = seq.get("time_plan")
    if not isinstance(plan, dict):
        return None
    try:
        loops = int(plan["loops"])
    except (KeyError, TypeError, ValueError):
        return None
    return loops if loops > 0 else None
