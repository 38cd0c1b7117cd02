"""Tool calling through the whole stack with the official SDK, on the real CPU model: forced calls
are guided to the function's argument schema, so even the 135M model returns valid arguments."""

from __future__ import annotations

import asyncio
import json

import openai
import pydantic
import pytest
from openai import OpenAI

from tests.integration.services import API_KEY, MODEL

pytestmark = pytest.mark.triton


class GetWeather(pydantic.BaseModel):
    """The current weather in a city."""

    city: str = pydantic.Field(max_length=30)
    unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")


WEATHER = openai.pydantic_function_tool(GetWeather, name="get_weather")
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


async def test_a_forced_call_streams_and_the_sdks_stream_helper_assembles_it(edge_url):
    def run():
        deltas = []
        with client(edge_url).chat.completions.stream(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=80, seed=1,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ) as stream:
            for event in stream:
                if event.type == "tool_calls.function.arguments.delta":
                    deltas.append(event.arguments_delta)
            return deltas, stream.get_final_completion()

    deltas, completion = await asyncio.to_thread(run)
    choice = completion.choices[0]
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert isinstance(call.function.parsed_arguments, GetWeather)  # valid against the schema, parsed by the SDK
    assert "".join(deltas) == call.function.arguments and len(deltas) > 1  # streamed in fragments
    assert choice.finish_reason == "stop"  # OpenAI's reason for a call of a named tool_choice


async def test_a_two_turn_tool_round_trip(edge_url):
    first = await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, seed=2))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"}
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    second = await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=40, seed=2))
    answer = second.choices[0]
    assert answer.message.content and not answer.message.tool_calls
    assert answer.finish_reason in ("stop", "length")
    plain = await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1))
    # tool_choice none shows no tools; the call and its result are in the prompt
    assert second.usage.prompt_tokens > plain.usage.prompt_tokens + 30


async def test_a_tool_result_for_no_call_is_a_400(edge_url):
    with pytest.raises(openai.BadRequestError) as raised:
        await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(
            model=MODEL, tools=[WEATHER], messages=[*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "18C"}]))
    assert raised.value.body["param"] == "messages[1].tool_call_id"


class GetTime(pydantic.BaseModel):
    """The local time in a time zone."""

    zone: str = pydantic.Field(max_length=40)


async def test_required_with_several_tools_streams_a_call_of_one_of_them(edge_url):
    tools = [WEATHER, openai.pydantic_function_tool(GetTime, name="get_time")]

    def run():
        return list(client(edge_url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=tools,
            tool_choice="required", max_tokens=80, seed=4, stream=True))

    chunks = await asyncio.to_thread(run)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or ():
            if delta.id:
                assert delta.function.arguments == "" and delta.type == "function"
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
            else:
                calls[delta.index]["arguments"] += delta.function.arguments
    assert list(calls) == [0] and chunks[-1].choices[0].finish_reason == "tool_calls"
    model = {"get_weather": GetWeather, "get_time": GetTime}[calls[0]["name"]]
    model.model_validate_json(calls[0]["arguments"])


async def test_auto_answers_in_text_or_with_a_parsed_call(edge_url):
    completion = await asyncio.to_thread(lambda: client(edge_url).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=60, seed=5))
    choice = completion.choices[0]
    if choice.message.tool_calls:  # the 135M model seldom follows the format unguided
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content
