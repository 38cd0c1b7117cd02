"""inference_svc's policies over real gRPC on loopback, with the fake engine or no Triton at all."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.inference.v1 import inference_pb2_grpc
from tools.launcher.ports import free_ports
from inference_svc.server import running_inference
from tests.integration.services import MODEL, authed_channel, inference_config
from tests.fakes import FakeEngine

CHAT = [pb.ChatMessage(role=pb.ROLE_USER, content="Hi")]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def drain(stub, request=None, metadata=None):
    request = request or pb.GenerateRequest(model=MODEL, messages=CHAT)
    async with asyncio.timeout(30):
        return [e async for e in stub.Generate(request, metadata=metadata)]


def serving(engine, registry, auth, **config):
    return running_inference(inference_config(auth, **config), engine=engine, registry=registry)


async def test_streams_beyond_the_limit_are_refused_at_once_not_queued(registry, auth):
    engine = FakeEngine(steps=[[100]] * 200, delay_s=0.01)
    async with serving(engine, registry, auth, max_concurrent_streams=1) as running:
        async with authed_channel(running.address, auth) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            first = asyncio.create_task(drain(stub))
            await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await drain(stub)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            await asyncio.sleep(0.1)
            assert running.service.active_streams == 0


async def test_an_unexpected_failure_is_internal_and_reveals_nothing(registry, auth):
    engine = FakeEngine(steps=[[100]] * 5, fail_after=1, error=KeyError("secret internals"))
    async with serving(engine, registry, auth) as running:
        async with authed_channel(running.address, auth) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await drain(inference_pb2_grpc.InferenceServiceStub(channel))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in raised.value.details()


async def test_the_callers_trace_context_is_passed_to_the_backend(registry, auth):
    engine = FakeEngine(steps=[[100]])
    async with serving(engine, registry, auth) as running:
        async with authed_channel(running.address, auth) as channel:
            await drain(inference_pb2_grpc.InferenceServiceStub(channel), metadata=(("traceparent", TRACEPARENT),))
    # The backend gets inference_svc's own server span: the caller's trace, a new parent span.
    _, trace_id, parent_id, _ = engine.requests[0].trace_headers["traceparent"].split("-")
    assert trace_id == TRACEPARENT.split("-")[1] and parent_id != TRACEPARENT.split("-")[2]


async def test_a_caller_that_goes_away_cancels_the_generation(registry, auth):
    engine = FakeEngine(steps=[[100]] * 500, delay_s=0.01)
    async with serving(engine, registry, auth) as running:
        async with authed_channel(running.address, auth) as channel:
            call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                pb.GenerateRequest(request_id="bye", model=MODEL, messages=CHAT)
            )
            await call.read()
            call.cancel()
            await asyncio.sleep(0.3)
    assert engine.cancelled == ["bye"] and not engine.completed


async def test_without_triton_requests_fail_fast_as_unavailable_and_health_says_not_serving(registry, auth):
    (dead_port,) = free_ports(1)
    config = inference_config(auth, triton_urls=(f"127.0.0.1:{dead_port}",), token_timeout_s=5)
    async with running_inference(config, registry=registry) as running:
        async with authed_channel(running.address, auth) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await drain(inference_pb2_grpc.InferenceServiceStub(channel))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.5)
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_valid_request_is_acknowledged_with_its_prompt_size_before_any_token(registry, auth):
    engine = FakeEngine(steps=[[100]], delay_s=0.5)
    async with serving(engine, registry, auth) as running:
        async with authed_channel(running.address, auth) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT))
            async with asyncio.timeout(0.4):  # well before the first token
                first = await call.read()
            assert first.WhichOneof("event") == "accepted" and first.accepted.prompt_tokens > 0
            events = [e.WhichOneof("event") async for e in call]
            assert events == ["delta", "choice_finished", "finished"]
            refused = stub.Generate(pb.GenerateRequest(model="nope", messages=CHAT))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await refused.read()  # no Accepted: the refusal is the first thing the caller sees
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND

