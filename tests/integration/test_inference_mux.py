"""GenerateMany over real gRPC on loopback (the edge's Multiplexer against inference_svc, with the
fake engine): many calls' events share messages; each call is checked, cancelled, timed and
failed on its own; streams retire and new calls go to fresh ones."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import grpc
import pytest

from cloudach.errors import Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.inference.v1 import inference_pb2_grpc
from cloudach.rpc.errors import error_from_rpc
from cloudach.tokens import BILLING_AUDIENCE, INFERENCE, INFERENCE_AUDIENCE
from edge.mux import MAX_ATTEMPTS, Multiplexer
from inference_svc.server import running_inference
from tests.fakes import FakeEngine
from tests.integration.services import MODEL, inference_config, signed

CHAT = [pb.ChatMessage(role=pb.ROLE_USER, content="Hi")]


def serving(engine, registry, auth, **config):
    return running_inference(inference_config(auth, **config), engine=engine, registry=registry)


@contextlib.asynccontextmanager
async def multiplexed(engine, registry, auth, stub=inference_pb2_grpc.InferenceServiceStub, **options):
    """inference_svc over the fake engine, and the edge's Multiplexer on a channel to it."""
    async with serving(engine, registry, auth) as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            mux = Multiplexer(stub(channel), **options)
            try:
                yield running, mux
            finally:
                await mux.close()


def bearer(auth, audience=INFERENCE_AUDIENCE, *scopes) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {signed(auth, audience, *(scopes or (INFERENCE,)))}"),)


async def drain(call) -> list[pb.GenerateResponse]:
    events = []
    async with asyncio.timeout(30):
        while (event := await call.read()) is not grpc.aio.EOF:
            events.append(event)
    return events


class Counting(inference_pb2_grpc.InferenceServiceStub):
    """The stub, counting the messages GenerateMany streams bring."""

    def __init__(self, channel) -> None:
        super().__init__(channel)
        self.messages = self.events = 0
        many = self.GenerateMany

        def counted(requests, **kwargs):
            call = many(requests, **kwargs)
            outer = self

            class Reading:
                def __aiter__(self):
                    return self._read()

                async def _read(self):
                    async for message in call:
                        outer.messages += 1
                        outer.events += len(message.events)
                        yield message

                def cancel(self):
                    return call.cancel()

            return Reading()

        self.GenerateMany = counted


