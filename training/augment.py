"""Augmentations that respect raster time (docs/design.md §3).

A laser-scanning movie is a sequence of pixels in time, so a geometric transform is
valid only if the transformed movie is what a microscope could record. Flipping or
transposing a tile changes which direction is "fast" in time: no microscope records
that. Valid:

- reversing the whole pixel-time sequence: frames in reverse order *and* each frame
  rotated by 180°. For a unidirectional raster, pixel (k, r, c) then holds what was
  recorded at t_end − t(k, r, c), i.e. the movie of the time-reversed motion, and free
  Brownian motion is statistically time-reversible;
- detector gain and offset changes (a·x + b, a > 0).
"""

from __future__ import annotations

import torch


def reverse_raster_time(movies: torch.Tensor) -> torch.Tensor:
    """Reverse the pixel-time order of movies [..., T, H, W] (unidirectional scans only)."""
    return torch.flip(movies, dims=(-3, -2, -1))


def gain_offset(movies: torch.Tensor, gain: torch.Tensor | float, offset: torch.Tensor | float) -> torch.Tensor:
    """Apply a detector gain (> 0) and offset per movie: gain·x + offset."""
    gain = torch.as_tensor(gain, dtype=movies.dtype, device=movies.device)
    offset = torch.as_tensor(offset, dtype=movies.dtype, device=movies.device)
    shape = (-1,) + (1,) * 3 if gain.ndim else ()
    return movies * gain.reshape(shape) + offset.reshape(shape)


def random_raster_augment(movies: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reverse the pixel-time order of a random half of a batch [B, T, H, W]."""
    flip = torch.rand(movies.shape[0], generator=generator, device=movies.device) < 0.5
    return torch.where(flip[:, None, None, None], reverse_raster_time(movies), movies)
