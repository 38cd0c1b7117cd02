"""One generation: a GenerateRequest validated into a plan, then streamed as protobuf events."""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from cloudach.errors import DeadlineExceeded, InvalidArgument, Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from inference_svc.engine import Engine, EngineRequest, Step
from inference_svc.guides import check_guide
from inference_svc.registry import ModelRegistry, ModelSpec
from inference_svc.templates import Message
from inference_svc.textstream import IncrementalDetokenizer, StopMatcher
from inference_svc.tools import CallParser, ToolPlan, check_tools

ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_DEVELOPER: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}
MAX_STOP_SEQUENCES = 4
MAX_STOP_SEQUENCE_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
#: bounds the work of one request's bias (OpenAI publishes no limit; this is generous)
MAX_LOGIT_BIAS_TOKENS = 1024
#: OpenAI's limit on top_logprobs
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class Plan:
    spec: ModelSpec
    engine_request: EngineRequest
    stop_sequences: tuple[str, ...]
    #: the request's tools, when the model is to see them
    tools: ToolPlan | None = None

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


def prompt_chars(request: pb.GenerateRequest) -> int:
    """The characters the prompt will be made of, before the template: the measure of its tokenizing cost."""
    return (len(request.prompt) + sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in request.messages)
            + sum(len(t.description) + len(t.parameters_json) for t in request.tools))


def _prompt_ids(request: pb.GenerateRequest, spec: ModelSpec, tools: ToolPlan | None) -> list[int]:
    """The prompt's token ids: the chat rendered with the model's template, or the raw prompt."""
    if request.HasField("prompt"):
        if request.messages:
            raise InvalidArgument("give either messages or a prompt, not both", param="prompt")
        if request.tools:
            raise InvalidArgument("tools need messages, not a prompt", param="tools")
        ids = spec.encode_prompt(request.prompt)
        if not ids:
            raise InvalidArgument("the prompt must not be empty", param="prompt")
        return ids
    if not request.messages:
        raise InvalidArgument("messages must hold at least one message", param="messages")
    messages = []
    calls: set[str] = set()
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role is not a valid role", param=f"messages[{i}].role")
        if m.role == pb.ROLE_TOOL and m.tool_call_id not in calls:
            raise InvalidArgument(f"Invalid parameter: messages[{i}] with role 'tool' must be a response to a "
                                  f"preceding message with 'tool_calls' (no call has the id {m.tool_call_id!r}).",
                                  param=f"messages[{i}].tool_call_id")
        calls.update(c.id for c in m.tool_calls)
        messages.append(Message(ROLES[m.role], m.content, tuple(m.tool_calls)))
    return spec.encode_chat(messages, request.tools if tools is not None else ())


def plan_generation(
    request: pb.GenerateRequest, registry: ModelRegistry, trace_headers: Mapping[str, str] = {}
) -> Plan:
    """Validates the request (InvalidArgument names the field), renders and tokenizes the chat."""
    if not request.model:
        raise InvalidArgument("you must provide a model parameter", param="model")
    spec = registry.get(request.model)
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters", param="request_id")
    n = request.n or 1
    if n > spec.max_choices:
        raise InvalidArgument(f"{n} is greater than the maximum of {spec.max_choices} for 'n' with {spec.id}.",
                              param="n", code="invalid_value")
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"{request.top_logprobs} is greater than the maximum of {MAX_TOP_LOGPROBS} for "
                              "'top_logprobs'.", param="top_logprobs", code="invalid_value")
    if request.top_logprobs and not request.logprobs:
        raise InvalidArgument("'logprobs' must be set to true when 'top_logprobs' is used.", param="top_logprobs")

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

    tools = check_tools(request, spec.tool_format)
    guide = check_guide(request.guide)
    if tools is not None and tools.guide is not None:
        if guide is not None:
            raise InvalidArgument("a structured-output guide cannot be combined with a forced tool call",
                                  param="tool_choice")
        guide = tools.guide
    if prompt_chars(request) > spec.context_window * spec.longest_token_bytes:
        # No token holds more than longest_token_bytes characters: this cannot fit, and
        # tokenizing megabytes to find that out would only cost time.
        raise InvalidArgument(
            f"This model's maximum context length is {spec.context_window} tokens. However, your messages are "
            f"{prompt_chars(request)} characters long, more than {spec.context_window} tokens can hold. Please "
            "reduce the length of the messages.", param="messages", code="context_length_exceeded")
    prompt_ids = _prompt_ids(request, spec, tools)
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

    budget = spec.max_request_tokens or spec.context_window * spec.max_choices
    if len(prompt_ids) + n * max_new > budget:
        raise InvalidArgument(
            f"{n} choices of up to {max_new} tokens each, after a prompt of {len(prompt_ids)} tokens, need "
            f"{len(prompt_ids) + n * max_new} tokens of the model's memory; {spec.id} gives one request at most "
            f"{budget}. Ask for fewer choices or fewer tokens.", param="n", code="invalid_value")

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
        guide=guide,
        n=n,
        log_probs=request.logprobs,
        top_log_probs=request.top_logprobs,
        trace_headers=dict(trace_headers),
    )
    return Plan(spec=spec, engine_request=engine_request, stop_sequences=stops, tools=tools)


