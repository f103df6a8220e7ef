"""The plain records that flow through a stream, and the runner's events that carry them.

Every source (Micro-Manager, the demo camera, a replayed file) yields
:class:`FrameEvent`; the runner turns windows of frames into :class:`WindowEstimate`
records. Outputs do not get called by the runner: each is a *sink*
(:class:`dle_stream.protocols.Sink`) that subscribes to the runner's :class:`RunnerEvents`,
the Zarr log (:class:`dle_stream.zarr_log.ZarrLog`) and the dashboard
(:class:`dle_stream.dashboard.Dashboard`) alike. :class:`GapCounter` reads lost frames
from the camera's image numbers (for the Micro-Manager source and the runner alike).

Events and their payloads (:class:`RunnerEvents`; docs/design.md §2), in the order the
runner emits them for one frame:

=============  =====================  ==================================================
event          payload                when
=============  =====================  ==================================================
``gap``        :class:`GapEvent`      frames were lost just before this frame (then a
                                      ``warning``); the windows restart
``frame``      :class:`FrameEvent`    the frame was accepted (checked and cut into tiles)
``estimated``  :class:`WindowEstimate`  a window was estimated (the running combination
                                      already holds it)
``warning``    ``str``                one line for the user (gaps, stalls, notes)
``finished``   :class:`~dle_stream.runner.RunStats`  the stream ended (flush what is
                                      buffered; closing stays with the owner)
=============  =====================  ==================================================

A sink that keeps a record connects its ``estimated`` handler with
:data:`RECORD_PRIORITY`, so it runs before every display: whatever a dashboard shows was
committed first, and a kill never loses an estimate already shown. An error in a sink
stops the emission (later sinks do not see the event) and reaches the runner's caller as
the sink's own exception.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from psygnal import Signal

#: Priority of a recording sink's ``estimated`` handler (psygnal calls higher first; displays
#: connect with the default 0): the record is committed before anything shows the estimate.
RECORD_PRIORITY = 100


@dataclass(frozen=True)
class FrameEvent:
    """One full frame from a source.

    Attributes:
        frame: [H, W] pixel values of the full frame.
        index: position of the frame in the stream, 0-based, counting every frame the
            source delivered (a dropped frame leaves a gap only in ``image_number``).
        timestamp_s: acquisition time from the source's clock, seconds (None if unknown).
        image_number: the camera's own frame counter when it has one (Micro-Manager's
            ``ImageNumber``); a jump means frames were lost before they reached us.
        metadata: anything else the source knows about the frame (JSON-able).
    """

    frame: np.ndarray
    index: int
    timestamp_s: float | None = None
    image_number: int | None = None
    metadata: dict = field(default_factory=dict)


class EstimateFlag(enum.IntFlag):
    """Why an estimate deserves a second look (a bit mask, stored as uint8)."""

    NONE = 0
    LITTLE_INFORMATION = 1   # the posterior is nearly the prior, or in/above range cannot be told
    ABOVE_RANGE = 2          # the data say D is above the model's range (shown as "D > x")
    TIMING_ASSUMED = 4       # scan timing taken from the model card, not read or given
    SPANS_GAP = 8            # the window spans dropped frames
    NO_ESTIMATE = 16         # the estimator returned nothing usable (NaN)
    DISAGREE = 32            # combined estimates that are not consistent with one D (heterogeneous)


def flag_names(bits: int) -> list[str]:
    """Readable names of the set bits, e.g. ``["above range", "little information"]``."""
    return [(f.name or "").lower().replace("_", " ") for f in EstimateFlag if f.value and bits & f.value]


@dataclass(frozen=True)
class WindowEstimate:
    """Estimates of one window position for every tile.

    Attributes:
        window: running number of the window (0-based).
        frame_start, frame_stop: frames [start, stop) the window covers.
        t_start_s, t_stop_s: the window's span in acquisition time, s (from the scan timing:
            frame periods since the first frame, images lost in gaps included).
        wall_time: Unix time when the estimate was made, s.
        d_um2_s: [n_tiles] D̂, µm²/s: posterior median on the model's operating range
            (NaN for tiles not estimated in this window).
        sigma_um2_s: [n_tiles] posterior std, µm²/s.
        flags: [n_tiles] uint8 :class:`EstimateFlag` bits.
        interval68_um2_s, interval95_um2_s: [n_tiles, 2] highest-density intervals, µm²/s
            (asymmetric near D = 0).
        p_above: [n_tiles] probability that D is above the model's range.
        lower95_um2_s: [n_tiles] the "D > x" bound shown when a tile is above the range.
        log_likelihood: [n_tiles, n_grid] log-likelihood of D on the estimator's grid
            (:mod:`dle_stream.likelihood`): what independent windows combine by adding.
    """

    window: int
    frame_start: int
    frame_stop: int
    t_start_s: float
    t_stop_s: float
    wall_time: float
    d_um2_s: np.ndarray
    sigma_um2_s: np.ndarray
    flags: np.ndarray
    interval68_um2_s: np.ndarray | None = None
    interval95_um2_s: np.ndarray | None = None
    p_above: np.ndarray | None = None
    lower95_um2_s: np.ndarray | None = None
    log_likelihood: np.ndarray | None = None


@dataclass(frozen=True)
class GapEvent:
    """Frames lost just before frame ``frame_index``: the payload of ``RunnerEvents.gap``.

    Attributes:
        frame_index: stream index of the first frame after the gap.
        n_lost: frames lost (from the jump in image numbers, or estimated from the
            timestamps' step).
        kind: what the log records as the gap's kind (``"gap"``).
        reason: one line saying how the gap was seen.
    """

    frame_index: int
    n_lost: int
    kind: str = "gap"
    reason: str = ""


class RunnerEvents:
    """The signals (psygnal) of one :class:`~dle_stream.runner.StreamRunner`; payloads in
    the module's table. A sink subscribes in its ``attach(events)``."""

    gap = Signal(GapEvent)
    frame = Signal(FrameEvent)
    estimated = Signal(WindowEstimate)
    warning = Signal(str)
    finished = Signal(object)  # RunStats (defined with the runner, which imports this module)


class GapCounter:
    """Counts jumps in a camera's frame counter (``ImageNumber``).

    ``update(n)`` returns how many frames were lost just before frame ``n``: 0 when
    ``n`` follows the previous number, ``k`` when ``k`` numbers were skipped. A number
    that goes *down* means the camera restarted its counter (a new sequence): that is
    not a loss, :attr:`restarts` counts it and numbering continues from ``n``.

    Attributes:
        gaps: number of jumps seen.
        images_lost: frames lost in all jumps together.
        restarts: counter restarts seen.
    """

    def __init__(self) -> None:
        self.gaps = 0
        self.images_lost = 0
        self.restarts = 0
        self.last: int | None = None

    def update(self, image_number: int | None) -> int:
        if image_number is None:
            return 0
        lost = 0
        if self.last is not None:
            if image_number > self.last + 1:
                lost = image_number - self.last - 1
                self.gaps += 1
                self.images_lost += lost
            elif image_number <= self.last:
                self.restarts += 1
        self.last = image_number
        return lost
