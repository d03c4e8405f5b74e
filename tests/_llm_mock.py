"""An in-process OpenAI and Anthropic API for the real SDK clients: no network.

``MockLLM`` answers ``POST /v1/chat/completions``, ``/v1/responses`` and ``/v1/messages`` with
the providers' documented JSON bodies and SSE event streams (OpenAI's chunks ending in a usage
chunk and ``data: [DONE]``; Responses' ``response.created`` ... ``response.completed``;
Anthropic's ``message_start`` ... ``message_stop``), with the usage it is configured with. It
counts every request it receives and keeps their JSON bodies, so a test can show that a
refused call sent nothing. Give its ``transport()`` (or ``async_transport()``) to the SDK as
``http_client=httpx2.Client(transport=...)``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx2

if TYPE_CHECKING:
    from anthropic import Anthropic, AsyncAnthropic
    from openai import AsyncOpenAI, OpenAI

TEXT = ["Budgets ", "hold ", "before ", "the ", "run."]


@dataclass
class MockLLM:
    """A fake provider. ``usage`` numbers are those every response reports."""

    prompt_tokens: int = 1200
    cached_tokens: int = 400
    completion_tokens: int = 250
    reasoning_tokens: int = 50
    cache_write_tokens: int = 300
    response_model: dict[str, str] = field(
        default_factory=lambda: {
            "gpt-4o": "gpt-4o-2024-08-06",
            "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
        }
    )
    status: int = 200
    """Anything else: every request gets this error status with the provider's error body."""
    stall_after: int | None = None
    """Streams stop sending after this many events (until the client goes away); 0 also
    holds an async non-streaming answer back until the client gives up."""
    on_request: Callable[[], object] | None = None
    """Called as each request arrives, before it is answered: what it does happens during the
    call. With the async SDK clients it is called on their event loop, and what it returns is
    awaited if it is awaitable."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- transports --------------------------------------------------------------------------

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self._handle)

    def async_transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self._handle_async)

    def openai(self) -> OpenAI:
        from openai import OpenAI

        http = httpx2.Client(transport=self.transport())
        return OpenAI(api_key="sk-test", base_url="http://mock/v1", http_client=http, max_retries=0)

    def async_openai(self) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        http = httpx2.AsyncClient(transport=self.async_transport())
        return AsyncOpenAI(
            api_key="sk-test", base_url="http://mock/v1", http_client=http, max_retries=0
        )

    def anthropic(self) -> Anthropic:
        from anthropic import Anthropic

        http = httpx2.Client(transport=self.transport())
        return Anthropic(api_key="sk-test", base_url="http://mock", http_client=http, max_retries=0)

    def async_anthropic(self) -> AsyncAnthropic:
        from anthropic import AsyncAnthropic

        http = httpx2.AsyncClient(transport=self.async_transport())
        return AsyncAnthropic(
            api_key="sk-test", base_url="http://mock", http_client=http, max_retries=0
        )

    # -- usage as each API reports it --------------------------------------------------------

    def chat_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def responses_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def anthropic_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens - self.cached_tokens - self.cache_write_tokens,
            "cache_creation_input_tokens": self.cache_write_tokens,
            "cache_read_input_tokens": self.cached_tokens,
            "output_tokens": self.completion_tokens,
        }

    def usage_body(self, path: str, model: str) -> dict[str, Any]:
        """What genai-prices is given for a call to ``path``: the documented body's model and
        usage."""
        usage = {
            "/v1/chat/completions": self.chat_usage,
            "/v1/responses": self.responses_usage,
            "/v1/messages": self.anthropic_usage,
        }[path]()
        return {"model": self.response_model.get(model, model), "usage": usage}

    # -- the API ---------------------------------------------------------------------------

    def _record(self, request: httpx2.Request) -> tuple[str, dict[str, Any]]:
        body = json.loads(request.content or b"{}")
        with self._lock:
            self.requests.append({"path": request.url.path, **body})
        return request.url.path, body

    def _error(self, path: str) -> httpx2.Response:
        if path == "/v1/messages":
            body: dict[str, Any] = {
                "type": "error",
                "error": {"type": "api_error", "message": "Internal server error"},
            }
        else:
            body = {"error": {"message": "The server had an error", "type": "server_error"}}
        return httpx2.Response(self.status, json=body)

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        path, body = self._record(request)
        if self.on_request is not None:
            self.on_request()
        if self.status != 200:
            return self._error(path)
        if not body.get("stream"):
            return httpx2.Response(200, json=self.body(path, body))
        events = self.events(path, body)
        stall = self.stall_after

        def chunks() -> Iterator[bytes]:
            for i, event in enumerate(events):
                if stall is not None and i >= stall:
                    return  # a sync stream that stalls ends early: the tests break out first
                yield event

        return httpx2.Response(200, headers=SSE, content=chunks())

    async def _handle_async(self, request: httpx2.Request) -> httpx2.Response:
        path, body = self._record(request)
        if self.on_request is not None and inspect.isawaitable(done := self.on_request()):
            await done
        if self.status != 200:
            return self._error(path)
        if not body.get("stream"):
            if self.stall_after == 0:
                await asyncio.Event().wait()
            return httpx2.Response(200, json=self.body(path, body))
        events = self.events(path, body)
        stall = self.stall_after

        async def chunks() -> AsyncIterator[bytes]:
            for i, event in enumerate(events):
                if stall is not None and i >= stall:
                    await asyncio.Event().wait()  # never set: only cancellation ends this
                yield event

        return httpx2.Response(200, headers=SSE, content=chunks())

    def body(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        model = self.response_model.get(request["model"], request["model"])
        text = "".join(TEXT)
        if path == "/v1/chat/completions":
            return {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1741569952,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": self.chat_usage(),
                "service_tier": "default",
                "system_fingerprint": "fp_1",
            }
        if path == "/v1/responses":
            return self._response(model, "completed", text, self.responses_usage())
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self.anthropic_usage(),
        }

    def _response(
        self, model: str, status: str, text: str, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        output = []
        if text:
            output = [
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
        return {
            "id": "resp_1",
            "object": "response",
            "created_at": 1741476542,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }

    def events(self, path: str, request: dict[str, Any]) -> list[bytes]:
        model = self.response_model.get(request["model"], request["model"])
        if path == "/v1/chat/completions":
            return self._chat_events(model, request)
        if path == "/v1/responses":
            return self._responses_events(model)
        return self._anthropic_events(model)

    def _chat_events(self, model: str, request: dict[str, Any]) -> list[bytes]:
        with_usage = (request.get("stream_options") or {}).get("include_usage") is True

        def chunk(choices: list[Any], usage: Any = None) -> bytes:
            obj: dict[str, Any] = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1741569952,
                "model": model,
                "system_fingerprint": "fp_1",
                "choices": choices,
            }
            if with_usage:
                obj["usage"] = usage
            return data(obj)

        def delta(d: dict[str, Any], finish: str | None = None) -> list[Any]:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

        out = [chunk(delta({"role": "assistant", "content": ""}))]
        out += [chunk(delta({"content": piece})) for piece in TEXT]
        out.append(chunk(delta({}, "stop")))
        if with_usage:
            out.append(chunk([], self.chat_usage()))
        out.append(b"data: [DONE]\n\n")
        return out

    def _responses_events(self, model: str) -> list[bytes]:
        seq = iter(range(1000))
        out = [
            named(
                "response.created",
                {"response": self._response(model, "in_progress", "", None)},
                next(seq),
            )
        ]
        for piece in TEXT:
            out.append(
                named(
                    "response.output_text.delta",
                    {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": piece},
                    next(seq),
                )
            )
        done = self._response(model, "completed", "".join(TEXT), self.responses_usage())
        out.append(named("response.completed", {"response": done}, next(seq)))
        return out

    def _anthropic_events(self, model: str) -> list[bytes]:
        usage = self.anthropic_usage()
        start: dict[str, Any] = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        out = [
            named("message_start", {"message": start}),
            named(
                "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
            ),
            named("ping", {}),
        ]
        for piece in TEXT:
            out.append(
                named(
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "text_delta", "text": piece}},
                )
            )
        out += [
            named("content_block_stop", {"index": 0}),
            named(
                "message_delta",
                {
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            ),
            named("message_stop", {}),
        ]
        return out


SSE = {"content-type": "text/event-stream; charset=utf-8"}


def data(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def named(event: str, obj: dict[str, Any], sequence: int | None = None) -> bytes:
    body = {"type": event, **obj}
    if sequence is not None:
        body["sequence_number"] = sequence
    return f"event: {event}\ndata: {json.dumps(body)}\n\n".encode()
