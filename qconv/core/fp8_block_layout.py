"""The FP8 checkpoint layout models are published in (DeepSeek-V3, Qwen3-FP8, ...): what
transformers' ``FineGrainedFP8`` integration and vLLM's ``fp8`` method load.

    config.json["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                          "fmt": "e4m3", "weight_block_size": [128, 128],
                                          "modules_to_not_convert": [...]}

Per quantized Linear ``X``: ``X.weight`` float8_e4m3fn ``[out, in]`` and ``X.weight_scale_inv``
float32 ``[ceil(out/128), ceil(in/128)]``, where despite its name the weight is
``fp8 * weight_scale_inv`` per 128x128 block; activations are quantized at run time per token
and 128 features (dynamic), like compressed-tensors' ``FP8_BLOCK``. So this is that scheme
under other names: the reader and writer translate it to and from compressed-tensors'
description (:func:`as_compressed_tensors`, :data:`RENAMES`) and share everything else.
"""

from __future__ import annotations

from typing import Any

QUANT_METHOD = "fp8"
#: compressed-tensors local tensor name -> this layout's
RENAMES = {"weight_scale": "weight_scale_inv"}


def as_compressed_tensors(qcfg: dict[str, Any], linears: list[str], stored: set[str],
                          fp8_weights: set[str]) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` describing the same checkpoint (block FP8
    weights, dynamic 1 x block activations), or ValueError naming what has no equivalent.

    Which Linears are quantized is read from the files (``stored``: the tensor names;
    ``fp8_weights``: the Linears whose weight is stored in float8), not from
    ``modules_to_not_convert``, whose spelling varies between publishers: an FP8 weight
    without its ``weight_scale_inv`` is a damaged file, not an unquantized Linear."""
    if not isinstance(qcfg, dict):
        raise ValueError("a quantization_config that is not an object")
    block = qcfg.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"weight_block_size {block!r} (only 2-D block scales are read)")
    if qcfg.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"activation_scheme {qcfg.get('activation_scheme')!r} (only dynamic is read)")
    if qcfg.get("fmt", "e4m3") != "e4m3" or qcfg.get("scale_fmt", "float") != "float":
        raise ValueError("FP8 formats other than e4m3 with float32 scales")
    ignore = [m for m in linears if f"{m}.{RENAMES['weight_scale']}" not in stored]
    unscaled = [m for m in ignore if m in fp8_weights]
    if unscaled:
        raise KeyError(f"tensor {unscaled[0]}.{RENAMES['weight_scale']} is missing (its weight is float8)")
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                        "block_structure": list(block), "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                                  "group_size": block[1], "dynamic": True},
            "output_activations": None}},
        "ignore": ignore,
    }


def fp8_block_config(block: tuple[int, int], not_converted: list[str]) -> dict[str, Any]:
    """This layout's ``quantization_config`` for weights in ``block`` blocks."""
    return {"quant_method": QUANT_METHOD, "activation_scheme": "dynamic", "fmt": "e4m3",
            "weight_block_size": list(block), "modules_to_not_convert": not_converted}
