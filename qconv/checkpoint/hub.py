"""Hugging Face Hub model ids as inputs: ``qconv quantize meta-llama/Llama-3.1-8B ...``.

A model argument that is not a local path but reads as ``owner/name`` (optionally
``owner/name@revision``) is resolved through ``huggingface_hub.snapshot_download``, fetching only
what qconv reads (safetensors, JSON side files, the chat template): never pickled ``.bin``
weights. ``HF_HUB_OFFLINE=1`` and the local cache (``HF_HOME`` / ``HF_HUB_CACHE``) are honoured:
offline, a model already in the cache opens without the network, and one that is not is a
one-line error.
"""

from __future__ import annotations

import re
from pathlib import Path

from qconv.errors import InputNotFound

#: what qconv reads from a model repository
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` or ``owner/name@revision``, and not a path a user meant locally
    (absolute, ``./``, ``~``, more than one ``/`` before any ``@``, a file suffix we read)."""
    name = text.split("@", 1)[0]
    return bool(_REPO_ID.match(text)) and not name.endswith((".gguf", ".safetensors", ".json"))


def resolve(text: str) -> Path:
    """The local snapshot directory of Hub model ``text`` (downloaded if needed and allowed)."""
    repo, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        raise InputNotFound(f"{text!r} is not a local path, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise InputNotFound(f"{text!r} is not a local path, and the Hub model is not in the local cache "
                            f"(offline: HF_HUB_OFFLINE is set or the Hub cannot be reached)") from None
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, HTTP errors, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputNotFound(f"{text!r} is not a local path, and the Hub model could not be fetched "
                            f"({type(e).__name__}: {first})") from None
