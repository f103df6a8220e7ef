"""Which model serves a scan, and what to say when none does.

A model is valid for one scan up to a common time scale (docs/design.md §3): what must match
are the scan's *ratios* (line period / dwell, frame period / line period), its pixel size and
its direction. :func:`scan_distance` measures how far two scans are in those terms (0: the
model serves the scan), :func:`rank_models` orders the available packages by it, and
:func:`no_model_message` is the one-line answer for a scan no model serves: the nearest
model, how far its ratios are, and the exact command that trains one (warm-started from it).
:func:`warm_start_parent` is the package ``dle-stream train`` starts from when a new scan's
training is not told where to start (``--from MODEL`` or ``--scratch``).

A *family* model (:mod:`dle_stream.scan_family`) serves every scan inside its box;
:func:`serving_model` is what ``replay``/``run`` use: the model asked for when it serves
the scan, else an available family model of the same D range whose box holds the scan
(with a note saying so), else nothing. A family model whose box holds a scan is also a
warm-start parent for it (specialised to the scan, :func:`~dle_stream.scan_family.specialise_to_scan`,
it starts at the family's accuracy there; among parents at distance 0, one-scan models first).
"""

from __future__ import annotations

import math
from pathlib import Path

from dle_stream.model_package import ModelCard, list_models
from dle_stream.timing import ScanTiming


def scan_ratios(timing: ScanTiming) -> dict[str, float]:
    """The numbers a model must share with a scan: line/dwell, frame/line, pixel size (µm)."""
    return {"line_per_dwell": timing.line_period_us / timing.dwell_us,
            "frame_per_line": timing.frame_period_us / timing.line_period_us,
            "pixel_size_um": timing.pixel_size_um}


def scan_distance(model: ScanTiming, scan: ScanTiming) -> float:
    """Sum of |log ratio| of the three numbers of :func:`scan_ratios`, + 1 if the direction differs."""
    a, b = scan_ratios(model), scan_ratios(scan)
    d = sum(abs(math.log(b[k] / a[k])) for k in a)
    return d + (1.0 if model.bidirectional != scan.bidirectional else 0.0)


def rank_models(scan: ScanTiming, prefer: str | None = None) -> list[tuple[float, Path, ModelCard]]:
    """Available packages ordered by :func:`scan_distance` to ``scan`` (nearest first; among
    equally near ones, the model named ``prefer`` first)."""
    ranked = []
    for folder, card in list_models():
        try:
            timing = card.timing
        except Exception:  # noqa: BLE001 - a package with an unreadable timing serves nothing
            continue
        if card.scan_family:  # serves its box (serving_model), not one scan to be near to
            continue
        ranked.append((scan_distance(timing, scan), folder, card))
    ranked.sort(key=lambda r: (round(r[0], 9), r[2].name != prefer))
    return ranked


#: D prior ranges whose ends differ by less than this share of the wanted range count as the same
SAME_RANGE_TOLERANCE = 0.1


def d_range_distance(card: ModelCard, d_min_um2_s: float, d_max_um2_s: float) -> float:
    """|log| of the ratio of the model's D prior width to the wanted one (0: the same width)."""
    have = card.d_max_um2_s - card.d_min_um2_s
    want = d_max_um2_s - d_min_um2_s
    if not (have > 0 and want > 0):
        return math.inf
    return abs(math.log(have / want))


def same_d_range(card: ModelCard, d_min_um2_s: float, d_max_um2_s: float) -> bool:
    """The model's D prior is the wanted one (both ends within :data:`SAME_RANGE_TOLERANCE` of its width)."""
    width = d_max_um2_s - d_min_um2_s
    return (abs(card.d_min_um2_s - d_min_um2_s) <= SAME_RANGE_TOLERANCE * width
            and abs(card.d_max_um2_s - d_max_um2_s) <= SAME_RANGE_TOLERANCE * width)


def warm_start_parent(scan: ScanTiming, d_min_um2_s: float, d_max_um2_s: float,
                      models: list[tuple[Path, ModelCard]] | None = None) -> tuple[float, Path, ModelCard] | None:
    """The package a training for ``scan`` and the D prior [d_min, d_max] µm²/s starts from
    by default: (scan distance, folder, card), or None when no package is available.

    The D range comes first: a warm start keeps the parent's output layer, whose D grid is in
    units of the parent's ``d_max``, so a parent trained for another range would start every
    window's likelihood in the wrong place (the low-D preset starts from brain-qd-low, the
    high one from beads-high). Among the models with the wanted range (ends within 10 % of its
    width) the nearest by :func:`scan_distance` wins (ties: by name); when none has that range,
    the nearest by scan distance plus :func:`d_range_distance`. ``models``: (folder, card)
    pairs to choose from (default: :func:`~dle_stream.model_package.list_models`).
    """
    candidates = []
    for folder, card in (list_models() if models is None else models):
        try:
            timing = card.timing
        except Exception:  # noqa: BLE001 - a package with an unreadable timing serves nothing
            continue
        family = card.family if card.scan_family else None
        if family is not None and not family.contains(scan):
            continue  # a family serves (and is specialised to) the scans of its box only
        dist = 0.0 if family is not None else scan_distance(timing, scan)
        same = same_d_range(card, d_min_um2_s, d_max_um2_s)
        extra = 0.0 if same else d_range_distance(card, d_min_um2_s, d_max_um2_s)
        if not math.isfinite(extra):
            continue
        candidates.append(((not same, round(dist + extra, 9), family is not None, card.name), dist, folder, card))
    if not candidates:
        return None
    _, dist, folder, card = min(candidates, key=lambda c: c[0])
    return dist, folder, card


