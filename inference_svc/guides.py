"""Checking a structured-output guide before a request is accepted, with the grammar engine the
models use (llguidance: the CPU model's, and TensorRT-LLM's guided-decoding backend in
production), so a guide refused here would be refused there, and one accepted here compiles."""

from __future__ import annotations

import functools

from cloudach.errors import InvalidArgument
from cloudach.inference.v1 import inference_pb2 as pb

#: the Triton contract's guided_decoding_guide_type for each guide type
TRITON_TYPES = {pb.GUIDE_TYPE_JSON_OBJECT: "json", pb.GUIDE_TYPE_JSON_SCHEMA: "json_schema",
                pb.GUIDE_TYPE_REGEX: "regex", pb.GUIDE_TYPE_EBNF_GRAMMAR: "ebnf_grammar"}
MAX_GUIDE_CHARS = 64 * 1024


@functools.lru_cache(maxsize=256)
def _problem(kind: int, text: str) -> str:
    import llguidance
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        if kind == pb.GUIDE_TYPE_JSON_SCHEMA:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        elif kind == pb.GUIDE_TYPE_REGEX:
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(text))
        return llguidance.LLMatcher.validate_grammar(grammar).strip()
    except Exception as error:  # noqa: BLE001 - whatever the grammar's parser says
        return str(error).strip() or type(error).__name__


def check_guide(guide: pb.Guide) -> tuple[str, str] | None:
    """The guide as the Triton contract's (type, text), or None for free text; InvalidArgument
    naming "guide" when it cannot be compiled."""
    if guide.type == pb.GUIDE_TYPE_UNSPECIFIED:
        return None
    if guide.type not in TRITON_TYPES:
        raise InvalidArgument("unknown guide type", param="guide.type")
    if guide.type == pb.GUIDE_TYPE_JSON_OBJECT:
        return "json", ""
    if not guide.text or len(guide.text) > MAX_GUIDE_CHARS:
        raise InvalidArgument(f"the guide must be 1 to {MAX_GUIDE_CHARS} characters", param="guide.text")
    problem = _problem(guide.type, guide.text)
    if problem:
        raise InvalidArgument(f"The guide could not be compiled: {problem[:300]}", param="guide.text",
                              code="invalid_guide")
    return TRITON_TYPES[guide.type], guide.text
