"""The InferenceService gRPC servicer: admission, then plan_generation and stream_generation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cloudach.billing.v1 import billing_pb2 as bpb
from cloudach.errors import ResourceExhausted, Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.inference.v1 import inference_pb2_grpc
from inference_svc.mux import generate_many
from inference_svc.config import InferenceConfig
from inference_svc.engine import Engine
from inference_svc.generation import Outcome, plan_generation, prompt_chars, stream_generation
from inference_svc.registry import ModelRegistry
from inference_svc.reports import Report, usage_report
from cloudach.rpc.auth import require
from cloudach.tokens import INFERENCE, TokenVerifier

log = logging.getLogger(__name__)
#: prompts longer than this (characters) are tokenized off the event loop (about 10 ms of work)
OFF_LOOP_CHARS = 16 * 1024


def trace_headers() -> dict[str, str]:
    """This call's W3C trace context (its server span, child of the caller's), for the engine."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram("cloudach_inference_time_to_first_token_seconds", "From arrival to the first token",
                              ["model"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=registry)
        self.output_tokens = Counter("cloudach_inference_output_tokens_total", "Tokens generated", ["model"], registry=registry)
        self.active = Gauge("cloudach_inference_active_streams", "Generations in progress", registry=registry)
        self.rejected = Counter("cloudach_inference_admission_rejections_total", "Streams refused at capacity", registry=registry)
        self.outbox_depth = Gauge("cloudach_inference_usage_outbox_depth", "Generation reports waiting for billing_svc",
                                  registry=registry)
        self.outbox_set_aside = Counter("cloudach_inference_usage_outbox_set_aside_total",
                                        "Generation reports billing_svc kept refusing, set aside", registry=registry)


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, engine: Engine, config: InferenceConfig,
                 metrics: InferenceMetrics | None = None, report: Report | None = None,
                 verifier: TokenVerifier | None = None, observe=None) -> None:
        """verifier checks the tokens of calls carried by GenerateMany; observe gives each its
        span and counts (RpcObservability.observing)."""
        self._verifier, self._observe = verifier, observe
        #: set as the server begins to stop: GenerateMany refuses new calls (gRPC refuses new RPCs)
        self.draining = False
        self._registry = registry
        self._engine = engine
        self._config = config
        #: where the usage of a generation run for a billing caller (usage_id set) is reported
        self._report = report
        self._metrics = metrics or InferenceMetrics(CollectorRegistry())
        self._active = 0
        #: usage reports being written
        self._reporting: set[asyncio.Task] = set()

    @property
    def active_streams(self) -> int:
        return self._active

    async def reports_written(self, timeout_s: float = 10.0) -> None:
        """Waits (bounded) for the usage reports being written: before the outbox closes at shutdown."""
        deadline = time.monotonic() + timeout_s
        while (self._active or self._reporting) and time.monotonic() < deadline:
            if self._reporting:
                await asyncio.wait(set(self._reporting), timeout=max(0.0, deadline - time.monotonic()))
            else:
                await asyncio.sleep(0.05)  # a generation cancelled by the server's stop is ending

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        claims = require(INFERENCE)
        if self._active >= self._config.max_concurrent_streams:
            self._metrics.rejected.inc()
            raise ResourceExhausted(
                f"inference_svc is at capacity ({self._config.max_concurrent_streams} streams); retry shortly",
                code="server_overloaded",
            )
        self._active += 1
        self._metrics.active.inc()
        outcome = Outcome()
        plan = None
        accepted_at_ms = 0
        result = bpb.OUTCOME_FAILED_MID_STREAM
        try:
            if prompt_chars(request) > OFF_LOOP_CHARS:
                # Tokenizing a long prompt takes long (a megabyte: ~0.6 s); on the event loop it
                # would stall every other stream. The tokenizers release the GIL while they run.
                plan = await asyncio.to_thread(plan_generation, request, self._registry, trace_headers())
            else:
                plan = plan_generation(request, self._registry, trace_headers())
            span = trace.get_current_span()
            span.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.request.model": plan.spec.id,
                "gen_ai.request.max_tokens": plan.engine_request.max_new_tokens,
                "gen_ai.usage.input_tokens": plan.prompt_tokens, "cloudach.request_id": plan.engine_request.request_id,
            })
            # Accepted: the caller may commit to a successful response before the first token.
            accepted_at_ms = int(time.time() * 1000)
            yield pb.GenerateResponse(accepted=pb.Accepted(prompt_tokens=plan.prompt_tokens))
            first = True
            async for event in stream_generation(plan, self._engine, self._config.max_request_s, outcome):
                if first and event.HasField("delta"):
                    span.add_event("gen_ai.first_token")
                    first = False
                if event.HasField("finished"):
                    result = bpb.OUTCOME_COMPLETED
                yield event
            span.set_attributes({
                "gen_ai.usage.output_tokens": outcome.completion_tokens,
                "gen_ai.response.finish_reasons": (pb.FinishReason.Name(outcome.finish_reason).removeprefix("FINISH_REASON_").lower(),),
            })
        except asyncio.CancelledError:
            log.info("generation cancelled by the caller: %s", request.request_id)
            if result != bpb.OUTCOME_COMPLETED:
                result = bpb.OUTCOME_CANCELLED_BY_CLIENT
            raise
        finally:
            self._active -= 1
            self._metrics.active.dec()
            if accepted_at_ms and request.usage_id and self._report is not None:
                # Its own task: the stream ends without waiting for the durable write, and a
                # cancelled call (its caller left, or died), exactly the one to report, cannot stop it.
                task = asyncio.create_task(self._report(usage_report(
                    request.usage_id, plan.engine_request.request_id, plan.spec.id, claims, plan.prompt_tokens,
                    outcome.completion_tokens, result, accepted_at_ms)))
                self._reporting.add(task)
                task.add_done_callback(self._reporting.discard)
            if plan is not None:
                self._metrics.output_tokens.labels(plan.spec.id).inc(outcome.completion_tokens)
                if outcome.time_to_first_token_ns:
                    self._metrics.ttft.labels(plan.spec.id).observe(outcome.time_to_first_token_ns / 1e9)
                # Counts and timings only: prompts and generated text never reach the logs.
                log.info(
                    "generation request_id=%s model=%s prompt_tokens=%d completion_tokens=%d finish=%s ttft_ms=%.1f",
                    plan.engine_request.request_id,
                    plan.spec.id,
                    plan.prompt_tokens,
                    outcome.completion_tokens,
                    pb.FinishReason.Name(outcome.finish_reason),
                    outcome.time_to_first_token_ns / 1e6,
                )

    async def GenerateMany(self, requests: AsyncIterator[pb.MuxRequest], context) -> AsyncIterator[pb.MuxResponse]:
        """Generate calls carried on one stream, each with its own token (inference_svc.mux)."""
        if self._verifier is None:
            raise Unavailable("this inference_svc carries no multiplexed calls")
        async for response in generate_many(lambda request: self.Generate(request, None), self._verifier, requests,
                                             self._observe, lambda: self.draining):
            yield response

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        require(INFERENCE)
        specs = list(self._registry)
        ready = await asyncio.gather(*(self._engine.model_ready(s.id) for s in specs))
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    id=s.id,
                    owned_by=s.owned_by,
                    created_unix_s=s.created_unix_s,
                    context_window_tokens=s.context_window,
                    max_output_tokens=s.max_output_tokens,
                    ready=r,
                )
                for s, r in zip(specs, ready)
            ]
        )
