"""Every example of the streaming guide (shared/seed/streaming-guide.txt), adapted only in base
URL, key and model, run against the stack as `make run` starts it: Python scripts with the
official SDK, curl and a FastAPI proxy under uvicorn (the web examples, the Next.js route and the
React hook, run in a real Next.js app in a browser: test_guide_web.py); beyond the guide, a
streamed tool call with the Node SDK and the internal gRPC path (the README's example, and
grpcurl through reflection). The tests that break the stack on purpose (a killed Triton, a killed edge) come last."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tools.launcher.ports import free_ports
from tools.launcher.triton import model_stubs
from tests.e2e.conftest import GUIDE, MODEL, NODE, REPO, Output, Stack

#: At temperature 0 the CPU model answers this with all of max_tokens (2,000 tokens: about 35 s here).
COUNTING = "Write the numbers from 1 to 500 separated by commas."


def guide_script(stack: Stack, name: str, *args: str, api_key: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(GUIDE / name), *args], env=stack.env(api_key),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_guide(stack: Stack, name: str, *args: str, api_key: str | None = None) -> str:
    """Runs an example to its end; returns what it printed, failing with its stderr if it failed."""
    done = subprocess.run([sys.executable, str(GUIDE / name), *args], env=stack.env(api_key),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def answers_again(stack: Stack, name: str, timeout_s: float = 60) -> str:
    """Runs an example until it succeeds, as after Triton restarted: inference_svc reconnects to
    it on its own schedule. Fails with the last try's stderr past timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run([sys.executable, str(GUIDE / name)], env=stack.env(), capture_output=True, text=True,
                              timeout=180)
        if done.returncode == 0 or time.monotonic() > deadline:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def billed(stack: Stack, org: str, requests: int, timeout_s: float = 30) -> dict:
    """The organization's usage total once billing_svc holds `requests` requests (the edge delivers
    usage in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        usage = stack.cli("usage", "--org", org, "--json")
        assert usage.returncode == 0, usage.stderr
        total = json.loads(usage.stdout)["total"]
        if total["requests"] >= requests or time.monotonic() > deadline:
            return total
        time.sleep(0.5)


def test_basic_streaming_prints_the_answer_and_bills_it(stack):
    key = stack.create_key("guide-basic")
    printed = run_guide(stack, "basic_streaming.py", api_key=key)
    assert printed.endswith("\n") and len(printed.strip()) > 20, printed
    total = billed(stack, "guide-basic", 1)
    assert total["requests"] == 1
    assert total["completion_tokens"] > 5 and total["prompt_tokens"] > 5


def test_collecting_the_full_response_counts_what_was_streamed(stack):
    printed = run_guide(stack, "collect_full_response.py")
    streamed, _, summary = printed.rpartition("\n\nTotal characters: ")
    assert streamed.strip(), printed
    assert int(summary) == len(streamed)


def test_async_client_streams_and_returns_the_text(stack):
    printed = run_guide(stack, "async_streaming.py")
    streamed, _, summary = printed.rstrip("\n").rpartition("\n")
    assert streamed.strip()
    assert summary == f"returned {len(streamed)} characters"


def test_curl_gets_the_guides_sse_bytes(stack, tmp_path):
    headers = tmp_path / "headers"
    # The guide's command; -sS and -D only keep curl quiet and save the response's headers.
    done = subprocess.run(
        ["curl", "-sS", "-D", str(headers), f"{stack.base_url}/chat/completions",
         "-H", f"Authorization: Bearer {stack.dev_key}",
         "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 5 slowly."}],
                           "stream": True})],
        capture_output=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    head = headers.read_text().lower()
    assert head.startswith("http/1.1 200") and "content-type: text/event-stream" in head
    body = done.stdout.decode()
    assert body.endswith("\n\ndata: [DONE]\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and {c["model"] for c in chunks} == {MODEL}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()  # the guide samples at temperature 1: what it says varies
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_fastapi_proxy_route_streams_the_text_through(stack):
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fastapi_proxy:app", "--app-dir", str(GUIDE), "--port", str(port)],
        env=stack.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        Output(server).wait_for("Application startup complete", 60)
        query = urllib.parse.urlencode({"prompt": "Write a poem about the ocean."})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/chat?{query}", timeout=120) as reply:
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain")
            pieces = list(iter(lambda: reply.read1(65536).decode(), ""))
    finally:
        server.terminate()
        server.wait(30)
    assert len("".join(pieces).strip()) > 20
    assert len(pieces) > 1, "the proxy buffered instead of streaming"


def test_the_node_sdk_assembles_a_streamed_tool_call(stack, node_modules):
    """Beyond the guide: a forced tool call streamed to the npm package's stream helper."""
    done = subprocess.run(["node", str(NODE / "tool-call.mjs")], env=stack.env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    (call,) = seen["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert "".join(seen["fragments"]) == call["function"]["arguments"] and len(seen["fragments"]) > 1
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    assert seen["finish_reason"] == "stop"


def internal_env(stack: Stack) -> dict[str, str]:
    return {**stack.env(), "CLOUDACH_AUTH_TARGET": f"127.0.0.1:{stack.auth_port}",
            "CLOUDACH_INFERENCE_TARGET": f"127.0.0.1:{stack.inference_port}"}


def test_the_internal_grpc_example_streams_choices_cancels_and_reads_status_details(stack):
    """Beyond the guide: the README's example for internal services (docs/examples/internal_grpc.py)."""
    done = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "internal_grpc.py")],
                          env=internal_env(stack), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    generate, cancel, refused = (json.loads(line) for line in done.stdout.splitlines())
    assert generate["prompt_tokens"] > 0 and set(generate["texts"]) == {"0", "1"}
    assert all("colour" in json.loads(text) for text in generate["texts"].values())  # guided to the schema
    assert all(lp < 0 for lp in generate["logprobs"].values())
    assert set(generate["finish_reasons"]) == {"0", "1"} and generate["usage"]["completion_tokens"] > 0
    assert cancel == {"step": "cancel", "deltas": 5, "status": "CANCELLED"}
    assert (refused["code"], refused["field"], refused["reason"]) == ("INVALID_ARGUMENT", "n", "invalid_value")


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    binary = pathlib.Path(sys.executable).parent / "grpcurl"
    return subprocess.run([str(binary), "-plaintext", *args], capture_output=True, text=True, timeout=120)


