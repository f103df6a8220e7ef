"""End to end with the shipped `brain-qd-low` model: a replay of a two-region recording
recovers both D's in the right order, and a live run through a real pymmcore-plus core
with the simulated two-photon camera logs the expected windows with D near the truth."""

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from dle_stream.cli import app
from dle_stream.model_package import list_models
from dle_stream.session import StreamOptions, demo_timing, replay, run_live
from dle_stream.training.priors import get_preset
from dle_stream.training.recording_sim import simulate_recording
from dle_stream.zarr_log import open_log

pytestmark = pytest.mark.skipif(
    not any(card.name == "brain-qd-low" for _, card in list_models()), reason="shipped model brain-qd-low missing"
)

LEFT, RIGHT = 0.25, 1.25


@pytest.fixture(scope="module")
def two_region_recording(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    timing = demo_timing("brain-qd-low", 40, 120)
    rec = simulate_recording(folder / "two.tif", get_preset("low"), frames=800, height=40, width=120, timing=timing,
                             d_spec=f"{LEFT},{RIGHT}", seed=5)
    return rec.path


def test_replay_recovers_two_regions_in_order(two_region_recording, tmp_path):
    opts = StreamOptions(model="brain-qd-low", roi=["left=0,0,60,40", "right=60,0,60,40"], hop=100,
                         log=tmp_path / "two.zarr", dashboard="quiet")
    result = replay(two_region_recording, opts)
    names = [r.name for r in result.layout.regions]
    left, right = result.region_d[names.index("left")], result.region_d[names.index("right")]
    s_left, s_right = result.region_sigma[names.index("left")], result.region_sigma[names.index("right")]
    assert math.isfinite(left) and math.isfinite(right)
    # right order, separated by more than 0.3 µm²/s and by more than twice their combined σ
    assert right - left > max(0.3, 2 * math.hypot(s_left, s_right))
    assert left == pytest.approx(LEFT, abs=0.25)
    assert right == pytest.approx(RIGHT, abs=0.4)
    view = open_log(tmp_path / "two.zarr")
    assert view.n_windows == (800 - 400) // 100 + 1 and view.n_frames == 800
    assert np.isfinite(np.asarray(view.d)).all()


def test_live_demo_through_micro_manager_logs_windows_near_the_truth(tmp_path):
    opts = StreamOptions(model="brain-qd-low", roi=["left=0,0,60,40", "right=60,0,60,40"], window=200, hop=100,
                         log=tmp_path / "live.zarr", dashboard="quiet")
    result = run_live(opts, demo=True, frames=600, height=40, width=120, d_spec=f"{LEFT},{RIGHT}", seed=3,
                      realtime=False)
    view = open_log(tmp_path / "live.zarr")
    assert view.n_frames == 600
    assert result.stats.gaps == 0
    # windows end every 100 frames from frame 200: up to 5, fewer only if some were skipped (counted)
    assert view.n_windows + result.stats.windows_skipped == 5 and view.n_windows >= 2
    np.testing.assert_array_equal(np.asarray(view.image_number), np.arange(600))
    names = [r.name for r in result.layout.regions]
    left, right = result.region_d[names.index("left")], result.region_d[names.index("right")]
    assert right > left
    assert left == pytest.approx(LEFT, abs=0.35) and right == pytest.approx(RIGHT, abs=0.6)


def test_demo_command_prints_estimates_next_to_the_truth(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--frames", "450", "--no-dashboard"])
    assert result.exit_code == 0, result.output
    assert "left: D = " in result.output and "(true 0.3)" in result.output
    assert "right: D = " in result.output and "(true 1.2)" in result.output
    assert (tmp_path / "demo.zarr").is_dir()


def test_intervals_hold_the_truth_and_a_mixed_roi_is_reported_heterogeneous(two_region_recording, tmp_path):
    """With the shipped model: each half's combined 95 % interval holds its true D, and an
    ROI spanning both halves is flagged (tiles disagree) and shown as a range, not one D."""
    opts = StreamOptions(model="brain-qd-low", roi=["left=0,0,60,40", "right=60,0,60,40", "both=0,0,120,40"],
                         hop=100, dashboard="quiet")
    result = replay(two_region_recording, opts)
    c = result.combination
    names = [r.name for r in result.layout.regions]
    for name, truth in (("left", LEFT), ("right", RIGHT)):
        i = names.index(name)
        assert c.region.lo95[i] <= truth <= c.region.hi95[i], (name, c.region.lo95[i], c.region.hi95[i])
        assert not c.region_disagree[i] and not c.region.above_range[i]
    both = names.index("both")
    assert c.region_disagree[both]
    lo, hi = c.region_tile_range[both]
    assert lo < 0.6 < 0.9 < hi
    from dle_stream import report

    text = report.estimate_text(c.region, both, spread=c.region_spread[both])
    assert text.startswith("tiles disagree:") and "±" not in text
