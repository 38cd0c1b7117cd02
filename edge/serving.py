"""What chat and legacy completions share: admission and limits, the inference_svc calls, the relay
of their events as SSE or one JSON body, and the settlement of usage (limits and the bill).

An endpoint parses its request into a Job (the GenerateRequests to run and how to answer) and
hands it to `serve`; its ResponseFormat turns choices into that endpoint's chunks and bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate, trace

from cloudach.billing.v1 import billing_pb2
from cloudach.errors import MAX_MODEL_ID_CHARS, Unavailable, model_not_found
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.rpc.errors import error_from_rpc
from edge import params
from edge.auth import Principal
from edge.errors import ApiError, from_domain
from edge.http import read_json_object
from edge.ratelimit import Decision, Limiter, Quota, headers, refusal
from edge.sse import DONE, KEEPALIVE, error_event, usage_dict
from edge.state import MAX_TOKENS_NAME, MODEL, PRINCIPAL, RATE_HEADERS, STATE

log = logging.getLogger(__name__)

FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}  # else "stop"
#: Text held while the client reads slowly is merged into one event, up to this many characters;
#: past it the relay waits for the client (and so, through gRPC flow control, the model's stream).
MAX_PENDING_CHARS = 64 * 1024
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: events buffered from each of several calls of one request (a legacy prompt list) while relaying
MERGE_BUFFER = 64


@dataclass(slots=True)
class Choice:
    """One choice's answer, gathered for a non-streamed response."""

    index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogProb] = field(default_factory=list)
    tool_calls: list[pb.ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"

    def add(self, delta: pb.TokenDelta) -> None:
        self.parts.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        if delta.HasField("tool_call"):
            call = delta.tool_call
            if call.id:
                self.tool_calls.append(pb.ToolCall(id=call.id, name=call.name))
            elif self.tool_calls:
                self.tool_calls[-1].arguments += call.arguments

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ResponseFormat(Protocol):
    """An endpoint's wire format."""

    def encoder(self, job: Job):
        """The chunk encoder of a stream (edge.sse): content(), finish() and usage()."""

    def opening(self, job: Job, encoder) -> bytes:
        """The events before any generated text (chat: each choice's role)."""

    def body(self, job: Job, choices: Sequence[Choice], usage: dict) -> dict:
        """The non-streamed response."""


@dataclass(frozen=True, slots=True)
class Job:
    """An endpoint's parsed request: what to generate, and how to answer."""

    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    #: one GenerateRequest per prompt (chat: exactly one); call i's choice j is choice i * n + j
    generates: tuple[pb.GenerateRequest, ...]
    format: ResponseFormat
    #: which of max_tokens / max_completion_tokens the caller used, to name it in errors
    max_tokens_name: str
    #: characters of prompt text, for the token limit's estimate before tokenization
    prompt_chars: int
    #: gen_ai.operation.name: chat or text_completion
    operation: str = "chat"
    user: str = ""

    @classmethod
    def from_body(cls, body: dict, completion_id: str, generates: Sequence[pb.GenerateRequest],
                  format: ResponseFormat, max_tokens_name: str, prompt_chars: int, operation: str = "chat") -> Job:
        """The fields every endpoint reads alike (model, stream, stream_options, user) from its body."""
        if len(body["model"]) > MAX_MODEL_ID_CHARS:
            raise from_domain(model_not_found(body["model"]))
        return cls(id=completion_id, created=int(time.time()), model=body["model"], stream=bool(body.get("stream")),
                   include_usage=params.include_usage(body), generates=tuple(generates), format=format,
                   max_tokens_name=max_tokens_name, prompt_chars=prompt_chars, operation=operation,
                   user=params.user(body))

    @property
    def n(self) -> int:
        return self.generates[0].n or 1

    @property
    def choices(self) -> int:
        return self.n * len(self.generates)

    @property
    def logprobs(self) -> bool:
        return self.generates[0].logprobs


@dataclass(slots=True)
class Tally:
    """What a request amounted to, as far as it got: its tokens, timing and outcome."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: inference_svc accepted it: from here on it is billed, whatever happens
    accepted: bool = False
    outcome: int = billing_pb2.OUTCOME_FAILED_MID_STREAM
    started_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    started_ns: int = field(default_factory=time.monotonic_ns)
    time_to_first_token_ns: int = 0
    finish_reason: str = ""

    def first_token(self) -> None:
        self.time_to_first_token_ns = time.monotonic_ns() - self.started_ns
        trace.get_current_span().add_event("gen_ai.first_token")


def _reservation(job: Job, default_output_tokens: int) -> int:
    """Tokens held against the key's limit until the real usage is known: about four characters
    a token for the prompt (plus each message's framing), and the most every choice may use."""
    stopping = job.generates[0].stopping
    output = stopping.max_new_tokens if stopping.HasField("max_new_tokens") else default_output_tokens
    messages = sum(len(g.messages) for g in job.generates)
    return job.prompt_chars // 4 + 4 * messages + output * job.choices


def _check_model_allowed(principal: Principal, model: str) -> None:
    if principal.allowed_models and model not in principal.allowed_models:
        # Waiting will not help: tell the SDKs not to retry.
        raise ApiError(403, f"This API key is not allowed to use the model `{model}`.",
                       code="model_not_allowed", headers={"x-should-retry": "false"})


async def serve(request: web.Request, parse) -> web.StreamResponse:
    """Runs one request end to end; parse(body) -> Job raises ApiError for bad input."""
    state = request.app[STATE]
    config = state.config
    principal = request[PRINCIPAL]
    quota = Quota(principal.requests_per_minute, principal.tokens_per_minute, principal.max_concurrent_streams)
    # The metrics' model label: only a model inference_svc served, so made-up names add no series.
    request[MODEL] = "unknown"
    try:
        job = parse(await read_json_object(request))
        request[MAX_TOKENS_NAME] = job.max_tokens_name
        _check_model_allowed(principal, job.model)
    except ApiError:
        # A refused request still spends a request, as OpenAI counts failed requests.
        decision = await state.limiter.admit(principal.key_id, Quota(quota.requests_per_minute, 0, 0), "", 0, 0)
        request[RATE_HEADERS] = headers(decision)
        raise
    reserved = _reservation(job, config.default_reserved_output_tokens)
    span = trace.get_current_span()
    span.set_attributes(_request_attributes(job, principal))
    decision = await admit(state.limiter, principal.key_id, quota, job.id, reserved, config.request_timeout_s)
    request[RATE_HEADERS] = headers(decision)
    if not decision.allowed:
        state.metrics.rejections.labels(f"rate_limit_{decision.refused_by}").inc()
        raise refusal(decision, quota)
    tally = Tally()
    try:
        with state.admission:
            # The channel's tracing interceptor passes this request's trace context on.
            calls = [state.inference.Generate(g, timeout=config.request_timeout_s, metadata=principal.grpc_metadata)
                     for g in job.generates]
            merged = None
            try:
                # The calls run at once; their first events are read in turn (a refusal raises).
                prompts = [await _accepted(call) for call in calls]
                tally.prompt_tokens = sum(prompts)
                tally.accepted = True
                request[MODEL] = job.model
                events = calls[0] if len(calls) == 1 else (merged := Merged(calls, job.n))
                if job.stream:
                    return await _stream(request, events, job, tally)
                return await _complete(events, job, tally)
            except asyncio.CancelledError:
                tally.outcome = billing_pb2.OUTCOME_CANCELLED_BY_CLIENT
                raise
            finally:
                if merged is not None:
                    merged.cancel()
                for call in calls:
                    call.cancel()  # a no-op once the call has ended; otherwise the generation stops
    finally:
        span.set_attributes(_usage_attributes(job, tally))
        # Shielded as one unit: a client that leaves (even just after [DONE]) cancels this handler,
        # and must interrupt neither the durable write of its bill nor the release of its limits.
        await asyncio.shield(_settle(request, principal, job, tally, quota, reserved))


async def admit(limiter: Limiter, key_id: str, quota: Quota, request_id: str, reserved: int,
                lease_s: float) -> Decision:
    """The limiter's decision. A request cancelled while the limiter is asked (its client left
    during the Redis round trip) gives back whatever the decision took, so no concurrency lease or
    token reservation outlives its request."""
    asking = asyncio.ensure_future(limiter.admit(key_id, quota, request_id, reserved, lease_s=lease_s))
    try:
        return await asyncio.shield(asking)
    except asyncio.CancelledError:
        await asyncio.shield(_give_back(limiter, asking, key_id, quota, request_id, reserved))
        raise


async def _give_back(limiter: Limiter, asking: asyncio.Future, key_id: str, quota: Quota, request_id: str,
                     reserved: int) -> None:
    decision = await asking
    if decision.allowed:
        await limiter.settle(key_id, quota, reserved, 0, request_id)
        await limiter.release(key_id, request_id)


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
                self._running -= 1
                if self._running:
                    continue
                return pb.GenerateResponse(finished=self._finished)
            return message
        return grpc.aio.EOF

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


async def _settle(request: web.Request, principal: Principal, job: Job, tally: Tally,
                  quota: Quota, reserved: int) -> None:
    state = request.app[STATE]
    limiter = state.limiter
    if tally.accepted:
        state.metrics.output_tokens.labels(job.model).inc(tally.completion_tokens)
        if tally.time_to_first_token_ns:
            state.metrics.ttft.labels(job.model).observe(tally.time_to_first_token_ns / 1e9)
        await _bill(request, principal, job, tally)
    await limiter.settle(principal.key_id, quota, reserved, tally.prompt_tokens + tally.completion_tokens, job.id)
    await limiter.release(principal.key_id, job.id)


def _request_attributes(job: Job, principal: Principal) -> dict:
    """GenAI semantic-convention attributes of the request: ids, model, limits; never prompt text."""
    stopping, sampling = job.generates[0].stopping, job.generates[0].sampling
    attributes = {
        "gen_ai.operation.name": job.operation,
        "gen_ai.system": "cloudach",
        "gen_ai.request.model": job.model,
        "gen_ai.response.id": job.id,
        "cloudach.key_id": principal.key_id,
        "cloudach.organization": principal.organization,
        "cloudach.stream": job.stream,
    }
    if job.choices > 1:
        attributes["gen_ai.request.choice.count"] = job.choices
    if stopping.HasField("max_new_tokens"):
        attributes["gen_ai.request.max_tokens"] = stopping.max_new_tokens
    if sampling.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = sampling.temperature
    if sampling.HasField("top_p"):
        attributes["gen_ai.request.top_p"] = sampling.top_p
    return attributes


def _usage_attributes(job: Job, tally: Tally) -> dict:
    attributes = {
        "cloudach.outcome": billing_pb2.Outcome.Name(tally.outcome).removeprefix("OUTCOME_").lower(),
        "gen_ai.response.model": job.model,
        "gen_ai.usage.input_tokens": tally.prompt_tokens,
        "gen_ai.usage.output_tokens": tally.completion_tokens,
    }
    if tally.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (tally.finish_reason,)
    return attributes


async def _bill(request: web.Request, principal: Principal, job: Job, tally: Tally) -> None:
    """Puts the request's usage record in the outbox; billing_svc gets it from there."""
    started, ended = Timestamp(), Timestamp()
    started.FromMilliseconds(tally.started_at_ms)
    ended.GetCurrentTime()
    record = billing_pb2.UsageRecord(
        request_id=job.id, key_id=principal.key_id, organization=principal.organization, model=job.model,
        prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens, outcome=tally.outcome,
        started_at=started, ended_at=ended, time_to_first_token_ns=tally.time_to_first_token_ns, user=job.user,
    )
    state = request.app[STATE]
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the delivery, later, joins this request's trace
    try:
        await state.outbox.add(record, carrier.get("traceparent", ""))
    except Exception:  # noqa: BLE001 - the one loss we cannot prevent: say it loudly, with what it was
        log.exception("USAGE RECORD NOT STORED: %s", record)
        return
    state.outbox_wake.set()


async def _accepted(call: grpc.aio.UnaryStreamCall) -> int:
    """Waits for inference_svc to accept the request (its first event): the prompt's tokens. A
    refusal raises its gRPC error, which the error middleware answers."""
    first = await call.read()
    if first is grpc.aio.EOF or not first.HasField("accepted"):
        raise Unavailable("inference_svc's stream did not begin with Accepted")
    return first.accepted.prompt_tokens


class _Sink:
    """A stream's writes, each bounded in time: a client that reads nothing for timeout_s (its
    socket's buffers full) is cut off and counted as gone, instead of holding its slot forever."""

    __slots__ = ("_response", "_transport", "_timeout_s")

    #: a write this large may wait for the client even when nothing is buffered yet
    LARGE = 16 * 1024

    def __init__(self, response: web.StreamResponse, transport, timeout_s: float) -> None:
        self._response, self._transport, self._timeout_s = response, transport, timeout_s

    async def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or (transport.get_write_buffer_size() == 0 and len(data) < self.LARGE):
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
    transport = request.transport
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
            if delta.HasField("tool_call"):
                await flush(delta.index)
                await sink.write(encoder.tool_call(delta.tool_call, delta.index, delta.logprobs if with_logprobs else None))
                message = await call.read()
                continue
            backed_up = transport is not None and transport.get_write_buffer_size() > 0
            if not backed_up and delta.index not in pending:
                await sink.write(encoder.content(delta.text, delta.index, delta.logprobs if with_logprobs else None))
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
            usage = usage_dict(finished.usage.prompt_tokens, finished.usage.completion_tokens)
            await sink.write(encoder.finish(last_reason, usage, last_index))
            # Finished is the last event: reading on to the end of the stream completes the call
            # (and the tracing interceptor's client span, which ends when the stream does).
            await call.read()
            return finished
        message = await call.read()
    raise Unavailable("the inference stream ended before the generation finished")


async def _stream(request: web.Request, call, job: Job, tally: Tally) -> web.StreamResponse:
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
        tally.completion_tokens = finished.usage.completion_tokens
        tally.outcome = billing_pb2.OUTCOME_COMPLETED
        tally.finish_reason = FINISH_REASONS.get(finished.finish_reason, "stop")
        if job.include_usage:
            await sink.write(encoder.usage(usage_dict(finished.usage.prompt_tokens, finished.usage.completion_tokens)))
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


async def _complete(call, job: Job, tally: Tally) -> web.Response:
    choices = [Choice(i) for i in range(job.choices)]
    finished = None
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.HasField("delta"):
            delta = message.delta
            if not tally.time_to_first_token_ns:
                tally.first_token()
            tally.completion_tokens += delta.token_count
            choices[delta.index].add(delta)
        elif message.HasField("choice_finished"):
            ended = message.choice_finished
            choices[ended.index].finish_reason = FINISH_REASONS.get(ended.finish_reason, "stop")
        elif message.HasField("finished"):
            finished = message.finished
    if finished is None:
        raise Unavailable("the inference stream ended before the generation finished")
    tally.completion_tokens = finished.usage.completion_tokens
    tally.outcome = billing_pb2.OUTCOME_COMPLETED
    tally.finish_reason = FINISH_REASONS.get(finished.finish_reason, "stop")
    usage = usage_dict(finished.usage.prompt_tokens, finished.usage.completion_tokens)
    body = json.dumps(job.format.body(job, choices, usage), ensure_ascii=False).encode()
    return web.Response(body=body, content_type="application/json")
