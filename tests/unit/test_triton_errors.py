"""What inference_svc makes of a Triton model's in-band error."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException

from cloudach.errors import InvalidArgument, ResourceExhausted, Unavailable
from inference_svc.triton_engine import _in_band_error


def test_a_refusal_naming_an_input_is_invalid_argument_for_that_field():
    error = _in_band_error(InferenceServerException(
        "in ensemble: invalid input 'guided_decoding_guide': the json_schema guide does not compile: type must be a string"))
    assert isinstance(error, InvalidArgument) and error.param == "guided_decoding_guide"
    assert error.message.startswith("invalid input 'guided_decoding_guide'")


def test_a_full_queue_is_resource_exhausted_and_anything_else_unavailable():
    assert isinstance(_in_band_error(InferenceServerException("the model's queue is full: retry later")), ResourceExhausted)
    assert isinstance(_in_band_error(InferenceServerException("CUDA error: device-side assert")), Unavailable)
