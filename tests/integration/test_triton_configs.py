"""Both model repositories parse with Triton's own ModelConfig, and share one interface."""

import dataclasses
import pathlib

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

TRITON = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "triton"
CONFIGS = sorted(TRITON.rglob("config.pbtxt"))


def parse(path: pathlib.Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_both_repositories_are_there():
    assert {p.relative_to(TRITON).parts[0] for p in CONFIGS} >= {"cpu", "trtllm", "bench"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(TRITON)))
def test_every_config_parses_as_a_decoupled_batching_model(path):
    config = parse(path)
    assert config.name == path.parent.name
    if config.name == "tensorrt_llm":
        assert config.model_transaction_policy.decoupled
        assert config.max_batch_size > 0


@pytest.mark.parametrize("repository", ["cpu", "bench"])
def test_the_stand_ins_have_exactly_the_production_models_inputs_and_outputs(repository):
    production = parse(TRITON / "trtllm" / "tensorrt_llm" / "config.pbtxt")
    stand_in = parse(TRITON / repository / "tensorrt_llm" / "config.pbtxt")
    assert list(stand_in.input) == list(production.input)
    assert list(stand_in.output) == list(production.output)
    assert stand_in.max_batch_size == production.max_batch_size


def test_production_runs_the_llm_api_with_kv_cache_reuse_llguidance_and_cancellation_polling():
    from triton_model.llmapi import LlmApiSettings

    production = parse(TRITON / "trtllm" / "tensorrt_llm" / "config.pbtxt")
    params = {k: v.string_value for k, v in production.parameters.items()}
    assert production.backend == "python"
    settings = LlmApiSettings.from_parameters(params)
    assert settings.enable_kv_cache_reuse and settings.enable_chunked_context
    assert settings.guided_decoding_backend == "llguidance"  # the grammar engine the CPU model uses
    assert settings.cancellation_check_period_ms <= 100
    assert (settings.vocab_size, settings.max_seq_len) == (128256, 8192)


def test_the_production_model_imports_without_a_gpu_and_asks_tensorrt_llm_for_the_contract():
    import importlib.util
    import sys

    from tests.unit.model import triton_fakes
    from triton_model.llmapi import guide, sampling_params
    from triton_model.request import GenerationRequest, Sampling

    sys.modules.setdefault("triton_python_backend_utils", triton_fakes)
    spec = importlib.util.spec_from_file_location("production_model", TRITON / "trtllm" / "tensorrt_llm" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module.TritonPythonModel, "execute")
    request = GenerationRequest(
        request_id="r", input_ids=[1, 2], max_new_tokens=9, end_id=128009, stop_words=((128001,), (128008,)),
        streaming=True, exclude_input=True, num_sequences=3, return_log_probs=True, top_log_probs=4,
        guide_type="json_schema", guide='{"type": "object"}', sampling=Sampling(temperature=0.7, top_p=0.9, seed=5))
    kwargs = sampling_params(request)
    assert kwargs["n"] == 3 and kwargs["logprobs"] == 4 and kwargs["end_id"] == 128009 and not kwargs["detokenize"]
    assert kwargs["stop_token_ids"] == [128001, 128008] and kwargs["top_p"] == 0.9 and kwargs["seed"] == 5
    assert guide(request) == {"json": '{"type": "object"}'}
    greedy = sampling_params(dataclasses.replace(request, sampling=Sampling(temperature=0.0)))
    assert (greedy["top_k"], greedy["temperature"], greedy["top_p"]) == (1, None, None)


