"""The Triton-facing half of our `tensorrt_llm` model, shared by the CPU and the GPU models.

It reads and checks each request (request.py), keeps the registry of running requests (for
`stop=true` and cancellation), hands work to a generator, turns what the generator produces into
responses, and publishes the model's metrics. Only the generator differs between the models:
llama.cpp batched decode on the CPU (llamacpp.py), TensorRT-LLM's LLM API on the GPU (llmapi.py).

A generator calls back on the Job, from its own thread: emit() for each sequence's new tokens,
finish() when a sequence ends, fail() if the request cannot go on. The Job sends the responses:
one per step and sequence while streaming (with `sequence_index`), and the final flag once every
sequence of the request has ended. It hands them to the ResponseWriter, whose thread builds and
sends them in order, so the generator decodes its next step while Triton takes the last one.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from triton_model.request import GenerationRequest, Limits, Refused, is_stop, parse

log = logging.getLogger(__name__)

#: how a sequence ended (counted in cloudach_model_requests_total's outcome by the request's worst)
COMPLETED, STOPPED, CANCELLED, ERROR = "completed", "stopped", "cancelled", "error"


class QueueFull(Exception):
    """The generator's bounded queue is full (inference_svc answers RESOURCE_EXHAUSTED)."""


@dataclass(slots=True)
class Step:
    """One sequence's new tokens, with their log probs when asked for."""

    sequence_index: int
    token_ids: list[int]
    #: the chosen tokens' log probs
    log_probs: list[float] | None = None
    #: per token, the top alternatives: (ids, log probs), most likely first
    top_log_probs: list[tuple[list[int], list[float]]] | None = None


class Generator(Protocol):
    limits: Limits

    def check(self, request: GenerationRequest) -> None:
        """Raises Refused for what this generator cannot do (a guide that does not compile...)."""

    def submit(self, job: Job) -> None:
        """Takes the job; raises QueueFull when its bounded queue is full."""

    def close(self) -> None: ...


class Metrics:
    """The model's own figures on Triton's metrics port (Triton's custom-metrics API)."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        def family(name: str, text: str, kind: Any) -> Any:
            return pb_utils.MetricFamily(name=name, description=text, kind=kind)

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self._families = (
            tokens := family("cloudach_model_generated_tokens_total", "Tokens generated", counter),
            requests := family("cloudach_model_requests_total", "Requests finished, by outcome", counter),
            active := family("cloudach_model_active_requests", "Requests generating right now", gauge),
            sequences := family("cloudach_model_active_sequences", "Sequences decoding together right now", gauge),
            queued := family("cloudach_model_queued_requests", "Requests waiting for a slot", gauge),
            kv := family("cloudach_model_kv_cache_used_tokens", "KV-cache cells held by running requests", gauge),
            prompt := family("cloudach_model_prompt_tokens_total", "Prompt tokens of the requests started", counter),
            cached := family("cloudach_model_cached_prompt_tokens_total",
                             "Prompt tokens whose KV cells were reused, not evaluated", counter),
        )
        labels = {"model": model}
        self.tokens = tokens.Metric(labels=labels)
        self.outcomes = {o: requests.Metric(labels={**labels, "outcome": o}) for o in (COMPLETED, STOPPED, CANCELLED, ERROR)}
        self.active_requests = active.Metric(labels=labels)
        self.active_sequences = sequences.Metric(labels=labels)
        self.queued = queued.Metric(labels=labels)
        self.kv_used = kv.Metric(labels=labels)
        self.prompt_tokens = prompt.Metric(labels=labels)
        self.cached_prompt_tokens = cached.Metric(labels=labels)


class ResponseWriter:
    """Builds and sends every job's responses from one thread of its own, in the order given.

    A send is a round trip to the Triton process (through shared memory, waiting for its
    answer): about a tenth of a CPU model's step with eight streams, more on a loaded machine.
    Done here, the generator's loop decodes its next step meanwhile. Bounded: a generator that
    outruns Triton waits in put() until the writer catches up.
    """

    def __init__(self, max_pending: int = 4096) -> None:
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="triton-responses", daemon=True)
        self._thread.start()

    def put(self, job: Job, build: Any, flags: int = 0) -> None:
        """Sends build() (a response, or None for the flags alone) to job's caller."""
        self._queue.put((job, build, flags))

    def close(self, timeout_s: float = 10) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            job, build, flags = item
            if job.lost.is_set():
                continue  # its caller is gone: nothing more reaches it
            try:
                response = build()
                if response is None:
                    job.sender.send(flags=flags)
                else:
                    job.sender.send(response, flags=flags)
            except Exception:  # noqa: BLE001 - one caller's broken stream must not stop the others'
                log.exception("sending a response of %s failed: the request is cancelled", job.request.request_id)
                job.lost.set()


