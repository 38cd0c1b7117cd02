"""Structured output through the whole stack, with the official SDK: response_format by guided
decoding on the real CPU model."""

from __future__ import annotations

import asyncio
import json

import openai
import pydantic
import pytest
from openai import OpenAI

from tests.integration.services import API_KEY, MODEL

pytestmark = pytest.mark.triton


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    species: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=40)


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


async def test_the_sdks_parse_fills_a_pydantic_model(edge_url):
    def parse():
        return client(edge_url).beta.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet,
            max_tokens=120, seed=3)

    completion = await asyncio.to_thread(parse)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.name
    assert completion.choices[0].finish_reason == "stop"


async def test_json_object_mode_streams_a_json_object(edge_url):
    """As with OpenAI, an answer is a whole JSON object unless max_tokens cut it off. This small
    model sometimes rambles inside a string past any max_tokens (a third of seeds at 200), and a
    seed's text depends on what the model batched it with, so the test samples until one ends."""
    def stream(seed: int) -> tuple[str, str]:
        chunks = client(edge_url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Give me a colour as a JSON object."}],
            response_format={"type": "json_object"}, max_tokens=200, stream=True, seed=seed)
        text, finish_reason = "", None
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish_reason = chunk.choices[0].finish_reason or finish_reason
        return text, finish_reason

    for seed in range(8):
        text, finish_reason = await asyncio.to_thread(stream, seed)
        assert text.lstrip().startswith("{"), text
        if finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            return
        assert finish_reason == "length"
    pytest.fail("eight answers in a row were cut off by max_tokens")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_schema_the_grammar_engine_cannot_compile_is_a_400_naming_response_format(edge_url, stream):
    def create():
        return client(edge_url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=stream, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}})

    with pytest.raises(openai.BadRequestError) as raised:
        await asyncio.to_thread(create)
    assert raised.value.param == "response_format" and raised.value.code == "invalid_guide"
    assert "could not be compiled" in raised.value.message
