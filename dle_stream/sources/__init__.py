"""Where frames come from: every source yields :class:`~dle_stream.events.FrameEvent`.

- :class:`~dle_stream.sources.micromanager.MicroManagerSource`: a running Micro-Manager
  acquisition (pymmcore-plus), MDA, direct sequence or live; reports lost frames (jumps
  in ``ImageNumber``) and yields :class:`SourceStalled` notices when the camera goes quiet;
- :func:`~dle_stream.sources.demo_camera.create_demo_core`: a ``UniMMCore`` with a
  simulated two-photon camera (ground truth D map known), for trying and testing it all;
- :func:`~dle_stream.sources.scan_properties.timing_from_core`: the scan timing from
  device properties through a small JSON mapping;
- :class:`~dle_stream.sources.file_source.FileSource`: a recording on disk, as fast as
  possible or in real time.

Importing this package does not import pymmcore-plus (which configures logging on
import); the Micro-Manager modules import it when used.
"""

from dle_stream.sources.base import GapCounter, SourceStalled
from dle_stream.sources.file_source import FileSource
from dle_stream.sources.micromanager import MicroManagerSource
from dle_stream.sources.scan_properties import DEMO_CAMERA_MAPPING, load_mapping, timing_from_core

__all__ = [
    "DEMO_CAMERA_MAPPING",
    "FileSource",
    "GapCounter",
    "MicroManagerSource",
    "SourceStalled",
    "create_demo_core",
    "get_demo_camera",
    "load_mapping",
    "timing_from_core",
]


def __getattr__(name: str):
    if name in ("create_demo_core", "get_demo_camera"):
        from dle_stream.sources import demo_camera as _demo

        return getattr(_demo, name)
    raise AttributeError(name)
