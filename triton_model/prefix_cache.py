"""Prompt prefixes whose KV cells the CPU model keeps after their request ends, to reuse them for
a later prompt that starts the same way (a shared system prompt, the earlier turns of a chat), as
TensorRT-LLM's KV-cache block reuse does on the GPU.

Prompts are evaluated in blocks aligned at multiples of the block size, and only whole blocks are
kept and reused, so a reused block holds exactly the values evaluating it again would give: for a
request decoded alone, reuse changes nothing in its output. Each kept prefix holds its cells under
a llama.cpp sequence id of its own; the least recently used goes first past the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hit:
    sequence_id: int
    tokens: int


class PrefixCache:
    def __init__(self, sequence_ids: Sequence[int], budget_tokens: int, block_tokens: int,
                 forget: Callable[[int], None]) -> None:
        """sequence_ids: the llama.cpp sequence ids it may use; forget(id) frees one's cells."""
        self._free = list(sequence_ids)
        self._budget = budget_tokens
        self._block = block_tokens
        self._forget = forget
        #: sequence id -> the prefix's tokens (whole blocks), least recently used first
        self._entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    @property
    def tokens(self) -> int:
        return sum(len(prefix) for prefix in self._entries.values())

    def lookup(self, prompt: Sequence[int]) -> Hit | None:
        """The longest kept prefix of prompt in whole blocks, leaving at least its last token to
        evaluate (its logits start the completion)."""
        limit = (len(prompt) - 1) // self._block * self._block
        best: Hit | None = None
        for sequence_id, prefix in self._entries.items():
            shared = 0
            for a, b in zip(prefix[:limit], prompt):
                if a != b:
                    break
                shared += 1
            shared = shared // self._block * self._block
            if shared and (best is None or shared > best.tokens):
                best = Hit(sequence_id, shared)
        if best is not None:
            self._entries.move_to_end(best.sequence_id)
        return best

    def keep(self, prompt: Sequence[int], copy: Callable[[int, int], None]) -> None:
        """Keeps prompt's whole blocks: copy(sequence_id, tokens) tags those cells with the id."""
        length = len(prompt) // self._block * self._block
        if length == 0 or length > self._budget:
            return
        prefix = tuple(prompt[:length])
        for sequence_id, kept in self._entries.items():
            if kept[:length] == prefix:
                self._entries.move_to_end(sequence_id)
                return  # already kept (this prefix, or a longer one)
        while self._entries and (not self._free or self.tokens + length > self._budget):
            oldest, _ = self._entries.popitem(last=False)
            self._forget(oldest)
            self._free.append(oldest)
        sequence_id = self._free.pop()
        copy(sequence_id, length)
        self._entries[sequence_id] = prefix
