"""dle-stream: live estimation of nanoparticle diffusion coefficients (µm²/s) from
raster-scanned (two-photon / confocal) microscope movies with a deep-learning estimator.

The Python API (:mod:`dle_stream.api`): :func:`estimate` (a movie array),
:func:`estimate_recording` (a file), :func:`stream` (window results as they are made),
:func:`open_log` (a run log as an xarray Dataset of its committed windows).
It is imported on first use, so ``import dle_stream`` stays light (no torch).
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming, TimingComparison

if TYPE_CHECKING:
    from dle_stream.api import (
        DleStreamWarning,
        Estimates,
        EstimateStream,
        WindowResult,
        estimate,
        estimate_recording,
        open_log,
        stream,
    )
    from dle_stream.results import ResultTable

#: Public names imported lazily: name → module.
_LAZY = {
    "estimate": "dle_stream.api",
    "estimate_recording": "dle_stream.api",
    "open_log": "dle_stream.api",
    "stream": "dle_stream.api",
    "Estimates": "dle_stream.api",
    "EstimateStream": "dle_stream.api",
    "WindowResult": "dle_stream.api",
    "DleStreamWarning": "dle_stream.api",
    "ResultTable": "dle_stream.results",
}

__all__ = [
    "DleStreamError",
    "DleStreamWarning",
    "EstimateStream",
    "Estimates",
    "ResultTable",
    "ScanTiming",
    "TimingComparison",
    "WindowResult",
    "__version__",
    "estimate",
    "estimate_recording",
    "open_log",
    "stream",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dle_stream' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
