"""An OpenAI chat request translated into inference_svc's GenerateRequest."""

from __future__ import annotations

import json

import pytest

from cloudach.inference.v1 import inference_pb2 as pb
from edge.chat import parse_chat_request
from edge.errors import ApiError

CHAT = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]}


def test_messages_sampling_and_stopping_are_carried_over():
    chat = parse_chat_request({**CHAT, "temperature": 0.2, "top_p": 0.5, "seed": 7, "max_completion_tokens": 9,
                               "stop": "END", "stream": True, "stream_options": {"include_usage": True}})
    g = chat.generates[0]
    assert [(m.role, m.content) for m in g.messages] == [(pb.ROLE_SYSTEM, "Be brief."), (pb.ROLE_USER, "Hi there")]
    assert (round(g.sampling.temperature, 6), g.sampling.top_p, g.sampling.seed) == (0.2, 0.5, 7)
    assert g.stopping.max_new_tokens == 9 and list(g.stopping.stop_sequences) == ["END"]
    assert chat.stream and chat.include_usage and chat.max_tokens_name == "max_completion_tokens"
    assert chat.id.startswith("chatcmpl-") and g.request_id == chat.id
    assert chat.prompt_chars == len("Be brief.") + len("Hi there")


def test_logit_bias_goes_by_token_id_and_a_key_that_is_no_token_id_is_refused():
    g = parse_chat_request({**CHAT, "logit_bias": {"50256": -100, "7": 2.5}}).generates[0]
    assert dict(g.sampling.logit_bias) == {50256: -100.0, 7: 2.5}
    for bias, param, message in (
        ({"the": 1}, "logit_bias", "Invalid key in 'logit_bias': the."),
        ({"-3": 1}, "logit_bias", "Invalid key in 'logit_bias': -3."),
        ({"7": 150}, "logit_bias.7", "above maximum value"),
        ({"7": "x"}, "logit_bias.7", "Invalid type for 'logit_bias.7'"),
    ):
        with pytest.raises(ApiError) as raised:
            parse_chat_request({**CHAT, "logit_bias": bias})
        assert (raised.value.status, raised.value.param) == (400, param), bias
        assert message in raised.value.message, (bias, raised.value.message)


def test_unset_fields_stay_unset_for_the_models_defaults():
    g = parse_chat_request(CHAT).generates[0]
    assert not g.sampling.HasField("temperature") and not g.sampling.HasField("seed")
    assert not g.stopping.HasField("max_new_tokens")
    assert not parse_chat_request(CHAT).stream


def test_stream_options_without_stream_is_refused():
    with pytest.raises(ApiError) as raised:
        parse_chat_request({**CHAT, "stream_options": {"include_usage": True}})
    assert (raised.value.status, raised.value.param) == (400, "stream_options")


def test_response_format_becomes_a_guide_with_openais_checks():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    guide = parse_chat_request({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True}}}).generates[0].guide
    assert guide.type == pb.GUIDE_TYPE_JSON_SCHEMA and json.loads(guide.text) == schema
    assert not parse_chat_request({**CHAT, "response_format": {"type": "text"}}).generates[0].HasField("guide")
    json_chat = {**CHAT, "messages": [{"role": "user", "content": "Answer in JSON."}]}
    assert parse_chat_request({**json_chat, "response_format": {"type": "json_object"}}).generates[0].guide.type == \
        pb.GUIDE_TYPE_JSON_OBJECT


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_object"}, "messages"),  # OpenAI: the messages must mention JSON
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "a b"}}, "response_format.json_schema.name"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_a_response_format_openai_refuses_is_refused_naming_the_field(response_format, param):
    with pytest.raises(ApiError) as raised:
        parse_chat_request({**CHAT, "response_format": response_format})
    assert (raised.value.status, raised.value.param) == (400, param)


def test_n_and_log_probs_are_carried_over_and_top_logprobs_needs_logprobs():
    g = parse_chat_request({**CHAT, "n": 3, "logprobs": True, "top_logprobs": 2}).generates[0]
    assert (g.n, g.logprobs, g.top_logprobs) == (3, True, 2)
    for extra, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"n": 0}, "n"), ({"n": 129}, "n")):
        with pytest.raises(ApiError) as raised:
            parse_chat_request({**CHAT, **extra})
        assert (raised.value.status, raised.value.param) == (400, param), extra


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_tool_choice_and_a_tool_round_trip_are_carried_over():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    body = {**CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False, "messages": [
                {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12C"}]}
    g = parse_chat_request(body).generates[0]
    assert [t.name for t in g.tools] == ["get_weather"] and json.loads(g.tools[0].parameters_json)["required"] == ["city"]
    assert (g.tool_choice.mode, g.tool_choice.function_name) == (pb.ToolChoice.MODE_FUNCTION, "get_weather")
    assert g.HasField("parallel_tool_calls") and not g.parallel_tool_calls
    assistant, tool = g.messages[1], g.messages[2]
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [("call_1", "get_weather", '{"city": "Oslo"}')]
    assert (tool.role, tool.tool_call_id, tool.content) == (pb.ROLE_TOOL, "call_1", "12C")
    assert parse_chat_request({**CHAT, "tools": [WEATHER]}).generates[0].tool_choice.mode == pb.ToolChoice.MODE_AUTO
    assert parse_chat_request({**CHAT, "tools": [WEATHER], "tool_choice": "required"}).generates[0].tool_choice.mode \
        == pb.ToolChoice.MODE_REQUIRED


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),  # OpenAI: not both
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "12C"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
])
def test_bad_messages_and_tools_are_refused_naming_the_field(extra, param):
    with pytest.raises(ApiError) as raised:
        parse_chat_request({**CHAT, **extra})
    assert (raised.value.status, raised.value.param) == (400, param)
