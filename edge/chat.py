"""POST /v1/chat/completions: an OpenAI request in, inference_svc's stream out as SSE or JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
import uuid
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate, trace

from cloudach.billing.v1 import billing_pb2
from cloudach.errors import Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.rpc.errors import error_from_rpc
from edge.auth import Principal
from edge.errors import ApiError, bad_request, from_domain
from edge.http import read_json_object
from edge.ratelimit import Quota, headers, refusal
from edge.schema import CREATE_CHAT_COMPLETION_REQUEST
from edge.sse import DONE, KEEPALIVE, ChunkEncoder, error_event, usage_dict
from edge.state import MAX_TOKENS_NAME, MODEL, PRINCIPAL, RATE_HEADERS, STATE
from edge.validation import validate

log = logging.getLogger(__name__)

ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_DEVELOPER, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length"}  # everything else ends as "stop"
#: Text held while the client reads slowly is merged into one event, up to this many characters;
#: past it the relay waits for the client (and so, through gRPC flow control, the model's stream).
MAX_PENDING_CHARS = 64 * 1024
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


@dataclass(frozen=True, slots=True)
class ChatRequest:
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    generate: pb.GenerateRequest
    #: which of max_tokens / max_completion_tokens the caller used, to name it in errors
    max_tokens_name: str
    #: characters of message text, for the token limit's estimate before tokenization
    prompt_chars: int


def _content(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _guide(response_format: dict | None, messages: list[pb.ChatMessage]) -> pb.Guide | None:
    """response_format as inference_svc's guide (which checks that it compiles), with OpenAI's checks."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        if not any("json" in m.content.lower() for m in messages):
            raise bad_request("'messages' must contain the word 'json' in some form, to use 'response_format' of "
                              "type 'json_object'.", param="messages")
        return pb.Guide(type=pb.GUIDE_TYPE_JSON_OBJECT)
    spec = response_format.get("json_schema")
    if spec is None:
        raise bad_request("Missing required parameter: 'response_format.json_schema'.",
                          param="response_format.json_schema", code="missing_required_parameter")
    if not _SCHEMA_NAME.match(spec["name"]):
        raise bad_request("Invalid 'response_format.json_schema.name': string does not match pattern. Expected a "
                          "string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                          param="response_format.json_schema.name", code="invalid_value")
    schema = spec.get("schema") or {"type": "object"}
    return pb.Guide(type=pb.GUIDE_TYPE_JSON_SCHEMA, text=json.dumps(schema))


def parse_chat_request(body: dict) -> ChatRequest:
    """Validates an OpenAI request body against the published schema and translates it."""
    validate(CREATE_CHAT_COMPLETION_REQUEST, body)
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options")
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    sampling = pb.SamplingParameters(
        presence_penalty=body.get("presence_penalty") or 0.0,
        frequency_penalty=body.get("frequency_penalty") or 0.0,
    )
    for field in ("temperature", "top_p", "seed"):
        if body.get(field) is not None:
            setattr(sampling, field, body[field])
    for token, bias in (body.get("logit_bias") or {}).items():
        if not (token.isascii() and token.isdigit()) or int(token) >= 2**32:
            raise bad_request(f"Invalid key in 'logit_bias': {token}. You should only be submitting non-negative "
                              "integers.", param="logit_bias", code="invalid_value")
        sampling.logit_bias[int(token)] = bias
    stopping = pb.StoppingCriteria()
    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(max_tokens_name) is not None:
        stopping.max_new_tokens = body[max_tokens_name]
    stop = body.get("stop")
    if stop is not None:
        stopping.stop_sequences.extend([stop] if isinstance(stop, str) else stop)
    messages = [pb.ChatMessage(role=ROLES[m["role"]], content=_content(m["content"])) for m in body["messages"]]
    generate = pb.GenerateRequest(
        request_id=completion_id,
        model=body["model"],
        messages=messages,
        sampling=sampling,
        stopping=stopping,
        guide=_guide(body.get("response_format"), messages),
    )
    return ChatRequest(
        id=completion_id,
        created=int(time.time()),
        model=body["model"],
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        generate=generate,
        max_tokens_name=max_tokens_name,
        prompt_chars=sum(len(m.content) for m in generate.messages),
    )


def _reservation(chat: ChatRequest, default_output_tokens: int) -> int:
    """Tokens held against the key's limit until the real usage is known: about four characters
    a token for the prompt (plus each message's framing), and the most the completion may use."""
    stopping = chat.generate.stopping
    output = stopping.max_new_tokens if stopping.HasField("max_new_tokens") else default_output_tokens
    return chat.prompt_chars // 4 + 4 * len(chat.generate.messages) + output


def _check_model_allowed(principal: Principal, model: str) -> None:
    if principal.allowed_models and model not in principal.allowed_models:
        # Waiting will not help: tell the SDKs not to retry.
        raise ApiError(403, f"This API key is not allowed to use the model `{model}`.",
                       code="model_not_allowed", headers={"x-should-retry": "false"})


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    principal = request[PRINCIPAL]
    quota = Quota(principal.requests_per_minute, principal.tokens_per_minute, principal.max_concurrent_streams)
    try:
        chat = parse_chat_request(await read_json_object(request))
        request[MAX_TOKENS_NAME] = chat.max_tokens_name
        _check_model_allowed(principal, chat.model)
    except ApiError:
        # A refused request still spends a request, as OpenAI counts failed requests.
        decision = await state.limiter.admit(principal.key_id, Quota(quota.requests_per_minute, 0, 0), "", 0, 0)
        request[RATE_HEADERS] = headers(decision)
        raise
    request[MODEL] = chat.model
    reserved = _reservation(chat, config.default_reserved_output_tokens)
    span = trace.get_current_span()
    span.set_attributes(_request_attributes(chat, principal))
    decision = await state.limiter.admit(principal.key_id, quota, chat.id, reserved, lease_s=config.request_timeout_s)
    request[RATE_HEADERS] = headers(decision)
    if not decision.allowed:
        state.metrics.rejections.labels(f"rate_limit_{decision.refused_by}").inc()
        raise refusal(decision, quota)
    tally = Tally()
    try:
        with state.admission:
            # The channel's tracing interceptor passes this request's trace context on.
            call = state.inference.Generate(chat.generate, timeout=config.request_timeout_s, metadata=principal.grpc_metadata)
            try:
                tally.prompt_tokens = await _accepted(call)
                tally.accepted = True
                if chat.stream:
                    return await _stream(request, call, chat, tally)
                return await _complete(call, chat, tally)
            except asyncio.CancelledError:
                tally.outcome = billing_pb2.OUTCOME_CANCELLED_BY_CLIENT
                raise
            finally:
                call.cancel()  # a no-op once the call has ended; otherwise the generation stops
    finally:
        span.set_attributes(_usage_attributes(chat, tally))
        # Shielded as one unit: a client that leaves (even just after [DONE]) cancels this handler,
        # and must interrupt neither the durable write of its bill nor the release of its limits.
        await asyncio.shield(_settle(request, principal, chat, tally, quota, reserved))


async def _settle(request: web.Request, principal: Principal, chat: ChatRequest, tally: Tally,
                  quota: Quota, reserved: int) -> None:
    state = request.app[STATE]
    limiter = state.limiter
    if tally.accepted:
        state.metrics.output_tokens.labels(chat.model).inc(tally.completion_tokens)
        if tally.time_to_first_token_ns:
            state.metrics.ttft.labels(chat.model).observe(tally.time_to_first_token_ns / 1e9)
    if tally.accepted:
        await _bill(request, principal, chat, tally)
    await limiter.settle(principal.key_id, quota, reserved, tally.prompt_tokens + tally.completion_tokens)
    await limiter.release(principal.key_id, chat.id)


def _request_attributes(chat: ChatRequest, principal: Principal) -> dict:
    """GenAI semantic-convention attributes of the request: ids, model, limits; never prompt text."""
    stopping, sampling = chat.generate.stopping, chat.generate.sampling
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "cloudach",
        "gen_ai.request.model": chat.model,
        "gen_ai.response.id": chat.id,
        "cloudach.key_id": principal.key_id,
        "cloudach.organization": principal.organization,
        "cloudach.stream": chat.stream,
    }
    if stopping.HasField("max_new_tokens"):
        attributes["gen_ai.request.max_tokens"] = stopping.max_new_tokens
    if sampling.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = sampling.temperature
    if sampling.HasField("top_p"):
        attributes["gen_ai.request.top_p"] = sampling.top_p
    return attributes


