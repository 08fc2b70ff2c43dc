"""fedseg: federated 3D tumour segmentation for hospitals on NVIDIA FLARE and MONAI.

This package holds the command line and what is shared by site and server code; the
capabilities live in the top-level packages ``transforms``, ``models``, ``app_site``,
``app_server`` and ``jobs``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
