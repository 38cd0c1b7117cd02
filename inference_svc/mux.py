"""GenerateMany: many Generate calls over one stream, each message carrying every call's events
ready at once.

Per stream, tokens come one at a time (a GPU streams each request at 50-100 tokens/s), so a
stream's own events are never ready together; across a hundred streams they are (docs/benchmarks.md:
one gRPC message costs ~75 µs of CPU on each side, a token's event a few). Each call runs exactly
as a Generate call would (InferenceService.Generate: admission, its token checked, its usage
reported, its trace); this module only carries calls and their events on one stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from cloudach.errors import CloudachError, DeadlineExceeded, Internal, Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.rpc.auth import acting_as
from cloudach.rpc.errors import DRAINING, to_status
from cloudach.tokens import INFERENCE_AUDIENCE, TokenVerifier

log = logging.getLogger(__name__)
GENERATE = "/cloudach.inference.v1.InferenceService/Generate"
#: a stream's events waiting to be written at most, before its calls wait for the writer
MAX_READY = 4096


@contextlib.asynccontextmanager
async def _unobserved(method: str, carrier: dict[str, str]):
    yield None


def mux_error(error: BaseException) -> pb.MuxError:
    """What Generate's status would be for error (an unexpected one tells nothing internal)."""
    if not isinstance(error, CloudachError):
        log.error("unhandled error in a multiplexed Generate call", exc_info=error)
        error = Internal("internal error")
    status = to_status(error)
    details = dict(status.trailing_metadata).get("grpc-status-details-bin", b"")
    return pb.MuxError(code=status.code.value[0], message=status.details, status=details)


async def generate_many(generate, verifier: TokenVerifier, requests: AsyncIterator[pb.MuxRequest],
                        observe=None, draining=lambda: False) -> AsyncIterator[pb.MuxResponse]:
    """generate(request) -> Generate's events, run in the call's own task as its caller;
    observe(method, trace carrier): the async context of a call's span and counts; while
    draining() a new call is refused UNAVAILABLE, reason "draining" (the caller goes elsewhere)."""
    observe = observe or _unobserved
    ready: list[pb.MuxEvent] = []
    more, room = asyncio.Event(), asyncio.Event()
    room.set()
    calls: dict[int, asyncio.Task] = {}
    reading = True

    async def emit(event: pb.MuxEvent) -> None:
        ready.append(event)
        more.set()
        if len(ready) >= MAX_READY:  # the caller reads slowly: calls wait for the writer
            room.clear()
            await room.wait()

    async def run(start: pb.MuxRequest) -> None:
        call = start.call
        try:
            # A span and counts of its own, as a Generate RPC would get (RpcObservability).
            async with observe(GENERATE, {"traceparent": start.traceparent} if start.traceparent else {}):
                if draining():
                    raise Unavailable("inference_svc is shutting down; retry", code=DRAINING)
                acting_as(await verifier.verify(start.authorization, INFERENCE_AUDIENCE))
                request = start.start
                try:
                    async with asyncio.timeout(start.timeout_ms / 1000 if start.timeout_ms else None):
                        async with contextlib.aclosing(generate(request)) as events:
                            async for event in events:
                                await emit(pb.MuxEvent(call=call, event=event))
                except TimeoutError:
                    raise DeadlineExceeded("the call's deadline passed") from None
            await emit(pb.MuxEvent(call=call, end=True))
        except asyncio.CancelledError:
            raise  # its caller cancelled it, or the stream ended: nobody to tell
        except Exception as error:  # noqa: BLE001 - each call's failure is its own
            await emit(pb.MuxEvent(call=call, error=mux_error(error)))
        finally:
            calls.pop(call, None)
            more.set()

    async def read() -> None:
        nonlocal reading
        try:
            async for message in requests:
                if message.HasField("start"):
                    if message.call not in calls:
                        calls[message.call] = asyncio.create_task(run(message))
                elif message.cancel and message.call in calls:
                    calls.pop(message.call).cancel()
        finally:
            reading = False
            more.set()

    reader = asyncio.create_task(read())
    try:
        while reading or calls or ready:
            if not ready:
                more.clear()
                await more.wait()
                continue
            group = ready[:]
            ready.clear()
            room.set()
            yield pb.MuxResponse(events=group)
        await reader  # a failure of the stream's reads ends it with that failure
    finally:
        reader.cancel()
        for task in list(calls.values()):
            task.cancel()
