"""The deep-learning estimator (DLE) network: frame encoder, temporal ResNet, MLP head.

Architecture (the paper's §2.4, docs/design.md §5), with widths chosen by measurement:

- ``encoder``: five conv layers with GELU mapping one normalised tile-frame [H, W] to a
  latent vector (128). The fifth layer covers the whole remaining feature map (a dense
  layer), so the latent keeps *where* in the tile things are, which is what motion is
  read from. Frames are normalised first (:func:`normalize_frames`), which makes every
  estimate invariant to detector gain and offset.
- ``decoder``: latent → frame, only for the autoencoder pretraining (:meth:`DLEModel.autoencode`).
- ``temporal``: a 1-D ResNet along time on [B, latent, T]: an input conv (kernel 7),
  seven residual blocks of two convs (kernel 7, BatchNorm, GELU); some blocks stride 2
  in time to save compute once frame-to-frame differences have been formed.
- adaptive average pooling over time (any window ≥ :attr:`ModelConfig.min_frames` works),
  then an MLP giving D̂ and σ̂, both made positive with ``1 + ELU`` (σ̂ plus a tiny ε).

Outputs are in units of the prior's upper bound d_max (the trainer's targets are
D / d_max); :class:`dle_stream.estimator.DiffusionEstimator` multiplies by d_max (µm²/s).

Speed, measured with ``benchmarks/model_speed.py --threads 1 --cpu-time --sweep`` (AMD
EPYC Zen 4, float32, ``inference_mode``, through :class:`~dle_stream.estimator.DiffusionEstimator`:
chunks of 1024 frames, channels-last encoder; random 20×20 Poisson frames). Single-thread
*CPU time*, because two training runs were using both cores at the time, which makes
2-thread wall clocks meaningless (medians 3–10× off). Encoder includes normalisation;
batch 64 = 64 tiles × 400 frames; head = temporal ResNet + pooling + MLP:

================================  =================  ===================
config (changes to the default)   encoder frames/s   head ms/window b=64
================================  =================  ===================
default                           22,800             1.20
enc 16-32-32-64 strides 2,2,1,1   30,400             0.96
enc 16-32-64-64 strides 2,2,2,1   50,100             0.93
enc 32-32-64-64 strides 2,1,2,1   16,000             0.92
temporal, no time stride          23,000             1.60
temporal strides 1,2,1,2,1,2,1    23,000             0.80
temporal 16 channels              22,900             0.42
temporal 48 channels              23,100             1.75
temporal 64 channels              22,900             2.98
================================  =================  ===================

On 2 threads the work does not grow (process CPU time equal at 1 and 2 threads), so the
default should give ≈ 40,000–45,000 tile-frames/s and ≈ 0.6–0.7 ms per window on an idle
2-core machine (targets: ≥ 30,000/s, ≤ 2.5 ms). Conv layers take 80% of the encoder's
time (≈ 67 GFLOP/s on one core), GELU 17%; ``torch.median`` would have cost a further
≈ 25% (numpy selection is used instead); channels-last makes the speed independent of the
chunk size; TorchScript freezing did not help. One batch of 25,600 frames without
chunking runs 1.5× slower (out of cache).

Default: encoder 16-32-32-64 with strides 2,1,2,1 (20×20 → 10×10 → 5×5, then dense
5×5×64 → 128): full 10×10 resolution for two layers keeps the sub-pixel position and the
line-to-line blur that D is read from (the faster 2,2,x,x variants keep it for one layer). Temporal
ResNet of 32 channels (the cost grows with width², 64 would cost 2.5×), stride 2 in blocks
3 and 5 (400 → 200 → 100 steps): blocks 1–2 see single-frame steps (the low-D signal) at
full rate and the head stays near 1 ms/window; its input conv (128 → 32, kernel 7) is
about a third of the head's cost.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dle_stream.errors import DleStreamError
from dle_stream.likelihood import DGrid, TrainingPrior, profile_problem, warp_function

#: Kinds of window output (see :attr:`ModelConfig.output`).
OUTPUTS = ("d_grid", "gaussian")

#: 1.4826 · MAD is the standard deviation of Gaussian noise.
MAD_TO_STD = 1.4826
#: A noise scale below this fraction of the frame's magnitude counts as zero.
RELATIVE_SCALE_EPS = 1e-6


def normalize_frames(frames: Tensor) -> Tensor:
    """Normalise each frame (last two axes) to zero median and unit robust noise scale.

    ``(frame − median) / s`` with ``s = 1.4826 · MAD`` (the Gaussian noise std for a
    mostly-background frame); when MAD is zero (e.g. more than half the pixels equal),
    ``s`` falls back to the frame's std, and to 1 for a constant frame. "Zero" is
    relative: below ``RELATIVE_SCALE_EPS`` × the frame's largest absolute value.

    Any positive gain ``a`` and offset ``b`` give the same result for ``frames·a + b``
    (up to float rounding), so the estimates do not depend on detector gain or offset.
    Each frame is normalised alone, because a stream encodes each tile-frame once.

    Args:
        frames: [..., H, W] intensities (any unit, any offset).

    Returns:
        float tensor of the same shape, in units of the frame's noise scale.
    """
    if frames.dim() < 2:
        raise DleStreamError(f"normalize_frames: expected [..., H, W] frames, got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        frames = frames.float()
    shape = frames.shape
    flat = frames.reshape(-1, shape[-2] * shape[-1])
    median = _lower_median(flat)
    centred = flat - median
    mad = _lower_median(centred.abs())
    scale = MAD_TO_STD * mad
    tiny = RELATIVE_SCALE_EPS * flat.abs().amax(dim=-1, keepdim=True)
    if bool((scale <= tiny).any()):
        std = flat.std(dim=-1, keepdim=True, unbiased=False)
        scale = torch.where(scale > tiny, scale, std)
        scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
    return (centred / scale).reshape(shape)


def _lower_median(x: Tensor) -> Tensor:
    """Lower median along the last axis, [N, P] → [N, 1] (as :func:`torch.median`).

    On the CPU this selects with :func:`numpy.partition` (≈ 4× faster than
    ``torch.median`` here); the selected element, hence the result, is the same.
    """
    if x.device.type == "cpu" and not x.requires_grad and x.dtype in (torch.float32, torch.float64):
        k = (x.shape[-1] - 1) // 2
        values = np.partition(x.detach().numpy(), k, axis=-1)[..., k : k + 1]
        return torch.from_numpy(np.ascontiguousarray(values))
    return x.median(dim=-1, keepdim=True).values


@dataclass
class ModelConfig:
    """Shape of a :class:`DLEModel`; stored in a model card as ``architecture``.

    Attributes:
        tile_height, tile_width: tile size in pixels (frames are [tile_height, tile_width]).
        latent: size of the per-frame latent vector.
        encoder_channels: output channels of the four 3×3 conv layers of the encoder
            (the fifth layer is dense, to ``latent``).
        encoder_strides: spatial stride of each of those four layers.
        temporal_channels: width of the temporal ResNet (its cost grows with width²).
        temporal_kernel: kernel size (time steps) of every temporal conv.
        temporal_strides: time stride of each residual block (its length is the
            number of blocks; 2 halves the time resolution).
        head_hidden: hidden width of the MLP head.
        decoder_channels: channels of the decoder's feature maps (pretraining only).
        sigma_eps: added to σ̂ (units of d_max) so the likelihood never divides by zero.
        output: what the head gives per window: "d_grid" (the log-density of p(D | window)
            at the knots of a :class:`~dle_stream.likelihood.DGrid` plus the log-mass
            beyond it: combinable, see :mod:`dle_stream.likelihood`) or "gaussian" (the
            paper's D̂ and σ̂; older packages).
        grid_intervals, grid_top: the D grid of a "d_grid" head (knot intervals on the
            operating range; top of the grid in units of d_max).
        grid_basis: the head gives this many cubic B-spline coefficients, from which the
            knot log-densities follow (smooth over a few knots; 0: one free value per knot,
            which measured jagged: ±2 nats between neighbouring knots).
        grid_temperature: the window log-likelihood is divided by it (fitted after training on
            held-out movies; < 1: the raw network was under-confident).
        grid_warp: points (D, m(D)) in units of d_max of the likelihood's calibrated D axis
            (:func:`dle_stream.likelihood.warp_log_likelihood`; empty: none), fitted after
            training on held-out movies of known D.
        grid_systematic_rel: relative systematic error of the model's D scale that adding
            windows does not average out (fitted with the warp; see
            :attr:`dle_stream.likelihood.DGrid.systematic_rel`).
        grid_smooth_knots: the window log-likelihood is smoothed over this many knots before
            the warp (:func:`dle_stream.likelihood.smooth_log_likelihood`; 0: not smoothed).
        grid_temperature_profile: points (D, factor), D in units of d_max: each window's
            temperature is ``grid_temperature`` times this profile read where the window's
            likelihood peaks (:func:`dle_stream.likelihood.window_temperatures`; empty: 1).
        grid_combine_exponent: β: K windows added carry the information of K^(1 − β) exact
            ones (:attr:`dle_stream.likelihood.DGrid.combine_exponent`; 0: exact).
        grid_posterior_profile: points (D, factor), D in units of d_max: any sum of window
            log-likelihoods (one window too) is divided by this profile read where the sum
            peaks, before its posterior is read
            (:attr:`dle_stream.likelihood.DGrid.posterior_profile`; empty: 1).
        grid_lr_scale: how many times χ² the likelihood-ratio statistic of homogeneous parts
            was measured (:attr:`dle_stream.likelihood.DGrid.lr_scale`; 1: taken as exact).
        grid_prior_in_range, grid_prior_beyond: the training prior of a "d_grid" head,
            divided out to turn its output into a likelihood: these shares of the training
            movies had D uniform on [0, d_max] and on [d_max, top·d_max]; the rest on
            [top·d_max, 2·top·d_max] (the overflow entry).
        grid_prior_exact: the head adds the training prior's log-density (a step at d_max)
            to what its network gives, so that the network's smooth output is the window's
            log-likelihood itself. Without it (packages before 2026-11-30) the smooth output
            had to follow the prior's step, which no smooth curve can: dividing the prior
            out then left a dip just below d_max and a bump above it (measured on
            beads-high: the average log-likelihood of D = 0.5·d_max peaked at 1.33·d_max).
    """

    tile_height: int = 20
    tile_width: int = 20
    latent: int = 128
    encoder_channels: tuple[int, ...] = (16, 32, 32, 64)
    encoder_strides: tuple[int, ...] = (2, 1, 2, 1)
    temporal_channels: int = 32
    temporal_kernel: int = 7
    temporal_strides: tuple[int, ...] = (1, 1, 2, 1, 2, 1, 1)
    head_hidden: int = 64
    decoder_channels: int = 32
    sigma_eps: float = 1e-3
    output: str = "d_grid"
    grid_intervals: int = 96
    grid_top: float = 2.0
    grid_prior_in_range: float = 0.55
    grid_prior_beyond: float = 0.30
    grid_basis: int = 48
    grid_temperature: float = 1.0
    grid_warp: tuple[tuple[float, float], ...] = ()
    grid_systematic_rel: float = 0.0
    grid_smooth_knots: float = 0.0
    grid_temperature_profile: tuple[tuple[float, float], ...] = ()
    grid_lr_scale: float = 1.0
    grid_combine_exponent: float = 0.0
    grid_posterior_profile: tuple[tuple[float, float], ...] = ()
    grid_prior_exact: bool = True
    scan_features: int = 0

    def __post_init__(self) -> None:
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        self.encoder_strides = tuple(int(s) for s in self.encoder_strides)
        self.temporal_strides = tuple(int(s) for s in self.temporal_strides)
        self.grid_warp = tuple((float(a), float(b)) for a, b in self.grid_warp)
        self.grid_temperature_profile = tuple((float(a), float(b)) for a, b in self.grid_temperature_profile)
        self.grid_posterior_profile = tuple((float(a), float(b)) for a, b in self.grid_posterior_profile)
        problems = []
        if len(self.encoder_channels) != 4 or len(self.encoder_strides) != 4:
            problems.append("encoder_channels and encoder_strides need 4 entries each (the 5th layer is dense)")
        for name in ("tile_height", "tile_width", "latent", "temporal_channels", "head_hidden", "decoder_channels"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be ≥ 1")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            problems.append("temporal_kernel must be odd and ≥ 1")
        if any(s not in (1, 2) for s in self.temporal_strides) or not self.temporal_strides:
            problems.append("temporal_strides must be a non-empty list of 1s and 2s")
        if any(s not in (1, 2) for s in self.encoder_strides) or any(c < 1 for c in self.encoder_channels):
            problems.append("encoder strides must be 1 or 2 and channels ≥ 1")
        if not self.sigma_eps > 0:
            problems.append("sigma_eps must be > 0")
        if self.output not in OUTPUTS:
            problems.append(f"output must be one of {OUTPUTS}")
        if self.grid_intervals < 4 or not self.grid_top > 1:
            problems.append("grid_intervals must be ≥ 4 and grid_top > 1")
        if not 0.0 <= self.grid_systematic_rel < 1.0:
            problems.append("grid_systematic_rel must be in [0, 1)")
        if not (0.0 <= self.grid_smooth_knots <= 20.0):
            problems.append("grid_smooth_knots must be in [0, 20]")
        prof = self.grid_temperature_profile
        if prof and (len(prof) < 2 or any(b1 <= b0 for (b0, _), (b1, _) in zip(prof, prof[1:]))
                     or not all(f > 0 and math.isfinite(f) for _, f in prof)):
            problems.append("grid_temperature_profile needs two or more points (D increasing, factor > 0)")
        if profile_problem(self.grid_posterior_profile):
            problems.append(f"grid_posterior_profile {profile_problem(self.grid_posterior_profile)}")
        if not 0.0 <= self.grid_combine_exponent < 1.0:
            problems.append("grid_combine_exponent must be in [0, 1)")
        if not (self.grid_lr_scale > 0 and math.isfinite(self.grid_lr_scale)):
            problems.append("grid_lr_scale must be a positive number")
        if not (self.grid_temperature > 0 and math.isfinite(self.grid_temperature)):
            problems.append("grid_temperature must be a positive number")
        if self.grid_warp:
            try:
                warp_function(self.grid, self.grid_warp)
            except DleStreamError as exc:
                problems.append(str(exc))
        if self.grid_basis and not 4 <= self.grid_basis <= self.grid.knots.size:
            problems.append("grid_basis must be 0 or between 4 and the number of knots")
        if not (0 < self.grid_prior_in_range <= 1 and 0 <= self.grid_prior_beyond <= 1 - self.grid_prior_in_range):
            problems.append("grid_prior_in_range must be in (0, 1] and grid_prior_beyond in [0, 1 − in_range]")
        if self.scan_features < 0:
            problems.append("scan_features must be ≥ 0")
        if problems:
            raise DleStreamError(f"model architecture: {'; '.join(problems)}")

    @property
    def encoder_grid(self) -> tuple[int, int]:
        """(height, width) of the encoder's last conv feature map."""
        h, w = self.tile_height, self.tile_width
        for s in self.encoder_strides:
            h, w = (h - 1) // s + 1, (w - 1) // s + 1
        return h, w

    @property
    def grid(self) -> DGrid:
        """The D grid of a "d_grid" head (units of d_max)."""
        return DGrid(self.grid_intervals, self.grid_top, self.grid_systematic_rel, self.grid_lr_scale,
                     self.grid_combine_exponent,
                     self.grid_posterior_profile if profile_problem(self.grid_posterior_profile) is None else ())

    @property
    def training_prior(self) -> TrainingPrior:
        """The D prior a "d_grid" head was trained under (divided out of its output)."""
        return TrainingPrior(self.grid_prior_in_range, self.grid_prior_beyond)

    @property
    def outputs(self) -> int:
        """Numbers the head gives per window."""
        if self.output != "d_grid":
            return 2
        return (self.grid_basis or self.grid.knots.size) + 1

    @property
    def head_inputs(self) -> int:
        """Numbers per frame the head reads: the latent vector, then the scan features."""
        return self.latent + self.scan_features

    @property
    def time_reduction(self) -> int:
        """Factor by which the temporal ResNet reduces the number of time steps."""
        return math.prod(self.temporal_strides)

    @property
    def min_frames(self) -> int:
        """Shortest window (frames) the network is meant for: its time reduction × 4."""
        return 4 * self.time_reduction

    def uncalibrated(self) -> ModelConfig:
        """This configuration with every fitted calibration of the grid likelihood undone
        (temperature 1 and no profiles, no warp, smoothing, systematic error, combine exponent
        or likelihood-ratio scale): the network's raw window log-likelihoods."""
        return replace(self, grid_temperature=1.0, grid_warp=(), grid_systematic_rel=0.0, grid_smooth_knots=0.0,
                       grid_lr_scale=1.0, grid_temperature_profile=(), grid_combine_exponent=0.0,
                       grid_posterior_profile=())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "architecture") -> "ModelConfig":
        if not isinstance(data, dict):
            raise DleStreamError(f"{source}: the architecture must be a JSON object of ModelConfig fields")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DleStreamError(
                f"{source}: unknown architecture field(s) {', '.join(unknown)}; "
                f"this model needs a newer dle-stream (known: {', '.join(sorted(names))})"
            )
        if "output" not in data:  # packages written before the grid head existed
            data = {**data, "output": "gaussian"}
        if data.get("output") == "d_grid" and "grid_basis" not in data:
            data = {**data, "grid_basis": 0}
        if "grid_prior_exact" not in data:  # packages written before the head added the prior
            data = {**data, "grid_prior_exact": False}
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise DleStreamError(f"{source}: invalid architecture ({exc})") from None


