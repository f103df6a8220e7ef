"""Writing movies with their scan timing: :func:`write_recording`.

Every file written here carries dle-stream's metadata document (the full
:class:`~dle_stream.timing.ScanTiming`, the software version, the caller's extra
metadata, per-frame timestamps; see :mod:`.metadata`) *and* the standard metadata other
tools read:

- ``imagej`` (``.tif``): an ImageJ hyperstack (axes TYX) that opens in Fiji with the
  pixel size (resolution tags, ``unit=um``) and the frame interval (``finterval``, s);
- ``ome-tiff`` (``.ome.tif``): OME-XML with ``PhysicalSizeX/Y`` (µm), ``TimeIncrement``
  (s) and, with timestamps, each plane's ``DeltaT`` (s);
- ``tiff``: a plain tifffile TIFF (resolution tags in µm via centimetres);
- ``zarr`` (``.zarr``): an OME-Zarr v0.5 group: array ``"0"`` [t, y, x] with
  ``dimension_names``, multiscales axes with units and a scale of
  [frame period s, pixel µm, pixel µm]; our document in the group attribute
  ``"dle_stream"``; timestamps in the array ``"frame_timestamps_s"``.

In TIFF files our document is the private ASCII tag
:data:`~dle_stream.recording.metadata.DLE_TIFF_TAG` on the first page: it survives
tifffile round trips for every flavour and is ignored by other readers.

``movie`` may be an array [T, H, W] or any iterable of 2-D frames: frames are written
as they come (TIFF through ``TiffWriter.write`` with an iterator, Zarr one block of
frames at a time), so a recording larger than RAM can be streamed to disk.

Data safety: an existing file or folder is never replaced unless ``overwrite=True``, and
even then only a file, or a Zarr recording that dle-stream wrote itself (a foreign
folder or a run log is never deleted). A TIFF is written to ``<name>.partial`` and
renamed into place when complete, so a writer that is killed leaves the old file (if
any) untouched and a ``.partial`` file whose name says it is incomplete (a file of that
name that is not a TIFF is never used: the write is refused). A Zarr store
that replaces a recording is written beside it (``.<name>.<random>.partial``) and swapped
in when complete, so a failure leaves the old one whole; a new Zarr store is written in
place, and records in its ``"dle_stream"`` attribute how many frames were written
(``"frames_written"``, updated after every block, ``"complete": true`` at the end), so
a store whose writer was killed says how many of its frames are valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from dle_stream.errors import DleStreamError, ParameterError, arg
from dle_stream.recording import metadata as md
from dle_stream.recording.formats import WRITE_FORMATS, write_format_from_suffix
from dle_stream.recording.zarr_store import TIMESTAMPS_ARRAY
from dle_stream.timing import ScanTiming

#: Data types an ImageJ hyperstack can hold.
IMAGEJ_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))
#: Target size of one Zarr chunk of frames, bytes.
ZARR_CHUNK_BYTES = 4 * 2**20
#: Above this many bytes of pixels, (OME-/plain) TIFFs are written as BigTIFF.
BIGTIFF_BYTES = 2**32 - 2**25


class _Frames:
    """The movie as a checked stream of 2-D frames of one shape and dtype."""

    def __init__(self, movie: Any, n_frames: int | None, path: Path) -> None:
        self.path = path
        if isinstance(movie, np.ndarray) or (hasattr(movie, "shape") and hasattr(movie, "dtype") and hasattr(movie, "ndim")):
            if movie.ndim != 3:
                raise DleStreamError(f"{path}: the movie must be [T, H, W], got an array of shape {tuple(movie.shape)}")
            self._iter: Iterator[Any] = (np.asarray(movie[k]) for k in range(int(movie.shape[0])))
            self.n_frames: int | None = int(movie.shape[0])
            self.height, self.width = int(movie.shape[1]), int(movie.shape[2])
            self.dtype = np.dtype(movie.dtype)
            self._first: np.ndarray | None = None
        else:
            if not isinstance(movie, Iterable):
                raise DleStreamError(f"{path}: the movie must be an array [T, H, W] or an iterable of 2-D frames")
            self.n_frames = len(movie) if hasattr(movie, "__len__") else n_frames  # type: ignore[arg-type]
            self._iter = iter(movie)
            try:
                first = np.asarray(next(self._iter))
            except StopIteration:
                raise DleStreamError(f"{path}: the movie has no frames; nothing to write") from None
            self._first = self._check(first, 0, first_frame=True)
            self.height, self.width = first.shape
            self.dtype = first.dtype
        if n_frames is not None and self.n_frames is not None and n_frames != self.n_frames:
            raise DleStreamError(f"{path}: n_frames={n_frames} but the movie has {self.n_frames} frames")
        if self.n_frames == 0:
            raise DleStreamError(f"{path}: the movie has no frames; nothing to write")
        self.written = 0

    def _check(self, frame: np.ndarray, k: int, first_frame: bool = False) -> np.ndarray:
        if frame.ndim != 2:
            raise DleStreamError(f"{self.path}: frame {k} is not 2-D (shape {frame.shape}); pass frames [H, W]")
        if not first_frame and (frame.shape != (self.height, self.width) or frame.dtype != self.dtype):
            raise DleStreamError(
                f"{self.path}: frame {k} is {frame.shape} {frame.dtype}, but the first frame was "
                f"{(self.height, self.width)} {self.dtype}; every frame must match"
            )
        return frame

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is not None:
            first, self._first = self._first, None
            self.written = 1
            yield first
        for frame in self._iter:
            if self.n_frames is not None and self.written >= self.n_frames:
                raise DleStreamError(f"{self.path}: the movie yields more than the {self.n_frames} frames announced")
            yield self._check(np.asarray(frame), self.written)
            self.written += 1
        if self.n_frames is not None and self.written != self.n_frames:
            raise DleStreamError(f"{self.path}: the movie yielded {self.written} frames, {self.n_frames} were announced")

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of up to ``size`` frames, [n, H, W]."""
        block: list[np.ndarray] = []
        for frame in self:
            block.append(frame)
            if len(block) == size:
                yield np.stack(block)
                block = []
        if block:
            yield np.stack(block)


