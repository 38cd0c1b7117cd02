"""The SSE bytes of a chat.completion.chunk stream, parsed back as a client would."""

from __future__ import annotations

import json

from edge.sse import DONE, ChunkEncoder, error_event, usage_dict


def events(*chunks: bytes) -> list:
    out = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1
        payload = chunk[len(b"data: "):-2].decode()
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_a_stream_reads_as_openai_chunks():
    encoder = ChunkEncoder("chatcmpl-1", 1700000000, "m", include_usage=False)
    usage = usage_dict(5, 2)
    role, hello, finish, done = events(encoder.role(), encoder.content("Hé \"quoted\"\n"),
                                       encoder.finish("stop", usage), DONE)
    meta = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    assert role == {**meta, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}
    assert hello["choices"][0]["delta"] == {"content": "Hé \"quoted\"\n"}
    assert "usage" not in hello
    assert finish == {**meta, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    assert done == "[DONE]"


def test_include_usage_gives_every_chunk_a_null_usage_and_one_last_usage_chunk():
    encoder = ChunkEncoder("chatcmpl-2", 1, "m", include_usage=True)
    role, text, finish, usage = events(encoder.role(), encoder.content("x"), encoder.finish("length", None),
                                       encoder.usage(usage_dict(3, 4)))
    assert role["usage"] is None and text["usage"] is None and finish["usage"] is None
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_an_error_after_the_start_is_one_event_with_the_envelope():
    envelope = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert events(error_event(envelope)) == [envelope]
