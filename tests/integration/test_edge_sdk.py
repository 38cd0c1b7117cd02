"""The streaming guide's examples with the official openai SDK, against the edge, inference_svc
and the real Triton server running the CPU model. Only base URL, key and model are changed.

The sync client runs in a thread: the servers under test share this test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tools.launcher.ports import free_ports
from tools.launcher.probes import wait_serving
from tests.integration.services import API_KEY, MODEL, model_cancelled, model_idle, model_metrics, running_edge

pytestmark = pytest.mark.triton


def client(url: str, **kw) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=API_KEY, **kw)


def basic_streaming(url: str) -> tuple[list, str]:
    """The guide's "Basic streaming", returning what it printed and the chunks."""
    stream = client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a poem about the ocean."}],
        stream=True,
        max_tokens=30,
    )
    chunks, printed = [], []
    for chunk in stream:
        chunks.append(chunk)
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            printed.append(delta)
    return chunks, "".join(printed)


async def test_basic_streaming_as_in_the_guide(edge_url):
    chunks, text = await asyncio.to_thread(basic_streaming, edge_url)
    assert text.strip()
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 30


def collect_full_response(url: str, **kw) -> str:
    """The guide's "Collecting the full response"."""
    chunks = []
    stream = client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Explain recursion briefly."}], stream=True, **kw
    )
    for chunk in stream:
        delta = chunk.choices[0].delta.content or ""
        chunks.append(delta)
    return "".join(chunks)


async def test_the_collected_stream_equals_the_non_streamed_answer(edge_url, triton):
    await model_idle(triton)  # each request decoded alone, so greedy decoding gives the same text
    streamed = await asyncio.to_thread(collect_full_response, edge_url, temperature=0, max_tokens=40)
    await model_idle(triton)
    completion = await asyncio.to_thread(
        lambda: client(edge_url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Explain recursion briefly."}], temperature=0, max_tokens=40
        )
    )
    assert streamed == completion.choices[0].message.content and streamed
    assert completion.usage.completion_tokens == 40 and completion.choices[0].finish_reason == "length"


async def test_include_usage_gives_the_sdk_a_usage_chunk(edge_url):
    def run():
        stream = client(edge_url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True, max_tokens=5,
            stream_options={"include_usage": True},
        )
        return list(stream)

    chunks = await asyncio.to_thread(run)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


async def test_async_openai_as_in_the_guide(edge_url):
    async_client = AsyncOpenAI(base_url=f"{edge_url}/v1", api_key=API_KEY)

    async def stream_response(prompt: str) -> str:
        stream = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=20
        )
        chunks = []
        async for chunk in stream:
            delta = chunk.choices[0].delta.content or ""
            chunks.append(delta)
        return "".join(chunks)

    texts = await asyncio.gather(stream_response("Name a color."), stream_response("Name a fruit."))
    assert all(t.strip() for t in texts)
    await async_client.close()


async def test_sdk_errors_are_the_right_exceptions(edge_url):
    def run():
        raised = {}
        for name, kw in {
            "auth": dict(api_key="ck-wrong"),
            "model": dict(model="nope"),
            "param": dict(temperature=9),
        }.items():
            cl = OpenAI(base_url=f"{edge_url}/v1", api_key=kw.pop("api_key", API_KEY), max_retries=0)
            try:
                cl.chat.completions.create(model=kw.pop("model", MODEL), messages=[{"role": "user", "content": "x"}], **kw)
            except openai.APIStatusError as e:
                raised[name] = e
        return raised

    raised = await asyncio.to_thread(run)
    assert isinstance(raised["auth"], openai.AuthenticationError) and raised["auth"].code == "invalid_api_key"
    assert isinstance(raised["model"], openai.NotFoundError) and raised["model"].code == "model_not_found"
    assert isinstance(raised["param"], openai.BadRequestError) and raised["param"].param == "temperature"


async def test_models_through_the_sdk(edge_url):
    cl = client(edge_url)
    models = await asyncio.to_thread(lambda: [m.id for m in cl.models.list()])
    assert models == [MODEL]
    model = await asyncio.to_thread(cl.models.retrieve, MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        await asyncio.to_thread(client(edge_url, max_retries=0).models.retrieve, "nope")


async def test_logit_bias_forces_and_bans_tokens(edge_url, triton, registry):
    banana = registry.get(MODEL).tokenizer.token_bytes.index(b" banana")

    def ask(**kw) -> str:
        completion = client(edge_url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=4, **kw)
        return completion.choices[0].message.content

    await model_idle(triton)
    plain = await asyncio.to_thread(ask)
    assert "banana" not in plain
    assert await asyncio.to_thread(ask, logit_bias={str(banana): 100}) == " banana" * 4
    # Every token the plain answer could start with, banned: it starts otherwise.
    tokens = registry.get(MODEL).tokenizer.token_bytes
    starts = [i for i, b in enumerate(tokens) if b and plain.encode().startswith(b)]
    await model_idle(triton)
    banned = await asyncio.to_thread(ask, logit_bias={str(i): -100 for i in starts})
    assert banned and not any(banned.encode().startswith(tokens[i]) for i in starts)
    with pytest.raises(openai.BadRequestError) as raised:
        await asyncio.to_thread(ask, logit_bias={"49152": 5})  # past the vocabulary
    assert raised.value.param == "logit_bias" and "Invalid key in 'logit_bias'" in raised.value.message


async def test_a_client_that_goes_away_stops_generation_in_the_model(edge_url, triton):
    before = model_metrics(triton)
    async_client = AsyncOpenAI(base_url=f"{edge_url}/v1", api_key=API_KEY)
    stream = await async_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        stream=True, max_tokens=400, temperature=1.0, seed=11,
    )
    received = 0
    async for chunk in stream:
        received += 1
        if received == 6:
            break
    await stream.close()  # the SDK closes the HTTP response: the client is gone
    await async_client.close()
    after = await model_cancelled(triton, before)
    generated = after["cloudach_model_generated_tokens_total"] - before["cloudach_model_generated_tokens_total"]
    assert after["cloudach_model_requests_total:cancelled"] == before["cloudach_model_requests_total:cancelled"] + 1
    assert generated < 40, f"the model generated {generated} tokens for a client that left after {received} chunks"


async def test_killing_inference_svc_mid_stream_raises_in_the_sdk_instead_of_hanging(triton, auth, tmp_path):
    (port,) = free_ports(1)
    env = {**os.environ, "CLOUDACH_TRITON_URLS": triton.grpc_url, "CLOUDACH_INFERENCE_LISTEN": f"127.0.0.1:{port}",
           "CLOUDACH_AUTH_TARGET": auth.address, "CLOUDACH_INFERENCE_METRICS_PORT": "0"}
    log = open(tmp_path / "inference_svc.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "inference_svc"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_serving, f"127.0.0.1:{port}", 60, process)
        async with running_edge(f"127.0.0.1:{port}", auth.address) as url:

            def consume():
                cl = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
                stream = cl.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Write a long story."}],
                    stream=True, max_tokens=400, temperature=1.0,
                )
                for n, _chunk in enumerate(stream):
                    if n == 3:
                        process.send_signal(signal.SIGKILL)

            started = time.monotonic()
            with pytest.raises(openai.APIError) as raised:
                await asyncio.to_thread(consume)
            assert time.monotonic() - started < 20
            assert "unavailable" in str(raised.value).lower()
    finally:
        process.kill()
        process.wait()
        log.close()
