"""What every frame source shares: the stall notice and the gap counter.

A source is an iterable of :class:`~dle_stream.events.FrameEvent`. Live sources
(:class:`~dle_stream.sources.micromanager.MicroManagerSource`) never block forever: when
no frame arrives within their stall timeout they yield a :class:`SourceStalled` notice
instead of a frame and keep waiting, so the runner can show a warning and the user can
stop. Consumers therefore write::

    for item in source:
        if isinstance(item, SourceStalled):
            dashboard.warn(item.message)
            continue
        handle(item)            # a FrameEvent

Frames lost before they reached the source (Micro-Manager's circular buffer overwrites
its oldest frames in live mode) show as jumps in the camera's ``ImageNumber``;
:class:`GapCounter` turns those jumps into a count and a per-frame
``metadata["images_lost"]``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceStalled:
    """A notice, yielded in place of a frame, that no frame came for a while.

    Attributes:
        waited_s: seconds since the last frame (or since the start) without a frame.
        frames_so_far: frames delivered before the stall.
        last_image_number: the camera's ``ImageNumber`` of the last frame, if any.
        message: one line for the dashboard.
    """

    waited_s: float
    frames_so_far: int
    last_image_number: int | None
    message: str


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
