"""Tiles and regions of interest: where in the frame D is estimated.

A model reads tiles of a fixed size (20×20 px by default). ``grid`` covers the frame
with non-overlapping tiles (leftover pixels at the right and bottom edges are not
covered, and reported). A user's ROI of any size is covered by *disjoint* model tiles: as
many whole tiles as fit in each direction, side by side and centred (the leftover
border pixels, less than a tile, are not covered; an ROI smaller than a tile gets one tile
centred on it), kept inside the frame. Disjoint tiles share no pixels, so their
likelihoods combine as independent (:mod:`dle_stream.combine`). Tiles shared by several
ROIs are estimated once.

Geometry is in pixels of the full frame: ``(row, col, height, width)``; ROIs given as
``x,y,w,h`` on the command line use x = column, y = row, as image viewers do.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dle_stream.errors import RoiError, arg


@dataclass(frozen=True)
class Tile:
    """A model-sized tile of the full frame, px: top-left (row, col) and size."""

    row: int
    col: int
    height: int
    width: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return (self.row, self.col, self.height, self.width)

    def cut(self, frame: np.ndarray) -> np.ndarray:
        return frame[..., self.row:self.row + self.height, self.col:self.col + self.width]


@dataclass
class Region:
    """A named region of interest and the indices of the tiles covering it."""

    name: str
    bbox: tuple[int, int, int, int]  # row, col, height, width (px)
    tiles: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "bbox": list(self.bbox), "tiles": list(self.tiles)}


@dataclass
class TileLayout:
    """All tiles of a stream, the ROIs they serve, and what the grid leaves uncovered."""

    frame_height: int
    frame_width: int
    tiles: list[Tile]
    regions: list[Region]
    uncovered_px: int = 0

    @property
    def bboxes(self) -> np.ndarray:
        return np.array([t.bbox for t in self.tiles], dtype=np.int32).reshape(-1, 4)

    def cut_all(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[n_tiles, h, w] tiles of a frame [H, W] (all tiles have the model's size), in
        the layout's order; written into ``out`` when given (and returned).

        One vectorised copy per frame, not one per tile: a regular grid (as
        :func:`grid_layout` makes) is a reshaped view of the frame, any other layout one
        gather with precomputed pixel indices."""
        plan = self._cut_plan()
        if plan is None:  # no tiles
            tiles = np.zeros((0, 0, 0), dtype=frame.dtype)
        elif plan[0] == "grid":
            _, r0, c0, rows, cols, h, w = plan
            block = frame[r0:r0 + rows * h, c0:c0 + cols * w]
            tiles = block.reshape(rows, h, cols, w).transpose(0, 2, 1, 3)  # a view [rows, cols, h, w]
            if out is not None:
                out.reshape(rows, cols, h, w)[...] = tiles
                return out
            return tiles.reshape(rows * cols, h, w)
        else:
            _, r_index, c_index = plan
            tiles = frame[r_index, c_index]
        if out is not None:
            out[...] = tiles
            return out
        return tiles

    def _cut_plan(self) -> tuple | None:
        """How :meth:`cut_all` cuts this layout's tiles (cached while the tiles stay the same)."""
        key = tuple(self.tiles)
        cached = self.__dict__.get("_plan")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan: tuple | None = None
        if self.tiles:
            h, w = self.tiles[0].height, self.tiles[0].width
            r0, c0 = self.tiles[0].row, self.tiles[0].col
            cols = next((i for i, t in enumerate(self.tiles) if t.row != r0), len(self.tiles))
            rows = len(self.tiles) // cols
            grid = [Tile(r0 + i * h, c0 + j * w, h, w) for i in range(rows) for j in range(cols)]
            if grid == list(self.tiles):
                plan = ("grid", r0, c0, rows, cols, h, w)
            else:
                r_index = np.array([t.row + np.arange(t.height) for t in self.tiles])[:, :, None]
                c_index = np.array([t.col + np.arange(t.width) for t in self.tiles])[:, None, :]
                plan = ("gather", r_index, c_index)
        self.__dict__["_plan"] = (key, plan)
        return plan