def warm_start_note(dist: float, card: ModelCard, d_min_um2_s: float, d_max_um2_s: float) -> str:
    """What ``train`` says about a default warm start: the parent, why it, and how to choose otherwise."""
    r = scan_ratios(card.timing)
    rng = ("the same D range" if same_d_range(card, d_min_um2_s, d_max_um2_s)
           else f"D {card.d_min_um2_s:g}–{card.d_max_um2_s:g} µm²/s, no available model has "
                f"{d_min_um2_s:g}–{d_max_um2_s:g}")
    if card.scan_family:
        return (f"warm start from {card.name}, a family model whose box holds this scan ({rng}), specialised to "
                f"this scan (it already serves it: `replay` uses it without training); --scratch trains from "
                f"scratch, --from MODEL starts from another")
    return (f"warm start from {card.name}, the nearest available model ({rng}; its scan: line/dwell "
            f"{r['line_per_dwell']:.4g}, frame/line {r['frame_per_line']:.4g}, pixel {r['pixel_size_um']:g} µm; "
            f"distance {dist:.2f}); --scratch trains from scratch, --from MODEL starts from another")


def no_model_message(scan: ScanTiming, recording: str | Path | None, asked: str) -> str:
    """One line: the scan, why ``asked`` does not serve it, the nearest model and the train command."""
    r = scan_ratios(scan)
    here = (f"line/dwell {r['line_per_dwell']:.4g}, frame/line {r['frame_per_line']:.4g}, pixel "
            f"{r['pixel_size_um']:g} µm, {'bi' if scan.bidirectional else 'uni'}directional")
    ranked = rank_models(scan, prefer=Path(str(asked)).name)
    like = f"--like {recording}" if recording is not None else "--dwell-us … --line-period-us … --frame-period-us …"
    try:
        from dle_stream.model_package import load_card, resolve_model

        asked_card = load_card(resolve_model(asked))
        family = family_for(scan, asked_card.d_min_um2_s, asked_card.d_max_um2_s)
    except Exception:  # noqa: BLE001 - the message must not fail for the asked model's sake
        family = None
    if family is not None:
        return (f"model {asked} does not serve this scan ({here}); the family model {family[1].name} does (same D "
                f"range): use --model {family[1].name} (or leave out --model), or train a model for this scan: "
                f"dle-stream train {like} --out models/my-scope --minutes 15")
    if not ranked:
        return (f"no model serves this scan ({here}); train one: dle-stream train {like} --out models/my-scope "
                f"--minutes 30")
    _, folder, card = ranked[0]
    m = scan_ratios(card.timing)
    nearest = (f"nearest: {card.name} (line/dwell {m['line_per_dwell']:.4g}, frame/line {m['frame_per_line']:.4g}, "
               f"pixel {m['pixel_size_um']:g} µm)")
    return (f"model {asked} does not serve this scan ({here}) and no available model does; {nearest}; "
            f"train one for it, starting from that model: dle-stream train {like} --warm-from {card.name} "
            f"--out models/my-scope --minutes 30")


def serves(card: ModelCard, scan: ScanTiming) -> bool:
    """The model is valid for this scan: inside a family model's box, or the same ratios,
    pixel size and direction as a one-scan model's (up to a common time scale)."""
    family = card.family
    if family is not None:
        return family.contains(scan)
    return card.timing.compare(scan).compatible


def family_for(scan: ScanTiming, d_min_um2_s: float, d_max_um2_s: float,
               models: list[tuple[Path, ModelCard]] | None = None) -> tuple[Path, ModelCard] | None:
    """An available family model of this D range whose box holds the scan (ties: by name), or None."""
    families = []
    for other_folder, other in (list_models() if models is None else models):
        try:
            ok = other.family is not None and other.family.contains(scan) and \
                same_d_range(other, d_min_um2_s, d_max_um2_s)
        except Exception:  # noqa: BLE001 - an unreadable family serves nothing
            ok = False
        if ok:
            families.append((other.name, other_folder, other))
    if not families:
        return None
    _, folder, card = min(families, key=lambda f: f[0])
    return folder, card


def serving_model(scan: ScanTiming, asked: str | Path, substitute: bool = True,
                  models: list[tuple[Path, ModelCard]] | None = None) -> tuple[Path, ModelCard, str | None] | None:
    """The model a stream with this scan uses when ``asked`` was requested: (folder, card,
    note). ``asked`` itself when it serves the scan (note None); else, with ``substitute``
    (the user did not name the model: the default), an available family model of ``asked``'s
    D range whose box holds the scan (:func:`family_for`), with a one-line note saying why;
    None when neither (see :func:`no_model_message`, which names such a family)."""
    from dle_stream.model_package import load_card, resolve_model

    folder = resolve_model(asked)
    card = load_card(folder)
    if serves(card, scan):
        return folder, card, None
    found = family_for(scan, card.d_min_um2_s, card.d_max_um2_s, models) if substitute else None
    if found is None:
        return None
    fam_folder, fam = found
    r = scan_ratios(scan)
    note = (f"model {card.name} was trained for another scan; using {fam.name}, which serves a family of scans "
            f"holding this one (line/dwell {r['line_per_dwell']:.4g}, frame/line {r['frame_per_line']:.4g}, "
            f"dwell {scan.dwell_us:g} µs) for the same D range {fam.d_min_um2_s:g}–{fam.d_max_um2_s:g} µm²/s"
            + ("" if fam.model_config.grid_temperature != 1.0 else
               "; it is not calibrated for combining windows: running intervals may be too narrow (BENCHMARKS.md)"))
    return fam_folder, fam, note
