"""The `dle-stream` command line: a thin typer shell over library functions.

Every command turns a :class:`~dle_stream.errors.DleStreamError` into one line on stderr
and exit status 2; no traceback reaches the user for a problem with their input.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dle_stream import __version__
from dle_stream.errors import DleStreamError, ParameterError

app = typer.Typer(
    name="dle-stream",
    help="Live diffusion-coefficient estimation (µm²/s) for laser-scanning microscopes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console(stderr=False)
err_console = Console(stderr=True)


#: The flag that sets each library parameter: a library error names the parameter as a
#: Python caller passes it (``hop=0``); the CLI shows it as the flag (``--hop 0``).
CLI_FLAGS: dict[str, str] = {
    "hop": "--hop",
    "window": "--window",
    "estimator": "--estimator",
    "tiles": "--tiles",
    "roi": "--roi",
    "rois": "--roi/--rois",
    "rois_file": "--rois",
    "layout": "--tiles/--roi/--rois",
    "pixel_size_um": "--pixel-size-um",
    "dwell_us": "--dwell-us",
    "line_period_us": "--line-period-us",
    "frame_period_us": "--frame-period-us",
    "bidirectional": "--bidirectional",
    "timing_file": "--timing",
    "channel": "--channel",
    "format": "--format",
    "realtime": "--realtime",
    "demo": "--demo",
    "mm_config": "--mm-config",
    "log": "--log",
    "overwrite": "--overwrite",
    "append": "--append",
    "suite": "--suite",
    "n": "--n",
    "estimators": "--estimators",
    "out": "--out",
    "recordings": "RECORDINGS",
    "workers": "--workers",
    "scheduler": "--scheduler",
    "windows": "--windows",
    "no_check": "--no-check",
    "frames": "--frames",
}


class Terminated(BaseException):
    """SIGTERM arrived: unwind (closing logs and files on the way) and exit 143."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess test
    raise Terminated()


