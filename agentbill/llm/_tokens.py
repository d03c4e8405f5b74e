"""An upper bound on a request's input tokens, counted without sending anything.

Two counters, chosen per call:

- ``tiktoken``: for OpenAI models, when tiktoken is installed *and* the model's encoding file
  is already in tiktoken's cache directory. agentbill never lets tiktoken download: a missing
  file means the other counter, never a network request inside a preflight.
- ``utf8-bytes``: every text counted as its UTF-8 length. Byte-level BPE tokenizers (OpenAI's,
  Anthropic's) never make a token of less than one byte, so this is an upper bound, about
  three to four times the real count for English text.

Both walk every string the request sends to the model (messages, system prompts, tool
definitions, schemas) and add :data:`PER_OBJECT` tokens per JSON object (a message's role and
separators; OpenAI's published format uses 3 or 4) and :data:`BASE` per request (the reply's
priming). An image, audio or file part counts as the larger of :data:`PART_ALLOWANCE` and its
size in bytes: content sent by URL or file id, and context the request only refers to
(``previous_response_id``, ``conversation``, stored prompts), is not in the request and so not
bounded.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Literal

logger = logging.getLogger("agentbill")

Counter = Literal["tiktoken", "utf8-bytes"]

PER_OBJECT = 4
BASE = 8
PART_ALLOWANCE = 2_000
"""Tokens added for each image, audio or file part (or its size in bytes, if larger)."""

NON_TEXT_PARTS = frozenset(
    {"image_url", "input_image", "image", "document", "input_file", "file", "input_audio", "audio"}
)
"""``type`` values of content parts that are not text."""

NOT_MODEL_INPUT = frozenset(
    {
        "model",
        "metadata",
        "user",
        "store",
        "safety_identifier",
        "prompt_cache_key",
        "service_tier",
        "stream_options",
        "extra_headers",
        "extra_query",
        "timeout",
    }
)
"""Request parameters whose strings the model never reads (identifiers, options)."""

ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
ENCODING_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
"""The encodings current OpenAI models use, with the digests tiktoken itself checks."""


def tiktoken_cache_dir() -> str:
    """The directory tiktoken reads its encoding files from (its own rule: TIKTOKEN_CACHE_DIR,
    else DATA_GYM_CACHE_DIR, else ``<tmp>/data-gym-cache``); "" means caching is off."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return os.environ[name]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cache_path(encoding: str, cache_dir: str) -> Path:
    # tiktoken names a cached file by the SHA-1 of the URL it came from.
    key = hashlib.sha1(ENCODING_URL.format(name=encoding).encode()).hexdigest()
    return Path(cache_dir) / key


def install_encoding(source: str | os.PathLike[str], cache_dir: str | None = None) -> Path:
    """Put an encoding file (``o200k_base.tiktoken`` or ``cl100k_base.tiktoken``, plain or
    ``.gz``) into tiktoken's cache, so token counts work offline. The file is checked against
    the SHA-256 tiktoken expects; returns where it was written.

    Raises ValueError for a file that is not one of those encodings.
    """
    path = Path(source)
    name = path.name.removesuffix(".gz").removesuffix(".tiktoken")
    if name not in ENCODING_SHA256:
        raise ValueError(f"{path.name}: not one of {sorted(ENCODING_SHA256)} (.tiktoken[.gz])")
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ENCODING_SHA256[name]:
        raise ValueError(f"{path.name}: its SHA-256 is not the published {name} file's")
    target = _cache_path(name, cache_dir if cache_dir is not None else tiktoken_cache_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".agentbill-tmp")
    tmp.write_bytes(data)
    shutil.move(tmp, target)
    _encoder.cache_clear()
    return target


@cache
def _encoder(encoding: str, cache_dir: str) -> Callable[[str], int] | None:
    """A counter for ``encoding`` loaded from the cache, or None (never downloads)."""
    if not cache_dir or not _cache_path(encoding, cache_dir).is_file():
        logger.warning(
            "agentbill: tiktoken's %s file is not in %r; input tokens are bounded by UTF-8 "
            "length instead (see agentbill.llm.install_encoding)",
            encoding,
            cache_dir,
        )
        return None
    import tiktoken

    enc = tiktoken.get_encoding(encoding)  # reads the cached file (its digest is checked)

    def count(text: str) -> int:
        return len(enc.encode(text, disallowed_special=()))

    return count


def _tiktoken_counter(model: str) -> Callable[[str], int] | None:
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        encoding = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    if encoding not in ENCODING_SHA256:
        return None
    return _encoder(encoding, tiktoken_cache_dir())


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def input_token_bound(
    provider: str, model: str, params: Mapping[str, object]
) -> tuple[int, Counter]:
    """An upper bound on the input tokens of a request with these ``params``, and which
    counter made it."""
    counter = _tiktoken_counter(model) if provider == "openai" else None
    count = counter or _utf8_length
    total = BASE
    for key, value in params.items():
        if key not in NOT_MODEL_INPUT:
            total += _walk(value, count)
    return total, ("tiktoken" if counter else "utf8-bytes")


def _walk(value: object, count: Callable[[str], int]) -> int:
    if isinstance(value, str):
        return count(value)
    if isinstance(value, Mapping):
        if value.get("type") in NON_TEXT_PARTS:
            size = sum(_walk(v, _utf8_length) for v in value.values())
            return PER_OBJECT + max(PART_ALLOWANCE, size)
        return PER_OBJECT + sum(_walk(v, count) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_walk(v, count) for v in value)
    dump = getattr(value, "model_dump", None)  # an SDK object passed back as a message
    if callable(dump) and not isinstance(value, type):
        return _walk(dump(mode="json", exclude_none=True), count)
    schema = getattr(value, "model_json_schema", None)  # a pydantic class as response_format
    if callable(schema):
        return _walk(schema(), count)
    return 0
