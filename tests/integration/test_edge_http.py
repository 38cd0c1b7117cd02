"""The edge over raw HTTP: SSE bytes and every chunk field, and one test per error status.

inference_svc is real (gRPC on loopback); its engine is the fake one, so streams are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp
import pytest

from edge.schema import CREATE_CHAT_COMPLETION_REQUEST
from tests.integration.services import API_KEY, MODEL, edge_over_fake
from tests.fakes import FakeEngine

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 5 slowly."}]}
WORDS = ["1", ",", " 2", ",", " 3", ",", " 4", ",", " 5", "."]


def steps(registry, words=WORDS):
    tok = registry.get(MODEL).tokenizer
    return [tok.encode(w) for w in words]


async def post(url, body=None, headers=AUTH, raw: bytes | None = None, content_type="application/json"):
    async with aiohttp.ClientSession() as session:
        data = raw if raw is not None else json.dumps(body).encode()
        async with session.post(f"{url}/v1/chat/completions", data=data,
                                headers={**headers, "Content-Type": content_type}) as r:
            return r.status, r.headers, await r.read()


def events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-50:]
    return raw[:-2].split(b"\n\n")


def payloads(raw: bytes) -> list[dict]:
    out = []
    for event in events(raw):
        if event.startswith(b":"):
            continue
        assert event.startswith(b"data: "), event
        if event != b"data: [DONE]":
            out.append(json.loads(event[len(b"data: "):]))
    return out


@pytest.mark.parametrize("multiplex", [True, False], ids=["shared streams", "a stream per call"])
async def test_streamed_bytes_follow_the_guides_wire_format(registry, auth, multiplex):
    generated = sum(map(len, steps(registry)))
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth, multiplex=multiplex) as url:
        status, headers, raw = await post(url, {**CHAT, "stream": True}, headers={**AUTH, "x-request-id": "my-req-1"})
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache" and headers["X-Accel-Buffering"] == "no"
    assert headers["x-request-id"] == "my-req-1" and int(headers["openai-processing-ms"]) >= 0
    assert events(raw)[-1] == b"data: [DONE]"
    chunks = payloads(raw)
    first, last = chunks[0], chunks[-1]
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    assert len({c["id"] for c in chunks}) == 1 and first["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["created"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "1, 2, 3, 4, 5."
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert last["choices"][0]["finish_reason"] == "stop"
    prompt = last["usage"]["prompt_tokens"]
    assert last["usage"] == {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
                             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                           "accepted_prediction_tokens": 0,
                                                           "rejected_prediction_tokens": 0}}
    assert all("usage" not in c for c in chunks[:-1])


async def test_include_usage_adds_openais_usage_chunk_and_nulls_elsewhere(registry, auth):
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth) as url:
        _, _, raw = await post(url, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    chunks = payloads(raw)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == sum(map(len, steps(registry)))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_max_tokens_gives_finish_reason_length(registry, auth):
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth) as url:
        status, _, raw = await post(url, {**CHAT, "max_completion_tokens": 3})
    body = json.loads(raw)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


async def test_non_streaming_returns_a_chat_completion(registry, auth):
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth) as url:
        status, headers, raw = await post(url, CHAT)
    body = json.loads(raw)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "1, 2, 3, 4, 5.", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["completion_tokens"] == sum(map(len, steps(registry)))


async def test_keep_alive_comments_are_sent_while_waiting_for_the_first_token(registry, auth):
    engine = FakeEngine(steps=steps(registry, ["Hi"]), delay_s=0.5)
    async with edge_over_fake(engine, registry, auth, keepalive_s=0.1) as url:
        _, _, raw = await post(url, {**CHAT, "stream": True})
    evs = events(raw)
    assert evs.count(b": keep-alive") >= 2
    assert evs.index(b": keep-alive") < next(i for i, e in enumerate(evs) if b'"content":"Hi"' in e)


async def test_a_failure_mid_stream_becomes_one_error_event_and_the_stream_ends(registry, auth):
    from cloudach.errors import Unavailable

    engine = FakeEngine(steps=steps(registry), fail_after=3, error=Unavailable("triton went away"))
    async with edge_over_fake(engine, registry, auth) as url:
        status, _, raw = await post(url, {**CHAT, "stream": True})
    assert status == 200
    last = events(raw)[-1]
    assert b"[DONE]" not in raw
    error = json.loads(last[len(b"data: "):])["error"]
    assert error["type"] == "server_error" and error["code"] == "service_unavailable"
    assert set(error) == {"message", "type", "param", "code"}


@contextlib.contextmanager
def small_reader(url: str, body: dict):
    """A socket with a 4 KiB receive buffer that has sent a streaming request and read nothing yet."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nAuthorization: Bearer " + API_KEY.encode() +
                  b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        yield s


