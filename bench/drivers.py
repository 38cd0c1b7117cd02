"""Three ways to stream one generation, measured the same way: straight from Triton
(tritonclient, through inference_svc's Triton adapter only), through inference_svc (gRPC), and through the edge (HTTP/SSE, auth and billing on).

Each driver returns a StreamResult: time to first token, the gaps between token events, tokens
received, and the error's kind if it failed. The HTTP client is deliberately lean (raw aiohttp,
byte checks per event, one JSON parse for the usage chunk) so that the client is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import grpc

from inference_svc.triton_engine import close_stream, is_final

MODEL = "smollm2-135m-instruct"
# a chunk with text (servers differ in JSON spacing); the usage chunk, where sent, gives the count
CONTENT = re.compile(rb'"content": ?"')
EMPTY_CONTENT = re.compile(rb'"content": ?""')


@dataclass
class StreamResult:
    ok: bool
    ttft_s: float | None = None
    #: seconds between consecutive token events, each spread over the tokens it carried
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


class Driver(Protocol):
    name: str

    async def open(self) -> None: ...

    async def stream(self, prompt: str, max_tokens: int) -> StreamResult: ...

    async def close(self) -> None: ...


class _Clock:
    """Turns token-event arrival times into a StreamResult."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last: float | None = None
        self.result = StreamResult(ok=False)

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = time.perf_counter()
        if self.last is None:
            self.result.ttft_s = now - self.start
        else:
            gap = (now - self.last) / count
            self.result.gaps_s.extend([gap] * count)
        self.last = now
        self.result.tokens += count


class HttpDriver:
    """POST /v1/chat/completions with stream=true, as any OpenAI client would."""

    name = "edge"

    def __init__(self, base_url: str, api_key: str, model: str = MODEL, stream: bool = True,
                 extra: dict | None = None, name: str = "edge") -> None:
        """extra: more request fields (n, logprobs, response_format...)."""
        self.name = name
        self.extra = extra or {}
        self.url = f"{base_url.rstrip('/')}/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.model = model
        self.streaming = stream
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=600))

    async def close(self) -> None:
        await self.session.close()

    def _body(self, prompt: str, max_tokens: int) -> bytes:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": self.streaming, **self.extra}
        if self.streaming:
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body).encode()

    async def stream(self, prompt: str, max_tokens: int) -> StreamResult:
        clock = _Clock()
        try:
            async with self.session.post(self.url, data=self._body(prompt, max_tokens), headers=self.headers) as reply:
                if reply.status != 200:
                    body = await reply.read()
                    try:
                        code = json.loads(body)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "no envelope"
                    return StreamResult(ok=False, error=f"http {reply.status} {code}")
                if not self.streaming:
                    usage = (await reply.json())["usage"]
                    clock.tokens(usage["completion_tokens"])
                    clock.result.ok = True
                    return clock.result
                billed = None
                async for line in reply.content:
                    if not line.startswith(b"data: "):
                        continue
                    if CONTENT.search(line) and not EMPTY_CONTENT.search(line):
                        clock.tokens(1)
                    elif b'"usage":{' in line or b'"usage": {' in line:
                        billed = json.loads(line[6:])["usage"]["completion_tokens"]
                    elif line.startswith(b'data: {"error"'):
                        return StreamResult(ok=False, error="error event")
                    elif line.startswith(b"data: [DONE]"):
                        clock.result.ok = True
                if billed is not None:  # a delta may carry several tokens: count what was billed
                    clock.result.tokens = billed
        except (aiohttp.ClientError, asyncio.TimeoutError) as failure:
            return StreamResult(ok=False, error=type(failure).__name__)
        return clock.result


class InferenceDriver:
    """inference_svc's Generate over gRPC, with an internal token from auth_svc."""

    name = "inference_svc"

    def __init__(self, address: str, auth_address: str, api_key: str, model: str = MODEL) -> None:
        self.address, self.auth_address, self.api_key, self.model = address, auth_address, api_key, model
        self.ids = itertools.count()

    async def open(self) -> None:
        from cloudach.auth.v1 import auth_pb2
        from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
        from cloudach.inference.v1.inference_pb2_grpc import InferenceServiceStub

        from cloudach.rpc.auth import bearer_interceptors

        async with grpc.aio.insecure_channel(self.auth_address) as auth:
            token = (await AuthServiceStub(auth).Authenticate(auth_pb2.AuthenticateRequest(api_key=self.api_key))).token
        self.channel = grpc.aio.insecure_channel(self.address, interceptors=bearer_interceptors(token))
        self.stub = InferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, prompt: str, max_tokens: int) -> StreamResult:
        from cloudach.inference.v1 import inference_pb2 as pb

        request = pb.GenerateRequest(
            request_id=f"bench-{next(self.ids)}", model=self.model,
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content=prompt)],
            sampling=pb.SamplingParameters(temperature=0), stopping=pb.StoppingCriteria(max_new_tokens=max_tokens),
        )
        clock = _Clock()
        try:
            async for event in self.stub.Generate(request):
                if event.HasField("delta"):
                    clock.tokens(event.delta.token_count)
                elif event.HasField("finished"):
                    clock.result.tokens = event.finished.usage.completion_tokens
                    clock.result.ok = True
        except grpc.aio.AioRpcError as failure:
            return StreamResult(ok=False, error=failure.code().name)
        return clock.result