def _positions(start: int, length: int, tile: int, limit: int) -> list[int]:
    """Starts of disjoint tiles covering [start, start+length): as many whole tiles as fit,
    side by side and centred (the few leftover pixels at both ends are not covered); one
    tile centred on a span shorter than a tile. Kept inside [0, limit)."""
    n = max(1, length // tile)
    first = start + (length - n * tile) // 2
    starts = [first + i * tile for i in range(n)]
    return [int(min(max(s, 0), limit - tile)) for s in starts]


def tile_boxes(height: int, width: int, tile_h: int, tile_w: int, *,
               partial_edges: bool = False) -> list[tuple[int, int, int, int]]:
    """The (row, col, height, width) px boxes of the tile grid of a height × width frame,
    row by row from the top left. Whole tiles only (the leftover pixels at the right and
    bottom are not covered), or with ``partial_edges`` smaller tiles there so that the
    whole frame is covered (the simulator's grid)."""
    if partial_edges:
        return [(r, c, min(tile_h, height - r), min(tile_w, width - c))
                for r in range(0, height, tile_h) for c in range(0, width, tile_w)]
    return [(r, c, tile_h, tile_w) for r in range(0, height - tile_h + 1, tile_h)
            for c in range(0, width - tile_w + 1, tile_w)]


def grid_layout(height: int, width: int, tile_h: int, tile_w: int) -> TileLayout:
    """Cover the frame with non-overlapping tiles; one region per tile plus "frame"."""
    _check_frame(height, width, tile_h, tile_w)
    tiles = [Tile(*box) for box in tile_boxes(height, width, tile_h, tile_w)]
    covered = (height // tile_h) * tile_h * (width // tile_w) * tile_w
    regions = [Region("frame", (0, 0, height, width), list(range(len(tiles))))]
    return TileLayout(height, width, tiles, regions, uncovered_px=height * width - covered)


def roi_layout(height: int, width: int, tile_h: int, tile_w: int, rois: list[Region]) -> TileLayout:
    """Cover each ROI with tiles (deduplicated across ROIs)."""
    _check_frame(height, width, tile_h, tile_w)
    names = [roi.name for roi in rois]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RoiError(f"ROI name {twice[0]!r} is given {names.count(twice[0])} times; "
                       f"give every region in {arg('rois')} its own name")
    tiles: list[Tile] = []
    index: dict[Tile, int] = {}
    out = []
    for roi in rois:
        r, c, h, w = roi.bbox
        if h < 1 or w < 1 or r < 0 or c < 0 or r + h > height or c + w > width:
            raise RoiError(
                f"ROI {roi.name!r} (x={c}, y={r}, w={w}, h={h}) lies outside the {width}×{height} px frame; "
                f"fix {arg('rois')} (x,y,w,h in pixels, inside the frame)"
            )
        ids = []
        for tr in _positions(r, h, tile_h, height):
            for tc in _positions(c, w, tile_w, width):
                t = Tile(tr, tc, tile_h, tile_w)
                if t not in index:
                    index[t] = len(tiles)
                    tiles.append(t)
                ids.append(index[t])
        out.append(Region(roi.name, roi.bbox, sorted(set(ids))))
    return TileLayout(height, width, tiles, out)


def _check_frame(height: int, width: int, tile_h: int, tile_w: int) -> None:
    if height < tile_h or width < tile_w:
        raise RoiError(
            f"frames of {height}×{width} px are smaller than the model's {tile_h}×{tile_w} px tile; "
            f"use a recording with larger frames or a model trained for smaller tiles"
        )


def _whole_px(value) -> int:
    """A whole number of pixels ("12", 12, 12.0); ValueError for fractions ("0.5"), bools and non-numbers."""
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def parse_roi(roi: str, name: str | None = None) -> Region:
    """'x,y,w,h' or 'name=x,y,w,h' (px) → Region; x = column, y = row."""
    label, _, coords = roi.rpartition("=")
    try:
        x, y, w, h = (_whole_px(v) for v in coords.split(","))
    except ValueError:
        raise RoiError(f"{arg('roi', roi)}: use x,y,w,h in whole pixels (optionally name=x,y,w,h), "
                       f"e.g. 0,0,40,40") from None
    name = name or label.strip() or None
    return Region(name or f"roi{x}_{y}", (y, x, h, w))


def read_rois(rois_file: Path) -> list[Region]:
    """ROIs from a JSON list of {name?, x, y, w, h} or a CSV with columns name,x,y,w,h."""
    path = Path(rois_file)
    if not path.is_file():
        raise RoiError(f"{arg('rois_file', path)}: no such file; give a JSON or CSV file of x,y,w,h ROIs")
    rows: list[dict]
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            rows = data["rois"] if isinstance(data, dict) and "rois" in data else data
        else:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        regions = []
        for i, row in enumerate(rows):
            x, y, w, h = (_whole_px(row[k]) for k in ("x", "y", "w", "h"))
            regions.append(Region(str(row.get("name") or f"roi{i}"), (y, x, h, w)))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        raise RoiError(
            f"{arg('rois_file', path)}: need a JSON list of {{name, x, y, w, h}} or a CSV with columns name,x,y,w,h (whole pixels)"
        ) from None
    if not regions:
        raise RoiError(f"{arg('rois_file', path)}: holds no ROI")
    return regions
