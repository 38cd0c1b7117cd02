"""The engine on Triton: TensorRT-LLM's `tensorrt_llm` model, called directly with token ids.

One ModelStreamInfer stream per request, so cancelling the stream cancels that request in the
model (through an ensemble or a BLS it would not: shared/notes/trtllm-contract.md). Moving to
another serving layout should touch only this file. What Triton needs to know of each model (its
name in Triton, its end and pad ids) comes from the registry's `[models.engine]` tables.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from opentelemetry import propagate, trace
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from cloudach.errors import CloudachError, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from inference_svc.engine import EngineRequest, Step
from inference_svc.triton_endpoints import Endpoint, Endpoints

log = logging.getLogger(__name__)
tracer = trace.get_tracer("cloudach.inference_svc")

_QUEUE_FULL_MARKERS = ("queue is full", "exceeds maximum queue size", "maximum queue size")
_REFUSED = re.compile(r"invalid input '(\w+)'")


#: After a request's final response, how long Triton may take to end its stream before we cancel it.
STREAM_END_TIMEOUT_S = 2.0


def is_final(result) -> bool:
    """Whether a decoupled model's response is its request's last (triton_final_response)."""
    flag = result.get_response().parameters.get("triton_final_response")
    return flag is not None and flag.bool_param


async def close_stream(responses, final: bool) -> None:
    """Ends a ModelStreamInfer call whose request side has been closed. After the final response
    it lets Triton end the stream itself (it does once our side is closed) and cancels only past
    STREAM_END_TIMEOUT_S; otherwise it cancels at once, which cancels the request in the model.
    A cancel that reaches tritonserver 2.51 (r24.10) while it is finishing a stream can crash it
    (SIGSEGV, or glibc's "double free or corruption", then a hang in its signal handler):
    triton-inference-server/server#7368, fixed in r24.12. Cancelling every stream at its clean end
    did that now and then, seconds after start and under load."""
    if final:
        try:
            async with asyncio.timeout(STREAM_END_TIMEOUT_S):
                async for _ in responses:
                    pass
            return
        except (TimeoutError, grpc.aio.AioRpcError):
            pass
    responses.cancel()


def _tensor(name: str, value: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def _stop_words_list(ids: Sequence[int]) -> np.ndarray:
    """TensorRT-LLM's [batch, 2, L] layout for single-token stop words: ids, then end offsets."""
    flat = list(ids)
    offsets = list(range(1, len(flat) + 1))
    return np.array([[flat, offsets]], dtype=np.int32)


@dataclass(frozen=True, slots=True)
class TritonModel:
    """How one registry model runs in Triton."""

    name: str
    #: the token TensorRT-LLM ends on; the model's other ending tokens go as stop words
    end_id: int
    #: the model's vocabulary (its logits' length): embedding_bias, the logit bias, has one value each
    vocab_size: int
    pad_id: int | None = None
    #: whether its config has return_num_cached_tokens (false while a Triton from before it serves:
    #: Triton refuses an input its config does not declare)
    reports_cached_tokens: bool = True

    @classmethod
    def from_table(cls, model_id: str, table: Mapping[str, Any]) -> TritonModel:
        try:
            return cls(table["triton_model"], int(table["end_id"]), int(table["vocab_size"]),
                       None if table.get("pad_id") is None else int(table["pad_id"]),
                       bool(table.get("reports_cached_tokens", True)))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"model {model_id}: its [models.engine] table needs triton_model, end_id and "
                             f"vocab_size ({error})") from None


