"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from dle_stream import ScanTiming


@pytest.fixture()
def small_model(tmp_path_factory):
    """A tiny but valid model package with the reference timing (weights untrained), 40-frame windows."""
    from dle_stream.model import DLEModel, ModelConfig
    from dle_stream.model_package import ModelCard, save_model_package

    folder = tmp_path_factory.mktemp("m") / "tiny"
    cfg = ModelConfig(temporal_channels=16, head_hidden=16)
    timing = ScanTiming.reference()
    card = ModelCard(name="tiny", tile_height=20, tile_width=20, window_frames=40, d_min_um2_s=0.0,
                     d_max_um2_s=1.5, scan_timing=timing.to_dict(), pixel_size_um=timing.pixel_size_um,
                     architecture=cfg.to_dict())
    save_model_package(folder, DLEModel(cfg), card)
    return folder
