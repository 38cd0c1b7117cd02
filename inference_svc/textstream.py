"""Token ids to the text a caller sees: incremental UTF-8 decoding and stop sequences.

Both run once per generated token, so they are plain functions over bytes and strings.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class IncrementalDetokenizer:
    """Decodes token bytes as they arrive; a character split across tokens is held until whole."""

    __slots__ = ("_table", "_decoder")

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._table = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, ids: Sequence[int]) -> str:
        table = self._table
        if len(ids) == 1:
            return self._decoder.decode(table[ids[0]])
        return self._decoder.decode(b"".join(table[i] for i in ids))

    def flush(self) -> str:
        """Whatever is left at the end; an incomplete character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop sequences in streamed text, holding back only what could start one."""

    __slots__ = ("_stops", "_pending")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop sequence matched or None)."""
        if not self._stops:
            return text, None
        pending = self._pending + text
        found_at, found = -1, None
        for stop in self._stops:
            at = pending.find(stop)
            if at >= 0 and (found is None or at < found_at):
                found_at, found = at, stop
        if found is not None:
            self._pending = ""
            return pending[:found_at], found
        hold = self._longest_partial(pending)
        self._pending = pending[len(pending) - hold:] if hold else ""
        return (pending[:-hold] if hold else pending), None

    def flush(self) -> str:
        """The held-back text, once generation has ended without a match."""
        pending, self._pending = self._pending, ""
        return pending

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
