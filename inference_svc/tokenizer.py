"""Tokenizers inference_svc uses: the GGUF's own (llama.cpp) or a Hugging Face tokenizer.json.

Both give, for the hot path, a table from token id to the exact bytes it stands for; both models
we serve (Llama 3, SmolLM2) use byte-level BPE, so concatenated token bytes are the text exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

from cloudach.paths import resolve_path
from inference_svc.templates import Piece, Special


#: texts this short are tokenized once and remembered (GgufTokenizer)
SHORT_TEXT_CHARS = 64


class Tokenizer(Protocol):
    vocab_size: int
    #: token id -> the bytes it decodes to; control tokens decode to b"".
    token_bytes: Sequence[bytes]

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; control-token text is never parsed as control tokens."""

    def special_id(self, token: str) -> int:
        """The id of one control token, e.g. "<|im_end|>"."""


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, Special):
            ids.append(tokenizer.special_id(piece.token))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


class GgufTokenizer:
    """The tokenizer stored in a GGUF file, through llama.cpp (the model's own)."""

    def __init__(self, path: str) -> None:
        from llama_cpp import Llama

        self._llama = Llama(model_path=path, vocab_only=True, verbose=False)
        self._vocab = self._llama._model.vocab  # llama.cpp's vocabulary handle, for one-call tokenizing
        self.vocab_size = self._llama.n_vocab()
        self.token_bytes = tuple(self._llama.detokenize([i], special=False) for i in range(self.vocab_size))
        self._special: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        if len(text) <= SHORT_TEXT_CHARS:
            return list(self._short(text))
        return self._tokenize(text.encode())

    @functools.lru_cache(maxsize=4096)
    def _short(self, text: str) -> tuple[int, ...]:
        """The chat template's pieces ("user", "\n", role headers) and short messages come again
        and again, and llama.cpp spends ~60 µs on any call, however short its text."""
        return tuple(self._tokenize(text.encode()))

    def _tokenize(self, data: bytes) -> list[int]:
        import llama_cpp

        # One call into llama.cpp with room enough (a byte-level BPE token holds at least one
        # byte), where Llama.tokenize first asks with room for none (a vocab-only model's n_ctx
        # is 0), then again: half the time, the same ids.
        room = len(data) + 8
        ids = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), ids, room, False, False)
        if n < 0:
            raise RuntimeError(f"llama.cpp could not tokenize {len(data)} bytes ({n})")
        return ids[:n]

    def special_id(self, token: str) -> int:
        if token not in self._special:
            ids = self._llama.tokenize(token.encode(), add_bos=False, special=True)
            if len(ids) != 1:
                raise ValueError(f"{token!r} is not a single control token of this tokenizer")
            self._special[token] = ids[0]
        return self._special[token]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


class HfTokenizer:
    """A byte-level BPE tokenizer.json (Llama 3's), through Hugging Face `tokenizers`."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Hf

        self._tok = _Hf.from_file(path)
        self._tok.encode_special_tokens = True  # message text never becomes control tokens
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        decoder = _byte_decoder()
        table = []
        for i in range(self.vocab_size):
            if i in added:
                table.append(b"" if added[i].special else added[i].content.encode())
                continue
            piece = self._tok.id_to_token(i) or ""
            try:
                table.append(bytes(decoder[c] for c in piece))
            except KeyError:
                raise ValueError(f"{path} is not a byte-level BPE tokenizer (token {i}: {piece!r})") from None
        self.token_bytes = tuple(table)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def special_id(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        if found is None:
            raise ValueError(f"{token!r} is not a control token of this tokenizer")
        return found


def load_tokenizer(spec: str) -> Tokenizer:
    """A .gguf path gives the GGUF's tokenizer; a .json path a Hugging Face tokenizer.json."""
    path = resolve_path(spec)
    if path.endswith(".gguf"):
        return GgufTokenizer(path)
    if path.endswith(".json"):
        return HfTokenizer(path)
    raise ValueError(f"unknown tokenizer format: {spec} (expected .gguf or tokenizer.json)")
