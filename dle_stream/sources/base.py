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
:class:`~dle_stream.events.GapCounter` (the one counter, shared with the runner) turns
those jumps into a count and a per-frame ``metadata["images_lost"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dle_stream.events import GapCounter

__all__ = ["GapCounter", "SourceStalled"]


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
