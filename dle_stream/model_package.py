"""Model packages on disk: a folder with ``weights.safetensors`` and ``card.json``.

The card (:class:`ModelCard`) says what the weights are valid for: tile size, window
length, the D prior range (µm²/s), the scan timing and pixel size of the simulated
training movies, the PSF and brightness priors, the simulator settings and seed, how it
was trained and how it validated, and the sha256 of the weights. Loading never
unpickles: weights are read with :func:`safetensors.torch.load_file` and every problem is
a one-line :class:`~dle_stream.errors.DleStreamError` naming the file and the fix.

Models are found by name in :func:`model_search_paths`: the folders in the environment
variable ``DLE_STREAM_MODELS`` (``os.pathsep``-separated), the repository's ``models/``
and ``<sys.prefix>/share/dle-stream/models``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file, save_file

from dle_stream.errors import DleStreamError
from dle_stream.files import write_atomic
from dle_stream.model import DLEModel, ModelConfig
from dle_stream.scan_family import ScanFamily
from dle_stream.timing import ScanTiming

_SafetensorError: type[Exception] = getattr(safetensors, "SafetensorError", Exception)

#: The card schema this version reads and writes.
SCHEMA_VERSION = 1
#: Card fields added after schema 1 was written: a card without them is read with their default.
OPTIONAL_CARD_FIELDS = ("scan_family",)
WEIGHTS_FILE = "weights.safetensors"
#: The weights the card names while a save replaces them (a hard link, or a copy); removed
#: once the new card is in place, so it is present only after a save that did not finish.
PREVIOUS_WEIGHTS_FILE = ".weights.previous.safetensors"
CARD_FILE = "card.json"
#: Environment variable with extra model folders (``os.pathsep``-separated).
MODELS_ENV = "DLE_STREAM_MODELS"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from dle_stream import __version__

    return __version__


@dataclass(kw_only=True)
class ModelCard:
    """What a model's weights are valid for, and where they came from (``card.json``).

    Attributes:
        schema_version: card format version (:data:`SCHEMA_VERSION`).
        name: short model name (used to find it; usually the folder name).
        description: one line for people.
        tile_height, tile_width: tile size the network reads, px.
        window_frames: window length it was trained on, frames (others work).
        d_min_um2_s, d_max_um2_s: the uniform D prior of training, µm²/s; the network's
            outputs are in units of ``d_max_um2_s``.
        scan_timing: :meth:`ScanTiming.to_dict` of the training scan (times in µs).
        pixel_size_um: pixel edge in the sample, µm.
        psf_priors, brightness_priors: the simulator's PSF (µm) and photon priors.
        simulator: simulator settings and seed (opaque here).
        architecture: :meth:`ModelConfig.to_dict`.
        training: steps, time_s, device, ... (opaque here).
        validation: metrics on held-out simulated movies (opaque here).
        scan_family: a family model's box of scans (:meth:`ScanFamily.to_dict`); empty for a
            model of one scan (``scan_timing``). A family's ``scan_timing`` is one scan of its box.
        weights_sha256: sha256 hex digest of ``weights.safetensors`` (set on save).
        software_version: dle-stream version that wrote the package.
        created: ISO 8601 time the package was written.
    """

    schema_version: int = SCHEMA_VERSION
    name: str
    description: str = ""
    tile_height: int
    tile_width: int
    window_frames: int
    d_min_um2_s: float
    d_max_um2_s: float
    scan_timing: dict[str, Any]
    pixel_size_um: float
    psf_priors: dict[str, Any] = field(default_factory=dict)
    brightness_priors: dict[str, Any] = field(default_factory=dict)
    simulator: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    scan_family: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    software_version: str = field(default_factory=_version)
    created: str = field(default_factory=_now)

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for f in fields(ModelCard)]

    @property
    def timing(self) -> ScanTiming:
        """The training scan timing as a :class:`ScanTiming`."""
        return ScanTiming.from_dict(self.scan_timing, source=f"model {self.name} card scan_timing")

    @property
    def family(self) -> ScanFamily | None:
        """The box of scans a family model serves (None: a model of one scan)."""
        if not self.scan_family:
            return None
        return ScanFamily.from_dict(self.scan_family, source=f"model {self.name} card scan_family")

    @property
    def model_config(self) -> ModelConfig:
        """The architecture as a :class:`ModelConfig`."""
        return ModelConfig.from_dict(self.architecture, source="model card architecture")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = CARD_FILE) -> "ModelCard":
        """Validate a parsed ``card.json``; raises :class:`DleStreamError` naming the problem."""
        if not isinstance(data, dict):
            raise DleStreamError(f"{source}: a model card must be a JSON object; re-save the package")
        version = data.get("schema_version")
        if "schema_version" in data and version != SCHEMA_VERSION:
            raise DleStreamError(
                f"{source}: unknown card schema_version {version!r} (this dle-stream reads {SCHEMA_VERSION}); "
                f"upgrade dle-stream or retrain the model with this version"
            )
        names = cls.field_names()
        missing = [n for n in names if n not in data and n not in OPTIONAL_CARD_FIELDS]
        if missing:
            raise DleStreamError(
                f"{source}: the card lacks field(s) {', '.join(missing)}; "
                f"re-save the package with `save_model_package` or retrain it"
            )
        unknown = [k for k in data if k not in names]
        if unknown:
            raise DleStreamError(
                f"{source}: unknown card field(s) {', '.join(unknown)}; "
                f"the package was written by another dle-stream version: upgrade or re-save it"
            )
        card = cls(**{n: data[n] for n in names if n in data})
        card.validate(source)
        return card

    def validate(self, source: str = CARD_FILE) -> None:
        """Check types and ranges; raises :class:`DleStreamError` listing the problems."""
        problems: list[str] = []

        def number(name: str, positive: bool = False, integer: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok and integer:
                ok = float(v).is_integer()
            if ok and positive:
                ok = v > 0
            if not ok:
                kind = "a positive " if positive else "a "
                problems.append(f"{name} must be {kind}{'integer' if integer else 'number'} (got {v!r})")

        for name in ("tile_height", "tile_width", "window_frames"):
            number(name, positive=True, integer=True)
        number("d_min_um2_s")
        number("d_max_um2_s", positive=True)
        number("pixel_size_um", positive=True)
        if not problems and not 0 <= self.d_min_um2_s < self.d_max_um2_s:
            problems.append(f"the D prior [{self.d_min_um2_s}, {self.d_max_um2_s}] µm²/s must have 0 ≤ d_min < d_max")
        for name in ("name", "description", "weights_sha256", "software_version", "created"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string")
        if isinstance(self.name, str) and not self.name.strip():
            problems.append("name must not be empty")
        for name in ("scan_timing", "psf_priors", "brightness_priors", "simulator", "architecture", "training",
                     "validation", "scan_family"):
            if not isinstance(getattr(self, name), dict):
                problems.append(f"{name} must be a JSON object")
        if problems:
            raise DleStreamError(f"{source}: invalid model card: {'; '.join(problems)}; fix or re-save the package")
        try:
            _ = self.timing  # parses (and so validates) the card's scan timing
            config = self.model_config
        except DleStreamError as exc:
            raise DleStreamError(f"{source}: {exc}") from None
        if bool(self.scan_family) != bool(config.scan_features):
            raise DleStreamError(
                f"{source}: " + ("the card has a scan family but the network takes no scan features"
                                 if self.scan_family else "the network takes scan features but the card has no "
                                 "scan_family") + "; fix the card")
        if self.scan_family:
            try:
                _ = self.family
            except DleStreamError as exc:
                raise DleStreamError(f"{source}: {exc}") from None
        if (config.tile_height, config.tile_width) != (self.tile_height, self.tile_width):
            raise DleStreamError(
                f"{source}: tile {self.tile_height}×{self.tile_width} px differs from the architecture's "
                f"{config.tile_height}×{config.tile_width} px; fix the card"
            )


# ------------------------------------------------------------------ reading
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(folder: str | Path) -> ModelCard:
    """Read and validate ``card.json`` of a package folder (weights are not read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DleStreamError(f"{folder}: no such model folder; give a model package folder or a name from `dle-stream models`")
    path = folder / CARD_FILE
    if not path.is_file():
        raise DleStreamError(f"{path}: missing; a model package needs {CARD_FILE} and {WEIGHTS_FILE} (re-save or retrain it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DleStreamError(f"{path}: not UTF-8 text; restore the card from the original package") from None
    except json.JSONDecodeError as exc:
        raise DleStreamError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); restore the card from the original package"
        ) from None
    except OSError as exc:
        raise DleStreamError(f"{path}: cannot read ({exc.strerror}); check the file's permissions") from None
    return ModelCard.from_dict(data, source=str(path))


