"""Turning a grid head with one free value per knot into a smooth B-spline head.

Early grid heads (``grid_basis`` 0) gave one log-density per knot of the D grid. Trained on
a finite budget, neighbouring knots differ by noise (measured on the first shipped heads:
±0.3–0.5 nats per window, with a zigzag from knot to knot). One window hides it, but
adding 16 windows multiplies it into spikes that pin the combined D to a few knots and
make its interval several times too narrow (docs/design.md §7b; BENCHMARKS.md "Honest
numbers"). A head with ``controls`` cubic B-spline coefficients cannot zigzag.

:func:`project_output_to_spline_basis` converts a free-knot head exactly as far as the
basis allows: the output layer's rows are replaced by their least-squares projection on
the basis (a fixed linear map, so the new layer gives the spline closest to what the old
one gave, for every input). Used by :mod:`~dle_stream.training.calibration` on packages
that predate the basis and by the trainer's warm start.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from dle_stream.errors import DleStreamError
from dle_stream.model import DLEModel, prior_output_bias

#: B-spline coefficients of the smooth head (the architecture's default).
DEFAULT_CONTROLS = 48


def project_output_to_spline_basis(model: DLEModel, controls: int = DEFAULT_CONTROLS) -> DLEModel:
    """A new model whose head gives ``controls`` B-spline coefficients: the least-squares
    projection of ``model``'s free-knot output (every other weight copied unchanged)."""
    cfg = model.config
    if cfg.output != "d_grid" or cfg.grid_basis:
        raise DleStreamError("only a grid head with one free value per knot (grid_basis 0) can be projected")
    basis = cfg.grid.spline_basis(controls)  # [knots, controls]
    projector = torch.as_tensor(np.linalg.pinv(basis), dtype=torch.float32)  # [controls, knots]
    new = DLEModel(replace(cfg, grid_basis=controls))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    last = model.mlp[-1]
    assert isinstance(last, nn.Linear)  # DLEModel's head ends with its output layer
    key = next(k for k, p in model.named_parameters() if p is last.weight)
    prefix = key[: -len("weight")]
    w, b = last.weight.detach().float(), last.bias.detach().float()
    state[prefix + "weight"] = torch.cat([projector @ w[:-1], w[-1:]])
    state[prefix + "bias"] = torch.cat([projector @ b[:-1], b[-1:]])
    new.load_state_dict(state)
    return new.to(next(model.parameters()).device)


def add_exact_prior(model: DLEModel) -> DLEModel:
    """A new model whose head adds the training prior exactly (``grid_prior_exact``): its
    output layer's bias loses the prior's projection on the basis, so that the new head
    gives what the old one did, except that the prior's step at d_max — which the old
    smooth output could only follow approximately — is now exact (every other weight
    copied unchanged). The network's smooth part is then the window's log-likelihood."""
    cfg = model.config
    if cfg.output != "d_grid" or not cfg.grid_basis or cfg.grid_prior_exact:
        raise DleStreamError("only a smooth grid head without the exact prior (grid_basis > 0, "
                             "grid_prior_exact false) can take the prior out of its weights")
    new = DLEModel(replace(cfg, grid_prior_exact=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    last = model.mlp[-1]
    assert isinstance(last, nn.Linear)  # DLEModel's head ends with its output layer
    key = next(k for k, p in model.named_parameters() if p is last.bias)
    shift = torch.as_tensor(prior_output_bias(cfg), dtype=torch.float32)
    state[key] = state[key].float() - shift
    new.load_state_dict(state)
    return new.to(next(model.parameters()).device)
