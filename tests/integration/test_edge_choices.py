"""n, log probs and the legacy completions endpoint with the official openai SDK, against the edge,
inference_svc and the real Triton server running the CPU model.

The sync client runs in a thread: the servers under test share this test's event loop.
"""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
from openai import OpenAI

from tests.integration.services import API_KEY, MODEL, model_idle

pytestmark = pytest.mark.triton
ASK = [{"role": "user", "content": "Name a colour."}]


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=API_KEY)


def streamed(url: str, **kw) -> list:
    return list(client(url).chat.completions.create(model=MODEL, stream=True, **kw))


async def test_n_streams_each_choice_by_index_and_usage_counts_every_choice(edge_url):
    chunks = await asyncio.to_thread(streamed, edge_url, messages=ASK, n=3, max_tokens=12, seed=1,
                                     stream_options={"include_usage": True})
    texts, reasons = {0: "", 1: "", 2: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert all(texts.values()) and set(reasons) == {0, 1, 2}
    assert len(set(texts.values())) > 1  # sampled apart, not one text three times
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    single = await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1))
    assert usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert 3 <= usage.completion_tokens <= 36


async def test_n_past_the_models_maximum_is_a_400_naming_n(edge_url):
    with pytest.raises(openai.BadRequestError) as raised:
        await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(model=MODEL, messages=ASK, n=9))
    assert raised.value.body["param"] == "n"


def as_text(entries) -> str:
    """The tokens' bytes, concatenated, as the content's text: a token that is part of a UTF-8
    character (an emoji split over byte tokens) shows as \\xNN escapes in `token`, as OpenAI's do,
    and only its bytes join up; a character cut off at max_tokens ends the content as U+FFFD."""
    return b"".join(bytes(t.bytes) for t in entries).decode("utf-8", "replace")


async def test_log_probs_not_streamed_describe_the_content(edge_url):
    completion = await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10, logprobs=True, top_logprobs=3, temperature=0))
    choice = completion.choices[0]
    content = choice.logprobs.content
    assert as_text(content) == choice.message.content and content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") and len(t.top_logprobs) == 3
        best = t.top_logprobs[0]
        assert best.logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert math.isclose(best.logprob, t.logprob, abs_tol=1e-4) and best.token == t.token  # greedy: the best


async def test_log_probs_streamed_come_with_their_deltas(edge_url):
    chunks = await asyncio.to_thread(streamed, edge_url, messages=ASK, max_tokens=10, logprobs=True)
    text, entries = "", []
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            entries += chunk.choices[0].logprobs.content
    assert text and as_text(entries) == text


def legacy(url: str, **kw):
    return client(url).completions.create(model=MODEL, **kw)


async def test_legacy_completions_not_streamed(edge_url, triton):
    await model_idle(triton)
    completion = await asyncio.to_thread(legacy, edge_url, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, logprobs=2)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    (choice,) = completion.choices
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset[0] == 0 and all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert completion.usage.completion_tokens == len(choice.logprobs.tokens) or choice.finish_reason == "stop"
    await model_idle(triton)
    echoed = await asyncio.to_thread(legacy, edge_url, prompt="The capital of France is", max_tokens=8,
                                     temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + choice.text  # greedy: the same completion


async def test_legacy_completions_streamed_with_a_prompt_list_and_usage(edge_url):
    chunks = await asyncio.to_thread(lambda: list(legacy(edge_url, prompt=["Once upon a time", "1, 2, 3,"], n=2,
                                                         max_tokens=6, stream=True,
                                                         stream_options={"include_usage": True})))
    texts: dict[int, str] = {}
    finished = set()
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert sorted(texts) == [0, 1, 2, 3] and finished == {0, 1, 2, 3}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 4 <= usage.completion_tokens <= 24 and usage.prompt_tokens > 0


async def test_legacy_refusals_name_the_field(edge_url):
    for kw, param in ((dict(suffix="end"), "suffix"), (dict(best_of=2), "best_of")):
        with pytest.raises(openai.BadRequestError) as raised:
            await asyncio.to_thread(legacy, edge_url, prompt="x", **kw)
        assert raised.value.body["param"] == param
