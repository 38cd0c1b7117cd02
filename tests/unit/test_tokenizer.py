"""The GGUF tokenizer's fast path (one llama.cpp call, short texts remembered) gives exactly the ids
llama-cpp-python's own Llama.tokenize gives."""

from __future__ import annotations

from tests.integration.services import MODEL

TEXTS = ["", "\n", "user", "assistant", "Hi", " lighthouse", "héllo wörld 👋🏽", "a" * 64, "a" * 65,
         "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 40,
         "<|im_start|>user", "日本語のテキスト" * 30, "\x00\x01 control \t bytes"]


def test_the_fast_path_gives_the_ids_llama_cpp_gives(registry):
    tokenizer = registry.get(MODEL).tokenizer
    for text in TEXTS:
        expected = tokenizer._llama.tokenize(text.encode(), add_bos=False, special=False)
        assert tokenizer.encode(text) == expected, text[:40]
        assert tokenizer.encode(text) == expected  # remembered, for a short text: the same, and a copy
    remembered = tokenizer.encode("Hi")
    remembered.append(0)
    assert tokenizer.encode("Hi") == tokenizer._llama.tokenize(b"Hi", add_bos=False, special=False)
