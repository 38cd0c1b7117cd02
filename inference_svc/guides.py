"""Checking a structured-output guide before a request is accepted, with the grammar engine the
models use (cloudach.guides), so a guide refused here would be refused there, and one accepted
here compiles there."""

from __future__ import annotations

import functools

from cloudach.errors import InvalidArgument
from cloudach.guides import GuideError, compile_guide
from cloudach.inference.v1 import inference_pb2 as pb

#: the Triton contract's guided_decoding_guide_type for each guide type
TRITON_TYPES = {pb.GUIDE_TYPE_JSON_OBJECT: "json", pb.GUIDE_TYPE_JSON_SCHEMA: "json_schema",
                pb.GUIDE_TYPE_REGEX: "regex", pb.GUIDE_TYPE_EBNF_GRAMMAR: "ebnf_grammar"}
MAX_GUIDE_CHARS = 64 * 1024


@functools.lru_cache(maxsize=256)
def _problem(guide_type: str, text: str) -> str:
    try:
        compile_guide(guide_type, text)
    except GuideError as problem:
        return str(problem)
    return ""


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
    kind = TRITON_TYPES[guide.type]
    problem = _problem(kind, guide.text)
    if problem:
        raise InvalidArgument(f"The guide could not be compiled: {problem[:300]}", param="guide.text",
                              code="invalid_guide")
    return kind, guide.text
