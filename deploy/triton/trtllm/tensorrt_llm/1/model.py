"""Production `tensorrt_llm` Triton model: TensorRT-LLM's LLM API on the GPU behind our token-id
contract (triton_model/llmapi.py), the Triton-facing half shared with the CPU stand-in
(triton_model/serving.py). Served from the NVIDIA Triton container that carries TensorRT-LLM
1.2.1, with this project installed in it (README.md beside the model repository).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from triton_model.llmapi import LlmApiGenerator, LlmApiSettings
from triton_model.serving import Metrics, ModelServer, TritonModelBase, model_parameters


class TritonPythonModel(TritonModelBase):
    def initialize(self, args):
        metrics = Metrics(pb_utils, "tensorrt_llm")
        generator = LlmApiGenerator(LlmApiSettings.from_parameters(model_parameters(args)), metrics=metrics)
        self.server = ModelServer(pb_utils, generator, metrics)