def test_grpcurl_calls_the_internal_services_through_server_reflection(stack):
    inference, auth = f"127.0.0.1:{stack.inference_port}", f"127.0.0.1:{stack.auth_port}"
    listed = grpcurl(inference, "list")
    assert listed.returncode == 0 and "cloudach.inference.v1.InferenceService" in listed.stdout.split(), listed.stderr
    authenticated = grpcurl("-d", json.dumps({"api_key": stack.dev_key}), auth, "cloudach.auth.v1.AuthService/Authenticate")
    assert authenticated.returncode == 0, authenticated.stderr
    token = json.loads(authenticated.stdout)["token"]
    request = {"model": MODEL, "messages": [{"role": "ROLE_USER", "content": "Hi"}], "n": 2,
               "stopping": {"max_new_tokens": 5}}
    streamed = grpcurl("-H", f"authorization: Bearer {token}", "-d", json.dumps(request), inference,
                       "cloudach.inference.v1.InferenceService/Generate")
    assert streamed.returncode == 0, streamed.stderr
    decoder, text, events = json.JSONDecoder(), streamed.stdout, []
    at = 0
    while text[at:].strip():  # grpcurl prints one JSON object per message, one after another
        event, at = decoder.raw_decode(text, len(text) - len(text[at:].lstrip()))
        events.append(event)
    assert "accepted" in events[0] and "finished" in events[-1]
    assert {e["choice_finished"].get("index", 0) for e in events if "choice_finished" in e} == {0, 1}
    refused = grpcurl("-d", json.dumps(request), inference, "cloudach.inference.v1.InferenceService/Generate")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_stream_with_retry_waits_out_a_real_429(stack):
    key = stack.create_key("guide-429", "--max-concurrency", "1")
    request = {"model": MODEL, "messages": [{"role": "user", "content": COUNTING}], "max_tokens": 2000,
               "temperature": 0, "stream": True}
    # A first stream holds the key's one concurrent slot until we close it.
    with urllib.request.urlopen(urllib.request.Request(
        f"{stack.base_url}/chat/completions", data=json.dumps(request).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    ), timeout=120) as blocker:
        assert blocker.status == 200
        assert blocker.readline().startswith(b"data: ")
        script = guide_script(stack, "stream_with_retry.py", "Say hello.", api_key=key)
        output = Output(script)
        # The SDK retries a 429 twice by itself (honouring retry-after-ms); then the guide's code sees it.
        output.wait_for("Retrying in 1.0s (attempt 1)...", 60)
    assert script.wait(120) == 0, script.stderr.read().decode()
    answer = output.text.split("Retrying in 1.0s (attempt 1)...\n", 1)[1]
    assert answer.strip() and not answer.startswith("Retrying"), output.text


