"""The network, model packages and the inference API (small random-weight models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dle_stream.errors import DleStreamError
from dle_stream.estimator import DiffusionEstimator
from dle_stream.model import DLEModel, ModelConfig, gaussian_nll, normalize_frames
from dle_stream.model_package import (
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    list_models,
    load_card,
    load_model_package,
    model_search_paths,
    resolve_model,
    save_model_package,
)
from dle_stream.timing import ScanTiming

SMALL = ModelConfig(
    latent=16, encoder_channels=(4, 8, 8, 8), temporal_channels=16, head_hidden=16, decoder_channels=8,
)
D_MAX = 1.5


def make_card(config: ModelConfig = SMALL, **changes) -> ModelCard:
    """A minimal valid card for a model of ``config`` (reference timing, D prior 0–1.5 µm²/s)."""
    timing = ScanTiming.reference()
    fields = dict(
        name="tiny", tile_height=config.tile_height, tile_width=config.tile_width, window_frames=400,
        d_min_um2_s=0.0, d_max_um2_s=D_MAX, scan_timing=timing.to_dict(), pixel_size_um=timing.pixel_size_um,
        architecture=config.to_dict(),
    )
    fields.update(changes)
    return ModelCard(**fields)


def make_model(config: ModelConfig = SMALL, seed: int = 0) -> DLEModel:
    torch.manual_seed(seed)
    model = DLEModel(config)
    # Random BatchNorm statistics, so that the round trip checks them too.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return save_model_package(tmp_path / "tiny", make_model(), make_card())


def movie(frames: int = 200, batch: int | None = None, seed: int = 1) -> np.ndarray:
    """Poisson background with a few bright moving spots, [T, 20, 20] or [B, T, 20, 20]."""
    rng = np.random.default_rng(seed)
    shape = (frames, 20, 20) if batch is None else (batch, frames, 20, 20)
    lam = np.full(shape, 50.0)
    yy, xx = np.mgrid[:20, :20]
    pos = rng.uniform(2, 18, size=shape[:-2] + (2,))
    pos = np.clip(pos + np.cumsum(rng.normal(0, 0.3, size=pos.shape), axis=-2), 0, 19)
    lam += 300 * np.exp(-((yy - pos[..., 0, None, None]) ** 2 + (xx - pos[..., 1, None, None]) ** 2) / 2)
    return rng.poisson(lam).astype(np.float32)


# ------------------------------------------------------------------ network
def test_normalize_frames_gain_offset_invariant():
    frames = torch.from_numpy(movie(10))
    a = normalize_frames(frames)
    b = normalize_frames(frames * 3 + 500)
    assert torch.allclose(a, b, atol=1e-4)
    med = a.reshape(10, -1).median(dim=-1).values
    assert torch.allclose(med, torch.zeros(10), atol=1e-6)


def test_normalize_frames_degenerate_frames():
    constant = torch.full((2, 20, 20), 7.0)
    assert torch.equal(normalize_frames(constant), torch.zeros(2, 20, 20))
    sparse = torch.zeros(1, 20, 20)
    sparse[0, 3, 4] = 10.0  # MAD = 0: falls back to the std
    out = normalize_frames(sparse)
    assert torch.isfinite(out).all() and out[0, 3, 4] > 1
    assert torch.allclose(normalize_frames(sparse * 4 + 2), out)
    uint = torch.randint(0, 4096, (3, 20, 20), dtype=torch.int32)
    assert normalize_frames(uint).dtype == torch.float32


def test_cpu_median_matches_torch():
    x = torch.randn(50, 400)
    from dle_stream.model import _lower_median

    assert torch.equal(_lower_median(x), x.median(dim=-1, keepdim=True).values)


def test_shapes_and_positive_outputs():
    model = make_model()
    frames = torch.from_numpy(movie(32, batch=2))
    out = model(frames)
    assert out.shape == (2, SMALL.grid.n) and torch.isfinite(out).all()
    gaussian = make_model(ModelConfig(**{**SMALL.to_dict(), "output": "gaussian"}))
    d, s = gaussian(frames).T
    assert d.shape == s.shape == (2,)
    assert (d > 0).all() and (s > 0).all()
    recon, target = model.autoencode(frames[0])
    assert recon.shape == target.shape == (32, 20, 20)
    with pytest.raises(DleStreamError, match="20×20"):
        model.encode(torch.zeros(5, 16, 16))


def test_default_config_runs_and_is_json_able():
    config = ModelConfig()
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = DLEModel(config).eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(movie(64, batch=1)))
    assert out.shape == (1, config.grid.n) and torch.isfinite(out).all()
    old = {k: v for k, v in config.to_dict().items() if not k.startswith(("output", "grid"))}
    assert ModelConfig.from_dict(old).output == "gaussian"  # packages from before the grid head
    with pytest.raises(DleStreamError, match="unknown architecture"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_gaussian_nll_is_eq2():
    d_hat, sigma, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0]), torch.tensor([0.0, 2.0])
    expected = ((1.0 / (2 * 0.25) + math.log(0.5)) + (0.0 + math.log(2.0))) / 2
    assert gaussian_nll(d_hat, sigma, d).item() == pytest.approx(expected)


# ------------------------------------------------------------------ packages
def test_round_trip_identical_outputs(tmp_path: Path):
    model = make_model(seed=3)
    folder = save_model_package(tmp_path / "pkg", model, make_card())
    loaded, card = load_model_package(folder)
    assert card.weights_sha256 and card.architecture == SMALL.to_dict()
    assert card.schema_version == 1 and card.created and card.software_version
    x = torch.from_numpy(movie(40, batch=2))
    with torch.inference_mode():
        a, b = model(x), loaded(x)
    assert torch.equal(a, b)
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, WEIGHTS_FILE]  # no temp files left


def test_a_save_killed_between_its_two_files_leaves_the_old_package_loadable(tmp_path: Path, monkeypatch):
    """Weights and card are two files; a kill after the new weights land but before the new
    card does must leave a package that loads as the old one, not one refused for a sha256
    mismatch (the training's best weights so far, lost)."""
    import dle_stream.model_package as package_module

    folder = save_model_package(tmp_path / "pkg", make_model(seed=1), make_card())
    old_model, old_card = load_model_package(folder)
    x = torch.from_numpy(movie(40, batch=2))
    with torch.inference_mode():
        old_output = old_model(x)
    real_write = package_module.write_atomic

    def killed_before_the_card(path, write):
        if Path(path).name == CARD_FILE:
            raise KeyboardInterrupt  # stands for a kill: no clean-up of the save's own runs after this
        real_write(path, write)

    monkeypatch.setattr(package_module, "write_atomic", killed_before_the_card)
    for seed in (2, 3):  # killed twice in a row: the second save starts from the first one's leftovers
        with pytest.raises(KeyboardInterrupt):
            save_model_package(folder, make_model(seed=seed), make_card())
    monkeypatch.undo()

    loaded, card = load_model_package(folder)
    assert card.weights_sha256 == old_card.weights_sha256
    with torch.inference_mode():
        assert torch.equal(loaded(x), old_output)
    # the next save completes, and the folder holds the package's two files only
    save_model_package(folder, make_model(seed=2), make_card())
    new_model, new_card = load_model_package(folder)
    assert new_card.weights_sha256 != old_card.weights_sha256
    with torch.inference_mode():
        assert not torch.equal(new_model(x), old_output)
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, WEIGHTS_FILE]


