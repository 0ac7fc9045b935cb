"""YAML recipes: what to quantize, how, with which calibration data, into which format.

    name: w4a16-gptq
    scheme: {bits: 4, group_size: 128, symmetric: false}     # or a named scheme: `scheme: nvfp4`
    ignore: [lm_head]
    overrides: [{pattern: 'mlp\\.down_proj', bits: 8}]
    calibration: {data: c4.jsonl, samples: 128, seqlen: 2048, seed: 0, text_field: text}
    stages:
      - {method: gptq, damp: 0.01, act_order: true}
    output: {format: compressed-tensors, max_shard_size: 5GB}

Stages run in order: model-wide source transforms (rotate) first, then on every layer the
transforms (smoothquant, awq), then exactly one quantizer (rtn, gptq) last. CLI flags override
recipe fields. Validation names the offending key (with a suggestion for typos) before any model
is read; the resolved recipe is embedded in the output so a checkpoint says how it was made.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qconv.errors import CorruptFile, InputNotFound, InvalidOption
from qconv.core.grid import WeightScheme
from qconv.quant.methods import get_method
from qconv.quant.methods.base import Quantizer, Transform
from qconv.core.quantized import ActivationScheme
from qconv.quant.schemes import DEFAULT_IGNORE, PRESETS, Override, SchemeMap, preset_scheme

#: compressed-tensors (every scheme), the FP8 block layout published models use (fp8-block only),
#: or a GGUF file of a llama.cpp file type (``output.type``: q4_k_m, q3_k_m, ...)
OUTPUT_FORMATS = ("compressed-tensors", "fp8", "gguf")
#: the calibration passes' arithmetic; "auto": see :func:`qconv.quant.quantize.compute_dtype`
CALIBRATION_DTYPES = ("auto", "float32", "bfloat16")
#: what calibration activations may be stored in; "auto": the checkpoint's 16-bit dtype, or float32
ACTIVATION_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: memory modes (:class:`qconv.quant.pipeline.LayerPipeline`); "auto" chooses from the memory available
MEMORY_MODES = ("auto", "keep", "stream", "spill")


@dataclass(frozen=True)
class Calibration:
    data: str | None = None
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    text_field: str = "text"
    #: arithmetic of the calibration forward passes: float32, or bfloat16 (~4x faster GEMMs on
    #: CPUs with AVX512-BF16/AMX; weights stay float32); "auto": bfloat16 where it is native,
    #: except under GPTQ's Hessians (float32)
    dtype: str = "auto"
    #: what the calibration activations between ops and layers are stored in: "auto" is the
    #: checkpoint's 16-bit dtype (what the deployed model stores them in; half the memory), and
    #: bfloat16 for a float32 checkpoint; float32 keeps every bit
    act_dtype: str = "auto"
    #: keep / stream / spill the calibration buffers (see ``quantize --dry-run``); "auto" picks
    #: the first that fits the memory available (or ``--max-memory``)
    memory: str = "auto"
    #: the rows are conversations (``text_field``: lists of {role, content}) rendered with the
    #: model's chat template
    chat_template: bool = False


@dataclass(frozen=True)
class Stage:
    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_bits: int | None = None
    #: a named scheme (:data:`qconv.quant.schemes.PRESETS`: fp8, nvfp4, ...) instead of bits / group_size / symmetric
    preset: str | None = None
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    overrides: tuple[Override, ...] = ()
    calibration: Calibration = Calibration()
    stages: tuple[Stage, ...] = (Stage("rtn"),)
    output_format: str = "compressed-tensors"
    max_shard_size: str = "5GB"
    #: GGUF output: the llama.cpp file type (its mix gives every Linear's ggml type) and
    #: ``--tensor-type`` style ``PATTERN=TYPE`` overrides of the mix
    gguf_type: str | None = None
    tensor_types: tuple[str, ...] = ()
    #: "fp8": calibrate FP8 KV-cache scales (``k_scale`` / ``v_scale`` per layer) and declare the
    #: cache in the checkpoint (vLLM ``kv_cache_dtype="fp8"``); None: no KV-cache scheme
    kv_cache: str | None = None

    def schemes(self, scale_dtype: Any = None) -> SchemeMap:
        import torch

        scale_dtype = scale_dtype or torch.float32
        if self.preset is not None:
            default, act = preset_scheme(self.preset, scale_dtype)
        else:
            default = WeightScheme(self.bits, self.group_size, self.symmetric, scale_dtype)
            act = ActivationScheme(bits=self.act_bits) if self.act_bits else None
        return SchemeMap(default, self.overrides, self.ignore, act)

    @property
    def needs_calibration(self) -> bool:
        act = self.schemes().activations
        return any(get_method(s.method).needs_calibration for s in self.stages) or bool(act and act.needs_scale) \
            or self.kv_cache is not None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, in the YAML layout (what gets embedded in outputs)."""
        scheme: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.preset is not None:
            scheme = {"preset": self.preset}
        elif self.act_bits:
            scheme["activations"] = {"bits": self.act_bits}
        return {
            "name": self.name,
            "scheme": scheme,
            "ignore": list(self.ignore),
            "overrides": [{"pattern": o.pattern, **o.changes} for o in self.overrides],
            "calibration": asdict(self.calibration),
            "stages": [{"method": s.method, **s.options} for s in self.stages],
            "output": {"format": self.output_format, **({"type": self.gguf_type, "tensor_types": list(self.tensor_types)}
                       if self.output_format == "gguf" else {"max_shard_size": self.max_shard_size})},
            **({"kv_cache": self.kv_cache} if self.kv_cache else {}),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_TOP = {"name", "description", "scheme", "ignore", "overrides", "calibration", "stages", "output", "kv_cache"}
#: KV-cache schemes a recipe may declare
KV_CACHES = ("fp8",)
_SCHEME = {"bits", "group_size", "symmetric", "activations", "preset"}
_CALIB = {f for f in Calibration.__dataclass_fields__}
_OUTPUT = {"format", "max_shard_size", "type", "tensor_types"}
_OVERRIDE = {"pattern", "bits", "group_size", "symmetric"}


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(sorted(allowed))})"
            raise InvalidOption(f"recipe: unknown key {key!r} in {where}{hint}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidOption(f"recipe: {where} must be {names}, got {value!r}")
    return value


def _option_typed(value: Any, default: Any, where: str) -> None:
    """A stage option must have its default's type (an int is a valid float); an option whose
    default is None (meaning "derived") takes None or any scalar, which the method checks."""
    if default is None:
        _typed(value, (bool, int, float, str, type(None)), where)
    elif isinstance(default, float):
        if isinstance(value, bool):
            raise InvalidOption(f"recipe: {where} must be float, got {value!r}")
        _typed(value, (int, float), where)
    else:
        _typed(value, type(default), where)


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    return _typed(value, dict, key)


def recipe_from_dict(raw: Any, origin: str = "recipe") -> Recipe:
    """Validate a parsed recipe; errors name the key and the problem."""
    _typed(raw, dict, "the recipe")
    _check_keys(raw, _TOP, "the recipe")
    if isinstance(raw.get("scheme"), str):  # `scheme: fp8` names a preset
        raw = {**raw, "scheme": {"preset": raw["scheme"]}}
    scheme, calib, output = _section(raw, "scheme"), _section(raw, "calibration"), _section(raw, "output")
    _check_keys(scheme, _SCHEME, "scheme")
    preset = scheme.get("preset")
    if preset is not None:
        _typed(preset, str, "scheme.preset")
        if preset not in PRESETS:
            raise InvalidOption(f"recipe: unknown scheme {preset!r} (valid: {', '.join(PRESETS)})")
        clash = sorted(set(scheme) - {"preset"})
        if clash:
            raise InvalidOption(f"recipe: scheme.{clash[0]} cannot be combined with the named scheme {preset!r}")
    _check_keys(calib, _CALIB, "calibration")
    _check_keys(output, _OUTPUT, "output")
    act = scheme.get("activations")
    act_bits = None
    if act is not None:
        _check_keys(_typed(act, dict, "scheme.activations"), {"bits"}, "scheme.activations")
        act_bits = _typed(act.get("bits", 8), int, "scheme.activations.bits")
        if act_bits != 8:
            raise InvalidOption("recipe: scheme.activations.bits must be 8 (dynamic per-token int8)")
    overrides = []
    for i, o in enumerate(_typed(raw.get("overrides") or [], list, "overrides")):
        _check_keys(_typed(o, dict, f"overrides[{i}]"), _OVERRIDE, f"overrides[{i}]")
        if "pattern" not in o:
            raise InvalidOption(f"recipe: overrides[{i}] needs a 'pattern'")
        overrides.append(Override(_typed(o["pattern"], str, f"overrides[{i}].pattern"),
                                  {k: v for k, v in o.items() if k != "pattern"}))
    stages = []
    for i, s in enumerate(_typed(raw.get("stages") or [{"method": "rtn"}], list, "stages")):
        _typed(s, dict, f"stages[{i}]")
        if "method" not in s:
            raise InvalidOption(f"recipe: stages[{i}] needs a 'method'")
        cls = get_method(_typed(s["method"], str, f"stages[{i}].method"))
        opts = {k: v for k, v in s.items() if k != "method"}
        _check_keys(opts, set(cls.options), f"stages[{i}] ({cls.name})")
        for key, value in opts.items():
            _option_typed(value, cls.options[key], f"stages[{i}].{key}")
        stages.append(Stage(cls.name, opts))
    recipe = Recipe(
        name=str(raw.get("name", origin)),
        bits=_typed(scheme.get("bits", 4), int, "scheme.bits"),
        group_size=_typed(scheme.get("group_size", 128), int, "scheme.group_size"),
        symmetric=_typed(scheme.get("symmetric", False), bool, "scheme.symmetric"),
        act_bits=act_bits,
        preset=preset,
        ignore=tuple(_typed(p, str, "ignore[]") for p in _typed(raw.get("ignore", list(DEFAULT_IGNORE)), list, "ignore")),
        overrides=tuple(overrides),
        calibration=Calibration(**calib),
        stages=tuple(stages),
        output_format=_typed(output.get("format", "compressed-tensors"), str, "output.format"),
        max_shard_size=str(output.get("max_shard_size", "5GB")),
        gguf_type=None if output.get("type") is None else _typed(output["type"], str, "output.type"),
        tensor_types=tuple(_typed(t, str, "output.tensor_types[]")
                           for t in _typed(output.get("tensor_types") or [], list, "output.tensor_types")),
        kv_cache=raw.get("kv_cache"),
    )
    return validate(recipe)


def validate(recipe: Recipe) -> Recipe:
    """Checks that need the whole recipe (after flags were applied too)."""
    methods = [get_method(s.method)(**s.options) for s in recipe.stages]  # each checks its own options
    for method in methods:
        for scheme in _target_schemes(recipe):
            method.check_scheme(scheme)
    roles = [m.role for m in methods]
    if roles.count("quantizer") != 1 or roles[-1] != "quantizer":
        raise InvalidOption("recipe: stages must be transforms followed by exactly one quantizer (rtn or gptq) last")
    if roles != sorted(roles, key=("source", "transform", "quantizer").index):
        raise InvalidOption("recipe: a model-wide stage (rotate) must come before the per-layer stages")
    if isinstance(methods[-1], Quantizer) and methods[-1].fp_stream:
        transforms = [m for m in methods if isinstance(m, Transform)]
        late = [m.name for i, m in enumerate(transforms) if any(t.changes_outputs for t in transforms[:i])]
        if late:
            raise InvalidOption(f"recipe: {late[0]} after a stage that changes the layer's outputs (awq's clip): "
                                f"with gptq fp_targets that stage must be the last transform")
    if recipe.output_format not in OUTPUT_FORMATS:
        raise InvalidOption(f"recipe: unknown output.format {recipe.output_format!r} (valid: {', '.join(OUTPUT_FORMATS)})")
    if recipe.output_format != "gguf" and (recipe.gguf_type is not None or recipe.tensor_types):
        raise InvalidOption("recipe: output.type and output.tensor_types are for output.format gguf")
    if recipe.output_format == "fp8" and (recipe.preset != "fp8-block" or recipe.overrides):
        raise InvalidOption("recipe: output.format fp8 (the published FP8 block layout) holds the fp8-block scheme "
                            "only, without overrides")
    if recipe.preset is not None and recipe.act_bits:
        raise InvalidOption(f"recipe: the named scheme {recipe.preset!r} sets its own activations")
    if recipe.act_bits and (recipe.bits != 8 or recipe.group_size != -1 or not recipe.symmetric):
        raise InvalidOption("recipe: int8 activations (W8A8) need 8-bit symmetric per-channel weights (group_size: -1)")
    if recipe.kv_cache is not None and recipe.kv_cache not in KV_CACHES:
        raise InvalidOption(f"recipe: kv_cache must be one of {', '.join(KV_CACHES)}, got {recipe.kv_cache!r}")
    if recipe.kv_cache is not None and recipe.output_format == "fp8":
        raise InvalidOption("recipe: the fp8 output format has no KV-cache scales (write compressed-tensors)")
    c = recipe.calibration
    if c.samples < 1 or c.seqlen < 2:
        raise InvalidOption("recipe: calibration.samples must be >= 1 and calibration.seqlen >= 2")
    if c.dtype not in CALIBRATION_DTYPES:
        raise InvalidOption(f"recipe: calibration.dtype must be one of {', '.join(CALIBRATION_DTYPES)}, got {c.dtype!r}")
    if c.act_dtype not in ACTIVATION_DTYPES:
        raise InvalidOption(f"recipe: calibration.act_dtype must be one of {', '.join(ACTIVATION_DTYPES)}, "
                            f"got {c.act_dtype!r}")
    if not isinstance(c.chat_template, bool):
        raise InvalidOption(f"recipe: calibration.chat_template must be true or false, got {c.chat_template!r}")
    if c.memory not in MEMORY_MODES:
        raise InvalidOption(f"recipe: calibration.memory must be one of {', '.join(MEMORY_MODES)}, got {c.memory!r}")
    return recipe


def _target_schemes(recipe: Recipe) -> list[Any]:
    """What the recipe's methods will round onto, checked against their options: the grid and its
    overrides, or for a GGUF output the file type's default ggml type (every ggml type asks the
    same of a method; which Linear gets which is the mix's choice, made once the model is read)."""
    if recipe.output_format != "gguf":
        recipe.schemes()  # bits / group size / patterns / preset
        default = recipe.schemes().default
        return [default, *(replace(default, **o.changes) for o in recipe.overrides)]
    from qconv.core.ggml_target import GGMLScheme
    from qconv.formats.gguf_types import TypeOverride, file_type
    from qconv.core import ggml

    if recipe.gguf_type is None:
        raise InvalidOption("recipe: output.format gguf needs output.type (a llama.cpp file type such as q4_k_m)")
    ft = file_type(recipe.gguf_type)
    if not ft.quantized:
        raise InvalidOption(f"recipe: output.type {ft.name} is not quantized: use `qconv convert` for it")
    for spec in recipe.tensor_types:
        TypeOverride.parse(spec, [*ggml.QTYPES, "F16", "F32", "BF16"])
    if recipe.preset is not None or recipe.act_bits or recipe.kv_cache is not None or recipe.overrides:
        raise InvalidOption("recipe: a GGUF output takes its types from output.type (no scheme preset, activation "
                            "bits, kv_cache or overrides; use output.tensor_types)")
    return [GGMLScheme(ft.default.name)]


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound("recipe not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CorruptFile(f"invalid YAML: {str(e).splitlines()[0]}", path) from None
    try:
        return recipe_from_dict(raw, path.stem)
    except InvalidOption as e:
        raise InvalidOption(str(e), path) from None


def recipe_for_method(method: str) -> Recipe:
    """The recipe ``--method X`` stands for when no recipe file is given."""
    if method == "smoothquant":
        return Recipe(name="smoothquant", bits=8, group_size=-1, symmetric=True, act_bits=8,
                      stages=(Stage("smoothquant"), Stage("rtn")))
    if method == "awq":
        return Recipe(name="awq", stages=(Stage("awq"), Stage("rtn")))
    return validate(Recipe(name=method, stages=(Stage(get_method(method).name),)))


def apply_flags(recipe: Recipe, **flags: Any) -> Recipe:
    """Flags override recipe fields; ``None`` means "not given". Method options
    (``damp``, ``act_order``, ``alpha``, ``mse``, ``fp_targets``, ``refine``) go to every stage that declares them;
    ``rotate`` True puts a rotate stage first (if the recipe has none), False drops it."""
    rotate = flags.pop("rotate", None)
    if rotate is not None:
        rotations = [s for s in recipe.stages if s.method == "rotate"] or [Stage("rotate")]
        others = tuple(s for s in recipe.stages if s.method != "rotate")
        recipe = replace(recipe, stages=(*rotations, *others) if rotate else others)
    top = {k: flags.pop(k) for k in ("bits", "group_size", "symmetric") if flags.get(k) is not None}
    preset = flags.pop("scheme", None)
    if preset is not None:
        if top:
            raise InvalidOption(f"--scheme {preset} sets the grid: drop --{next(iter(top)).replace('_', '-')}")
        if preset not in PRESETS and preset != "int":
            raise InvalidOption(f"unknown --scheme {preset!r} (valid: int, {', '.join(PRESETS)})")
        top = {"preset": None if preset == "int" else preset, "act_bits": None}
    elif recipe.preset is not None and top:
        top["preset"] = None  # explicit bits replace the recipe's named scheme
    for key in ("output_format", "kv_cache", "gguf_type"):
        value = flags.pop(key, None)
        if value is not None:
            top[key] = None if key == "kv_cache" and value == "fp" else value
    tensor_types = flags.pop("tensor_types", None)
    if tensor_types:
        top["tensor_types"] = tuple(tensor_types)
    if top.get("gguf_type") is not None and "output_format" not in top:
        top["output_format"] = "gguf"
    calib = {k: flags.pop(k) for k in ("data", "samples", "seqlen", "seed", "text_field", "dtype", "act_dtype", "memory",
                                        "chat_template")
             if flags.get(k) is not None}
    method_opts = {k: v for k, v in flags.items() if v is not None}
    stages = []
    for s in recipe.stages:
        known = get_method(s.method).options
        stages.append(Stage(s.method, {**s.options, **{k: v for k, v in method_opts.items() if k in known}}))
    unused = [k for k in method_opts if not any(k in get_method(s.method).options for s in recipe.stages)]
    if unused:
        raise InvalidOption(f"--{unused[0].replace('_', '-')} does not apply to this recipe's methods "
                            f"({', '.join(s.method for s in recipe.stages)})")
    return validate(replace(recipe, **top, calibration=replace(recipe.calibration, **calib), stages=tuple(stages)))
