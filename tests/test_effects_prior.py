"""Training movies with the effects of a real sample (issue 14, item 2): the effects prior
(training/effects_prior.py), the effects share of a training batch (training/mixture.py),
``dle-stream train --effects-share`` and its record in the model card.

The movies are checked against physics: a bleached field's light decays with the drawn
lifetime, a moving field's image is displaced by the drawn amplitude, a brightness factor
scales the photons above background."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from dle_stream import DleStreamError
from dle_stream.training.effects_prior import EFFECTS, EFFECTS_PRIOR, EffectsPrior
from dle_stream.training.mixture import MixedSimulator
from dle_stream.training.priors import STRESSES, SimulatorPriors, get_preset, stressed
from dle_stream.training.simulator import Simulator

LOW = get_preset("low")
TIMING = LOW.timing  # 61.652 ms frames
NOTHING = EffectsPrior(**{f"p_{name}": 0.0 for name in EFFECTS})


def only(effect: str, **ranges) -> EffectsPrior:
    """An effects prior with ``effect`` always present (the others never), strengths ``ranges``."""
    return replace(NOTHING, **{f"p_{effect}": 1.0}, **ranges)


def steady_field(**changes) -> SimulatorPriors:
    """A steady density of a fixed number of particles, every movie with effects."""
    return LOW.priors.with_(density="box", particles="fixed", effects_share=1.0, **changes)


# ------------------------------------------------------------------- the share
def test_effects_share_0_gives_the_batches_of_a_seed_as_without_it():
    """With no effects the mixture draws what it drew before the effects share existed:
    the steady-share coin flips, then the cloud movies, then the steady ones."""
    priors = LOW.priors.with_(box_fraction=0.4)
    assert priors.effects_share == 0.0 and priors.operating().effects_share == 0.0
    mixed = MixedSimulator(priors, TIMING, 12, 12, frames=6)
    got = [mixed.simulate(10, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(got[0].movies, got[1].movies) and got[0].effects == [None] * 10

    g = torch.Generator().manual_seed(7)  # the algorithm of the mixture without effects
    n_box = int((torch.rand(10, generator=g) < 0.4).sum())
    cloud = Simulator(priors, TIMING, 12, 12, 6).simulate(10 - n_box, generator=g)
    box = Simulator(priors.with_(density="box"), TIMING, 12, 12, 6).simulate(n_box, generator=g)
    assert 0 < n_box < 10
    assert torch.equal(got[0].movies, torch.cat([cloud.movies, box.movies]))
    assert torch.equal(got[0].d_um2_s, torch.cat([cloud.d_um2_s, box.d_um2_s]))


def test_steady_and_effects_shares_combine():
    priors = LOW.priors.with_(box_fraction=0.5, effects_share=0.5, particles="fixed", particles_max=5)
    mixed = MixedSimulator(priors, TIMING, 8, 8, frames=2, effects_prior=NOTHING)
    g = torch.Generator().manual_seed(3)
    batches = [mixed.simulate(40, g) for _ in range(4)]
    fx = np.array([e is not None for b in batches for e in b.effects])
    steady = torch.cat([b.steady for b in batches]).numpy()
    assert len(batches[0]) == 40 and len(batches[0].effects) == 40
    assert 0.35 < fx.mean() < 0.65  # 160 movies: binomial sd 0.04
    assert 0.3 < steady[fx].mean() < 0.7 and 0.3 < steady[~fx].mean() < 0.7  # ~80 each: sd 0.056
    # D keeps its prior (uniform on 0–1.5 µm²/s) in every part of the batch
    d = torch.cat([b.d_um2_s for b in batches]).numpy()
    assert d.min() >= 0 and d.max() <= 1.5 and abs(d[fx].mean() - 0.75) < 0.15
    # a steady priors' density stays steady with effects; fixed D reach the effects movies too
    all_box = MixedSimulator(priors.with_(density="box"), TIMING, 8, 8, frames=2, effects_prior=NOTHING)
    b = all_box.simulate(12, g, d_um2_s=torch.linspace(0.1, 1.2, 12, dtype=torch.float64))
    assert bool(b.steady.all()) and any(e is not None for e in b.effects)
    assert sorted(b.d_um2_s.tolist()) == pytest.approx(torch.linspace(0.1, 1.2, 12).tolist())


def test_an_invalid_share_is_refused_with_its_name(tmp_path, cli):
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(DleStreamError, match="effects_share"):
            SimulatorPriors(effects_share=bad)
    line = cli.error("train", "--out", tmp_path / "m", "--steps", "1", "--effects-share", "1.5")
    assert "--effects-share 1.5: must be between 0 and 1" in line
    with pytest.raises(DleStreamError, match="p_motion"):
        EffectsPrior(p_motion=2.0)
    with pytest.raises(DleStreamError, match="bleach_time_s"):
        EffectsPrior(bleach_time_s=(10.0, 5.0))


# ------------------------------------------------------------------- the draws
def test_drawn_settings_lie_in_the_documented_ranges_with_the_documented_chances():
    g = torch.Generator().manual_seed(0)
    draws = [EFFECTS_PRIOR.draw(g) for _ in range(3000)]
    for name in EFFECTS:  # each present with probability 0.4, independently: sd 0.009
        assert np.mean([name in s.present for s in draws]) == pytest.approx(0.4, abs=0.035)
    both = np.mean([{"motion", "bleaching"} <= s.present for s in draws])
    assert both == pytest.approx(0.16, abs=0.03)

    def values(field):
        return np.array([getattr(s, field) for s in draws])

    ranges = {"heartbeat_px": (0, 2.5), "heartbeat_hz": (1, 7), "breathing_px": (0, 2), "breathing_hz": (0.2, 2),
              "blink_alpha_on": (1.4, 2.0), "blink_alpha_off": (1.4, 2.0), "bleach_time_s": (5, 120),
              "brightness_factor": (0.25, 2), "psf_factor": (1, 2), "density_factor": (1, 10)}
    for field, (lo, hi) in ranges.items():
        v = values(field)
        assert v.min() >= lo and v.max() <= hi, field
        assert v.min() < lo + 0.05 * (hi - lo) and v.max() > hi - 0.05 * (hi - lo), field  # reaches both ends
    assert np.all(values("drift_cap_um_s") == 0.025)
    # log-uniform strengths: half below the geometric mean of the range
    for field in ("bleach_time_s", "brightness_factor", "density_factor"):
        lo, hi = ranges[field]
        assert np.mean(values(field) < math.sqrt(lo * hi)) == pytest.approx(0.5, abs=0.035), field
    # a draw takes the same numbers from the generator whatever is present
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    EFFECTS_PRIOR.draw(a), NOTHING.draw(b)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_the_ranges_reach_the_stress_suites_strong_strengths():
    p = EFFECTS_PRIOR
    _, weak, strong = STRESSES["motion"]
    for s in (weak, strong):
        assert p.heartbeat_px[0] <= s["heartbeat_px"][0] and s["heartbeat_px"][1] < p.heartbeat_px[1]
        assert p.heartbeat_hz[0] <= s["heartbeat_hz"][0] and s["heartbeat_hz"][1] <= p.heartbeat_hz[1]
        assert s["drift_um_s"] < p.drift_cap_um_s
    for s in STRESSES["blinking"][1:]:
        assert p.blink_alpha[0] < min(s.values()) and max(s.values()) < p.blink_alpha[1]
    for s in STRESSES["bleaching"][1:]:
        assert p.bleach_time_s[0] < s["bleach_time_s"] < p.bleach_time_s[1]
    for stress, field, key in (("dim", "brightness_factor", "brightness_factor"), ("dense", "density_factor",
                               "density_factor"), ("wide-psf", "psf_factor", "psf_factor")):
        lo, hi = getattr(p, field)
        assert all(lo <= s[key] <= hi for s in STRESSES[stress][1:]), stress
    assert p.brightness_factor[1] > 1  # brighter dots too


@pytest.mark.parametrize("strength", ["weak", "strong"])
def test_applied_settings_give_the_priors_of_the_stress_suites(strength):
    base = LOW.priors.with_(box_fraction=0.3, effects_share=0.5)
    drawn = EFFECTS_PRIOR.draw(torch.Generator().manual_seed(1))
    cases = {"blinking": ("blinking", lambda s: dict(blink_alpha_on=s["blink_alpha_on"],
                                                      blink_alpha_off=s["blink_alpha_off"])),
             "bleaching": ("bleaching", lambda s: dict(bleach_time_s=s["bleach_time_s"])),
             "dim": ("brightness", lambda s: dict(brightness_factor=s["brightness_factor"])),
             "dense": ("density", lambda s: dict(density_factor=s["density_factor"])),
             "wide-psf": ("psf", lambda s: dict(psf_factor=s["psf_factor"]))}
    for stress, (effect, values) in cases.items():
        _, weak, strong = STRESSES[stress]
        settings = replace(drawn, present=frozenset({effect}), **values(weak if strength == "weak" else strong))
        expected = stressed(base, stress, strength).with_(box_fraction=0.0, effects_share=0.0)
        assert settings.apply(base) == expected, stress
    assert replace(drawn, present=frozenset()).apply(base) == base.with_(box_fraction=0.0, effects_share=0.0)


# --------------------------------------------------------- the movies' physics
def test_bleached_movies_lose_their_light_with_the_drawn_lifetime():
    """Photons above background of a steady, almost still field fall as exp(−t/τ): over two
    consecutive stretches of n frames their sums have the ratio exp(nΔt/τ)."""
    tau_s = 0.5
    mixed = MixedSimulator(steady_field(particles_max=1000), TIMING, 20, 20, frames=48,
                           effects_prior=only("bleaching", bleach_time_s=(tau_s, tau_s)))
    batch = mixed.simulate(8, torch.Generator().manual_seed(11), d_um2_s=torch.full((8,), 0.01))
    assert all(e is not None and e.present == {"bleaching"} for e in batch.effects)
    light = batch.movies.double().sum(dim=(2, 3))  # [B, T] detector values per frame
    above = (light - light[:, -8:].mean(dim=1, keepdim=True)).sum(dim=0).numpy()  # e^-4.9 left at the end
    n = 8
    frame_s = TIMING.frame_period_us * 1e-6
    assert above[:n].sum() > 100 * math.sqrt(8 * 48 * 400 * 100)  # far above the shot noise of the background
    ratio = above[:n].sum() / above[n:2 * n].sum()
    # 2.68 (no bleaching: 1); seeds 0–5 gave 2.62–2.73
    assert ratio == pytest.approx(math.exp(n * frame_s / tau_s), rel=0.08)


def frame_shifts_px(movie: np.ndarray) -> np.ndarray:
    """Displacement (rows, cols), px, of each frame against the first, from the peak of the
    circular cross-correlation with a parabolic sub-pixel fit. [T, 2]"""
    ref = np.fft.fft2(movie[0] - movie[0].mean())
    out = []
    for frame in movie:
        cc = np.fft.ifft2(np.fft.fft2(frame - frame.mean()) * np.conj(ref)).real
        peak = np.unravel_index(np.argmax(cc), cc.shape)
        shift = []
        for axis, k in enumerate(peak):
            n = cc.shape[axis]
            idx = [peak[0], peak[1]]
            vals = []
            for dk in (-1, 0, 1):
                idx[axis] = (k + dk) % n
                vals.append(cc[tuple(idx)])
            den = vals[0] - 2 * vals[1] + vals[2]
            sub = 0.5 * (vals[0] - vals[2]) / den if den else 0.0
            shift.append((k + n // 2) % n - n // 2 + sub)
        out.append(shift)
    return np.array(out)


def test_moving_movies_are_displaced_by_the_drawn_amplitude():
    """Still particles in a field moved by a 1 Hz, 2.5 px heartbeat: the frames' shifts span
    the peak-to-peak displacement 2 × 2.5 px along one line; without motion they stay put."""
    priors = steady_field(particles_max=150, brightness_photons=(3000.0, 0.0), background_photons=(10.0, 0.0))
    moving = only("motion", heartbeat_px=(2.5, 2.5), heartbeat_hz=(1.0, 1.0), breathing_px=(0.0, 0.0),
                  drift_cap_um_s=0.0)
    spans = {}
    for label, prior in (("moving", moving), ("still", NOTHING)):
        mixed = MixedSimulator(priors, TIMING, 20, 20, frames=24, effects_prior=prior)
        batch = mixed.simulate(3, torch.Generator().manual_seed(4), d_um2_s=torch.zeros(3))
        spans[label] = []
        for movie in batch.movies.numpy():
            s = frame_shifts_px(movie)
            spans[label].append(max(np.hypot(*(a - b)) for a in s for b in s))
            if label == "moving":  # along one line: the second principal axis carries little
                sv = np.linalg.svd(s - s.mean(axis=0), compute_uv=False)
                assert sv[1] < 0.25 * sv[0]
    assert np.all(np.array(spans["still"]) < 0.5)
    assert np.all(np.abs(np.array(spans["moving"]) - 5.0) < 1.0), spans


def test_a_brightness_factor_scales_the_photons_above_background():
    """The same movies (one per seed: the shot noise makes a batch's next movies differ) with
    brightness × 0.25, × 1 and × 2: the expected detector values are gain·(background + k·S −
    offset), so the differences of the sums go as the differences of k."""
    priors = steady_field(particles_max=300)
    sums = {}
    for k in (0.25, 1.0, 2.0):
        mixed = MixedSimulator(priors, TIMING, 16, 16, frames=16,
                               effects_prior=only("brightness", brightness_factor=(k, k)))
        sums[k] = 0.0
        for seed in range(4):
            batch = mixed.simulate(1, torch.Generator().manual_seed(seed))
            assert batch.effects[0] is not None and batch.effects[0].brightness_factor == pytest.approx(k)
            sums[k] += float(batch.movies.double().sum())
    assert sums[1.0] - sums[0.25] > 100 * math.sqrt(4 * 16 * 256 * 100)  # far above the background's shot noise
    ratio = (sums[2.0] - sums[1.0]) / (sums[1.0] - sums[0.25])
    assert ratio == pytest.approx((2.0 - 1.0) / (1.0 - 0.25), rel=0.03)


# ------------------------------------------------------------ train and card
def test_train_effects_share_is_recorded_in_the_model_card(tmp_path, cli, monkeypatch):
    """`dle-stream train --effects-share` reaches the trainer's priors and its card (the
    training itself replaced by writing the untrained package)."""
    import dle_stream.training.trainer as trainer_module

    seen = {}

    def write_untrained(cfg, progress=None, log=print, ranks=None):
        seen["priors"] = cfg.priors
        t = trainer_module.Trainer(cfg, log=lambda *a: None)
        return t.write_package({"n_movies": 0, "dle": {"l1": 0.0, "best_half_l1": 0.0, "within_1_sigma": 0.0,
                                                        "within_2_sigma": 0.0}})

    monkeypatch.setattr(trainer_module, "train", write_untrained)
    out = tmp_path / "m"
    result = cli("train", "--out", out, "--steps", "1", "--device", "cpu", "--effects-share", "0.3",
                 "--steady-share", "0.2")
    assert result.exit_code == 0, result.output
    assert seen["priors"].effects_share == 0.3 and seen["priors"].box_fraction == 0.2
    card = json.loads((out / "card.json").read_text())
    training = card["training"]
    assert training["sample_effects_share"] == 0.3 and training["steady_density_share"] == 0.2
    prior = training["sample_effects_prior"]
    assert prior["p_motion"] == 0.4 and prior["heartbeat_px"] == [0.0, 2.5]
    assert prior["bleach_time_s"] == [5.0, 120.0] and prior["density_factor"] == [1.0, 10.0]
    assert card["simulator"]["priors"]["effects_share"] == 0.3
    # without the flag: share 0 and no effects prior
    out2 = tmp_path / "m2"
    assert cli("train", "--out", out2, "--steps", "1", "--device", "cpu").exit_code == 0
    training = json.loads((out2 / "card.json").read_text())["training"]
    assert training["sample_effects_share"] == 0.0 and training["sample_effects_prior"] is None
