"""The relay of inference_svc's events to the client: as SSE (each choice's deltas, merged while the
client's socket is backed up; writes bounded in time) or gathered into one JSON body; and several
calls of one request (a legacy prompt list) read as one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Sequence

import grpc
from aiohttp import web

from cloudach.billing.v1 import billing_pb2
from cloudach.errors import Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.rpc.errors import error_from_rpc
from edge.errors import from_domain
from edge.job import FINISH_REASONS, Choice, Job, Tally
from edge.sse import DONE, KEEPALIVE, error_event, usage_dict
from edge.state import STATE

log = logging.getLogger(__name__)

#: Text held while the client reads slowly is merged into one event, up to this many characters;
#: past it the relay waits for the client (and so, through gRPC flow control, the model's stream).
MAX_PENDING_CHARS = 64 * 1024
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: events buffered from each of several calls of one request (a legacy prompt list) while relaying
MERGE_BUFFER = 64


class Merged:
    """Several Generate calls read as one, like a call: choice indices offset by call (call i's
    choice j is i * n + j), their Finished events summed into one, then EOF."""

    def __init__(self, calls: Sequence[grpc.aio.UnaryStreamCall], n: int) -> None:
        self._queue: asyncio.Queue = asyncio.Queue(MERGE_BUFFER * len(calls))
        self._n = n
        self._open = len(calls)
        self._running = len(calls)
        self._finished = pb.Finished(usage=pb.Usage())
        self._tasks = [asyncio.create_task(self._pump(i, call)) for i, call in enumerate(calls)]

    async def _pump(self, i: int, call) -> None:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                await self._queue.put((i, message))
            await self._queue.put((i, grpc.aio.EOF))
        except Exception as failure:  # noqa: BLE001 - handed to the reader, who raises it
            await self._queue.put((i, failure))

    async def read(self):
        while self._open:
            i, message = await self._queue.get()
            if isinstance(message, Exception):
                raise message
            if message is grpc.aio.EOF:
                self._open -= 1
                continue
            offset = i * self._n
            if message.HasField("delta"):
                message.delta.index += offset
            elif message.HasField("choice_finished"):
                message.choice_finished.index += offset
            elif message.HasField("finished"):
                done = message.finished
                if i == 0:
                    self._finished.finish_reason = done.finish_reason
                self._finished.usage.prompt_tokens += done.usage.prompt_tokens
                self._finished.usage.completion_tokens += done.usage.completion_tokens
                self._finished.usage.cached_tokens += done.usage.cached_tokens
                self._running -= 1
                if self._running:
                    continue
                return pb.GenerateResponse(finished=self._finished)
            return message
        return grpc.aio.EOF

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


class _Sink:
    """A stream's writes, each bounded in time: a client that reads nothing for timeout_s (its
    socket's buffers full) is cut off and counted as gone, instead of holding its slot forever."""

    __slots__ = ("_response", "_transport", "_timeout_s")

    #: a write this large may wait for the client even when nothing is buffered yet
    LARGE = 16 * 1024

    def __init__(self, response: web.StreamResponse, transport, timeout_s: float) -> None:
        self._response, self._transport, self._timeout_s = response, transport, timeout_s

    def backed_up(self) -> bool:
        """Whether the client's socket has bytes waiting: a write now may wait for the client."""
        return self._transport is not None and self._transport.get_write_buffer_size() > 0

    async def write(self, data: bytes, backed_up: bool | None = None) -> None:
        """backed_up: what the caller just read from backed_up(), so the relay asks once a delta."""
        if backed_up is None:
            backed_up = self.backed_up()
        if not backed_up and len(data) < self.LARGE:
            await self._response.write(data)  # room in the buffers: this cannot wait for the client
            return
        await self._bounded(self._response.write(data))

    async def end(self) -> None:
        await self._bounded(self._response.write_eof())

    async def _bounded(self, writing) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await writing
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()
            raise ConnectionResetError(f"the client read nothing for {self._timeout_s:g}s") from None