def _usage_attributes(chat: ChatRequest, tally: Tally) -> dict:
    attributes = {
        "cloudach.outcome": billing_pb2.Outcome.Name(tally.outcome).removeprefix("OUTCOME_").lower(),
        "gen_ai.response.model": chat.model,
        "gen_ai.usage.input_tokens": tally.prompt_tokens,
        "gen_ai.usage.output_tokens": tally.completion_tokens,
    }
    if tally.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (tally.finish_reason,)
    return attributes


async def _bill(request: web.Request, principal: Principal, chat: ChatRequest, tally: Tally) -> None:
    """Puts the request's usage record in the outbox; billing_svc gets it from there."""
    started, ended = Timestamp(), Timestamp()
    started.FromMilliseconds(tally.started_at_ms)
    ended.GetCurrentTime()
    record = billing_pb2.UsageRecord(
        request_id=chat.id, key_id=principal.key_id, organization=principal.organization, model=chat.model,
        prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens, outcome=tally.outcome,
        started_at=started, ended_at=ended, time_to_first_token_ns=tally.time_to_first_token_ns,
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


async def _keepalives(response: web.StreamResponse, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await response.write(KEEPALIVE)


async def _first_message(response: web.StreamResponse, call: grpc.aio.UnaryStreamCall, keepalive_s: float):
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


async def _relay(request: web.Request, response: web.StreamResponse, call, encoder: ChunkEncoder, tally: Tally) -> pb.Finished:
    """Streams deltas as content chunks, merging them while the client's socket is backed up."""
    transport = request.transport
    state = request.app[STATE]
    message = await _first_message(response, call, state.config.keepalive_s)
    itl = state.metrics.itl.labels(encoder.model)
    last = time.monotonic()
    pending: list[str] = []
    pending_chars = 0
    while message is not grpc.aio.EOF:
        if message.HasField("finished"):
            if pending:
                await response.write(encoder.content("".join(pending)))
            # Finished is the last event: reading on to the end of the stream completes the call
            # (and the tracing interceptor's client span, which ends when the stream does).
            await call.read()
            return message.finished
        text = message.delta.text
        now = time.monotonic()
        if not tally.time_to_first_token_ns:
            tally.first_token()
        else:
            itl.observe(now - last)
        last = now
        tally.completion_tokens += message.delta.token_count
        pending.append(text)
        pending_chars += len(text)
        backed_up = transport is not None and transport.get_write_buffer_size() > 0
        if not backed_up or pending_chars >= MAX_PENDING_CHARS:
            await response.write(encoder.content(text if len(pending) == 1 else "".join(pending)))
            pending.clear()
            pending_chars = 0
        message = await call.read()
    raise Unavailable("the inference stream ended before the generation finished")


async def _stream(request: web.Request, call, chat: ChatRequest, tally: Tally) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    await response.prepare(request)
    active = request.app[STATE].metrics.active_streams
    active.inc()
    _bound_send_buffer(request, request.app[STATE].config.stream_send_buffer_bytes)
    encoder = ChunkEncoder(chat.id, chat.created, chat.model, chat.include_usage)
    try:
        await response.write(encoder.role())
        finished = await _relay(request, response, call, encoder, tally)
        tally.completion_tokens = finished.usage.completion_tokens
        tally.outcome = billing_pb2.OUTCOME_COMPLETED
        tally.finish_reason = FINISH_REASONS.get(finished.finish_reason, "stop")
        usage = usage_dict(finished.usage.prompt_tokens, finished.usage.completion_tokens)
        await response.write(encoder.finish(tally.finish_reason, usage))
        if chat.include_usage:
            await response.write(encoder.usage(usage))
        await response.write(DONE)
    except (grpc.aio.AioRpcError, Unavailable) as failure:
        # After the 200 the error travels in-band; the SDKs raise it during iteration.
        domain = error_from_rpc(failure) if isinstance(failure, grpc.aio.AioRpcError) else failure
        log.warning("stream %s failed mid-way: %s", chat.id, domain.message)
        await response.write(error_event(from_domain(domain, chat.max_tokens_name).envelope()))
    except ConnectionResetError:
        log.info("client went away during stream %s", chat.id)
        tally.outcome = billing_pb2.OUTCOME_CANCELLED_BY_CLIENT
        return response
    finally:
        active.dec()
    await response.write_eof()
    return response


def _bound_send_buffer(request: web.Request, size: int) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and size > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


async def _complete(call, chat: ChatRequest, tally: Tally) -> web.Response:
    parts: list[str] = []
    finished = None
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.HasField("finished"):
            finished = message.finished
        else:
            if not tally.time_to_first_token_ns:
                tally.first_token()
            tally.completion_tokens += message.delta.token_count
            parts.append(message.delta.text)
    if finished is None:
        raise Unavailable("the inference stream ended before the generation finished")
    tally.completion_tokens = finished.usage.completion_tokens
    tally.outcome = billing_pb2.OUTCOME_COMPLETED
    tally.finish_reason = FINISH_REASONS.get(finished.finish_reason, "stop")
    body = {
        "id": chat.id,
        "object": "chat.completion",
        "created": chat.created,
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                "logprobs": None,
                "finish_reason": tally.finish_reason,
            }
        ],
        "usage": usage_dict(finished.usage.prompt_tokens, finished.usage.completion_tokens),
    }
    return web.Response(body=json.dumps(body, ensure_ascii=False).encode(), content_type="application/json")


__all__ = ["ApiError", "create_chat_completion", "parse_chat_request"]
