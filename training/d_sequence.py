"""Training D values spread evenly over the prior: a randomised van der Corput sequence.

The head is trained on a latent cache of a few thousand movies, and the combination loss on
about a hundred groups of 16 windows of one D. Drawn independently, those D values cluster
and leave gaps at the scale the head's B-spline output can resolve (a few knots, ≈ 0.1·d_max):
a bin of that width holds ≈ 6 ± 2.5 of the cache's groups. The head can fit the cache's
empirical D distribution, and every window then carries the same bumps in its
log-likelihood; adding 16 windows multiplies them 16-fold and pins the combined D
(BENCHMARKS.md, "One model for a family of scans", the bumps).

Quantiles from the base-2 van der Corput sequence, shifted by one random offset (modulo 1),
put every aligned block of 2^k consecutive draws exactly one to each of 2^k equal-probability
strata, and any run of n consecutive draws within a few of n·(stratum share) of every
stratum. The cache is a ring buffer, i.e. the latest draws, so what it holds stays evenly
spread while it is refreshed.
"""

from __future__ import annotations

import torch


def van_der_corput(index: int) -> float:
    """The ``index``-th point (from 0) of the base-2 van der Corput sequence, in [0, 1)."""
    if index < 0:
        raise ValueError("van_der_corput: index must be ≥ 0")
    q, scale = 0.0, 0.5
    while index:
        if index & 1:
            q += scale
        index >>= 1
        scale /= 2
    return q


class EvenQuantiles:
    """Prior quantiles in [0, 1), evenly spread: ``frac(vdc(i) + shift)`` for i = start, start + 1, …

    The trainer keeps (shift, next index) in its checkpoint, so that a resumed run continues
    the same sequence.
    """

    def __init__(self, shift: float, start: int = 0):
        if not 0.0 <= shift < 1.0:
            raise ValueError("EvenQuantiles: shift must be in [0, 1)")
        self.shift = float(shift)
        self.index = int(start)

    def next(self, n: int) -> torch.Tensor:
        """The next ``n`` quantiles [n] (float64)."""
        q = [(van_der_corput(self.index + i) + self.shift) % 1.0 for i in range(n)]
        self.index += n
        return torch.tensor(q, dtype=torch.float64)
