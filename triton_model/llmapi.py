"""The production model's generator: TensorRT-LLM's LLM API (PyTorch backend, TensorRT-LLM 1.2.1)
on a Hugging Face checkpoint, behind the same contract as the CPU model.

Token-id prompts go to `LLM.generate_async(ids, SamplingParams(...), streaming=True)`; each step's
`token_ids_diff` and `logprobs_diff` become responses per sequence; n is SamplingParams.n;
guided decoding is TensorRT-LLM's own (GuidedDecodingParams), with llguidance as its backend, the
engine the CPU model uses; in-flight batching, chunked prefill and KV-cache block reuse are the
LLM's. A request whose caller went away, or that a `stop=true` request names, is aborted within
`cancellation_check_period_ms`.

tensorrt_llm (and torch) are imported when the generator is built, on a GPU node, so this module
imports anywhere: the tests load it on machines without a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from triton_model.request import GenerationRequest, Limits, invalid
from triton_model.serving import CANCELLED, COMPLETED, STOPPED, Job, Metrics, QueueFull, Step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlmApiSettings:
    """The model's config.pbtxt parameters (deploy/triton/trtllm/tensorrt_llm/config.pbtxt)."""

    checkpoint_dir: str
    vocab_size: int
    max_seq_len: int = 8192
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    tensor_parallel_size: int = 1
    kv_cache_free_gpu_memory_fraction: float = 0.9
    enable_kv_cache_reuse: bool = True
    enable_chunked_context: bool = True
    guided_decoding_backend: str = "llguidance"
    max_return_sequences: int = 8
    max_queue_size: int = 256
    cancellation_check_period_ms: int = 100
    #: KV-cache cells a request may claim (prompt + n × new tokens); the LLM pages the rest
    kv_cache_tokens: int = 65536

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> LlmApiSettings:
        def flag(name: str, default: bool) -> bool:
            return params.get(name, str(default)).lower() in ("1", "true", "yes")

        return cls(
            checkpoint_dir=params["checkpoint_dir"], vocab_size=int(params["vocab_size"]),
            max_seq_len=int(params.get("max_seq_len", 8192)), max_batch_size=int(params.get("max_batch_size", 64)),
            max_num_tokens=int(params.get("max_num_tokens", 8192)),
            tensor_parallel_size=int(params.get("tensor_parallel_size", 1)),
            kv_cache_free_gpu_memory_fraction=float(params.get("kv_cache_free_gpu_mem_fraction", 0.9)),
            enable_kv_cache_reuse=flag("enable_kv_cache_reuse", True),
            enable_chunked_context=flag("enable_chunked_context", True),
            guided_decoding_backend=params.get("guided_decoding_backend", "llguidance"),
            max_return_sequences=int(params.get("max_return_sequences", 8)),
            max_queue_size=int(params.get("max_queue_size", 256)),
            cancellation_check_period_ms=int(params.get("cancellation_check_period_ms", 100)),
            kv_cache_tokens=int(params.get("kv_cache_tokens", 65536)),
        )


def sampling_params(request: GenerationRequest) -> dict[str, Any]:
    """SamplingParams' keyword arguments for a request (TensorRT-LLM 1.2.1's names)."""
    s = request.sampling
    single = [w[0] for w in request.stop_words if len(w) == 1]
    kwargs: dict[str, Any] = dict(
        max_tokens=request.max_new_tokens, end_id=request.end_id, n=request.num_sequences,
        stop_token_ids=single or None, min_tokens=s.min_tokens or None, seed=s.seed,
        repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, detokenize=False, exclude_input_from_output=True,
        # the chosen token's log prob comes with the top-k (logprobs=k); 1 when only it is wanted
        logprobs=(request.top_log_probs or 1) if request.return_log_probs else None,
    )
    if s.greedy:
        kwargs.update(top_k=1, temperature=None, top_p=None)
    else:
        kwargs.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p if s.top_p < 1.0 else None)
    return kwargs


def guide(request: GenerationRequest) -> dict[str, Any] | None:
    """GuidedDecodingParams' keyword arguments: one guide per request."""
    if request.guide_type is None:
        return None
    if request.guide_type == "json":
        return {"json_object": True}
    field = {"json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar"}[request.guide_type]
    return {field: request.guide}