@dataclass(slots=True)
class Outcome:
    """What a generation amounted to (for logs, metrics and its usage report); completion_tokens
    counts the tokens the model has generated so far, so it is right for a cut stream too."""

    completion_tokens: int = 0
    #: prompt tokens the model served from a cached prefix (its count, not ours)
    cached_tokens: int = 0
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    time_to_first_token_ns: int = 0


def _log_prob(token_bytes: bytes, log_prob: float) -> pb.TokenLogProb:
    return pb.TokenLogProb(token=token_bytes.decode("utf-8", "backslashreplace"), logprob=log_prob, bytes=token_bytes)


class _Choice:
    """One sequence of a generation: its tokens detokenized, cut at stop sequences, counted, read
    for tool calls when the model has tools, and (when asked) its log probs released with the
    text they complete."""

    __slots__ = ("index", "_plan", "_table", "_detokenizer", "_stops", "generated", "_unreported", "matched",
                 "_ended_by_model", "done", "finish_reason", "_pending", "_pending_bytes", "_emitted_bytes",
                 "_calls", "_carried")

    def __init__(self, index: int, plan: Plan) -> None:
        self.index = index
        self._plan = plan
        self._table = plan.spec.tokenizer.token_bytes
        self._detokenizer = IncrementalDetokenizer(self._table)
        self._stops = StopMatcher(plan.stop_sequences)
        self.generated = self._unreported = 0
        self.matched: str | None = None
        self._ended_by_model = False
        self.done = False
        self.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        #: log probs of tokens whose text has not all been sent, with the bytes up to each one's end
        self._pending: list[tuple[pb.TokenLogProb, int]] = []
        self._pending_bytes = self._emitted_bytes = 0
        self._calls = CallParser(plan.tools) if plan.tools is not None else None
        #: log probs released while the call parser held their text back
        self._carried: list[pb.TokenLogProb] = []

    def push(self, step: Step) -> list[pb.TokenDelta]:
        request = self._plan.engine_request
        ids = step.token_ids[: request.max_new_tokens - self.generated]  # never more than asked
        cut = next((i for i, t in enumerate(ids) if t in self._plan.spec.stop_token_ids), -1)
        visible = ids if cut < 0 else ids[:cut]
        counted = len(ids) if cut < 0 else cut + 1
        self.generated += counted
        self._unreported += counted
        if request.log_probs and visible:
            self._hold_log_probs(step, visible)
        text, self.matched = self._stops.push(self._detokenizer.push(visible)) if visible else ("", None)
        if self.matched is not None or cut >= 0:
            self._ended_by_model = cut >= 0
            self.done = True
        elif self.generated >= request.max_new_tokens:
            self.done = True
        return self._delta(text)

    def finish(self) -> tuple[list[pb.TokenDelta], pb.ChoiceFinished]:
        """What is left of the text once the sequence has ended, and the choice's end."""
        tail = ""
        if self.matched is None:
            tail, self.matched = self._stops.push(self._detokenizer.flush())
            tail += "" if self.matched is not None else self._stops.flush()
        deltas = self._delta(tail, final=self.matched is None, last=True)
        self.done = True
        length = self.generated >= self._plan.engine_request.max_new_tokens and self.matched is None
        self.finish_reason = pb.FINISH_REASON_LENGTH if length and not self._ended_by_model else pb.FINISH_REASON_STOP
        if (self.finish_reason == pb.FINISH_REASON_STOP and self._calls is not None and self._calls.calls
                and self._plan.tools.mode != pb.ToolChoice.MODE_FUNCTION):
            self.finish_reason = pb.FINISH_REASON_TOOL_CALLS  # OpenAI: a named tool_choice ends as "stop"
        return deltas, pb.ChoiceFinished(index=self.index, finish_reason=self.finish_reason,
                                        completion_tokens=self.generated,
                                        matched_stop_sequence=self.matched or "")

    def _hold_log_probs(self, step: Step, visible: list[int]) -> None:
        if step.log_probs is None or len(step.log_probs) < len(visible):
            raise Unavailable("the model returned no log probs for a request that asked for them")
        tops = step.top_log_probs or ()
        for i, token in enumerate(visible):
            entry = _log_prob(self._table[token], step.log_probs[i])
            if self._plan.engine_request.top_log_probs and i < len(tops):
                entry.top_logprobs.extend(_log_prob(self._table[t], lp) for t, lp in tops[i])
            self._pending_bytes += len(entry.bytes)
            self._pending.append((entry, self._pending_bytes))

    def _delta(self, text: str, final: bool = False, last: bool = False) -> list[pb.TokenDelta]:
        """The deltas for text now final: one, or (with tools) what the call parser makes of it.
        The first carries the token count and log probs since the previous one."""
        released: list[pb.TokenLogProb] = []
        if self._plan.engine_request.log_probs:
            self._emitted_bytes += len(text.encode())
            done = len(self._pending) if final else next(
                (i for i, (_, end) in enumerate(self._pending) if end > self._emitted_bytes), len(self._pending))
            released = [entry for entry, _ in self._pending[:done]]
            del self._pending[:done]
        if self._calls is None:  # the common case, once per token: one message, built once
            if not text and not released:
                return []
            delta = pb.TokenDelta(text=text, token_count=self._unreported, index=self.index, logprobs=released)
            self._unreported = 0
            return [delta]
        # With tools: what the call parser makes of the text; log probs ride on its first delta.
        deltas = self._calls.push(text) if text else []
        if last:
            deltas += self._calls.flush()
        self._carried += released
        if not deltas and last and self._carried:
            deltas = [pb.TokenDelta()]  # the last log probs, whose text the parser kept
        if not deltas:
            return []
        released, self._carried = self._carried, []
        first = deltas[0]
        first.token_count = self._unreported
        first.logprobs.extend(released)
        for delta in deltas:
            delta.index = self.index
        self._unreported = 0
        return deltas