@dataclass(eq=False)
class Job:
    """One request on its way through a generator; the generator's thread calls it back."""

    request: GenerationRequest
    triton_request: Any
    sender: Any
    pb_utils: Any
    metrics: Metrics
    writer: ResponseWriter
    on_done: Any = None
    stopped: threading.Event = field(default_factory=threading.Event)
    #: a response could not be sent: the caller is gone
    lost: threading.Event = field(default_factory=threading.Event)
    _open: set[int] = field(default_factory=set)
    _generated: list[int] = field(default_factory=list)
    _held: dict[int, list[Step]] = field(default_factory=dict)
    #: the prompt's tokens whose KV cells the generator reused (set before its first emit)
    cached_tokens: int = 0
    _told_cached: bool = False
    _outcome: str = COMPLETED
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._open = set(range(self.request.num_sequences))
        self._generated = [0] * self.request.num_sequences

    def cancelled(self) -> bool:
        """The caller went away, or a `stop=true` request named this one."""
        return self.stopped.is_set() or self.lost.is_set() or self.triton_request.is_cancelled()

    def generated(self, sequence_index: int) -> int:
        return self._generated[sequence_index]

    def emit(self, step: Step) -> None:
        self._generated[step.sequence_index] += len(step.token_ids)
        self.metrics.tokens.increment(len(step.token_ids))
        if self.request.streaming:
            generated = self._generated[step.sequence_index]
            self.writer.put(self, lambda: self._response([step], generated=generated))
        else:
            self._held.setdefault(step.sequence_index, []).append(step)

    def finish(self, sequence_index: int, outcome: str = COMPLETED) -> None:
        """Sequence sequence_index has ended; once all have, the request's last response goes."""
        with self._lock:
            self._open.discard(sequence_index)
            if outcome != COMPLETED and self._outcome == COMPLETED:
                self._outcome = outcome
            last = not self._open
        if not last:
            return
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self._outcome == CANCELLED:
            self.writer.put(self, lambda: None, final)
        elif self.request.streaming:
            generated = self._generated[0]
            self.writer.put(self, lambda: self._response([], generated=generated), final)
        else:
            self._send_held()
        self._done(self._outcome)

    def fail(self, message: str) -> None:
        """Ends the request with an error response (no more responses after it)."""
        with self._lock:
            if not self._open:
                return
            self._open.clear()
        error = self.pb_utils.TritonError(message)
        self.writer.put(self, lambda: self.pb_utils.InferenceResponse(output_tensors=[], error=error),
                        self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self._done(ERROR)

    def _done(self, outcome: str) -> None:
        self.metrics.outcomes[outcome].increment(1)
        if self.on_done is not None:
            self.on_done(self)

    def _send_held(self) -> None:
        """Non-streaming: one response per sequence, the whole completion (and prompt, unless excluded)."""
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for index in range(self.request.num_sequences):
            steps = self._held.get(index, [])
            merged = Step(index, [t for s in steps for t in s.token_ids])
            if self.request.return_log_probs:
                merged.log_probs = [p for s in steps for p in s.log_probs or ()]
                merged.top_log_probs = [t for s in steps for t in s.top_log_probs or ()]
            prompt = [] if self.request.exclude_input else self.request.input_ids
            last = index == self.request.num_sequences - 1
            generated = self._generated[index]
            self.writer.put(self, lambda m=merged, g=generated: self._response([m], prompt, g), final if last else 0)

    def _response(self, steps: Sequence[Step], prompt: Sequence[int] = (), generated: int = 0) -> Any:
        """Built on the writer's thread: generated is the sequence's count when the step was emitted."""
        tensor = self.pb_utils.Tensor
        step = steps[0] if steps else Step(0, [])
        ids = [*prompt, *step.token_ids]
        tensors = [
            tensor("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, -1)),
            tensor("sequence_length", np.array([[len(prompt) + generated]], dtype=np.int32)),
            tensor("sequence_index", np.array([[step.sequence_index]], dtype=np.int32)),
        ]
        if self.request.return_log_probs and step.log_probs is not None:
            tensors.append(tensor("output_log_probs", np.array(step.log_probs, dtype=np.float32).reshape(1, 1, -1)))
            tensors.append(tensor("cum_log_probs", np.array([[sum(step.log_probs)]], dtype=np.float32)))
        if self.request.top_log_probs and step.top_log_probs:
            k = self.request.top_log_probs
            top_ids = np.array([ids_ for ids_, _ in step.top_log_probs], dtype=np.int32).reshape(1, -1, k)
            top_lps = np.array([lps for _, lps in step.top_log_probs], dtype=np.float32).reshape(1, -1, k)
            tensors += [tensor("top_log_prob_ids", top_ids), tensor("top_log_probs", top_lps)]
        if self.request.return_num_input_tokens:
            tensors.append(tensor("num_input_tokens", np.array([[len(self.request.input_ids)]], dtype=np.int32)))
        if self.request.return_num_output_tokens:
            tensors.append(tensor("num_output_tokens", np.array([[generated]], dtype=np.int32)))
        if self.request.return_num_cached_tokens and not self._told_cached:  # known once: sent once
            self._told_cached = True
            tensors.append(tensor("num_cached_tokens", np.array([[self.cached_tokens]], dtype=np.int32)))
        return self.pb_utils.InferenceResponse(output_tensors=tensors)


class TritonInputs:
    """A Triton request's inputs as request.py reads them."""

    def __init__(self, pb_utils: Any, request: Any) -> None:
        self._pb_utils, self._request = pb_utils, request

    def get(self, name: str) -> np.ndarray | None:
        tensor = self._pb_utils.get_input_tensor_by_name(self._request, name)
        return None if tensor is None else tensor.as_numpy()


class ModelServer:
    """What a Triton Python model's execute() does, over any generator."""

    def __init__(self, pb_utils: Any, generator: Generator, metrics: Metrics) -> None:
        self.pb_utils = pb_utils
        self.generator = generator
        self.metrics = metrics
        self.writer = ResponseWriter()
        self._running: dict[str, Job] = {}
        self._lock = threading.Lock()

    def execute(self, requests: Sequence[Any]) -> None:
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for triton_request in requests:
            sender = triton_request.get_response_sender()
            inputs = TritonInputs(self.pb_utils, triton_request)
            request_id = triton_request.request_id()
            try:
                if is_stop(inputs):
                    with self._lock:
                        running = self._running.get(request_id)
                    if running is not None:
                        running.stopped.set()
                    sender.send(self.pb_utils.InferenceResponse(output_tensors=[]), flags=final)
                    continue
                request = parse(request_id, inputs, self.generator.limits)
                self.generator.check(request)
                job = Job(request, triton_request, sender, self.pb_utils, self.metrics, self.writer, on_done=self._forget)
                if request_id:
                    with self._lock:
                        self._running[request_id] = job
                try:
                    self.generator.submit(job)
                except QueueFull:
                    self._forget(job)
                    raise
            except Refused as refusal:
                self._refuse(sender, str(refusal))
            except QueueFull:
                self._refuse(sender, "the model's queue is full: retry later")

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._running.get(job.request.request_id) is job:
                del self._running[job.request.request_id]

    def _refuse(self, sender: Any, message: str) -> None:
        error = self.pb_utils.TritonError(message)
        sender.send(self.pb_utils.InferenceResponse(output_tensors=[], error=error),
                    flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        self.generator.close()  # its last responses (the shutdown's errors) go out before the writer stops
        self.writer.close()


class TritonModelBase:
    """What both model.py files share: initialize() sets self.server, a ModelServer."""

    server: ModelServer

    def execute(self, requests):
        self.server.execute(requests)
        return None  # a decoupled model answers through its response senders

    def finalize(self):
        self.server.close()


def model_parameters(args: dict) -> dict[str, str]:
    """The string parameters of a model's config.pbtxt, from Triton's initialize() args."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
