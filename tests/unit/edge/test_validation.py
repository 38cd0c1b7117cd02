"""The request validator against the published schema: OpenAI's messages, params and codes."""

from __future__ import annotations

import pytest

from edge.errors import ApiError
from edge.schema import CREATE_CHAT_COMPLETION_REQUEST
from edge.validation import validate

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def refusal(body: dict) -> tuple[int, str | None, str | None]:
    with pytest.raises(ApiError) as raised:
        validate(CREATE_CHAT_COMPLETION_REQUEST, body)
    return raised.value.status, raised.value.param, raised.value.code


def test_a_plain_request_passes():
    validate(CREATE_CHAT_COMPLETION_REQUEST, {**CHAT, "temperature": 0.5, "max_tokens": 10, "stream": True})


@pytest.mark.parametrize("body, param, code", [
    ({"messages": CHAT["messages"]}, "model", "missing_required_parameter"),
    ({**CHAT, "messages": []}, "messages", "empty_array"),
    ({**CHAT, "temperature": "hot"}, "temperature", "invalid_type"),
    ({**CHAT, "temperature": 2.5}, "temperature", "decimal_above_max_value"),
    ({**CHAT, "top_p": -0.1}, "top_p", "decimal_below_min_value"),
    ({**CHAT, "max_tokens": 1.5}, "max_tokens", "invalid_type"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({**CHAT, "stream": "yes"}, "stream", "invalid_type"),
])
def test_the_first_refused_field_is_named(body, param, code):
    assert refusal(body) == (400, param, code)


def test_an_unknown_top_level_argument_is_refused_as_openai_says_it():
    with pytest.raises(ApiError) as raised:
        validate(CREATE_CHAT_COMPLETION_REQUEST, {**CHAT, "frobnicate": 1})
    assert raised.value.message == "Unrecognized request argument supplied: frobnicate"


def test_a_boolean_is_not_a_number_and_infinity_is_not_finite():
    assert refusal({**CHAT, "temperature": True})[2] == "invalid_type"
    assert refusal({**CHAT, "temperature": float("inf")})[2] in ("invalid_value", "decimal_above_max_value")
