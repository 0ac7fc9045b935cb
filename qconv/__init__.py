"""qconv: quantize and convert large language models.

The command line (``qconv``) is a thin layer over this package; everything it does is
reachable from Python through :mod:`qconv.api`.
"""

import os

# MKL's strict conditional numerical reproducibility: its GEMMs (and triangular solves) give the
# same bits whatever the thread count, as measured with this torch (a 576-wide Hessian sum
# differed between 1 and 2 threads without it; no slowdown measured with AUTO). That is what
# lets a data-parallel run, one thread per rank, reproduce a single process byte for byte.
# Read by MKL on its first call, so it must be set before torch's first GEMM.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
