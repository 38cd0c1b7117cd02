"""Reading and checking one request to our `tensorrt_llm` Triton model: the token-id contract.

Input names are those of TensorRT-LLM's last C++ Triton backend where one existed, so the contract
stays recognisable: `input_ids`, `request_output_len`, `end_id`, `stop_words_list`, sampling
inputs, `num_return_sequences`, `return_log_probs`, `min_tokens`, `embedding_bias`,
`guided_decoding_guide_type` / `guided_decoding_guide`. Two are ours: `num_top_log_probs` (how
many alternatives per step come with the log probs) and `streaming` as before.

A request the model cannot serve is refused with a message that starts with `invalid input
'NAME':`, which inference_svc turns into INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cloudach.guides import GUIDE_TYPES

#: OpenAI's limit on top_logprobs
MAX_TOP_LOG_PROBS = 20


class Refused(Exception):
    """A request the model will not run; str() is the message the caller gets."""


def invalid(name: str, why: str) -> Refused:
    return Refused(f"invalid input '{name}': {why}")


class Inputs(Protocol):
    """A request's input tensors by name (None when absent), as numpy arrays."""

    def get(self, name: str) -> np.ndarray | None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    n_vocab: int
    #: the longest sequence (prompt plus completion) one sequence may reach
    max_sequence_tokens: int
    #: the most sequences one request may ask for (num_return_sequences)
    max_return_sequences: int
    #: KV-cache cells in all: a request needing more (prompt + n × max new tokens) can never run
    kv_cache_tokens: int


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    #: no ending token before this many generated tokens
    min_tokens: int = 0
    #: added to the logits before sampling (logit bias), [vocab]
    embedding_bias: np.ndarray | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    end_id: int | None
    stop_words: tuple[tuple[int, ...], ...]
    streaming: bool
    exclude_input: bool
    num_sequences: int
    return_log_probs: bool
    top_log_probs: int
    guide_type: str | None
    guide: str | None
    sampling: Sampling
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    #: report the prompt tokens served from reused KV cells (num_cached_tokens)
    return_num_cached_tokens: bool = False

    @property
    def kv_tokens_needed(self) -> int:
        """Cells the request may fill: the prompt once (its sequences share it), each completion."""
        return len(self.input_ids) + self.num_sequences * self.max_new_tokens


def _scalar(inputs: Inputs, name: str, default: Any = None) -> Any:
    value = inputs.get(name)
    if value is None:
        return default
    flat = value.reshape(-1)
    if flat.size == 0:
        return default
    item = flat[0]
    return item.decode() if isinstance(item, bytes) else item.item() if hasattr(item, "item") else item


