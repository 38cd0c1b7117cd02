"""The edge's Generate calls, carried on a few GenerateMany streams to inference_svc.

Each message inference_svc sends then carries the events of every call that were ready at once,
so at a hundred streams one gRPC message (~75 µs of CPU a side, docs/benchmarks.md) serves many
tokens. A call reads like grpc.aio's own (read() gives events, then grpc.aio.EOF; a failure
raises the same AioRpcError, details included; cancel() stops the generation), so the relay does
not know which it has.

Streams are spread over inference_svc's replicas by the channel's per-call balancing, a few per
edge. A stream takes new calls for retire_after_s, then ends once its calls have: servers close a
connection after 5 minutes (11 more for its streams), and a stream must not outlive that. A call
whose stream fails UNAVAILABLE before it has anything is started again on another stream, up to
MAX_ATTEMPTS in all after a doubling backoff (gRPC's own retry policy for a single call: a replica
just killed can take a new stream or two before the channel knows it is gone).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence

import grpc
from opentelemetry import propagate

from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.rpc.client import RETRY_ATTEMPTS, RETRY_FIRST_BACKOFF_S, RETRY_MAX_BACKOFF_S
from cloudach.rpc.errors import DRAINING, error_from_rpc

log = logging.getLogger(__name__)
EOF = grpc.aio.EOF


def _error(code: grpc.StatusCode, message: str, status: bytes = b"") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status)) if status else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


#: a call's streams at most, and the pauses between: the channel's retry policy for Generate
MAX_ATTEMPTS, FIRST_BACKOFF_S, MAX_BACKOFF_S = RETRY_ATTEMPTS, RETRY_FIRST_BACKOFF_S, RETRY_MAX_BACKOFF_S


class MuxCall:
    """One Generate call on a shared stream."""

    __slots__ = ("request", "authorization", "traceparent", "timeout_ms", "id", "stream", "_events", "_ended",
                 "received", "attempts")

    def __init__(self, request: pb.GenerateRequest, authorization: str, traceparent: str, timeout_ms: int) -> None:
        self.request, self.authorization, self.traceparent, self.timeout_ms = request, authorization, traceparent, timeout_ms
        self.id = 0
        self.stream: _Stream | None = None
        self._events: asyncio.Queue = asyncio.Queue()  # bounded by the call's own tokens (max_tokens)
        self._ended = False
        self.received = 0
        #: streams it was started on
        self.attempts = 0

    def start_message(self) -> pb.MuxRequest:
        return pb.MuxRequest(call=self.id, start=self.request, authorization=self.authorization,
                             traceparent=self.traceparent, timeout_ms=self.timeout_ms)

    def deliver(self, item) -> None:
        self.received += 1
        self._events.put_nowait(item)

    async def read(self):
        if self._ended and self._events.empty():
            return EOF
        item = await self._events.get()
        if item is EOF:
            self._ended = True
        elif isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def cancel(self) -> bool:
        """Stops the call (a no-op once it has ended)."""
        if self._ended:
            return False
        self._ended = True
        if self.stream is not None:
            self.stream.cancel(self)
        return True


class _Stream:
    def __init__(self, stub, on_failed) -> None:
        self._outgoing: asyncio.Queue = asyncio.Queue()
        self.calls: dict[int, MuxCall] = {}
        self._ids = itertools.count(1)
        self.opened = time.monotonic()
        self.retired = self.closed = self._ending = False
        self._on_failed = on_failed
        self._call = stub.GenerateMany(self._requests())
        self._reader = asyncio.create_task(self._read())

    async def _requests(self):
        while (message := await self._outgoing.get()) is not None:
            yield message

    def add(self, call: MuxCall) -> None:
        call.id, call.stream = next(self._ids), self
        self.calls[call.id] = call
        self._outgoing.put_nowait(call.start_message())

    def cancel(self, call: MuxCall) -> None:
        if self.calls.pop(call.id, None) is not None and not self.closed:
            self._outgoing.put_nowait(pb.MuxRequest(call=call.id, cancel=True))
        self._end_if_idle()

    def retire(self) -> None:
        self.retired = True
        self._end_if_idle()

    def _end_if_idle(self) -> None:
        if self.retired and not self.calls and not self._ending:
            self._ending = True
            self._outgoing.put_nowait(None)  # done writing: the server ends the stream

    async def _read(self) -> None:
        failure = _error(grpc.StatusCode.UNAVAILABLE, "inference_svc ended the stream")
        try:
            async for response in self._call:
                for event in response.events:
                    call = self.calls.get(event.call)
                    if call is None:
                        continue  # cancelled meanwhile
                    kind = event.WhichOneof("kind")
                    if kind == "event":
                        call.deliver(event.event)
                        continue
                    del self.calls[event.call]
                    if kind == "end":
                        call.deliver(EOF)
                    else:
                        error = event.error
                        failure = _error(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message, error.status)
                        if error_from_rpc(failure).code == DRAINING:
                            self.retire()  # this inference_svc is stopping: no more calls here
                        self._on_failed(call, failure)
                    self._end_if_idle()
        except grpc.aio.AioRpcError as error:
            failure = error
        except asyncio.CancelledError:
            failure = _error(grpc.StatusCode.CANCELLED, "the edge is closing")
            raise
        finally:
            self.closed = True
            left, self.calls = list(self.calls.values()), {}
            if left and not self._ending:
                log.warning("inference stream failed with %d calls on it: %s", len(left), failure.details())
            for call in left:
                self._on_failed(call, failure)

    def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()


class Multiplexer:
    """Generate(request, timeout, metadata) -> a MuxCall, on the least busy of `streams` streams."""

    def __init__(self, stub, streams: int = 4, retire_after_s: float = 60.0) -> None:
        self._stub = stub
        self._count = max(1, streams)
        self._retire_after_s = retire_after_s
        self._streams: list[_Stream] = []
        self._closing = False

    def Generate(self, request: pb.GenerateRequest, timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> MuxCall:
        authorization = next((v for k, v in metadata if k == "authorization"), "")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        call = MuxCall(request, authorization.removeprefix("Bearer ").strip(), carrier.get("traceparent", ""),
                       int(timeout * 1000) if timeout else 0)
        self._place(call)
        return call

    def _place(self, call: MuxCall) -> None:
        now = time.monotonic()
        self._streams = [s for s in self._streams if not s.closed]
        for stream in self._streams:
            if not stream.retired and now - stream.opened > self._retire_after_s:
                stream.retire()
        live = [s for s in self._streams if not s.retired]
        if len(live) < self._count:
            stream = _Stream(self._stub, self._failed)
            self._streams.append(stream)
        else:
            stream = min(live, key=lambda s: len(s.calls))
        call.attempts += 1
        stream.add(call)

    def _failed(self, call: MuxCall, failure: grpc.aio.AioRpcError) -> None:
        """A call whose stream failed: started again elsewhere if it had nothing yet, else failed."""
        if (not self._closing and not call.received and call.attempts < MAX_ATTEMPTS and not call._ended
                and failure.code() == grpc.StatusCode.UNAVAILABLE):
            backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (call.attempts - 1))
            asyncio.get_running_loop().call_later(backoff, self._retry, call, failure)
            return
        call.deliver(failure)

    def _retry(self, call: MuxCall, failure: grpc.aio.AioRpcError) -> None:
        if call._ended:
            return  # cancelled meanwhile
        if self._closing:
            call.deliver(failure)
            return
        self._place(call)

    async def close(self) -> None:
        self._closing = True
        for stream in self._streams:
            stream.close()
        self._streams = []