async def test_a_slow_reader_gets_merged_events_and_the_whole_text(registry, auth):
    word = registry.get(MODEL).tokenizer.encode(" lighthouse")
    engine = FakeEngine(steps=[word] * 6000)
    async with edge_over_fake(engine, registry, auth) as url:
        with small_reader(url, {**CHAT, "stream": True, "max_tokens": 2000}) as s:
            await asyncio.sleep(1.5)  # a reader that falls behind while the model streams on
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            data = b""
            while chunk := await loop.sock_recv(s, 65536):
                data += chunk
    raw = data.split(b"\r\n\r\n", 1)[1]
    # chunked transfer encoding: strip the chunk-size lines
    body_bytes, rest = b"", raw
    while rest:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        body_bytes, rest = body_bytes + rest[:size], rest[size + 2:]
    chunks = payloads(body_bytes)
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == " lighthouse" * (2000 // len(word))
    assert len(content) < 2000 / len(word) / 2, f"{len(content)} events for {2000 // len(word)} deltas: nothing was merged"


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"messages": CHAT["messages"]}, "model", "missing_required_parameter"),
        ({**CHAT, "temperature": "hot"}, "temperature", "invalid_type"),
        ({**CHAT, "temperature": 2.5}, "temperature", "decimal_above_max_value"),
        ({**CHAT, "top_p": -1}, "top_p", "integer_below_min_value"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
        ({**CHAT, "messages": [{"role": "tool", "content": "x", "tool_call_id": "call_9"}]}, "messages[0].tool_call_id", None),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type", "invalid_value"),
        ({**CHAT, "n": 200}, "n", "integer_above_max_value"),
        ({**CHAT, "n": 9}, "n", "invalid_value"),  # past the model's maximum, checked by inference_svc
        ({**CHAT, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "invalid_value"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "invalid_value"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters", "invalid_function_parameters"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", None),
        ({**CHAT, "wat": 1}, None, None),
        ({**CHAT, "max_tokens": 100_000}, "max_tokens", None),
        ({**CHAT, "messages": [{"role": "user", "content": "hi " * 3000}]}, "messages", "context_length_exceeded"),
        # refused by inference_svc before any token: a real 400, not a 200 with an error event
        ({**CHAT, "stream": True, "messages": [{"role": "user", "content": "hi " * 3000}]}, "messages", "context_length_exceeded"),
    ],
)
async def test_bad_input_gets_400_naming_the_field(registry, auth, body, param, code):
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth) as url:
        status, headers, raw = await post(url, body)
    error = json.loads(raw)["error"]
    assert status == 400, raw
    assert headers["Content-Type"].startswith("application/json")
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code


async def test_malformed_json_is_400_and_other_statuses_are_in_the_envelope(registry, auth):
    async with edge_over_fake(FakeEngine(steps=steps(registry), delay_s=0.3), registry, auth,
                              max_body_bytes=10_000, max_concurrent_requests=1) as url:
        checks = {
            "malformed": (await post(url, raw=b'{"model": '), 400, None),
            "NaN": (await post(url, raw=b'{"model": "m", "messages": [], "temperature": NaN}'), 400, None),
            "no key": (await post(url, CHAT, headers={}), 401, "invalid_api_key"),
            "wrong key": (await post(url, CHAT, headers={"Authorization": "Bearer ck-nope"}), 401, "invalid_api_key"),
            "model": (await post(url, {**CHAT, "model": "gpt-9"}), 404, "model_not_found"),
            "too large": (await post(url, {**CHAT, "user": "x" * 20_000}), 413, "request_too_large"),
            "content type": (await post(url, CHAT, content_type="text/plain"), 415, "unsupported_media_type"),
        }
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.get(f"{url}/v1/nope") as r:
                checks["unknown url"] = ((r.status, r.headers, await r.read()), 404, None)
            async with session.get(f"{url}/v1/chat/completions") as r:
                checks["method"] = ((r.status, r.headers, await r.read()), 405, None)
            slow = asyncio.create_task(post(url, CHAT))
            await asyncio.sleep(0.1)
            checks["capacity"] = (await post(url, CHAT), 503, "server_overloaded")
            await slow
    for name, ((status, headers, raw), want_status, want_code) in checks.items():
        error = json.loads(raw)["error"]
        assert status == want_status, (name, raw)
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == want_code, (name, error)
        assert API_KEY not in raw.decode() and "ck-nope" not in raw.decode()
    assert checks["capacity"][0][1]["Retry-After"] == "1"
    assert "POST" in checks["method"][0][1]["Allow"]


async def test_the_request_deadline_is_a_504(registry, auth):
    engine = FakeEngine(steps=steps(registry), delay_s=1.0)
    async with edge_over_fake(engine, registry, auth, request_timeout_s=0.5) as url:
        status, _, raw = await post(url, CHAT)
    assert status == 504 and json.loads(raw)["error"]["code"] == "timeout"


async def test_a_client_that_disconnects_cancels_the_generation(registry, auth):
    engine = FakeEngine(steps=steps(registry) * 100, delay_s=0.02)
    async with edge_over_fake(engine, registry, auth) as url:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                await r.content.readuntil(b"\n\n")
                await r.content.readuntil(b"\n\n")
        await asyncio.sleep(0.5)
    assert len(engine.cancelled) == 1 and not engine.completed


