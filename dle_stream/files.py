"""Writing files safely: JSON-safe values and atomic replacement, in one place.

- :func:`jsonable`: any value as plain JSON types (numpy scalars and arrays, tuples,
  paths, dates, dataclasses; NaN and infinities become None, since JSON has no NaN), for
  recording metadata, benchmark results and model-card metrics; with ``keep_nonfinite``
  and ``strict``, the run log's attributes (NaN kept, as Zarr writes it; an unknown type
  refused).
- :func:`write_atomic`: write a file through a temporary file in the same folder, fsync,
  then rename it over the target: a kill leaves the old file or the new one, never half
  of one (model packages, CSV exports).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any, *, keep_nonfinite: bool = False, strict: bool = False) -> Any:
    """``value`` as plain JSON types: dicts (keys as strings), lists, str, int, float,
    bool, None. Numpy scalars and arrays become Python numbers and lists, tuples lists,
    paths strings, dates ISO 8601, dataclasses dicts; NaN and ±inf become None; anything
    else its ``str``.

    Args:
        keep_nonfinite: keep NaN and ±inf as floats (for a document written with
            ``json.dumps(..., allow_nan=True)``, as Zarr writes attributes: the run log).
        strict: an object of another type becomes its ``to_dict()`` if it has one, else
            raises :class:`TypeError` naming the type (instead of becoming its ``str``).
    """
    def again(v: Any) -> Any:
        return jsonable(v, keep_nonfinite=keep_nonfinite, strict=strict)

    if isinstance(value, dict):
        return {str(k): again(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [again(v) for v in value]
    if isinstance(value, np.ndarray):
        return again(value.tolist())
    if isinstance(value, np.generic):
        return again(value.item())
    if isinstance(value, float) and not math.isfinite(value) and not keep_nonfinite:
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return again(dataclasses.asdict(value))
    if not strict:
        return str(value)
    if hasattr(value, "to_dict"):
        return again(value.to_dict())
    raise TypeError(f"a value of type {type(value).__name__} is not JSON-able: {value!r}")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(temporary path)`` in the same folder, fsync, then
    rename it over ``path``. The temporary file is removed on failure; the new file gets
    the usual permissions (0666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with tmp_path.open("rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); a package is shared like any file: 0666 & ~umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
