"""Reading and checking a request to our tensorrt_llm model (the token-id contract)."""

from __future__ import annotations

import numpy as np
import pytest

from triton_model.request import Limits, Refused, is_stop, parse

LIMITS = Limits(n_vocab=100, max_sequence_tokens=64, max_return_sequences=4, kv_cache_tokens=128)


class Inputs(dict):
    def get(self, name):  # the shape Triton gives: a leading batch dimension
        value = super().get(name)
        return None if value is None else np.asarray(value).reshape(1, -1)


def request(**inputs):
    return Inputs({"input_ids": [5, 6, 7], "request_output_len": 10, **inputs})


def refusal(**inputs) -> str:
    with pytest.raises(Refused) as refused:
        parse("r", request(**inputs), LIMITS)
    return str(refused.value)


def test_a_plain_request_reads_with_the_defaults():
    parsed = parse("r", request(end_id=2, seed=np.uint64(9)), LIMITS)
    assert (parsed.input_ids, parsed.max_new_tokens, parsed.end_id, parsed.num_sequences) == ([5, 6, 7], 10, 2, 1)
    assert parsed.sampling.temperature == 1.0 and parsed.sampling.seed == 9 and not parsed.sampling.greedy
    assert parsed.kv_tokens_needed == 3 + 10


def test_input_lengths_cut_the_ids_and_stop_words_read_in_tensorrt_llms_layout():
    parsed = parse("r", Inputs({"input_ids": [5, 6, 7, 0], "input_lengths": 3, "request_output_len": 4,
                                "stop_words_list": np.array([[8, 9, 10, 0], [2, 3, -1, -1]])}), LIMITS)
    assert parsed.input_ids == [5, 6, 7] and parsed.stop_words == ((8, 9), (10,))


def test_guides_log_probs_and_n_are_carried():
    parsed = parse("r", request(num_return_sequences=3, num_top_log_probs=5, guided_decoding_guide_type=b"regex",
                                guided_decoding_guide=np.array([b"[0-9]+"], dtype=object)), LIMITS)
    assert (parsed.num_sequences, parsed.top_log_probs, parsed.return_log_probs) == (3, 5, True)
    assert (parsed.guide_type, parsed.guide) == ("regex", "[0-9]+")
    assert parsed.kv_tokens_needed == 3 + 3 * 10


@pytest.mark.parametrize("inputs, named", [
    (dict(input_ids=[]), "input_ids"),
    (dict(input_ids=[5, 100]), "input_ids"),
    (dict(request_output_len=0), "request_output_len"),
    (dict(request_output_len=62), "request_output_len"),  # past the 64-token context
    (dict(num_return_sequences=5), "num_return_sequences"),
    (dict(num_return_sequences=4, request_output_len=40), "num_return_sequences"),  # 3 + 4 × 40 > 128 cells
    (dict(num_top_log_probs=21), "num_top_log_probs"),
    (dict(beam_width=2), "beam_width"),
    (dict(guided_decoding_guide_type=b"yaml"), "guided_decoding_guide_type"),
    (dict(guided_decoding_guide_type=b"json_schema"), "guided_decoding_guide"),
    (dict(temperature=np.float32("nan")), "temperature"),
    (dict(runtime_top_p=1.5), "runtime_top_p"),
    (dict(min_tokens=11), "min_tokens"),
    (dict(embedding_bias=np.zeros(99, np.float32)), "embedding_bias"),
    (dict(return_generation_logits=True), "return_generation_logits"),
    (dict(bad_words_list=np.array([[1], [1]])), "bad_words_list"),
])
def test_what_cannot_run_is_refused_naming_the_input(inputs, named):
    assert refusal(**inputs).startswith(f"invalid input '{named}':")


def test_a_stop_request_is_recognised():
    assert is_stop(Inputs({"stop": True})) and not is_stop(request())