def build_inputs(r: EngineRequest, model: TritonModel) -> list[InferInput]:
    """The tensorrt_llm model's inputs; every one carries the leading batch dimension of 1."""
    temperature, top_p, top_k = r.temperature, r.top_p, r.top_k
    if temperature == 0.0 or top_p == 0.0:
        # Greedy. TensorRT-LLM has no temperature 0: keeping only the top token is the same thing.
        temperature, top_p, top_k = 1.0, 1.0, 1
    stop_words = [t for t in r.stop_token_ids if t != model.end_id]

    def i32(v: int) -> np.ndarray:
        return np.array([[v]], dtype=np.int32)

    def f32(v: float) -> np.ndarray:
        return np.array([[v]], dtype=np.float32)

    inputs = [
        _tensor("input_ids", np.array([r.input_ids], dtype=np.int32), "INT32"),
        _tensor("input_lengths", i32(len(r.input_ids)), "INT32"),
        _tensor("request_output_len", i32(r.max_new_tokens), "INT32"),
        _tensor("end_id", i32(model.end_id), "INT32"),
        _tensor("streaming", np.array([[True]]), "BOOL"),
        _tensor("exclude_input_in_output", np.array([[True]]), "BOOL"),
        _tensor("temperature", f32(temperature), "FP32"),
        _tensor("runtime_top_p", f32(top_p), "FP32"),
        _tensor("runtime_top_k", i32(top_k), "INT32"),
        _tensor("seed", np.array([[r.seed]], dtype=np.uint64), "UINT64"),
        _tensor("presence_penalty", f32(r.presence_penalty), "FP32"),
        _tensor("frequency_penalty", f32(r.frequency_penalty), "FP32"),
    ]
    if model.reports_cached_tokens:
        inputs.append(_tensor("return_num_cached_tokens", np.array([[True]]), "BOOL"))
    if model.pad_id is not None:
        inputs.append(_tensor("pad_id", i32(model.pad_id), "INT32"))
    if r.logit_bias:
        bias = np.zeros((1, model.vocab_size), dtype=np.float32)
        for token, value in r.logit_bias:
            bias[0, token] = value
        inputs.append(_tensor("embedding_bias", bias, "FP32"))
    if r.guide is not None:
        kind, text = r.guide
        inputs.append(_tensor("guided_decoding_guide_type", np.array([[kind.encode()]], dtype=np.object_), "BYTES"))
        if text:
            inputs.append(_tensor("guided_decoding_guide", np.array([[text.encode()]], dtype=np.object_), "BYTES"))
    if stop_words:
        inputs.append(_tensor("stop_words_list", _stop_words_list(stop_words), "INT32"))
    if r.n > 1:
        inputs.append(_tensor("num_return_sequences", i32(r.n), "INT32"))
    if r.log_probs or r.top_log_probs:
        inputs.append(_tensor("return_log_probs", np.array([[True]]), "BOOL"))
    if r.top_log_probs:
        inputs.append(_tensor("num_top_log_probs", i32(r.top_log_probs), "INT32"))
    return inputs


def parse_step(result: Any, request: EngineRequest) -> Step | None:
    """One streamed response as a Step (None for a response without tokens, e.g. an empty final one).
    Runs once per token: it looks only for the outputs the request asked for."""
    ids = result.as_numpy("output_ids")
    if ids is None or ids.size == 0:
        return None
    token_ids = ids.reshape(-1).tolist()
    if request.n == 1 and not request.log_probs:
        return Step(token_ids)
    index = result.as_numpy("sequence_index") if request.n > 1 else None
    log_probs = result.as_numpy("output_log_probs") if request.log_probs else None
    top_ids = result.as_numpy("top_log_prob_ids") if request.top_log_probs else None
    top_lps = result.as_numpy("top_log_probs") if request.top_log_probs else None
    top = None
    if top_ids is not None and top_lps is not None:
        k = top_ids.shape[-1]
        # The model pads a row with id -1 where fewer than k alternatives exist.
        top = [[(int(t), float(lp)) for t, lp in zip(row_ids, row_lps) if t >= 0]
               for row_ids, row_lps in zip(top_ids.reshape(-1, k), top_lps.reshape(-1, k))]
    return Step(
        token_ids,
        index=0 if index is None else int(index.reshape(-1)[0]),
        log_probs=None if log_probs is None else log_probs.reshape(-1).tolist(),
        top_log_probs=top,
    )


def _in_band_error(error: InferenceServerException) -> CloudachError:
    message = error.message()
    refused = _REFUSED.search(message)
    if refused:
        # The model refused an input it names (our tensorrt_llm models' contract).
        return InvalidArgument(message[refused.start():], param=refused.group(1))
    if any(marker in message.lower() for marker in _QUEUE_FULL_MARKERS):
        return ResourceExhausted("the model is at capacity; retry shortly", code="model_overloaded")
    return Unavailable(f"the model failed: {message}")


