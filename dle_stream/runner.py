"""The streaming runner: frames in, D ± σ per tile and window out.

For every frame the runner cuts the tiles, turns each tile-frame into a feature once
(batched: the DLE encodes a whole batch of tile-frames in one call), and pushes the
features into the per-tile rolling windows. Every hop frames, once the windows are full,
it estimates all tiles in one batch (a log-likelihood of D per tile, summarised as
D ± σ, intervals and flags), updates the running per-tile and per-ROI combinations
(:mod:`dle_stream.combine`: independent windows and disjoint tiles only) and emits them
(``events.estimated``).

The runner calls no output: every output is a sink (:class:`dle_stream.protocols.Sink`)
attached with :meth:`StreamRunner.attach`, which subscribes to the runner's events
(:class:`dle_stream.events.RunnerEvents`, payloads documented there): the Zarr log records
frames, gaps and estimates; the dashboard shows them.

Gaps (a jump in the camera's image number; without image numbers, a step in the
timestamps beyond 1.5 frame periods) restart the windows, so no window mixes frames across a gap; the gap is
counted and announced (``events.gap``, then ``events.warning``). In live mode, when estimation
falls behind (more than a hop of frames waiting), a due window is skipped and counted;
frames are still encoded and emitted (``events.frame``), so the record keeps every frame. A
recording sink handles ``estimated`` first (:data:`~dle_stream.events.RECORD_PRIORITY`) and
commits it there, so whatever was shown survives a kill.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from psygnal import EmitLoopError, SignalInstance

from dle_stream.combine import RunningCombination
from dle_stream.errors import DleStreamError, EstimatorChoiceError, ParameterError, RoiError, arg
from dle_stream.events import EstimateFlag, FrameEvent, GapCounter, GapEvent, RunnerEvents, WindowEstimate
from dle_stream.likelihood import posterior
from dle_stream.protocols import Sink, StreamEstimator
from dle_stream.tiling import TileLayout
from dle_stream.timing import ScanTiming
from dle_stream.windows import RollingWindows

#: A timestamp step beyond this many frame periods counts as a gap.
GAP_FRAME_PERIODS = 1.5


__all__ = ["GAP_FRAME_PERIODS", "RunStats", "RunnerEvents", "StreamRunner"]


def _emit(signal: SignalInstance, payload: object) -> None:
    """Emit ``payload``; a sink's error reaches the caller as itself (psygnal wraps it in an
    EmitLoopError), so a log that cannot write still fails with its one-line DleStreamError."""
    try:
        signal.emit(payload)
    except EmitLoopError as exc:
        if exc.__cause__ is None:
            raise
        raise exc.__cause__  # noqa: B904 - the sink's own exception, its cause chain kept


@dataclass
class RunStats:
    """What the dashboard shows about the run so far."""

    frames_in: int = 0
    windows_done: int = 0
    windows_skipped: int = 0
    gaps: int = 0
    images_lost: int = 0
    started: float = field(default_factory=time.monotonic)
    first_timestamp_s: float | None = None
    last_timestamp_s: float | None = None
    last_latency_s: float = math.nan
    max_latency_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def processing_fps(self) -> float:
        dt = time.monotonic() - self.started
        return self.frames_in / dt if dt > 0 else math.nan

    @property
    def acquisition_fps(self) -> float:
        if self.first_timestamp_s is None or self.last_timestamp_s is None or self.frames_in < 2:
            return math.nan
        dt = self.last_timestamp_s - self.first_timestamp_s
        return (self.frames_in - 1) / dt if dt > 0 else math.nan


class StreamRunner:
    """Rolling-window estimation of D per tile over a stream of frames.

    Args:
        estimator: a stream estimator (:mod:`dle_stream.stream_estimators`).
        layout: tiles and ROIs (:mod:`dle_stream.tiling`).
        timing: the stream's scan timing (window times are derived from it).
        window: frames per window (default: the model's).
        hop: frames between windows.
        live: live mode (skip windows when behind instead of falling further behind).
        timing_assumed: the timing came from the model card, not the data: flag estimates.
        combine_windows: non-overlapping windows combined in the running per-tile estimate.
        encode_every: tile-frames are encoded in batches of this many frames.

    Outputs (the Zarr log, the dashboard, anything else) are sinks: :meth:`attach` them.
    """

    def __init__(self, estimator: StreamEstimator, layout: TileLayout, timing: ScanTiming, *,
                 window: int | None = None, hop: int = 50, live: bool = False, timing_assumed: bool = False,
                 combine_windows: int = 8, encode_every: int = 10, images_lost_before: int = 0):
        self.est = estimator
        #: images lost before this stream's first frame (a continued replay: from its log)
        self.images_lost_before = int(images_lost_before)
        self.layout = layout
        self.timing = timing
        self.window = int(window or estimator.window_frames)
        self.hop = int(hop)
        if self.hop < 1:
            raise ParameterError(f"{arg('hop', hop)}: must be at least 1 frame")
        if self.window < estimator.min_frames:
            raise EstimatorChoiceError(f"{arg('window', self.window)}: the {estimator.name} estimator needs at least "
                                       f"{estimator.min_frames} frames per window")
        for t in layout.tiles:
            if (t.height, t.width) != tuple(estimator.tile_shape):
                raise RoiError(f"{arg('layout')}: tile {t.bbox} is not the model's {estimator.tile_shape} px tile size")
        if not layout.tiles:
            raise RoiError(f"no tiles to estimate; check {arg('layout')} (the tiles and ROIs)")
        self.live = live
        self.timing_assumed = timing_assumed
        self.encode_every = max(1, int(encode_every))
        n = len(layout.tiles)
        self.windows = RollingWindows(n, self.window, self.hop)
        self.combination = RunningCombination(n, [r.tiles for r in layout.regions],
                                              windows_apart=math.ceil(self.window / self.hop), keep=combine_windows,
                                              grid=estimator.grid, d_max_um2_s=estimator.d_max_um2_s)
        self.events = RunnerEvents()
        #: the attached sinks (held here, since psygnal holds its slots weakly)
        self.sinks: list[Sink] = []
        self.stats = RunStats()
        # frames received but not encoded yet: their tiles [encode_every, n_tiles, h, w] (the
        # frames' own dtype, cut straight into this block) and their stream indices
        self._pending_tiles: np.ndarray | None = None
        self._pending_index: list[int] = []
        self._arrival: dict[int, float] = {}
        self._image_numbers = GapCounter()
        self._last_ts: float | None = None
        self._window_number = 0
        self.latest: WindowEstimate | None = None

    # ------------------------------------------------------------------ frames
    def process(self, event: FrameEvent, backlog: int = 0) -> list[WindowEstimate]:
        """Take one frame; return the window estimates it completed (0 or 1)."""
        frame = np.asarray(event.frame)
        if frame.shape != (self.layout.frame_height, self.layout.frame_width):
            raise DleStreamError(f"frame {event.index} is {frame.shape}, the stream's frames "
                                 f"{(self.layout.frame_height, self.layout.frame_width)}; the source changed its image size")
        tiles = self.layout.cut_all(frame, out=self._pending_slot(frame.dtype))
        slot = len(self._pending_index)
        if tiles.dtype.kind in "fc" and not np.isfinite(tiles).all():
            raise DleStreamError(f"frame {event.index} has NaN or infinite pixels inside the tiles; "
                                 f"check the recording (or choose ROIs that avoid the bad pixels)")
        self._detect_gap(event)
        if len(self._pending_index) != slot:  # a gap emptied the pending frames: this one comes first
            self._pending_block()[len(self._pending_index)] = tiles
        st = self.stats
        if event.timestamp_s is not None:
            st.first_timestamp_s = event.timestamp_s if st.first_timestamp_s is None else st.first_timestamp_s
            st.last_timestamp_s = event.timestamp_s
        _emit(self.events.frame, event)
        # counted once the sinks (the log first) have it: a Ctrl-C while the log records the
        # frame must not leave the summary's count one frame ahead of the log
        st.frames_in += 1
        self._pending_index.append(event.index)
        self._arrival[event.index] = time.monotonic()
        due = self.windows.due_after(len(self._pending_index))
        if due or len(self._pending_index) >= self.encode_every:
            self._encode_pending()
        if not due:
            return []
        if self.live and backlog > self.hop:
            st.windows_skipped += 1
            self._window_number += 1
            return []
        return [self._estimate()]

    def _pending_block(self) -> np.ndarray:
        assert self._pending_tiles is not None
        return self._pending_tiles

    def _pending_slot(self, dtype: np.dtype) -> np.ndarray:
        """Where the next frame's tiles go: the next free slot of the pending block (made, or
        remade for frames of another dtype after encoding what is pending)."""
        block = self._pending_tiles
        if block is None or block.dtype != dtype:
            self._encode_pending()
            h, w = self.est.tile_shape
            block = self._pending_tiles = np.empty((self.encode_every, len(self.layout.tiles), h, w), dtype=dtype)
        return block[len(self._pending_index)]

    def _encode_pending(self) -> None:
        k = len(self._pending_index)
        if not k:
            return
        stack = self._pending_block()[:k]  # [k, n_tiles, h, w]
        n = stack.shape[1]
        feats = self.est.features(stack.reshape(k * n, *stack.shape[2:]))
        feats = feats.reshape(k, n, *feats.shape[1:])
        for i in range(k):
            self.windows.push(feats[i], self._pending_index[i])
        self._pending_index.clear()

    def _detect_gap(self, event: FrameEvent) -> None:
        lost = 0
        reason = ""
        counted = event.image_number is not None and self._image_numbers.last is not None
        jump = self._image_numbers.update(event.image_number)
        if jump > 0:
            lost, reason = jump, f"{jump} image(s) lost before frame {event.index} (image number jumped)"
        # without image numbers, a step in the timestamps beyond 1.5 frame periods is a gap;
        # with them, consecutive numbers mean nothing was lost (software stamps can bunch)
        if not counted and event.timestamp_s is not None and self._last_ts is not None:
            step = event.timestamp_s - self._last_ts
            period = self.timing.frame_period_us * 1e-6
            if step > GAP_FRAME_PERIODS * period:
                lost = max(1, round(step / period) - 1)
                reason = f"{step * 1e3:.0f} ms between frames {event.index - 1} and {event.index} (≈{lost} missing)"
        if event.timestamp_s is not None:
            self._last_ts = event.timestamp_s
        if reason:
            self.stats.gaps += 1
            self.stats.images_lost += lost
            self._pending_index.clear()
            self.windows.restart()
            _emit(self.events.gap, GapEvent(event.index, lost, "gap", reason))
            self._warn(f"gap: {reason}; windows restart")

    # --------------------------------------------------------------- estimates
    def _estimate(self) -> WindowEstimate:
        windows = self.windows.current()
        log_likelihood = self.est.estimate(windows)
        post = posterior(log_likelihood, self.est.grid, self.est.d_max_um2_s)
        d, sigma = post.d, post.sigma
        flags = np.zeros(d.shape, dtype=np.uint8)
        flags[~np.isfinite(d)] |= np.uint8(EstimateFlag.NO_ESTIMATE)
        flags[post.little_information & np.isfinite(d)] |= np.uint8(EstimateFlag.LITTLE_INFORMATION)
        flags[post.above_range & np.isfinite(d)] |= np.uint8(EstimateFlag.ABOVE_RANGE)
        if self.timing_assumed:
            flags |= np.uint8(EstimateFlag.TIMING_ASSUMED)
        stop = self.windows.last_frame + 1
        start = stop - self.window
        period_s = self.timing.frame_period_us * 1e-6
        # acquisition time: a window never spans a gap, so every image lost so far came before it
        acquired = start + self.images_lost_before + self.stats.images_lost
        est = WindowEstimate(
            window=self._window_number, frame_start=start, frame_stop=stop, t_start_s=acquired * period_s,
            t_stop_s=(acquired + self.window) * period_s, wall_time=time.time(), d_um2_s=d.astype(np.float32),
            sigma_um2_s=sigma.astype(np.float32), flags=flags,
            interval68_um2_s=np.stack([post.lo68, post.hi68], axis=-1).astype(np.float32),
            interval95_um2_s=np.stack([post.lo95, post.hi95], axis=-1).astype(np.float32),
            p_above=post.p_above.astype(np.float32), lower95_um2_s=post.lower95_wide.astype(np.float32),
            log_likelihood=log_likelihood.astype(np.float32),
        )
        self._window_number += 1
        self.combination.add(log_likelihood)
        arrival = self._arrival.get(stop - 1)
        if arrival is not None:
            self.stats.last_latency_s = time.monotonic() - arrival
            self.stats.max_latency_s = max(self.stats.max_latency_s, self.stats.last_latency_s)
        self._arrival = {k: v for k, v in self._arrival.items() if k >= stop - 1}
        self.stats.windows_done += 1
        self.latest = est
        # a recording sink commits it first (RECORD_PRIORITY): a kill never loses an estimate already shown
        _emit(self.events.estimated, est)
        return est

    def _warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        del self.stats.warnings[:-20]
        _emit(self.events.warning, message)

    def warn(self, message: str) -> None:
        """Record and announce a warning from outside (a stalled camera, a source note)."""
        self._warn(message)

    def attach(self, *sinks: Sink) -> None:
        """Attach outputs: each subscribes to :attr:`events` (``sink.attach(self.events)``)
        and is kept alive as long as the runner."""
        for sink in sinks:
            sink.attach(self.events)
            self.sinks.append(sink)

    def finish(self) -> RunStats:
        """The stream ended: emit ``events.finished`` (sinks write what they buffer)."""
        _emit(self.events.finished, self.stats)
        return self.stats

    def run(self, events: Iterable[FrameEvent], backlog: Callable[[], int] = lambda: 0) -> RunStats:
        """Process every frame of ``events`` (a :class:`~dle_stream.protocols.FrameSource`), then :meth:`finish`."""
        for event in events:
            self.process(event, backlog())
        return self.finish()
