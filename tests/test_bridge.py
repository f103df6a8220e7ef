"""The simulator's Brownian bridge (positions between two row starts, ``_bridge``).

Physics: a 3D Brownian path with coefficient D pinned at ``a`` (time 0) and ``b`` (time T)
has, per axis, mean a + (u/T)(b − a) and covariance 2D·u₁(T − u₂)/T at times u₁ ≤ u₂.

Reproducibility: a seed's movies must not change when the bridge is rewritten, because
every later Poisson draw of a seeded suite depends on these floats (session 7 measured a
reordering of the same algebra moving the 1000-movie suite's D deciles). So the output is
compared bit for bit with the path built from the same normal draws in the documented
order: a + W(u) − (u/T)·W(T) + (u/T)·(b − a).
"""
from __future__ import annotations

import torch

from dle_stream.training.simulator import _bridge


def _inputs(n: int, k: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, generator=g) * 5
    b = a + torch.randn(n, 3, generator=g)
    span = 500 + 1500 * torch.rand(n, generator=g)  # µs
    u = torch.sort(torch.rand(n, k, generator=g), dim=1).values * span[:, None]
    d = 0.05 + 2 * torch.rand(n, generator=g)  # µm²/s
    return a, b, u, span, d


def test_bridge_is_bit_identical_to_the_documented_order_of_operations():
    a, b, u, span, d = _inputs(4096, 24)
    out = _bridge(torch.Generator().manual_seed(11), a, b, u, span, d)

    # the same normal draws, the path written out step by step
    g = torch.Generator().manual_seed(11)
    n, k = u.shape
    z = torch.randn(n, k + 1, 3, generator=g)
    gaps = torch.cat([u[:, :1], u[:, 1:] - u[:, :-1], span[:, None] - u[:, -1:]], 1).clamp_min(0)
    steps = z * torch.sqrt(2 * d[:, None] * gaps * 1e-6)[:, :, None]
    w = torch.cumsum(steps, dim=1)
    frac = (u / span[:, None])[:, :, None]
    expected = ((a[:, None, :] + w[:, :k]) - frac * w[:, k:]) + frac * (b - a)[:, None, :]

    assert torch.equal(out, expected)


def test_bridge_mean_and_covariance_match_a_pinned_brownian_path():
    n = 40000
    d_um2_s, span_us = 1.5, 2000.0
    a = torch.tensor([[0.2, -0.4, 1.0]]).expand(n, 3).contiguous()
    b = torch.tensor([[0.5, 0.1, 0.7]]).expand(n, 3).contiguous()
    times = torch.tensor([100.0, 700.0, 1000.0, 1900.0])
    u = times.expand(n, 4).contiguous()
    out = _bridge(torch.Generator().manual_seed(5), a, b, u, torch.full((n,), span_us),
                  torch.full((n,), d_um2_s)).double()

    frac = (times / span_us).double()
    mean_expected = a[0].double()[None, :] + frac[:, None] * (b[0] - a[0]).double()[None, :]
    t1, t2 = torch.meshgrid(times.double(), times.double(), indexing="ij")
    lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
    cov_expected = 2 * d_um2_s * 1e-6 * lo * (span_us - hi) / span_us  # µm²

    for axis in range(3):
        x = out[:, :, axis]
        sd = cov_expected.diagonal().sqrt()
        # mean within 4 standard errors
        assert torch.all((x.mean(0) - mean_expected[:, axis]).abs() < 4 * sd / n ** 0.5)
        cov = torch.cov(x.T)
        # covariance within 5 % of the largest entry (standard error ≈ 0.7 % at n = 40000)
        assert torch.allclose(cov, cov_expected, atol=0.05 * float(cov_expected.max()))
