"""Chat templates, rendered as pieces: control tokens kept apart from text.

Control tokens are looked up as single ids and only the text between them is tokenized, with
special-token parsing off. So a user who writes "<|im_end|>" in a message gets those characters,
not a forged end of turn, and the ids still equal what the model's own tokenizer gives for the
rendered template (both split on control tokens before running BPE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Special:
    """A control token, by its text form (e.g. "<|eot_id|>")."""

    token: str


Piece = str | Special


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system", "user", "assistant", "tool" (or a tool format's own role, e.g. "ipython")
    content: str
    #: an assistant turn's tool calls (inference.v1 ToolCall), rendered by inference_svc.tools
    tool_calls: tuple = ()


def chatml(messages: Sequence[Message], default_system: str | None) -> list[Piece]:
    """SmolLM2's ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per turn, then the assistant's header."""
    pieces: list[Piece] = []
    turns = list(messages)
    if default_system and (not turns or turns[0].role != "system"):
        turns.insert(0, Message("system", default_system))
    for m in turns:
        pieces += [Special("<|im_start|>"), f"{m.role}\n{m.content}", Special("<|im_end|>"), "\n"]
    pieces += [Special("<|im_start|>"), "assistant\n"]
    return pieces


def llama3(messages: Sequence[Message], default_system: str | None) -> list[Piece]:
    """Llama 3 Instruct: one BOS, then a header and <|eot_id|> per turn, then the assistant's header."""
    pieces: list[Piece] = [Special("<|begin_of_text|>")]
    turns = list(messages)
    if default_system and (not turns or turns[0].role != "system"):
        turns.insert(0, Message("system", default_system))
    for m in turns:
        pieces += [
            Special("<|start_header_id|>"),
            m.role,
            Special("<|end_header_id|>"),
            "\n\n" + m.content.strip(),
            Special("<|eot_id|>"),
        ]
    pieces += [Special("<|start_header_id|>"), "assistant", Special("<|end_header_id|>"), "\n\n"]
    return pieces


TEMPLATES: dict[str, Callable[[Sequence[Message], str | None], list[Piece]]] = {
    "chatml": chatml,
    "llama3": llama3,
}

#: what each template's model expects before a raw prompt (the legacy completions API)
RAW_PREFIXES: dict[str, tuple[Piece, ...]] = {
    "chatml": (),
    "llama3": (Special("<|begin_of_text|>"),),
}


def render_text(pieces: Sequence[Piece]) -> str:
    """The template as one string, as a Jinja chat template would print it."""
    return "".join(p.token if isinstance(p, Special) else p for p in pieces)
