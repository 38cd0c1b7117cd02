"""The benchmark scenarios. Each returns rows (report.summarize) measured side by side in one run."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from bench.drivers import MODEL, Driver, HttpDriver, InferenceDriver, ModelDriver, TritonDriver
from bench.load import run_load
from bench.report import summarize
from bench.stack import CPU, SYNTHETIC, BenchStack, bench_stack

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
STACK = ("tritonserver", "inference_svc", "edge", "auth_svc", "billing_svc")


@dataclass
class Options:
    duration_s: float = 10.0
    max_tokens: int = 128
    #: per-stream rate of the synthetic model in the overhead scenario (a GPU streams ~50-100 tok/s per request)
    tokens_per_s: float = 100.0
    relay_concurrency: tuple[int, ...] = (100, 500, 1000, 2000)
    real_concurrency: tuple[int, ...] = (1, 4, 16)
    guided_concurrency: tuple[int, ...] = (1, 8)
    features_concurrency: int = 4
    edge_workers: tuple[int, ...] = (1, 2)


async def _measure(driver: Driver, label: str, concurrency: int, options: Options, pids: dict[str, tuple[int, ...]],
                   max_tokens: int | None = None, ramp_s: float = 0.0) -> dict:
    await driver.open()
    try:
        run = await run_load(driver, f"{label} @{concurrency}", concurrency, options.duration_s, PROMPT,
                             max_tokens or options.max_tokens, pids, ramp_s=ramp_s)
    finally:
        await driver.close()
    return summarize(run)


def _drivers(stack: BenchStack) -> list[Driver]:
    return [TritonDriver(stack.triton_grpc),
            InferenceDriver(f"127.0.0.1:{stack.settings.inference_port}", f"127.0.0.1:{stack.settings.auth_port}", stack.api_key),
            HttpDriver(stack.base_url, stack.api_key)]


def overhead(options: Options) -> list[dict]:
    """The synthetic model at a GPU-like pace, reached three ways, one stream at a time."""
    with bench_stack(SYNTHETIC, options.tokens_per_s) as stack:
        return [asyncio.run(_measure(d, d.name, 1, options, stack.pids)) for d in _drivers(stack)]


def relay(options: Options) -> list[dict]:
    """The synthetic model as fast as it goes: first what Triton alone delivers (its cap), then what
    one edge relays at rising concurrency, and non-streaming requests through the edge."""
    with bench_stack(SYNTHETIC, 0) as stack:
        rows = [asyncio.run(_measure(TritonDriver(stack.triton_grpc), "triton (cap)", 64, options, stack.pids))]
        for concurrency in options.relay_concurrency:
            rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key), "edge", concurrency,
                                             options, stack.pids, ramp_s=min(5.0, concurrency / 200))))
        rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key, stream=False),
                                         "edge non-streaming", 32, options, stack.pids, max_tokens=1)))
        return rows


def workers(options: Options) -> list[dict]:
    """One edge process against N behind the same port (SO_REUSEPORT), at the first relay
    concurrency and non-streaming: tokens/s, and edge CPU summed over the workers."""
    rows = []
    for count in options.edge_workers:
        with bench_stack(SYNTHETIC, 0, edge_workers=count) as stack:
            label = f"edge x{count}"
            rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key), label,
                                             options.relay_concurrency[0], options, stack.pids, ramp_s=0.5)))
            rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key, stream=False),
                                             f"{label} non-streaming", 32, options, stack.pids, max_tokens=1)))
    return rows


#: the per-token path's levers, each against the configuration before it, in one run
LEVERS = (
    ("a stream per call", {"CLOUDACH_EDGE_MULTIPLEX": "0", "CLOUDACH_EVENT_LOOP": "asyncio"}),
    ("shared streams", {"CLOUDACH_EDGE_MULTIPLEX": "1", "CLOUDACH_EVENT_LOOP": "asyncio"}),
    ("shared streams, uvloop", {"CLOUDACH_EDGE_MULTIPLEX": "1", "CLOUDACH_EVENT_LOOP": "uvloop"}),
)


def levers(options: Options) -> list[dict]:
    """Each lever's configuration: one stream at a GPU's pace (time to first token), then the
    relay at the first relay concurrency (CPU per token)."""
    rows = []
    for name, env in LEVERS:
        with bench_stack(SYNTHETIC, options.tokens_per_s, extra_env=env) as stack:
            rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key), f"{name}: edge", 1,
                                             options, stack.pids)))
        with bench_stack(SYNTHETIC, 0, extra_env=env) as stack:
            rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key), f"{name}: edge",
                                             options.relay_concurrency[0], options, stack.pids, ramp_s=0.5)))
    return rows


def real_model(options: Options, with_llama_server: bool = True) -> list[dict]:
    """The CPU SmolLM2 stack, and llama-cpp-python's own server on the same GGUF when given."""
    rows = []
    with bench_stack(CPU) as stack:
        for concurrency in options.real_concurrency:
            rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key), "cloudach (CPU)",
                                             concurrency, options, stack.pids)))
    if with_llama_server:
        from bench.llama_server import llama_server

        with llama_server() as (url, pid):
            for concurrency in options.real_concurrency:
                rows.append(asyncio.run(_measure(HttpDriver(url, "none", model="smollm2"), "llama_cpp.server",
                                                 concurrency, options, {"llama_cpp.server": pid})))
    return rows


