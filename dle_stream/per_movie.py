"""Batch form of a per-movie estimator (the classic tracker and RICS estimate one movie at a time)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def estimate_each(estimate: Callable, movies, who: str) -> tuple[np.ndarray, np.ndarray, list[set[str]]]:
    """D̂ [B], σ [B] (µm²/s) and flags of movies [B, T, H, W] (numpy or CPU torch), one
    ``estimate(movie)`` call each; results carry ``d_um2_s``, ``sigma_um2_s`` and ``flags``."""
    if hasattr(movies, "detach"):
        movies = movies.detach().cpu().numpy()
    movies = np.asarray(movies)
    if movies.ndim != 4:
        raise ValueError(f"{who} estimator: movies must be [B, T, H, W], got shape {movies.shape}")
    results = [estimate(m) for m in movies]
    return (np.array([r.d_um2_s for r in results]), np.array([r.sigma_um2_s for r in results]),
            [r.flags for r in results])
