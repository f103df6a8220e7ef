"""Labelled result tables of the Python API (:mod:`dle_stream.api`).

A :class:`ResultTable` is a small column store: one 1-D numpy array per named column,
all of one length, plus the names of the columns that label a row (its ``dims``, e.g.
``("window", "tile")``). It converts to a pandas DataFrame (:meth:`ResultTable.to_pandas`)
and, when xarray is installed, to an xarray Dataset (:meth:`ResultTable.to_xarray`)
whose dimensions are the ``dims`` and whose coordinates are the columns that depend on
fewer of them (``frame_start`` depends on the window only, ``row`` on the tile only).
Neither pandas nor xarray is imported until a conversion asks for it.

Column names carry their units as everywhere in dle-stream: D and its intervals in
µm²/s (``d_um2_s``, ``lo68_um2_s``, ...), times in s (``t_start_s``); ``flags`` holds
the names of the set :class:`~dle_stream.events.EstimateFlag` bits ("above range,
little information", empty when none) and ``flag_bits`` the bits themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dle_stream.errors import DleStreamError
from dle_stream.events import flag_names

__all__ = ["ResultTable", "flag_text", "require_xarray"]


def require_xarray(what: str) -> Any:
    """The ``xarray`` module, or a one-line :class:`DleStreamError` saying how to install it.

    xarray is optional (not a dependency of dle-stream); ``what`` names the call that needs it.
    """
    try:
        import xarray
    except ImportError:
        raise DleStreamError(f"{what} needs xarray, which is not installed; install it (pip install xarray)"
                             + (" or use to_pandas()" if what == "to_xarray" else "")) from None
    return xarray


def flag_text(bits: int) -> str:
    """``EstimateFlag`` bits as comma-separated names ("" when none is set)."""
    return ", ".join(flag_names(int(bits)))


class ResultTable:
    """Columns of equal length with the names of the columns that label a row.

    Args:
        columns: column name → values (anything ``np.asarray`` takes, 1-D).
        dims: the columns that together identify a row (``("window", "tile")``).
        name: what the table holds, for its repr.
        coords: columns that label only some of the dims (``{"frame_start": ("window",),
            "row": ("tile",)}``): coordinates, not data, in :meth:`to_xarray`.

    ``table["d_um2_s"]`` is a column (numpy array), ``len(table)`` the number of rows,
    ``table.columns`` the names in order; :meth:`rows` yields one dict per row.
    """

    def __init__(self, columns: Mapping[str, Any], dims: Sequence[str] = (), name: str = "results",
                 coords: Mapping[str, Sequence[str]] | None = None):
        cols = {str(k): np.asarray(v) for k, v in columns.items()}
        lengths = {k: v.shape for k, v in cols.items() if v.ndim != 1}
        if lengths:
            raise ValueError(f"result columns must be 1-D: {lengths}")
        sizes = {len(v) for v in cols.values()}
        if len(sizes) > 1:
            raise ValueError(f"result columns differ in length: { {k: len(v) for k, v in cols.items()} }")
        missing = [d for d in dims if d not in cols]
        if missing:
            raise ValueError(f"dims {missing} are not columns")
        own = {str(k): tuple(v) for k, v in (coords or {}).items()}
        wrong = {k: v for k, v in own.items() if k not in cols or not set(v) <= set(dims)}
        if wrong:
            raise ValueError(f"coords {wrong}: must be columns labelled by some of the dims {tuple(dims)}")
        self._columns = cols
        self.dims: tuple[str, ...] = tuple(dims)
        self.name = name
        self.coords: dict[str, tuple[str, ...]] = own

    # ----------------------------------------------------------------- access
    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(next(iter(self._columns.values()))) if self._columns else 0

    def __getitem__(self, column: str) -> np.ndarray:
        try:
            return self._columns[column]
        except KeyError:
            raise KeyError(f"{column!r}: no such column; the columns are {', '.join(self._columns)}") from None

    def __contains__(self, column: object) -> bool:
        return column in self._columns

    def rows(self) -> Iterator[dict[str, Any]]:
        """One dict per row (numpy scalars turned into Python values)."""
        names = self.columns
        for i in range(len(self)):
            yield {k: self._columns[k][i].item() if hasattr(self._columns[k][i], "item") else self._columns[k][i]
                   for k in names}

    def to_dict(self) -> dict[str, list]:
        """Column name → list of Python values (JSON-able)."""
        return {k: v.tolist() for k, v in self._columns.items()}

    @classmethod
    def concat(cls, tables: Sequence[ResultTable], dims: Sequence[str] = (), name: str = "results",
               columns: Sequence[str] = ()) -> ResultTable:
        """Rows of ``tables`` one after the other (same columns); ``columns`` name the
        columns of an empty result."""
        if not tables:
            return cls({c: np.zeros(0) for c in columns}, dims, name)
        names = tables[0].columns
        return cls({c: np.concatenate([t[c] for t in tables]) for c in names}, dims or tables[0].dims, name,
                   tables[0].coords)

    # ------------------------------------------------------------ conversion
    def to_pandas(self):
        """A pandas DataFrame, one row per row of the table (index 0..n-1)."""
        import pandas as pd

        return pd.DataFrame({k: v for k, v in self._columns.items()})

    def to_xarray(self):
        """An xarray Dataset with dimensions :attr:`dims` (needs xarray, not a dependency).

        The columns named in :attr:`coords` become coordinates along their own dims (the
        window's ``frame_start``, the tile's ``row``); the others are data variables over
        all the dims. The rows must cover every combination of the dims' values once.
        """
        require_xarray("to_xarray")
        frame = self.to_pandas()
        if self.dims:
            frame = frame.set_index(list(self.dims))
        ds = frame.to_xarray()
        for name, own in self.coords.items():
            var = ds[name].isel({d: 0 for d in ds[name].dims if d not in own}, drop=True)
            ds = ds.drop_vars(name).assign_coords({name: var})
        ds.attrs["title"] = self.name
        return ds

    # ------------------------------------------------------------------ show
    def __repr__(self) -> str:
        return f"<ResultTable {self.name}: {len(self)} rows × {len(self._columns)} columns ({', '.join(self.columns)})>"

    def _repr_html_(self) -> str:  # notebooks show the table
        return self.to_pandas()._repr_html_()
