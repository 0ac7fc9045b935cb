"""qconv: quantize and convert large language models.

The command line (``qconv``) is a thin layer over this package; everything it does is
reachable from Python through :mod:`qconv.api`.
"""

__version__ = "0.1.0"
