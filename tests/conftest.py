"""What every depth of the suite shares: the model's id and its registry (the real tokenizer)."""

from __future__ import annotations

import pytest

from inference_svc.config import InferenceConfig
from inference_svc.registry import ModelRegistry, load_registry

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def registry() -> ModelRegistry:
    return load_registry(InferenceConfig().models_file)