class FrameEncoder(nn.Module):
    """Normalised tile-frames [N, 1, H, W] → latents [N, latent] (five conv layers, GELU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out, stride in zip(config.encoder_channels, config.encoder_strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU()]
            c_in = c_out
        gh, gw = config.encoder_grid
        # Fifth layer: a conv whose kernel covers the whole remaining map (dense).
        layers += [nn.Conv2d(c_in, config.latent, (gh, gw)), nn.Flatten(1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class FrameDecoder(nn.Module):
    """Latents [N, latent] → frames [N, H, W] (for autoencoder pretraining only)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.height, self.width = config.tile_height, config.tile_width
        self.gh, self.gw = math.ceil(self.height / 4), math.ceil(self.width / 4)
        c = config.decoder_channels
        self.c = c
        self.dense = nn.Linear(config.latent, c * self.gh * self.gw)
        self.up = nn.Sequential(
            nn.GELU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c, 1, 3, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.dense(z).reshape(-1, self.c, self.gh, self.gw)
        return self.up(x)[:, 0, : self.height, : self.width]


class ResidualBlock1d(nn.Module):
    """Two temporal convs (kernel k, BatchNorm, GELU) with a skip; optional time stride 2."""

    def __init__(self, channels: int, kernel: int, stride: int):
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(channels, channels, kernel, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.stride > 1:
            # Average pairs of time steps (ceil mode matches the conv's output length).
            x = F.avg_pool1d(x, self.stride, self.stride, ceil_mode=True)
        return F.gelu(x + y)


class TemporalResNet(nn.Module):
    """Latent sequences [B, latent, T] → features [B, C, T'] (1-D ResNet along time)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, k = config.temporal_channels, config.temporal_kernel
        self.stem = nn.Conv1d(config.latent, c, k, padding=k // 2, bias=False)
        self.stem_bn = nn.BatchNorm1d(c)
        self.blocks = nn.Sequential(*(ResidualBlock1d(c, k, s) for s in config.temporal_strides))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(F.gelu(self.stem_bn(self.stem(x))))


class ScanFiLM(nn.Module):
    """Scan features [B, F] → per-channel scale and shift of the temporal features at two
    places (after the ResNet's stem, after pooling): (γ₁, β₁, γ₂, β₂), each [B, C]; the
    last layer starts at zero, so a new family model starts as its one-scan parent."""

    def __init__(self, config: ModelConfig, hidden: int = 32):
        super().__init__()
        c = config.temporal_channels
        self.net = nn.Sequential(nn.Linear(config.scan_features, hidden), nn.GELU(), nn.Linear(hidden, 4 * c))
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()

    def forward(self, scan: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.net(scan).chunk(4, dim=1))


def finite_log_prior(cfg: ModelConfig) -> np.ndarray:
    """The training prior's log-density on a grid head's output entries, -1e4 where it is 0."""
    prior = cfg.training_prior.log_density(cfg.grid)
    return np.where(np.isfinite(prior), prior, -1e4)


def prior_output_bias(cfg: ModelConfig) -> np.ndarray:
    """The output-layer bias whose head gives the training prior (basis coefficients by least
    squares, then the overflow's log-mass): where a head without the exact prior starts."""
    prior = finite_log_prior(cfg)
    basis = cfg.grid.spline_basis(cfg.grid_basis) if cfg.grid_basis else np.eye(cfg.grid.knots.size)
    return np.concatenate([np.linalg.lstsq(basis, prior[:-1], rcond=None)[0], prior[-1:]])


class DLEModel(nn.Module):
    """The diffusion-coefficient estimator; outputs in units of the prior's d_max.

    - :meth:`encode`: frames [N, H, W] → latents [N, latent] (normalisation inside).
    - :meth:`head`: latents [B, T, latent] → (d_norm [B], sigma_norm [B]).
    - :meth:`forward`: movies [B, T, H, W] → (d_norm [B], sigma_norm [B]).
    - :meth:`autoencode`: frames → (reconstruction, normalised target), for pretraining.
    """

    grid_log_prior: Tensor  # buffer of a "d_grid" head (registered in __init__)

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        cfg = self.config
        self.encoder = FrameEncoder(cfg)
        self.decoder = FrameDecoder(cfg)
        self.temporal = TemporalResNet(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.temporal_channels, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, cfg.outputs)
        )
        self.scan_film = ScanFiLM(cfg) if cfg.scan_features else None
        self._channels_last = False
        if cfg.output == "d_grid":
            grid = cfg.grid
            basis = grid.spline_basis(cfg.grid_basis) if cfg.grid_basis else np.eye(grid.knots.size)
            self.register_buffer("grid_basis", torch.tensor(basis, dtype=torch.float32), persistent=False)
            # start from the training prior: small weights, the prior's log-density as bias (or
            # added exactly, grid_prior_exact), so that an untrained head says "no information"
            prior = finite_log_prior(cfg)
            exact = prior if cfg.grid_prior_exact else np.zeros_like(prior)
            self.register_buffer("grid_log_prior", torch.tensor(exact, dtype=torch.float32), persistent=False)
            last = self.mlp[-1]
            assert isinstance(last, nn.Linear)  # the head's output layer, built just above
            with torch.no_grad():
                last.weight.mul_(0.1)
                if cfg.grid_prior_exact:
                    last.bias.zero_()
                else:
                    last.bias.copy_(torch.as_tensor(prior_output_bias(cfg), dtype=torch.float32))

    def optimize_for_cpu_inference(self) -> "DLEModel":
        """Eval mode with a channels-last encoder (same outputs; faster on CPU). Returns self."""
        self.eval()
        self.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack this overload
        self._channels_last = True
        return self

    # ---------------------------------------------------------------- encoder
    def _check_frames(self, frames: Tensor) -> None:
        cfg = self.config
        if frames.dim() < 2 or tuple(frames.shape[-2:]) != (cfg.tile_height, cfg.tile_width):
            raise DleStreamError(
                f"frames of shape {tuple(frames.shape)} do not match the model's "
                f"{cfg.tile_height}×{cfg.tile_width} px tiles; cut tiles of that size"
            )

    def encode(self, frames: Tensor) -> Tensor:
        """Tile-frames [N, H, W] (raw intensities) → latents [N, latent]."""
        self._check_frames(frames)
        x = normalize_frames(frames.reshape(-1, *frames.shape[-2:])).unsqueeze(1)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x)

    def autoencode(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Frames [N, H, W] → (reconstruction [N, H, W], normalised frames [N, H, W])."""
        self._check_frames(frames)
        target = normalize_frames(frames.reshape(-1, *frames.shape[-2:]))
        return self.decoder(self.encoder(target.unsqueeze(1))), target

    # ------------------------------------------------------------------- head
    def head(self, latents: Tensor) -> Tensor:
        """Latent sequences [B, T, latent] → window outputs [B, outputs].

        A family model (``scan_features`` > 0) reads [B, T, latent + scan_features]: each
        frame's latent vector followed by the scan's features (the same in every frame).
        "d_grid": log-density of p(D | window) (units of d_max, up to a constant) at the
        grid's knots, then the log-mass of D beyond the grid. "gaussian": (D̂, σ̂) in units
        of d_max, both made positive with 1 + ELU.
        """
        cfg = self.config
        if latents.dim() != 3 or latents.shape[-1] != cfg.head_inputs:
            what = f"{cfg.latent} latents + {cfg.scan_features} scan features" if cfg.scan_features else cfg.latent
            raise DleStreamError(f"latents of shape {tuple(latents.shape)} are not [windows, frames, {what}]")
        if self.scan_film is None:
            features = self.temporal(latents.transpose(1, 2))
            pooled = features.mean(dim=-1)  # adaptive average pooling over time
        else:
            g1, b1, g2, b2 = self.scan_film(latents[:, 0, cfg.latent:])
            t = self.temporal
            x = t.stem_bn(t.stem(latents[..., : cfg.latent].transpose(1, 2)))
            x = F.gelu(x * (1 + g1[..., None]) + b1[..., None])
            pooled = t.blocks(x).mean(dim=-1) * (1 + g2) + b2
        out = self.mlp(pooled)
        if self.config.output == "d_grid":
            return torch.cat([out[:, :-1] @ self.grid_basis.T, out[:, -1:]], dim=1) + self.grid_log_prior
        d_norm = 1.0 + F.elu(out[:, 0])
        sigma_norm = 1.0 + F.elu(out[:, 1]) + self.config.sigma_eps
        return torch.stack([d_norm, sigma_norm], dim=1)

    def forward(self, movies: Tensor, scan: Tensor | None = None) -> Tensor:
        """Movies [B, T, H, W] → window outputs [B, outputs] (see :meth:`head`); a family
        model needs the scan features ``scan`` [B, scan_features] (or [scan_features])."""
        if movies.dim() != 4:
            raise DleStreamError(f"movies must be [B, T, H, W], got shape {tuple(movies.shape)}")
        b, t = movies.shape[:2]
        latents = self.encode(movies.reshape(b * t, *movies.shape[2:])).reshape(b, t, -1)
        return self.head(with_scan_features(latents, scan, self.config))

    def head_modules(self) -> nn.ModuleDict:
        """The modules the head stage trains, as one module: temporal ResNet, MLP and (family) scan FiLM."""
        parts: dict[str, nn.Module] = {"temporal": self.temporal, "mlp": self.mlp}
        if self.scan_film is not None:
            parts["scan_film"] = self.scan_film
        return nn.ModuleDict(parts)

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters the head stage trains (:meth:`head_modules`)."""
        return list(self.head_modules().parameters())


def with_scan_features(latents: Tensor, scan: Tensor | None, config: ModelConfig) -> Tensor:
    """Latents [B, T, latent] → the head's input: unchanged for a one-scan model, the scan
    features ``scan`` ([B, F] or [F]) appended to every frame for a family model."""
    if not config.scan_features:
        if scan is not None:
            raise DleStreamError("this model serves one scan: it takes no scan features")
        return latents
    if scan is None:
        raise DleStreamError("a family model needs the scan's features (dle_stream.scan_family)")
    scan = scan.to(device=latents.device, dtype=latents.dtype)
    if scan.dim() == 1:
        scan = scan.expand(latents.shape[0], -1)
    if tuple(scan.shape) != (latents.shape[0], config.scan_features):
        raise DleStreamError(f"scan features of shape {tuple(scan.shape)}: expected "
                             f"[{latents.shape[0]}, {config.scan_features}]")
    return torch.cat([latents, scan[:, None, :].expand(-1, latents.shape[1], -1)], dim=2)


class GridLoss(nn.Module):
    """Exact negative log-likelihood of the true D under a "d_grid" window output.

    The output's knot values are a piecewise-linear log-density on [0, top] (units of
    d_max) and its last entry the log-mass beyond ``top``; the loss is
    ``log Z − log p(D)`` with Z the total mass (trapezoid rule on the grid's fine points),
    so it is the continuous density's NLL, not a classification into bins.
    """

    # buffers (registered in __init__; nn.Module types unknown attributes as Tensor | Module)
    knots: Tensor
    interp: Tensor
    log_w: Tensor

    def __init__(self, grid: DGrid):
        super().__init__()
        self.register_buffer("knots", torch.tensor(grid.knots, dtype=torch.float32))
        self.register_buffer("interp", torch.tensor(grid.interp_matrix, dtype=torch.float32))
        self.register_buffer("log_w", torch.tensor(np.log(grid.fine_weights + 1e-30), dtype=torch.float32))
        self.top = float(grid.top)

    def log_z(self, out: Tensor) -> Tensor:
        fine = out[:, :-1] @ self.interp + self.log_w
        return torch.logsumexp(torch.cat([fine, out[:, -1:]], dim=1), dim=1)

    def log_density_at(self, out: Tensor, d_norm: Tensor) -> Tensor:
        """Unnormalised log-density at ``d_norm`` [B] (units of d_max); the overflow's log-mass beyond top."""
        k = self.knots
        x = d_norm.to(out.dtype).clamp(0, self.top)
        i = torch.clamp(torch.searchsorted(k, x, right=True) - 1, 0, k.numel() - 2)
        t = (x - k[i]) / (k[i + 1] - k[i])
        f = out[:, :-1]
        inside = torch.gather(f, 1, i[:, None])[:, 0] * (1 - t) + torch.gather(f, 1, (i + 1)[:, None])[:, 0] * t
        return torch.where(d_norm >= self.top, out[:, -1], inside)

    def forward(self, out: Tensor, d_norm: Tensor) -> Tensor:
        return (self.log_z(out) - self.log_density_at(out, d_norm)).mean()

    def combined(self, outs: Tensor, d_norm: Tensor, prior_log_density: Tensor) -> Tensor:
        """NLL of the true D after combining groups of windows of one D: ``outs`` [G, K, n]
        (each a posterior under the training prior, whose log-density ``prior_log_density`` [n]
        is divided out of all but one), ``d_norm`` [G]. The user reads this combination:
        Π_k p(D | w_k) / π(D)^(K−1) ∝ π(D) Π_k L_k(D)."""
        k = outs.shape[1]
        return self.forward(outs.sum(dim=1) - (k - 1) * prior_log_density, d_norm)


def gaussian_nll(d_hat: Tensor, sigma_hat: Tensor, d_true: Tensor) -> Tensor:
    """The paper's Eq. 2: mean over the batch of (D̂ − D)² / (2σ̂²) + log σ̂ (any one unit)."""
    return ((d_hat - d_true) ** 2 / (2 * sigma_hat**2) + torch.log(sigma_hat)).mean()