#: a long system prompt (about 330 tokens), as a support bot or an agent sends with every request
SYSTEM_PROMPT = ("You are the support assistant of a small bicycle shop. Answer briefly and politely. The shop "
                 "opens at nine and closes at six, Monday to Saturday; it repairs every kind of bicycle, sells "
                 "second-hand frames, and rents tandems by the hour. Never promise a repair date. ") * 6


class PrefixDriver(HttpDriver):
    """Chat requests with SYSTEM_PROMPT: the same each time (its blocks come from the model's prefix
    cache), or, cold, made unique at its very start so no cached block matches."""

    def __init__(self, base_url: str, api_key: str, cold: bool) -> None:
        super().__init__(base_url, api_key, name="cold prompt" if cold else "cached prefix")
        self.cold, self.sent = cold, 0

    def _body(self, prompt: str, max_tokens: int) -> bytes:
        self.sent += 1
        system = f"Ticket {self.sent}. {SYSTEM_PROMPT}" if self.cold else SYSTEM_PROMPT
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Do you rent tandems?"}]}
        return json.dumps(body).encode()


def prefix(options: Options) -> list[dict]:
    """Time to first token of a long prompt whose prefix the model has cached, against the same
    prompt made cold, one stream at a time through the edge on the CPU model."""
    with bench_stack(CPU) as stack:
        drivers = [PrefixDriver(stack.base_url, stack.api_key, cold) for cold in (True, False)]
        return [asyncio.run(_measure(d, d.name, 1, options, stack.pids, max_tokens=8)) for d in drivers]


async def _start_batch(stack: BenchStack, requests: int, max_tokens: int) -> str:
    """Uploads a batch of chat requests and starts it; returns its id."""
    import aiohttp

    lines = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "messages": [{"role": "user", "content": f"{PROMPT} ({i})"}], "max_tokens": max_tokens,
    }}).encode() + b"\n" for i in range(requests))
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", lines, filename="bench.jsonl")
        async with session.post(f"{stack.base_url}/files", data=form, headers=headers) as reply:
            file_id = (await reply.json())["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        async with session.post(f"{stack.base_url}/batches", json=body, headers=headers) as reply:
            return (await reply.json())["id"]


def batch(options: Options) -> list[dict]:
    """Interactive streams on the CPU model, alone and while a batch job runs (its requests at the
    edge's low priority: one at a time, paused while interactive requests pile up)."""
    rows = []
    with bench_stack(CPU) as stack:
        rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key, name="interactive alone"),
                                         "interactive alone", 1, options, stack.pids, max_tokens=32)))
        asyncio.run(_start_batch(stack, 500, options.max_tokens))
        time.sleep(2)  # the runner has taken the batch up
        rows.append(asyncio.run(_measure(HttpDriver(stack.base_url, stack.api_key, name="interactive, batch running"),
                                         "interactive, batch running", 1, options, stack.pids, max_tokens=32)))
    return rows


#: a JSON object the CPU model can fill in many ways (what a structured-output request asks)
GUIDE_SCHEMA = ('{"type": "object", "properties": {"title": {"type": "string"}, "lines": {"type": "array", '
                '"items": {"type": "string"}}}, "required": ["title", "lines"]}')


def guided(options: Options) -> list[dict]:
    """The CPU model itself, sampling freely and under a json_schema guide, side by side."""
    rows = []
    with bench_stack(CPU) as stack:
        for concurrency in options.guided_concurrency:
            for name, inputs in (("model, unconstrained", {}),
                                 ("model, json_schema", {"guided_decoding_guide_type": "json_schema",
                                                         "guided_decoding_guide": GUIDE_SCHEMA})):
                driver = ModelDriver(stack.triton_grpc, name, {"temperature": 1.0, **inputs})
                rows.append(asyncio.run(_measure(driver, name, concurrency, options, stack.pids)))
    return rows


#: the chat API's options measured against plain generation (tokens/s count every choice's tokens)
FEATURES = (
    ("plain", {}),
    ("logprobs, top 5", {"logprobs": True, "top_logprobs": 5}),
    ("n=4", {"n": 4}),
    ("json_schema", {"temperature": 1.0, "response_format": {"type": "json_schema", "json_schema": {
        "name": "story", "schema": json.loads(GUIDE_SCHEMA)}}}),
)


def features(options: Options) -> list[dict]:
    """Log probs, n = 4 and a json_schema guide against plain generation, through the edge: on the
    synthetic model at a GPU's pace (what the options cost the platform per token; it follows no
    guide) and on the CPU model (what they cost in tokens/s)."""
    rows = []
    for kind, stack_kind, options_rows in (("synthetic", SYNTHETIC, FEATURES[:3]), ("CPU", CPU, FEATURES)):
        with bench_stack(stack_kind, options.tokens_per_s if stack_kind is SYNTHETIC else 0.0) as stack:
            for name, extra in options_rows:
                driver = HttpDriver(stack.base_url, stack.api_key, extra=extra, name=f"{kind}: {name}")
                rows.append(asyncio.run(_measure(driver, f"{kind}: {name}", options.features_concurrency,
                                                 options, stack.pids)))
    return rows
