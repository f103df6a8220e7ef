"""dle-stream: live estimation of nanoparticle diffusion coefficients (µm²/s) from
raster-scanned (two-photon / confocal) microscope movies with a deep-learning estimator."""

__version__ = "0.1.0"

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming, TimingComparison

__all__ = ["DleStreamError", "ScanTiming", "TimingComparison", "__version__"]