def user_errors(fn):
    """Report DleStreamError as one line on stderr, exit status 2; Ctrl-C exits 130 and
    SIGTERM 143, both after closing what was open (the log keeps every reported window)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except ParameterError as exc:
            _print_error(exc.message_for(CLI_FLAGS))
            raise typer.Exit(2) from None
        except DleStreamError as exc:
            _print_error(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:  # a path the system refused (read-only, a file where a folder is needed, ...)
            where = exc.filename if exc.filename is not None else "a file"
            _print_error(f"{where}: {exc.strerror or exc}; check the path and that it can be written")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Terminated:
            err_console.print("terminated")
            raise typer.Exit(143) from None

    return wrapper


def _print_error(message: str) -> None:
    """One line on stderr; the message (paths, names) is printed literally, never as markup."""
    from rich.text import Text

    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def _check_out_folder(out: Path, flag: str) -> None:
    """An output folder that can be created or written: one line naming the flag otherwise."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DleStreamError(f"{flag} {out}: is a file, not a folder; give a folder path")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DleStreamError(f"{flag} {out}: {parent} is a file, not a folder; give a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DleStreamError(f"{flag} {out}: {parent} is not writable; choose a writable folder")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dle-stream {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Live diffusion-coefficient estimation (µm²/s) for laser-scanning microscopes."""


# ----------------------------------------------------------------- timing flags
PIXEL = typer.Option(None, "--pixel-size-um", help="Pixel size, µm.")
DWELL = typer.Option(None, "--dwell-us", help="Pixel dwell time, µs.")
LINE = typer.Option(None, "--line-period-us", help="Line period (full line + retrace), µs.")
FRAME = typer.Option(None, "--frame-period-us", help="Frame period (all lines + flyback), µs.")
BIDI = typer.Option(None, "--bidirectional/--unidirectional", help="Scan direction of odd lines.")
TIMING_FILE = typer.Option(None, "--timing", help="JSON file with scan-timing fields (see README).")


def _timing_flags(pixel, dwell, line, frame, bidi) -> dict:
    return {"pixel_size_um": pixel, "dwell_us": dwell, "line_period_us": line, "frame_period_us": frame,
            "bidirectional": bidi}


def _timing_for_frame(base, height: int, width: int, flags: dict, timing_file: Optional[Path]):
    """Scan timing of a height×width frame: the flags and timing file win. Otherwise, when
    the frame fits in the base scan's line and frame period, the base timing is kept (a
    model trained for it then applies); if not, the base dwell, line retrace and frame
    flyback are kept and the periods grow with the frame."""
    from dle_stream.recording import resolve_timing
    from dle_stream.timing import ScanTiming

    fallback = base.for_frame(height, width)
    if all(v is None for v in flags.values()) and timing_file is None:
        return fallback
    # derive unknown line/frame periods from a given dwell with the base retrace/flyback
    if flags.get("dwell_us") is not None and flags.get("line_period_us") is None and timing_file is None:
        flags = dict(flags, line_period_us=width * flags["dwell_us"] + base.line_retrace_us)
    if flags.get("line_period_us") is not None and flags.get("frame_period_us") is None and timing_file is None:
        flags = dict(flags, frame_period_us=height * flags["line_period_us"] + base.frame_flyback_us)
    flags = dict(flags, width_px=width, height_px=height)
    timing, _, _ = resolve_timing(None, flags=flags, timing_file=timing_file, fallback=fallback,
                                  fallback_label="the preset", names=CLI_FLAGS)
    return ScanTiming(**{**timing.to_dict(), "width_px": width, "height_px": height})


# ------------------------------------------------------------------- simulate
@app.command()
@user_errors
def simulate(
    out: Path = typer.Argument(..., help="Output recording: .tif (ImageJ), .ome.tif, or .zarr."),
    preset: str = typer.Option("low", "--preset", help="Simulation preset: low (D 0–1.5) or high (D 0–50 µm²/s)."),
    d: Optional[str] = typer.Option(None, "--d", help="D in µm²/s: one value, bands left→right '0.3,1.2', or a .npy/.tif map. Default: drawn per tile from the preset."),
    frames: int = typer.Option(400, "--frames", help="Number of frames."),
    size: str = typer.Option("20x20", "--size", help="Full frame HxW in pixels, e.g. 128x128 (tiled internally)."),
    tile: int = typer.Option(20, "--tile", help="Simulation tile size, px."),
    density: Optional[str] = typer.Option(None, "--density", help="cloud (reference: spreading clouds per tile) or box (stationary density)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed → same recording)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="tiff, ome-tiff, imagej or zarr (default: from the suffix)."),
    pixel_size_um: Optional[float] = PIXEL, dwell_us: Optional[float] = DWELL,
    line_period_us: Optional[float] = LINE, frame_period_us: Optional[float] = FRAME,
    bidirectional: Optional[bool] = BIDI, timing: Optional[Path] = TIMING_FILE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing recording (a file, or a Zarr recording written by dle-stream) and its truth file."),
) -> None:
    """Simulate a two-photon recording of diffusing particles, with its scan timing and ground truth."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dle_stream.training.priors import get_preset
    from dle_stream.training.recording_sim import parse_size, simulate_recording

    p = get_preset(preset)
    height, width = parse_size(size)
    if tile < 1:
        raise DleStreamError(f"--tile must be ≥ 1 px, got {tile}")
    if density not in (None, "cloud", "box"):
        raise DleStreamError(f"--density {density!r}: use cloud or box")
    if fmt == "tiff" and out.suffix.lower() in (".tif", ".tiff") and not out.name.lower().endswith((".ome.tif", ".ome.tiff")):
        fmt = "imagej"  # opens in Fiji with its frame interval and pixel size
    tm = _timing_for_frame(p.timing, height, width,
                           _timing_flags(pixel_size_um, dwell_us, line_period_us, frame_period_us, bidirectional), timing)
    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
                  TimeRemainingColumn(), console=err_console, transient=True, disable=frames * height * width < 2e6) as prog:
        task = prog.add_task("sim", total=frames)
        rec = simulate_recording(out, p, frames=frames, height=height, width=width, timing=tm, d_spec=d, seed=seed,
                                 tile=tile, fmt=fmt, density=density, on_frames=lambda n: prog.advance(task, n),
                                 overwrite=overwrite)
    ds = [t["d_um2_s"] for t in rec.tiles]
    console.print(f"wrote {rec.path} ({frames} frames of {height}×{width} px, {len(rec.tiles)} tiles)", markup=False,
                  highlight=False, soft_wrap=True)
    console.print(f"scan: pixel {tm.pixel_size_um:g} µm, dwell {tm.dwell_us:g} µs, line {tm.line_period_us:g} µs, "
                  f"frame {tm.frame_period_us:g} µs ({tm.frame_rate_hz:.2f} frames/s), "
                  f"{'bi' if tm.bidirectional else 'uni'}directional")
    console.print(f"true D per tile: {min(ds):.3g}–{max(ds):.3g} µm²/s (mean {sum(ds) / len(ds):.3g}); "
                  f"visible transitions per tile: {sum(t['visible_transitions'] for t in rec.tiles) / len(rec.tiles):.0f}")
    console.print(f"ground truth: {rec.truth_path}", markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------- train
@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., "--out", help="Model package folder to write, e.g. models/my-scope."),
    preset: str = typer.Option("low", "--preset", help="Priors and timing to start from: low or high."),
    like: Optional[Path] = typer.Option(None, "--like", help="Take scan timing and pixel size from this recording's metadata."),
    d_max: Optional[float] = typer.Option(None, "--d-max", help="Upper end of the D prior, µm²/s."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Budget: predictor training steps (reproducible with --seed)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Budget: wall-clock minutes for the whole training."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    resume: bool = typer.Option(False, "--resume", help="Continue the training checkpointed in --out."),
    encoder_from: Optional[Path] = typer.Option(None, "--encoder-from", help="Reuse (frozen) the encoder of this model package; skips pretraining."),
    warm_from: Optional[str] = typer.Option(None, "--warm-from", "--from", help="Start from this model package's weights (name or folder): skips pretraining; a new output layer where shapes differ. Default for a scan given by --like, timing flags or --timing: the nearest available model with the same D range."),
    scratch: bool = typer.Option(False, "--scratch", help="Train from scratch (autoencoder pretraining first), not from the nearest available model."),
    family: bool = typer.Option(False, "--family", help="Train one model for a family of scans (the box of dle_stream.scan_family.DEFAULT_FAMILY: dwell 1–10 µs, line/dwell 64–800, frame/line 32–640, frames of 20–400 ms, unidirectional, pixel 0.15 µm), taking the scan as an input; starts from --from (default: the preset's shipped model)."),
    family_box: Optional[Path] = typer.Option(None, "--family-box", help="With --family: the box as a JSON file of ScanFamily fields (line_per_dwell, frame_per_line, dwell_us, frame_period_us, pixel_size_um as [min, max]; psf_sigma_xy_um; bidirectional_share)."),
    output: Optional[str] = typer.Option(None, "--output", help="Window output: d_grid (a combinable likelihood of D; default) or gaussian (the paper's D ± σ)."),
    steady_share: Optional[float] = typer.Option(None, "--steady-share", help="Share of training movies with a steady particle density (default 0: the paper's spreading cloud only)."),
    effects_share: Optional[float] = typer.Option(None, "--effects-share", help="Share of training movies with effects of a real sample: whole-field motion, blinking, bleaching, dimmer/brighter dots, wider PSF, denser fields, each drawn per movie (default 0: none)."),
    combine_groups: Optional[int] = typer.Option(None, "--combine-groups", help="Grid heads: groups of 16 windows of one D per step whose combined likelihood joins the loss (default 2; 0: single windows only)."),
    d_draws: Optional[str] = typer.Option(None, "--d-draws", help="How training movies' D values are drawn from the prior: random (independent) or even (a low-discrepancy sequence, so that the cache holds no clusters or gaps of D for the head to learn; used for the shipped brain-qd-low). Default random."),
    val_groups: Optional[int] = typer.Option(None, "--val-groups", help="Grid heads: held-out groups of 16 windows of one D scored at every validation (default 8; more: a steadier choice of the kept weights)."),
    average_steps: Optional[float] = typer.Option(None, "--average-steps", help="Average the head's weights exponentially over about this many steps; validation, the kept weights and the package use the average (default 0: off)."),
    ae_steps: Optional[int] = typer.Option(None, "--ae-steps", help="Autoencoder pretraining steps (default 1500, or --steps when that is smaller)."),
    cache_movies: int = typer.Option(4096, "--cache-movies", help="Simulated movies kept as latents for the predictor."),
    val_movies: int = typer.Option(512, "--val-movies", help="Held-out movies for the final validation."),
    refresh_movies: int = typer.Option(4, "--refresh-movies", help="New simulated movies added to the latent cache every --refresh-every steps."),
    refresh_every: int = typer.Option(2, "--refresh-every", help="Predictor steps between cache refreshes."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of the predictor stage (default 2e-3; a third of it when resuming a trained head)."),
    e2e_steps: Optional[int] = typer.Option(None, "--e2e-steps", help="End-to-end steps (encoder trained with the head on raw movies) before the predictor stage; default none."),
    e2e_minutes: Optional[float] = typer.Option(None, "--e2e-minutes", help="Budget of the end-to-end stage, wall minutes."),
    e2e_frames: Optional[int] = typer.Option(None, "--e2e-frames", help="Frames per movie in the end-to-end stage (short keeps it affordable; default 64)."),
    e2e_batch: Optional[int] = typer.Option(None, "--e2e-batch", help="Movies per end-to-end step (default 16)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the folder name)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    pixel_size_um: Optional[float] = PIXEL, dwell_us: Optional[float] = DWELL,
    line_period_us: Optional[float] = LINE, frame_period_us: Optional[float] = FRAME,
    bidirectional: Optional[bool] = BIDI, timing: Optional[Path] = TIMING_FILE,
) -> None:
    """Train a model for a scan timing and D range (simulated data) and write a model package."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dle_stream.training import distributed
    from dle_stream.training.trainer import TrainConfig, resolve_device
    from dle_stream.training.trainer import train as run_training
    from dle_stream.training.training_setup import config_for

    _check_out_folder(out, "--out")
    if threads:
        torch.set_num_threads(threads)
    # under torchrun: join the other processes (one GPU each, or gloo on CPUs); else nothing changes
    ranks, rank_device = distributed.start(resolve_device(device))
    if scratch and (warm_from is not None or encoder_from is not None):
        raise DleStreamError("--scratch trains from scratch: leave out --from/--warm-from and --encoder-from")
    flags = _timing_flags(pixel_size_um, dwell_us, line_period_us, frame_period_us, bidirectional)

    def configure(warm: str | Path | None, d_max_um2_s: float | None) -> TrainConfig:
        return config_for(
            out=out, preset=preset, like=like, d_max=d_max_um2_s, steps=steps, minutes=minutes,
            device=rank_device, seed=seed, resume=resume, encoder_from=encoder_from,
            ae_steps=ae_steps,
            cache_movies=cache_movies, val_movies=val_movies, name=name, refresh_movies=refresh_movies,
            refresh_every=refresh_every,
            end_to_end={"e2e_steps": e2e_steps, "e2e_minutes": e2e_minutes, "e2e_frames": e2e_frames, "e2e_batch": e2e_batch},
            flags=flags, timing_file=timing, warm_from=warm, steady_share=steady_share, output=output, lr=lr,
            combine_groups=combine_groups, effects_share=effects_share, family=box,
            d_draws=d_draws, val_groups=val_groups, average_steps=average_steps,
        )

    box = None
    if family_box is not None and not family:
        raise DleStreamError("--family-box: add --family (it gives the box of a family model)")
    if family:
        from dle_stream.scan_family import DEFAULT_FAMILY, ScanFamily

        box = DEFAULT_FAMILY if family_box is None else ScanFamily.from_file(family_box)
        if scratch or encoder_from is not None:
            raise DleStreamError("--family starts from a trained model's encoder: leave out --scratch/--encoder-from")
        if warm_from is None and not resume:
            from dle_stream.model_choice import warm_start_parent
            from dle_stream.training.priors import get_preset

            p = get_preset(preset)
            lo, hi = p.priors.d_min_um2_s, (d_max or p.priors.d_max_um2_s)
            chosen = warm_start_parent(p.timing, lo, hi)
            if chosen is None:
                raise DleStreamError(f"--family: no available model for D {lo:g}–{hi:g} µm²/s to start from; "
                                     f"give one with --from MODEL")
            warm_from = str(chosen[1])
    cfg: TrainConfig = configure(warm_from, d_max)
    note = None
    own_scan = like is not None or timing is not None or any(v is not None for v in flags.values())
    if own_scan and not (scratch or resume or family or warm_from is not None or encoder_from is not None):
        # a new scan: start from the nearest available model with this D range (item 2 of issue 16)
        from dle_stream.model_choice import warm_start_note, warm_start_parent

        lo, hi = cfg.priors.d_min_um2_s, cfg.priors.d_max_um2_s
        chosen = warm_start_parent(cfg.timing, lo, hi)
        if chosen is not None:
            dist, parent_folder, parent = chosen
            cfg = configure(parent_folder, hi)  # the preset's (or --d-max's) range, not the parent's
            note = warm_start_note(dist, parent, lo, hi)
    if not ranks.main:  # rank 0 reports and writes; the others train their share quietly
        run_training(cfg, log=lambda *a: None, ranks=ranks)
        return
    console.print(f"training [bold]{cfg.name}[/]: D {cfg.priors.d_min_um2_s:g}–{cfg.priors.d_max_um2_s:g} µm²/s, "
                  f"dwell {cfg.timing.dwell_us:g} µs, line {cfg.timing.line_period_us:g} µs, "
                  f"frame {cfg.timing.frame_period_us:g} µs, device {cfg.device}")
    if note is not None:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:>6.0f}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False, refresh_per_second=2) as progress:
        try:
            folder = run_training(cfg, progress=progress, log=progress.console.print, ranks=ranks)
        except KeyboardInterrupt:
            from dle_stream.model_package import CARD_FILE

            package = (cfg.out / CARD_FILE).is_file()
            progress.console.print(f"stopped; checkpoint {'and model package ' if package else ''}in {cfg.out} "
                                   f"(continue with --resume)", markup=False)
            raise typer.Exit(130) from None
    from dle_stream.model_package import load_card

    validation = load_card(folder).validation
    v = validation["dle"]
    console.print(f"wrote {folder}: validation L1 {v['l1']:.4g} µm²/s (best half {v['best_half_l1']:.4g}), "
                  f"|err|<σ {v['within_1_sigma']:.0%}, <2σ {v['within_2_sigma']:.0%} on {validation['n_movies']} held-out movies")


@app.command()
@user_errors
def calibrate(
    model: Path = typer.Argument(..., help="Model package folder to calibrate (rewritten in place: card and weights)."),
    movies: int = typer.Option(512, "--movies", help="Held-out simulated windows per true D value (25 values): movies/8 steady-density tiles × 8 consecutive windows, and as many independent windows of the paper's spreading cloud; at least 128."),
    save_windows: Optional[Path] = typer.Option(None, "--save-windows", help="Also write the simulated window likelihoods to this new .npz file (to try calibrations offline)."),
    windows: Optional[Path] = typer.Option(None, "--windows", help="Fit on window likelihoods saved by --save-windows from this model's weights instead of simulating."),
    width_profile: bool = typer.Option(False, "--width-profile", help="Also fit a width that depends on D, read where each (combined) likelihood peaks: for a model whose intervals are too wide at some D and too narrow at others (BENCHMARKS.md, 'A width that depends on D')."),
) -> None:
    """Calibrate a grid model's likelihood for combining (smoothing, D axis, temperature, systematic error, disagreement scale), fitted on held-out movies of known D."""
    from dle_stream.model_package import load_model_package
    from dle_stream.training.calibration import calibrate as fit
    from dle_stream.training.calibration import load_cloud_cells, load_tile_cells, weights_fingerprint

    if save_windows is not None and save_windows.exists():
        raise DleStreamError(f"--save-windows {save_windows}: the file exists; give a new file name")
    saved: dict = {}
    if windows is not None:
        if not windows.is_file():
            raise DleStreamError(f"--windows {windows}: no such file; write one with --save-windows")
        try:
            tiles, fractions, seed, sha = load_tile_cells(windows)
        except DleStreamError as exc:
            raise DleStreamError(f"--windows {exc}") from None
        if sha != weights_fingerprint(load_model_package(model)[0]):
            raise DleStreamError(f"--windows {windows}: simulated with other weights than {model}'s; simulate anew "
                                 f"(leave out --windows)")
        saved = {"tiles": tiles, "fractions": tuple(float(x) for x in fractions), "seed": seed,
                 "cloud": load_cloud_cells(windows)}  # simulated anew when the file has none
    r = fit(model, n_per_cell=movies, log=lambda m: console.print(m, markup=False), save_windows=save_windows,
            posterior_profile=width_profile, **saved)
    b, a = r["before"], r["after"]
    console.print(f"{model}: temperature {r['temperature']:.3g}, systematic error {r['systematic_rel']:.0%} of D, "
                  f"D axis warped at {r['warp_points']} points, disagreement scale {r['lr_scale']:.2g}"
                  + (" (output projected on the smooth basis)" if r["projected_to_spline_basis"] else "")
                  + f"; 68 % intervals hold the true D (10–90 % of the range, {r['n_per_cell']} windows per D, "
                  + "cell by cell, fewest–most) "
                  + "; ".join(f"{k.replace('_', ' ')}: {b[k]['coverage68_min']:.0%}–{b[k]['coverage68_max']:.0%} → "
                              f"{a[k]['coverage68_min']:.0%}–{a[k]['coverage68_max']:.0%}" for k in a)
                  + "; disagreement false alarms " + ", ".join(f"{k.replace('_', ' ')} {v:.0%}"
                                                              for k, v in r["disagreement_false_alarms"].items()),
                  markup=False)


# ------------------------------------------------------------------ streaming
MODEL = typer.Option("brain-qd-low", "--model", help="Model package name or folder (see `dle-stream models`).")
ESTIMATOR = typer.Option("dle", "--estimator", help="dle (deep-learning estimator), classic (trackpy + CVE) or rics (raster image correlation).")
TILES = typer.Option("grid", "--tiles", help="grid: cover the frame with model-sized tiles.")
ROI = typer.Option(None, "--roi", help="Region x,y,w,h or name=x,y,w,h in pixels (repeatable); covered by model tiles.")
ROIS = typer.Option(None, "--rois", help="JSON or CSV file of ROIs (name,x,y,w,h).")
WINDOW = typer.Option(None, "--window", help="Frames per window (default: the model's, 400).")
HOP = typer.Option(50, "--hop", help="Frames between consecutive windows.")
LOG = typer.Option(None, "--log", help="Write every estimate to this Zarr store (e.g. run.zarr).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing --log store.")
APPEND = typer.Option(False, "--append", help="Continue an existing --log store (e.g. of a killed run).")
DASH = typer.Option(True, "--dashboard/--no-dashboard", help="Live terminal dashboard (plain lines when off or not a terminal).")
QUIET = typer.Option(False, "--quiet", help="No progress output, only the final summary.")


def _dashboard_mode(dashboard: bool, quiet: bool) -> str:
    if quiet:
        return "quiet"
    return "live" if dashboard and console.is_terminal else "plain"


def _stream_options(model, estimator, tiles, roi, rois, window, hop, log, overwrite, append, dashboard, quiet,
                    flags, timing, device="cpu"):
    if append and log is None:
        raise DleStreamError("--append continues a run log: give it with --log RUN.zarr")
    from dle_stream.session import StreamOptions

    return StreamOptions(model=model, estimator=estimator, tiles=tiles, roi=list(roi or []), rois_file=rois,
                         window=window, hop=hop, log=log, overwrite=overwrite, append=append, timing_flags=flags,
                         timing_file=timing, device=device, dashboard=_dashboard_mode(dashboard, quiet),
                         parameter_names=CLI_FLAGS)


@app.command()
@user_errors
def replay(
    recording: Path = typer.Argument(..., help="Recording to replay: TIFF, OME-TIFF, ImageJ, ScanImage TIFF or Zarr."),
    model: str = MODEL, estimator: str = ESTIMATOR, tiles: str = TILES, roi: Optional[list[str]] = ROI,
    rois: Optional[Path] = ROIS, window: Optional[int] = WINDOW, hop: int = HOP, log: Optional[Path] = LOG,
    overwrite: bool = OVERWRITE, append: bool = APPEND,
    realtime: bool = typer.Option(False, "--realtime", help="Pace frames by the recorded timing (default: as fast as possible)."),
    channel: Optional[int] = typer.Option(None, "--channel", help="Channel to use in a multi-channel recording."),
    dashboard: bool = DASH, quiet: bool = QUIET,
    pixel_size_um: Optional[float] = PIXEL, dwell_us: Optional[float] = DWELL,
    line_period_us: Optional[float] = LINE, frame_period_us: Optional[float] = FRAME,
    bidirectional: Optional[bool] = BIDI, timing: Optional[Path] = TIMING_FILE,
    no_check: bool = typer.Option(False, "--no-check", help="Skip the recording check (see `dle-stream check`) before the replay."),
) -> None:
    """Replay a recording: D ± σ per tile and ROI in rolling windows, logged to Zarr."""
    from dle_stream.session import describe_result
    from dle_stream.session import replay as run_replay

    opts = _stream_options(model, estimator, tiles, roi, rois, window, hop, log, overwrite, append, dashboard, quiet,
                           _timing_flags(pixel_size_um, dwell_us, line_period_us, frame_period_us, bidirectional), timing)
    opts.recording_check = not no_check
    result = run_replay(recording, opts, realtime=realtime, channel=channel, console=console)
    describe_result(result, console)


@app.command()
@user_errors
def batch(
    recordings: list[Path] = typer.Argument(..., help="Recordings to replay (TIFF family or Zarr), e.g. runs/*.tif."),
    out: Path = typer.Option(..., "--out", help="Folder for one Zarr log per recording and the table results.csv."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running dask scheduler (tcp://HOST:8786); default: a local cluster."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes of the local cluster (default: one per core)."),
    model: str = MODEL, estimator: str = ESTIMATOR, tiles: str = TILES, roi: Optional[list[str]] = ROI,
    rois: Optional[Path] = ROIS, window: Optional[int] = WINDOW, hop: int = HOP,
    channel: Optional[int] = typer.Option(None, "--channel", help="Channel to use in multi-channel recordings."),
    pixel_size_um: Optional[float] = PIXEL, dwell_us: Optional[float] = DWELL,
    line_period_us: Optional[float] = LINE, frame_period_us: Optional[float] = FRAME,
    bidirectional: Optional[bool] = BIDI, timing: Optional[Path] = TIMING_FILE,
) -> None:
    """Replay many recordings on a Dask cluster: a log each, one table of every estimate (needs the optional cluster extra)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dle_stream.batch import TABLE_NAME, replay_batch, summary

    opts = _stream_options(model, estimator, tiles, roi, rois, window, hop, None, False, False, False, True,
                           _timing_flags(pixel_size_um, dwell_us, line_period_us, frame_period_us, bidirectional), timing)
    console.print(f"starting {'the cluster at ' + scheduler if scheduler else 'a local dask cluster'} "
                  f"for {len(recordings)} recordings", markup=False, highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("recordings", total=len({r.expanduser().absolute() for r in recordings}), info="")
        failed = 0

        def report(o) -> None:
            nonlocal failed
            failed += not o.ok
            line = (f"FAILED {o.recording}: {o.error}" if not o.ok
                    else f"{o.status} {o.recording}: {o.windows} windows → {o.log}")
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            progress.update(task, advance=1, info=f"{failed} failed" if failed else "")

        outcomes = replay_batch(recordings, out, opts, channel=channel, scheduler=scheduler, workers=workers,
                                on_outcome=report)
    carried = [o for o in outcomes if o.earlier_rows]
    kept = (f" ({len(carried)} failed recordings keep their rows from the earlier table)" if carried else "")
    console.print(f"{summary(outcomes)}; table: {out / TABLE_NAME}{kept}", markup=False, highlight=False,
                  soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def run(
    demo: bool = typer.Option(False, "--demo", help="Use the built-in simulated two-photon camera (no microscope needed)."),
    mm_config: Optional[Path] = typer.Option(None, "--mm-config", help="Micro-Manager configuration file of the rig."),
    scan_properties: Optional[Path] = typer.Option(None, "--scan-properties", help="JSON mapping device properties to scan timing (see README)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Stop after this many frames (default: until Ctrl-C)."),
    size: str = typer.Option("40x120", "--size", help="Demo camera frame HxW in pixels."),
    d: str = typer.Option("0.3,1.2", "--d", help="Demo camera D map in µm²/s (bands left→right, as `simulate --d`)."),
    seed: int = typer.Option(0, "--seed", help="Demo camera seed."),
    fast: bool = typer.Option(False, "--fast", help="Demo camera as fast as possible instead of in real time."),
    model: str = MODEL, estimator: str = ESTIMATOR, tiles: str = TILES, roi: Optional[list[str]] = ROI,
    rois: Optional[Path] = ROIS, window: Optional[int] = WINDOW, hop: int = HOP, log: Optional[Path] = LOG,
    overwrite: bool = OVERWRITE, append: bool = APPEND, dashboard: bool = DASH, quiet: bool = QUIET,
    pixel_size_um: Optional[float] = PIXEL, dwell_us: Optional[float] = DWELL,
    line_period_us: Optional[float] = LINE, frame_period_us: Optional[float] = FRAME,
    bidirectional: Optional[bool] = BIDI, timing: Optional[Path] = TIMING_FILE,
    no_check: bool = typer.Option(False, "--no-check", help="Skip the recording check (see `dle-stream check`) on the first full window."),
) -> None:
    """Estimate live from a microscope (Micro-Manager) or the built-in demo camera."""
    from dle_stream.session import describe_result, run_live
    from dle_stream.training.recording_sim import parse_size

    if frames is not None and frames < 1:
        raise DleStreamError(f"--frames {frames}: must be at least 1")
    height, width = parse_size(size)
    opts = _stream_options(model, estimator, tiles, roi, rois, window, hop, log, overwrite, append, dashboard, quiet,
                           _timing_flags(pixel_size_um, dwell_us, line_period_us, frame_period_us, bidirectional), timing)
    opts.recording_check = not no_check
    result = run_live(opts, demo=demo, mm_config=mm_config, scan_properties=scan_properties, frames=frames,
                      height=height, width=width, d_spec=d, seed=seed, realtime=not fast, console=console)
    describe_result(result, console)
    if result.failure:  # what was estimated is printed and logged above; the run still did not finish
        _print_error(result.failure)
        raise typer.Exit(1)


@app.command()
@user_errors
def bench(
    suite: str = typer.Option("low", "--suite", help="low (D 0–1.5) or high (D 0–50 µm²/s), or combine (combined estimates of K independent windows, inside and beyond the range; --n groups per cell, default 100)."),
    n: int = typer.Option(1000, "--n", help="Movies in the suite."),
    seed: int = typer.Option(20_241_001, "--seed", help="Seed of the suite (identical for every estimator)."),
    estimators: str = typer.Option("dle,classic,rics,oracle", "--estimators", help="Any of dle,classic,rics,oracle."),
    model: Optional[str] = typer.Option(None, "--model", help="Model for the DLE (default: the suite's shipped model)."),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Folder for results.json, table.md and plots."),
    density: str = typer.Option("cloud", "--density", help="combine suite only: cloud (the paper's spreading cloud) or box (a steady density, particles entering and leaving, as in a sample)."),
) -> None:
    """Compare estimators on a seeded simulated suite: the paper's Table 1 and Fig. 3."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dle_stream.evaluation.bench import markdown_table, run_suite, write_results
    from dle_stream.evaluation.bench_files import SUITE_FILES, check_replaceable

    names = [e.strip() for e in estimators.split(",") if e.strip()]
    _check_out_folder(out, "--out")
    if density != "cloud" and suite != "combine":
        raise DleStreamError(f"--density {density}: only the combine suite takes a density (the low and high suites "
                             "are the paper's, cloud); leave --density out")
    if suite == "combine":
        _bench_combine(model, n if n != 1000 else 100, out, density)
        return
    check_replaceable(out, SUITE_FILES)  # before the suite runs, not after
    with Progress(TextColumn(f"bench {suite}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as prog:
        task = prog.add_task("bench", total=n)
        res = run_suite(suite, n, seed, names, model=model, progress=lambda k: prog.advance(task, k))
    command = "dle-stream " + " ".join(sys.argv[1:]) if sys.argv and "dle-stream" in sys.argv[0] else "dle-stream bench"
    m = write_results(res, out, command)
    console.print(markdown_table(res, m), highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/results.json, table.md and plots")


def _bench_combine(model: str | None, n: int, out: Path, density: str = "cloud") -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dle_stream.evaluation.bench_combine import BEYOND, INSIDE, KS, markdown, run_combine, write
    from dle_stream.evaluation.bench_files import COMBINE_FILES, check_replaceable

    models = [model] if model else ["brain-qd-low", "beads-high"]
    folders = {name: out / Path(name).name if len(models) > 1 else out for name in models}
    for folder in folders.values():  # every output folder checked before the first (long) run
        check_replaceable(folder, COMBINE_FILES)
    for name, folder in folders.items():
        total = n * max(KS) * len(INSIDE + BEYOND)
        with Progress(TextColumn(f"combine {name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err_console, transient=True) as prog:
            task = prog.add_task("combine", total=total)
            doc = run_combine(name, n=n, progress=functools.partial(prog.advance, task), density=density)
        write(doc, folder)
        console.print(markdown(doc), highlight=False, soft_wrap=True, markup=False)
        console.print(f"wrote {folder}/combine.json, combine.md and combine.png", markup=False)


@app.command()
@user_errors
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the simulated recording and its log, kept (default: a temporary folder, removed at the end)."),
    frames: int = typer.Option(1000, "--frames", help="Frames to simulate."),
    d: str = typer.Option("0.3,1.2", "--d", help="True D of the left and right halves, µm²/s."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated recording."),
    model: str = MODEL, dashboard: bool = DASH, quiet: bool = QUIET,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the demo.tif, its truth file and the demo.zarr log already in --out (recordings and logs dle-stream wrote; any other file is never replaced)."),
) -> None:
    """The built-in default: simulate a two-region recording with known D, replay it, print estimates next to the truth."""
    import tempfile

    from dle_stream.session import describe_result
    from dle_stream.session import replay as run_replay
    from dle_stream.training.priors import get_preset
    from dle_stream.training.recording_sim import simulate_recording

    if out is not None:
        _check_out_folder(out, "--out")
        _check_demo_files(Path(out), overwrite)
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="dle-stream-demo-"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        p = get_preset("low")
        height, width = 40, 120
        from dle_stream.session import demo_timing

        tm = demo_timing(model, height, width)
        console.print(f"simulating {frames} frames of {height}×{width} px (left half D = {d.split(',')[0]}, "
                      f"right half D = {d.split(',')[-1]} µm²/s) into {folder}", markup=False, highlight=False,
                      soft_wrap=True)
        # files already in --out were checked above: replaced only with --overwrite, and only dle-stream's own
        rec = simulate_recording(folder / "demo.tif", p, frames=frames, height=height, width=width, timing=tm,
                                 d_spec=d, seed=seed, overwrite=overwrite)
        opts = _stream_options(model, "dle", "grid", [f"left=0,0,{width // 2},{height}", f"right={width // 2},0,{width // 2},{height}"],
                               None, None, 50, folder / "demo.zarr", overwrite, False, dashboard, quiet,
                               _timing_flags(None, None, None, None, None), None)
        result = run_replay(rec.path, opts, console=console)
        describe_result(result, console)
    finally:
        if out is None:  # the temporary folder is ours alone: leave nothing behind, finished or not
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    if out is None:
        console.print("(the demo's recording and log were in a temporary folder, now removed; "
                      "pass --out FOLDER to keep them)", markup=False, highlight=False, soft_wrap=True)


def _check_demo_files(out: Path, overwrite: bool) -> None:
    """Before anything is simulated: the demo's files already in ``out`` (a recording, its
    truth file, a run log) are replaced only with --overwrite, and a demo.tif that dle-stream
    did not write never is."""
    from dle_stream.recording.writer import is_own_recording

    def present(path: Path) -> bool:  # (an empty folder holds nothing to lose)
        return path.is_symlink() or (path.is_dir() and any(path.iterdir())) or (path.exists() and not path.is_dir())

    held = [n for n in ("demo.tif", "demo.tif.truth.json", "demo.zarr") if present(out / n)]
    if "demo.tif" in held and not is_own_recording(out / "demo.tif"):
        raise DleStreamError(f"--out {out}: its demo.tif is not a recording dle-stream wrote; refusing to replace it "
                             f"(even with --overwrite); choose another --out folder")
    if "demo.tif.truth.json" in held and not _is_own_truth_file(out / "demo.tif.truth.json"):
        raise DleStreamError(f"--out {out}: its demo.tif.truth.json is not a truth file dle-stream wrote; refusing "
                             f"to replace it (even with --overwrite); choose another --out folder")
    if held and not overwrite:
        raise ParameterError(f"--out {out}: it already holds {held[0]} (an earlier demo, or your own files of that "
                             f"name); pass --overwrite to replace the demo's files, or choose another --out folder")


def _is_own_truth_file(path: Path) -> bool:
    """A ground-truth file of ``simulate`` (its ``software`` names dle-stream)."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("software", "")).startswith("dle-stream ")


log_app = typer.Typer(help="Inspect a run's Zarr log.", no_args_is_help=True)
app.add_typer(log_app, name="log")


@log_app.command("show")
@user_errors
def log_show(path: Path = typer.Argument(..., help="A Zarr log written with --log.")) -> None:
    """Summary per ROI and tile: last and combined D ± σ, flagged share."""
    from dle_stream.log_summary import render_summary

    console.print(render_summary(path))


@log_app.command("export")
@user_errors
def log_export(
    path: Path = typer.Argument(..., help="A Zarr log written with --log."),
    csv_path: Path = typer.Option(..., "--csv", help="CSV file to write (one row per window and tile)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing CSV file."),
) -> None:
    """Export every estimate of a log to CSV."""
    from dle_stream.log_summary import export_csv

    if csv_path.is_dir():
        raise DleStreamError(f"--csv {csv_path}: is a folder; give a file name such as run.csv")
    if not csv_path.parent.is_dir():
        raise DleStreamError(f"--csv {csv_path}: the folder {csv_path.parent} does not exist (or is a file); "
                             f"create it or choose another path")
    if (csv_path.exists() or csv_path.is_symlink()) and not overwrite:
        raise DleStreamError(f"--csv {csv_path}: the file already exists; pass --overwrite to replace it, "
                             f"or choose another file")
    from dle_stream.files import write_atomic

    # written beside it and renamed when complete: a failed export never leaves half a file
    rows: list[int] = []
    try:
        write_atomic(csv_path, lambda tmp: rows.append(export_csv(path, tmp, shown=f"--csv {csv_path}")))
    except OSError as exc:
        raise DleStreamError(f"--csv {csv_path}: cannot write it ({exc.strerror or exc}); choose a writable path") from None
    n = rows[0]
    console.print(f"wrote {n} rows to {csv_path}", markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------- check
@app.command()
@user_errors
def check(
    recording: Optional[Path] = typer.Argument(None, help="Recording to check: TIFF, OME-TIFF, ImageJ, ScanImage TIFF or Zarr."),
    model: str = MODEL,
    write_reference: Optional[str] = typer.Option(None, "--write-reference", metavar="MODEL", help="Instead of checking a recording: write MODEL's reference ranges into its package folder (recording_check.json), so that replay and check need not simulate them."),
    windows: int = typer.Option(4, "--windows", help="Windows of the model's length to look at, spread over the recording."),
    channel: Optional[int] = typer.Option(None, "--channel", help="Channel to use in a multi-channel recording."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
    pixel_size_um: Optional[float] = PIXEL, dwell_us: Optional[float] = DWELL,
    line_period_us: Optional[float] = LINE, frame_period_us: Optional[float] = FRAME,
    bidirectional: Optional[bool] = BIDI, timing: Optional[Path] = TIMING_FILE,
) -> None:
    """Does the recording look like what the model was trained on? Brightness, PSF width, density, motion against the trained ranges (exit status 1 when outside)."""
    import json

    from dle_stream.recording_check import check_recording

    if write_reference is not None:
        from dle_stream.recording_check import write_reference as write_ref

        console.print(f"simulating the reference tiles of {write_reference} (about a minute unless cached)",
                      markup=False, highlight=False)
        written = write_ref(write_reference)
        console.print(f"wrote {written}", markup=False, highlight=False, soft_wrap=True)
        return
    if recording is None:
        raise DleStreamError("check: give a RECORDING to check (or --write-reference MODEL)")
    res = check_recording(recording, model=model, windows=windows, channel=channel, names=CLI_FLAGS,
                          timing_flags=_timing_flags(pixel_size_um, dwell_us, line_period_us, frame_period_us,
                                                     bidirectional), timing_file=timing)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), ensure_ascii=False))
    else:
        from rich.table import Table

        table = Table(title=f"recording check: {recording.name} against {res.model} "
                            f"({res.tiles} tiles × {res.windows} windows of {res.frames} frames)")
        for col in ("quantity", "measured", "trained range", "unit", "verdict"):
            table.add_column(col)
        def fmt(x: Optional[float]) -> str:
            return "—" if x is None else f"{x:.3g}"

        for r in res.rows:
            rng = ("—" if r.low is None and r.high is None else f"≤ {fmt(r.high)}" if r.low is None
                   else f"≥ {fmt(r.low)}" if r.high is None else f"{fmt(r.low)}–{fmt(r.high)}")
            verdict = {"ok": "ok", "low": "[bold red]below[/]", "high": "[bold red]above[/]"}.get(r.status, r.status)
            table.add_row(r.label, fmt(r.value) + (f" ({r.note})" if r.note else ""), rng, r.unit, verdict)
        console.print(table)
        for w in res.warnings:
            console.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
        console.print(res.summary_line(), markup=False, highlight=False, soft_wrap=True)
    if not res.ok:
        raise typer.Exit(1)


# --------------------------------------------------------------------- models
@app.command()
@user_errors
def models() -> None:
    """List the available model packages and their key card fields."""
    from rich.table import Table

    from dle_stream.model_package import list_models

    table = Table(title="dle-stream models")
    for col in ("name", "D range µm²/s", "tile", "window", "dwell / line / frame µs", "pixel µm", "val L1", "path"):
        table.add_column(col)
    found = list_models()
    rows: list[list[str]] = []
    for path, card in found:
        t = card.timing
        val = card.validation.get("dle", {}) if isinstance(card.validation, dict) else {}
        l1 = f"{val['l1']:.3g}" if isinstance(val.get("l1"), (int, float)) else "—"
        fam = card.family
        scan = (f"{t.dwell_us:g} / {t.line_period_us:g} / {t.frame_period_us:g}" if fam is None else
                f"family: dwell {fam.dwell_us[0]:g}–{fam.dwell_us[1]:g}, line/dwell {fam.line_per_dwell[0]:g}–"
                f"{fam.line_per_dwell[1]:g}, frame/line {fam.frame_per_line[0]:g}–{fam.frame_per_line[1]:g}, "
                f"frame {fam.frame_period_us[0]:g}–{fam.frame_period_us[1]:g}")
        rows.append([card.name, f"{card.d_min_um2_s:g}–{card.d_max_um2_s:g}", f"{card.tile_height}×{card.tile_width}",
                     str(card.window_frames), scan,
                     f"{card.pixel_size_um:g}", l1, str(path)])
        table.add_row(*rows[-1])
    if not found:
        console.print("no model packages found (set DLE_STREAM_MODELS or train one with `dle-stream train`)")
        return
    if not console.is_terminal:  # piped (grep, a script): whole names and paths, one tab-separated line each
        for row in [[str(c.header) for c in table.columns], *rows]:
            typer.echo("\t".join(str(v) for v in row))
        return
    console.print(table)

