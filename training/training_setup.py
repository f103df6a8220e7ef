"""Turn `dle-stream train` flags into a :class:`~dle_stream.training.trainer.TrainConfig`.

Scan timing, in order of precedence: timing flags, a timing file, the metadata of the
recording given with ``--like``, the preset's reference timing. On ``--resume`` the
checkpoint's own settings are used and only the budget is new.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from dle_stream.errors import DleStreamError
from dle_stream.model import ModelConfig
from dle_stream.scan_family import SCAN_FEATURES, ScanFamily
from dle_stream.timing import ScanTiming
from dle_stream.training.checkpoint import check_new_run_folder
from dle_stream.training.priors import Preset, SimulatorPriors, get_preset
from dle_stream.training.trainer import TrainConfig

#: Autoencoder pretraining steps unless --ae-steps (or a smaller --steps) says otherwise.
DEFAULT_AE_STEPS = 1500


#: (field, lowest, highest, unit) of scan timings worth training for; outside, the metadata is
#: almost surely misread (e.g. a frame interval in ms read as s).
PLAUSIBLE = (("pixel_size_um", 0.005, 50.0, "µm"), ("dwell_us", 0.01, 1000.0, "µs"),
             ("line_period_us", 0.1, 1e6, "µs"), ("frame_period_us", 1.0, 60e6, "µs"))


def implausible(timing: ScanTiming) -> list[str]:
    """What is out of :data:`PLAUSIBLE` in ``timing`` (empty: plausible)."""
    out = []
    for name, lo, hi, unit in PLAUSIBLE:
        value = getattr(timing, name)
        if not lo <= value <= hi:
            out.append(f"{name.removesuffix('_um').removesuffix('_us').replace('_', ' ')} {value:g} {unit} "
                       f"outside {lo:g}–{hi:g} {unit}")
    return out


#: TrainConfig fields a resumed run takes from its checkpoint unless given on the command line.
RESUME_KEEPS = ("lr", "batch", "ae_batch", "ae_lr", "e2e_lr", "sim_batch", "checkpoint_minutes", "d_draws", "val_groups",
               "average_steps")


def describe_priors(preset: Preset, priors: SimulatorPriors) -> str:
    """The card's words for what a run simulates: the preset's own description while the D
    range is the preset's, else one that names the range trained for (a warm start from a
    model of another range, or --d-max), not the preset's."""
    own = preset.priors
    if (priors.d_min_um2_s, priors.d_max_um2_s, priors.d_prior) == (own.d_min_um2_s, own.d_max_um2_s, own.d_prior):
        return preset.description
    return (f"D {priors.d_prior} on {priors.d_min_um2_s:g}–{priors.d_max_um2_s:g} µm²/s, "
            f"otherwise the priors of preset {preset.name}")

