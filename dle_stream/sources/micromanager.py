"""Frames from a running Micro-Manager acquisition (pymmcore-plus): :class:`MicroManagerSource`.

The source subscribes to an acquisition of a ``CMMCorePlus`` / ``UniMMCore`` and yields
:class:`~dle_stream.events.FrameEvent` records (the frame, its running index, the
timestamp from the camera metadata's ``ElapsedTime-ms``, the camera's ``ImageNumber``,
and the camera metadata) from a bounded queue. The core's callbacks and the polling
thread only put frames on the queue (O(1)); everything else happens in the consumer.

Modes (docs/design.md §9):

``"mda"``
    An MDA time series, ``useq.MDASequence(time_plan={"interval": 0, "loops": n})``:
    one hardware sequence with stop-on-overflow, lossless; frames arrive through
    ``core.mda.events.frameReady``. Needs ``n_frames``; when it is None or larger than
    :data:`MDA_MAX_LOOPS` (long time plans are slow to start), the source runs the same
    lossless acquisition directly (``startSequenceAcquisition(n, 0, True)`` on a thread,
    popping the circular buffer): ``effective_mode`` is then ``"sequence"``.
    With ``start=False`` the source does not start anything: it listens to the next MDA
    someone else runs (e.g. a GUI) and ends when that MDA finishes.
``"sequence"``
    That direct lossless sequence acquisition (``n_frames`` None: endless).
``"live"``
    Continuous sequence acquisition (``startContinuousSequenceAcquisition``), polled
    from the circular buffer. The buffer *overwrites* its oldest frames when the
    consumer falls behind, so frames can vanish silently: the source checks every
    frame's ``ImageNumber`` and reports jumps.

**Lost frames.** A jump in ``ImageNumber`` (k numbers skipped) is a gap: the next
delivered frame carries ``metadata["images_lost"] = k``, :attr:`MicroManagerSource.gaps`
counts the gaps and :attr:`MicroManagerSource.images_lost` the frames. ``index`` keeps
counting delivered frames only, so the runner restarts a tile's window across the gap.
In ``"mda"``/``"sequence"`` mode, when the consumer is slower than the camera the
queue fills and backs up into the core's circular buffer; when that overflows the
acquisition stops (it never loses frames silently): iteration ends and
:attr:`MicroManagerSource.error` says why.

**Stalls.** Iteration never blocks forever: when no frame has come for ``stall_timeout_s``
(or the ``timeout_s`` of :meth:`MicroManagerSource.frames`), it yields a
:class:`~dle_stream.sources.base.SourceStalled` notice instead of a frame, then keeps
waiting (another notice after each further timeout). A consumer shows a warning and may
call :meth:`MicroManagerSource.stop`.

**Ending.** Iteration ends when the acquisition ends (all ``n_frames`` delivered, the
MDA finished or was canceled, the sequence stopped) or after :meth:`MicroManagerSource.stop`,
once the frames already queued have been yielded. :attr:`MicroManagerSource.error` is
None when it ended normally, else one line (an MDA error, a buffer overflow, fewer
frames than asked for).

Example::

    core = create_demo_core(realtime=True)
    with MicroManagerSource(core, n_frames=1000, mode="mda") as source:
        for item in source:
            if isinstance(item, SourceStalled):
                print(item.message)
                continue
            process(item.frame, item.index, item.timestamp_s)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from dle_stream.errors import DleStreamError
from dle_stream.events import FrameEvent
from dle_stream.sources.base import GapCounter, SourceStalled

Mode = Literal["mda", "sequence", "live"]
MODES = ("mda", "sequence", "live")
#: Longest MDA time plan run as one MDA; longer (or endless) runs go through a direct sequence.
MDA_MAX_LOOPS = 20_000
#: numImages for an "endless" direct sequence acquisition.
ENDLESS_IMAGES = 2**31 - 1
_POLL_S = 0.05


def _int_or_none(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


class MicroManagerSource:
    """Yields :class:`FrameEvent` (and :class:`SourceStalled` notices) from a Micro-Manager acquisition.

    Args:
        core: a ``CMMCorePlus`` (or ``UniMMCore``) with a camera selected.
        n_frames: frames to acquire; None: until :meth:`stop` (not with ``mode="mda"``
            and ``start=False``, where the MDA decides).
        mode: ``"mda"``, ``"sequence"`` or ``"live"`` (see the module docstring).
        queue_size: frames held between the acquisition and the consumer.
        stall_timeout_s: seconds without a frame before a :class:`SourceStalled` notice.
        start: start the acquisition (on :meth:`start`, the first iteration or ``with``);
            False: only listen to an acquisition started by someone else.
    """

    def __init__(
        self, core: Any, *, n_frames: int | None = None, mode: Mode = "mda", queue_size: int = 256,
        stall_timeout_s: float = 5.0, start: bool = True,
    ) -> None:
        if mode not in MODES:
            raise DleStreamError(f"Micro-Manager source: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if n_frames is not None and (int(n_frames) != n_frames or n_frames < 1):
            raise DleStreamError(f"Micro-Manager source: n_frames must be a positive integer or None, got {n_frames!r}")
        if queue_size < 1:
            raise DleStreamError(f"Micro-Manager source: queue_size must be ≥ 1, got {queue_size}")
        if stall_timeout_s <= 0:
            raise DleStreamError(f"Micro-Manager source: stall_timeout_s must be > 0, got {stall_timeout_s}")
        self.core = core
        self.n_frames = None if n_frames is None else int(n_frames)
        self.mode: Mode = mode
        self.effective_mode: Mode = mode
        if mode == "mda" and start and (self.n_frames is None or self.n_frames > MDA_MAX_LOOPS):
            self.effective_mode = "sequence"
        self.queue_size = int(queue_size)
        self.stall_timeout_s = float(stall_timeout_s)
        self.owns_acquisition = bool(start)
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._done = threading.Event()  # no more frames will be queued
        self._stopping = threading.Event()
        self._started = False
        self._thread: threading.Thread | None = None
        self._connected = False
        self._gaps = GapCounter()
        self.frames_delivered = 0
        self.frames_received = 0
        self.dropped_after_stop = 0
        self.error: str | None = None
        self._t_last = time.perf_counter()

    # ------------------------------------------------------------- reporting
    @property
    def gaps(self) -> int:
        """Jumps in ``ImageNumber`` seen so far."""
        return self._gaps.gaps

    @property
    def images_lost(self) -> int:
        """Frames lost in all gaps together."""
        return self._gaps.images_lost

    @property
    def running(self) -> bool:
        """True between :meth:`start` and the end of the acquisition."""
        return self._started and not self._done.is_set()

    def backlog(self) -> int:
        """Frames received from the camera and waiting to be taken (the live runner skips a
        window when more than a hop of frames wait)."""
        return self._queue.qsize()

    # ----------------------------------------------------------- the O(1) end
    def put_frame(self, image: np.ndarray, camera_metadata: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Hand one frame to the source (what the core's callbacks call; tests may too).

        Only queues it: blocks while the queue is full (that back-pressure reaches the
        core's circular buffer), gives up on the frame once :meth:`stop` was called.
        """
        item = (image, camera_metadata, extra)
        while True:
            try:
                self._queue.put(item, timeout=_POLL_S)
                self.frames_received += 1
                return
            except queue.Full:
                if self._stopping.is_set():
                    self.dropped_after_stop += 1
                    return

    def finish(self, error: str | None = None) -> None:
        """Mark the end of the acquisition: iteration ends once the queue is drained."""
        if error and self.error is None:
            self.error = " ".join(str(error).split())
        self._done.set()

    # ----------------------------------------------------------- MDA callbacks
    def _on_frame_ready(self, img: np.ndarray, event: Any, meta: Mapping[str, Any]) -> None:
        if self._done.is_set():
            return
        cam = meta.get("camera_metadata") or {}
        extra = {}
        if "runner_time_ms" in meta:
            extra["runner_time_ms"] = meta["runner_time_ms"]
        self.put_frame(img, cam, extra)

    def _on_sequence_finished(self, sequence: Any) -> None:
        if not self.owns_acquisition:  # listening to someone else's MDA: it ended
            self.finish()

    def _connect(self) -> None:
        if self._connected:
            return
        ev = self.core.mda.events
        ev.frameReady.connect(self._on_frame_ready)
        ev.sequenceFinished.connect(self._on_sequence_finished)
        self._connected = True

    def _disconnect(self) -> None:
        if not self._connected:
            return
        ev = self.core.mda.events
        for signal, slot in ((ev.frameReady, self._on_frame_ready), (ev.sequenceFinished, self._on_sequence_finished)):
            try:
                signal.disconnect(slot)
            except Exception:  # pragma: no cover - already gone
                pass
        self._connected = False

    # ------------------------------------------------------------- lifecycle
    def start(self) -> "MicroManagerSource":
        """Start (or, with ``start=False``, begin listening to) the acquisition. Idempotent."""
        if self._started:
            return self
        self._started = True
        self._t_last = time.perf_counter()
        mode = self.effective_mode
        if mode == "mda":
            self._connect()
            if self.owns_acquisition:
                if self.core.mda.is_running():
                    self._disconnect()
                    raise DleStreamError("Micro-Manager: an MDA is already running; stop it, or listen to it with start=False")
                self._thread = threading.Thread(target=self._run_mda, name="dle-mm-mda", daemon=True)
                self._thread.start()
        else:
            if self.owns_acquisition and self.core.isSequenceRunning():
                raise DleStreamError("Micro-Manager: a sequence acquisition is already running; stop it, "
                                     "or listen to it with start=False")
            self._thread = threading.Thread(target=self._run_sequence, name=f"dle-mm-{mode}", daemon=True)
            self._thread.start()
        return self

    def _run_mda(self) -> None:
        from datetime import timedelta

        import useq

        assert self.n_frames is not None  # an MDA run by this source needs n_frames (else effective_mode is "sequence")
        sequence = useq.MDASequence(time_plan=useq.TIntervalLoops(interval=timedelta(0), loops=self.n_frames))
        try:
            self.core.mda.run(sequence)
        except Exception as exc:
            self.finish(f"Micro-Manager MDA failed: {type(exc).__name__}: {exc}")
        finally:
            self._disconnect()
            if (not self._stopping.is_set() and self.error is None and self.n_frames is not None
                    and self.frames_received < self.n_frames):
                self.finish(f"Micro-Manager MDA ended after {self.frames_received} of {self.n_frames} frames "
                            f"(a camera timeout or a circular-buffer overflow; see the pymmcore-plus log)")
            self.finish()

    def _run_sequence(self) -> None:
        core = self.core
        live = self.effective_mode == "live"
        try:
            if self.owns_acquisition:
                if live:
                    core.startContinuousSequenceAcquisition(0)
                else:
                    n = ENDLESS_IMAGES if self.n_frames is None else self.n_frames
                    core.startSequenceAcquisition(n, 0, True)
            else:  # wait for someone else's acquisition to begin
                while not core.isSequenceRunning() and not self._stopping.is_set():
                    time.sleep(0.01)
            while not self._stopping.is_set():
                if core.getRemainingImageCount() > 0:
                    img, md = core.popNextImageAndMD()
                    self.put_frame(img, dict(md))
                    if self.n_frames is not None and self.frames_received >= self.n_frames:
                        break
                elif core.isSequenceRunning():
                    time.sleep(0.001)
                elif core.getRemainingImageCount() == 0:
                    break
            overflowed = False
            try:
                overflowed = bool(core.isBufferOverflowed())
            except Exception:  # pragma: no cover
                pass
            if (not live and not self._stopping.is_set() and self.n_frames is not None
                    and self.frames_received < self.n_frames):
                why = "the circular buffer overflowed (processing fell behind the camera)" if overflowed else \
                    "the sequence stopped early"
                self.finish(f"Micro-Manager sequence ended after {self.frames_received} of {self.n_frames} frames: {why}")
        except Exception as exc:
            self.finish(f"Micro-Manager acquisition failed: {type(exc).__name__}: {exc}")
        finally:
            if self.owns_acquisition:
                try:
                    if core.isSequenceRunning():
                        core.stopSequenceAcquisition()
                except Exception:  # pragma: no cover
                    pass
            self.finish()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the acquisition cleanly (cancel the MDA / stop the sequence this source
        started; stop listening otherwise). Frames already queued are still yielded,
        then iteration ends."""
        self._stopping.set()
        if self._started and self.owns_acquisition:
            try:
                if self.effective_mode == "mda":
                    self.core.mda.cancel()
                elif self.core.isSequenceRunning():
                    self.core.stopSequenceAcquisition()
            except Exception as exc:  # pragma: no cover
                self.finish(f"Micro-Manager: stopping failed: {type(exc).__name__}: {exc}")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)
        self._disconnect()
        self.finish()

    def __enter__(self) -> "MicroManagerSource":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[FrameEvent | SourceStalled]:
        return self.frames()

    def frames(self, timeout_s: float | None = None) -> Iterator[FrameEvent | SourceStalled]:
        """Yield frames as they come; a :class:`SourceStalled` notice after each
        ``timeout_s`` (default ``stall_timeout_s``) without one. Starts the acquisition
        if needed; ends when it ends (see the module docstring)."""
        timeout = self.stall_timeout_s if timeout_s is None else float(timeout_s)
        if timeout <= 0:
            raise DleStreamError(f"Micro-Manager source: timeout_s must be > 0, got {timeout_s}")
        self.start()
        waiting_since = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=min(_POLL_S, timeout))
            except queue.Empty:
                if self._done.is_set() and self._queue.empty():
                    return
                waited = time.perf_counter() - waiting_since
                if waited >= timeout:
                    yield SourceStalled(
                        waited_s=waited, frames_so_far=self.frames_delivered, last_image_number=self._gaps.last,
                        message=(f"no frame from the camera for {waited:.1f} s after {self.frames_delivered} frames; "
                                 f"check the microscope, or stop"),
                    )
                    waiting_since = time.perf_counter()
                continue
            waiting_since = time.perf_counter()
            yield self._event(*item)

    def _event(self, image: np.ndarray, cam: Mapping[str, Any], extra: Mapping[str, Any] | None) -> FrameEvent:
        image_number = _int_or_none(cam.get("ImageNumber"))
        elapsed_ms = _float_or_none(cam.get("ElapsedTime-ms"))
        lost = self._gaps.update(image_number)
        metadata: dict[str, Any] = {"camera": {str(k): str(v) for k, v in cam.items()}}
        if extra:
            metadata.update(extra)
        if lost:
            metadata["images_lost"] = lost
        event = FrameEvent(
            frame=image, index=self.frames_delivered,
            timestamp_s=None if elapsed_ms is None else elapsed_ms / 1000.0,
            image_number=image_number, metadata=metadata,
        )
        self.frames_delivered += 1
        return event