async def stream_generation(
    plan: Plan,
    engine: Engine,
    max_request_s: float,
    outcome: Outcome | None = None,
    clock: Callable[[], int] = time.monotonic_ns,
) -> AsyncIterator[pb.GenerateResponse]:
    """TokenDelta events as each choice's text becomes final, a ChoiceFinished event as each one
    ends, then exactly one Finished event."""
    outcome = outcome if outcome is not None else Outcome()
    start = clock()
    deadline = start + int(max_request_s * 1e9)
    request = plan.engine_request
    choices = [_Choice(i, plan) for i in range(request.n)]
    running = len(choices)
    told_cached = False

    def told(delta: pb.TokenDelta) -> pb.GenerateResponse:
        """The request's first delta carries the prompt's cached tokens (for a stream cut later)."""
        nonlocal told_cached
        if not told_cached:
            delta.cached_tokens, told_cached = outcome.cached_tokens, True
        return pb.GenerateResponse(delta=delta)

    def end(choice: _Choice):
        nonlocal running
        running -= 1
        deltas, finished = choice.finish()
        for delta in deltas:
            yield told(delta)
        yield pb.GenerateResponse(choice_finished=finished)

    async with aclosing(engine.generate(request)) as steps:
        async for step in steps:
            if not step.token_ids:
                continue
            if not 0 <= step.index < len(choices):
                raise Unavailable(f"the model returned sequence {step.index} of a request for {len(choices)}")
            choice = choices[step.index]
            if choice.done:
                continue  # ended by a stop sequence while the model went on
            if not outcome.time_to_first_token_ns:
                outcome.time_to_first_token_ns = clock() - start
                outcome.cached_tokens = min(step.cached_tokens, plan.prompt_tokens)
            counted = choice.generated
            deltas = choice.push(step)
            outcome.completion_tokens += choice.generated - counted  # so far: a cut stream's report
            for delta in deltas:
                yield told(delta)
            if choice.done:
                for event in end(choice):
                    yield event
                if not running:
                    break
            if clock() > deadline:
                raise DeadlineExceeded(f"generation ran past the {max_request_s:g}s limit")
        # Leaving the block closes the engine's stream: after a stop sequence that cancels the model.

    for choice in choices:
        if not choice.done:  # the model ended it (its context window, say) without an end token
            for event in end(choice):
                yield event
    first = choices[0]
    outcome.finish_reason = first.finish_reason
    yield pb.GenerateResponse(
        finished=pb.Finished(
            finish_reason=outcome.finish_reason,
            usage=pb.Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=outcome.completion_tokens,
                           cached_tokens=outcome.cached_tokens),
            timing=pb.Timing(time_to_first_token_ns=outcome.time_to_first_token_ns, total_ns=clock() - start),
            matched_stop_sequence=first.matched or "",
        )
    )
