"""Fixtures shared by the test modules, and the ``slow`` marker.

Fixtures:

- ``small_model``: a tiny valid model package (reference timing, untrained weights,
  40-frame windows);
- ``write_movie``: writes a recording of Poisson noise with the reference scan's line
  and frame period for its frame size;
- ``cli``: runs ``dle-stream`` in-process and checks the one-line error of a refusal.

``slow``: the tests in :data:`SLOW_TESTS` (each took 30 s or more on a loaded 2-core
machine, measured with ``pytest --durations=0`` per module on 2026-11-29) get the marker,
so ``pytest -m "not slow"`` gives a quick run while ``pytest -q`` (the README's command)
still runs everything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dle_stream import ScanTiming

#: Modules whose every test is slow, and single slow tests ("module.py::test_name"), with
#: their time on the loaded 2-core machine.
SLOW_TESTS: tuple[str, ...] = (
    "test_trainer.py",  # trains models end to end: over 25 min for the module
    "test_kill.py::test_live_demo_killed_at_random_moments_keeps_every_reported_window",  # 128 s
    "test_kill.py::test_replay_killed_at_random_moments_keeps_every_reported_window",  # 20 killed replays, > 120 s
    "test_calibration.py::test_log_score_prefers_the_temperature_that_makes_a_too_wide_likelihood_right",  # 48 s
    "test_bench.py::test_bench_runs_end_to_end_on_a_tiny_suite",  # 37 s
    "test_training_prior.py::test_a_share_of_movies_has_a_steady_density",  # 30 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        module = item.path.name
        name = f"{module}::{item.originalname}" if isinstance(item, pytest.Function) else item.nodeid
        if module in SLOW_TESTS or name in SLOW_TESTS:
            item.add_marker(slow)


def make_small_model(folder):
    """Write a tiny but valid model package (reference timing, untrained weights, 40-frame windows) to ``folder``."""
    from dle_stream.model import DLEModel, ModelConfig
    from dle_stream.model_package import ModelCard, save_model_package

    cfg = ModelConfig(temporal_channels=16, head_hidden=16)
    timing = ScanTiming.reference()
    card = ModelCard(name="tiny", tile_height=20, tile_width=20, window_frames=40, d_min_um2_s=0.0,
                     d_max_um2_s=1.5, scan_timing=timing.to_dict(), pixel_size_um=timing.pixel_size_um,
                     architecture=cfg.to_dict())
    save_model_package(folder, DLEModel(cfg), card)
    return folder


@pytest.fixture()
def small_model(tmp_path_factory):
    """A tiny but valid model package with the reference timing (weights untrained), 40-frame windows."""
    return make_small_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture()
def write_movie(tmp_path) -> Callable[..., Path]:
    """``write_movie(name="rec.tif", frames=60, height=40, width=40, seed=0)``: a uint16
    recording of Poisson noise (100 photons/px) in ``tmp_path``, its metadata holding the
    reference scan's pixel size, dwell, line and frame period for that frame size."""
    from dle_stream.recording import write_recording

    def write(name: str = "rec.tif", frames: int = 60, height: int = 40, width: int = 40, seed: int = 0) -> Path:
        timing = ScanTiming(**{**ScanTiming.reference().to_dict(), "width_px": width, "height_px": height})
        movie = np.random.default_rng(seed).poisson(100, (frames, height, width)).astype(np.uint16)
        return write_recording(tmp_path / name, movie, timing)

    return write


class Cli:
    """``dle-stream`` in-process (typer's runner)."""

    def __init__(self) -> None:
        from typer.testing import CliRunner

        from dle_stream.cli import app

        self.app, self.runner = app, CliRunner()

    def __call__(self, *args: str):
        """Run ``dle-stream ARGS``; the click ``Result`` (exit_code, output)."""
        return self.runner.invoke(self.app, [str(a) for a in args])

    def error(self, *args: str) -> str:
        """Run a command that must be refused: exit status 2, no traceback; its output on one line."""
        result = self(*args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        return " ".join(result.output.split())


@pytest.fixture()
def cli() -> Cli:
    """Runs ``dle-stream`` in-process: ``cli("replay", path)``; ``cli.error(...)`` for a refusal."""
    return Cli()
