"""Rolling windows over a stream: per-tile ring buffers of per-frame features.

Each tile-frame is turned into a feature once (the DLE's encoder latent, or the raw
tile for estimators that need pixels) and kept in a ring buffer of the window length T.
Every hop H frames, the last T features of every tile form that tile's window. After a
gap in the stream the buffer restarts, so no window mixes frames across a gap.
"""

from __future__ import annotations

import numpy as np


class RollingWindows:
    """Ring buffer of per-frame features shared by all tiles of a stream.

    Each frame's features are written twice, at slots p and p + T of a buffer
    [n_tiles, 2T, *feature_shape], so that the last T frames in time order are always
    one contiguous slice of it: :meth:`current` returns a view, without copying the
    window (128 MB for 625 tiles of 400 latents of 128 floats) every hop.

    Args:
        n_tiles: tiles per frame.
        window: frames per window (T).
        hop: frames between consecutive windows (H).
    """

    def __init__(self, n_tiles: int, window: int, hop: int):
        self.n_tiles, self.window, self.hop = int(n_tiles), int(window), int(hop)
        self.buffer: np.ndarray | None = None
        self.filled = 0      # frames pushed since the last (re)start
        self._pos = 0        # next write slot (0 … T−1; also written at + T)
        self.last_frame = -1  # stream index of the newest frame pushed

    def restart(self) -> None:
        """Forget the frames so far (after a gap): the next window starts afresh."""
        self.filled = 0
        self._pos = 0

    def push(self, features: np.ndarray, frame_index: int) -> None:
        """Add one frame's features [n_tiles, *feature_shape]."""
        if self.buffer is None:
            self.buffer = np.zeros((self.n_tiles, 2 * self.window, *features.shape[1:]), dtype=features.dtype)
        self.buffer[:, self._pos] = features
        self.buffer[:, self._pos + self.window] = features
        self._pos = (self._pos + 1) % self.window
        self.filled += 1
        self.last_frame = frame_index

    def due_after(self, pending: int = 0) -> bool:
        """Is a window complete once ``pending`` more frames (received, not yet pushed)
        are in: full, and on the hop grid?"""
        filled = self.filled + pending
        return filled >= self.window and (filled - self.window) % self.hop == 0

    def current(self) -> np.ndarray:
        """The last T features of every tile in time order, [n_tiles, T, *feature_shape]:
        a view into the buffer (not to be written), valid until the next :meth:`push`."""
        assert self.buffer is not None and self.filled >= self.window
        return self.buffer[:, self._pos:self._pos + self.window]
