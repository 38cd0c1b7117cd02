"""An OpenAI chat request translated into inference_svc's GenerateRequest."""

from __future__ import annotations

import pytest

from cloudach.inference.v1 import inference_pb2 as pb
from edge.chat import parse_chat_request
from edge.errors import ApiError

CHAT = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]}


def test_messages_sampling_and_stopping_are_carried_over():
    chat = parse_chat_request({**CHAT, "temperature": 0.2, "top_p": 0.5, "seed": 7, "max_completion_tokens": 9,
                               "stop": "END", "stream": True, "stream_options": {"include_usage": True}})
    g = chat.generate
    assert [(m.role, m.content) for m in g.messages] == [(pb.ROLE_SYSTEM, "Be brief."), (pb.ROLE_USER, "Hi there")]
    assert (round(g.sampling.temperature, 6), g.sampling.top_p, g.sampling.seed) == (0.2, 0.5, 7)
    assert g.stopping.max_new_tokens == 9 and list(g.stopping.stop_sequences) == ["END"]
    assert chat.stream and chat.include_usage and chat.max_tokens_name == "max_completion_tokens"
    assert chat.id.startswith("chatcmpl-") and g.request_id == chat.id
    assert chat.prompt_chars == len("Be brief.") + len("Hi there")


def test_unset_fields_stay_unset_for_the_models_defaults():
    g = parse_chat_request(CHAT).generate
    assert not g.sampling.HasField("temperature") and not g.sampling.HasField("seed")
    assert not g.stopping.HasField("max_new_tokens")
    assert not parse_chat_request(CHAT).stream


def test_stream_options_without_stream_is_refused():
    with pytest.raises(ApiError) as raised:
        parse_chat_request({**CHAT, "stream_options": {"include_usage": True}})
    assert (raised.value.status, raised.value.param) == (400, "stream_options")
