"""Server-Sent Event bytes for streamed chat completions, built without per-token objects.

Everything constant in a stream (id, created, model, the JSON around the delta) is encoded
once; a content chunk is then two byte strings around one json.dumps of the new text.
"""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

_FINISH_REASONS = {"stop", "length"}


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_event(envelope: dict) -> bytes:
    """A failure after the stream began: the SDKs raise when they read it."""
    return b"data: " + _dumps(envelope).encode() + b"\n\n"


class ChunkEncoder:
    """The `data:` events of one chat.completion.chunk stream."""

    __slots__ = ("model", "_meta", "_choice_open", "_content_open", "_content_close", "_usage_null")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.model = model
        self._meta = f'"id":{_dumps(completion_id)},"object":"chat.completion.chunk","created":{created},"model":{_dumps(model)}'
        # OpenAI: with include_usage every chunk carries "usage": null but the extra last one.
        self._usage_null = ',"usage":null' if include_usage else ""
        self._choice_open = f'data: {{{self._meta},"choices":[{{"index":0,"delta":'.encode()
        self._content_open = self._choice_open + b'{"content":'
        self._content_close = f'}},"logprobs":null,"finish_reason":null}}]{self._usage_null}}}\n\n'.encode()

    def role(self) -> bytes:
        return self._choice_open + b'{"role":"assistant","content":""' + self._content_close

    def content(self, text: str) -> bytes:
        return self._content_open + _dumps(text).encode() + self._content_close

    def finish(self, reason: str, usage: dict | None) -> bytes:
        """The last choice chunk; it carries the usage unless an include_usage chunk follows."""
        assert reason in _FINISH_REASONS
        tail = self._usage_null if self._usage_null else f',"usage":{_dumps(usage)}'
        return self._choice_open + f'{{}},"logprobs":null,"finish_reason":"{reason}"}}]{tail}}}\n\n'.encode()

    def usage(self, usage: dict) -> bytes:
        """stream_options.include_usage's extra chunk: no choices, the whole request's usage."""
        return f'data: {{{self._meta},"choices":[],"usage":{_dumps(usage)}}}\n\n'.encode()
