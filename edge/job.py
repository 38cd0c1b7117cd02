"""What an endpoint hands the shared serving path: a Job (the GenerateRequests to run and how to
answer them), the Choice and Tally it fills, and the ResponseFormat that gives its wire shapes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace

from cloudach.billing.v1 import billing_pb2
from cloudach.errors import MAX_MODEL_ID_CHARS, model_not_found
from cloudach.inference.v1 import inference_pb2 as pb
from edge import params
from edge.errors import from_domain

FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}  # else "stop"


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
        for generate in generates:
            # inference_svc reports each generation under the response's id too: if this edge
            # dies holding the stream, billing_svc still learns what the model generated.
            generate.usage_id = completion_id
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
    #: of prompt_tokens, those the model served from a cached prefix
    cached_tokens: int = 0
    #: inference_svc accepted it: from here on it is billed, whatever happens
    accepted: bool = False
    outcome: int = billing_pb2.OUTCOME_FAILED_MID_STREAM
    started_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    started_ns: int = field(default_factory=time.monotonic_ns)
    time_to_first_token_ns: int = 0
    finish_reason: str = ""
    #: its usage record is in the outbox (a completed stream's is written before its [DONE])
    recorded: bool = False

    def first_token(self) -> None:
        self.time_to_first_token_ns = time.monotonic_ns() - self.started_ns
        trace.get_current_span().add_event("gen_ai.first_token")

    def finished(self, finished: pb.Finished) -> None:
        """The generation completed: its usage as inference_svc counted it (every call's, merged)."""
        self.completion_tokens = finished.usage.completion_tokens
        self.cached_tokens = finished.usage.cached_tokens
        self.outcome = billing_pb2.OUTCOME_COMPLETED
        self.finish_reason = FINISH_REASONS.get(finished.finish_reason, "stop")
