"""Both model repositories parse with Triton's own ModelConfig, and share one interface."""

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


def test_production_uses_in_flight_batching_with_kv_cache_reuse_and_cancellation_polling():
    production = parse(TRITON / "trtllm" / "tensorrt_llm" / "config.pbtxt")
    params = {k: v.string_value for k, v in production.parameters.items()}
    assert production.backend == "tensorrtllm"
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["enable_kv_cache_reuse"] == "true"
    assert params["exclude_input_in_output"] == "true"
    assert int(params["cancellation_check_period_ms"]) <= 100


def test_inference_svc_only_sends_inputs_the_model_declares():
    from inference_svc.engine import EngineRequest
    from inference_svc.triton_engine import build_inputs

    declared = {i.name: i for i in parse(TRITON / "trtllm" / "tensorrt_llm" / "config.pbtxt").input}
    request = EngineRequest("r", "tensorrt_llm", [1, 2, 3], 5, 2, 2, (7, 9), 0.7, 0.9, 0, 42)
    dtype = {"INT32": model_config_pb2.TYPE_INT32, "FP32": model_config_pb2.TYPE_FP32,
             "BOOL": model_config_pb2.TYPE_BOOL, "UINT64": model_config_pb2.TYPE_UINT64}
    sent = build_inputs(request)
    assert {"input_ids", "input_lengths", "request_output_len"} <= {t.name() for t in sent}
    for tensor in sent:
        assert tensor.name() in declared, tensor.name()
        spec = declared[tensor.name()]
        assert dtype[tensor.datatype()] == spec.data_type, tensor.name()
        # batch dimension of 1, then the declared rank
        assert len(tensor.shape()) == 1 + len(spec.dims) and tensor.shape()[0] == 1, tensor.name()