class TritonDriver:
    """Triton's ModelStreamInfer through inference_svc's Triton adapter alone (tritonclient and
    TritonEngine, the one file that knows Triton): the model's side of the platform, nothing above."""

    name = "triton"

    def __init__(self, url: str, model: str = MODEL) -> None:
        self.url, self.model = url, model
        self.ids = itertools.count()

    async def open(self) -> None:
        from inference_svc.config import InferenceConfig
        from inference_svc.registry import load_registry
        from inference_svc.templates import Message
        from inference_svc.triton_engine import TritonEngine

        self.spec = load_registry(InferenceConfig().models_file).get(self.model)
        self.message = Message
        self.engine = TritonEngine([self.url], 60, {self.spec.id: self.spec.engine})

    async def close(self) -> None:
        await self.engine.close()

    async def stream(self, prompt: str, max_tokens: int) -> StreamResult:
        from cloudach.errors import CloudachError
        from inference_svc.engine import EngineRequest

        request = EngineRequest(f"bench-{next(self.ids)}", self.spec.id,
                                self.spec.encode_chat([self.message("user", prompt)]), max_tokens,
                                tuple(self.spec.stop_token_ids), 0.0, 1.0, 0, 0)
        clock = _Clock()
        try:
            async for step in self.engine.generate(request):
                clock.tokens(len(step.token_ids))
        except CloudachError as failure:
            return StreamResult(ok=False, error=type(failure).__name__)
        clock.result.ok = True
        return clock.result


#: inputs whose type the Python value does not say
_MODEL_INPUT_TYPES = {"seed": "UINT64"}


def model_inputs(input_ids: list[int], **scalars) -> list:
    """The `tensorrt_llm` model's input tensors: the prompt, then scalars by name (str: BYTES,
    bool: BOOL, int: INT32, float: FP32), each with the leading batch dimension."""
    import numpy as np
    from tritonclient.grpc import InferInput

    def tensor(name: str, value: np.ndarray, kind: str) -> InferInput:
        made = InferInput(name, list(value.shape), kind)
        made.set_data_from_numpy(value)
        return made

    tensors = [tensor("input_ids", np.array([input_ids], np.int32), "INT32"),
               tensor("input_lengths", np.array([[len(input_ids)]], np.int32), "INT32")]
    for name, value in scalars.items():
        kind = _MODEL_INPUT_TYPES.get(name) or ("BYTES" if isinstance(value, str) else "BOOL" if isinstance(value, bool)
                                                else "INT32" if isinstance(value, int) else "FP32")
        dtype = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64}[kind]
        tensors.append(tensor(name, np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype), kind))
    return tensors


class ModelDriver:
    """Our `tensorrt_llm` model called directly with extra inputs (a guide, n...): what the model
    itself does with them, nothing above it."""

    def __init__(self, url: str, name: str, inputs: dict | None = None, model: str = MODEL) -> None:
        self.url, self.name, self.inputs, self.model = url, name, dict(inputs or {}), model
        self.ids = itertools.count()

    async def open(self) -> None:
        import tritonclient.grpc.aio as triton

        from inference_svc.config import InferenceConfig
        from inference_svc.registry import load_registry
        from inference_svc.templates import Message

        spec = load_registry(InferenceConfig().models_file).get(self.model)
        self.encode = lambda prompt: spec.encode_chat([Message("user", prompt)])
        self.end_id = min(spec.stop_token_ids)
        self.client = triton.InferenceServerClient(self.url)

    async def close(self) -> None:
        await self.client.close()

    async def stream(self, prompt: str, max_tokens: int) -> StreamResult:
        tensors = model_inputs(self.encode(prompt), request_output_len=max_tokens, end_id=self.end_id,
                               streaming=True, **self.inputs)
        clock = _Clock()
        async with contextlib.aclosing(model_responses(self.client, tensors, f"bench-{next(self.ids)}")) as responses:
            async for result, error in responses:
                if error is not None:
                    return StreamResult(ok=False, error=error.message()[:80])
                ids = result.as_numpy("output_ids")
                clock.tokens(0 if ids is None else ids.size)
        clock.result.ok = True
        return clock.result


async def model_responses(client, tensors: list, request_id: str, model: str = "tensorrt_llm"):
    """One request's responses from a decoupled model, (result, error) each, up to its final one;
    closing it early (use contextlib.aclosing) cancels the request in the model."""
    finished = asyncio.Event()

    async def requests():
        yield {"model_name": model, "inputs": tensors, "request_id": request_id}
        await finished.wait()  # our side stays open until the model has finished

    responses = client.stream_infer(inputs_iterator=requests())
    final = False
    try:
        async for result, error in responses:
            yield result, error
            if error is not None:
                return
            if final := is_final(result):
                return
    finally:
        finished.set()
        await close_stream(responses, final)
