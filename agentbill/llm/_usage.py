"""Reading usage out of a response as it arrives: whole JSON bodies and SSE streams (no I/O).

The shapes are the providers' documented ones:

- OpenAI Chat Completions: the body's ``usage``; in a stream, the last chunk before
  ``data: [DONE]`` carries ``usage`` (and empty ``choices``) when ``stream_options.
  include_usage`` is set.
- OpenAI Responses: the body's ``usage``; in a stream, the ``response.completed`` (or
  ``.incomplete`` / ``.failed``) event's ``response.usage``.
- Anthropic Messages: the body's ``usage``; in a stream, ``message_start`` carries the input
  side (``input_tokens``, cache reads and writes) and ``message_delta`` the final
  ``output_tokens`` (and, in newer responses, the input side again).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_DIGITS = re.compile(r"\d+")

REQUIRED_COUNTS = {
    "chat": ("prompt_tokens", "completion_tokens"),
    "responses": ("input_tokens", "output_tokens"),
    "messages": ("input_tokens", "output_tokens"),
}
"""The token counts a usage of each API must hold to be read at all."""

FINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class Tally:
    """What one response has said about its model and usage so far.

    ``complete`` once the final usage arrived; ``body()`` is then ``{"model", "usage",
    "service_tier"}`` in the non-streaming shape of the API (what genai-prices reads).
    """

    def __init__(self, flavor: str, drop_usage_chunk: bool = False) -> None:
        self.flavor = flavor
        self.drop_usage_chunk = drop_usage_chunk
        self.model: str | None = None
        self.service_tier: str | None = None
        self.usage: dict[str, Any] | None = None
        self.complete = False

    def readable_usage(self) -> dict[str, Any] | None:
        """The final usage with every token count a non-negative int, or None when it never
        arrived or cannot be read (see :func:`read_usage`)."""
        if not self.complete or self.usage is None:
            return None
        return read_usage(self.flavor, self.usage)

    def body(self) -> dict[str, object]:
        """``model`` and the readable usage (see :meth:`readable_usage`)."""
        out: dict[str, object] = {"model": self.model, "usage": self.readable_usage()}
        if self.service_tier is not None:
            out["service_tier"] = self.service_tier
        return out

    def _take(self, obj: Mapping[str, Any]) -> None:
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if isinstance(obj.get("service_tier"), str):
            self.service_tier = obj["service_tier"]

    def feed_body(self, body: object) -> None:
        """A whole (non-streaming) response body, parsed."""
        if not isinstance(body, Mapping):
            return
        self._take(body)
        if isinstance(body.get("usage"), Mapping):
            self.usage = dict(body["usage"])
            self.complete = True

    def feed_json(self, raw: bytes) -> None:
        """A whole (non-streaming) response body, as bytes."""
        try:
            self.feed_body(json.loads(raw))
        except ValueError:
            return

    def feed_event(self, event: str | None, data: str) -> bool:
        """One SSE event; False when the caller must not see it (the usage chunk the wrapper
        asked for on the caller's behalf)."""
        if not data or data.startswith("[DONE]"):
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, Mapping):
            return True
        kind = event or obj.get("type")
        if self.flavor == "chat":
            self._take(obj)
            if isinstance(obj.get("usage"), Mapping):
                self.usage = dict(obj["usage"])
                self.complete = True
                if self.drop_usage_chunk and not obj.get("choices"):
                    return False
        elif self.flavor == "responses":
            response = obj.get("response")
            if isinstance(response, Mapping):
                self._take(response)
                if kind in FINAL_RESPONSE_EVENTS and isinstance(response.get("usage"), Mapping):
                    self.usage = dict(response["usage"])
                    self.complete = True
        elif kind == "message_start" and isinstance(obj.get("message"), Mapping):
            message = obj["message"]
            self._take(message)
            if isinstance(message.get("usage"), Mapping):
                self.usage = dict(message["usage"])
        elif kind == "message_delta" and isinstance(obj.get("usage"), Mapping):
            merged = dict(self.usage or {})
            merged.update({k: v for k, v in obj["usage"].items() if v is not None})
            self.usage = merged
            self.complete = True
        return True


def _count(value: object) -> int | None:
    """A token count as a provider or a proxy may write it: an int, an integral float, or a
    string of digits (what the SDKs' pydantic models accept in a whole body); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value >= 0 else None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value)
    return None


def _counts(usage: Mapping[str, Any]) -> dict[str, Any] | None:
    """``usage`` with every ``*tokens`` count (nested ones too) made an int; None if one that
    is present cannot be read."""
    out: dict[str, Any] = {}
    for key, value in usage.items():
        if isinstance(value, Mapping):
            nested = _counts(value)
            if nested is None:
                return None
            out[key] = nested
        elif isinstance(key, str) and key.endswith("tokens") and value is not None:
            count = _count(value)
            if count is None:
                return None
            out[key] = count
        else:
            out[key] = value
    return out


def read_usage(flavor: str, usage: Mapping[str, Any]) -> dict[str, Any] | None:
    """The one reading of a response's usage, streamed or not: every token count a
    non-negative int, or None when the usage cannot be read (a count missing from
    ``REQUIRED_COUNTS``, or one that is not a count). A call whose usage cannot be read is
    charged its reservation, never less."""
    out = _counts(usage)
    if out is None or any(not isinstance(out.get(k), int) for k in REQUIRED_COUNTS[flavor]):
        return None
    return out


def parse_event(raw: bytes) -> tuple[str | None, str]:
    """The ``event`` name and the joined ``data`` lines of one SSE event."""
    event: str | None = None
    data: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return event, "\n".join(data)


class EventSplitter:
    """Cuts a byte stream into whole SSE events, each with its terminating blank line, and
    passes on the bytes of those the tally lets through, unchanged."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(self._buffer):
            raw = self._buffer[start : match.end()]
            start = match.end()
            if self._tally.feed_event(*parse_event(raw)):
                out.append(raw)
        self._buffer = self._buffer[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        """What is left when the stream ends (an event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        if rest.strip() and self._tally.feed_event(*parse_event(rest)):
            return rest
        return rest if not rest.strip() else b""