def _rpc_error(error: grpc.aio.AioRpcError) -> CloudachError:
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the inference backend did not answer in time")
    return Unavailable(f"the inference backend is unavailable ({error.code().name})")


def _channel_args() -> list[tuple[str, int | bool]]:
    keepalive = triton.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", triton.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", triton.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        # A restarted Triton is found again within seconds, not after gRPC's default of up to 2 minutes.
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


#: tritonclient's own channel defaults, plus a short reconnect backoff
CHANNEL_ARGS = _channel_args()


class TritonEngine:
    """Streams generations from one or more Triton servers (the least busy ready one per request)."""

    def __init__(self, urls: Sequence[str], token_timeout_s: float, models: Mapping[str, Mapping[str, Any]],
                 endpoints: Endpoints | None = None) -> None:
        """models: each registry model's `[models.engine]` table, by model id; urls: fixed
        `host:port`s and `dns:///name:port`s (inference_svc.triton_endpoints)."""
        if not urls:
            raise ValueError("at least one Triton URL is required")
        self._models = {model_id: TritonModel.from_table(model_id, table) for model_id, table in models.items()}
        self._endpoints = endpoints or Endpoints(urls, CHANNEL_ARGS)
        self._token_timeout_s = token_timeout_s

    async def generate(self, request: EngineRequest) -> AsyncIterator[Step]:
        # Fail over to the next server only while nothing has been generated: after that a
        # retry would repeat text the caller has already seen.
        order = await self._endpoints.usable()
        if not order:
            raise Unavailable("no Triton server is ready")
        for attempt, endpoint in enumerate(order):
            if endpoint.gone and attempt:
                continue  # resolved away during the first attempt (its client may be closing)
            started = False
            try:
                async for step in self._stream(endpoint, request):
                    started = True
                    yield step
                return
            except Unavailable:
                if started or attempt == len(order) - 1:
                    raise
                log.warning("triton endpoint %s unavailable, trying the next one", endpoint.url)

    async def _stream(self, endpoint: Endpoint, request: EngineRequest) -> AsyncIterator[Step]:
        finished = asyncio.Event()
        model = self._models[request.model]

        async def requests():
            yield {
                "model_name": model.name,
                "inputs": build_inputs(request, model),
                "request_id": request.request_id,
            }
            await finished.wait()  # keep our side open until the model has finished

        # A client span per Triton stream; its context is what Triton's own spans join.
        span = tracer.start_span(
            "triton ModelStreamInfer", context=propagate.extract(request.trace_headers), kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                        "rpc.method": "ModelStreamInfer", "server.address": endpoint.url,
                        "cloudach.triton.model": model.name, "cloudach.request_id": request.request_id},
        )
        headers: dict[str, str] = {}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        endpoint.in_flight += 1
        responses = endpoint.client.stream_infer(inputs_iterator=requests(), headers=headers)
        first, final = True, False
        try:
            while True:
                try:
                    async with asyncio.timeout(self._token_timeout_s):
                        result, error = await responses.__anext__()
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the model produced no token for {self._token_timeout_s:g}s"
                    ) from None
                except StopAsyncIteration:
                    raise Unavailable("the inference backend closed the stream early") from None
                except grpc.aio.AioRpcError as rpc_error:
                    raise _rpc_error(rpc_error) from None
                if error is not None:
                    raise _in_band_error(error)
                step = parse_step(result, request)
                if step is not None:
                    if first:  # the prompt's reused KV cells: known once, read once
                        first = False
                        cached = result.as_numpy("num_cached_tokens")
                        if cached is not None and cached.size:
                            step = dataclasses.replace(step, cached_tokens=max(0, int(cached.reshape(-1)[0])))
                    yield step
                if final := is_final(result):
                    return
        except BaseException as error:
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            finished.set()
            endpoint.in_flight -= 1
            self._endpoints.released(endpoint)
            await close_stream(responses, final)
            span.end()

    async def model_ready(self, model: str) -> bool:
        name = self._models[model].name
        for endpoint in await self._endpoints.usable():
            try:
                if await endpoint.client.is_model_ready(name, client_timeout=2):
                    return True
            except (InferenceServerException, grpc.aio.AioRpcError):
                continue
        return False

    async def close(self) -> None:
        await self._endpoints.close()
