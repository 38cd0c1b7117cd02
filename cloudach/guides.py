"""Structured-output guides compiled with llguidance: the grammar engine of the CPU model and
TensorRT-LLM's guided-decoding backend in production. One function serves inference_svc's check
before a request is accepted and the CPU model's matchers, so both accept exactly the same guides.
"""

from __future__ import annotations

from typing import Any

#: the guide types of the Triton contract (guided_decoding_guide_type)
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")


class GuideError(ValueError):
    """A guide that does not compile; str() says why."""


def compile_guide(guide_type: str, text: str, tokenizer: Any = None) -> str:
    """The guide as an llguidance grammar, checked (against the model's tokenizer when given)."""
    import llguidance
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        if guide_type == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
        elif guide_type == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        elif guide_type == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        elif guide_type == "ebnf_grammar":
            grammar = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(text))
        else:
            raise GuideError(f"unknown guide type {guide_type!r}")
        problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    except GuideError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the guide's parser says
        problem = str(error) or type(error).__name__
    if problem.strip():
        raise GuideError(problem.strip()[:500])
    return grammar
