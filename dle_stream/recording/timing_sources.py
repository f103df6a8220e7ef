"""Which scan timing to use for a stream: :func:`resolve_timing`.

Precedence, field by field (docs/design.md §3): command-line flags > timing file > the
recording's metadata > the recording's frame size (``width_px``, ``height_px`` only) >
the fallback (a model card), which is used with a loud warning because the estimate is
only valid if the microscope really scanned with that timing.

``bidirectional`` is the one field with a default: when nothing gives it, the scan is
assumed unidirectional, with a warning naming ``bidirectional``.

The result, :class:`ResolvedTiming`, unpacks as ``(timing, source, warnings)`` and says in
typed attributes which fields were not read or given: ``assumed`` (taken from the
fallback) and ``defaulted`` (``bidirectional`` set to unidirectional). Callers key off
those, never off the warnings' text.

Messages name the fields as the caller gives them (``dwell_us``, ``timing_file``); the
CLI passes ``names`` (field → its flag) so that they read ``--dwell-us``, ``--timing``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dle_stream.errors import DleStreamError, TimingError, arg, render_parameters
from dle_stream.recording.base import Recording
from dle_stream.timing import ScanTiming

#: The ScanTiming fields a caller may give (``flags``) and a timing file may hold; the frame
#: size comes from the recording or the timing file, so messages never ask for it.
GIVEN_FIELDS: dict[str, bool] = {
    "pixel_size_um": True,
    "dwell_us": True,
    "line_period_us": True,
    "frame_period_us": True,
    "width_px": False,
    "height_px": False,
    "bidirectional": True,
}


def read_timing_file(path: Path) -> dict[str, Any]:
    """The ScanTiming fields in a JSON timing file (any subset of the fields)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DleStreamError(f"{path}: cannot read the timing file ({exc.strerror or exc}); check the path") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DleStreamError(f"{path}: the timing file is not valid JSON ({exc}); fix it or give another") from None
    if isinstance(data, dict) and isinstance(data.get("timing"), dict):
        data = data["timing"]  # a dle-stream metadata document or model card section
    if not isinstance(data, dict):
        raise DleStreamError(f"{path}: the timing file must be a JSON object with fields {', '.join(ScanTiming.field_names())}")
    unknown = [k for k in data if k not in GIVEN_FIELDS]
    if unknown:
        raise DleStreamError(
            f"{path}: unknown scan timing field(s) {', '.join(unknown)} in the timing file; "
            f"allowed: {', '.join(ScanTiming.field_names())}"
        )
    return {k: v for k, v in data.items() if v is not None}


class ResolvedTiming(tuple[ScanTiming, str, list[str]]):
    """What :func:`resolve_timing` decided: a ``(timing, source, warnings)`` tuple with
    typed attributes for the fields that were not read or given.

    Attributes:
        timing, source, warnings: the tuple's three items (see :func:`resolve_timing`).
        assumed: the ScanTiming fields taken from the fallback (e.g. a model card), in
            ScanTiming field order; empty when the fallback was not used. Non-empty means
            the estimates hold only if the microscope really used that timing.
        defaulted: the fields set to a built-in default, not read, given or assumed from
            the fallback: ``("bidirectional",)`` when the scan direction was unknown and
            taken as unidirectional, else empty.

    Equality and unpacking are those of the 3-tuple; ``assumed`` and ``defaulted`` are
    read by name only.
    """

    assumed: tuple[str, ...]
    defaulted: tuple[str, ...]

    def __new__(cls, timing: ScanTiming, source: str, warnings: list[str],
                assumed: Sequence[str] = (), defaulted: Sequence[str] = ()) -> ResolvedTiming:
        self = super().__new__(cls, (timing, source, warnings))
        self.assumed = tuple(assumed)
        self.defaulted = tuple(defaulted)
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle keep the attributes
        return (*self, self.assumed, self.defaulted)

    @property
    def timing(self) -> ScanTiming:
        return self[0]

    @property
    def source(self) -> str:
        return self[1]

    @property
    def warnings(self) -> list[str]:
        return self[2]

    def __repr__(self) -> str:
        return (f"ResolvedTiming(timing={self.timing!r}, source={self.source!r}, warnings={self.warnings!r}, "
                f"assumed={self.assumed!r}, defaulted={self.defaulted!r})")


