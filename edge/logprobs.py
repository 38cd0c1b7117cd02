"""Log probs from inference_svc's TokenLogProb messages, in OpenAI's two shapes.

Chat completions: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
Legacy completions: `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloudach.inference.v1 import inference_pb2 as pb


def _entry(t: pb.TokenLogProb) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}


def chat_content(entries: Sequence[pb.TokenLogProb]) -> list[dict]:
    return [{**_entry(t), "top_logprobs": [_entry(a) for a in t.top_logprobs]} for t in entries]


def chat_logprobs(entries: Sequence[pb.TokenLogProb]) -> dict:
    return {"content": chat_content(entries), "refusal": None}


def legacy_logprobs(entries: Sequence[pb.TokenLogProb], offset: int) -> dict:
    """offset: where the first token's text starts in the choice's text (characters)."""
    tokens, offsets = [], []
    for t in entries:
        tokens.append(t.token)
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in entries],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in entries],
        "text_offset": offsets,
    }
