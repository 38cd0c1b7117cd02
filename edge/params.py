"""Request fields chat and legacy completions share, as inference_svc's messages."""

from __future__ import annotations

from cloudach.inference.v1 import inference_pb2 as pb
from edge.errors import bad_request


def include_usage(body: dict) -> bool:
    """stream_options.include_usage, refusing stream_options without stream as OpenAI does."""
    options = body.get("stream_options")
    if options is not None and not body.get("stream"):
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options")
    return bool(options and options.get("include_usage"))


def sampling(body: dict) -> pb.SamplingParameters:
    """temperature, top_p, seed, the penalties and logit_bias (keys: token ids as strings)."""
    params = pb.SamplingParameters(
        presence_penalty=body.get("presence_penalty") or 0.0,
        frequency_penalty=body.get("frequency_penalty") or 0.0,
    )
    for field in ("temperature", "top_p", "seed"):
        if body.get(field) is not None:
            setattr(params, field, body[field])
    for token, bias in (body.get("logit_bias") or {}).items():
        if not (token.isascii() and token.isdigit()) or int(token) >= 2**32:
            raise bad_request(f"Invalid key in 'logit_bias': {token}. You should only be submitting non-negative "
                              "integers.", param="logit_bias", code="invalid_value")
        params.logit_bias[int(token)] = bias
    return params


def stopping(body: dict, max_tokens_name: str, default_max_tokens: int | None = None) -> pb.StoppingCriteria:
    """The output length (max_tokens_name's value, else the default) and stop sequences."""
    criteria = pb.StoppingCriteria()
    max_tokens = body.get(max_tokens_name)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        criteria.max_new_tokens = max_tokens
    stop = body.get("stop")
    if stop is not None:
        criteria.stop_sequences.extend([stop] if isinstance(stop, str) else stop)
    return criteria


#: bounds what a caller's end-user id may add to every usage record
MAX_USER_CHARS = 256


def user(body: dict) -> str:
    """OpenAI's `user`, kept on the usage record."""
    value = body.get("user") or ""
    if len(value) > MAX_USER_CHARS:
        raise bad_request(f"Invalid 'user': string too long. Expected a string with maximum length {MAX_USER_CHARS}, "
                          f"but got a string with length {len(value)} instead.", param="user", code="string_above_max_length")
    return value
