"""inkpipe.pipeline: the data contract — fragments, manifest, the Zarr store, ingest, windows.

Axis order is (z, y, x) everywhere: z is the CT layer (slice) index, y the image row, x the
image column. ``train`` and ``infer`` import this package; it imports neither of them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("inkpipe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