@dataclasses.dataclass
class Lockstep(FakeEngine):
    """The fake engine as a batching engine runs: one decode step gives every running sequence its
    next tokens at once (each call waits for the next tick of a shared clock, 5 ms apart)."""

    tick: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def clock(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self.tick.set()
            self.tick = asyncio.Event()

    async def generate(self, request):
        async for step in super().generate(request):
            await self.tick.wait()
            yield step


async def test_many_calls_share_messages_and_each_gets_exactly_its_own_events(registry, auth):
    words = [registry.get(MODEL).tokenizer.encode(f" w{i}") for i in range(40)]
    engine = Lockstep(steps=words)
    clock = asyncio.create_task(engine.clock())
    try:
        async with multiplexed(engine, registry, auth, stub=Counting, streams=2) as (running, mux):
            calls = [mux.Generate(pb.GenerateRequest(request_id=f"c{i}", model=MODEL, messages=CHAT), timeout=30,
                                  metadata=bearer(auth)) for i in range(30)]
            results = await asyncio.gather(*(drain(c) for c in calls))
    finally:
        clock.cancel()
    text = "".join(f" w{i}" for i in range(40))
    for events in results:
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "accepted" and kinds[-2:] == ["choice_finished", "finished"]
        assert "".join(e.delta.text for e in events if e.HasField("delta")) == text
    stub = mux._stub
    # each tick's tokens of a stream's 15 calls travel together: far fewer messages than events
    assert stub.events == 30 * 44 and stub.messages < stub.events / 4, (stub.messages, stub.events)


async def test_each_call_brings_its_own_token_and_a_bad_one_fails_that_call_alone(registry, auth):
    engine = FakeEngine(steps=[[100]] * 5)
    async with multiplexed(engine, registry, auth, streams=1) as (running, mux):
        good = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        forged = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=(("authorization", "Bearer x"),))
        elsewhere = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT),
                                 metadata=bearer(auth, BILLING_AUDIENCE, "usage:write"))
        assert (await drain(good))[-1].HasField("finished")
        for call, code in ((forged, grpc.StatusCode.UNAUTHENTICATED), (elsewhere, grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await drain(call)
            assert raised.value.code() == code
        refused = mux.Generate(pb.GenerateRequest(model="nope", messages=CHAT), metadata=bearer(auth))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(refused)
        # the same status a single Generate call gives, its details too
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_from_rpc(raised.value).param == "model"
    assert len(engine.requests) == 1


async def test_a_cancelled_call_stops_its_generation_and_the_others_go_on(registry, auth):
    engine = FakeEngine(steps=[[100]] * 300, delay_s=0.01)
    async with multiplexed(engine, registry, auth, streams=1) as (running, mux):
        leaving = mux.Generate(pb.GenerateRequest(request_id="gone", model=MODEL, messages=CHAT,
                                                  stopping=pb.StoppingCriteria(max_new_tokens=300)), metadata=bearer(auth))
        staying = mux.Generate(pb.GenerateRequest(request_id="stays", model=MODEL, messages=CHAT,
                                                  stopping=pb.StoppingCriteria(max_new_tokens=30)), metadata=bearer(auth))
        await leaving.read()
        await leaving.read()
        assert leaving.cancel()
        assert (await leaving.read()) is grpc.aio.EOF
        assert (await drain(staying))[-1].HasField("finished")
        await asyncio.sleep(0.3)
        assert running.service.active_streams == 0
    # "gone" was stopped at once; "stays" ended at its 30 tokens (its generator closed too)
    assert engine.cancelled == ["gone", "stays"] and not engine.completed


async def test_a_call_past_its_deadline_fails_deadline_exceeded(registry, auth):
    engine = FakeEngine(steps=[[100]] * 100, delay_s=0.05)
    async with multiplexed(engine, registry, auth) as (running, mux):
        call = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), timeout=0.3, metadata=bearer(auth))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(call)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_failure_mid_call_reaches_that_call_after_its_events(registry, auth):
    word = registry.get(MODEL).tokenizer.encode(" ok")
    engine = FakeEngine(steps=[word] * 10, fail_after=4, error=Unavailable("triton went away"))
    async with multiplexed(engine, registry, auth) as (running, mux):
        call = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(30):
                while (event := await call.read()) is not grpc.aio.EOF:
                    received.append(event)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "".join(e.delta.text for e in received if e.HasField("delta")) == " ok" * 4


async def test_streams_retire_and_new_calls_go_to_fresh_ones_while_old_calls_finish(registry, auth):
    engine = FakeEngine(steps=[[100]] * 20, delay_s=0.02)
    async with multiplexed(engine, registry, auth, streams=1, retire_after_s=0.1) as (running, mux):
        first = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        await first.read()
        await asyncio.sleep(0.2)
        second = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        assert second.stream is not first.stream and first.stream.retired
        assert (await drain(first))[-1].HasField("finished")  # the retired stream's call finishes
        assert (await drain(second))[-1].HasField("finished")
        await asyncio.sleep(0.2)
        assert first.stream.closed  # and then the retired stream ended, cleanly


async def test_a_call_whose_stream_dies_before_it_has_anything_is_started_again_elsewhere(registry, auth):
    engine = FakeEngine(steps=[[100]] * 3)
    async with multiplexed(engine, registry, auth, streams=1) as (running, mux):
        warm = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        await drain(warm)
        stream = warm.stream
        call = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        assert call.stream is stream
        # what the stream's reader does when its connection is reset before the call had a thing
        stream.closed = True
        stream.calls.pop(call.id, None)
        stream._on_failed(call, grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                                     grpc.aio.Metadata(), details="connection reset"))
        stream.close()
        assert (await drain(call))[-1].HasField("finished") and call.stream is not stream


async def test_a_stopping_server_refuses_new_calls_and_the_edge_moves_off_its_stream(registry, auth):
    engine = FakeEngine(steps=[[100]] * 3)
    async with multiplexed(engine, registry, auth, streams=1) as (running, mux):
        warm = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        await drain(warm)
        running.service.draining = True  # what its shutdown sets before the gRPC server stops
        refused = mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT), metadata=bearer(auth))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(refused)  # tried on a fresh stream too: this one server is stopping
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_from_rpc(raised.value).code == "draining"
        assert warm.stream.retired and refused.attempts == MAX_ATTEMPTS  # each refused: tried as often as allowed
        running.service.draining = False
        assert (await drain(mux.Generate(pb.GenerateRequest(model=MODEL, messages=CHAT),
                                         metadata=bearer(auth))))[-1].HasField("finished")
    assert len(engine.requests) == 2