def _stop_words(inputs: Inputs) -> tuple[tuple[int, ...], ...]:
    """TensorRT-LLM's [2, L] layout: flat ids, then cumulative end offsets padded with -1."""
    value = inputs.get("stop_words_list")
    if value is None:
        return ()
    try:
        array = value.reshape(2, -1)
    except ValueError:
        raise invalid("stop_words_list", "expected the [2, L] layout of ids and offsets") from None
    ids, offsets = array[0].tolist(), [o for o in array[1].tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if end > start:
            words.append(tuple(ids[start:end]))
        start = end
    return tuple(words)


def _number(inputs: Inputs, name: str, default: float, low: float, high: float, cast: Callable = float) -> Any:
    value = _scalar(inputs, name, default)
    if not (np.isfinite(value) and low <= value <= high):
        raise invalid(name, f"{value} is outside {low:g}..{high:g}")
    return cast(value)


def is_stop(inputs: Inputs) -> bool:
    """A `stop=true` request: end the running request with the same id, generate nothing."""
    return bool(_scalar(inputs, "stop", False))


def parse(request_id: str, inputs: Inputs, limits: Limits) -> GenerationRequest:
    """The request, checked against the model's limits; raises Refused naming the input."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise invalid("input_ids", "required")
    input_ids = ids.reshape(-1).tolist()
    input_ids = input_ids[: _scalar(inputs, "input_lengths", len(input_ids))]
    if not input_ids:
        raise invalid("input_ids", "empty")
    if min(input_ids) < 0 or max(input_ids) >= limits.n_vocab:
        raise invalid("input_ids", f"ids outside the vocabulary (0..{limits.n_vocab - 1})")
    max_new = _scalar(inputs, "request_output_len")
    if max_new is None or max_new < 1:
        raise invalid("request_output_len", "must be at least 1")
    if len(input_ids) + max_new > limits.max_sequence_tokens:
        raise invalid("request_output_len", f"input_lengths + request_output_len = {len(input_ids) + max_new} exceeds "
                      f"the context window of {limits.max_sequence_tokens} tokens")
    n = _scalar(inputs, "num_return_sequences", 1) or 1
    if not 1 <= n <= limits.max_return_sequences:
        raise invalid("num_return_sequences", f"{n} is outside 1..{limits.max_return_sequences}")
    if (_scalar(inputs, "beam_width", 1) or 1) > 1:
        raise invalid("beam_width", "beam search is not supported: sample n sequences instead")
    top = _scalar(inputs, "num_top_log_probs", 0) or 0
    if not 0 <= top <= MAX_TOP_LOG_PROBS:
        raise invalid("num_top_log_probs", f"{top} is outside 0..{MAX_TOP_LOG_PROBS}")
    guide_type = _scalar(inputs, "guided_decoding_guide_type")
    guide = _scalar(inputs, "guided_decoding_guide")
    if guide_type is not None and guide_type not in GUIDE_TYPES:
        raise invalid("guided_decoding_guide_type", f"{guide_type!r} is not one of {', '.join(GUIDE_TYPES)}")
    if guide_type not in (None, "json") and not guide:
        raise invalid("guided_decoding_guide", f"a {guide_type} guide needs its text")
    bias = inputs.get("embedding_bias")
    if bias is not None:
        bias = bias.reshape(-1).astype(np.float32)
        if bias.size != limits.n_vocab or not np.all(np.isfinite(bias) | np.isneginf(bias)):
            raise invalid("embedding_bias", f"expected {limits.n_vocab} finite values (or -inf), one per token")
    request = GenerationRequest(
        request_id=request_id,
        input_ids=input_ids,
        max_new_tokens=max_new,
        end_id=_scalar(inputs, "end_id"),
        stop_words=_stop_words(inputs),
        streaming=bool(_scalar(inputs, "streaming", False)),
        exclude_input=bool(_scalar(inputs, "exclude_input_in_output", False)),
        num_sequences=n,
        return_log_probs=bool(_scalar(inputs, "return_log_probs", False)) or top > 0,
        top_log_probs=top,
        guide_type=guide_type,
        guide=guide,
        sampling=Sampling(
            temperature=_number(inputs, "temperature", 1.0, 0.0, 100.0),
            top_k=_number(inputs, "runtime_top_k", 0, 0, limits.n_vocab, int),
            top_p=_number(inputs, "runtime_top_p", 1.0, 0.0, 1.0) or 1.0,
            repetition_penalty=_number(inputs, "repetition_penalty", 1.0, 0.0, 100.0),
            presence_penalty=_number(inputs, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(inputs, "frequency_penalty", 0.0, -2.0, 2.0),
            seed=_scalar(inputs, "seed"),
            min_tokens=_number(inputs, "min_tokens", 0, 0, max_new, int),
            embedding_bias=bias,
        ),
        return_num_input_tokens=bool(_scalar(inputs, "return_num_input_tokens", False)),
        return_num_output_tokens=bool(_scalar(inputs, "return_num_output_tokens", False)),
        return_num_cached_tokens=bool(_scalar(inputs, "return_num_cached_tokens", False)),
    )
    if request.kv_tokens_needed > limits.kv_cache_tokens:
        raise invalid("num_return_sequences", f"the prompt plus {n} × {max_new} new tokens needs "
                      f"{request.kv_tokens_needed} KV-cache cells; the model has {limits.kv_cache_tokens}")
    for flag in ("return_context_logits", "return_generation_logits"):
        if _scalar(inputs, flag, False):
            raise invalid(flag, "logits are not returned: ask for log probs (return_log_probs)")
    if inputs.get("bad_words_list") is not None:
        raise invalid("bad_words_list", "not supported: use embedding_bias with -inf for the tokens to ban")
    return request
