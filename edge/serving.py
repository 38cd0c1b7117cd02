"""What chat and legacy completions share: admission and limits, the inference_svc calls, and the
settlement of usage (limits and the bill); the relay of the answer is edge.relay's.

An endpoint parses its request into a Job (edge.job: the GenerateRequests to run and how to
answer) and hands it to `serve`; its ResponseFormat turns choices into its chunks and bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate, trace

from cloudach.billing.v1 import billing_pb2
from cloudach.errors import Unavailable
from edge.auth import Principal
from edge.budgets import Budgets, Hold
from edge.errors import ApiError
from edge.http import read_json_object
from edge.job import Job, Tally
from edge.ratelimit import Decision, Limiter, Quota, headers, refusal
from edge.relay import Merged, complete, stream
from edge.state import MAX_TOKENS_NAME, MODEL, PRINCIPAL, RATE_HEADERS, STATE, EdgeState

log = logging.getLogger(__name__)


def _reservation(job: Job, default_output_tokens: int) -> tuple[int, int]:
    """Prompt and output tokens held against the key's limits until the real usage is known: about
    four characters a token for the prompt (plus each message's framing), and the most every choice
    may use."""
    stopping = job.generates[0].stopping
    output = stopping.max_new_tokens if stopping.HasField("max_new_tokens") else default_output_tokens
    messages = sum(len(g.messages) for g in job.generates)
    return job.prompt_chars // 4 + 4 * messages, output * job.choices


def _check_model_allowed(principal: Principal, model: str) -> None:
    if principal.allowed_models and model not in principal.allowed_models:
        # Waiting will not help: tell the SDKs not to retry.
        raise ApiError(403, f"This API key is not allowed to use the model `{model}`.",
                       code="model_not_allowed", headers={"x-should-retry": "false"})


async def serve(request: web.Request, parse) -> web.StreamResponse:
    """Runs one HTTP request end to end; parse(body) -> Job raises ApiError for bad input."""
    state = request.app[STATE]
    principal = request[PRINCIPAL]
    # The metrics' model label: only a model inference_svc served, so made-up names add no series.
    request[MODEL] = "unknown"
    try:
        job = parse(await read_json_object(request))
        request[MAX_TOKENS_NAME] = job.max_tokens_name
        _check_model_allowed(principal, job.model)
    except ApiError:
        # A refused request still spends a request, as OpenAI counts failed requests.
        decision = await state.limiter.admit(principal.key_id, Quota(principal.requests_per_minute, 0, 0), "", 0, 0)
        request[RATE_HEADERS] = headers(decision)
        raise
    return await run(state, principal, job, request)


async def run(state: EdgeState, principal: Principal, job: Job, request: web.Request | None = None,
              batch_id: str = "") -> web.StreamResponse:
    """Admission, limits and budget, the inference_svc calls, the answer and the settlement of one
    parsed request. request: the HTTP request it answers (None: a batch job's request, answered
    whole and outside the key's rate limits, its usage billed as the batch's)."""
    config = state.config
    note = request.__setitem__ if request is not None else (lambda key, value: None)
    if request is None:
        _check_model_allowed(principal, job.model)  # serve() did it for an HTTP request
    quota = (Quota(principal.requests_per_minute, principal.tokens_per_minute, principal.max_concurrent_streams)
             if request is not None else Quota(0, 0, 0))
    prompt_reserved, output_reserved = _reservation(job, config.default_reserved_output_tokens)
    reserved = prompt_reserved + output_reserved
    span = trace.get_current_span()
    span.set_attributes(_request_attributes(job, principal))
    decision = await admit(state.limiter, principal.key_id, quota, job.id, reserved, config.request_timeout_s)
    note(RATE_HEADERS, headers(decision))
    if not decision.allowed:
        state.metrics.rejections.labels(f"rate_limit_{decision.refused_by}").inc()
        raise refusal(decision, quota)
    try:
        hold = await hold_budget(state.budgets, principal, job.model, prompt_reserved, output_reserved, bool(batch_id))
    except BaseException as failure:
        if isinstance(failure, ApiError) and failure.code == "insufficient_quota":
            state.metrics.rejections.labels("budget").inc()
        await asyncio.shield(_give_back_admission(state.limiter, principal.key_id, quota, job.id, reserved))
        raise
    tally = Tally()
    try:
        with state.admission:
            # The channel's tracing interceptor passes this request's trace context on.
            calls = [state.generate.Generate(g, timeout=config.request_timeout_s, metadata=principal.grpc_metadata)
                     for g in job.generates]
            merged = None
            try:
                # The calls run at once; their first events are read in turn (a refusal raises).
                for call in calls:
                    tally.prompt_tokens += await _accepted(call)
                    # From the first acceptance on, the request is recorded whatever happens next
                    # (a later prompt refused: failed, at zero), as inference_svc reports it too.
                    tally.accepted = True
                note(MODEL, job.model)
                events = calls[0] if len(calls) == 1 else (merged := Merged(calls, job.n))
                if job.stream and request is not None:
                    return await stream(request, events, job, tally,
                                        lambda: _bill(state, principal, job, tally, batch_id))
                return await complete(events, job, tally)
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
        await asyncio.shield(_settle(state, principal, job, tally, quota, reserved, hold, batch_id))


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
        await _give_back_admission(limiter, key_id, quota, request_id, reserved)


async def hold_budget(budgets: Budgets, principal: Principal, model: str, prompt: int, output: int,
                      batch: bool = False) -> Hold | None:
    """The request's budget hold (insufficient_quota raises). A request cancelled while it is taken
    gives back whatever it took, as admit() does."""
    holding = asyncio.ensure_future(budgets.hold(principal, model, prompt, output, batch))
    try:
        return await asyncio.shield(holding)
    except asyncio.CancelledError:
        async def undo() -> None:
            with contextlib.suppress(Exception):
                await budgets.settle(await holding, model, "failed_mid_stream", 0, 0, 0)

        await asyncio.shield(undo())
        raise


async def _give_back_admission(limiter: Limiter, key_id: str, quota: Quota, request_id: str, reserved: int) -> None:
    """An admitted request that will not run: its tokens and its concurrency lease go back."""
    await limiter.settle(key_id, quota, reserved, 0, request_id)
    await limiter.release(key_id, request_id)


async def _settle(state: EdgeState, principal: Principal, job: Job, tally: Tally,
                  quota: Quota, reserved: int, hold: Hold | None, batch_id: str) -> None:
    limiter = state.limiter
    # An unaccepted request cost nothing; an accepted one what billing will price it at.
    outcome = billing_pb2.Outcome.Name(tally.outcome).removeprefix("OUTCOME_").lower() if tally.accepted \
        else "failed_mid_stream"
    await state.budgets.settle(hold, job.model, outcome, tally.prompt_tokens, tally.completion_tokens,
                               tally.cached_tokens, batch=bool(batch_id))
    if tally.accepted:
        state.metrics.output_tokens.labels(job.model).inc(tally.completion_tokens)
        if tally.time_to_first_token_ns:
            state.metrics.ttft.labels(job.model).observe(tally.time_to_first_token_ns / 1e9)
        if not tally.recorded:
            await _bill(state, principal, job, tally, batch_id)
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
        "gen_ai.usage.cache_read.input_tokens": tally.cached_tokens,
    }
    if tally.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (tally.finish_reason,)
    return attributes


async def _bill(state: EdgeState, principal: Principal, job: Job, tally: Tally, batch_id: str) -> None:
    """Puts the request's usage record in the outbox (once); billing_svc gets it from there."""
    started, ended = Timestamp(), Timestamp()
    started.FromMilliseconds(tally.started_at_ms)
    ended.GetCurrentTime()
    record = billing_pb2.UsageRecord(
        request_id=job.id, key_id=principal.key_id, organization=principal.organization, model=job.model,
        prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens,
        cached_tokens=tally.cached_tokens, outcome=tally.outcome,
        started_at=started, ended_at=ended, time_to_first_token_ns=tally.time_to_first_token_ns, user=job.user,
        batch_id=batch_id,
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the delivery, later, joins this request's trace
    try:
        await state.outbox.add(record, carrier.get("traceparent", ""))
    except Exception:  # noqa: BLE001 - the one loss we cannot prevent: say it loudly, with what it was
        log.exception("USAGE RECORD NOT STORED: %s", record)
        return
    tally.recorded = True
    state.outbox_wake.set()


async def _accepted(call: grpc.aio.UnaryStreamCall) -> int:
    """Waits for inference_svc to accept the request (its first event): the prompt's tokens. A
    refusal raises its gRPC error, which the error middleware answers."""
    first = await call.read()
    if first is grpc.aio.EOF or not first.HasField("accepted"):
        raise Unavailable("inference_svc's stream did not begin with Accepted")
    return first.accepted.prompt_tokens
