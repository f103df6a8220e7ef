"""Which reader or writer a path needs, from its suffix: :func:`open_recording`.

Reading: ``.tif``/``.tiff``/``.btf`` (plain TIFF, ImageJ, OME-TIFF, ScanImage,
Micro-Manager: the TIFF reader tells them apart from their metadata), ``.zarr``
(or any folder that is a Zarr store), and a folder of one TIFF per frame written by
pymmcore-plus's ``ImageSequenceWriter``. Writing: ``.ome.tif``/``.ome.tiff`` → OME-TIFF,
``.tif``/``.tiff`` → ImageJ hyperstack (opens in Fiji), ``.zarr`` → OME-Zarr.
"""

from __future__ import annotations

from pathlib import Path

from dle_stream.errors import DleStreamError, ParameterError, arg
from dle_stream.recording.base import Recording

#: Formats :func:`~dle_stream.recording.write_recording` can write.
WRITE_FORMATS = ("tiff", "ome-tiff", "imagej", "zarr")
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")


def _name(path: Path) -> str:
    return path.name.lower().rstrip("/")


def is_tiff_path(path: Path) -> bool:
    return _name(path).endswith(_TIFF_SUFFIXES)


def is_zarr_path(path: Path) -> bool:
    if _name(path).endswith(".zarr"):
        return True
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zarray"))


def write_format_from_suffix(path: Path) -> str:
    """The format :func:`write_recording` uses for ``path`` when none is given."""
    name = _name(path)
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith((".tif", ".tiff")):
        return "imagej"
    if name.endswith(".zarr"):
        return "zarr"
    raise ParameterError(
        f"{path}: cannot tell the format from the suffix {''.join(path.suffixes) or '(none)'!r}; "
        f"name it .tif (ImageJ), .ome.tif (OME-TIFF) or .zarr (OME-Zarr), or give {arg('format')}"
    )


def open_recording(path: str | Path, channel: int | None = None) -> Recording:
    """Open a recorded movie for lazy, frame-by-frame reading.

    Args:
        path: a TIFF file (plain, ImageJ, OME-TIFF, ScanImage, Micro-Manager) or a Zarr store.
        channel: index along the one extra axis of multi-channel (or multi-plane, or RGB)
            files; not needed for single-channel movies.

    Raises:
        DleStreamError: the file is missing, not an image, of an unsupported type, not a
            movie of 2-D frames, or multi-channel without (or with an out-of-range) channel.
    """
    from dle_stream.recording.tiff import TiffRecording
    from dle_stream.recording.zarr_store import ZarrRecording

    path = Path(path).expanduser()
    if not path.exists():
        raise DleStreamError(f"{path}: no such file or folder; check the path")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        raise ParameterError(f"{path}: {arg('channel')} must be a non-negative integer, got {channel!r}")
    if path.name.endswith(".partial") and is_tiff_path(path.with_name(path.name[: -len(".partial")])):
        raise DleStreamError(
            f"{path}: an incomplete recording whose writer (dle-stream simulate) was stopped before it finished; "
            f"it holds no usable frames: simulate it again"
        )
    if is_zarr_path(path):
        return ZarrRecording(path, channel)
    from dle_stream.recording.image_sequence import ImageSequenceRecording, is_image_sequence_folder

    if is_image_sequence_folder(path):
        return ImageSequenceRecording(path, channel)
    if is_tiff_path(path):
        if path.is_dir():
            raise DleStreamError(f"{path}: is a folder, not a TIFF file; check the path")
        return TiffRecording(path, channel)
    raise DleStreamError(
        f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; dle-stream reads TIFF "
        f"(.tif, .tiff: plain, ImageJ, OME-TIFF, ScanImage), Zarr (.zarr) recordings and pymmcore-plus "
        f"image-sequence folders"
    )
