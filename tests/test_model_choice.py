"""Which model a new scan's training starts from (issue 16 item 2): the nearest available
model with the same D range, unless told --from MODEL or --scratch."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dle_stream.model_choice import scan_distance, warm_start_parent
from dle_stream.model_package import ModelCard
from dle_stream.timing import ScanTiming

REF = ScanTiming.reference()


def card(name: str, d_max: float, timing: ScanTiming = REF, d_min: float = 0.0) -> ModelCard:
    return ModelCard(name=name, tile_height=20, tile_width=20, window_frames=40, d_min_um2_s=d_min,
                     d_max_um2_s=d_max, scan_timing=timing.to_dict(), pixel_size_um=timing.pixel_size_um,
                     architecture={})


def models(*cards: ModelCard):
    return [(f"/models/{c.name}", c) for c in cards]


SHIPPED = models(card("brain-qd-low", 1.5), card("beads-high", 50.0))
#: 128×128 px at 2 µs dwell, line 320 µs, frame 128 lines: a scan no shipped model serves
NEW_SCAN = ScanTiming(0.15, 2.0, 320.0, 128 * 320.0, 128, 128)


@pytest.mark.parametrize(("d_max", "expected"), [(1.5, "brain-qd-low"), (50.0, "beads-high"),
                                                  (1.6, "brain-qd-low"), (45.0, "beads-high")])
def test_the_parent_has_the_wanted_d_range(d_max, expected):
    """Both shipped models share one scan: the D range decides (the output layer's grid is in units of d_max)."""
    dist, folder, chosen = warm_start_parent(NEW_SCAN, 0.0, d_max, SHIPPED)
    assert chosen.name == expected and str(folder).endswith(expected)
    assert dist == pytest.approx(scan_distance(REF, NEW_SCAN)) and dist > 1


def test_among_models_of_the_range_the_nearest_scan_wins():
    near = replace(REF, line_period_us=2 * REF.line_period_us, frame_period_us=2 * REF.frame_period_us)
    available = SHIPPED + models(card("lab-low", 1.5, near), card("lab-high", 50.0, NEW_SCAN))
    slow_scan = replace(REF, line_period_us=2.1 * REF.line_period_us, frame_period_us=2.1 * REF.frame_period_us)
    assert warm_start_parent(slow_scan, 0.0, 1.5, available)[2].name == "lab-low"
    # a model of exactly this scan but another D range does not beat one of the wanted range
    assert warm_start_parent(NEW_SCAN, 0.0, 1.5, available)[2].name == "brain-qd-low"
    assert warm_start_parent(NEW_SCAN, 0.0, 50.0, available)[2].name == "lab-high"


def test_no_model_of_the_range_takes_the_nearest_range_and_scan():
    dist, _, chosen = warm_start_parent(NEW_SCAN, 0.0, 10.0, SHIPPED)
    assert chosen.name == "beads-high"  # |log(50/10)| = 1.61 < |log(1.5/10)| = 1.90, the scans are alike
    assert dist == pytest.approx(scan_distance(REF, NEW_SCAN))


def test_nothing_available_gives_none():
    assert warm_start_parent(NEW_SCAN, 0.0, 1.5, []) is None


# ------------------------------------------------------------------------ the CLI
class Stop(Exception):
    """Raised by the stand-in trainer: the test needs the configuration, not a training."""


@pytest.fixture()
def train_config(monkeypatch, cli, tmp_path):
    """``train_config(*args)``: run ``dle-stream train ARGS`` up to the trainer; (its TrainConfig, output)."""
    import dle_stream.training.trainer as trainer

    seen = {}

    def fake(cfg, **kwargs):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(trainer, "train", fake)

    def run(*args: str):
        result = cli("train", "--out", str(tmp_path / "m"), "--steps", "1", *args)
        assert isinstance(result.exception, Stop), result.output
        return seen["cfg"], " ".join(result.output.split())

    return run


#: a scan outside the shipped family models' box (dwell 20 µs, frames of 410 ms), so that the
#: nearest one-scan model is the parent
NEW_SCAN_FLAGS = ("--dwell-us", "20", "--line-period-us", "3200", "--frame-period-us", "409600")
#: a scan inside the shipped family models' box (128×128 px at 2 µs)
IN_BOX_FLAGS = ("--dwell-us", "2", "--line-period-us", "320", "--frame-period-us", "40960")


def test_a_new_scan_inside_the_family_box_starts_from_the_family_model_and_says_so(train_config):
    cfg, out = train_config(*IN_BOX_FLAGS)
    assert cfg.warm_from.name == "family-low" and cfg.scan_family is None  # a one-scan model, from the family
    assert cfg.architecture.scan_features == 0
    assert "warm start from family-low, a family model whose box holds this scan" in out
    assert "replay" in out and "without training" in out
    cfg, out = train_config("--preset", "high", *IN_BOX_FLAGS)
    assert cfg.warm_from.name == "family-high" and cfg.priors.d_max_um2_s == 50.0


def test_train_for_a_new_scan_starts_from_the_nearest_model_and_says_so(train_config):
    cfg, out = train_config(*NEW_SCAN_FLAGS)
    assert cfg.warm_from is not None and cfg.warm_from.name == "brain-qd-low"
    assert cfg.priors.d_max_um2_s == 1.5
    assert "warm start from brain-qd-low, the nearest available model (the same D range" in out
    assert "--scratch" in out
    cfg, out = train_config("--preset", "high", *NEW_SCAN_FLAGS)
    assert cfg.warm_from.name == "beads-high" and cfg.priors.d_max_um2_s == 50.0
    assert "warm start from beads-high" in out


def test_train_from_the_recording_starts_from_the_nearest_model(train_config, write_movie):
    cfg, out = train_config("--like", str(write_movie(height=40, width=40)))
    assert cfg.warm_from.name == "brain-qd-low" and "warm start from brain-qd-low" in out


def test_d_max_given_keeps_its_range_and_chooses_by_it(train_config):
    cfg, _ = train_config("--d-max", "40", *NEW_SCAN_FLAGS)
    assert cfg.warm_from.name == "beads-high" and cfg.priors.d_max_um2_s == 40.0


def test_from_and_scratch(train_config, small_model):
    cfg, out = train_config("--from", str(small_model), *NEW_SCAN_FLAGS)
    assert cfg.warm_from == small_model and "nearest available" not in out
    cfg, out = train_config("--scratch", *NEW_SCAN_FLAGS)
    assert cfg.warm_from is None and "warm start" not in out


def test_the_paper_scan_without_timing_trains_from_scratch(train_config):
    """Only a scan of the user's own (--like, timing flags, --timing) starts from a model: the
    preset alone reproduces the shipped models' training."""
    cfg, _ = train_config("--preset", "low")
    assert cfg.warm_from is None


def test_scratch_with_from_is_refused(cli, tmp_path, small_model):
    out = cli.error("train", "--out", str(tmp_path / "m"), "--steps", "1", "--scratch", "--from", str(small_model))
    assert "--scratch" in out