def test_inference_svc_only_sends_inputs_the_model_declares():
    from inference_svc.engine import EngineRequest
    from inference_svc.triton_engine import TritonModel, build_inputs

    declared = {i.name: i for i in parse(TRITON / "trtllm" / "tensorrt_llm" / "config.pbtxt").input}
    request = EngineRequest("r", "llama3-8b", [1, 2, 3], 5, (2, 7, 9), 0.7, 0.9, 0, 42,
                            guide=("json_schema", '{"type": "object"}'), logit_bias=((4, -100.0),),
                            n=3, log_probs=True, top_log_probs=2)
    dtype = {"INT32": model_config_pb2.TYPE_INT32, "FP32": model_config_pb2.TYPE_FP32,
             "BOOL": model_config_pb2.TYPE_BOOL, "UINT64": model_config_pb2.TYPE_UINT64,
             "BYTES": model_config_pb2.TYPE_STRING}
    sent = build_inputs(request, TritonModel("tensorrt_llm", end_id=2, vocab_size=128256, pad_id=2))
    assert {"input_ids", "input_lengths", "request_output_len", "guided_decoding_guide", "embedding_bias",
            "num_return_sequences", "return_log_probs", "num_top_log_probs"} <= {t.name() for t in sent}
    for tensor in sent:
        assert tensor.name() in declared, tensor.name()
        spec = declared[tensor.name()]
        assert dtype[tensor.datatype()] == spec.data_type, tensor.name()
        # batch dimension of 1, then the declared rank
        assert len(tensor.shape()) == 1 + len(spec.dims) and tensor.shape()[0] == 1, tensor.name()


def test_the_production_registry_knows_the_production_models_vocabulary():
    import tomllib

    [model] = tomllib.loads((TRITON.parent / "inference" / "models.trtllm.toml").read_text())["models"]
    config = parse(TRITON / "trtllm" / "tensorrt_llm" / "config.pbtxt")
    assert model["engine"]["vocab_size"] == int(config.parameters["vocab_size"].string_value)


def test_the_registry_models_engine_tables_say_how_triton_runs_them():
    import numpy as np

    from inference_svc.engine import EngineRequest
    from inference_svc.registry import load_registry
    from inference_svc.triton_engine import TritonModel, build_inputs

    registry = load_registry(str(TRITON.parent / "inference" / "models.cpu.toml"), lambda path: _Vocabulary())
    spec = registry.get("smollm2-135m-instruct")
    model = TritonModel.from_table(spec.id, spec.engine)
    assert model == TritonModel("tensorrt_llm", end_id=2, vocab_size=49152, pad_id=2)

    def sent(request: EngineRequest) -> dict:
        kinds = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}
        return {t.name(): np.frombuffer(t._get_content(), kinds[t.datatype()]).tolist() for t in build_inputs(request, model)}

    # The ending token TensorRT-LLM ends on goes as end_id; the model's others go as stop words.
    inputs = sent(EngineRequest("r", spec.id, [1], 5, (2, 7), 0.7, 0.9, 0, 42))
    assert inputs["end_id"] == [2] and inputs["pad_id"] == [2] and inputs["stop_words_list"] == [7, 1]
    assert (inputs["temperature"], inputs["runtime_top_k"]) == ([np.float32(0.7)], [0])
    # Greedy (temperature 0) reaches TensorRT-LLM, which has no temperature 0, as top-k 1.
    greedy = sent(EngineRequest("r", spec.id, [1], 5, (2,), 0.0, 0.9, 0, 42))
    assert (greedy["temperature"], greedy["runtime_top_p"], greedy["runtime_top_k"]) == ([1.0], [1.0], [1])
    assert "stop_words_list" not in greedy
    # The logit bias goes as TensorRT-LLM's embedding_bias: one value per token of the vocabulary.
    assert "embedding_bias" not in inputs
    bias = sent(EngineRequest("r", spec.id, [1], 5, (2,), 0.7, 0.9, 0, 42, logit_bias=((5, -100.0), (9, 2.5))))
    assert len(bias["embedding_bias"]) == 49152 and sum(bias["embedding_bias"]) == -97.5
    assert bias["embedding_bias"][5] == -100.0 and bias["embedding_bias"][9] == 2.5
    with pytest.raises(ValueError, match="triton_model"):
        TritonModel.from_table("m", {"end_id": 2, "vocab_size": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        TritonModel.from_table("m", {"triton_model": "tensorrt_llm", "end_id": 2})


class _Vocabulary:
    vocab_size = 50_000


def test_the_cpu_registry_promises_no_more_choices_or_memory_than_the_cpu_model_has():
    import tomllib

    [model] = tomllib.loads((TRITON.parent / "inference" / "models.cpu.toml").read_text())["models"]
    params = {k: v.string_value for k, v in parse(TRITON / "cpu" / "tensorrt_llm" / "config.pbtxt").parameters.items()}
    assert model["max_choices"] == int(params["max_return_sequences"])
    assert model["max_request_tokens"] == int(params["kv_cache_tokens"])