async def test_health_ready_and_openapi(registry, auth):
    async with edge_over_fake(FakeEngine(steps=[]), registry, auth) as url:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/health") as r:
                assert r.status == 200
            await asyncio.sleep(0.3)  # inference_svc's first health poll
            async with session.get(f"{url}/ready") as r:
                assert r.status == 200 and (await r.json())["status"] == "ready"
            async with session.get(f"{url}/openapi.json") as r:
                doc = await r.json()
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["schemas"]["CreateChatCompletionRequest"] == json.loads(json.dumps(CREATE_CHAT_COMPLETION_REQUEST))
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}"}


async def test_ready_is_503_when_no_model_is_ready(registry, auth):
    async with edge_over_fake(FakeEngine(ready=False), registry, auth) as url:
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/ready") as r:
                assert r.status == 503


def raw_request(url: str, head: bytes, body: bytes) -> bytes:
    """One HTTP/1.1 request written by hand (header bytes no client library would send)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("raw, status", [
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "\ud800 lone surrogate"}]}).encode(), 400),
    (b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "x"}], "stop": {"\udfff": 1}}).encode(), 400),
])
async def test_hostile_json_is_a_400_in_the_envelope(registry, auth, raw, status):
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth) as url:
        code, headers, body = await post(url, raw=raw)
    assert code == status, body[:300]
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


async def test_a_model_name_of_100_kb_is_a_404_model_not_found(registry, auth):
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth) as url:
        status, _, body = await post(url, {**CHAT, "model": "m" * 100_000})
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/v1/models/{'m' * 5_000}", headers=AUTH) as r:
                retrieved = r.status, await r.read()
    error = json.loads(body)["error"]
    assert status == 404 and error["code"] == "model_not_found" and len(error["message"]) < 400
    assert retrieved[0] == 404 and json.loads(retrieved[1])["error"]["code"] == "model_not_found"


async def test_a_non_utf8_authorization_header_is_a_401(registry, auth):
    async with edge_over_fake(FakeEngine(steps=steps(registry)), registry, auth) as url:
        reply = await asyncio.to_thread(raw_request, url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                        b"Authorization: Bearer ck-\xff\xfe\r\nContent-Type: application/json\r\n",
                                        json.dumps(CHAT).encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), reply[:300]
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


async def test_keepalive_pings_on_a_quiet_stream_do_not_get_it_dropped(registry, auth):
    # The edge pings inference_svc every 0.2 s while the model is silent for 5 s: a server with
    # gRPC's default ping policy would answer the third ping with GOAWAY and fail the stream.
    engine = FakeEngine(steps=steps(registry, ["Hi"]), delay_s=5)
    async with edge_over_fake(engine, registry, auth, grpc_keepalive_s=0.2) as url:
        status, _, raw = await post(url, {**CHAT, "stream": True})
    assert status == 200 and events(raw)[-1] == b"data: [DONE]", raw[-300:]


async def test_a_client_that_stops_reading_is_cut_off(registry, auth):
    table = registry.get(MODEL).tokenizer.token_bytes
    longest = max((i for i in range(len(table)) if table[i].isascii()), key=lambda i: len(table[i]))
    engine = FakeEngine(steps=[[longest]] * 2000)  # 4 choices of 2,000 × 32 bytes: more than every buffer holds
    async with edge_over_fake(engine, registry, auth, stream_write_timeout_s=1.0) as url:
        with small_reader(url, {**CHAT, "stream": True, "max_tokens": 2000, "n": 4}) as s:
            await asyncio.sleep(3)  # reading nothing for longer than the write timeout
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            data = b""
            try:
                while chunk := await loop.sock_recv(s, 65536):
                    data += chunk
            except ConnectionResetError:
                pass
    assert data.startswith(b"HTTP/1.1 200") and b"[DONE]" not in data  # cut off, not waited for


async def test_sigterm_refuses_new_connections_at_once_and_lets_streams_finish(registry, auth, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from inference_svc.server import running_inference
    from tests.integration.services import inference_config
    from tools.launcher.ports import free_ports
    from tools.launcher.probes import wait_http_ok

    engine = FakeEngine(steps=steps(registry) * 3, delay_s=0.25)  # a stream of about 4 s
    async with running_inference(inference_config(auth), engine=engine, registry=registry) as inf:
        (port,) = free_ports(1)
        env = {**os.environ, "CLOUDACH_PORT": str(port), "CLOUDACH_INFERENCE_TARGET": inf.address,
               "CLOUDACH_AUTH_TARGET": auth.address, "CLOUDACH_EDGE_METRICS_PORT": "0",
               "CLOUDACH_EDGE_OUTBOX_PATH": str(tmp_path / "outbox.db")}
        edge = subprocess.Popen([sys.executable, "-m", "edge"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/health", 30, edge)
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=AUTH,
                                        json={**CHAT, "stream": True}) as r:
                    first = await r.content.readuntil(b"\n\n")
                    edge.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.5)
                    with pytest.raises(OSError):  # draining: no new connection is taken
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    rest = await r.read()
            assert first.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")  # the stream was not cut
            assert await asyncio.to_thread(edge.wait, 30) == 0
        finally:
            if edge.poll() is None:
                edge.kill()