def test_a_mid_stream_failure_reaches_the_caller_and_the_stack_recovers(stack):
    for _ in range(5):
        script = guide_script(stack, "stream_with_retry.py", COUNTING)
        output = Output(script)
        try:
            output.wait_for("1", 120)  # tokens are arriving
        except AssertionError:
            continue  # the guide samples: a short answer can end first ("What number would you like?")
        if script.poll() is None:
            break
    else:
        pytest.fail("five answers in a row ended before the failure could be injected")
    triton = stack.services()["tritonserver"]
    os.kill(triton["pid"], signal.SIGKILL)
    assert script.wait(60) != 0
    # The guide: a mid-stream failure surfaces as an exception during iteration (openai.APIError,
    # which its retry loop does not catch); what was streamed before it was printed.
    stderr = script.stderr.read().decode()
    assert "openai.APIError" in stderr, stderr
    assert output.text.strip()
    # The launcher reports the death and restarts Triton; the stack answers again.
    stack.output.wait_for("!! tritonserver exited with code -9", 30)
    stack.output.wait_for("tritonserver ready again", 180)
    assert stack.services()["tritonserver"]["restarts"] == 1
    with pytest.raises(ProcessLookupError):  # nothing of the dead Triton is left (its model stub)
        os.killpg(triton["pid"], 0)
    assert answers_again(stack, "stream_with_retry.py").strip()


def test_a_dead_model_stub_gets_triton_restarted(stack):
    """Triton outlives its model's Python stub (a crash, the OOM killer) and goes on saying the
    model is ready, while every request fails: the launcher notices and restarts it."""
    triton = stack.services()["tritonserver"]
    stubs = model_stubs(triton["pid"])
    assert stubs, "no model stub in Triton's process group"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    noticed = stack.output.wait_for("!! tritonserver is broken: its model's Python stub is gone", 30)
    stack.output.wait_for("tritonserver ready again", 180, start=noticed)
    assert stack.services()["tritonserver"]["restarts"] == triton["restarts"] + 1
    assert answers_again(stack, "basic_streaming.py").strip()


def test_a_killed_edge_is_restarted_and_status_says_so(stack):
    edge = stack.services()["edge"]
    os.kill(edge["pid"], signal.SIGKILL)
    stack.output.wait_for("!! edge exited with code -9", 30)
    stack.output.wait_for("edge ready again", 60)
    status = stack.cli("status", "--state-dir", str(stack.state_dir))
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert set(rows) >= {"tritonserver", "auth_svc", "billing_svc", "inference_svc", "edge", "usage"}
    assert rows["edge"][1:3] == ["up,", "ready"] and rows["edge"][4] == "1"  # restarts
    assert rows["edge"][3] != str(edge["pid"])
    assert rows["edge"][5] == stack.base_url
    assert run_guide(stack, "basic_streaming.py").strip()


@pytest.fixture(autouse=True)
def _stack_alive(stack):
    """A test that left the launcher dead would make every later failure confusing."""
    yield
    assert stack.process.poll() is None, stack.output.text[-3000:]
