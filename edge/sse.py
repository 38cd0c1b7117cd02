"""Server-Sent Event bytes for streamed completions, built without per-token objects.

Everything constant in a stream (id, created, model, the JSON around the delta) is encoded
once; a content chunk is then two byte strings around one json.dumps of the new text. One
encoder per endpoint: chat.completion.chunk and the legacy text_completion.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cloudach.inference.v1 import inference_pb2 as pb
from edge.logprobs import chat_logprobs, legacy_logprobs

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

_FINISH_REASONS = {"stop", "length", "tool_calls"}


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def usage_dict(usage: pb.Usage) -> dict:
    """OpenAI's usage object (chat and legacy completions alike)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def error_event(envelope: dict) -> bytes:
    """A failure after the stream began: the SDKs raise when they read it."""
    return b"data: " + _dumps(envelope).encode() + b"\n\n"


class _Encoder:
    """What the chunk encoders share: the constant envelope and the usage convention."""

    __slots__ = ("model", "_meta", "_usage_null")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool, object_name: str) -> None:
        self.model = model
        self._meta = (f'"id":{_dumps(completion_id)},"object":"{object_name}","created":{created},'
                      f'"model":{_dumps(model)}')
        # OpenAI: with include_usage every chunk carries "usage": null but the extra last one.
        self._usage_null = ',"usage":null' if include_usage else ""

    def _usage_tail(self, usage: dict | None) -> str:
        """The last choice chunk carries the usage unless an include_usage chunk follows."""
        return self._usage_null if self._usage_null or usage is None else f',"usage":{_dumps(usage)}'

    def usage(self, usage: dict) -> bytes:
        """stream_options.include_usage's extra chunk: no choices, the whole request's usage."""
        return f'data: {{{self._meta},"choices":[],"usage":{_dumps(usage)}}}\n\n'.encode()


class ChunkEncoder(_Encoder):
    """The `data:` events of one chat.completion.chunk stream."""

    __slots__ = ("_opens", "_content_close")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        super().__init__(completion_id, created, model, include_usage, "chat.completion.chunk")
        self._opens: dict[int, bytes] = {}
        self._content_close = f'}},"logprobs":null,"finish_reason":null}}]{self._usage_null}}}\n\n'.encode()

    def _open(self, index: int) -> bytes:
        """Everything before the delta object of choice index's chunk."""
        opened = self._opens.get(index)
        if opened is None:
            opened = self._opens[index] = f'data: {{{self._meta},"choices":[{{"index":{index},"delta":'.encode()
        return opened

    def role(self, index: int = 0) -> bytes:
        return self._open(index) + b'{"role":"assistant","content":""' + self._content_close

    def content(self, text: str, index: int = 0, logprobs: Sequence[pb.TokenLogProb] = ()) -> bytes:
        if logprobs:
            return self._delta(index, {"content": text}, _dumps(chat_logprobs(logprobs)))
        return self._open(index) + b'{"content":' + _dumps(text).encode() + self._content_close

    def tool_call(self, call: pb.ToolCallDelta, index: int = 0, logprobs: Sequence[pb.TokenLogProb] | None = None) -> bytes:
        """A call's first delta (index, id, type, name, empty arguments), or a fragment of its arguments."""
        if call.id:
            entry = {"index": call.index, "id": call.id, "type": "function",
                     "function": {"name": call.name, "arguments": ""}}
        else:
            entry = {"index": call.index, "function": {"arguments": call.arguments}}
        return self._delta(index, {"tool_calls": [entry]}, _dumps(chat_logprobs(logprobs)) if logprobs else "null")

    def _delta(self, index: int, delta: dict, logprobs: str) -> bytes:
        return (self._open(index) + f'{_dumps(delta)},"logprobs":{logprobs},"finish_reason":null}}]'
                f'{self._usage_null}}}\n\n'.encode())

    def finish(self, reason: str, usage: dict | None, index: int = 0) -> bytes:
        assert reason in _FINISH_REASONS
        return (self._open(index) + f'{{}},"logprobs":null,"finish_reason":"{reason}"}}]'
                f'{self._usage_tail(usage)}}}\n\n'.encode())


class TextCompletionEncoder(_Encoder):
    """The `data:` events of one legacy text_completion stream; tracks each choice's text offset
    for the legacy log probs' text_offset."""

    __slots__ = ("_offsets",)

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        super().__init__(completion_id, created, model, include_usage, "text_completion")
        self._offsets: dict[int, int] = {}

    def content(self, text: str, index: int = 0, logprobs: Sequence[pb.TokenLogProb] | None = None) -> bytes:
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(text)
        encoded = "null" if logprobs is None else _dumps(legacy_logprobs(logprobs, offset))
        return (f'data: {{{self._meta},"choices":[{{"text":{_dumps(text)},"index":{index},"logprobs":{encoded},'
                f'"finish_reason":null}}]{self._usage_null}}}\n\n').encode()

    def finish(self, reason: str, usage: dict | None, index: int = 0) -> bytes:
        assert reason in _FINISH_REASONS
        return (f'data: {{{self._meta},"choices":[{{"text":"","index":{index},"logprobs":null,'
                f'"finish_reason":"{reason}"}}]{self._usage_tail(usage)}}}\n\n').encode()
