"""Which KV cache the runner uses: parsed and validated once, then built per sequence.

Options are checked up front (before any model is loaded) so a bad ``--kv-bits`` costs the
user nothing; the head_dim check runs as soon as the model's config is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qconv.arch.config import ModelConfig
from qconv.errors import InvalidOption
from qconv.model.kv_cache import FpKVCache, KVCache
from qconv.model.kv_caches import Fp8KVCache, Int8KVCache, KiviKVCache
from qconv.model.kv_quant import SUPPORTED_BITS, codes_per_byte

KV_MODES = ("fp", "int8", "fp8", "kivi")
#: KIVI defaults: 4-bit (KIVI's advice for GQA models), group 32 and residual 128 as in its LongBench runs.
KIVI_DEFAULTS = {"bits": 4, "group": 32, "residual": 128}


@dataclass(frozen=True)
class KVCacheSpec:
    mode: str = "fp"
    bits: int | None = None
    group: int | None = None
    residual: int | None = None
    sink: int = 0

    @classmethod
    def from_options(
        cls, mode: str, bits: int | None = None, group: int | None = None, residual: int | None = None,
        sink: int | None = None,
    ) -> KVCacheSpec:
        """Validate CLI-style options; KIVI's unset options take :data:`KIVI_DEFAULTS`."""
        if mode not in KV_MODES:
            raise InvalidOption(f"unknown --kv-cache {mode!r} (valid: {', '.join(KV_MODES)})")
        given = {"--kv-bits": bits, "--kv-group": group, "--kv-residual": residual, "--kv-sink": sink}
        if mode != "kivi":
            extra = [flag for flag, value in given.items() if value is not None]
            if extra:
                raise InvalidOption(f"{', '.join(extra)} applies only to --kv-cache kivi")
            return cls(mode)
        bits = KIVI_DEFAULTS["bits"] if bits is None else bits
        group = KIVI_DEFAULTS["group"] if group is None else group
        residual = KIVI_DEFAULTS["residual"] if residual is None else residual
        if bits not in SUPPORTED_BITS:
            raise InvalidOption(f"--kv-bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
        per_byte = codes_per_byte(bits)
        if group < 1 or group % per_byte:
            raise InvalidOption(
                f"--kv-group must be a positive multiple of {per_byte} (keys are packed {per_byte} tokens "
                f"a byte at {bits} bits), got {group}"
            )
        if residual < group or residual % group:
            raise InvalidOption(
                f"--kv-residual must be a positive multiple of --kv-group {group} (keys are quantized "
                f"a residual window at a time), got {residual}"
            )
        sink = 0 if sink is None else sink
        if not 0 <= sink < residual:
            raise InvalidOption(f"--kv-sink must be at least 0 and less than --kv-residual {residual}, got {sink}")
        return cls(mode, bits, group, residual, sink)

    def check(self, config: ModelConfig) -> None:
        """Reject a model whose head_dim the value groups do not divide."""
        if self.mode == "kivi" and config.head_dim % self.group:
            raise InvalidOption(
                f"--kv-group {self.group} must divide the model's head_dim {config.head_dim} "
                "(values are quantized per token in groups of channels)"
            )

    def make(
        self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype,
        scales: torch.Tensor | None = None,
    ) -> KVCache:
        """A fresh, empty cache of this kind for ``batch`` sequences of up to ``max_len`` tokens;
        ``scales`` ``[layers, 2]``: a checkpoint's FP8 KV-cache scales (k, v), used by ``fp8``."""
        self.check(config)
        if self.mode == "fp":
            return FpKVCache(config, batch, max_len, device, dtype)
        if self.mode == "int8":
            return Int8KVCache(config, batch, max_len, device, dtype)
        if self.mode == "fp8":
            return Fp8KVCache(config, batch, max_len, device, dtype, scales)
        return KiviKVCache(config, batch, max_len, self.bits, self.group, self.residual, device, dtype, self.sink)

    @property
    def name(self) -> str:
        """Short label, e.g. ``kivi4-g32-r128``."""
        if self.mode != "kivi":
            return self.mode
        return f"kivi{self.bits}-g{self.group}-r{self.residual}" + (f"-s{self.sink}" if self.sink else "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "kivi":
            out.update(bits=self.bits, group=self.group, residual=self.residual, sink=self.sink)
        return out

    def report(self, cache: KVCache) -> dict[str, Any]:
        """What ``--json`` shows about a cache: its settings and the bytes it held (see :class:`KVMemory`)."""
        return {**self.to_dict(), "name": self.name, **cache.memory().to_dict()}
