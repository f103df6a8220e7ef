"""Scan timing from Micro-Manager device properties, through a small JSON mapping.

Laser-scanning rigs in Micro-Manager expose their timing only as device properties
(e.g. OpenScan's ``OSc-LSM``: ``LSM-PixelRateHz``, ``LSM-Resolution``, ...; docs/design.md §9),
under names that differ from adapter to adapter. A *scan-property mapping* says, for each
:class:`~dle_stream.timing.ScanTiming` field, which property holds it and how to convert
it to the field's unit. :func:`timing_from_core` reads the properties from a running core.

Config format (a JSON object; every key optional)::

    {
      "pixel_size_um":   {"device": "OSc-LSM", "property": "LSM-PixelSizeUm"},
      "dwell_us":        {"device": "OSc-LSM", "property": "LSM-PixelRateHz", "transform": "1e6/x"},
      "line_period_us":  {"device": "OSc-LSM", "property": "LinePeriodMs", "transform": "x*1000"},
      "frame_period_us": {"device": "OSc-LSM", "property": "FramePeriodMs", "transform": "x*1000"},
      "bidirectional":   {"device": "OSc-LSM", "property": "LSM-ScanMode"},
      "width_px":        {"value": 512}
    }

Keys are the ScanTiming fields: ``pixel_size_um`` (µm), ``dwell_us``, ``line_period_us``,
``frame_period_us`` (µs), ``width_px``, ``height_px`` (px) and ``bidirectional``. Each
value is either

- ``{"device": D, "property": P}`` with an optional ``"transform"``: the property's value,
  converted. ``D`` may be ``"$camera"`` for the core's current camera device;
- ``{"value": V}``: a constant (e.g. a retrace the adapter does not report).

Transforms are a fixed, safe set (nothing is evaluated): ``"x"`` (identity, the default),
``"x*K"``, ``"K*x"``, ``"x/K"``, ``"K/x"``, ``"x+K"``, ``"x-K"`` with ``K`` a number, e.g.
``"1e6/x"`` (a rate in Hz to a period in µs), ``"x*1000"`` (ms → µs), ``"x/1000"``
(ns → µs). For ``bidirectional`` the value is read as a flag: ``1/0``, ``true/false``,
``yes/no``, ``on/off``, ``bidirectional/unidirectional`` (any case).

``width_px`` and ``height_px`` default to the camera's image size
(``core.getImageWidth()``, ``getImageHeight()``). Fields that need several properties
at once (OpenScan's line period is (resolution + line delay + retrace samples) / pixel
rate) cannot be mapped: give them as constants, in a timing file or as flags.

:data:`DEMO_CAMERA_MAPPING` is the mapping for the simulated camera of
:mod:`dle_stream.sources.demo_camera`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming

#: Device name that stands for the core's current camera.
CURRENT_CAMERA = "$camera"

#: The demo camera's properties (see :mod:`dle_stream.sources.demo_camera`).
DEMO_CAMERA_MAPPING: dict[str, dict[str, str]] = {
    "pixel_size_um": {"device": CURRENT_CAMERA, "property": "PixelSizeUm"},
    "dwell_us": {"device": CURRENT_CAMERA, "property": "DwellTimeUs"},
    "line_period_us": {"device": CURRENT_CAMERA, "property": "LinePeriodUs"},
    "frame_period_us": {"device": CURRENT_CAMERA, "property": "FramePeriodUs"},
    "bidirectional": {"device": CURRENT_CAMERA, "property": "Bidirectional"},
}

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_X_OP_K = re.compile(rf"^x\s*([*/+-])\s*({_NUMBER})$")
_K_OP_X = re.compile(rf"^({_NUMBER})\s*([*/])\s*x$")
_TRUE = {"1", "true", "yes", "on", "bidirectional", "bi"}
_FALSE = {"0", "false", "no", "off", "unidirectional", "uni"}
_INT_FIELDS = ("width_px", "height_px")


def parse_transform(text: str | None, where: str = "transform") -> Callable[[float], float]:
    """The function for a transform string (see the module docstring); never evaluates code."""
    t = "x" if text is None else "".join(str(text).split()).lower()
    if t == "x":
        return lambda x: x
    if m := _X_OP_K.match(t):
        op, k = m.group(1), float(m.group(2))
        if op == "/" and k == 0:
            raise DleStreamError(f"{where}: {text!r} divides by zero")
        return {"*": lambda x: x * k, "/": lambda x: x / k, "+": lambda x: x + k, "-": lambda x: x - k}[op]
    if m := _K_OP_X.match(t):
        k, op = float(m.group(1)), m.group(2)
        return (lambda x: k * x) if op == "*" else (lambda x: k / x)
    raise DleStreamError(
        f"{where}: unknown transform {text!r}; use x, x*K, K*x, x/K, K/x, x+K or x-K with a number K (e.g. 1e6/x)"
    )


def _parse_flag(value: Any, where: str) -> bool:
    text = str(value).strip().lower()
    try:
        return float(text) != 0
    except ValueError:
        pass
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DleStreamError(f"{where}: cannot read {value!r} as a flag; map bidirectional to a 0/1 or on/off property")


def check_mapping(mapping: Any, source: str = "scan-property mapping") -> dict[str, dict]:
    """Validate a mapping (see the module docstring); returns it as a plain dict."""
    if not isinstance(mapping, Mapping):
        raise DleStreamError(f"{source}: must be a JSON object of ScanTiming fields, e.g. {{\"dwell_us\": {{...}}}}")
    names = ScanTiming.field_names()
    out: dict[str, dict] = {}
    for field, spec in mapping.items():
        where = f"{source}: {field}"
        if field not in names:
            raise DleStreamError(f"{source}: unknown field {field!r}; allowed: {', '.join(names)}")
        if not isinstance(spec, Mapping):
            raise DleStreamError(f"{where}: must be {{\"device\": ..., \"property\": ...}} or {{\"value\": ...}}")
        keys = set(spec)
        if "value" in keys:
            if keys - {"value"}:
                raise DleStreamError(f"{where}: a constant takes only \"value\", got {sorted(keys)}")
        else:
            if not {"device", "property"} <= keys or keys - {"device", "property", "transform"}:
                raise DleStreamError(
                    f"{where}: needs \"device\" and \"property\" (and optionally \"transform\"), got {sorted(keys)}")
            if not all(isinstance(spec[k], str) and spec[k] for k in ("device", "property")):
                raise DleStreamError(f"{where}: device and property must be non-empty strings")
            if field != "bidirectional":
                parse_transform(spec.get("transform"), where)
            elif spec.get("transform") not in (None, "x"):
                raise DleStreamError(f"{where}: bidirectional is a flag; it takes no transform")
        out[field] = dict(spec)
    return out


def load_mapping(path: str | Path) -> dict[str, dict]:
    """Read and validate a scan-property mapping file (JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DleStreamError(f"{path}: cannot read the scan-property mapping ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DleStreamError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); fix the mapping file") from None
    return check_mapping(data, source=str(path))


def _convert(field: str, raw: Any, spec: Mapping[str, Any], where: str) -> Any:
    if field == "bidirectional":
        return _parse_flag(raw, where)
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise DleStreamError(f"{where}: value {raw!r} is not a number") from None
    value = parse_transform(spec.get("transform"), where)(x) if "value" not in spec else x
    if not math.isfinite(value):
        raise DleStreamError(f"{where}: value {raw!r} gives {value!r} after the transform")
    if field in _INT_FIELDS:
        if value != round(value):
            raise DleStreamError(f"{where}: {field} must be a whole number of pixels, got {value!r}")
        return int(round(value))
    return value


def read_scan_properties(core: Any, mapping: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Like :func:`timing_from_core`, plus one line per field that could not be read
    (which device/property, and why) for the user."""
    mapping = check_mapping(mapping)
    fields: dict[str, Any] = {}
    notes: list[str] = []
    camera = ""
    try:
        camera = core.getCameraDevice()
    except Exception:  # pragma: no cover
        pass
    for field, spec in mapping.items():
        if "value" in spec:
            where = f"scan-property mapping: {field}"
            try:
                fields[field] = _convert(field, spec["value"], spec, where)
            except DleStreamError as exc:
                notes.append(str(exc))
            continue
        device = camera if spec["device"] == CURRENT_CAMERA else spec["device"]
        prop = spec["property"]
        where = f"{field} from {device or spec['device']}.{prop}"
        if not device:
            notes.append(f"{where}: no camera device is selected")
            continue
        try:
            if not core.hasProperty(device, prop):
                notes.append(f"{where}: the device has no such property")
                continue
            raw = core.getProperty(device, prop)
        except Exception as exc:
            notes.append(f"{where}: cannot read it ({type(exc).__name__}: {exc})")
            continue
        try:
            fields[field] = _convert(field, raw, spec, where)
        except DleStreamError as exc:
            notes.append(str(exc))
    for field, getter in (("width_px", "getImageWidth"), ("height_px", "getImageHeight")):
        if field not in fields and field not in mapping:
            try:
                size = int(getattr(core, getter)())
                if size > 0:
                    fields[field] = size
            except Exception as exc:
                notes.append(f"{field} from the camera image size: {type(exc).__name__}: {exc}")
    missing = [n for n in ScanTiming.field_names() if n not in fields]
    return fields, missing, notes


def timing_from_core(core: Any, mapping: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Scan-timing fields read from device properties through ``mapping``.

    Returns ``(fields, missing)``: the :class:`ScanTiming` fields that could be read
    (µm, µs, px, bool; width/height from the camera's image size unless mapped) and the
    names of the fields that could not (unmapped, absent or unreadable). Feed ``fields``
    to the timing resolution as the "metadata" layer; a complete set makes
    ``ScanTiming.from_dict(fields)``. Raises :class:`DleStreamError` for a malformed mapping.
    """
    fields, missing, _ = read_scan_properties(core, mapping)
    return fields, missing
