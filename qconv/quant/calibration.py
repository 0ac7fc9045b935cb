"""Calibration data and activation statistics.

Data: rows of text from a local file or folder (txt/json/jsonl/parquet/csv via ``datasets``),
or a dataset name ``datasets`` streams (stopping after the documents the windows need), or
conversations rendered with the model's chat template; joined with blank lines, tokenized once,
and cut into seeded random windows of ``seqlen`` tokens (GPTQ's protocol), so a run is
reproducible from (source, samples, seqlen, seed).

Statistics: for the input of every Linear, the token count, Σx² per channel (llama.cpp's
importance matrix; GPTQ's Hessian diagonal up to a factor), mean |x| (AWQ) and max |x|
(SmoothQuant) per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from qconv.checkpoint.tokenizer import Tokenizer
from qconv.errors import InputNotFound, InvalidOption
from qconv.textdata import load_records


_DATA_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".gz", ".zst", ".arrow")


def _looks_like_path(source: str) -> bool:
    """A missing local path rather than a dataset name: dataset names are ``name`` or
    ``owner/name`` (``allenai/c4``), never absolute, relative-dotted, nested or file-suffixed."""
    return (source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
            or source.split(":")[0].lower().endswith(_DATA_SUFFIXES))


#: characters of streamed text taken per calibration token wanted: ~4 characters per token, and
#: 4x the tokens the windows cover, so seeded random windows still spread over many documents
CHARS_PER_TOKEN = 16


def load_calibration_rows(source: str, text_field: str = "text", chat: Tokenizer | None = None,
                          tokens: int | None = None) -> list[str]:
    """Text rows from a local file, a folder of files, or (online, or from the ``datasets``
    cache) a dataset name written ``name[:config[:split]]``, which is streamed and read only up
    to ``tokens`` x :data:`CHARS_PER_TOKEN` characters (all of it when ``tokens`` is None).

    ``chat``: the rows are conversations (``text_field`` holds lists of ``{role, content}``
    messages, as in chat datasets' ``messages`` column), rendered with that tokenizer's chat
    template, as the model sees them at inference."""
    path = Path(source)
    if path.is_file() or path.is_dir():
        records = [r for f in _local_files(path) for r in load_records(f, text_field)]
        rows = [_row(r, chat, path) for r in records]
        if not any(row.strip() for row in rows):
            raise InvalidOption("calibration text is empty", path)
        return rows
    if _looks_like_path(source):
        raise InputNotFound("calibration data not found", path)
    import datasets

    name, config, split = (source.split(":") + [None, None])[:3]
    try:
        stream = datasets.load_dataset(name, config, split=split or "train", streaming=True)
        rows, chars, limit = [], 0, None if tokens is None else tokens * CHARS_PER_TOKEN
        for record in stream:
            if text_field not in record:
                raise InvalidOption(f"dataset {source!r} has no field {text_field!r} "
                                    f"(fields: {', '.join(record)})")
            rows.append(_row(record[text_field], chat, source))
            chars += len(rows[-1])
            if limit is not None and chars >= limit:
                break
    except InvalidOption:
        raise
    except Exception as e:  # offline or unknown: datasets raises ConnectionError, FileNotFoundError, ...
        raise InputNotFound(
            f"{source!r} is not a local file or folder, and the dataset of that name could not be loaded "
            f"({type(e).__name__}); offline, pass a local txt/json/jsonl/parquet file or folder with --data"
        ) from None
    if not rows:
        raise InvalidOption(f"dataset {source!r} has no rows")
    return rows


def _row(value: Any, chat: Tokenizer | None, where: Path | str) -> str:
    if chat is None:
        return str(value)
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise InvalidOption("--chat-template needs rows of messages (lists of {role, content}): pass their "
                            "field with --text-field", where)
    return chat.apply_chat_template(value, add_generation_prompt=False)


def _local_files(path: Path) -> list[Path]:
    """``path`` itself, or the visible files under a folder in a stable order."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def calibration_windows(tokenizer: Tokenizer, rows: list[str], samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[samples, seqlen]`` token windows at seeded random offsets of the tokenized text."""
    if samples < 1 or seqlen < 2:
        raise InvalidOption(f"need samples >= 1 and seqlen >= 2 (got {samples}, {seqlen})")
    ids = torch.tensor(tokenizer.encode("\n\n".join(rows)), dtype=torch.long)
    if len(ids) < seqlen:
        raise InvalidOption(f"calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one Linear's input over every calibration token."""

    count: int = 0
    sum_sq: torch.Tensor | None = None  # float64 [in]
    sum_abs: torch.Tensor | None = None  # float64 [in]
    max_abs: torch.Tensor | None = None  # float32 [in]

    @property
    def mean_sq(self) -> torch.Tensor:
        """llama.cpp's importance: mean x² per channel."""
        assert self.sum_sq is not None
        return self.sum_sq / max(self.count, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        assert self.sum_abs is not None
        return self.sum_abs / max(self.count, 1)


@dataclass
class _Partial:
    """One Linear's running sums, per calibration bucket (:mod:`qconv.quant.reduce`)."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # bucket -> float64 [2, in]: Σx², Σ|x|
    count: int = 0
    max_abs: torch.Tensor | None = None


@dataclass
class ActivationStats:
    """Statistics for every Linear input of a model, keyed by HF module name
    (``model.layers.0.self_attn.q_proj``).

    Inputs are added per bucket of calibration samples (:meth:`add`); :meth:`finish` combines
    the buckets in the fixed tree over every data-parallel rank, so the sums have the same bits
    however the samples were split. Per batch, the column sums are GEMMs (bit-stable across
    thread counts under ``MKL_CBWR``) in float32, accumulated in float64."""

    modules: dict[str, ChannelStats] = field(default_factory=dict)
    _partials: dict[str, _Partial] = field(default_factory=dict)

    def add(self, name: str, bucket: int, x: torch.Tensor) -> None:
        """Inputs ``x [..., in]`` of Linear ``name`` from calibration bucket ``bucket``."""
        rows = x.reshape(-1, x.shape[-1]).float()
        a = rows.abs()
        ones = torch.ones(1, rows.shape[0], dtype=rows.dtype, device=rows.device)
        sums = torch.cat([ones @ (rows * rows), ones @ a]).double().cpu()
        part = self._partials.setdefault(name, _Partial())
        if bucket in part.sums:
            part.sums[bucket] += sums
        else:
            part.sums[bucket] = sums
        part.count += rows.shape[0]
        m = a.amax(0).cpu() if rows.shape[0] else torch.zeros(rows.shape[1])
        part.max_abs = m if part.max_abs is None else torch.maximum(part.max_abs, m)

    def finish(self, reduce: Callable[[list[tuple[int, torch.Tensor]], int], torch.Tensor],
               count: Callable[[int], int], maximum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Combine the partial sums (every module, in name order: each rank makes the same
        calls) into :attr:`modules`. ``reduce(parts, width)``, ``count(n)``, ``maximum(t)``:
        the pipeline's tree sum, integer sum and elementwise maximum over the ranks."""
        for name in sorted(self._partials):
            part = self._partials.pop(name)
            width = next(iter(part.sums.values())).shape[1]
            total = reduce([(b, v.reshape(-1)) for b, v in sorted(part.sums.items())], 2 * width).reshape(2, width)
            assert part.max_abs is not None
            self.modules[name] = ChannelStats(count(part.count), total[0].cpu(), total[1].cpu(),
                                              maximum(part.max_abs.float()))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat safetensors layout: ``<module>.count``, ``.sum_sq``, ``.mean_abs``, ``.max_abs``."""
        out: dict[str, torch.Tensor] = {}
        for name, s in sorted(self.modules.items()):
            out[f"{name}.count"] = torch.tensor([s.count], dtype=torch.int64)
            out[f"{name}.sum_sq"] = s.sum_sq.float()
            out[f"{name}.mean_abs"] = s.mean_abs.float()
            out[f"{name}.max_abs"] = s.max_abs.float()
        return out
