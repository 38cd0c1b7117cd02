"""The models inference_svc serves: public id -> tokenizer, chat template, ending tokens, limits.

How a backend runs a model (for Triton: which model, its end and pad ids) is the engine's
business: each entry's `[models.engine]` table is handed to the engine unread."""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudach.errors import model_not_found
from inference_svc.templates import RAW_PREFIXES, TEMPLATES, Message, Piece
from inference_svc.tokenizer import Tokenizer, encode_pieces, load_tokenizer
from inference_svc.tools import FORMATS


@dataclass(frozen=True)
class ModelSpec:
    id: str
    tokenizer: Tokenizer = field(repr=False)
    chat_template: str
    #: the tokens that end the model's turn: generating one ends the completion
    stop_token_ids: frozenset[int]
    context_window: int
    default_max_tokens: int
    max_output_tokens: int
    default_system_prompt: str | None = None
    #: the most choices (n) one request may ask for
    max_choices: int = 8
    #: the most KV-cache cells one request may fill: its prompt once and each choice's tokens
    #: (unset: the context window for each of max_choices)
    max_request_tokens: int | None = None
    #: how tools are shown to the model and its calls read back (inference_svc.tools.FORMATS)
    tool_format: str = "hermes"
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    owned_by: str = "cloudach"
    created_unix_s: int = 0
    #: the engine's own settings for this model, opaque here
    engine: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most bytes (so characters) one token stands for."""
        return max(len(b) for b in self.tokenizer.token_bytes)

    def render(self, messages: Sequence[Message], tools: Sequence[Any] = ()) -> list[Piece]:
        """The chat in the model's template; tools (inference.v1 Tool) and past calls and results
        shown in its tool format."""
        turns = FORMATS[self.tool_format].prepare(messages, tools, self.default_system_prompt)
        return TEMPLATES[self.chat_template](turns, None if tools else self.default_system_prompt)

    def encode_chat(self, messages: Sequence[Message], tools: Sequence[Any] = ()) -> list[int]:
        return encode_pieces(self.tokenizer, self.render(messages, tools))

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt (no chat template), after what the model expects first (e.g. its BOS)."""
        return encode_pieces(self.tokenizer, [*RAW_PREFIXES[self.chat_template], text] if text else [])


class ModelRegistry:
    def __init__(self, models: Sequence[ModelSpec]) -> None:
        self._models = {m.id: m for m in models}

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._models[model_id]
        except KeyError:
            raise model_not_found(model_id) from None

    def __iter__(self):
        return iter(self._models.values())


def load_registry(path: str, tokenizer_loader: Callable[[str], Tokenizer] = load_tokenizer) -> ModelRegistry:
    """Reads a models TOML file (see deploy/inference/) and loads each model's tokenizer once."""
    with open(path, "rb") as f:
        document = tomllib.load(f)
    specs = []
    for entry in document.get("models", []):
        entry = dict(entry)
        template = entry["chat_template"]
        if template not in TEMPLATES:
            raise ValueError(f"model {entry['id']}: unknown chat_template {template!r}")
        if entry.get("tool_format", "hermes") not in FORMATS:
            raise ValueError(f"model {entry['id']}: unknown tool_format {entry['tool_format']!r}")
        tokenizer = tokenizer_loader(entry.pop("tokenizer"))
        stop_ids = frozenset(entry.pop("stop_token_ids", []))
        if not stop_ids:
            raise ValueError(f"model {entry['id']}: stop_token_ids must name the token(s) ending its turn")
        for token_id in stop_ids:
            if not 0 <= token_id < tokenizer.vocab_size:
                raise ValueError(f"model {entry['id']}: token id {token_id} is outside the vocabulary")
        specs.append(ModelSpec(tokenizer=tokenizer, stop_token_ids=stop_ids, **entry))
    if not specs:
        raise ValueError(f"{path} defines no models")
    return ModelRegistry(specs)
