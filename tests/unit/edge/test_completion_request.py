"""A legacy completions body translated into inference_svc's GenerateRequests."""

from __future__ import annotations

import pytest

from edge.completions import parse_completion_request
from edge.errors import ApiError

BODY = {"model": "m", "prompt": "Once upon a time"}


def test_a_prompt_goes_as_it_is_with_openais_default_length():
    job = parse_completion_request({**BODY, "stop": ["\n"], "temperature": 0, "stream": True,
                                    "stream_options": {"include_usage": True}})
    (g,) = job.generates
    assert g.prompt == "Once upon a time" and not g.messages
    assert g.stopping.max_new_tokens == 16 and list(g.stopping.stop_sequences) == ["\n"]
    assert job.id.startswith("cmpl-") and g.request_id == job.id and job.stream and job.include_usage
    assert job.operation == "text_completion" and not g.logprobs


def test_a_list_of_prompts_is_one_generation_each_with_n_choices_and_logprobs_count_alternatives():
    job = parse_completion_request({**BODY, "prompt": ["a", "b"], "n": 2, "logprobs": 3, "max_tokens": 5})
    assert [g.prompt for g in job.generates] == ["a", "b"] and job.choices == 4
    assert len({g.request_id for g in job.generates}) == 2
    assert all((g.n, g.logprobs, g.top_logprobs, g.stopping.max_new_tokens) == (2, True, 3, 5) for g in job.generates)
    assert parse_completion_request({**BODY, "logprobs": 0}).generates[0].logprobs


@pytest.mark.parametrize("extra, param", [
    ({"suffix": "The end."}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"n": 2, "best_of": 3}, "best_of"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"logprobs": 6}, "logprobs"),
    ({"prompt": [1, 2, 3]}, "prompt[0]"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["x"] * 33}, "prompt"),  # bounded: one generation each
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_what_is_not_supported_or_invalid_is_refused_naming_the_field(extra, param):
    with pytest.raises(ApiError) as raised:
        parse_completion_request({**BODY, **extra})
    assert (raised.value.status, raised.value.param) == (400, param)


def test_suffix_null_and_best_of_equal_to_n_are_accepted():
    assert parse_completion_request({**BODY, "suffix": None, "n": 2, "best_of": 2}).choices == 2