class LlmApiGenerator:
    def __init__(self, settings: LlmApiSettings, *, metrics: Metrics) -> None:
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        self.settings = settings
        self.limits = Limits(n_vocab=settings.vocab_size, max_sequence_tokens=settings.max_seq_len,
                             max_return_sequences=settings.max_return_sequences,
                             kv_cache_tokens=settings.kv_cache_tokens)
        self._metrics = metrics
        self._llm = LLM(
            model=settings.checkpoint_dir,
            skip_tokenizer_init=True,  # inference_svc tokenizes: token ids in, token ids out
            tensor_parallel_size=settings.tensor_parallel_size,
            max_batch_size=settings.max_batch_size,
            max_num_tokens=settings.max_num_tokens,
            max_seq_len=settings.max_seq_len,
            enable_chunked_prefill=settings.enable_chunked_context,
            kv_cache_config=KvCacheConfig(enable_block_reuse=settings.enable_kv_cache_reuse,
                                          free_gpu_memory_fraction=settings.kv_cache_free_gpu_memory_fraction),
            guided_decoding_backend=settings.guided_decoding_backend,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmapi", daemon=True)
        self._thread.start()
        self._in_flight = 0
        self._lock = threading.Lock()

    def check(self, request: GenerationRequest) -> None:
        if any(len(word) > 1 for word in request.stop_words):
            raise invalid("stop_words_list", "only single-token stop words reach TensorRT-LLM's stop_token_ids")
        if request.end_id is None:
            raise invalid("end_id", "required: the model runs without a tokenizer of its own")

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._in_flight >= self.settings.max_queue_size:
                raise QueueFull()
            self._in_flight += 1
            self._metrics.active_requests.set(self._in_flight)
        asyncio.run_coroutine_threadsafe(self._run(job), self._loop)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._llm.shutdown()

    async def _run(self, job: Job) -> None:
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.sampling_params import GuidedDecodingParams

        request = job.request
        kwargs = sampling_params(request)
        if request.sampling.embedding_bias is not None:
            import torch

            kwargs["embedding_bias"] = torch.from_numpy(request.sampling.embedding_bias)
        guided = guide(request)
        if guided is not None:
            kwargs["guided_decoding"] = GuidedDecodingParams(**guided)
        ended: set[int] = set()
        try:
            result = self._llm.generate_async(request.input_ids, sampling_params=SamplingParams(**kwargs), streaming=True)
            watcher = asyncio.create_task(self._abort_when_cancelled(job, result))
            try:
                async for output in result:
                    # The LLM API's count of prompt tokens served from reused KV blocks (its
                    # OpenAI server reports the same as prompt_tokens_details.cached_tokens).
                    job.cached_tokens = int(getattr(output, "cached_tokens", 0) or 0)
                    for sequence in output.outputs:
                        self._forward(job, sequence, ended)
            finally:
                watcher.cancel()
            outcome = STOPPED if job.stopped.is_set() else CANCELLED if job.cancelled() else COMPLETED
            for index in range(request.num_sequences):
                if index not in ended:
                    job.finish(index, outcome)
        except Exception as error:  # noqa: BLE001 - the caller gets it; the model serves on
            log.exception("generation %s failed", request.request_id)
            job.fail(f"generation failed: {error}")
        finally:
            with self._lock:
                self._in_flight -= 1
                self._metrics.active_requests.set(self._in_flight)

    def _forward(self, job: Job, sequence: Any, ended: set[int]) -> None:
        """One sequence's step: its new ids (and log probs) as a response; its end when it ended."""
        ids = list(sequence.token_ids_diff)
        if ids:
            step = Step(sequence.index, ids)
            if job.request.return_log_probs:
                steps = list(sequence.logprobs_diff or [])
                step.log_probs = [float(by_id[t].logprob) if t in by_id else float("nan") for t, by_id in zip(ids, steps)]
                if job.request.top_log_probs:
                    k = job.request.top_log_probs
                    step.top_log_probs = []
                    for by_id in steps:
                        best = sorted(by_id.items(), key=lambda item: -item[1].logprob)[:k]
                        missing = k - len(best)  # fewer than asked: padded, id -1 at -inf
                        step.top_log_probs.append(([t for t, _ in best] + [-1] * missing,
                                                   [float(lp.logprob) for _, lp in best] + [float("-inf")] * missing))
            job.emit(step)
        if sequence.finish_reason is not None and sequence.index not in ended:
            ended.add(sequence.index)
            job.finish(sequence.index, {"cancelled": CANCELLED}.get(sequence.finish_reason, COMPLETED))

    async def _abort_when_cancelled(self, job: Job, result: Any) -> None:
        """Polls the caller's cancellation (and `stop=true`) as TensorRT-LLM's backend did."""
        while True:
            await asyncio.sleep(self.settings.cancellation_check_period_ms / 1000)
            if job.cancelled():
                result.abort()
                return

