"""The CPU model's generator: continuous batching with llama.cpp's batched decode.

One worker thread owns the llama.cpp context. Each request takes one sequence slot per returned
sequence (a bounded number in all) and reserves its KV-cache cells; it joins the batch at the next
step and leaves it the step it ends, freeing its cells. Each step decodes one token of every
running sequence together with one block of each prompt being prefilled (a few prompts a step),
so a long prompt never freezes the streams already running. n sequences share their prompt's
cells (llama.cpp copies a sequence's cells by reference), and whole blocks of recent prompts are
kept for later prompts that start the same way (prefix_cache.py). Guided decoding uses llguidance
(cloudach.guides), a grammar engine TensorRT-LLM offers too, so a guide accepted here is accepted
in production.

Reproducibility: a request decoded alone with a seed gives the same tokens every time, whether
its prompt's blocks were evaluated or reused (a block is always evaluated alone, aligned, so a
kept one holds the same values). Decoded in a batch, its floating-point sums run in another
order, and a near-tie between two tokens can go the other way: the same seed may then give
another text.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import llama_cpp as L
import numpy as np

from cloudach.guides import GuideError, compile_guide
from triton_model.prefix_cache import PrefixCache
from triton_model.request import GenerationRequest, Limits, invalid
from triton_model.sampler import TokenSampler
from triton_model.serving import CANCELLED, COMPLETED, STOPPED, Job, Metrics, QueueFull, Step

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    index: int
    slot: int
    sampler: TokenSampler
    position: int
    generated: list[int] = field(default_factory=list)
    #: the token sampled last, to be decoded next
    pending: int | None = None
    #: row of this sequence's logits in the last batch
    row: int | None = None
    ended: bool = False


@dataclass
class _Running:
    job: Job
    sequences: list[_Sequence]
    kv_tokens: int
    prefilled: int = 0

    @property
    def request(self) -> GenerationRequest:
        return self.job.request

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.input_ids)



def _silence_llama_logs() -> None:
    callback = L.llama_log_callback(lambda level, text, data: None)
    _silence_llama_logs.keep = callback  # the C side keeps a pointer to it
    L.llama_log_set(callback, ctypes.c_void_p())


class LlamaCppGenerator:
    def __init__(self, gguf_path: str, *, metrics: Metrics, max_sequence_tokens: int = 2048,
                 kv_cache_tokens: int = 16384, max_sequences: int = 16, max_return_sequences: int = 8,
                 prefill_chunk_tokens: int = 32, prefills_per_step: int = 4, prefix_cache_tokens: int = 4096,
                 prefix_cache_entries: int = 8, max_queue: int = 64, n_threads: int = 2) -> None:
        _silence_llama_logs()
        L.llama_backend_init()
        self._model = L.llama_model_load_from_file(gguf_path.encode(), L.llama_model_default_params())
        if not self._model:
            raise RuntimeError(f"cannot load {gguf_path}")
        params = L.llama_context_default_params()
        params.n_ctx = kv_cache_tokens + prefix_cache_tokens
        params.n_batch = params.n_ubatch = max_sequences + prefills_per_step * prefill_chunk_tokens
        params.n_seq_max = max_sequences + prefix_cache_entries
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = True  # one pool of cells for every sequence; shared prompts stored once
        self._ctx = L.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise RuntimeError("cannot create the llama.cpp context")
        self._memory = L.llama_get_memory(self._ctx)
        vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        self.limits = Limits(n_vocab=self.n_vocab, max_sequence_tokens=max_sequence_tokens,
                             max_return_sequences=min(max_return_sequences, max_sequences),
                             kv_cache_tokens=kv_cache_tokens)
        self._batch = L.llama_batch_init(params.n_batch, 0, params.n_seq_max)
        self._chunk = prefill_chunk_tokens
        self._prefills_per_step = prefills_per_step
        self._prefixes = PrefixCache(range(max_sequences, max_sequences + prefix_cache_entries), prefix_cache_tokens,
                                     prefill_chunk_tokens, forget=lambda seq: L.llama_memory_seq_rm(self._memory, seq, -1, -1))
        self._free_slots = list(range(max_sequences))
        self._kv_free = kv_cache_tokens
        self._queue: collections.deque[Job] = collections.deque()
        self._max_queue = max_queue
        self._running: list[_Running] = []
        self._metrics = metrics
        self._wake = threading.Condition()
        self._closed = False
        import llguidance.llamacpp

        with warnings.catch_warnings():  # it reads each token through a deprecated llama.cpp call
            warnings.simplefilter("ignore", DeprecationWarning)
            self._guide_tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab)
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guide-masks")
        self._worker = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._worker.start()

    # -- called from Triton's threads ----------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        if request.guide_type is not None:
            self._grammar(request.guide_type, request.guide or "")

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self._queue) >= self._max_queue:
                raise QueueFull()
            self._queue.append(job)
            self._metrics.queued.set(len(self._queue))
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join(timeout=10)
        self._mask_worker.shutdown(wait=False)

    def _grammar(self, guide_type: str, guide: str) -> str:
        """The guide as an llguidance grammar, compiled and checked once (cached)."""
        key = (guide_type, guide)
        with self._wake:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        try:
            grammar = compile_guide(guide_type, guide, self._guide_tokenizer)
        except GuideError as problem:
            raise invalid("guided_decoding_guide", f"the {guide_type} guide does not compile: {problem}") from None
        with self._wake:
            self._grammars[key] = grammar
            while len(self._grammars) > 256:
                self._grammars.popitem(last=False)
        return grammar

    # -- the worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._queue and not self._running:
                    self._wake.wait()
                if self._closed:
                    break
                self._admit()
            try:
                self._step()
            except Exception as error:  # noqa: BLE001 - every running request fails; the model lives on
                log.exception("batched decode failed")
                for running in list(self._running):
                    self._end(running, error=f"generation failed: {error}")
        for running in list(self._running):
            self._end(running, error="the model is shutting down")
        while self._queue:
            self._queue.popleft().fail("the model is shutting down")

    def _admit(self) -> None:
        """Moves queued jobs into free slots, first come first served, while cells and slots last."""
        while self._queue:
            job = self._queue[0]
            request = job.request
            if len(self._free_slots) < request.num_sequences or self._kv_free < request.kv_tokens_needed:
                if self._running:
                    break  # the head waits for room; the rest keep their place behind it
                job.fail("the request does not fit in the model's KV cache")  # cannot happen after parse()
                self._queue.popleft()
                continue
            self._queue.popleft()
            if job.cancelled():
                self._finish_unstarted(job)
                continue
            slots = [self._free_slots.pop() for _ in range(request.num_sequences)]
            self._kv_free -= request.kv_tokens_needed
            sequences = [
                _Sequence(i, slot, self._sampler(request, i), position=len(request.input_ids))
                for i, slot in enumerate(slots)
            ]
            running = _Running(job, sequences, request.kv_tokens_needed)
            hit = self._prefixes.lookup(request.input_ids)
            if hit is not None:  # the prompt's first blocks are kept: start after them
                L.llama_memory_seq_cp(self._memory, hit.sequence_id, sequences[0].slot, 0, hit.tokens)
                running.prefilled = job.cached_tokens = hit.tokens
                self._metrics.cached_prompt_tokens.increment(hit.tokens)
            self._metrics.prompt_tokens.increment(len(request.input_ids))
            self._running.append(running)
        self._publish()

    def _sampler(self, request: GenerationRequest, index: int) -> TokenSampler:
        matcher = None
        if request.guide_type is not None:
            import llguidance

            matcher = llguidance.LLMatcher(self._guide_tokenizer, self._grammar(request.guide_type, request.guide or ""))
        seed = None if request.sampling.seed is None else request.sampling.seed + index
        return TokenSampler(request.sampling, seed, self.n_vocab, request.end_id, matcher,
                            request.top_log_probs, request.return_log_probs)

    def _finish_unstarted(self, job: Job) -> None:
        for i in range(job.request.num_sequences):
            job.finish(i, STOPPED if job.stopped.is_set() else CANCELLED)

    def _step(self) -> None:
        batch, n = self._batch, 0

        def add(token: int, position: int, slot: int, logits: bool) -> int:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, position, 1
            batch.seq_id[n][0], batch.logits[n] = slot, logits
            n += 1
            return n - 1

        for running in self._running:
            for seq in running.sequences:
                seq.row = None
                if seq.pending is not None and not seq.ended:
                    seq.row = add(seq.pending, seq.position, seq.slot, True)
                    seq.position += 1
                    seq.pending = None
        completed_prompts = []
        prefilling = [r for r in self._running if r.prefilling][: self._prefills_per_step]
        for running in prefilling:
            # One aligned block per prompt and step: a block is evaluated the same way every time.
            ids = running.request.input_ids
            start = running.prefilled
            end = min(len(ids), start + self._chunk)
            first = running.sequences[0]
            for position in range(start, end):
                row = add(ids[position], position, first.slot, position == len(ids) - 1)
            running.prefilled = end
            if not running.prefilling:
                completed_prompts.append((running, row))
        if n == 0:
            return
        batch.n_tokens = n
        guided = [seq.sampler for running in self._running for seq in running.sequences
                  if not seq.ended and seq.sampler.matcher is not None]
        masks = self._mask_worker.submit(lambda: [sampler.prepare() for sampler in guided]) if guided else None
        status = L.llama_decode(self._ctx, batch)  # releases the GIL: the masks are computed meanwhile
        if masks is not None:
            masks.result()
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for running, row in completed_prompts:
            first = running.sequences[0]
            self._prefixes.keep(running.request.input_ids,
                                lambda kept, tokens: L.llama_memory_seq_cp(self._memory, first.slot, kept, 0, tokens))
            for seq in running.sequences:
                if seq is not first:
                    L.llama_memory_seq_cp(self._memory, first.slot, seq.slot, -1, -1)
                seq.row = row
        for running in list(self._running):
            self._sample(running)

    def _sample(self, running: _Running) -> None:
        job, request = running.job, running.request
        if job.cancelled():  # every step: a cancelled request stops within one token
            self._end(running, outcome=STOPPED if job.stopped.is_set() else CANCELLED)
            return
        for seq in running.sequences:
            if seq.ended or seq.row is None:
                continue
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, seq.row), shape=(self.n_vocab,))
            token, log_prob, top = seq.sampler.choose(logits, len(seq.generated))
            if token == request.end_id:
                self._end_sequence(running, seq, COMPLETED)
                continue
            seq.generated.append(token)
            job.emit(Step(seq.index, [token], None if log_prob is None else [log_prob], None if top is None else [top]))
            stop_word = any(tuple(seq.generated[-len(w):]) == w for w in request.stop_words)
            if len(seq.generated) >= request.max_new_tokens or stop_word or seq.sampler.guide_finished:
                self._end_sequence(running, seq, COMPLETED)
            else:
                seq.pending = token
        if all(seq.ended for seq in running.sequences):
            self._release(running)

    def _end_sequence(self, running: _Running, seq: _Sequence, outcome: str) -> None:
        seq.ended = True
        L.llama_memory_seq_rm(self._memory, seq.slot, -1, -1)
        seq.sampler.close()
        self._free_slots.append(seq.slot)
        running.job.finish(seq.index, outcome)

    def _end(self, running: _Running, outcome: str = CANCELLED, error: str | None = None) -> None:
        """Ends every sequence of a request still running (cancelled, stopped, or failed)."""
        for seq in running.sequences:
            if not seq.ended:
                seq.ended = True
                L.llama_memory_seq_rm(self._memory, seq.slot, -1, -1)
                seq.sampler.close()
                self._free_slots.append(seq.slot)
                if error is None:
                    running.job.finish(seq.index, outcome)
        if error is not None:
            running.job.fail(error)
        self._release(running)

    def _release(self, running: _Running) -> None:
        if running in self._running:
            self._running.remove(running)
            self._kv_free += running.kv_tokens
        self._publish()

    def _publish(self) -> None:
        m = self._metrics
        m.queued.set(len(self._queue))
        m.active_requests.set(len(self._running))
        m.active_sequences.set(sum(not s.ended for r in self._running for s in r.sequences))
        m.kv_used.set(self.limits.kv_cache_tokens - self._kv_free)
