"""/openapi.json is valid JSON Schema, and the bodies the endpoints build follow it."""

from __future__ import annotations

import jsonschema

from cloudach.inference.v1 import inference_pb2 as pb
from edge import openapi, schema
from edge.chat import parse_chat_request
from edge.completions import parse_completion_request
from edge.job import Choice


def test_every_schema_is_valid_json_schema():
    for name, document in openapi.document()["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(document)
    assert "/v1/completions" in openapi.document()["paths"]


def choices() -> list[Choice]:
    token = pb.TokenLogProb(token="Hi", logprob=-0.1, bytes=b"Hi", top_logprobs=[pb.TokenLogProb(token="Hi", logprob=-0.1, bytes=b"Hi")])
    called = Choice(1, finish_reason="tool_calls", tool_calls=[pb.ToolCall(id="call_1", name="f", arguments="{}")])
    return [Choice(0, parts=["Hi"], logprobs=[token]), called]


def test_the_bodies_follow_the_published_response_schemas():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2, "logprobs": True})
    body = chat.format.body(chat, choices(), usage)
    jsonschema.validate(body, schema.CHAT_COMPLETION)
    assert body["choices"][1]["message"]["content"] is None and body["choices"][1]["message"]["tool_calls"]
    legacy = parse_completion_request({"model": "m", "prompt": "x", "n": 2, "logprobs": 1})
    texts = [Choice(0, parts=["Hi"], logprobs=choices()[0].logprobs), Choice(1, parts=["!"], finish_reason="length")]
    jsonschema.validate(legacy.format.body(legacy, texts, usage), schema.TEXT_COMPLETION)
