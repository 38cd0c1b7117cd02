"""The SSE bytes of a chat.completion.chunk stream, parsed back as a client would."""

from __future__ import annotations

import json

from cloudach.inference.v1 import inference_pb2 as pb
from edge.sse import DONE, ChunkEncoder, TextCompletionEncoder, error_event, usage_dict


def events(*chunks: bytes) -> list:
    out = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1
        payload = chunk[len(b"data: "):-2].decode()
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def usage_of(prompt: int, completion: int, cached: int = 0) -> dict:
    return usage_dict(pb.Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached))


OPENAI_USAGE_DETAILS = {
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}


def test_a_stream_reads_as_openai_chunks():
    encoder = ChunkEncoder("chatcmpl-1", 1700000000, "m", include_usage=False)
    usage_ = usage_of(5, 2, cached=3)
    role, hello, finish, done = events(encoder.role(), encoder.content("Hé \"quoted\"\n"),
                                       encoder.finish("stop", usage_), DONE)
    meta = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    assert role == {**meta, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}
    assert hello["choices"][0]["delta"] == {"content": "Hé \"quoted\"\n"}
    assert "usage" not in hello
    assert finish == {**meta, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                                "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
                                **OPENAI_USAGE_DETAILS}}
    assert done == "[DONE]"


def test_include_usage_gives_every_chunk_a_null_usage_and_one_last_usage_chunk():
    encoder = ChunkEncoder("chatcmpl-2", 1, "m", include_usage=True)
    role, text, finish, usage = events(encoder.role(), encoder.content("x"), encoder.finish("length", None),
                                       encoder.usage(usage_of(3, 4)))
    assert role["usage"] is None and text["usage"] is None and finish["usage"] is None
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}, **OPENAI_USAGE_DETAILS}


def test_an_error_after_the_start_is_one_event_with_the_envelope():
    envelope = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert events(error_event(envelope)) == [envelope]


def test_choices_and_log_probs_have_openais_shapes():
    encoder = ChunkEncoder("chatcmpl-3", 1, "m", include_usage=False)
    alternative = pb.TokenLogProb(token="Hey", logprob=-2.0, bytes=b"Hey")
    token = pb.TokenLogProb(token="Hé", logprob=-0.5, bytes="Hé".encode(), top_logprobs=[alternative])
    role, text, finish = events(encoder.role(2), encoder.content("Hé", 2, [token]), encoder.finish("stop", None, 2))
    assert role["choices"][0]["index"] == text["choices"][0]["index"] == finish["choices"][0]["index"] == 2
    assert text["choices"][0]["delta"] == {"content": "Hé"}
    assert text["choices"][0]["logprobs"] == {"content": [{
        "token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169],
        "top_logprobs": [{"token": "Hey", "logprob": -2.0, "bytes": [72, 101, 121]}]}], "refusal": None}
    assert "usage" not in finish


def test_a_legacy_stream_reads_as_text_completion_objects_with_text_offsets():
    encoder = TextCompletionEncoder("cmpl-1", 1, "m", include_usage=True)
    a, b = pb.TokenLogProb(token="Once", logprob=-1.0, bytes=b"Once"), pb.TokenLogProb(token=" upon", logprob=-0.5, bytes=b" upon")
    first, second, finish, usage = events(encoder.content("Once", 1, [a]), encoder.content(" upon", 1, [b]),
                                          encoder.finish("length", None, 1), encoder.usage(usage_of(2, 2)))
    assert first["object"] == "text_completion" and first["usage"] is None
    assert first["choices"] == [{"text": "Once", "index": 1, "finish_reason": None, "logprobs": {
        "tokens": ["Once"], "token_logprobs": [-1.0], "top_logprobs": [{}], "text_offset": [0]}}]
    assert second["choices"][0]["logprobs"]["text_offset"] == [4]
    assert finish["choices"][0]["finish_reason"] == "length" and usage["choices"] == []
