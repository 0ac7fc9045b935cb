"""``torchrun ... tests/fault_rank.py ARGS``: ``qconv ARGS`` in which rank ``QCONV_TEST_FAIL_RANK``
raises when it loads layer ``QCONV_TEST_FAIL_LAYER`` (a rank's own failure mid-run, for
tests/test_faults.py)."""

import os
import sys

from qconv import cli
from qconv.quant.pipeline import LayerPipeline

if os.environ.get("RANK") == os.environ["QCONV_TEST_FAIL_RANK"]:
    load, layer = LayerPipeline.load_layer, int(os.environ["QCONV_TEST_FAIL_LAYER"])

    def failing(self: LayerPipeline, index: int):
        if index == layer:
            raise ValueError("injected failure")
        return load(self, index)

    LayerPipeline.load_layer = failing  # type: ignore[method-assign]
cli.main(sys.argv[1:])
