"""The files ``dle-stream bench`` writes into ``--out``, and when it may replace them.

A bench writes fixed names (:data:`SUITE_FILES`, :data:`COMBINE_FILES`). Before a suite
runs (minutes to hours), :func:`check_replaceable` makes sure that writing them destroys
nothing of the user's: each name is absent, or the folder's result document (the first
name, a JSON file) says that dle-stream wrote it, so the files there are an earlier
bench's. Every file is then written whole or not at all (:func:`write_text`,
:func:`save_figure`: a temporary file renamed over the target); a write the system refuses
is one line naming ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from dle_stream.errors import ParameterError, arg
from dle_stream.files import write_atomic

#: What the Table 1 suites (low, high) write: the result document first.
SUITE_FILES = ("results.json", "table.md", "error_vs_transitions.png", "estimate_vs_truth.png", "z_distribution.png")
#: What the combine suite writes per model.
COMBINE_FILES = ("combine.json", "combine.md", "combine.png")


def _written_by_dle_stream(document: Path) -> bool:
    if document.is_symlink() or not document.is_file():
        return False
    try:
        doc = json.loads(document.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("software", "")).startswith("dle-stream ")


def check_replaceable(folder: Path, names: tuple[str, ...]) -> None:
    """Raise a one-line :class:`ParameterError` naming ``--out`` unless every file of
    ``names`` in ``folder`` is absent or was written by an earlier bench (``names[0]`` is
    its JSON result document, which carries ``"software": "dle-stream …"``)."""
    folder = Path(folder)
    present = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if not present:
        return
    odd = [n for n in present if (folder / n).is_symlink() or not (folder / n).is_file()]
    if odd or not _written_by_dle_stream(folder / names[0]):
        name = (odd or present)[0]
        raise ParameterError(f"{arg('out', folder)}: it holds a {name} that dle-stream bench did not write; choose "
                             f"another {arg('out')} folder (files there are never overwritten)")


def _writing(folder: Path, name: str, write: Callable[[Path], Any]) -> None:
    try:
        write_atomic(folder / name, write)
    except OSError as exc:
        raise ParameterError(f"{arg('out', folder)}: cannot write {name} ({exc.strerror or exc}); "
                             f"choose a writable folder with room for the results") from None


def write_text(folder: Path, name: str, text: str) -> None:
    """``folder/name`` := ``text`` (UTF-8), whole or not at all."""
    _writing(folder, name, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig: Any, folder: Path, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG ``folder/name``, whole or not at all, and close it
    (saved or not); returns the path."""
    import matplotlib.pyplot as plt

    try:
        _writing(folder, name, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return folder / name