async def _keepalives(response: web.StreamResponse | _Sink, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await response.write(KEEPALIVE)


async def _first_message(response: web.StreamResponse | _Sink, call, keepalive_s: float):
    """The first event, with keep-alive comments while a long prompt is prefilled.

    Only the handler's task reads the call; the helper task only writes comments, and is
    stopped (and awaited) before anything else is written."""
    keepalive = asyncio.create_task(_keepalives(response, keepalive_s))
    try:
        return await call.read()
    finally:
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await keepalive


class _Pending:
    """A choice's text (and log probs) not yet written while the client's socket is backed up."""

    __slots__ = ("parts", "chars", "logprobs")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chars = 0
        self.logprobs: list[pb.TokenLogProb] = []


async def _relay(request: web.Request, sink: _Sink, call, job: Job, encoder, tally: Tally) -> pb.Finished:
    """Streams deltas as content chunks, merging each choice's while the client's socket is backed
    up; writes each choice's finish chunk as it ends (the last one's with the Finished usage)."""
    state = request.app[STATE]
    message = await _first_message(sink, call, state.config.keepalive_s)
    itl = state.metrics.itl.labels(encoder.model)
    last = time.monotonic()
    pending: dict[int, _Pending] = {}
    open_choices = job.choices
    last_reason, last_index = "stop", 0
    with_logprobs = job.logprobs

    async def flush(index: int) -> None:
        held = pending.pop(index, None)
        if held is not None:
            await sink.write(encoder.content("".join(held.parts), index, held.logprobs if with_logprobs else None))

    while message is not grpc.aio.EOF:
        if message.HasField("delta"):
            delta = message.delta
            now = time.monotonic()
            if not tally.time_to_first_token_ns:
                tally.first_token()
            else:
                itl.observe(now - last)
            last = now
            tally.completion_tokens += delta.token_count
            # each call's first delta carries its prompt's cached tokens (a cut stream's record)
            tally.cached_tokens += delta.cached_tokens
            if delta.HasField("tool_call"):
                await flush(delta.index)
                await sink.write(encoder.tool_call(delta.tool_call, delta.index, delta.logprobs if with_logprobs else None))
                message = await call.read()
                continue
            backed_up = sink.backed_up()
            if not backed_up and delta.index not in pending:
                await sink.write(encoder.content(delta.text, delta.index, delta.logprobs if with_logprobs else None),
                                 backed_up=False)
            else:
                held = pending.setdefault(delta.index, _Pending())
                held.parts.append(delta.text)
                held.chars += len(delta.text)
                held.logprobs.extend(delta.logprobs)
                if not backed_up or held.chars >= MAX_PENDING_CHARS:
                    await flush(delta.index)
        elif message.HasField("choice_finished"):
            ended = message.choice_finished
            await flush(ended.index)
            open_choices -= 1
            reason = FINISH_REASONS.get(ended.finish_reason, "stop")
            if open_choices:
                await sink.write(encoder.finish(reason, None, ended.index))
            else:
                last_reason, last_index = reason, ended.index  # written with the usage, next
        elif message.HasField("finished"):
            for index in list(pending):
                await flush(index)
            finished = message.finished
            usage = usage_dict(finished.usage)
            await sink.write(encoder.finish(last_reason, usage, last_index))
            # Finished is the last event: reading on to the end of the stream completes the call
            # (and the tracing interceptor's client span, which ends when the stream does).
            await call.read()
            return finished
        message = await call.read()
    raise Unavailable("the inference stream ended before the generation finished")


async def stream(request: web.Request, call, job: Job, tally: Tally, record) -> web.StreamResponse:
    """Streams the answer; record() stores its usage record, called before the [DONE] of a stream
    that completed, so a client that got [DONE] is billed even if the edge dies right after."""
    response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    await response.prepare(request)
    active = request.app[STATE].metrics.active_streams
    active.inc()
    encoder = job.format.encoder(job)
    sink = _Sink(response, request.transport, request.app[STATE].config.stream_write_timeout_s)
    try:
        _bound_send_buffer(request, request.app[STATE].config.stream_send_buffer_bytes)
        opening = job.format.opening(job, encoder)
        if opening:
            await sink.write(opening)
        finished = await _relay(request, sink, call, job, encoder, tally)
        tally.finished(finished)
        await asyncio.shield(record())
        if job.include_usage:
            await sink.write(encoder.usage(usage_dict(finished.usage)))
        await sink.write(DONE)
    except (grpc.aio.AioRpcError, Unavailable) as failure:
        # After the 200 the error travels in-band; the SDKs raise it during iteration.
        domain = error_from_rpc(failure) if isinstance(failure, grpc.aio.AioRpcError) else failure
        log.warning("stream %s failed mid-way: %s", job.id, domain.message)
        with contextlib.suppress(ConnectionResetError):  # a client already gone needs no error event
            await sink.write(error_event(from_domain(domain, job.max_tokens_name).envelope()))
    except ConnectionResetError:
        log.info("client went away during stream %s", job.id)
        tally.outcome = billing_pb2.OUTCOME_CANCELLED_BY_CLIENT
        return response
    finally:
        active.dec()
    with contextlib.suppress(ConnectionResetError):
        await sink.end()
    return response


def _bound_send_buffer(request: web.Request, size: int) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and size > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


async def complete(call, job: Job, tally: Tally) -> web.Response:
    choices = [Choice(i) for i in range(job.choices)]
    finished = None
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.HasField("delta"):
            delta = message.delta
            if not tally.time_to_first_token_ns:
                tally.first_token()
            tally.completion_tokens += delta.token_count
            tally.cached_tokens += delta.cached_tokens
            choices[delta.index].add(delta)
        elif message.HasField("choice_finished"):
            ended = message.choice_finished
            choices[ended.index].finish_reason = FINISH_REASONS.get(ended.finish_reason, "stop")
        elif message.HasField("finished"):
            finished = message.finished
    if finished is None:
        raise Unavailable("the inference stream ended before the generation finished")
    tally.finished(finished)
    usage = usage_dict(finished.usage)
    body = json.dumps(job.format.body(job, choices, usage), ensure_ascii=False).encode()
    return web.Response(body=body, content_type="application/json")
