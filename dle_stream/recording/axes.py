"""Which axis of a stored image array is time, and which frame plane to read.

Files store movies with many axis layouts: ``TYX`` (a plain movie), ``TCYX`` (several
channels), ``TZYX`` (several planes per time point), ``TYXS`` (RGB samples), with
singleton axes sprinkled in (ImageJ's ``TZCYXS``, ScanImage's ``ZTCYX``). A
:class:`FrameLayout` reduces any of these to a stack of 2-D frames [T, Y, X]: singleton
axes are fixed at 0, one extra non-singleton axis (channel, plane or RGB sample) is
fixed at the index the user chose (``channel``), and the time axis is the first
of ``T``, ``I``, ``Q``, ``Z`` that is present (``I``/``Q`` are tifffile's generic
"image sequence" axes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dle_stream.errors import DleStreamError, ParameterError, arg

#: Axis letters that can carry time, in order of preference.
TIME_AXES = "TIQZ"

_AXIS_NAMES = {"C": "channels", "S": "colour samples (RGB)", "Z": "planes", "T": "time points"}


@dataclass(frozen=True)
class FrameLayout:
    """How to cut 2-D frames out of an array with named axes.

    Attributes:
        axes: upper-case axis letters of the stored array, e.g. ``"TCYX"``.
        shape: shape of the stored array.
        time_axis: position of the time axis in ``axes``.
        fixed: position -> index for every axis that is not time, Y or X.
        channel_axis: letter of the axis chosen with ``channel`` (None when there was none).
    """

    axes: str
    shape: tuple[int, ...]
    time_axis: int
    fixed: dict[int, int]
    channel_axis: str | None = None

    @property
    def n_frames(self) -> int:
        return int(self.shape[self.time_axis])

    @property
    def height(self) -> int:
        return int(self.shape[self.axes.index("Y")])

    @property
    def width(self) -> int:
        return int(self.shape[self.axes.index("X")])

    def index(self, time: int | slice) -> tuple[int | slice, ...]:
        """Index tuple selecting frame(s) ``time`` (an int, or a slice of frames)."""
        return tuple(
            time if i == self.time_axis else self.fixed.get(i, slice(None)) for i in range(len(self.axes))
        )

    def take(self, array: "np.ndarray", start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of ``array`` (any array-like with this layout) as [n, Y, X]."""
        block = np.asarray(array[self.index(slice(start, stop))])
        return np.ascontiguousarray(block)


def plan_frames(axes: str, shape: tuple[int, ...], channel: int | None, source: str) -> FrameLayout:
    """Work out the :class:`FrameLayout` of an array, or raise a one-line error.

    Args:
        axes: axis letters (any case), one per dimension of ``shape``.
        shape: the stored array's shape.
        channel: index along the one extra axis (channel, plane or RGB sample), if any.
        source: the file, for error messages.
    """
    axes = axes.upper()
    shape = tuple(int(n) for n in shape)
    if len(axes) != len(shape):
        raise DleStreamError(f"{source}: axes {axes!r} do not match the data shape {shape}; the file's metadata is inconsistent")
    if "Y" not in axes or "X" not in axes or axes.index("Y") > axes.index("X"):
        raise DleStreamError(
            f"{source}: frames are not 2-D images (axes {axes}, shape {shape}); "
            f"dle-stream needs a movie of 2-D frames [T, Y, X]"
        )
    if shape[axes.index("Y")] < 1 or shape[axes.index("X")] < 1:
        raise DleStreamError(
            f"{source}: frames are empty ({shape[axes.index('Y')]}×{shape[axes.index('X')]} px, axes {axes}); "
            f"the file's metadata is damaged; re-export the movie"
        )
    fixed: dict[int, int] = {}
    others: list[int] = []
    for i, (ax, n) in enumerate(zip(axes, shape)):
        if ax in "YX":
            continue
        if n == 1:
            fixed[i] = 0
        else:
            others.append(i)
    time_axis = next((i for letter in TIME_AXES for i in others if axes[i] == letter), None)
    if time_axis is None:
        extra = ", ".join(f"{shape[i]} {_AXIS_NAMES.get(axes[i], 'entries along axis ' + axes[i])}" for i in others)
        what = f"a single image with {extra}" if extra else "a single 2-D image"
        raise DleStreamError(
            f"{source}: is {what} (shape {shape}), not a movie; dle-stream needs a time series of frames [T, Y, X]"
        )
    if time_axis > axes.index("Y"):
        raise DleStreamError(f"{source}: time axis {axes[time_axis]} comes after the image rows in {axes}; re-save as [T, Y, X]")
    extras = [i for i in others if i != time_axis]
    if len(extras) > 1:
        raise DleStreamError(
            f"{source}: has more than one extra axis besides time ({', '.join(axes[i] for i in extras)} in {axes}, "
            f"shape {shape}); export a single-channel, single-plane movie [T, Y, X]"
        )
    channel_axis = None
    if extras:
        i = extras[0]
        n = shape[i]
        channel_axis = axes[i]
        what = _AXIS_NAMES.get(axes[i], f"entries along axis {axes[i]}")
        if channel is None:
            raise ParameterError(f"{source}: has {n} {what} (axis {axes[i]}); use {arg('channel', placeholder='N')} "
                                 f"with N in 0..{n - 1}")
        if not 0 <= channel < n:
            raise ParameterError(f"{source}: {arg('channel', channel)} is out of range: the file has {n} {what}; "
                                 f"use 0..{n - 1}")
        fixed[i] = int(channel)
    elif channel not in (None, 0):
        raise ParameterError(f"{source}: {arg('channel', channel)} is out of range: the file has a single channel; "
                             f"drop {arg('channel')}")
    return FrameLayout(axes=axes, shape=shape, time_axis=time_axis, fixed=fixed, channel_axis=channel_axis)