def load_model_package(folder: str | Path, device: str | torch.device = "cpu") -> tuple[DLEModel, ModelCard]:
    """Load a package folder: the network (eval mode, on ``device``) and its card.

    Never unpickles. Raises :class:`DleStreamError` when the folder, weights or card are
    missing, the card is invalid, the weights' sha256 differs from the card's, or the
    weights do not fit the card's architecture.
    """
    folder = Path(folder)
    card = load_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DleStreamError(f"{weights}: missing; the package is incomplete: copy it again or retrain the model")
    # after a save stopped between its new weights and its new card, the card's own weights
    # are the ones kept beside them, and the package as it was before that save loads
    named = _file_with_digest(folder, card.weights_sha256)
    if named is None:
        digest = _sha256(weights)
        raise DleStreamError(
            f"{weights}: sha256 {digest[:12]}… does not match the card's weights_sha256 "
            f"{card.weights_sha256[:12] or '(empty)'}…; the weights were changed or corrupted: copy the package again"
        )
    weights = named
    try:
        tensors = load_file(str(weights), device="cpu")
    except (_SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DleStreamError(
            f"{weights}: not a safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"dle-stream never loads pickles: re-save the weights with `save_model_package`"
        ) from None
    model = DLEModel(card.model_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}")
        raise DleStreamError(
            f"{weights}: the weights do not fit the card's architecture ({'; '.join(parts)}); "
            f"the card and weights belong to different models: re-save or retrain the package"
        )
    model.load_state_dict(tensors)
    model.to(device)
    model.eval()
    return model, card


# ------------------------------------------------------------------ writing
def save_model_package(folder: str | Path, model: DLEModel, card: ModelCard) -> Path:
    """Write ``model`` and ``card`` as a package in ``folder`` (created if needed).

    The card is written with ``weights_sha256`` of the new weights file, the
    architecture of ``model`` and the current ``schema_version``. Both files go through
    temporary files and renames, and the weights being replaced are kept (a hard link,
    :data:`PREVIOUS_WEIGHTS_FILE`) until the new card is in place: a crash or kill at any
    point leaves a package that loads whole, the old one or the new one, never a
    half-written file nor new weights under the old card. Other files in the folder
    (checkpoints, curves) are left alone.

    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = replace(card, schema_version=SCHEMA_VERSION, architecture=model.config.to_dict())
    card.validate(source=f"card for {folder}")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    digest: list[str] = []

    def write_weights(tmp: Path) -> None:
        save_file(state, str(tmp), metadata={"format": "pt", "dle_stream_card_schema": str(SCHEMA_VERSION)})
        digest.append(_sha256(tmp))

    previous = folder / PREVIOUS_WEIGHTS_FILE
    try:
        wanted = json.loads((folder / CARD_FILE).read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        wanted = None  # no readable card: no package to keep
    named = _file_with_digest(folder, wanted)
    if named != previous:  # (it is `previous` after a save that did not finish: kept as it is)
        previous.unlink(missing_ok=True)
        if named is not None:
            _keep_beside(named, previous)
    write_atomic(weights, write_weights)
    card = replace(card, weights_sha256=digest[0])
    text = card.to_json()
    write_atomic(folder / CARD_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    previous.unlink(missing_ok=True)
    return folder


def _file_with_digest(folder: Path, wanted: str | None) -> Path | None:
    """The weights file in ``folder`` whose sha256 is ``wanted`` (the card's): the weights,
    or the ones a save that did not finish kept beside them; None when neither is."""
    for name in (WEIGHTS_FILE, PREVIOUS_WEIGHTS_FILE):
        if wanted and (folder / name).is_file() and _sha256(folder / name) == wanted:
            return folder / name
    return None


def _keep_beside(weights: Path, previous: Path) -> None:
    """``previous`` becomes the same file as ``weights`` (a hard link; a copy where the file
    system has none), whole on disk before the weights are replaced."""
    try:
        os.link(weights, previous)
    except OSError:
        write_atomic(previous, lambda tmp: shutil.copyfile(weights, tmp))


# ------------------------------------------------------------------ finding
def model_search_paths() -> list[Path]:
    """Folders searched for model packages, in order.

    ``$DLE_STREAM_MODELS`` (``os.pathsep``-separated) if set, the repository's
    ``models/``, then ``<sys.prefix>/share/dle-stream/models``.
    """
    paths: list[Path] = []
    env = os.environ.get(MODELS_ENV)
    if env:
        paths += [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    paths.append(Path(__file__).resolve().parents[1] / "models")
    paths.append(Path(sys.prefix) / "share" / "dle-stream" / "models")
    return paths


def _package_folders() -> list[Path]:
    seen: set[Path] = set()
    out: list[Path] = []
    for base in model_search_paths():
        if not base.is_dir():
            continue
        for sub in sorted(base.iterdir()):
            if sub.is_dir() and (sub / CARD_FILE).is_file() and sub.resolve() not in seen:
                seen.add(sub.resolve())
                out.append(sub)
    return out


def list_models() -> list[tuple[Path, ModelCard]]:
    """Every valid package in :func:`model_search_paths` as (folder, card); invalid ones are skipped."""
    found: list[tuple[Path, ModelCard]] = []
    for folder in _package_folders():
        try:
            found.append((folder, load_card(folder)))
        except DleStreamError:
            continue
    return found


def resolve_model(name_or_path: str | Path) -> Path:
    """A package folder from a folder path or a model name.

    A path to an existing folder is returned as is. Otherwise the name is looked up as
    a folder name, then as a card ``name``, in :func:`model_search_paths` (first wins).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    looks_like_path = isinstance(name_or_path, Path) or os.sep in text or (os.altsep or os.sep) in text
    folders = _package_folders()
    if not looks_like_path:
        for folder in folders:
            if folder.name == text:
                return folder
        for folder, card in list_models():
            if card.name == text:
                return folder
    names = sorted({f.name for f in folders})
    available = ", ".join(names) if names else "none"
    searched = os.pathsep.join(str(p) for p in model_search_paths())
    raise DleStreamError(
        f"model {text!r}: no such package folder or model name (available: {available}; searched {searched}); "
        f"give a package folder, set {MODELS_ENV}, or train one with `dle-stream train`"
    )
