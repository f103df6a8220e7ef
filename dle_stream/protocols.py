"""The seams of the streaming path as :class:`typing.Protocol` classes (docs/design.md §2).

A frame goes source → runner (tiling, windows) → stream estimator → combination → sinks.
Each seam is a protocol, so a new camera, estimator or output plugs in without
subclassing anything:

- :class:`FrameSource`: an iterable of :class:`~dle_stream.events.FrameEvent` in stream
  order (:class:`~dle_stream.sources.file_source.FileSource`; a live
  :class:`~dle_stream.sources.micromanager.MicroManagerSource` is a :class:`LiveFrameSource`);
- :class:`StreamEstimator`: features per tile-frame, a log-likelihood of D per window
  (:mod:`dle_stream.stream_estimators`);
- :class:`Sink`: an output that subscribes to the runner's events
  (:class:`~dle_stream.events.RunnerEvents`): the Zarr log, the dashboard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from dle_stream.events import FrameEvent

if TYPE_CHECKING:
    from dle_stream.events import RunnerEvents
    from dle_stream.likelihood import DGrid
    from dle_stream.sources.base import SourceStalled

__all__ = ["FrameSource", "LiveFrameSource", "Sink", "StreamEstimator"]


@runtime_checkable
class FrameSource(Protocol):
    """Frames of one stream, in order: full frames of one size, ``index`` counting from 0."""

    def __iter__(self) -> Iterator[FrameEvent]: ...


class LiveFrameSource(Protocol):
    """A source that acquires while the runner works: it may yield a
    :class:`~dle_stream.sources.base.SourceStalled` notice instead of a frame when the camera
    goes quiet, says how many frames wait (``backlog``: the runner skips windows when
    behind), and stops on request."""

    def __iter__(self) -> Iterator[FrameEvent | SourceStalled]: ...

    def backlog(self) -> int:
        """Frames received and not yet taken."""
        ...

    def stop(self) -> None:
        """Stop acquiring (idempotent)."""
        ...

    @property
    def error(self) -> str | None:
        """Why acquisition ended early (one line), or None."""
        ...


class StreamEstimator(Protocol):
    """An estimator in two steps, so that each tile-frame is processed once.

    ``features(tiles [N, h, w]) -> [N, ...]`` as frames arrive; every hop frames
    ``estimate(windows [B, T, ...]) -> [B, grid.n]``, the log-likelihood of D on ``grid``
    (units of ``d_max_um2_s``), which independent windows combine by adding.
    """

    @property
    def name(self) -> str: ...

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(height, width) of a tile, px."""
        ...

    @property
    def window_frames(self) -> int:
        """The window length the estimator was made for, frames."""
        ...

    @property
    def min_frames(self) -> int:
        """The shortest window it accepts, frames."""
        ...

    @property
    def d_range(self) -> tuple[float, float]:
        """The operating range (lowest, highest D) in this stream's units, µm²/s."""
        ...

    @property
    def d_max_um2_s(self) -> float:
        """Top of the operating range in this stream's units, µm²/s."""
        ...

    @property
    def grid(self) -> DGrid: ...

    def features(self, tiles: np.ndarray) -> np.ndarray: ...

    def estimate(self, windows: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Sink(Protocol):
    """An output of a run. ``attach`` connects the sink's handlers to the runner's events
    (:class:`~dle_stream.events.RunnerEvents`; payloads documented in
    :mod:`dle_stream.events`); a sink that keeps a record connects ``estimated`` with
    :data:`~dle_stream.events.RECORD_PRIORITY`. Attach with
    :meth:`dle_stream.runner.StreamRunner.attach`."""

    def attach(self, events: RunnerEvents) -> None: ...
