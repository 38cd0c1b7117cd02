"""One generation: a GenerateRequest validated into a plan, then streamed as protobuf events."""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from cloudach.errors import DeadlineExceeded, InvalidArgument
from cloudach.inference.v1 import inference_pb2 as pb
from inference_svc.engine import Engine, EngineRequest
from inference_svc.guides import check_guide
from inference_svc.registry import ModelRegistry, ModelSpec
from inference_svc.templates import Message
from inference_svc.textstream import IncrementalDetokenizer, StopMatcher

ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_DEVELOPER: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
}
MAX_STOP_SEQUENCES = 4
MAX_STOP_SEQUENCE_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
#: bounds the work of one request's bias (OpenAI publishes no limit; this is generous)
MAX_LOGIT_BIAS_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class Plan:
    spec: ModelSpec
    engine_request: EngineRequest
    stop_sequences: tuple[str, ...]

    @property
    def prompt_tokens(self) -> int:
        return len(self.engine_request.input_ids)


def _check_range(value: float, low: float, high: float, param: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{value:g} is not a valid value for '{param}': expected {low:g} to {high:g}.", param=param)


def _logit_bias(s: pb.SamplingParameters, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if len(s.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidArgument(f"logit_bias may name at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(s.logit_bias)}",
                              param="sampling.logit_bias")
    for token, bias in s.logit_bias.items():
        if token >= vocab_size:
            raise InvalidArgument(f"Invalid key in 'logit_bias': {token}. The model's token ids are 0 to "
                                  f"{vocab_size - 1}.", param="sampling.logit_bias")
        _check_range(bias, -100.0, 100.0, "sampling.logit_bias")
    return tuple(sorted(s.logit_bias.items()))


def plan_generation(
    request: pb.GenerateRequest, registry: ModelRegistry, trace_headers: Mapping[str, str] = {}
) -> Plan:
    """Validates the request (InvalidArgument names the field), renders and tokenizes the chat."""
    if not request.model:
        raise InvalidArgument("you must provide a model parameter", param="model")
    spec = registry.get(request.model)
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters", param="request_id")
    if not request.messages:
        raise InvalidArgument("messages must hold at least one message", param="messages")
    messages = []
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role is not a valid role", param=f"messages[{i}].role")
        messages.append(Message(ROLES[m.role], m.content))

    s = request.sampling
    temperature = s.temperature if s.HasField("temperature") else spec.default_temperature
    top_p = s.top_p if s.HasField("top_p") else spec.default_top_p
    _check_range(temperature, 0.0, 2.0, "sampling.temperature")
    _check_range(top_p, 0.0, 1.0, "sampling.top_p")
    _check_range(s.presence_penalty, -2.0, 2.0, "sampling.presence_penalty")
    _check_range(s.frequency_penalty, -2.0, 2.0, "sampling.frequency_penalty")
    logit_bias = _logit_bias(s, spec.tokenizer.vocab_size)

    stopping = request.stopping
    stops = tuple(stopping.stop_sequences)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stopping.stop_sequences")
    for i, stop in enumerate(stops):
        if not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(
                f"stop sequences must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters long",
                param=f"stopping.stop_sequences[{i}]",
            )

    prompt_ids = spec.encode_chat(messages)
    room = spec.context_window - len(prompt_ids)
    if stopping.HasField("max_new_tokens"):
        max_new = stopping.max_new_tokens
        if not 1 <= max_new <= spec.max_output_tokens:
            raise InvalidArgument(
                f"max_new_tokens must be between 1 and {spec.max_output_tokens} for {spec.id}, got {max_new}",
                param="stopping.max_new_tokens",
            )
    else:
        max_new = min(spec.default_max_tokens, room) if room > 0 else 1
    if len(prompt_ids) + max_new > spec.context_window:
        raise InvalidArgument(
            f"This model's maximum context length is {spec.context_window} tokens. However, you "
            f"requested {len(prompt_ids) + max_new} tokens ({len(prompt_ids)} in the messages, "
            f"{max_new} in the completion). Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )

    engine_request = EngineRequest(
        request_id=request.request_id or f"gen-{uuid.uuid4().hex}",
        model=spec.id,
        input_ids=prompt_ids,
        max_new_tokens=max_new,
        stop_token_ids=tuple(sorted(spec.stop_token_ids)),
        temperature=temperature,
        top_p=top_p,
        top_k=s.top_k,
        # Always explicit, so a backend whose default seed is fixed still varies between requests.
        seed=s.seed if s.HasField("seed") else secrets.randbits(63),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logit_bias=logit_bias,
        guide=check_guide(request.guide),
        trace_headers=dict(trace_headers),
    )
    return Plan(spec=spec, engine_request=engine_request, stop_sequences=stops)


@dataclass(slots=True)
class Outcome:
    """What a finished generation amounted to (for logs and metrics)."""

    completion_tokens: int = 0
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    time_to_first_token_ns: int = 0


async def stream_generation(
    plan: Plan,
    engine: Engine,
    max_request_s: float,
    outcome: Outcome | None = None,
    clock: Callable[[], int] = time.monotonic_ns,
) -> AsyncIterator[pb.GenerateResponse]:
    """TokenDelta events as text becomes final, then exactly one Finished event."""
    outcome = outcome if outcome is not None else Outcome()
    start = clock()
    deadline = start + int(max_request_s * 1e9)
    request = plan.engine_request
    end_ids = plan.spec.stop_token_ids
    detokenizer = IncrementalDetokenizer(plan.spec.tokenizer.token_bytes)
    stops = StopMatcher(plan.stop_sequences)
    generated = unreported = 0
    matched: str | None = None
    ended_by_model = False

    async with aclosing(engine.generate(request)) as steps:
        async for ids in steps:
            if not ids:
                continue
            if len(ids) > request.max_new_tokens - generated:
                ids = ids[: request.max_new_tokens - generated]  # never more than asked, whatever the backend does
            if not outcome.time_to_first_token_ns:
                outcome.time_to_first_token_ns = clock() - start
            cut = next((i for i, t in enumerate(ids) if t in end_ids), -1)
            visible = ids if cut < 0 else ids[:cut]
            counted = len(ids) if cut < 0 else cut + 1
            generated += counted
            unreported += counted
            text, matched = stops.push(detokenizer.push(visible)) if visible else ("", None)
            if text:
                yield pb.GenerateResponse(delta=pb.TokenDelta(text=text, token_count=unreported))
                unreported = 0
            if matched is not None or cut >= 0:
                ended_by_model = cut >= 0
                break
            if generated >= request.max_new_tokens:
                break
            if clock() > deadline:
                raise DeadlineExceeded(f"generation ran past the {max_request_s:g}s limit")
        # Leaving the block closes the engine's stream: after a stop sequence that cancels the model.

    if matched is None:
        tail, matched = stops.push(detokenizer.flush())
        tail += "" if matched is not None else stops.flush()
        if tail:
            yield pb.GenerateResponse(delta=pb.TokenDelta(text=tail, token_count=unreported))
    length_reached = generated >= request.max_new_tokens and matched is None and not ended_by_model
    outcome.completion_tokens = generated
    outcome.finish_reason = pb.FINISH_REASON_LENGTH if length_reached else pb.FINISH_REASON_STOP
    yield pb.GenerateResponse(
        finished=pb.Finished(
            finish_reason=outcome.finish_reason,
            usage=pb.Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=generated),
            timing=pb.Timing(time_to_first_token_ns=outcome.time_to_first_token_ns, total_ns=clock() - start),
            matched_stop_sequence=matched or "",
        )
    )
