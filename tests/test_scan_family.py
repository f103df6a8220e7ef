"""A model for a family of scans (issue 16 item 3): the box, the scan features, the
conditioned network, its package, and how replay picks it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dle_stream import ScanTiming
from dle_stream.errors import DleStreamError
from dle_stream.model import DLEModel, ModelConfig, with_scan_features
from dle_stream.scan_family import DEFAULT_FAMILY, REFERENCE_SCANS, SCAN_FEATURES, ScanFamily


def _family_package(folder: Path, name: str = "fam", d_max: float = 1.5, family: ScanFamily = DEFAULT_FAMILY,
                    seed: int = 0) -> Path:
    """A tiny untrained family package (40-frame windows)."""
    from dle_stream.model_package import ModelCard, save_model_package

    torch.manual_seed(seed)
    cfg = ModelConfig(temporal_channels=16, head_hidden=16, scan_features=SCAN_FEATURES)
    model = DLEModel(cfg)
    with torch.no_grad():  # a FiLM that is not the identity, so that the scan matters
        model.scan_film.net[-1].weight.normal_(0, 0.5)
    timing = REFERENCE_SCANS["paper"]
    card = ModelCard(name=name, tile_height=20, tile_width=20, window_frames=40, d_min_um2_s=0.0, d_max_um2_s=d_max,
                     scan_timing=timing.to_dict(), pixel_size_um=timing.pixel_size_um, architecture=cfg.to_dict(),
                     scan_family=family.to_dict())
    return save_model_package(folder, model, card)


# ------------------------------------------------------------------ the box
def test_drawn_scans_lie_in_the_box_and_their_features_in_the_unit_cube():
    g = torch.Generator().manual_seed(1)
    scans = [DEFAULT_FAMILY.draw(g) for _ in range(300)]
    for t in scans:
        assert DEFAULT_FAMILY.contains(t), DEFAULT_FAMILY.outside(t)
        # a drawn scan is a real raster: its lines hold its pixels, its frame its lines
        assert t.width_px * t.dwell_us <= t.line_period_us and t.height_px * t.line_period_us <= t.frame_period_us
        f = DEFAULT_FAMILY.features(t, 1.5)
        assert f.shape == (SCAN_FEATURES,) and np.all(np.abs(f[:4]) <= 1 + 1e-6) and f[4] == 0
    frames = np.array([t.frame_period_us for t in scans])
    assert frames.min() >= 20_000 and frames.max() <= 400_000
    # log-uniform draws spread over the box: both halves of each ratio's log range are visited
    ratios = np.log([t.line_period_us / t.dwell_us for t in scans])
    mid = np.log(DEFAULT_FAMILY.line_per_dwell).mean()
    assert 0.2 < np.mean(ratios < mid) < 0.8


def test_the_reference_scans_are_inside_and_the_box_says_what_is_outside():
    for name, t in REFERENCE_SCANS.items():
        assert DEFAULT_FAMILY.contains(t), name
    paper = REFERENCE_SCANS["paper"]
    too_long_lines = dataclasses.replace(paper, line_period_us=8.0 * 2000, frame_period_us=8.0 * 2000 * 20,
                                         width_px=20, height_px=20)
    assert any("line period / dwell" in w for w in DEFAULT_FAMILY.outside(too_long_lines))
    bidi = dataclasses.replace(paper, bidirectional=True)
    assert any("bidirectional" in w for w in DEFAULT_FAMILY.outside(bidi))
    assert any("pixel size" in w for w in DEFAULT_FAMILY.outside(dataclasses.replace(paper, pixel_size_um=0.3)))


def test_features_follow_the_physics_times_scaled_change_only_the_spread_and_by_log_b():
    # every time b× longer: the same ratios; a particle spreads D·t, so only the spread
    # feature moves, by the same step up for b = 2 as down for b = 1/2 (it is ln-spaced)
    paper = REFERENCE_SCANS["paper"]
    base = DEFAULT_FAMILY.features(paper, 1.5)
    up = DEFAULT_FAMILY.features(paper.scaled(2.0), 1.5) - base
    down = DEFAULT_FAMILY.features(paper.scaled(0.5), 1.5) - base
    np.testing.assert_allclose(up[[0, 1, 3, 4]], 0, atol=1e-6)
    assert up[2] > 0 and up[2] == pytest.approx(-down[2], rel=1e-5)
    # four times longer: twice the step of two times longer
    assert DEFAULT_FAMILY.features(paper.scaled(4.0), 1.5)[2] - base[2] == pytest.approx(2 * up[2], rel=1e-5)
    # longer lines at the same dwell and lines per frame: line/dwell up, frame/line the same
    longer = ScanTiming(0.15, 8.0, 3016.0, 3016.0 * paper.frame_period_us / paper.line_period_us, 20, 20, False)
    d = DEFAULT_FAMILY.features(longer, 1.5) - base
    assert d[0] > 0 and abs(d[1]) < 1e-5 and d[2] > 0  # the frame got longer too: more spread
    # a model's features place the scan in its box whatever its D range: the box's ends are ±1
    lo = ScanTiming(0.15, 1.0, 64.0, 64.0 * 32 * 10, 51, 20, False)  # line/dwell and frame/line at their minima
    for d_max in (1.5, 50.0):
        f = DEFAULT_FAMILY.features(lo, d_max)
        assert f[0] == pytest.approx(-1, abs=1e-5) and f[1] == pytest.approx(-1 + 2 * math.log(10) / math.log(20), abs=1e-5)


def test_a_family_round_trips_and_bad_boxes_are_refused():
    again = ScanFamily.from_dict(DEFAULT_FAMILY.to_dict())
    assert again == DEFAULT_FAMILY
    with pytest.raises(DleStreamError, match="line_per_dwell"):
        dataclasses.replace(DEFAULT_FAMILY, line_per_dwell=(100.0, 50.0))
    with pytest.raises(DleStreamError, match="unknown field"):
        ScanFamily.from_dict({**DEFAULT_FAMILY.to_dict(), "zoom": 2})
    narrow = dataclasses.replace(DEFAULT_FAMILY, frame_period_us=(1.0, 2.0))  # no scan of the box fits
    with pytest.raises(DleStreamError, match="widen the box"):
        narrow.draw(torch.Generator().manual_seed(0), max_tries=50)


# ---------------------------------------------------------------- the network
def test_a_new_family_head_starts_as_its_one_scan_parent_and_then_reads_the_scan():
    torch.manual_seed(0)
    parent = DLEModel(ModelConfig(temporal_channels=16, head_hidden=16)).eval()
    family = DLEModel(ModelConfig(temporal_channels=16, head_hidden=16, scan_features=SCAN_FEATURES)).eval()
    family.load_state_dict(parent.state_dict(), strict=False)
    latents = torch.randn(3, 64, parent.config.latent)
    scans = torch.randn(3, SCAN_FEATURES)
    with torch.no_grad():
        same = family.head(with_scan_features(latents, scans, family.config))
        torch.testing.assert_close(same, parent.head(latents))  # warm start: identical for every scan
        family.scan_film.net[-1].weight.normal_(0, 0.5)
        a = family.head(with_scan_features(latents, scans, family.config))
        b = family.head(with_scan_features(latents, scans + 1.0, family.config))
    assert (a - b).abs().max() > 1e-3  # once trained, the scan changes the output


def test_scan_features_are_required_by_a_family_head_and_refused_by_a_one_scan_one():
    one = ModelConfig(temporal_channels=16, head_hidden=16)
    fam = dataclasses.replace(one, scan_features=SCAN_FEATURES)
    lat = torch.zeros(2, 40, one.latent)
    with pytest.raises(DleStreamError, match="needs the scan"):
        with_scan_features(lat, None, fam)
    with pytest.raises(DleStreamError, match="takes no scan features"):
        with_scan_features(lat, torch.zeros(SCAN_FEATURES), one)
    with pytest.raises(DleStreamError, match="scan features"):
        DLEModel(fam).head(lat)  # latents without the features


# ------------------------------------------------------------------ package
def test_a_family_package_loads_and_its_card_must_match_its_network(tmp_path):
    from dle_stream.model_package import load_card, load_model_package

    folder = _family_package(tmp_path / "fam")
    model, card = load_model_package(folder)
    assert card.family == DEFAULT_FAMILY and model.config.scan_features == SCAN_FEATURES
    data = load_card(folder).to_dict()
    data["scan_family"] = {}
    from dle_stream.model_package import ModelCard

    with pytest.raises(DleStreamError, match="scan_family"):
        ModelCard.from_dict(data)


def test_a_card_written_before_families_still_loads(small_model):
    import json

    from dle_stream.model_package import CARD_FILE, ModelCard

    data = json.loads((small_model / CARD_FILE).read_text())
    data.pop("scan_family", None)
    card = ModelCard.from_dict(data)
    assert card.family is None


# ---------------------------------------------------------------- estimator
def test_the_family_estimator_serves_its_box_reads_the_scan_and_refuses_what_is_outside(tmp_path):
    from dle_stream.estimator import DiffusionEstimator

    est = DiffusionEstimator.load(_family_package(tmp_path / "fam"))
    yy, xx = np.mgrid[0:20, 0:20]
    dot = 3000.0 * np.exp(-((yy - 9.5) ** 2 + (xx - 9.5) ** 2) / (2 * 1.4**2)) / (2 * np.pi * 1.4**2)
    # a particle in view (windows of pure noise would be read as holding none: dle_stream/spots.py)
    movies = np.random.default_rng(0).poisson(50 + dot, (2, 40, 20, 20)).astype(np.float32)
    ll64, scale = est.window_log_likelihoods_of_movies(movies, REFERENCE_SCANS["64x64-8us"])
    ll512, _ = est.window_log_likelihoods_of_movies(movies, REFERENCE_SCANS["512x512-1us"])
    assert scale == 1.0  # a family model's D is never rescaled
    assert np.abs(ll64 - ll512).max() > 1e-3  # the same movies read as different scans
    latents = est.encode(movies.reshape(-1, 20, 20)).reshape(2, 40, -1)
    np.testing.assert_allclose(est.window_log_likelihoods(latents, REFERENCE_SCANS["64x64-8us"]), ll64, rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(DleStreamError, match="pass scan"):
        est.window_log_likelihoods(latents)
    outside = ScanTiming(0.15, 20.0, 20.0 * 100, 20.0 * 100 * 100, 64, 64, False)  # dwell 20 µs: not in the box
    with pytest.raises(DleStreamError, match=r"dwell \(µs\) 20 not in"):
        est.timing_check(outside)


def test_replay_picks_a_family_model_for_a_scan_the_asked_model_does_not_serve(tmp_path, monkeypatch):
    from dle_stream.model_choice import serving_model
    from dle_stream.model_package import MODELS_ENV

    models = tmp_path / "models"
    _family_package(models / "fam-low", name="fam-low", d_max=1.5)
    _family_package(models / "fam-high", name="fam-high", d_max=50.0)
    monkeypatch.setenv(MODELS_ENV, str(models))
    scan = REFERENCE_SCANS["128x128-2us"]
    folder, card, note = serving_model(scan, "brain-qd-low")
    assert card.name == "fam-low" and "trained for another scan" in note  # the same D range as asked
    folder, card, note = serving_model(scan, "beads-high")
    assert card.name == "fam-high"
    folder, card, note = serving_model(REFERENCE_SCANS["paper"], "brain-qd-low")
    assert card.name == "brain-qd-low" and note is None  # the asked model serves its own scan
    far = ScanTiming(0.15, 20.0, 20.0 * 100, 20.0 * 100 * 100, 64, 64, False)
    assert serving_model(far, "brain-qd-low") is None


def test_replay_without_flags_uses_the_family_model_and_logs_which(tmp_path, monkeypatch):
    from dle_stream.model_package import MODELS_ENV
    from dle_stream.recording import write_recording
    from dle_stream.session import StreamOptions, replay

    models = tmp_path / "models"
    _family_package(models / "fam-low", name="fam-low", d_max=1.5)
    monkeypatch.setenv(MODELS_ENV, str(models))
    timing = dataclasses.replace(REFERENCE_SCANS["64x64-8us"], height_px=40)
    movie = np.random.default_rng(0).poisson(100, (90, 40, 64)).astype(np.uint16)
    rec = write_recording(tmp_path / "rec64.tif", movie, timing)
    opts = StreamOptions(dashboard="quiet", recording_check=False, log=tmp_path / "out.zarr")
    result = replay(rec, opts)
    assert result.stats.windows_done > 0
    assert any("using fam-low" in w for w in result.warnings)
    assert Path(opts.model).name == "fam-low"
    assert math.isfinite(float(np.nanmax(result.tile_d)))


# ------------------------------------------------------------------ training
def test_family_training_draws_scans_from_the_box_keeps_a_group_on_one_scan_and_validates_each(tmp_path, small_model):
    from dle_stream.model_package import load_model_package
    from dle_stream.training.trainer import Trainer
    from dle_stream.training.training_setup import config_for

    cfg = config_for(out=tmp_path / "fam", preset="low", like=None, d_max=None, steps=6, minutes=None, device="cpu",
                     seed=3, resume=False, encoder_from=None, ae_steps=None, cache_movies=96, val_movies=16,
                     name="fam", flags={}, timing_file=None, warm_from=small_model, family=DEFAULT_FAMILY)
    cfg = dataclasses.replace(cfg, frames=40, batch=8, sim_batch=8, group_size=8, combine_groups=2)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    out = trainer.run()
    cache = trainer.cache
    latent = cfg.architecture.latent
    feats = cache.latents[: cache.size, 0, latent:].float().numpy()
    # the features are constant along each movie and are those of scans inside the box
    np.testing.assert_array_equal(cache.latents[: cache.size, -1, latent:].float().numpy(), feats)
    assert np.all(np.abs(feats[:, :4]) <= 1.001)
    # every group of windows of one D (a tile's windows) is of one scan; the cache holds many scans
    groups = cache.group[: cache.size].numpy()
    for gid in np.unique(groups[groups >= 0]):
        members = feats[groups == gid]
        assert np.ptp(members, axis=0).max() == 0, gid
    assert len(np.unique(feats.round(3), axis=0)) >= 4
    model, card = load_model_package(out)
    assert card.family is not None and model.config.scan_features == SCAN_FEATURES
    per_scan = card.validation["per_scan"]
    assert set(per_scan) == set(REFERENCE_SCANS)  # every reference scan in the box, validated on its own
    assert all(v["n_movies"] == 16 and math.isfinite(v["dle"]["l1"]) for v in per_scan.values())
    assert card.training["warm_from"] == "tiny"


def test_calibrating_a_family_model_is_refused_not_done_at_one_scan(tmp_path):
    from dle_stream.training.calibration import calibrate

    folder = _family_package(tmp_path / "fam")
    with pytest.raises(DleStreamError, match="family model"):
        calibrate(folder, n_per_cell=128)


def test_train_family_box_file_errors_are_one_line(cli, tmp_path):
    bad = tmp_path / "box.json"
    bad.write_text('{"line_per_dwell": [64, 800]}')
    assert "missing field" in cli.error("train", "--family", "--family-box", bad, "--steps", "1", "--out", tmp_path / "m")
    assert "no such file" in cli.error("train", "--family", "--family-box", tmp_path / "nope.json", "--steps", "1",
                                       "--out", tmp_path / "m2")
    assert "add --family" in cli.error("train", "--family-box", bad, "--steps", "1", "--out", tmp_path / "m3")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()


def test_a_family_run_resumes_as_a_family_run(tmp_path, small_model):
    from dle_stream.model_package import load_card
    from dle_stream.training.trainer import Trainer
    from dle_stream.training.training_setup import config_for

    common = dict(out=tmp_path / "fam", preset="low", like=None, d_max=None, minutes=None, device="cpu", seed=3,
                  encoder_from=None, ae_steps=None, cache_movies=48, val_movies=8, name="fam", flags={},
                  timing_file=None)
    box = dataclasses.replace(DEFAULT_FAMILY, dwell_us=(2.0, 8.0))
    cfg = config_for(**common, steps=2, resume=False, warm_from=small_model, family=box)
    Trainer(dataclasses.replace(cfg, frames=40, batch=8, sim_batch=8, group_size=8), log=lambda *a, **k: None).run()
    again = config_for(**common, steps=2, resume=True)
    assert again.scan_family == dataclasses.replace(box, psf_sigma_xy_um=0.21)
    assert again.architecture.scan_features == SCAN_FEATURES
    Trainer(dataclasses.replace(again, frames=40, batch=8, sim_batch=8, group_size=8), log=lambda *a, **k: None).run()
    card = load_card(tmp_path / "fam")
    assert card.family == again.scan_family and card.training["predictor_steps"] == 4


def test_a_family_model_specialised_to_a_scan_is_that_scan_s_one_scan_model(tmp_path):
    from dle_stream.model_package import load_model_package
    from dle_stream.scan_family import specialise_to_scan

    fam, card = load_model_package(_family_package(tmp_path / "fam", seed=4))
    lat = torch.randn(5, 64, fam.config.latent)
    for name in ("64x64-8us", "512x512-1us"):
        scan = REFERENCE_SCANS[name]
        one = specialise_to_scan(fam, card.family, scan, card.d_max_um2_s).eval()
        assert one.config.scan_features == 0 and one.scan_film is None
        with torch.no_grad():
            want = fam.head(with_scan_features(lat, torch.from_numpy(card.family.features(scan, 1.5)), fam.config))
            torch.testing.assert_close(one.head(lat), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(DleStreamError, match="outside"):
        specialise_to_scan(fam, card.family, ScanTiming(0.15, 20.0, 2000.0, 200000.0, 64, 64, False), 1.5)


def test_a_new_scan_in_a_family_s_box_trains_from_the_family_specialised_to_it(tmp_path, monkeypatch):
    from dle_stream.model_choice import warm_start_parent
    from dle_stream.model_package import MODELS_ENV, load_model_package
    from dle_stream.training.trainer import Trainer
    from dle_stream.training.training_setup import config_for

    models = tmp_path / "models"
    folder = _family_package(models / "fam-low", name="fam-low", d_max=1.5, seed=5)
    monkeypatch.setenv(MODELS_ENV, str(models))
    scan = REFERENCE_SCANS["128x128-2us"]
    dist, parent, card = warm_start_parent(scan, 0.0, 1.5)
    assert card.name == "fam-low" and dist == 0.0  # no one-scan model serves it; the family does
    dist, parent, card = warm_start_parent(REFERENCE_SCANS["paper"], 0.0, 1.5)
    assert card.name == "brain-qd-low"  # the one-scan model of the very scan comes first
    assert warm_start_parent(ScanTiming(0.15, 20.0, 2000.0, 200000.0, 64, 64, False), 0.0, 1.5)[2].name != "fam-low"

    timing_file = tmp_path / "scan.json"
    timing_file.write_text(scan.to_json())
    cfg = config_for(out=tmp_path / "one", preset="low", like=None, d_max=None, steps=1, minutes=None, device="cpu",
                     seed=0, resume=False, encoder_from=None, ae_steps=None, cache_movies=16, val_movies=8, name="one",
                     flags={}, timing_file=timing_file, warm_from=folder)
    assert cfg.scan_family is None and cfg.architecture.scan_features == 0
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    trainer.load()  # the warm start
    fam, fam_card = load_model_package(folder)
    lat = torch.randn(3, 64, fam.config.latent)
    trainer.model.eval()
    with torch.no_grad():
        want = fam.head(with_scan_features(lat, torch.from_numpy(fam_card.family.features(scan, 1.5)), fam.config))
        torch.testing.assert_close(trainer.model.head(lat), want, rtol=1e-4, atol=1e-4)


def test_the_recording_check_of_a_family_model_is_simulated_for_the_recording_s_scan(tmp_path, monkeypatch):
    from dle_stream import recording_check as rc
    from dle_stream.model_package import load_card

    folder = _family_package(tmp_path / "fam")
    card = load_card(folder)
    a, b = REFERENCE_SCANS["64x64-8us"], REFERENCE_SCANS["512x512-1us"]
    # the reference tiles get the checked scan's line and frame period, not the card's
    assert rc.reference_timing(card, a).line_period_us == a.line_period_us
    assert rc.reference_key_doc(card, timing=a) != rc.reference_key_doc(card, timing=b)
    # a frame of another size with the same scan shares the reference
    assert rc.reference_key_doc(card, timing=dataclasses.replace(a, width_px=60)) == rc.reference_key_doc(card, timing=a)
    longer = dataclasses.replace(a, frame_period_us=a.line_period_us * 128)  # more lines per frame: another scan
    assert rc.reference_key_doc(card, timing=longer) != rc.reference_key_doc(card, timing=a)
    assert rc.shipped_reference(folder, card)[0] is None
    with pytest.raises(DleStreamError, match="family model"):
        rc.write_reference(folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    movie = np.random.default_rng(0).poisson(100, (40, 40, 40)).astype(np.float32)
    verdict = rc.replay_check(movie, folder, dataclasses.replace(a, width_px=40, height_px=40))
    assert verdict["status"] == "skipped" and "for this scan" in verdict["reason"]


def test_check_without_model_checks_against_the_family_model_replay_would_use(tmp_path, monkeypatch):
    from dle_stream.model_package import MODELS_ENV
    from dle_stream.recording import write_recording
    from dle_stream.recording_check import check_recording

    models = tmp_path / "models"
    _family_package(models / "fam-low", name="fam-low", d_max=1.5)
    monkeypatch.setenv(MODELS_ENV, str(models))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    timing = dataclasses.replace(REFERENCE_SCANS["64x64-8us"], height_px=40, width_px=40)
    movie = np.random.default_rng(0).poisson(100, (45, 40, 40)).astype(np.uint16)
    rec = write_recording(tmp_path / "rec.tif", movie, timing)
    import dle_stream.recording_check as rc

    monkeypatch.setattr(rc, "REFERENCE_TILES", 8)  # a small reference (simulated for this scan)
    res = check_recording(rec, model="brain-qd-low", windows=1)
    assert res.model == "fam-low"
    assert any("using fam-low" in w for w in res.warnings)


def test_the_python_api_uses_the_family_model_as_replay_does(tmp_path, monkeypatch):
    import warnings

    from dle_stream import api
    from dle_stream.model_package import MODELS_ENV

    models = tmp_path / "models"
    _family_package(models / "fam-low", name="fam-low", d_max=1.5)
    monkeypatch.setenv(MODELS_ENV, str(models))
    timing = dataclasses.replace(REFERENCE_SCANS["128x128-2us"], height_px=20, width_px=40)
    movie = np.random.default_rng(1).poisson(100, (50, 20, 40)).astype(np.float32)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = api.estimate(movie, timing, window=40, hop=10)
    assert any("using fam-low" in w for w in res.warnings)
    assert np.isfinite(res.rois.to_pandas()["d_um2_s"]).all()
    far = dataclasses.replace(timing, dwell_us=20.0, line_period_us=20.0 * 160, frame_period_us=20.0 * 160 * 128)
    with pytest.raises(DleStreamError, match="trained for another scan"):
        api.estimate(movie, far, window=40, hop=10)


def test_a_model_the_user_named_is_not_replaced_the_refusal_names_the_family(tmp_path, monkeypatch, cli, small_model):
    from dle_stream.model_package import MODELS_ENV
    from dle_stream.recording import write_recording

    models = tmp_path / "models"
    _family_package(models / "fam-low", name="fam-low", d_max=1.5)
    monkeypatch.setenv(MODELS_ENV, str(models))
    timing = dataclasses.replace(REFERENCE_SCANS["64x64-8us"], height_px=40, width_px=40)
    rec = write_recording(tmp_path / "rec.tif", np.random.default_rng(0).poisson(100, (60, 40, 40)).astype(np.uint16),
                          timing)
    text = cli.error("replay", rec, "--model", small_model, "--no-dashboard")
    assert "does not serve this scan" in text and "the family model fam-low does" in text
    assert "--model fam-low" in text and "dle-stream train --like" in text