def resolve_timing(
    recording: Recording | None,
    *,
    flags: dict[str, Any] | None = None,
    timing_file: str | Path | None = None,
    fallback: ScanTiming | None = None,
    fallback_label: str = "the model card",
    names: Mapping[str, str] | None = None,
) -> ResolvedTiming:
    """The scan timing for a stream, where each field came from, and warnings.

    Args:
        recording: the recording being replayed (None for a live stream).
        flags: ScanTiming field -> value given by the user (the command line's flags);
            None means not given (so pass ``bidirectional=None``, not False, when the
            direction is not known, or it would override the recording's metadata).
        timing_file: a JSON file with some or all ScanTiming fields.
        fallback: timing to assume for fields nothing else gives (e.g. the model card's).
        fallback_label: what ``fallback`` is, for the warning.
        names: how the messages name a field or ``timing_file`` to the user (the CLI:
            its flags); by default as here.

    Returns:
        a :class:`ResolvedTiming`: unpacks as (timing, source description, warnings). The
        description names the source of every field; the warnings are one line each and
        must be shown to the user. Its ``assumed`` names the fields taken from
        ``fallback`` and ``defaulted`` those set to a default (``bidirectional``): test
        those, not the warnings' text.

    Raises:
        TimingError: a field is unknown and there is no fallback (the message names the
            parameter that supplies it), or the combined timing is inconsistent.
    """
    flags = dict(flags or {})
    unknown = [k for k in flags if k not in GIVEN_FIELDS]
    if unknown:
        raise TimingError(f"unknown scan timing field(s) {', '.join(unknown)}; allowed: {', '.join(GIVEN_FIELDS)}")
    layers: list[tuple[str, dict[str, Any]]] = [("command-line flags", {k: v for k, v in flags.items() if v is not None})]
    if timing_file is not None:
        layers.append((f"timing file {timing_file}", read_timing_file(Path(timing_file))))
    if recording is not None:
        name = recording.path.name
        layers.append((f"{name} metadata ({recording.timing_source or 'none'})", dict(recording.timing_fields)))
        layers.append((f"{name} frame size", {"width_px": recording.width, "height_px": recording.height}))

    chosen: dict[str, Any] = {}
    origin: dict[str, str] = {}
    ignored_notes: list[str] = []
    if recording is not None:
        for kind, raw in recording.metadata.items():  # values the metadata gave but that make no sense
            notes = raw.get("ignored") if isinstance(raw, dict) else None
            if isinstance(notes, list):
                ignored_notes += [f"{recording.path.name}: its {kind} metadata {n}" for n in notes if isinstance(n, str)]
    for label, values in layers:
        for key, value in values.items():
            if key not in chosen:
                chosen[key], origin[key] = value, label

    warnings: list[str] = list(ignored_notes)
    missing = [n for n in ScanTiming.field_names() if n not in chosen]
    assumed: dict[str, Any] = {}
    defaulted: list[str] = []
    if missing and fallback is not None:
        assumed = {n: getattr(fallback, n) for n in missing}
        for n, v in assumed.items():
            chosen[n], origin[n] = v, fallback_label
        hint = ", ".join(arg(n) for n in missing if GIVEN_FIELDS[n])
        warnings.append(render_parameters(
            "WARNING: scan timing "
            + ", ".join(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}" for n, v in assumed.items())
            + f" ASSUMED from {fallback_label}: not given by flags, a timing file or the recording; "
            f"D estimates are wrong unless the microscope used this timing; give "
            + (f"{hint} or " if hint else "") + f"a timing file ({arg('timing_file')})", names))
        missing = []
    if "bidirectional" in missing:
        chosen["bidirectional"], origin["bidirectional"] = False, "default (unidirectional)"
        defaulted.append("bidirectional")
        warnings.append(render_parameters(f"WARNING: scan direction unknown, assumed unidirectional; pass "
                                          f"{arg('bidirectional', True)} if odd lines run backwards", names))
        missing.remove("bidirectional")
    if missing:
        where = "command-line flags, a timing file" + (f" or {recording.path.name}'s metadata" if recording is not None else "")
        hints = [arg(n) for n in missing if GIVEN_FIELDS[n]]
        raise TimingError(
            f"scan timing: {', '.join(missing)} unknown (not in the {where}); give "
            + (", ".join(hints) + " or " if hints else "")
            + f"a timing file ({arg('timing_file')})"
        )
    timing = ScanTiming.from_dict(chosen, source="scan timing (" + _describe(origin) + ")")
    if recording is not None and (timing.width_px < recording.width or timing.height_px < recording.height):
        raise DleStreamError(
            f"scan timing: the frame is {timing.width_px}×{timing.height_px} px ({origin['width_px']}) but "
            f"{recording.path.name} has {recording.width}×{recording.height} px frames; fix the timing file"
        )
    return ResolvedTiming(timing, _describe(origin), warnings, assumed=tuple(assumed), defaulted=defaulted)


def _describe(origin: dict[str, str]) -> str:
    """'a, b from X; c from Y' in ScanTiming field order."""
    groups: dict[str, list[str]] = {}
    for name in ScanTiming.field_names():
        if name in origin:
            groups.setdefault(origin[name], []).append(name)
    return "; ".join(f"{', '.join(names)} from {label}" for label, names in groups.items())
