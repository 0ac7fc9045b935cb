"""Model families as data: each family's :class:`ArchSpec` and the :class:`ModelConfig` of one model.

The lowest layer of qconv beside :mod:`qconv.core`: readers, runner, pipeline, methods and
writers all read the layout of a decoder block from here and nowhere else.
"""

from qconv.arch.config import ModelConfig, RopeScaling, config_from_dict
from qconv.arch.families import BY_ARCHITECTURE, BY_GGUF_ARCH, FAMILIES, spec_for
from qconv.arch.spec import EMBED, FINAL_NORM, LAYER_PREFIX, LM_HEAD, ArchSpec, GroupSpec, LinearSpec, NormSpec

__all__ = [
    "ArchSpec", "GroupSpec", "LinearSpec", "NormSpec", "ModelConfig", "RopeScaling", "config_from_dict",
    "FAMILIES", "BY_ARCHITECTURE", "BY_GGUF_ARCH", "spec_for", "EMBED", "FINAL_NORM", "LM_HEAD", "LAYER_PREFIX",
]