def _current_name(out: Path, checkpoint_name: str) -> str:
    """The name of the package in ``out`` as its card says now (a package shipped under a new
    name keeps it when resumed), else the checkpoint's."""
    try:
        name = json.loads((out / "card.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return checkpoint_name
    return name if isinstance(name, str) and name else checkpoint_name


def config_for(*, out: Path, preset: str, like: Path | None, d_max: float | None, steps: int | None,
               minutes: float | None, device: str, seed: int, resume: bool, encoder_from: Path | None,
               ae_steps: int | None, cache_movies: int, val_movies: int, name: str | None, flags: dict,
               timing_file: Path | None, refresh_movies: int = 4, refresh_every: int = 2,
               end_to_end: dict | None = None, warm_from: str | Path | None = None,
               steady_share: float | None = None, output: str | None = None, lr: float | None = None,
               combine_groups: int | None = None, effects_share: float | None = None,
               family: ScanFamily | None = None, d_draws: str | None = None,
               val_groups: int | None = None, average_steps: float | None = None) -> TrainConfig:
    """``end_to_end``: optional TrainConfig fields e2e_steps, e2e_minutes, e2e_frames, e2e_batch.

    ``warm_from``: a model package whose weights start the training (its architecture, with
    the window output ``output`` when given). ``steady_share``: share of training movies
    with a steady particle density (the rest: the paper's spreading cloud). ``effects_share``:
    share of training movies with effects of a real sample (each movie's effects drawn by
    :class:`~dle_stream.training.effects_prior.EffectsPrior`; cloud or steady as the others).
    ``combine_groups``: groups of windows of one D in each step's combination loss.
    ``d_draws``: "random" or "even" training D values (:mod:`~dle_stream.training.d_sequence`);
    ``val_groups``: held-out groups of windows of one D scored at each validation.
    ``average_steps``: average the head's weights exponentially over about this many steps (0: off).
    ``family``: train one model for this box of scans (:mod:`dle_stream.scan_family`), with
    the preset's scan as its representative; it needs ``warm_from`` (its encoder is reused).
    """
    e2e: dict[str, Any] = {k: v for k, v in (end_to_end or {}).items() if v is not None}
    #: TrainConfig fields given on the command line (a resumed run keeps its own otherwise)
    overrides: dict[str, Any] = {} if lr is None else {"lr": float(lr)}
    if combine_groups is not None:
        overrides["combine_groups"] = int(combine_groups)
    if d_draws is not None:
        overrides["d_draws"] = str(d_draws)
    if val_groups is not None:
        overrides["val_groups"] = int(val_groups)
    if average_steps is not None:
        overrides["average_steps"] = float(average_steps)
    if ae_steps is None:  # a short --steps budget should not pretrain for 1500 steps
        ae_steps = min(DEFAULT_AE_STEPS, steps) if steps is not None else DEFAULT_AE_STEPS
    if refresh_movies < 0 or refresh_every < 1:
        raise DleStreamError("--refresh-movies must be ≥ 0 and --refresh-every ≥ 1")
    out = Path(out)
    if resume:
        state_path = out / "checkpoint" / "state.json"
        if not state_path.is_file():
            raise DleStreamError(f"--resume: {out} holds no checkpoint (checkpoint/state.json); train without --resume first")
        saved = json.loads(state_path.read_text())["config"]
        # the run's own optimisation settings (no command-line flag, or not given): a resumed
        # run that fell back to the defaults instead took a warm restart at the default peak
        # learning rate (measured: 6.4e-4 instead of 1.7e-4 on brain-qd-low-steady, its
        # held-out score went from −6.05 to +1.45 within 500 steps)
        kept = {k: saved[k] for k in RESUME_KEEPS if k in saved}
        return TrainConfig(
            name=_current_name(out, saved["name"]), priors=SimulatorPriors.from_dict(saved["priors"]),
            timing=ScanTiming.from_dict(saved["timing"]), out=out, preset=saved.get("preset", "custom"),
            description=saved.get("description", ""), tile_height=saved["tile_height"], tile_width=saved["tile_width"],
            frames=saved["frames"], architecture=ModelConfig.from_dict(saved["architecture"]), seed=seed,
            device=device, steps=steps, minutes=minutes, ae_steps=saved["ae_steps"], cache_movies=cache_movies,
            val_movies=val_movies, resume=True, refresh_movies=refresh_movies, refresh_every=refresh_every,
            scan_family=(ScanFamily.from_dict(saved["scan_family"]) if saved.get("scan_family") else None),
            **{"combine_groups": saved.get("combine_groups", 0), "group_size": saved.get("group_size", 16), **kept,
               **overrides},
            **e2e,
        )
    check_new_run_folder(out)
    if encoder_from is not None:  # before anything is written or printed
        from dle_stream.model_package import resolve_model

        try:
            resolve_model(encoder_from)
        except DleStreamError as exc:
            raise DleStreamError(f"--encoder-from {exc}") from None
    p = get_preset(preset)
    priors = p.priors
    if steady_share is not None:
        if not 0 <= steady_share <= 1:
            raise DleStreamError(f"--steady-share {steady_share}: must be between 0 and 1")
        priors = priors.with_(box_fraction=float(steady_share))
    if effects_share is not None:
        if not 0 <= effects_share <= 1:
            raise DleStreamError(f"--effects-share {effects_share}: must be between 0 and 1")
        priors = priors.with_(effects_share=float(effects_share))
    architecture = ModelConfig()
    if warm_from is not None:
        from dle_stream.model_package import load_model_package, resolve_model

        _, parent = load_model_package(resolve_model(warm_from))
        architecture = ModelConfig.from_dict({**parent.architecture, "output": output or "d_grid"})
        # the parent's calibration belongs to its weights; a free-knot head becomes a smooth one
        # (its output layer projected on the basis at the warm start)
        architecture = replace(architecture.uncalibrated(), grid_prior_exact=True,
                               grid_basis=architecture.grid_basis or ModelConfig.grid_basis,
                               scan_features=0)  # a family parent is specialised to the scan (set below for a family)
        if parent.d_max_um2_s and d_max is None:
            priors = priors.with_(d_max_um2_s=float(parent.d_max_um2_s))
    elif output is not None:
        architecture = ModelConfig(output=output)
    if d_max is not None:
        if not d_max > priors.d_min_um2_s:
            raise DleStreamError(f"--d-max {d_max}: must exceed the prior's lower end {priors.d_min_um2_s} µm²/s")
        priors = priors.with_(d_max_um2_s=float(d_max))
    timing = p.timing
    source = f"preset {p.name}"
    given = {k: v for k, v in flags.items() if v is not None}
    if like is not None or given or timing_file is not None:
        from dle_stream.recording import open_recording, resolve_timing

        rec = open_recording(like) if like is not None else None
        try:
            fallback = None if rec is not None else p.timing
            timing, source, warnings = resolve_timing(rec, flags=dict(flags), timing_file=timing_file,
                                                      fallback=fallback, fallback_label=f"preset {p.name}")
        finally:
            if rec is not None:
                rec.close()
    problems = implausible(timing)
    if problems:
        raise DleStreamError(f"the scan timing from {source} is not that of a laser-scanning microscope "
                             f"({'; '.join(problems)}); check the recording's metadata or give the timing "
                             f"with --dwell-us, --line-period-us, --frame-period-us, --pixel-size-um")
    if timing.height_px < p.tile_height or timing.width_px < p.tile_width:
        raise DleStreamError(f"the scan's frame ({timing.height_px}×{timing.width_px} px) is smaller than a "
                             f"{p.tile_height}×{p.tile_width} px tile; check the timing source ({source})")
    if family is not None:
        if warm_from is None:
            raise DleStreamError("--family: give the model to start from (--from MODEL); its encoder is reused")
        if like is not None or given or timing_file is not None:
            raise DleStreamError("--family trains for a box of scans: leave out --like, --timing and the timing flags")
        family = replace(family, psf_sigma_xy_um=float(priors.psf_sigma_xy_um[0]))
        architecture = replace(architecture, scan_features=SCAN_FEATURES)
    folder_name = out.name or "model"
    return TrainConfig(
        name=name or folder_name, priors=priors, timing=timing, out=out, preset=p.name,
        description=f"{describe_priors(p, priors)}; timing from {source}", tile_height=p.tile_height, tile_width=p.tile_width,
        frames=p.frames, seed=seed, device=device, steps=steps, minutes=minutes, ae_steps=ae_steps,
        cache_movies=cache_movies, val_movies=val_movies, encoder_from=encoder_from,
        refresh_movies=refresh_movies, refresh_every=refresh_every, architecture=architecture,
        **overrides,
        warm_from=None if warm_from is None else Path(resolve_model(warm_from)), **e2e,
        scan_family=family,
    )