def write_recording(
    path: str | Path,
    movie: np.ndarray | Iterable[np.ndarray],
    timing: ScanTiming,
    *,
    format: str | None = None,
    metadata: dict[str, Any] | None = None,
    frame_timestamps_s: np.ndarray | list[float] | None = None,
    n_frames: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a movie and its scan timing to ``path``; return the path.

    Args:
        path: output file (``.tif`` ImageJ, ``.ome.tif`` OME-TIFF) or store (``.zarr``).
        movie: array [T, H, W], or an iterable of 2-D frames (streamed to disk).
        timing: the scan timing (µm, µs) to record with it.
        format: ``"imagej"``, ``"ome-tiff"``, ``"tiff"`` or ``"zarr"``; default from the suffix.
        metadata: extra JSON-able metadata (e.g. the simulator's ground truth), read back
            as ``Recording.metadata["dle_stream"]["extra"]``.
        frame_timestamps_s: acquisition time of each frame, s.
        n_frames: number of frames of an iterable without ``len()``; TIFF formats need it
            (or ``frame_timestamps_s``) up front, Zarr does not.
        overwrite: replace an existing file, or a Zarr recording written by dle-stream
            (never a folder it did not write, nor a run log).
    """
    path = Path(path).expanduser()
    fmt = write_format_from_suffix(path) if format is None else format
    if fmt not in WRITE_FORMATS:
        raise DleStreamError(f"{path}: unknown recording format {fmt!r}; use one of {', '.join(WRITE_FORMATS)}")
    if not isinstance(timing, ScanTiming):
        raise DleStreamError(f"{path}: timing must be a ScanTiming, got {type(timing).__name__}")
    stamps = None if frame_timestamps_s is None else np.asarray(frame_timestamps_s, dtype=np.float64)
    if stamps is not None and stamps.ndim != 1:
        raise DleStreamError(f"{path}: frame_timestamps_s must be a 1-D sequence of seconds")
    frames = _Frames(movie, n_frames, path)
    if frames.n_frames is None and stamps is not None:
        frames.n_frames = len(stamps)
    if stamps is not None and frames.n_frames is not None and len(stamps) != frames.n_frames:
        raise DleStreamError(f"{path}: {len(stamps)} frame timestamps for {frames.n_frames} frames; pass one per frame")
    check_output_path(path, fmt, overwrite)
    if fmt == "zarr":
        # replacing a recording (checked above: dle-stream's own, and overwrite=True): the new
        # store is written beside it and swapped in only when complete
        replacing = path.is_dir() and any(path.iterdir())
        target = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)) if replacing else path
        try:
            _write_zarr(target, frames, timing, metadata, stamps, shown=path)
        except BaseException:  # only what this call created goes
            if replacing:
                shutil.rmtree(target, ignore_errors=True)  # its own hidden folder
            else:
                _remove(path, fmt)
            raise
        if replacing:
            _swap_in(target, path)
        return path
    partial = partial_path(path)
    try:
        _write_tiff(partial, fmt, frames, timing, metadata, stamps, shown=path)
        os.replace(partial, path)
    except OSError as exc:
        _remove(partial, fmt)
        raise DleStreamError(f"{path}: cannot write the recording ({exc.strerror or exc}); choose a writable path") from None
    except BaseException:
        _remove(partial, fmt)
        raise
    return path


#: Suffix of a TIFF recording while it is being written (renamed away when complete).
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where the TIFF for ``path`` is written until it is complete."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _zarr_attributes(path: Path) -> dict[str, Any] | None:
    """The attributes in a folder's ``zarr.json`` (None when there is no readable one)."""
    try:
        doc = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def is_own_recording_store(path: Path) -> bool:
    """True when ``path`` is a Zarr recording written by :func:`write_recording`."""
    attrs = _zarr_attributes(path)
    doc = (attrs or {}).get(md.DLE_ZARR_KEY)
    return isinstance(doc, dict) and doc.get("schema") == md.DLE_SCHEMA


def is_own_recording(path: Path) -> bool:
    """True when ``path`` is a recording written by :func:`write_recording` (a TIFF with
    dle-stream's metadata tag, or a Zarr store with its document); False for anything else."""
    path = Path(path)
    if path.is_dir():
        return is_own_recording_store(path)
    if not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages.first.tags.get(md.DLE_TIFF_TAG)
            return tag is not None and md.from_document(tag.value, str(path)) is not None
    except Exception:  # noqa: BLE001 - not a TIFF (or a damaged one): not ours to replace
        return False


def check_output_path(path: Path, fmt: str, overwrite: bool) -> None:
    """Refuse an output path whose writing would destroy something, or that cannot be written.

    Raises:
        DleStreamError: one line naming the path and the fix.
    """
    parent = path.parent
    if not parent.exists():
        raise DleStreamError(f"{path}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise DleStreamError(f"{path}: {parent} is a file, not a folder; choose another output path")
    if fmt == "zarr" and path.is_symlink() and overwrite:
        raise DleStreamError(f"{path}: is a link; a recording is replaced only where it lies: give the folder the "
                             f"link points to ({os.path.realpath(path)}), or choose another output path")
    if path.is_dir():
        if fmt != "zarr":
            raise DleStreamError(f"{path}: is a folder, but a TIFF recording is one file; choose another output path")
        if not any(path.iterdir()):
            pass  # an empty folder: nothing to lose
        elif is_own_recording_store(path):
            if not overwrite:
                raise ParameterError(f"{path}: a recording already exists there; pass {arg('overwrite', True)} to "
                                     f"replace it, or choose another output path")
        else:
            attrs = _zarr_attributes(path) or {}
            marker = attrs.get("dle_stream")
            what = ("a dle-stream run log" if isinstance(marker, dict) and marker.get("kind") == "run_log"
                    else "a folder that dle-stream did not write")
            raise ParameterError(f"{path}: is {what}; refusing to replace it (not even with "
                                 f"{arg('overwrite', True)}); choose another output path")
    elif path.exists() or path.is_symlink():
        if fmt == "zarr":
            raise DleStreamError(f"{path}: is a file, but a Zarr recording is a folder; choose another output path")
        if not overwrite:
            raise ParameterError(f"{path}: the file already exists; pass {arg('overwrite', True)} to replace it, "
                                 f"or choose another output path")
    if fmt != "zarr":
        partial = partial_path(path)
        if (partial.exists() or partial.is_symlink()) and not _is_tiff_file(partial):
            raise DleStreamError(f"{partial}: exists, and is not an unfinished TIFF recording; the new TIFF is "
                                 f"written under this name until complete: move that file, or choose another "
                                 f"output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DleStreamError(f"{path}: the folder {parent} is not writable; choose a writable output path")


def _is_tiff_file(path: Path) -> bool:
    """A regular file that starts as a TIFF does (a killed writer's partial file has no
    complete first page, so only its header says what it is)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _swap_in(new: Path, path: Path) -> None:
    """Put the complete store ``new`` at ``path`` in place of the old recording there: the
    old one is renamed aside, the new one renamed in, then the old one deleted (a kill
    between the two renames leaves both, whole, under hidden names beside ``path``)."""
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        os.rename(path, old)
    except OSError as exc:
        shutil.rmtree(new, ignore_errors=True)
        raise DleStreamError(f"{path}: cannot replace the old recording ({exc.strerror or exc}); it is unchanged: "
                             f"remove it by hand or choose another output path") from None
    try:
        os.rename(new, path)
    except OSError as exc:
        os.rename(old, path)
        shutil.rmtree(new, ignore_errors=True)
        raise DleStreamError(f"{path}: cannot replace the old recording ({exc.strerror or exc}); it is unchanged: "
                             f"choose another output path") from None
    shutil.rmtree(old, ignore_errors=True)


def _write_tiff(
    path: Path, fmt: str, frames: _Frames, timing: ScanTiming, extra: dict[str, Any] | None, stamps: np.ndarray | None,
    shown: Path | None = None,
) -> None:
    """Write the TIFF at ``path`` (errors name ``shown``, the file the user asked for)."""
    target = path
    path = shown or path
    if frames.n_frames is None:
        raise DleStreamError(
            f"{path}: a TIFF needs the frame count up front; pass n_frames= (or frame_timestamps_s) "
            f"with a generator, or write .zarr"
        )
    if fmt == "imagej" and frames.dtype not in IMAGEJ_DTYPES:
        raise DleStreamError(
            f"{path}: an ImageJ TIFF holds uint8, uint16 or float32 pixels, not {frames.dtype}; "
            f"convert the movie or write .ome.tif or .zarr"
        )
    shape = (frames.n_frames, frames.height, frames.width)
    doc = json.dumps(md.make_document(timing, extra, stamps), separators=(",", ":"))
    extratags = [(md.DLE_TIFF_TAG, "s", 0, doc, True)]
    pixel_um, frame_s = timing.pixel_size_um, timing.frame_period_us / 1e6
    big = frames.n_frames * frames.height * frames.width * frames.dtype.itemsize > BIGTIFF_BYTES
    kwargs: dict[str, Any] = dict(shape=shape, dtype=frames.dtype, extratags=extratags, photometric="minisblack")
    if fmt == "imagej":
        opts: dict[str, Any] = dict(imagej=True)
        kwargs.update(
            resolution=(1.0 / pixel_um, 1.0 / pixel_um),
            metadata={"axes": "TYX", "finterval": frame_s, "unit": "um"},
        )
    elif fmt == "ome-tiff":
        opts = dict(ome=True, bigtiff=big)
        ome: dict[str, Any] = {
            "axes": "TYX",
            "PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm",
            "TimeIncrement": frame_s, "TimeIncrementUnit": "s",
        }
        if stamps is not None:
            ome["Plane"] = {"DeltaT": [float(t) for t in stamps], "DeltaTUnit": ["s"] * len(stamps)}
        kwargs.update(resolution=(1e4 / pixel_um, 1e4 / pixel_um), resolutionunit="CENTIMETER", metadata=ome)
    else:
        opts = dict(bigtiff=big)
        kwargs.update(resolution=(1e4 / pixel_um, 1e4 / pixel_um), resolutionunit="CENTIMETER", metadata={"axes": "TYX"})
    try:
        with tifffile.TiffWriter(target, **opts) as writer:
            writer.write(iter(frames), **kwargs)
    except DleStreamError:
        raise
    except OSError as exc:
        raise DleStreamError(f"{path}: cannot write the TIFF ({exc.strerror or exc}); choose a writable output path") from None
    except (ValueError, TypeError) as exc:
        raise DleStreamError(f"{path}: cannot write the TIFF ({type(exc).__name__}: {exc}); check the path and the movie") from None


def _write_zarr(
    path: Path, frames: _Frames, timing: ScanTiming, extra: dict[str, Any] | None, stamps: np.ndarray | None,
    shown: Path | None = None,
) -> None:
    """Write the store at ``path`` (its name and errors are those of ``shown``, the store the
    user asked for). An error of the frame source itself (a camera, a generator) is raised as
    it is; zarr's own errors become one line."""
    target, path = path, shown or path
    source_failed = False

    def source(chunk: int) -> Iterator[np.ndarray]:
        nonlocal source_failed
        try:
            yield from frames.blocks(chunk)
        except Exception:  # (not GeneratorExit: the generator closed after a zarr error)
            source_failed = True
            raise

    frame_bytes = frames.height * frames.width * frames.dtype.itemsize
    chunk = max(1, min(ZARR_CHUNK_BYTES // max(frame_bytes, 1), frames.n_frames or 1 << 30))
    doc = md.make_document(timing, extra, None)
    try:
        group = zarr.open_group(store=str(target), mode="w", zarr_format=3)
        group.attrs.update(
            {
                "ome": {
                    "version": "0.5",
                    "multiscales": [
                        {
                            "name": path.stem,
                            "axes": [
                                {"name": "t", "type": "time", "unit": "second"},
                                {"name": "y", "type": "space", "unit": "micrometer"},
                                {"name": "x", "type": "space", "unit": "micrometer"},
                            ],
                            "datasets": [
                                {
                                    "path": "0",
                                    "coordinateTransformations": [
                                        {
                                            "type": "scale",
                                            "scale": [timing.frame_period_us / 1e6, timing.pixel_size_um, timing.pixel_size_um],
                                        }
                                    ],
                                }
                            ],
                        }
                    ],
                },
                md.DLE_ZARR_KEY: {**doc, "frames_written": 0, "complete": False},
            }
        )
        array = group.create_array(
            "0",
            shape=(frames.n_frames or 0, frames.height, frames.width),
            chunks=(chunk, frames.height, frames.width),
            dtype=frames.dtype,
            dimension_names=("t", "y", "x"),
            fill_value=0,
        )
        t = 0
        for block in source(chunk):
            if t + len(block) > array.shape[0]:
                array.resize((t + len(block), frames.height, frames.width))
            array[t : t + len(block)] = block
            t += len(block)
            # after the frames: a killed writer leaves a store that says how many are valid
            group.attrs[md.DLE_ZARR_KEY] = {**doc, "frames_written": t, "complete": False}
        if stamps is not None:
            if len(stamps) != t:
                raise DleStreamError(f"{path}: {len(stamps)} frame timestamps for {t} frames; pass one per frame")
            group.create_array(TIMESTAMPS_ARRAY, data=stamps, dimension_names=("t",))
        group.attrs[md.DLE_ZARR_KEY] = {**doc, "frames_written": t, "complete": True}
    except DleStreamError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr's errors become one line naming the store
        if source_failed:
            raise
        raise DleStreamError(f"{path}: cannot write the Zarr store ({type(exc).__name__}: {exc}); check the path") from None


def _remove(path: Path, fmt: str) -> None:
    """Delete a partly written file or Zarr store so that no half recording is left behind."""
    try:
        if fmt == "zarr" and (path / "zarr.json").is_file():
            shutil.rmtree(path)
        elif fmt != "zarr" and path.is_file():
            path.unlink()
    except OSError:
        pass
