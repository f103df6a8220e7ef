"""Frames from a recording on disk: :class:`FileSource` (``dle-stream replay``).

Reads a :class:`~dle_stream.recording.Recording` lazily, one frame at a time, and yields
:class:`~dle_stream.events.FrameEvent` records. Replay never drops a frame.

Image numbers: the camera's frame counter when the recording kept it (pymmcore-plus
writers), so frames lost before they were saved show as a gap.

Timestamps: the recording's own per-frame timestamps when it has them (and they are
finite and non-decreasing), else ``index × frame period`` (from ``frame_period_s`` or the
recording's scan timing), else None.

Pacing: as fast as the consumer takes frames (``realtime=False``), or in real time
(``realtime=True``): frame k is yielded no earlier than ``t(k) − t(0)`` after the first,
with t the recorded timestamps, or ``k × frame period`` when there are none (or when
``frame_period_s`` is given, which wins). A consumer slower than real time is not made
to catch up by skipping; frames just come late.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dle_stream.errors import ParameterError, arg
from dle_stream.events import FrameEvent
from dle_stream.recording import Recording, open_recording


class FileSource:
    """Yields the frames of a recording as :class:`FrameEvent`.

    Args:
        recording: an open :class:`Recording`, or a path to open with ``open_recording``.
        realtime: pace frames by their timestamps / the frame period.
        frame_period_s: frame period in s for timestamps and pacing; overrides the
            recorded timestamps and the scan timing.
        start, stop: replay frames ``start:stop`` only; events keep the frames' numbers in the file
            (the first event of ``start=100`` has index 100).
    """

    def __init__(
        self, recording: Recording | str | Path, *, realtime: bool = False, frame_period_s: float | None = None,
        start: int = 0, stop: int | None = None,
    ) -> None:
        self._owns = not isinstance(recording, Recording)
        self.recording: Recording = recording if isinstance(recording, Recording) else open_recording(recording)
        if frame_period_s is not None and not (np.isfinite(frame_period_s) and frame_period_s > 0):
            raise ParameterError(f"{arg('frame_period_s', frame_period_s)}: the frame period must be a positive "
                                 f"number of seconds")
        self.realtime = bool(realtime)
        self.start = int(start)
        self.stop_frame = self.recording.n_frames if stop is None else int(stop)
        self.recording._check_range(self.start, self.stop_frame)
        self.timestamps_s, self.timestamps_from = self._timestamps(frame_period_s)
        if self.realtime and self.timestamps_s is None:
            raise ParameterError(
                f"{self.recording.path}: cannot replay in real time: no frame timestamps or scan timing in the "
                f"file; give the frame period ({arg('frame_period_s')}, s) or replay as fast as possible "
                f"({arg('realtime', False)})"
            )
        self._stopping = threading.Event()
        self.frames_delivered = 0

    def _timestamps(self, frame_period_s: float | None) -> tuple[np.ndarray | None, str | None]:
        n = self.recording.n_frames
        if frame_period_s is not None:
            return np.arange(n, dtype=np.float64) * float(frame_period_s), "frame period"
        stamps = self.recording.frame_timestamps_s
        if stamps is not None and len(stamps) >= n and np.all(np.isfinite(stamps)) and np.all(np.diff(stamps) >= 0):
            return np.asarray(stamps[:n], dtype=np.float64), "recorded"
        timing = self.recording.timing
        if timing is not None:
            return np.arange(n, dtype=np.float64) * timing.frame_period_us * 1e-6, "scan timing"
        return None, None

    def __len__(self) -> int:
        return self.stop_frame - self.start

    def stop(self) -> None:
        """End the replay after the current frame (also wakes a real-time wait)."""
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        if self._owns:
            self.recording.close()

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[FrameEvent]:
        return self.frames()

    def frames(self) -> Iterator[FrameEvent]:
        """Yield the frames in order, lazily (paced when ``realtime``)."""
        stamps = self.timestamps_s
        # the camera's frame counter, when the file kept it: a jump is a gap (frames lost while saving)
        numbers = self.recording.frame_image_numbers
        if numbers is not None and not np.all(np.diff(numbers) > 0):
            numbers = None
        t0_wall = time.perf_counter()
        t0_rec = None if stamps is None or self.start >= self.stop_frame else float(stamps[self.start])
        for offset, frame in enumerate(self.recording.frames(self.start, self.stop_frame)):
            if self._stopping.is_set():
                return
            k = self.start + offset
            if self.realtime and stamps is not None and t0_rec is not None:  # t0_rec is set whenever stamps are
                delay = (float(stamps[k]) - t0_rec) - (time.perf_counter() - t0_wall)
                if delay > 0 and self._stopping.wait(delay):
                    return
            yield FrameEvent(
                frame=frame, index=k, timestamp_s=None if stamps is None else float(stamps[k]),
                image_number=None if numbers is None else int(numbers[k]), metadata={"frame_in_file": k},
            )
            self.frames_delivered += 1
