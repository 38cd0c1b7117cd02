"""POST /v1/completions, the legacy API: prompts given to the model as they are (no chat template),
answered as text_completion objects. The same inference_svc RPC and relay as chat (edge.serving)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from aiohttp import web

from cloudach.inference.v1 import inference_pb2 as pb
from edge import params
from edge.errors import bad_request
from edge.logprobs import legacy_logprobs
from edge.schema import CREATE_COMPLETION_REQUEST
from edge.job import Choice, Job
from edge.serving import serve
from edge.sse import TextCompletionEncoder
from edge.validation import validate

#: OpenAI's default output length for legacy completions
DEFAULT_MAX_TOKENS = 16


def parse_completion_request(body: dict) -> Job:
    """Validates a legacy completions body and translates it: one GenerateRequest per prompt."""
    validate(CREATE_COMPLETION_REQUEST, body)
    if body.get("suffix"):
        raise bad_request("Inserting text with 'suffix' is not supported.", param="suffix", code="unsupported_value")
    n = body.get("n") or 1
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad_request(f"Unsupported value: 'best_of' must equal 'n' ({n}): generating extra candidates to "
                          "choose from is not supported.", param="best_of", code="unsupported_value")
    logprobs = body.get("logprobs")
    echo = bool(body.get("echo"))
    if echo and logprobs is not None:
        raise bad_request("'echo' together with 'logprobs' is not supported: the prompt's log probs are not "
                          "computed.", param="echo", code="unsupported_value")
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    sampling = params.sampling(body)
    stopping = params.stopping(body, "max_tokens", DEFAULT_MAX_TOKENS)
    generates = [
        pb.GenerateRequest(
            # One id per prompt: it names each generation in Triton and the logs.
            request_id=completion_id if len(prompts) == 1 else f"{completion_id}-{i}",
            model=body["model"], prompt=prompt, sampling=sampling, stopping=stopping, n=n,
            logprobs=logprobs is not None, top_logprobs=logprobs or 0,
        )
        for i, prompt in enumerate(prompts)
    ]
    return Job.from_body(body, completion_id, generates, TextCompletionFormat(echo), "max_tokens",
                         prompt_chars=sum(len(p) for p in prompts), operation="text_completion")


class TextCompletionFormat:
    """text_completion objects, whole or streamed; with echo each choice begins with its prompt."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo

    @staticmethod
    def encoder(job: Job) -> TextCompletionEncoder:
        return TextCompletionEncoder(job.id, job.created, job.model, job.include_usage)

    def opening(self, job: Job, encoder: TextCompletionEncoder) -> bytes:
        if not self.echo:
            return b""
        return b"".join(encoder.content(self._prompt(job, i), i) for i in range(job.choices))

    def body(self, job: Job, choices: Sequence[Choice], usage: dict) -> dict:
        return {
            "id": job.id,
            "object": "text_completion",
            "created": job.created,
            "model": job.model,
            "choices": [
                {
                    "text": (self._prompt(job, c.index) if self.echo else "") + c.text,
                    "index": c.index,
                    "logprobs": legacy_logprobs(c.logprobs, 0) if job.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage,
        }

    @staticmethod
    def _prompt(job: Job, index: int) -> str:
        return job.generates[index // job.n].prompt


async def create_completion(request: web.Request) -> web.StreamResponse:
    return await serve(request, parse_completion_request)