def test_package_files_are_readable_like_any_other_file(tmp_path: Path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = save_model_package(tmp_path / "pkg", make_model(), make_card())
    finally:
        os.umask(old)
    for name in (CARD_FILE, WEIGHTS_FILE):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644  # not 0600 (a private temp file)


def _edit_card(folder: Path, **changes) -> None:
    path = folder / CARD_FILE
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_missing_card_field_is_named(package: Path):
    _edit_card(package, d_max_um2_s=None, window_frames=None)
    with pytest.raises(DleStreamError, match="d_max_um2_s") as err:
        load_model_package(package)
    assert "window_frames" in str(err.value) and "card.json" in str(err.value)


def test_unknown_schema_version(package: Path):
    _edit_card(package, schema_version=99)
    with pytest.raises(DleStreamError, match="schema_version 99"):
        load_model_package(package)


def test_wrong_weights_hash(package: Path):
    _edit_card(package, weights_sha256="0" * 64)
    with pytest.raises(DleStreamError, match="sha256"):
        load_model_package(package)


def test_pickled_weights_are_refused(package: Path):
    import hashlib

    weights = package / WEIGHTS_FILE
    torch.save(make_model().state_dict(), weights)  # a pickle, even with a matching hash
    _edit_card(package, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(DleStreamError, match="not a safetensors file"):
        load_model_package(package)


def test_other_package_problems(tmp_path: Path, package: Path):
    with pytest.raises(DleStreamError, match="no such model folder"):
        load_model_package(tmp_path / "nowhere")
    (package / CARD_FILE).write_text("{not json")
    with pytest.raises(DleStreamError, match="not valid JSON"):
        load_model_package(package)
    other = save_model_package(tmp_path / "other", make_model(), make_card())
    (other / WEIGHTS_FILE).unlink()
    with pytest.raises(DleStreamError, match="weights.safetensors: missing"):
        load_model_package(other)
    # weights of another architecture, with a card that claims this one and a matching hash
    wide = ModelConfig(**{**SMALL.to_dict(), "temporal_channels": 8})
    third = save_model_package(tmp_path / "third", make_model(wide), make_card(wide))
    sha = load_card(third).weights_sha256
    _edit_card(third, architecture=SMALL.to_dict(), weights_sha256=sha)
    with pytest.raises(DleStreamError, match="do not fit the card's architecture"):
        load_model_package(third)


def test_search_paths_resolve_and_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    base = tmp_path / "models"
    save_model_package(base / "tiny-low", make_model(), make_card(name="tiny-low"))
    monkeypatch.setenv("DLE_STREAM_MODELS", str(base))
    assert model_search_paths()[0] == base
    assert resolve_model("tiny-low") == base / "tiny-low"
    assert resolve_model(base / "tiny-low") == base / "tiny-low"
    assert any(card.name == "tiny-low" for _, card in list_models())
    with pytest.raises(DleStreamError, match="tiny-low") as err:
        resolve_model("no-such-model")
    assert "available" in str(err.value)


# ----------------------------------------------------------------- estimator
def test_estimate_gain_offset_invariant(package: Path):
    est = DiffusionEstimator.load(package)
    timing = ScanTiming.reference()
    m = movie(200)
    d1, s1 = est.estimate(m, timing)
    d2, s2 = est.estimate(m * 3 + 500, timing)
    assert d2 == pytest.approx(d1, rel=0.01) and s2 == pytest.approx(s1, rel=0.01)


@pytest.mark.parametrize("frames", [200, 1000])
def test_other_window_lengths(package: Path, frames: int):
    est = DiffusionEstimator.load(package)
    d, s = est.estimate(movie(frames, batch=2), ScanTiming.reference())
    assert d.shape == s.shape == (2,)
    assert np.isfinite(d).all() and (d > 0).all() and (s > 0).all()


def test_streaming_path_equals_estimate(package: Path):
    est = DiffusionEstimator.load(package)
    batch = movie(120, batch=3)
    d, s = est.estimate(batch, ScanTiming.reference())
    latents = est.encode(batch.reshape(-1, 20, 20))
    assert latents.shape == (360, SMALL.latent) and latents.dtype == np.float32
    # frames encoded one at a time (as in a stream) give the same latents
    assert np.allclose(est.encode(batch[0, :5]), latents[:5], atol=1e-5)
    d2, s2 = est.estimate_latents(latents.reshape(3, 120, -1))
    assert np.allclose(d, d2, rtol=1e-5) and np.allclose(s, s2, rtol=1e-5)
    single = est.estimate(batch[1], ScanTiming.reference())
    assert isinstance(single[0], float) and single[0] == pytest.approx(d[1], rel=1e-5)
    assert np.all(d <= D_MAX * 10)


def test_timing_scale(package: Path):
    est = DiffusionEstimator.load(package)
    timing = ScanTiming.reference()
    m = movie(100)
    d1, s1 = est.estimate(m, timing)
    comparison = est.timing_check(timing.scaled(2.0))
    assert comparison.compatible and comparison.d_scale == pytest.approx(0.5)
    d2, s2 = est.estimate(m, timing.scaled(2.0))
    assert d2 == pytest.approx(d1 / 2, rel=1e-6) and s2 == pytest.approx(s1 / 2, rel=1e-6)
    lat = est.encode(m)[None]
    assert est.estimate_latents(lat, timing_scale=2.0)[0][0] == pytest.approx(d1 / 2, rel=1e-5)


def test_incompatible_timing_points_to_training(package: Path):
    est = DiffusionEstimator.load(package)
    t = ScanTiming.reference()
    other = ScanTiming(t.pixel_size_um, t.dwell_us, t.line_period_us * 2, t.frame_period_us * 2, 20, 20)
    with pytest.raises(DleStreamError, match="dle-stream train --like") as err:
        est.estimate(movie(100), other)
    assert "line period" in str(err.value)


def test_wrong_tile_size_and_short_window(package: Path):
    est = DiffusionEstimator.load(package)
    with pytest.raises(DleStreamError, match="16×16 px"):
        est.estimate(np.zeros((100, 16, 16)), ScanTiming.reference())
    with pytest.raises(DleStreamError, match="too short"):
        est.estimate(movie(4), ScanTiming.reference())
