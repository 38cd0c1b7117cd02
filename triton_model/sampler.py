"""Choosing one sequence's next token on the CPU model: logit bias, a grammar's mask, min_tokens,
log probs, then llama.cpp's own sampler chain (penalties, top-k, top-p, temperature, seeded draw).

Log probs are those of the distribution the token is drawn from before temperature and the
top-k / top-p cuts: the model's logits plus the bias, with what the guide forbids at -inf.
"""

from __future__ import annotations

import ctypes
import random

import llama_cpp as L
import numpy as np

from triton_model.request import Sampling

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert TOKEN_DATA.itemsize == ctypes.sizeof(L.llama_token_data)
#: how many recent tokens the repetition, presence and frequency penalties look at
PENALTY_WINDOW = 256


def _chain(sampling: Sampling, seed: int) -> ctypes.c_void_p:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    add = lambda sampler: L.llama_sampler_chain_add(chain, sampler)  # noqa: E731
    if (sampling.repetition_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0):
        add(L.llama_sampler_init_penalties(PENALTY_WINDOW, sampling.repetition_penalty,
                                           sampling.frequency_penalty, sampling.presence_penalty))
    if sampling.greedy:
        add(L.llama_sampler_init_greedy())
        return chain
    if sampling.top_k > 0:
        add(L.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        add(L.llama_sampler_init_top_p(sampling.top_p, 1))
    add(L.llama_sampler_init_temp(sampling.temperature))
    add(L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class TokenSampler:
    """One sequence's sampler: its chain keeps the penalties' history and the draw's state."""

    def __init__(self, sampling: Sampling, seed: int | None, n_vocab: int, end_id: int | None,
                 matcher=None, top_log_probs: int = 0, log_probs: bool = False) -> None:
        self.sampling = sampling
        self.end_id = end_id
        self.matcher = matcher
        self.top_log_probs = top_log_probs
        self.log_probs = log_probs or top_log_probs > 0
        self._chain = _chain(sampling, random.getrandbits(32) if seed is None else seed)
        # Greedy without penalties is the largest logit: no need to hand the vocabulary to llama.cpp.
        self._argmax = sampling.greedy and (sampling.repetition_penalty, sampling.frequency_penalty,
                                            sampling.presence_penalty) == (1.0, 0.0, 0.0)
        self._candidates = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = L.llama_token_data_array(
            data=self._candidates.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=n_vocab, selected=-1,
            sorted=False)
        if matcher is not None:
            import llguidance.numpy

            self._mask = llguidance.numpy.allocate_token_bitmask(1, n_vocab)
            self._fill = llguidance.numpy.fill_next_token_bitmask
            self._apply = llguidance.numpy.apply_token_bitmask_inplace
        self._mask_ready = False

    def prepare(self) -> None:
        """Computes the guide's mask of allowed next tokens, if not done yet. The generator calls
        it on another thread while llama.cpp decodes, so the mask costs the step no time."""
        if self.matcher is not None and not self._mask_ready:
            self._fill(self.matcher, self._mask, 0)
            self._mask_ready = True

    def choose(self, logits: np.ndarray, generated: int) -> tuple[int, float | None, tuple[list[int], list[float]] | None]:
        """The next token, its log prob and the top alternatives (when asked for)."""
        x = np.array(logits, dtype=np.float32, copy=True)
        if self.sampling.embedding_bias is not None:
            x += self.sampling.embedding_bias
        if self.end_id is not None and generated < self.sampling.min_tokens:
            x[self.end_id] = -np.inf
        if self.matcher is not None:
            self.prepare()
            self._apply(x, self._mask)
            self._mask_ready = False
        if self._argmax:
            token = int(np.argmax(x))
        else:
            token = self._draw(x)
        if self.matcher is not None:
            self.matcher.consume_token(token)
        if not self.log_probs:
            return token, None, None
        return token, *self._log_probs(x, token)

    def _draw(self, x: np.ndarray) -> int:
        """llama.cpp's chain over the candidates: penalties (with their history), cuts, the draw."""
        n = x.shape[0]
        self._candidates["id"] = self._ids
        self._candidates["logit"] = x
        self._candidates["p"] = 0.0
        self._array.size, self._array.selected, self._array.sorted = n, -1, False
        L.llama_sampler_apply(self._chain, ctypes.byref(self._array))
        token = int(self._array.data[self._array.selected].id)
        L.llama_sampler_accept(self._chain, token)
        return token

    def _log_probs(self, x: np.ndarray, token: int) -> tuple[float, tuple[list[int], list[float]] | None]:
        top = x.max()
        log_z = top + np.log(np.sum(np.exp(x - top, dtype=np.float64)))
        chosen = float(x[token] - log_z)
        alternatives = None
        if self.top_log_probs:
            k = self.top_log_probs
            best = np.argpartition(-x, k)[:k]
            best = best[np.argsort(-x[best], kind="stable")]
            alternatives = (best.astype(int).tolist(), (x[best] - log_z).astype(float).tolist())
        return chosen, alternatives

    @property
    def guide_finished(self) -> bool:
        """The guide's text is complete (a closed JSON value): nothing more may follow."""
        return self.matcher is not None and self.matcher.is_stopped()

    def close(self) -> None:
        if self._chain is not None:
            L.llama_sampler_free(self._chain)
            self._chain = None
