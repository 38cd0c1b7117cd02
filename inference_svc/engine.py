"""The seam between inference_svc and whatever generates tokens.

Nothing below it knows gRPC callers or chat messages; nothing above it knows Triton. The real
engine is TritonEngine (triton_engine.py); tests may put a fake with knobs behind the same seam.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Step:
    """New tokens of one generated sequence (one choice of a request asking for several)."""

    token_ids: list[int]
    #: which sequence, 0 to n - 1
    index: int = 0
    #: each token's log probability, when the request asked for them
    log_probs: list[float] | None = None
    #: for each token, the most likely alternatives as (token id, log probability), best first
    top_log_probs: list[list[tuple[int, float]]] | None = None
    #: in a request's first step: how many of its prompt tokens the model served from reused KV
    #: cells (a cached prefix) rather than evaluating them
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    model: str  # the registry's (public) model id; the engine knows how it runs it
    input_ids: list[int]
    max_new_tokens: int
    #: the tokens that end the model's turn
    stop_token_ids: tuple[int, ...]
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: no cut
    seed: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: (token id, bias) pairs added to the logits before sampling, checked already
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: structured output: (json | json_schema | regex | ebnf_grammar, its text), checked already
    guide: tuple[str, str] | None = None
    #: sequences generated from the one prompt (OpenAI's n)
    n: int = 1
    #: whether each token's log probability is returned, and how many alternatives with it
    log_probs: bool = False
    top_log_probs: int = 0
    #: W3C trace context for the backend's own spans (traceparent, tracestate)
    trace_headers: Mapping[str, str] = field(default_factory=dict)


class Engine(Protocol):
    def generate(self, request: EngineRequest) -> AsyncIterator[Step]:
        """Yields each sequence's new tokens, step by step, until every sequence has finished.

        Closing the iterator early (or cancelling the task reading it) cancels the generation in
        the model. Failures raise cloudach.errors exceptions (Unavailable, ResourceExhausted...).
        """

    async def model_ready(self, model: str) -> bool:
        """Whether the model (a registry id) can take requests now."""

    async def close(self) -> None: ...
