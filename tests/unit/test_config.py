import pytest

from cloudach.config import from_env
from edge.config import EdgeConfig
from inference_svc.config import InferenceConfig


def test_settings_take_their_defaults_when_unset_or_empty():
    assert from_env(InferenceConfig, {"CLOUDACH_INFERENCE_MAX_STREAMS": " "}) == InferenceConfig()


def test_settings_are_parsed_as_their_defaults_type():
    config = from_env(InferenceConfig, {
        "CLOUDACH_TRITON_URLS": "a:1, b:2,",
        "CLOUDACH_INFERENCE_MAX_STREAMS": "7",
        "CLOUDACH_INFERENCE_TOKEN_TIMEOUT_S": "0.5",
    })
    assert config.triton_urls == ("a:1", "b:2")
    assert config.max_concurrent_streams == 7 and config.token_timeout_s == 0.5


def test_a_malformed_setting_names_its_variable():
    with pytest.raises(ValueError, match="CLOUDACH_PORT"):
        from_env(EdgeConfig, {"CLOUDACH_PORT": "eighty"})
